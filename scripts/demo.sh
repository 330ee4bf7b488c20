#!/usr/bin/env bash
# Usage: scripts/demo.sh [--no-train] [--predictor auto|container|local]
#
# Set up .venv (scripts/setup.sh), train a model version on synthetic users, serve it on loopback (TF Serving's
# container where an engine runs, else the local stand-in, and the transformer), send real requests, show the
# answers and stop. Its model store and logs are build/demo/: a stack serving build/models/ is left alone.
#   --no-train         serve the newest model version the demo trained before (its own build/demo/)
#   --predictor        auto (default): the container when an engine runs, else the local stand-in
#
# Environment:
#   PYTHON   the Python that creates .venv the first time (default: the newest python3.11-3.13 found)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"

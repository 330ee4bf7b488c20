#!/usr/bin/env bash
# Set up, train, serve on loopback, send real requests, show the answers, stop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"

#!/usr/bin/env bash
# Usage: scripts/test.sh [PYTEST ARGUMENTS...]
#
# Set up .venv (scripts/setup.sh) and run the whole test suite with pytest: unit tests, servers on loopback,
# manifests, the demo, the pipeline, and (where Go is installed) the cluster tests against a real control plane
# and the S3 store tests against MinIO, both built from the Go module proxy into build/ the first time. Arguments
# go to pytest: scripts/test.sh -m fast (the quick in-process tests), scripts/test.sh tests/test_release.py -x.
#
# Environment:
#   PYTHON   the Python that creates .venv the first time (default: the newest python3.11-3.13 found)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up and run the whole test suite (unit, integration on loopback, manifests, demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

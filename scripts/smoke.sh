#!/usr/bin/env bash
# Send the example requests to the transformer on the cluster (through kubectl port-forward)
# and compare the answers with the local stack's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need kubectl "Install it: https://kubernetes.io/docs/tasks/tools/"
scripts/setup.sh
exec .venv/bin/python -m scripts.cluster smoke --namespace "$NAMESPACE" "$@"

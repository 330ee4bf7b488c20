#!/usr/bin/env bash
# Send the example requests to the transformer on the cluster (through kubectl port-forward)
# and compare the answers with the local stack's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need kubectl "Install it: https://kubernetes.io/docs/tasks/tools/"
scripts/setup.sh
# OVERLAY as given to deploy.sh: kind -> the transformer's Service; collocated, fused -> the predictor's.
case "${OVERLAY:-kind}" in
  collocated|fused) entry=$OVERLAY ;;
  *) entry=transformer ;;
esac
exec .venv/bin/python -m scripts.cluster smoke --namespace "$NAMESPACE" --entry "$entry" "$@"

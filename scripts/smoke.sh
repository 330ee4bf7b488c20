#!/usr/bin/env bash
# Usage: scripts/smoke.sh
#
# Send the example requests (scripts/requests/) to the InferenceService on the cluster, through kubectl
# port-forward, and compare the answers with the local stack's.
#
# Environment:
#   OVERLAY   as given to deploy.sh: kind (default) asks the transformer's Service; collocated and fused the
#             predictor's
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"
need kubectl "Install it: https://kubernetes.io/docs/tasks/tools/"
scripts/setup.sh
# OVERLAY as given to deploy.sh: kind -> the transformer's Service; collocated, fused -> the predictor's.
case "${OVERLAY:-kind}" in
  collocated|fused) entry=$OVERLAY ;;
  *) entry=transformer ;;
esac
exec .venv/bin/python -m scripts.cluster smoke --namespace "$NAMESPACE" --entry "$entry" "$@"

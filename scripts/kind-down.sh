#!/usr/bin/env bash
# Usage: scripts/kind-down.sh
#
# Delete the local kind cluster (scripts/versions.env: KIND_CLUSTER_NAME); build/ on the host is kept. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"
need kind "Install it: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME"; then
  kind delete cluster --name "$KIND_CLUSTER_NAME"
else
  echo "no kind cluster named '$KIND_CLUSTER_NAME'"
fi

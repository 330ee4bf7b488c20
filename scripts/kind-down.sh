#!/usr/bin/env bash
# Delete the local kind cluster (build/ on the host is kept). Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need kind "Install it: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME"; then
  kind delete cluster --name "$KIND_CLUSTER_NAME"
else
  echo "no kind cluster named '$KIND_CLUSTER_NAME'"
fi

#!/usr/bin/env bash
# Create a local kind cluster with cert-manager and KServe (Standard mode) at pinned versions.
# The host's build/ folder is mounted into the node, so the cluster serves what `model.train` wrote.
# Idempotent: re-running skips what exists and re-applies the (unchanged) installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need_kind_tools
engine=$(container_engine)
if [ "$engine" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi

mkdir -p build
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME"; then
  echo "== kind cluster '$KIND_CLUSTER_NAME' exists"
else
  echo "== creating kind cluster '$KIND_CLUSTER_NAME' ($KIND_NODE_IMAGE)"
  config=$(mktemp)
  trap 'rm -f "$config"' EXIT
  cat > "$config" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $(pwd)/build
        containerPath: /mnt/embedder-build
        readOnly: true
YAML
  kind create cluster --name "$KIND_CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --config "$config" --wait 180s
fi
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null

echo "== cert-manager $CERT_MANAGER_VERSION"
kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml" >/dev/null
for deployment in cert-manager cert-manager-cainjector cert-manager-webhook; do
  kubectl -n cert-manager rollout status "deploy/$deployment" --timeout=300s
done

echo "== KServe $KSERVE_VERSION (Standard mode: plain Deployments, no Knative or Istio)"
kserve_release="https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION"
# The webhook needs cert-manager's CA injected; the first apply can race it, so retry a few times.
for attempt in 1 2 3 4 5; do
  if kubectl apply --server-side --force-conflicts -f "$kserve_release/kserve.yaml" >/dev/null; then break; fi
  [ "$attempt" -eq 5 ] && { echo "error: could not install KServe" >&2; exit 1; }
  echo "   retrying in 10s (webhook not ready yet)"; sleep 10
done
kubectl -n kserve rollout status deploy/kserve-controller-manager --timeout=300s
for attempt in 1 2 3 4 5; do
  if kubectl apply --server-side --force-conflicts -f "$kserve_release/kserve-cluster-resources.yaml" >/dev/null; then break; fi
  [ "$attempt" -eq 5 ] && { echo "error: could not install KServe's cluster resources" >&2; exit 1; }
  echo "   retrying in 10s"; sleep 10
done
kubectl -n kserve patch configmap inferenceservice-config --type merge \
  -p '{"data":{"deploy":"{\"defaultDeploymentMode\":\"Standard\"}"}}' >/dev/null
echo "== ready: kubectl context kind-$KIND_CLUSTER_NAME; next: scripts/deploy.sh"

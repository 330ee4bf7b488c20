#!/usr/bin/env bash
# Usage: scripts/kind-up.sh
#
# Create a local kind cluster with cert-manager and KServe (Standard mode) at the versions pinned in
# scripts/versions.env. The host's build/ folder is mounted into the node, so the cluster serves what
# `model.train` wrote (and the retraining pipeline, run on the cluster, publishes into it). Needs kind, kubectl
# and Docker or Podman. Idempotent: re-running skips what exists and re-applies the (unchanged) installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"
need_kind_tools
check_architecture
engine=$(container_engine)
check_tool_versions "$engine"
if [ "$engine" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi

# build/models: the model store (the InferenceService reads it; the retraining pipeline and the TFJob write
# new versions into it, as uid 65532, the training image's user); build/data: their input files.
open_store_to_image_user
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME"; then
  echo "== kind cluster '$KIND_CLUSTER_NAME' exists"
else
  echo "== creating kind cluster '$KIND_CLUSTER_NAME' ($KIND_NODE_IMAGE)"
  config=$(mktemp)
  trap 'rm -f "$config"' EXIT
  # failCgroupV1: false, because a 1.35 kubelet refuses a cgroup v1 host unless told (KEP-5573); kind's node runs
  # on the host's cgroups. The tests' real node needed the same on this kind of machine (tests/node/node.py).
  cat > "$config" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    failCgroupV1: false
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $(pwd)/build
        containerPath: /mnt/embedder-build
        readOnly: false
        selinuxRelabel: $(selinux_relabel)
YAML
  kind create cluster --name "$KIND_CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --config "$config" --wait 180s
fi
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null

echo "== cert-manager $CERT_MANAGER_VERSION"
kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml" >/dev/null
wait_for_namespace_deployments cert-manager 300s || exit 1
wait_for_webhooks cert-manager 300 || exit 1

echo "== KServe $KSERVE_VERSION (Standard mode: plain Deployments, no Knative or Istio)"
kserve_release="https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION"
# Since v0.17 kserve.yaml holds no Namespace object (KServe's own install script creates it first).
kubectl create namespace kserve --dry-run=client -o yaml | kubectl apply -f - >/dev/null
retry 6 10 "applying KServe ($kserve_release/kserve.yaml)" \
  kubectl apply --server-side --force-conflicts -f "$kserve_release/kserve.yaml" || {
  echo "Check cert-manager (kubectl -n cert-manager get pods), then run scripts/kind-up.sh again." >&2
  exit 1
}
# Every Deployment (kserve-controller-manager, llmisvc-controller-manager, ...) and the webhooks they
# serve: kserve-cluster-resources.yaml holds LLMInferenceServiceConfigs that the llmisvc webhook
# (failurePolicy Fail) must admit.
wait_for_namespace_deployments kserve 300s || exit 1
wait_for_webhooks kserve 300 || exit 1
retry 6 10 "applying KServe's runtimes ($kserve_release/kserve-cluster-resources.yaml)" \
  kubectl apply --server-side --force-conflicts -f "$kserve_release/kserve-cluster-resources.yaml" || {
  echo "Look at: kubectl -n kserve get pods; kubectl get validatingwebhookconfigurations; then run scripts/kind-up.sh again." >&2
  exit 1
}
kubectl -n kserve patch configmap inferenceservice-config --type merge \
  -p '{"data":{"deploy":"{\"defaultDeploymentMode\":\"Standard\"}"}}' >/dev/null
echo "== ready: kubectl context kind-$KIND_CLUSTER_NAME; next: scripts/deploy.sh"

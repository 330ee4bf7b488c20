#!/usr/bin/env bash
# Train if needed, build the transformer image, load it into kind, apply the kind overlay,
# and wait until the InferenceService is Ready. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need_kind_tools
engine=$(container_engine)

scripts/setup.sh
if ! ls build/models/embedder/*/assets.extra/transformer-bundle/manifest.json >/dev/null 2>&1; then
  echo "== training (build/ is empty)"
  .venv/bin/python -m model.train
fi

echo "== building $TRANSFORMER_IMAGE with $engine"
"$engine" build -f transformer/Dockerfile -t "$TRANSFORMER_IMAGE" .

echo "== loading the image into kind cluster '$KIND_CLUSTER_NAME'"
if [ "$engine" = docker ]; then
  kind load docker-image "$TRANSFORMER_IMAGE" --name "$KIND_CLUSTER_NAME"
else
  archive=$(mktemp --suffix=.tar)
  trap 'rm -f "$archive"' EXIT
  podman save -o "$archive" "$TRANSFORMER_IMAGE"
  KIND_EXPERIMENTAL_PROVIDER=podman kind load image-archive "$archive" --name "$KIND_CLUSTER_NAME"
fi

echo "== applying manifests/overlays/kind"
kubectl --context "kind-$KIND_CLUSTER_NAME" apply -k manifests/overlays/kind
# A new image under the same tag: restart the transformer so it runs the one just loaded.
kubectl --context "kind-$KIND_CLUSTER_NAME" -n "$NAMESPACE" rollout restart deploy/embedder-transformer 2>/dev/null || true
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null
.venv/bin/python -m scripts.cluster wait-ready --namespace "$NAMESPACE" --timeout 600

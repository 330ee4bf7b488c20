#!/usr/bin/env bash
# Train if needed, build the transformer image, load it into kind, apply an overlay (OVERLAY=kind by
# default; collocated or fused), and wait until the InferenceService is Ready. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
need_kind_tools
check_architecture
engine=$(container_engine)

scripts/setup.sh
if ! ls build/models/embedder/*/assets.extra/transformer-bundle/manifest.json >/dev/null 2>&1; then
  echo "== training (build/ is empty)"
  .venv/bin/python -m model.train
fi

# Built and loaded under its full name: Podman would otherwise tag it localhost/<name>, which is not
# the docker.io/library/<name> the pod asks for.
image=$(qualified_image "$TRANSFORMER_IMAGE")
echo "== building $image with $engine"
"$engine" build -f transformer/Dockerfile -t "$image" .

echo "== loading the image into kind cluster '$KIND_CLUSTER_NAME'"
# Through an archive for both engines: `kind load docker-image` fails with Docker 29's containerd
# image store ("content digest not found", kind#3795). mktemp with a template works on BSD and GNU.
archive=$(mktemp "${TMPDIR:-/tmp}/embedder-image.XXXXXX")
trap 'rm -f "$archive"' EXIT
"$engine" save -o "$archive" "$image"
if [ "$engine" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi
kind load image-archive "$archive" --name "$KIND_CLUSTER_NAME"

overlay=${OVERLAY:-kind}
[ -d "manifests/overlays/$overlay" ] || { echo "error: no overlay manifests/overlays/$overlay (OVERLAY=kind, collocated or fused)" >&2; exit 1; }
echo "== applying manifests/overlays/$overlay"
kubectl --context "kind-$KIND_CLUSTER_NAME" apply -k "manifests/overlays/$overlay"
# A new image under the same tag: restart the pods that run it (the transformer's, or the predictor's
# when collocated) so they run the one just loaded.
for component in transformer predictor; do
  kubectl --context "kind-$KIND_CLUSTER_NAME" -n "$NAMESPACE" rollout restart "deploy/embedder-$component" 2>/dev/null || true
done
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null
.venv/bin/python -m scripts.cluster wait-ready --namespace "$NAMESPACE" --timeout 600

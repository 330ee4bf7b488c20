#!/usr/bin/env bash
# Usage: scripts/deploy.sh
#
# Deploy to the kind cluster of scripts/kind-up.sh: train if build/ holds no model version, build the transformer
# and training images, load them into kind, apply an overlay with a stamp per component (python -m scripts.cluster
# apply: a new image rolls its pods), and wait until the InferenceService serves that spec. Idempotent.
#
# Environment:
#   OVERLAY               kind (default), collocated or fused: which manifests/overlays/ to apply
#   SKIP_TRAINING_IMAGE   1: do not build the training image (the retraining pipeline's; the larger build)
#   EMBEDDER_PYTHON       a Python with the project installed (default: .venv's, set up here)
#   TMPDIR                where image archives are written on their way into kind (default: /tmp)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"
need_kind_tools
check_architecture
engine=$(container_engine)
check_tool_versions "$engine"

# EMBEDDER_PYTHON: a Python with the project installed; by default .venv's, set up here.
python=${EMBEDDER_PYTHON:-.venv/bin/python}
[ -n "${EMBEDDER_PYTHON:-}" ] || scripts/setup.sh
if ! ls build/models/embedder/*/assets.extra/transformer-bundle/manifest.json >/dev/null 2>&1; then
  echo "== training (build/ is empty)"
  "$python" -m model.train
fi
open_store_to_image_user

# Saved for the node's platform only (save_image in lib.sh says why: kind#3795). mktemp with a template
# works on BSD and GNU.
archive=$(mktemp "${TMPDIR:-/tmp}/embedder-image.XXXXXX")
trap 'rm -f "$archive"' EXIT
if [ "$engine" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi
# build_and_load IMAGE DOCKERFILE: built and loaded under its full name (Podman would otherwise tag it
# localhost/<name>, which is not the docker.io/library/<name> the pod asks for).
build_and_load() {
  local image
  image=$(qualified_image "$1")
  echo "== building $image with $engine ($2)"
  "$engine" build -f "$2" -t "$image" .
  echo "== loading $image into kind cluster '$KIND_CLUSTER_NAME'"
  save_image "$engine" "$image" "$archive"
  kind load image-archive "$archive" --name "$KIND_CLUSTER_NAME"
}
build_and_load "$TRANSFORMER_IMAGE" transformer/Dockerfile
# The training image (the retraining pipeline's tasks and the TFJob's workers); SKIP_TRAINING_IMAGE=1 skips
# it when only the InferenceService changes (it holds TensorFlow: the larger build by far).
if [ "${SKIP_TRAINING_IMAGE:-0}" != 1 ]; then
  build_and_load "$TRAINING_IMAGE" model/Dockerfile
fi

overlay=${OVERLAY:-kind}
[ -d "manifests/overlays/$overlay" ] || { echo "error: no overlay manifests/overlays/$overlay (OVERLAY=kind, collocated or fused)" >&2; exit 1; }
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null
# The images' ids go into each component's embedder.example.com/revision annotation: a new image under the same
# tag is a new spec, so KServe rolls its pods out and keeps them (it rebuilds its Deployments from the
# InferenceService and undoes a `kubectl rollout restart`), and wait-ready waits for exactly that spec.
transformer_id=$("$engine" image inspect --format '{{.Id}}' "$(qualified_image "$TRANSFORMER_IMAGE")")
echo "== applying manifests/overlays/$overlay (transformer image $transformer_id)"
"$python" -m scripts.cluster apply --overlay "manifests/overlays/$overlay" --image-id "$TRANSFORMER_IMAGE=$transformer_id"
# An overlay without a transformer (fused, collocated) after one with it: KServe leaves the old component's
# Deployment running; remove what the new spec does not have, then wait for the new spec to be rolled out.
"$python" -m scripts.cluster remove-stale --namespace "$NAMESPACE"
"$python" -m scripts.cluster wait-ready --namespace "$NAMESPACE" --timeout 600

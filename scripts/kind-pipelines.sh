#!/usr/bin/env bash
# Usage: scripts/kind-pipelines.sh
#
# Install Kubeflow Pipelines (standalone) and Kubeflow's training operator on the kind cluster at pinned
# versions (scripts/versions.env: KFP_VERSION, TRAINING_OPERATOR_VERSION), then what the retraining pipeline needs
# beside the InferenceService (manifests/pipeline: the writable model store and the rollout's RBAC). Run after
# scripts/kind-up.sh and scripts/deploy.sh. Idempotent: re-running re-applies the (unchanged) installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"
need_kind_tools
kubectl config use-context "kind-$KIND_CLUSTER_NAME" >/dev/null

echo "== Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
kfp="github.com/kubeflow/pipelines/manifests/kustomize"
retry 6 10 "applying KFP's cluster-scoped resources" \
  kubectl apply -k "$kfp/cluster-scoped-resources?ref=$KFP_VERSION" || exit 1
kubectl wait --for condition=established --timeout=60s crd/applications.app.k8s.io
retry 6 10 "applying KFP ($kfp/env/platform-agnostic)" \
  kubectl apply -k "$kfp/env/platform-agnostic?ref=$KFP_VERSION" || exit 1

echo "== Kubeflow training operator $TRAINING_OPERATOR_VERSION (TFJob)"
retry 6 10 "applying the training operator" \
  kubectl apply --server-side -k \
  "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_VERSION" || exit 1

wait_for_namespace_deployments kubeflow 600s || exit 1
echo "== manifests/pipeline (the model store for the pipeline's tasks, the rollout's RBAC)"
kubectl apply -k manifests/pipeline
echo "Kubeflow Pipelines is ready: kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8088:80, then open"
echo "http://127.0.0.1:8088 and upload the YAML of: .venv/bin/python -m model.pipeline compile --out embedder-retrain.yaml"

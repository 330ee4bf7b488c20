"""The cluster path against a real control plane: Kubernetes' own API server, controllers and scheduler, KServe's
own controller and webhooks (tests/controlplane/), KWOK for the node.

What runs here is the project's real commands: ``python -m scripts.cluster apply`` (deploy.sh's apply), ``remove-stale``
and ``wait-ready`` as processes, ``kubectl apply -k`` of every overlay, and the retraining pipeline's rollout and
rollback (model/rollout.py) with the kubernetes client. KWOK marks pods Running and Ready without running a container,
so what a container does (TF Serving loading the model, the transformer's readiness against it, the smoke request
through the Service) is not seen here: the smoke test is replaced by a stand-in that records it was asked.

Skipped, with the reason, on a machine without Go; built once into build/controlplane (about 10 minutes cold on two
cores, seconds after). ``python -m tests.controlplane.record`` records the statuses of the same steps as JSON, for
tests/test_cluster_wait.py to replay where no Go is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import progress_line

from model import rollout
from tests.controlplane.cluster import NEVER_READY_VERSION, ControlPlane

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE, NAME = "embedder", "embedder"
TRANSFORMER_IMAGE = "kserve-embedder-transformer:dev"
OVERLAYS = ("kind", "collocated", "fused", "production")

pytestmark = [pytest.mark.heavy, pytest.mark.controlplane, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def control_plane(request, tmp_path_factory):
    from tests.controlplane.build import BuildUnavailable, build

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain on this machine: the control plane (Kubernetes, KServe's controller, KWOK) "
                    "is built from the Go module proxy; install Go 1.25+ to run these tests")
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl on this machine: the tests apply the overlays with it, as users do")
    say = progress_line(request, "control plane")

    try:
        build(say=say)
    except BuildUnavailable as exc:
        pytest.fail(f"the control plane could not be built: {exc}")
    work = tmp_path_factory.mktemp("controlplane")
    say(f"starting in {work}")
    with ControlPlane.start(work, say=say) as cp:
        yield cp


@pytest.fixture(scope="module")
def api(control_plane):
    """The kubernetes client's CustomObjectsApi and AppsV1Api against the control plane."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    return client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)


def project(cp: ControlPlane, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One of the project's Python commands, as a user runs it, against the control plane."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=cp.env, capture_output=True, text=True,
                          timeout=timeout)


def deploy(cp: ControlPlane, overlay: str, image_id: str, wait_timeout: float = 120) -> subprocess.CompletedProcess:
    """deploy.sh's three cluster steps: apply (stamped), remove what the spec no longer has, wait."""
    applied = project(cp, "scripts.cluster", "apply", "--overlay", f"manifests/overlays/{overlay}",
                      "--image-id", f"{TRANSFORMER_IMAGE}={image_id}")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    stale = project(cp, "scripts.cluster", "remove-stale", "--namespace", NAMESPACE)
    assert stale.returncode == 0, stale.stdout + stale.stderr
    return project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", str(wait_timeout))


def isvc(cp: ControlPlane) -> dict:
    return cp.get("-n", NAMESPACE, "inferenceservice", NAME)


def deployments(cp: ControlPlane) -> dict[str, dict]:
    found = cp.get("-n", NAMESPACE, "deployments")["items"]
    return {d["metadata"]["name"].removeprefix(f"{NAME}-"): d for d in found}


def pods(cp: ControlPlane, component: str) -> list[dict]:
    """The component's pods that are not being deleted."""
    found = cp.get("-n", NAMESPACE, "pods", "-l", f"component={component}")["items"]
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def our_annotations(annotations: dict | None) -> dict:
    return rollout.ours(annotations)


def serving_revisions(cp: ControlPlane, component: str) -> set[str]:
    """The revision stamps of the component's pods that are not being deleted."""
    return {(p["metadata"].get("annotations") or {}).get(rollout.REVISION_ANNOTATION) for p in pods(cp, component)}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.3)


# --- a first deploy and a redeploy -----------------------------------------------------------------------------

def test_a_first_deploy_finishes_once_kserve_rolled_out_the_applied_spec(control_plane):
    cp = control_plane
    waited = deploy(cp, "kind", "sha256:" + "1" * 64)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "is Ready" in waited.stdout
    spec = isvc(cp)["spec"]
    for component in ("predictor", "transformer"):
        stamp = spec[component]["annotations"][rollout.REVISION_ANNOTATION]
        template = deployments(cp)[component]["spec"]["template"]["metadata"]["annotations"]
        assert template[rollout.REVISION_ANNOTATION] == stamp  # KServe copied our stamp onto the pod template
        running = pods(cp, component)
        assert running and all(ready(p) for p in running)
        assert serving_revisions(cp, component) == {stamp}


def test_kserve_undoes_a_rollout_restart_and_its_status_generation_is_not_the_isvcs(control_plane):
    """Why deploy.sh no longer restarts: KServe rebuilds the Deployment from the InferenceService, dropping
    ``restartedAt``; every revert raises the Deployment's generation, which KServe copies into the
    InferenceService's ``status.observedGeneration``, so the old wait (observedGeneration == generation) never ends."""
    cp = control_plane
    before = deployments(cp)["transformer"]
    hashes = {p["metadata"]["labels"]["pod-template-hash"] for p in pods(cp, "transformer")}
    cp.kubectl("-n", NAMESPACE, "rollout", "restart", f"deploy/{NAME}-transformer")

    def reverted():
        now = deployments(cp)["transformer"]
        annotations = now["spec"]["template"]["metadata"].get("annotations") or {}
        settled = now["status"].get("observedGeneration") == now["metadata"]["generation"]
        return now if settled and now["metadata"]["generation"] > before["metadata"]["generation"] + 1 \
            and "kubectl.kubernetes.io/restartedAt" not in annotations else None

    after = wait_for(reverted, 60, "KServe reverting the restart")
    # Whether the restart's pod got to replace the old one first or not, what serves in the end is a pod of the
    # original template again: the restart changed nothing but the generation.
    wait_for(lambda: {p["metadata"]["labels"]["pod-template-hash"] for p in pods(cp, "transformer")} == hashes, 60,
             "the restart's pods going away")
    status = isvc(cp)
    assert status["status"]["observedGeneration"] != status["metadata"]["generation"]
    assert status["status"]["observedGeneration"] == after["status"]["observedGeneration"]
    waited = project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", "30")
    assert waited.returncode == 0, waited.stdout + waited.stderr


def test_a_new_image_under_the_same_tag_rolls_the_transformer_and_the_wait_ends_on_its_pods(control_plane):
    cp = control_plane
    old_predictor = {p["metadata"]["name"] for p in pods(cp, "predictor")}
    old_stamp = isvc(cp)["spec"]["transformer"]["annotations"][rollout.REVISION_ANNOTATION]
    waited = deploy(cp, "kind", "sha256:" + "2" * 64)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    new_stamp = isvc(cp)["spec"]["transformer"]["annotations"][rollout.REVISION_ANNOTATION]
    assert new_stamp != old_stamp
    # When the wait ends, every transformer pod that serves is one of the new image's, and Ready.
    assert serving_revisions(cp, "transformer") == {new_stamp}
    assert all(ready(p) for p in pods(cp, "transformer"))
    # The image is the transformer's: the predictor's stamp and pods did not change.
    assert {p["metadata"]["name"] for p in pods(cp, "predictor")} == old_predictor
    assert isvc(cp)["spec"]["transformer"]["containers"][0]["image"] == TRANSFORMER_IMAGE


# --- the retraining pipeline's rollout and rollback --------------------------------------------------------------

def test_the_pipelines_rollout_waits_for_both_components_to_serve_the_version(control_plane, api):
    cp = control_plane
    custom, apps = api
    smoked = []
    line = rollout.rollout_on_cluster(rollout.ClusterTarget(), 5, [0.0], custom=custom, apps=apps, timeout=120,
                                      smoke=lambda: smoked.append(time.monotonic()) or 0.0, say=lambda _: None)
    assert "serves version 5" in line and len(smoked) == 1
    for component in ("predictor", "transformer"):
        template = deployments(cp)[component]["spec"]["template"]["metadata"]["annotations"]
        assert template[rollout.VERSION_ANNOTATION] == "5"
        assert {(p["metadata"].get("annotations") or {}).get(rollout.VERSION_ANNOTATION)
                for p in pods(cp, component)} == {"5"}
        assert all(ready(p) for p in pods(cp, component))


def test_the_pipelines_role_is_all_its_rollout_needs(control_plane):
    """manifests/pipeline's Role, bound to KFP's run service account: the rollout task, impersonating it, patches
    and waits; anything more (deleting the InferenceService) is forbidden."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    cp = control_plane
    cp.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}])
    cp.kubectl("apply", "-k", str(ROOT / "manifests" / "pipeline"))
    runner = config.new_client_from_config(config_file=str(cp.kubeconfig))
    runner.set_default_header("Impersonate-User", "system:serviceaccount:kubeflow:pipeline-runner")
    custom, apps = client.CustomObjectsApi(runner), client.AppsV1Api(runner)
    line = rollout.rollout_on_cluster(rollout.ClusterTarget(), 6, [0.0], custom=custom, apps=apps, timeout=120,
                                      smoke=lambda: 0.0, say=lambda _: None)
    assert "serves version 6" in line
    with pytest.raises(ApiException) as denied:
        custom.delete_namespaced_custom_object(rollout.GROUP, rollout.VERSION, NAMESPACE, rollout.PLURAL, NAME)
    assert denied.value.status == 403
    patched = rollout.rollout_on_cluster(rollout.ClusterTarget(), 5, [0.0], custom=custom, apps=apps, timeout=120,
                                         smoke=lambda: 0.0, say=lambda _: None)
    assert "serves version 5" in patched


def test_a_rollout_whose_pods_never_turn_ready_times_out_naming_the_deployment_and_rolls_back(control_plane, api):
    cp = control_plane
    custom, apps = api
    before = {c: our_annotations(isvc(cp)["spec"][c].get("annotations")) for c in ("predictor", "transformer")}
    said, retired = [], []

    def retire():  # the store cannot be written: the annotations must be restored all the same
        retired.append(True)
        raise PermissionError(13, "Permission denied", "/mnt/model-store/models/embedder/97")

    with pytest.raises(rollout.RolloutFailed) as failed:
        rollout.rollout_on_cluster(rollout.ClusterTarget(), int(NEVER_READY_VERSION), [0.0], custom=custom,
                                   apps=apps, timeout=20, retire=retire, smoke=lambda: pytest.fail("no smoke"),
                                   say=said.append)
    message = str(failed.value)
    assert "did not finish within 20s" in message and f"deployment {NAME}-" in message, message
    # The old pod is what is available: the new one never turned Ready.
    assert "1 of 1 replicas updated, 1 available, 1 old still running" in message, message
    assert "rolled back" in message and "could not be retired" in message, message
    assert retired == [True]
    after = {c: our_annotations(isvc(cp)["spec"][c].get("annotations")) for c in ("predictor", "transformer")}
    assert after == before
    for component in ("predictor", "transformer"):
        template = deployments(cp)[component]["spec"]["template"]["metadata"]["annotations"]
        assert our_annotations(template) == before[component]
        assert all(ready(p) for p in pods(cp, component))
        assert {(p["metadata"].get("annotations") or {}).get(rollout.VERSION_ANNOTATION)
                for p in pods(cp, component)} == {before[component][rollout.VERSION_ANNOTATION]}


def test_a_wait_for_pods_that_never_turn_ready_times_out_naming_the_deployment(control_plane):
    cp = control_plane
    cp.kubectl("-n", NAMESPACE, "patch", "inferenceservice", NAME, "--type", "merge", "-p", json.dumps(
        {"spec": {"transformer": {"annotations": {rollout.VERSION_ANNOTATION: NEVER_READY_VERSION}}}}))
    try:
        waited = project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", "15")
        assert waited.returncode == 1
        assert f"did not roll out within 15s: deployment {NAME}-transformer: 1 of 1 replicas updated, 1 available, " \
               "1 old still running" in waited.stderr, waited.stderr
    finally:
        cp.kubectl("-n", NAMESPACE, "patch", "inferenceservice", NAME, "--type", "merge", "-p", json.dumps(
            {"spec": {"transformer": {"annotations": {rollout.VERSION_ANNOTATION: "5"}}}}))
    waited = project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr


# --- switching overlays ------------------------------------------------------------------------------------------

def test_switching_from_kind_to_collocated_to_fused_and_back(control_plane):
    cp = control_plane
    image = "sha256:" + "3" * 64
    waited = deploy(cp, "collocated", image)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "transformer" not in deployments(cp)  # remove-stale deleted what KServe leaves behind
    (pod,) = pods(cp, "predictor")
    assert {c["name"] for c in pod["spec"]["containers"]} == {"kserve-container", "transformer-container"}

    waited = deploy(cp, "fused", image)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    (pod,) = pods(cp, "predictor")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["kserve-container"]
    fused_uri = isvc(cp)["spec"]["predictor"]["model"]["storageUri"]
    assert fused_uri.endswith("embedder-fused")
    assert pod["metadata"]["annotations"]["internal.serving.kserve.io/storage-initializer-sourceuri"] == fused_uri

    waited = deploy(cp, "kind", image)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert set(deployments(cp)) == {"predictor", "transformer"}
    for component in ("predictor", "transformer"):
        stamp = isvc(cp)["spec"][component]["annotations"][rollout.REVISION_ANNOTATION]
        assert serving_revisions(cp, component) == {stamp}


# --- admission ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_is_admitted_by_kserves_webhooks(control_plane, overlay):
    """``kubectl apply -k`` as the README gives it, dry-run on the server: KServe's defaulting and validating
    webhooks run on the InferenceService, the API server validates the rest."""
    done = control_plane.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests" / "overlays" / overlay),
                                 check=False)
    assert done.returncode == 0, done.stderr
    assert "inferenceservice.serving.kserve.io/embedder" in done.stdout


def test_kserves_webhook_is_on_the_path(control_plane):
    """The same apply with a spec KServe's validator refuses (STORAGE_URI on a collocated transformer-container):
    denied by the webhook, which proves the overlays above were judged by it."""
    import yaml

    rendered = control_plane.kubectl("kustomize", str(ROOT / "manifests" / "overlays" / "collocated")).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "InferenceService"]
    container = docs[0]["spec"]["predictor"]["containers"][0]
    container.setdefault("env", []).append({"name": "STORAGE_URI", "value": "pvc://embedder-models/models/embedder"})
    done = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert done.returncode != 0
    assert "admission webhook" in done.stderr and "denied the request" in done.stderr, done.stderr

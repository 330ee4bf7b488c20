"""The cluster path with real containers: the project's own images on a real node, through the project's commands.

The control plane of tests/test_control_plane.py (Kubernetes' API server, controllers and scheduler, KServe's own
controller and webhooks, as its own ServiceAccount) and, instead of KWOK, a real node (tests/node/): kubelet and
kube-proxy from the same Kubernetes module, Debian's containerd and runc, the CNI bridge, CoreDNS, all inside a
network namespace of the test's own. The images are built from ``transformer/Dockerfile`` and ``model/Dockerfile``
on a Debian base made here, and imported into the node's containerd as ``kind load`` does.

TF Serving has no image or binary here: the predictor pod runs the stand-in (``python -m model.standin``, which
speaks TF Serving's REST and gRPC APIs) under the image name KServe's TF Serving runtime asks for, started by the
runtime's own command and arguments. What only TF Serving's own image can show (its C++ server loading our
SavedModels, its batching, its metrics endpoint) is not proved here.

Skipped, with the reason, where containers cannot run (not root, no containerd, runc, CNI plugins or podman) or Go
is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.localstack import free_port

import pytest
from conftest import progress_line

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE, NAME = "embedder", "embedder"

pytestmark = [pytest.mark.heavy, pytest.mark.controlplane, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, build_dir):
    """(control plane, node, the build folder the node serves as kind's /mnt/embedder-build, image ids)."""
    from tests.controlplane.build import BuildUnavailable, build
    from tests.controlplane.cluster import ControlPlane
    from tests.node import images
    from tests.node.coredns import build as build_coredns
    from tests.node.node import Node, missing, node_options

    why = missing() or ("" if shutil.which("go") else "no Go toolchain: the node's programs are built from the Go "
                        "module proxy") or ("" if shutil.which("kubectl") else "no kubectl")
    if why:
        pytest.skip(f"no real node on this machine: {why}")
    say = progress_line(request, "real node")

    try:
        build(say=say)
        build_coredns(say=say)
        built = images.build(say=say)
    except images.ImagesUnavailable as exc:
        pytest.skip(f"the project's images cannot be built here: {exc}")
    except BuildUnavailable as exc:
        pytest.fail(f"the node's programs could not be built: {exc}")
    work = tmp_path_factory.mktemp("node")
    store = tmp_path_factory.mktemp("kind-build")  # what kind-up.sh mounts: the user's build/
    shutil.copytree(build_dir / "models", store / "models")
    say(f"starting in {work}")
    with ControlPlane.start(work / "cp", say=say, **node_options(work)) as cp, \
            Node.start(cp, work, store, say=say) as node:
        began = time.monotonic()
        # The training image (the pipeline's and the TFJob's) is the largest and no pod here runs it.
        served = [name for name in built if name != images.training_image()]
        archives = [images.save(name, work / f"image-{i}.tar") for i, name in enumerate(served)]
        node.load(archives)
        say(f"  {len(archives)} images imported into the node's containerd: {time.monotonic() - began:.0f}s")
        yield cp, node, store, built


def project(cp, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=cp.env, capture_output=True, text=True,
                          timeout=timeout)


def pods(cp, component: str) -> list[dict]:
    return cp.get("-n", NAMESPACE, "pods", "-l", f"component={component}")["items"]


def describe(cp) -> str:
    """What a failure should show: the pods, their containers' states and the node's recent events."""
    lines = []
    for pod in cp.get("-n", NAMESPACE, "pods")["items"]:
        statuses = pod.get("status", {}).get("containerStatuses", []) + pod.get("status", {}).get(
            "initContainerStatuses", [])
        lines.append(f"{pod['metadata']['name']}: {pod.get('status', {}).get('phase')} "
                     + "; ".join(f"{s['name']} ready={s.get('ready')} {json.dumps(s.get('state'))}" for s in statuses))
    events = cp.kubectl("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
    return "\n".join(lines) + "\n" + "\n".join(events.splitlines()[-25:])


def deploy(cp, overlay: str, image_id: str) -> None:
    """deploy.sh's three cluster steps, with the transformer image's real id: apply (stamped), remove what the spec no
    longer has, wait until the spec is rolled out and Ready."""
    from tests.node.images import transformer_image

    applied = project(cp, "scripts.cluster", "apply", "--overlay", f"manifests/overlays/{overlay}",
                      "--image-id", f"{transformer_image().removeprefix('docker.io/library/')}={image_id}")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    stale = project(cp, "scripts.cluster", "remove-stale", "--namespace", NAMESPACE)
    assert stale.returncode == 0, stale.stdout + stale.stderr
    waited = project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", "600", timeout=700)
    assert waited.returncode == 0, waited.stdout + waited.stderr + "\n" + describe(cp)


ENTRIES = {"kind": "transformer", "collocated": "collocated", "fused": "fused"}


@pytest.mark.parametrize("overlay", ["kind", "collocated", "fused", "kind"])
def test_each_overlay_serves_on_a_real_node_and_answers_like_the_local_stack(cluster, overlay):
    """deploy.sh's cluster steps, then smoke.sh's comparison through the entry Service (kubectl port-forward, through
    the API server to the kubelet), each overlay after the one before, as a user switches: the transformer image
    started with the arguments KServe injects, the stand-in reading the store through the PVC's subPath as uid 65532,
    the transformer's readiness against it, the Service names over cluster DNS, the collocated pod's two containers."""
    from tests.node.images import transformer_image

    cp, node, store, built = cluster
    deploy(cp, overlay, built[transformer_image()])
    if overlay == "kind":
        (transformer,) = [p for p in pods(cp, "transformer") if not p["metadata"].get("deletionTimestamp")]
        args = transformer["spec"]["containers"][0]["args"]
        # What KServe's controller appended (transformer_custom.go): a Service name the pod resolves through CoreDNS.
        assert args[args.index("--predictor_host") + 1] == f"{NAME}-predictor.{NAMESPACE}"
    if overlay == "collocated":
        (predictor,) = [p for p in pods(cp, "predictor") if not p["metadata"].get("deletionTimestamp")]
        assert sorted(c["name"] for c in predictor["spec"]["containers"]) == ["kserve-container",
                                                                             "transformer-container"]
    smoked = project(cp, "scripts.cluster", "smoke", "--namespace", NAMESPACE, "--entry", ENTRIES[overlay],
                     "--build", str(store))
    assert smoked.returncode == 0, smoked.stdout + smoked.stderr + "\n" + describe(cp)
    assert f"smoke test passed ({ENTRIES[overlay]}): the cluster answers exactly like the local stack" in smoked.stdout


BROKEN_DOCKERFILE = """\
ARG IMAGE
FROM ${IMAGE}
ENTRYPOINT ["python", "-c", "import sys; print('loading the transformer'); print('error: this build lost a module'); sys.exit(3)"]
"""


def test_a_new_image_whose_container_crashes_on_start_is_named_and_the_old_pods_keep_serving(cluster, tmp_path):
    """A new image under the same tag whose container exits at start (a missing module, a wrong ENTRYPOINT): the
    wait stops at its second exit instead of waiting 10 minutes, naming the container, its exit code and its last
    words (the manifests' FallbackToLogsOnError); the old pod, still Ready, answers smoke.sh's requests all along;
    the good image back rolls out."""
    from tests.node import images

    cp, node, store, built = cluster
    tag = images.transformer_image()
    (tmp_path / "Dockerfile").write_text(BROKEN_DOCKERFILE)
    images.podman("build", "--pull=never", "--build-arg", f"IMAGE={tag}", "-t", "localhost/embedder-broken:1",
                  str(tmp_path))
    node.load([images.save("localhost/embedder-broken:1", tmp_path / "broken.tar")])
    node.ctr("images", "tag", "--force", tag, "localhost/embedder-good:1")
    node.ctr("images", "tag", "--force", "localhost/embedder-broken:1", tag)  # what `kind load` of a bad build does
    short = tag.removeprefix("docker.io/library/")
    try:
        applied = project(cp, "scripts.cluster", "apply", "--overlay", "manifests/overlays/kind",
                          "--image-id", f"{short}={images.image_id('localhost/embedder-broken:1')}")
        assert applied.returncode == 0, applied.stderr
        began = time.monotonic()
        waited = project(cp, "scripts.cluster", "wait-ready", "--namespace", NAMESPACE, "--timeout", "600",
                         timeout=700)
        took = time.monotonic() - began
        assert waited.returncode == 1, waited.stdout + waited.stderr
        assert "error: embedder/embedder did not roll out: container kserve-container of pod embedder-transformer-" \
               in waited.stderr and "exited with code 3 (Error), 2 times: loading the transformer | error: this " \
               "build lost a module" in waited.stderr, waited.stderr
        assert took < 180, took
        smoked = project(cp, "scripts.cluster", "smoke", "--namespace", NAMESPACE, "--build", str(store))
        assert smoked.returncode == 0, smoked.stdout + smoked.stderr + "\n" + describe(cp)
    finally:
        node.ctr("images", "tag", "--force", "localhost/embedder-good:1", tag)
    deploy(cp, "kind", built[tag])
    smoked = project(cp, "scripts.cluster", "smoke", "--namespace", NAMESPACE, "--build", str(store))
    assert smoked.returncode == 0, smoked.stdout + smoked.stderr + "\n" + describe(cp)


def test_a_version_published_into_the_store_is_picked_up_through_the_service_with_no_mixed_answer(
        cluster, two_versions, raw_users):
    """A new version copied into the kind node's store (whole, then one rename, as publish does) while requests flow
    through the transformer's Service: TF Serving's container and the transformer's both pick it up from the volume,
    and every answer equals the offline computation of the one version it names."""
    from conftest import Offline, Traffic, check_answers, version_dir, wait_until

    cp, node, store, built = cluster
    rows = 3
    bodies = [(i, json.dumps({"instances": raw_users[i:i + rows].tolist()}).encode())
              for i in range(0, len(raw_users) - rows, rows)]
    port = free_port()
    forward = subprocess.Popen(["kubectl", "-n", NAMESPACE, "port-forward", f"svc/{NAME}-transformer", f"{port}:80"],
                               env=cp.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
        wait_until(lambda: _answers(url), 30, "the transformer through kubectl port-forward")
        with Traffic(url, bodies, threads=2) as traffic:
            wait_until(lambda: len(traffic.answered_by("1")) >= 20, 60, "traffic on version 1")
            models = store / "models" / NAME
            staging = models / ".staging-2"
            shutil.copytree(version_dir(two_versions, 2), staging)
            staging.rename(models / "2")
            wait_until(lambda: traffic.answered_by("2"), 120, "the first answer from version 2")
            switched = min(entry[1] for entry in traffic.answered_by("2"))
            wait_until(lambda: sum(1 for e in traffic.log if e[0] > switched) >= 20, 60, "traffic on version 2")
        log = list(traffic.log)
    finally:
        forward.terminate()
        forward.wait()
    check_answers(log, raw_users, rows, {"1": Offline(store, 1), "2": Offline(two_versions, 2)})
    assert {e[2] for e in log} <= {200, 503} and not traffic.errors[:3], (traffic.errors[:3])
    assert all(e[3] == "2" for e in log if e[2] == 200 and e[0] > switched)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.post(url, json={"instances": [[0.0] * 12]}, timeout=5).status_code in (200, 400)
    except httpx.HTTPError:
        return False

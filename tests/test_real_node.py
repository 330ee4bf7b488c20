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

import pytest

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
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def say(line):
        if reporter is not None:
            reporter.write_line(f"[real node] {line}")

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

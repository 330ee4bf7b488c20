"""The kind scripts, run for real against stand-ins of kind, kubectl and docker that log each call.

No cluster runs here; what these tests show is the order of the steps (the ``kserve`` namespace
before KServe, every Deployment and webhook of KServe ready before its cluster resources), that a
second run changes nothing and succeeds, how a failure ends, and that an arm64 host is told why
before anything is created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.localstack import ROOT, pinned

# One stand-in for every command: it logs "name args" and answers like the real tool would here.
STUB = r'''#!/usr/bin/env bash
name=$(basename "$0")
echo "$name $*" >> "$STUB_LOG"
state="$STUB_STATE"
case "$name $*" in
  "uname -m") echo "${STUB_ARCH:-x86_64}" ;;
  "uname "*) PATH=/usr/bin:/bin uname "$@" ;;
  "docker info") ;;
  "docker version --format"*) echo "${STUB_DOCKER_VERSION:-29.0.1}" ;;
  "docker image save --help") echo "      --platform stringArray   Save only the given platform(s)" ;;
  "docker image save"*|"docker save"*) ;;
  "docker image inspect --format {{.Id}} "*) echo "sha256:${STUB_IMAGE_ID:-5e1f}" ;;
  "kind version") echo "kind ${STUB_KIND_VERSION:-v0.31.0} go1.25.5 linux/amd64" ;;
  "kubectl version --client -o json") printf '{"clientVersion": {"major": "1", "minor": "%s"}}\n' "${STUB_KUBECTL_MINOR:-35}" ;;
  "getenforce"*) echo "${STUB_SELINUX:-Disabled}" ;;
  "kind get clusters") [ -f "$state/cluster" ] && echo embedder ;;
  "kind create cluster"*) touch "$state/cluster"
    cp "$(echo "$*" | sed -n 's/.*--config \([^ ]*\).*/\1/p')" "$state/kind-config.yaml" ;;
  "python -m scripts.cluster"*) ;;
  "kubectl create namespace kserve --dry-run=client -o yaml") printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kserve\n' ;;
  "kubectl apply -f -") cat > /dev/null; touch "$state/ns-kserve" ;;
  *"kserve-cluster-resources.yaml"*)
    [ -f "$state/webhooks-ready" ] || { echo "Internal error occurred: failed calling webhook llmisvc" >&2; exit 1; } ;;
  *"releases/download/v"*"/kserve.yaml"*)
    [ -f "$state/ns-kserve" ] || { echo 'namespaces "kserve" not found' >&2; exit 1; }
    touch "$state/kserve" ;;
  "kubectl -n kserve get deployments -o name") printf 'deployment.apps/kserve-controller-manager\ndeployment.apps/llmisvc-controller-manager\n' ;;
  "kubectl -n cert-manager get deployments -o name") printf 'deployment.apps/cert-manager\ndeployment.apps/cert-manager-webhook\n' ;;
  "kubectl -n kserve rollout status deployment.apps/llmisvc-controller-manager"*) touch "$state/webhooks-ready" ;;
  "kubectl get validatingwebhookconfigurations,mutatingwebhookconfigurations"*'namespace=="kserve"'*)
    if [ -f "$state/webhooks-ready" ]; then echo "kserve-webhook-server-service Q0E="; echo "llmisvc-webhook-server-service Q0E="; fi ;;
  "kubectl -n kserve get endpoints"*) echo 10.0.0.7 ;;
  *) ;;
esac
exit 0
'''


@pytest.fixture
def stubs(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    # sleep: retries without waiting; python: the project's Python (EMBEDDER_PYTHON), logged like the rest
    for name in ("kind", "kubectl", "docker", "uname", "sleep", "getenforce", "python"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_STATE": str(state),
           "EMBEDDER_PYTHON": str(bin_dir / "python")}
    return env, log, state


def run_kind_up(env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/kind-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def index_of(lines: list[str], fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


def test_kind_up_installs_kserve_in_order_and_a_second_run_changes_nothing(stubs):
    env, log, state = stubs
    first = run_kind_up(env)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = calls(log)
    assert index_of(lines, "kind create cluster") < index_of(lines, "cert-manager.yaml")
    namespace = index_of(lines, "kubectl create namespace kserve")
    install = index_of(lines, "/kserve.yaml")
    rollouts = [i for i, line in enumerate(lines) if line.startswith("kubectl -n kserve rollout status")]
    webhooks = max(i for i, line in enumerate(lines) if "validatingwebhookconfigurations" in line)
    resources = index_of(lines, "kserve-cluster-resources.yaml")
    assert namespace < install < min(rollouts) and len(rollouts) == 2  # every Deployment in kserve
    assert max(rollouts) < webhooks < resources
    assert "ready: kubectl context kind-embedder" in first.stdout

    log.unlink()
    second = run_kind_up(env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kind 'embedder' exists" in second.stdout or "cluster 'embedder' exists" in second.stdout
    assert not any(line.startswith("kind create cluster") for line in calls(log))


def test_a_failing_install_ends_with_what_failed_and_what_to_run(stubs, tmp_path):
    env, log, state = stubs
    # kubectl apply of the namespace never takes effect: KServe's objects have no namespace.
    stub = (tmp_path / "bin" / "kubectl").read_text().replace('touch "$state/ns-kserve"', ":")
    (tmp_path / "bin" / "kubectl").write_text(stub)
    result = run_kind_up(env)
    assert result.returncode == 1
    assert "error: applying KServe (" in result.stderr and "failed after 6 tries" in result.stderr
    assert 'namespaces "kserve" not found' in result.stderr
    assert "then run scripts/kind-up.sh again" in result.stderr
    assert not any("kserve-cluster-resources" in line for line in calls(log))


def test_an_arm64_host_is_told_why_before_anything_is_created(stubs):
    env, log, state = stubs
    result = run_kind_up({**env, "STUB_ARCH": "arm64"})
    assert result.returncode == 1
    assert "is published\nfor linux/amd64 only" in result.stderr
    assert "EMBEDDER_ALLOW_ARM64=1" in result.stderr
    assert not any(line.startswith(("kind ", "kubectl ")) for line in calls(log))


def run_deploy(env, overlay="kind") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/deploy.sh"], cwd=ROOT, env={**env, "OVERLAY": overlay},
                          capture_output=True, text=True, timeout=120)


def test_deploy_saves_the_image_for_the_nodes_platform_and_waits_for_the_new_spec(stubs):
    env, log, state = stubs
    result = run_deploy(env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls(log)
    save = index_of(lines, "docker image save --platform")
    assert lines[save].startswith("docker image save --platform linux/amd64 -o ")
    assert lines[save].endswith(" docker.io/library/kserve-embedder-transformer:dev")
    archive = lines[save].split(" -o ")[1].split()[0]
    load = index_of(lines, "kind load image-archive")
    assert lines[load] == f"kind load image-archive {archive} --name embedder" and save < load
    context = index_of(lines, "kubectl config use-context kind-embedder")
    inspect = index_of(lines, "docker image inspect --format {{.Id}} docker.io/library/kserve-embedder-transformer:dev")
    # The loaded image's id is stamped on the components (a new spec KServe keeps), not restarted into the pods.
    apply = index_of(lines, "python -m scripts.cluster apply --overlay manifests/overlays/kind --image-id "
                            "kserve-embedder-transformer:dev=sha256:5e1f")
    stale = index_of(lines, "python -m scripts.cluster remove-stale --namespace embedder")
    wait = index_of(lines, "python -m scripts.cluster wait-ready --namespace embedder --timeout 600")
    assert load < inspect < apply < stale < wait and context < apply  # the previous overlay's rest goes first
    assert not any("rollout restart" in line for line in lines)
    assert not any(line.startswith("docker save") for line in lines)


def test_deploy_without_platform_support_saves_plainly(stubs, tmp_path):
    env, log, state = stubs
    stub = (tmp_path / "bin" / "docker").read_text().replace('echo "      --platform stringArray', 'echo "      --output')
    (tmp_path / "bin" / "docker").write_text(stub)
    result = run_deploy(env, "fused")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls(log)
    assert any(line.startswith("docker save -o ") for line in lines)
    assert any(line == "python -m scripts.cluster apply --overlay manifests/overlays/fused --image-id "
               "kserve-embedder-transformer:dev=sha256:5e1f" for line in lines)


def test_a_kubectl_too_far_from_the_nodes_kubernetes_stops_before_anything_is_created(stubs):
    env, log, state = stubs
    result = run_kind_up({**env, "STUB_KUBECTL_MINOR": "32"})  # this machine's own kubectl
    assert result.returncode == 1
    assert ("error: kubectl 1.32 is more than one minor version away from the cluster's Kubernetes\n1.35 "
            f"({pinned('KIND_NODE_IMAGE')})") in result.stderr and "Install kubectl 1.35" in result.stderr
    assert not any(line.startswith("kind create") for line in calls(log))
    assert run_deploy({**env, "STUB_KUBECTL_MINOR": "37"}).returncode == 1
    for supported in ("34", "36"):  # one minor of skew either way
        assert run_kind_up({**env, "STUB_KUBECTL_MINOR": supported}).returncode == 0


def test_another_kind_or_an_old_engine_is_named_and_the_pinned_node_image_used(stubs):
    env, log, state = stubs
    result = run_kind_up({**env, "STUB_KIND_VERSION": "v0.32.0", "STUB_DOCKER_VERSION": "19.03.8"})
    assert result.returncode == 0, result.stderr
    assert "warning: kind v0.32.0 here; these scripts are tested with kind v0.31.0" in result.stderr
    assert "warning: docker 19.03.8: these scripts are tested with Docker 28-29 and Podman 4-5" in result.stderr
    assert any(line.startswith(f"kind create cluster --name embedder --image {pinned('KIND_NODE_IMAGE')} ")
               for line in calls(log))
    quiet = run_kind_up(env)
    assert "warning" not in quiet.stderr


def minor(version: str) -> str:
    return version.split("@")[0].rsplit(":v", 1)[-1].lstrip("v").split(".")[1]


def test_the_cluster_the_scripts_make_runs_the_versions_the_tests_run():
    """kind's node, the kubectl rule and KServe's release are what the cluster tests build and run: the same
    Kubernetes minor as the control plane and the real node (tests/controlplane, tests/node), the same KServe."""
    assert pinned("KIND_NODE_IMAGE").startswith("kindest/node:v") and "@sha256:" in pinned("KIND_NODE_IMAGE")
    assert minor(pinned("KIND_NODE_IMAGE")) == minor(pinned("CONTROL_PLANE_KUBERNETES"))
    assert pinned("KSERVE_VERSION") == pinned("CONTROL_PLANE_KSERVE")
    from tests.controlplane.build import BIN, PROGRAMS

    assert "kubectl" in PROGRAMS  # the tests' kubectl: the control plane's release, inside its skew
    if (BIN / "kubectl").exists():
        done = subprocess.run([str(BIN / "kubectl"), "version", "--client", "-o", "json"], capture_output=True,
                              text=True, timeout=30)
        client = json.loads(done.stdout)["clientVersion"]
        assert client["gitVersion"] == pinned("CONTROL_PLANE_KUBERNETES")


@pytest.mark.parametrize("mode, relabel", [("Enforcing", "true"), ("Permissive", "false"), ("Disabled", "false")])
def test_the_build_mount_is_relabelled_where_selinux_enforces(stubs, mode, relabel):
    env, log, state = stubs
    assert run_kind_up({**env, "STUB_SELINUX": mode}).returncode == 0
    config = (state / "kind-config.yaml").read_text()
    assert "containerPath: /mnt/embedder-build" in config and f"selinuxRelabel: {relabel}" in config
    import yaml

    (patch,) = yaml.safe_load(config)["kubeadmConfigPatches"]  # a 1.35 node on a cgroup v1 host
    assert yaml.safe_load(patch) == {"kind": "KubeletConfiguration", "failCgroupV1": False}


def test_deploy_builds_and_loads_the_training_image_beside_the_transformers(stubs):
    env, log, state = stubs
    result = run_deploy(env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls(log)
    builds = [line for line in lines if line.startswith("docker build ")]
    assert builds == ["docker build -f transformer/Dockerfile -t docker.io/library/kserve-embedder-transformer:dev .",
                      "docker build -f model/Dockerfile -t docker.io/library/kserve-embedder-training:dev ."]
    saves = [line for line in lines if line.startswith("docker image save --platform")]
    assert [s.rsplit(" ", 1)[1] for s in saves] == ["docker.io/library/kserve-embedder-transformer:dev",
                                                    "docker.io/library/kserve-embedder-training:dev"]
    loads = [i for i, line in enumerate(lines) if line.startswith("kind load image-archive")]
    assert len(loads) == 2 and loads[-1] < index_of(lines, "python -m scripts.cluster apply")

    log.unlink()
    result = subprocess.run(["bash", "scripts/deploy.sh"], cwd=ROOT, env={**env, "SKIP_TRAINING_IMAGE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any("model/Dockerfile" in line for line in calls(log))


def test_kind_pipelines_installs_kfp_and_the_training_operator_then_the_pipelines_manifests(stubs):
    env, log, state = stubs
    result = subprocess.run(["bash", "scripts/kind-pipelines.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls(log)
    scoped = index_of(lines, "manifests/kustomize/cluster-scoped-resources?ref=2.17.0")
    crd = index_of(lines, "kubectl wait --for condition=established --timeout=60s crd/applications.app.k8s.io")
    kfp = index_of(lines, "manifests/kustomize/env/platform-agnostic?ref=2.17.0")
    operator = index_of(lines, "kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.3")
    waits = index_of(lines, "kubectl -n kubeflow get deployments -o name")
    ours = index_of(lines, "kubectl apply -k manifests/pipeline")
    assert scoped < crd < kfp < operator < waits < ours
    assert "ml-pipeline-ui" in result.stdout


def as_user(uid: int, folder: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` in bash as another user (root's tests would never meet a permission)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "bash", "-c",
                           f"set -euo pipefail; umask 077; cd {folder}; source scripts/lib.sh; {script}"],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def host_folder():
    """A project folder of a host user's own, in a place every user can reach (pytest's tmp_path is root's only)."""
    import tempfile

    made = []

    def make(uid: int) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="embedder-host-"))
        folder.chmod(0o755)
        os.chown(folder, uid, uid)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as two users")
def test_the_store_is_opened_to_the_images_user_whatever_the_umask_and_whoever_made_a_folder(host_folder):
    """A version trained under umask 077 (files 0600, folders 0700) is readable by uid 65532, the user the pods read
    it as; a model folder the pipeline or the TFJob made (owned by 65532) is left alone instead of failing the chmod,
    which stopped kind-up.sh and deploy.sh under `set -e`."""
    host, image = 1000, 65532
    tmp_path = host_folder(host)
    (tmp_path / "scripts").mkdir()
    for name in ("lib.sh", "versions.env"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    made = as_user(host, tmp_path, "mkdir -p build/models/embedder/1/variables && echo graph > "
                                   "build/models/embedder/1/saved_model.pb && echo w > "
                                   "build/models/embedder/1/variables/variables.index")
    assert made.returncode == 0, made.stderr
    version = tmp_path / "build" / "models" / "embedder" / "1"
    assert (version / "saved_model.pb").stat().st_mode & 0o777 == 0o600
    by_pipeline = tmp_path / "build" / "models" / "embedder-v2"
    by_pipeline.mkdir(mode=0o755)
    os.chown(by_pipeline, image, image)

    opened = as_user(host, tmp_path, "open_store_to_image_user; echo opened")
    assert opened.returncode == 0 and opened.stdout.strip() == "opened", opened.stderr
    for path in (version / "saved_model.pb", version / "variables" / "variables.index"):
        assert path.stat().st_mode & 0o444 == 0o444, oct(path.stat().st_mode)
    for path in (version, version / "variables"):
        assert path.stat().st_mode & 0o555 == 0o555, oct(path.stat().st_mode)
    for path in (tmp_path / "build", tmp_path / "build" / "models", version.parent):
        assert path.stat().st_mode & 0o777 == 0o777, path
    assert by_pipeline.stat().st_mode & 0o777 == 0o755 and by_pipeline.stat().st_uid == image
    readable = as_user(image, tmp_path, "cat build/models/embedder/1/saved_model.pb")
    assert readable.returncode == 0 and readable.stdout == "graph\n", readable.stderr

"""Deploy to a live cluster and smoke-test it: runs only where a cluster with KServe is reachable."""

import shutil
import subprocess

import pytest

from scripts.localstack import ROOT, pinned

pytestmark = pytest.mark.e2e


def cluster_problem() -> str | None:
    """Why the e2e tests cannot run here, or None when they can."""
    for tool in ("kubectl", "kind"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    context = f"kind-{pinned('KIND_CLUSTER_NAME')}"
    probe = subprocess.run(["kubectl", "--context", context, "get", "crd", "inferenceservices.serving.kserve.io"],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"no reachable cluster '{context}' with KServe (run scripts/kind-up.sh): {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def test_deploy_and_smoke(cluster):
    for script in ("scripts/deploy.sh", "scripts/smoke.sh"):
        result = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{script}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "smoke test passed" in result.stdout

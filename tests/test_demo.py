"""The README's first command, as a newcomer runs it."""

import subprocess

from scripts.localstack import ROOT
from transformer.store.bundle import model_versions


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time (empty when there is none)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else {}


def test_demo_trains_serves_and_answers():
    # The user's own store and logs (what `model.train` and `scripts.localstack up` use) are not the demo's.
    yours = {folder: snapshot(folder) for folder in (ROOT / "build" / "models", ROOT / "build" / "logs")}
    before = model_versions(ROOT / "build" / "demo" / "models" / "embedder")
    result = subprocess.run(["bash", "scripts/demo.sh", "--predictor", "local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "quality on" in out and "recall@10" in out
    assert out.count("HTTP 200") == 3 and "HTTP 400" in out
    assert "item_scores       FP32  [2, 10]" in out  # the v2 request's tensors
    assert "segment" in out and "items" in out
    assert "stopped both servers" in out
    assert "training (synthetic users, into build/demo/" in out
    assert len(model_versions(ROOT / "build" / "demo" / "models" / "embedder")) == len(before) + 1
    assert (ROOT / "build" / "demo" / "logs" / "transformer.log").is_file()
    assert {folder: snapshot(folder) for folder in yours} == yours

"""The README's first command, as a newcomer runs it."""

import subprocess

from scripts.localstack import ROOT


def test_demo_trains_serves_and_answers():
    result = subprocess.run(["bash", "scripts/demo.sh", "--predictor", "local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "quality on" in out and "recall@10" in out
    assert out.count("HTTP 200") == 3 and "HTTP 400" in out
    assert "item_scores       FP32  [2, 10]" in out  # the v2 request's tensors
    assert "segment" in out and "items" in out
    assert "stopped both servers" in out

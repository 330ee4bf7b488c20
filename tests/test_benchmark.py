"""The benchmark's smoke mode: every path starts, answers without errors, and the report is written.

Performance goals are measured by the benchmark itself (benchmarks/results.md), never asserted here."""

import json
import subprocess
import sys

from scripts.localstack import ROOT


def test_benchmark_smoke(build_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--smoke", "--build", str(build_dir), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {r["target"] for r in report["runs"]} == {"a", "b", "c", "d"}
    for run in report["runs"]:
        assert run["requests"] > 0 and run["non_2xx"] == 0 and run["socket_errors"] == 0, run
    assert report["soak"]["lost"] == 0 and report["soak"]["ok"] == report["soak"]["requests"]
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    text = (tmp_path / "results.md").read_text()
    assert "## Goals" in text and "## Soak" in text and "(d) fused alone" in text

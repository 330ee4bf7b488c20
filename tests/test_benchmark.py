"""The benchmark's smoke mode: every path starts, answers without errors, and the report is written.

Performance goals are measured by the benchmark itself (benchmarks/results.md), never asserted here."""

import json
import subprocess
import sys

import pytest

from scripts.localstack import ROOT


def test_benchmark_smoke(build_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--smoke", "--build", str(build_dir), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    # e, f: v2 REST and gRPC at the transformer; g: its REST hop to the predictor; h: the predictor's gRPC API;
    # i: the Python HTTP floor; j: the plain KServe transformer; k: the REST hop on aiohttp; m: the gRPC hop only;
    # n: the default on uvloop
    assert {r["target"] for r in report["runs"]} == {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "m", "n"}
    for run in report["runs"]:
        assert run["requests"] > 0 and run["non_2xx"] == 0 and run["socket_errors"] == 0, run
    assert report["soak"]["lost"] == 0 and report["soak"]["ok"] == report["soak"]["requests"]
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    text = (tmp_path / "results.md").read_text()
    assert "## Goals" in text and "## Soak" in text and "(d) fused alone" in text
    assert "(f) transformer v2 gRPC -> predictor" in text and "(h) predictor alone, gRPC" in text
    assert "over REST only / gRPC only / auto (transformer)" in text
    assert "(i) Python HTTP floor (fixed answer)" in text and "(j) plain KServe transformer -> predictor" in text
    assert "ahead of the plain KServe transformer in every cell" in text and "5x the floor's" in text
    # The CPU budget of each hop at one row: every stage, sampled, adding up to the CPU per request measured.
    from scripts.benchmark.budget import STAGES

    assert [(b["target"], b["concurrency"]) for b in report["budgets"]] == [("b", 4), ("k", 4), ("m", 4)]
    for budget in report["budgets"]:
        assert budget["samples"] > 50 and budget["cpu_us"] > 0 and budget["threads"]["loop"] > 0
        assert sum(cell["us"] for cell in budget["stages"].values()) == pytest.approx(budget["cpu_us"])
        assert budget["stages"]["hop"]["samples"] > 0 and budget["stages"]["kserve"]["samples"] > 0
        assert (tmp_path / "profiles" / f"budget-{budget['target']}-1-row-4-clients.folded").stat().st_size > 0
    assert "## CPU budget per stage: the transformer over each hop, one row" in text
    assert all(f"| {description} | " in text for _, description in STAGES)
    assert "| stage | (b) 4 clients: us (share) | (k) 4 clients: us (share) | (m) 4 clients: us (share) |" in text


def test_overload_mode_sheds_with_503_and_reports_its_goals(build_dir, tmp_path):
    """The overload scenario end to end, briefly: only 200s and 503s, a report with every goal."""
    import json

    from scripts.benchmark import OVERLOAD_PHASES, overload

    # A bound above the 16 connections of the calm phases, far below the 1,024 of the overload.
    report = overload(build_dir, tmp_path, scale=0.1, transformer_args=["--max_inflight", "24"])
    assert set(report["phases"]) == {name for name, *_ in OVERLOAD_PHASES}
    for phase in report["phases"].values():
        assert phase["other_statuses"] == {} and phase["transport_errors"] == 0, phase
        assert phase["ok"] > 0
    over = report["phases"]["overload"]
    assert over["shed"] > 0  # 1,024 connections against a bound of 24
    assert 1 <= over["retry_after_mean_s"] <= over["retry_after_max_s"] <= 9  # what the refused were told
    assert report["phases"]["after"]["shed"] == 0
    assert len(report["goals"]) == 6
    if report["wrk_phases"]:  # the storms with wrk: answered 200 or 503, nothing lost, counted by status
        text = (tmp_path / "overload.md").read_text()
        for loop in ("", ", --event-loop uvloop"):
            for number in (1, 2, 3):  # back to back, each with what it left behind
                name = f"storm {number}, wrk (Retry-After ignored){loop}"
                storm = report["wrk_phases"][name]
                assert storm["ok"] > 0 and storm["ok"] + storm["shed"] == storm["requests"], storm
                assert storm["other_statuses"] == {} and storm["transport_errors"] == 0, storm
                # read after the quiet that follows it (a tenth of 3 s here: paced requests may still be inside)
                assert storm["left_behind"]["limit"] >= 1 and storm["left_behind"]["connections"] >= 1, storm
                assert f"| {name} | 1024 |" in text
        assert set(report["floor_storms"]) == {"uvloop", "asyncio"}  # the floor under the same storm, each loop
        assert all(floor["ok"] > 0 and floor["shed"] == 0 for floor in report["floor_storms"].values())
        assert "| uvloop | " in text and "| asyncio | " in text
    assert json.loads((tmp_path / "overload.json").read_text())["goals"] == report["goals"]
    assert "| goodput at 1,024 connections >= 90% of the peak at 16 |" in (tmp_path / "overload.md").read_text()


def test_chaos_soak_answers_every_request_through_kills_and_an_update(two_versions, tmp_path):
    """The chaos soak, briefly: two predictor kills and a model update, every request 200 or a documented 5xx."""
    from scripts.benchmark import chaos

    report = chaos(two_versions, tmp_path, requests=3000, connections=8)
    assert report["answered"] == 3000 and report["lost"] == 0, report
    assert set(report["statuses"]) <= {"200", "502", "503", "504"} and report["statuses"]["200"] > 0
    assert report["model_version_at_end"] == 2  # the update took effect
    assert [e["event"] for e in report["events"]] == [
        "predictor killed and restarted", "model version 2 published", "predictor killed and restarted"]
    assert all(g["met"] for g in report["goals"]), report["goals"]
    assert "| nothing hangs, nothing is lost |" in (tmp_path / "chaos.md").read_text()

"""The transformer past its capacity: 16, then 1,024 connections (clients that honour Retry-After, then clients
that re-send at once), then 16 again; every request's status and latency recorded."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import httpx
import numpy as np
import psutil

from scripts.benchmark.common import MODEL, machine
from scripts.benchmark.paths import request_bodies
from scripts.loadgen import run_recorded
from scripts.localstack import LocalStack

# (name, connections, seconds, clients honour Retry-After): the peak; about four times what one process
# serves, with clients that back off as told and with clients that re-send at once; the load dropping again.
OVERLOAD_PHASES = (("peak", 16, 10.0, True), ("overload", 1024, 15.0, True),
                   ("overload, Retry-After ignored", 1024, 10.0, False), ("after", 16, 5.0, True))


def admission_limit(metrics_url: str) -> int | None:
    """The transformer's request limit in force (``embedder_admission_limit``)."""
    found = re.search(r"^embedder_admission_limit\{[^}]*\} (\S+)$", httpx.get(metrics_url, timeout=10).text, re.M)
    return int(float(found.group(1))) if found else None


# The first second of a phase: every connection opens at once and sends its first request; the one event loop
# accepts and reads them all before it answers any (a storm, not the steady state; both are reported).
STORM_SECONDS = 1.0


def overload_phase(url: str, body: bytes, connections: int, seconds: float, honour: bool, transformer) -> dict:
    """One phase of recorded load: goodput, the admitted requests' latency, how fast the shed ones were told."""
    rss_before = transformer.memory_info().rss
    metrics_url = url.split("/v1/")[0] + "/metrics"
    cpu_before = sum(transformer.cpu_times()[:2])
    run = run_recorded(url, body, connections, seconds, honour)
    cpu = sum(transformer.cpu_times()[:2]) - cpu_before
    limit = admission_limit(metrics_url)
    statuses, latencies = run["statuses"], run["latencies_s"] * 1000.0
    ok, shed = statuses == 200, statuses == 503
    settled = run["sent_at_s"] >= STORM_SECONDS  # past the storm of connections opened at once
    others = {str(code): int((statuses == code).sum()) for code in np.unique(statuses[~(ok | shed)])}

    def pct(values, q):
        return float(np.percentile(values, q)) if values.size else float("nan")

    return {
        "connections": connections, "honours_retry_after": honour, "seconds": run["seconds"],
        "requests": int(statuses.size),
        "ok": int(ok.sum()), "shed": int(shed.sum()), "other_statuses": others,
        "transport_errors": run["transport_errors"], "goodput": float(ok.sum() / run["seconds"]),
        "admitted_p50_ms": pct(latencies[ok], 50), "admitted_p99_ms": pct(latencies[ok], 99),
        "all_p99_ms": pct(latencies, 99), "transformer_cpu_s": cpu,
        "shed_p99_ms": pct(latencies[shed], 99), "shed_max_ms": float(latencies[shed].max()) if shed.any() else float("nan"),
        "shed_within_10ms": float((latencies[shed] <= 10.0).mean()) if shed.any() else float("nan"),
        "settled_admitted_p99_ms": pct(latencies[ok & settled], 99),
        "settled_shed_p99_ms": pct(latencies[shed & settled], 99),
        "settled_shed_within_10ms": float((latencies[shed & settled] <= 10.0).mean()) if (shed & settled).any()
        else float("nan"),
        "client_cpu_share": run["client_cpu_seconds"] / run["seconds"],
        "retry_after_mean_s": float(run["retry_after_s"][shed].mean()) if shed.any() else float("nan"),
        "retry_after_max_s": float(run["retry_after_s"][shed].max()) if shed.any() else float("nan"),
        "rss_before_mb": rss_before / 2**20, "rss_after_mb": transformer.memory_info().rss / 2**20,
        "admission_limit_after": limit,
    }


def overload(build: Path, out: Path, scale: float = 1.0, transformer_args: list[str] | None = None) -> dict:
    """The transformer at 16, then 1,024, then 16 connections (1-row requests, default admission)."""
    transformer_bodies = request_bodies(build, [1])["v1"]
    body = transformer_bodies[1]
    stack = LocalStack(build=build, predictor="local", log_dir=Path(tempfile.mkdtemp(prefix="overload-logs-")),
                       transformer_args=transformer_args)
    stack.start()
    try:
        transformer = psutil.Process(stack.processes["transformer"].pid)
        url = f"{stack.transformer_url}/v1/models/{MODEL}:predict"
        run_recorded(url, body, 16, 2.0 * scale)  # warm-up
        phases = {}
        for name, connections, seconds, honour in OVERLOAD_PHASES:
            phases[name] = overload_phase(url, body, connections, seconds * scale, honour, transformer)
            print(f"   {name:>30}: {connections:>5} connections, {phases[name]['goodput']:7.0f} ok/s, "
                  f"admitted p99 {phases[name]['admitted_p99_ms']:.1f} ms, {phases[name]['shed']} shed "
                  f"(p99 {phases[name]['shed_p99_ms']:.1f} ms)", flush=True)
    finally:
        stack.stop()
    peak, over, after = phases["peak"], phases["overload"], phases["after"]
    hammer = phases["overload, Retry-After ignored"]
    per_answer = peak["transformer_cpu_s"] / max(peak["ok"], 1)  # an admitted answer's CPU, at the peak
    refusal_us = 1e6 * max(hammer["transformer_cpu_s"] - hammer["ok"] * per_answer, 0.0) / max(hammer["shed"], 1)
    goals = [
        ("goodput at 1,024 connections >= 90% of the peak at 16", f"{over['goodput']:.0f} vs {peak['goodput']:.0f} ok/s "
         f"= {100 * over['goodput'] / peak['goodput']:.0f}%", over["goodput"] >= 0.9 * peak["goodput"]),
        ("p99 of admitted requests <= 250 ms", f"{over['admitted_p99_ms']:.1f} ms over the phase; "
         f"{over['settled_admitted_p99_ms']:.1f} ms for the requests sent after its first second (the storm of "
         "1,024 connections opened at once)", over["admitted_p99_ms"] <= 250),
        ("every other request a 503 within 10 ms",
         f"{over['shed']} shed, {100 * over['shed_within_10ms']:.1f}% within 10 ms (p99 {over['shed_p99_ms']:.1f} ms, "
         f"max {over['shed_max_ms']:.1f} ms; after the first second {100 * over['settled_shed_within_10ms']:.1f}% "
         f"within 10 ms, p99 {over['settled_shed_p99_ms']:.1f} ms); other statuses {over['other_statuses'] or 'none'}, "
         f"{over['transport_errors']} transport errors",
         not over["other_statuses"] and over["transport_errors"] == 0 and over["shed_within_10ms"] >= 0.99),
        ("memory flat", f"transformer RSS {over['rss_before_mb']:.0f} -> {over['rss_after_mb']:.0f} MB",
         over["rss_after_mb"] <= 1.1 * over["rss_before_mb"]),
        ("clients that ignore Retry-After at 1,024 connections: only 200/503/504, goodput >= 80% of the peak, p99 of "
         "all answers <= 1 s, memory flat",
         f"{hammer['goodput']:.0f} ok/s = {100 * hammer['goodput'] / peak['goodput']:.0f}% of the peak; p99 of all "
         f"answers {hammer['all_p99_ms']:.0f} ms (admitted {hammer['admitted_p99_ms']:.0f}, 503 "
         f"{hammer['shed_p99_ms']:.0f}); {hammer['shed']} refused, at about {refusal_us:.0f} us of CPU each; other "
         f"statuses {hammer['other_statuses'] or 'none'}, {hammer['transport_errors']} transport errors; RSS "
         f"{hammer['rss_before_mb']:.0f} -> {hammer['rss_after_mb']:.0f} MB",
         hammer["goodput"] >= 0.8 * peak["goodput"] and hammer["all_p99_ms"] <= 1000
         and set(hammer["other_statuses"]) <= {"504"} and hammer["transport_errors"] == 0
         and hammer["rss_after_mb"] <= 1.1 * hammer["rss_before_mb"]),
        ("full service again as soon as load drops", f"after: {after['goodput']:.0f} ok/s, {after['shed']} shed, "
         f"p99 {after['admitted_p99_ms']:.1f} ms", after["shed"] == 0 and after["goodput"] >= 0.9 * peak["goodput"]),
    ]
    report = {"machine": machine(), "phases": phases,
              "goals": [{"goal": g, "measured": m, "met": None if ok is None else bool(ok)} for g, m, ok in goals]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Overload: shedding instead of queueing", "",
             "`python -m scripts.benchmark --overload`: the transformer (default admission: a request limit between 32 "
             "and 256 that keeps the p90 time of admitted requests inside the process within 50 ms, 8,192 rows; "
             "refused clients told to come back after 1 to 9 s, longer the more of them there are; a connection that "
             "re-sends before the time it was told waits 500 ms before it is admitted or refused again) "
             "and the TF Serving stand-in on loopback, 1-row requests from a lean keep-alive client in the "
             "benchmark's process (`scripts/loadgen.py: run_recorded`), every request's status and latency "
             "recorded. The client shares the machine's 2 cores with both servers: its CPU share is in the table.",
             "", "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for g, m, ok in goals]
    lines += ["", "| phase | connections | Retry-After honoured | seconds | requests | 200/s | admitted p50 / p99 ms "
              "(p99 after the first second) | "
              "503 | 503 p99 / max ms | Retry-After told, mean / max s | other | client CPU | request limit at the end |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, ph in phases.items():
        lines.append(f"| {name} | {ph['connections']} | {'yes' if ph['honours_retry_after'] else 'no'} | "
                     f"{ph['seconds']:.1f} | {ph['requests']} | {ph['goodput']:.0f} | "
                     f"{ph['admitted_p50_ms']:.1f} / {ph['admitted_p99_ms']:.1f} ({ph['settled_admitted_p99_ms']:.1f}) | "
                     f"{ph['shed']} | "
                     f"{ph['shed_p99_ms']:.1f} / {ph['shed_max_ms']:.1f} | "
                     f"{ph['retry_after_mean_s']:.1f} / {ph['retry_after_max_s']:.0f} | "
                     f"{ph['other_statuses'] or '-'} {ph['transport_errors'] or ''} | {100 * ph['client_cpu_share']:.0f}% | "
                     f"{ph.get('admission_limit_after', '-')} |")
    lines += ["", f"Machine: {report['machine']}", ""]
    (out / "overload.md").write_text("\n".join(lines))
    return report

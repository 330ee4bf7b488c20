"""The transformer past its capacity: 16, then 1,024 connections (clients that honour Retry-After, then clients
that re-send at once), then 16 again; every request's status and latency recorded."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from scripts.benchmark.common import MODEL, machine
from scripts.benchmark.paths import Anchor, request_bodies
from scripts.loadgen import have_wrk, run_recorded, run_wrk
from scripts.localstack import LocalStack

# (name, connections, seconds, clients honour Retry-After): the peak; about four times what one process
# serves, with clients that back off as told and with clients that re-send at once; the load dropping again.
OVERLOAD_PHASES = (("peak", 16, 10.0, True), ("overload", 1024, 15.0, True),
                   ("overload, Retry-After ignored", 1024, 10.0, False), ("after", 16, 5.0, True))
# The retry storm again with wrk, a client in C that re-sends the moment it is answered, 503s included (as wrk
# and many load balancers' retries do): its own peak at 16 connections, then three storms of 1,024 connections back
# to back, STORM_GAP_SECONDS apart, after the phases above: what one storm leaves behind must not slow the next.
# The Python client above shares the two cores with the servers (its CPU is in the table); wrk costs less.
WRK_PEAK = ("peak, wrk", 16, 8.0)
STORMS, STORM_CONNECTIONS, STORM_SECONDS_EACH, STORM_GAP_SECONDS = 3, 1024, 10.0, 3.0
# The same storm against the Python HTTP floor (scripts/anchors/floor.py) on each event loop: what the server stack
# alone does to the slowest answers at 1,024 connections, with nothing of the transformer's in the way.
FLOOR_LOOPS = ("uvloop", "asyncio")


def storm_name(number: int) -> str:
    return f"storm {number}, wrk (Retry-After ignored)"


def admission_state(metrics_url: str) -> dict[str, int | None]:
    """The transformer's admission as its metrics show it: the request limit in force, the requests and rows inside."""
    text = httpx.get(metrics_url, timeout=10).text
    state = {}
    for key, metric in (("limit", "embedder_admission_limit"), ("inflight_requests", "embedder_inflight_requests"),
                        ("inflight_rows", "embedder_inflight_rows")):
        found = re.search(rf"^{metric}\{{[^}}]*\}} (\S+)$", text, re.M)
        state[key] = int(float(found.group(1))) if found else None
    return state


def left_behind(metrics_url: str, transformer) -> dict:
    """What a storm left in the transformer once it is over: its admission's state, its open TCP connections (the
    listening sockets and the predictor's pool included), threads and memory."""
    return {**admission_state(metrics_url), "connections": len(transformer.connections(kind="tcp")),
            "threads": transformer.num_threads(), "rss_mb": transformer.memory_info().rss / 2**20}


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
    limit = admission_state(metrics_url)["limit"]
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


def wrk_phase(url: str, body: bytes, connections: int, seconds: float, transformer) -> dict:
    """One phase of wrk load: answers by status, goodput, the p99 of all answers, memory and CPU (of ``transformer``,
    the server's psutil process)."""
    rss_before = transformer.memory_info().rss
    cpu_before = sum(transformer.cpu_times()[:2])
    run = run_wrk(url, body, connections, seconds, statuses=True)
    statuses = run.extra["statuses"]
    return {"connections": connections, "honours_retry_after": False, "seconds": run.seconds,
            "requests": run.requests, "ok": statuses["200"], "shed": statuses["503"],
            "other_statuses": {k: v for k, v in (("504", statuses["504"]), ("other", statuses["other"])) if v},
            "transport_errors": run.socket_errors, "goodput": statuses["200"] / run.seconds,
            "all_p50_ms": run.p(50), "all_p99_ms": run.p(99), "all_p999_ms": run.p(99.9),
            "client_cpu_share": run.client_cpu_share,
            "transformer_cpu_s": sum(transformer.cpu_times()[:2]) - cpu_before,
            "rss_before_mb": rss_before / 2**20, "rss_after_mb": transformer.memory_info().rss / 2**20}


def wrk_storms(url: str, body: bytes, transformer, scale: float, label: str = "") -> dict[str, dict]:
    """wrk's peak at 16 connections, then STORMS storms back to back, each followed by STORM_GAP_SECONDS of quiet
    and what it left behind (``left_behind``): the phases by name (``label`` after each)."""
    metrics_url = url.split("/v1/")[0] + "/metrics"
    phases = {}
    for name, connections, seconds in [WRK_PEAK, *((storm_name(i), STORM_CONNECTIONS, STORM_SECONDS_EACH)
                                                    for i in range(1, STORMS + 1))]:
        phase = phases[name + label] = wrk_phase(url, body, connections, seconds * scale, transformer)
        time.sleep(STORM_GAP_SECONDS * scale)  # the quiet after it (the next storm starts at its end)
        phase["left_behind"] = left_behind(metrics_url, transformer)
        print(f"   {name + label:>48}: {connections:>5} connections, {phase['goodput']:7.0f} ok/s, p99 of all "
              f"answers {phase['all_p99_ms']:.1f} ms, {phase['shed']} shed; left: {phase['left_behind']}", flush=True)
    return phases


def floor_storms(scale: float, logs: Path) -> dict[str, dict]:
    """The storm against the Python HTTP floor on each event loop (FLOOR_LOOPS), by loop."""
    floors = {}
    for loop in FLOOR_LOOPS:
        floor = Anchor("scripts.anchors.floor", ["--port", "{port}", "--loop", loop], "/", logs / f"floor-{loop}.log")
        try:
            server = psutil.Process(floor.process.pid)
            floors[loop] = wrk_phase(floor.url + "/", b'{"instances": [[0]]}', STORM_CONNECTIONS,
                                     STORM_SECONDS_EACH * scale, server)
        finally:
            floor.stop()
        print(f"   {'the floor on ' + loop:>48}: {STORM_CONNECTIONS:>5} connections, "
              f"{floors[loop]['goodput']:7.0f} ok/s, p50 / p99 of all answers {floors[loop]['all_p50_ms']:.1f} / "
              f"{floors[loop]['all_p99_ms']:.1f} ms", flush=True)
    return floors


# The transformer's event loop in the storms compared beside the default's (asyncio's own): KServe's --event-loop.
OTHER_LOOP = "uvloop"


def overload(build: Path, out: Path, scale: float = 1.0, transformer_args: list[str] | None = None) -> dict:
    """The transformer at 16, then 1,024, then 16 connections (1-row requests, default admission); then wrk's storms
    on the default event loop (asyncio's own) and on uvloop, and the floor's on both."""
    transformer_bodies = request_bodies(build, [1])["v1"]
    body = transformer_bodies[1]
    logs = Path(tempfile.mkdtemp(prefix="overload-logs-"))
    phases, wrk_phases, floors = {}, {}, {}
    # The default loop (None) for every phase; the other loop for wrk's storms only, so only when wrk is there.
    for loop in (None, OTHER_LOOP) if have_wrk() else (None,):
        stack = LocalStack(build=build, predictor="local", log_dir=logs / (loop or "default"),
                           transformer_args=[*(transformer_args or []), *(["--event-loop", loop] if loop else [])])
        stack.start()
        try:
            transformer = psutil.Process(stack.processes["transformer"].pid)
            url = f"{stack.transformer_url}/v1/models/{MODEL}:predict"
            run_recorded(url, body, 16, 2.0 * scale)  # warm-up
            for name, connections, seconds, honour in OVERLOAD_PHASES if loop is None else ():
                phases[name] = overload_phase(url, body, connections, seconds * scale, honour, transformer)
                print(f"   {name:>30}: {connections:>5} connections, {phases[name]['goodput']:7.0f} ok/s, "
                      f"admitted p99 {phases[name]['admitted_p99_ms']:.1f} ms, {phases[name]['shed']} shed "
                      f"(p99 {phases[name]['shed_p99_ms']:.1f} ms)", flush=True)
            if have_wrk():  # then the storms with wrk
                wrk_phases.update(wrk_storms(url, body, transformer, scale, f", --event-loop {loop}" if loop else ""))
        finally:
            stack.stop()
    if have_wrk():
        floors = floor_storms(scale, logs)
    peak, over, after = phases["peak"], phases["overload"], phases["after"]
    hammer = phases["overload, Retry-After ignored"]
    # The storm, by each kind of client against its own peak (the clients differ in what they cost the machine).
    def storm_report(client: str, base: dict, storm: dict) -> tuple[str, bool]:
        per_answer = base["transformer_cpu_s"] / max(base["ok"], 1)
        refusal_us = 1e6 * max(storm["transformer_cpu_s"] - storm["ok"] * per_answer, 0.0) / max(storm["shed"], 1)
        measured = (f"{client}: {storm['goodput']:.0f} vs {base['goodput']:.0f} ok/s = "
                    f"{100 * storm['goodput'] / base['goodput']:.0f}% of its peak, p99 of all answers "
                    f"{storm['all_p99_ms']:.0f} ms, {storm['shed']} refused at about {refusal_us:.0f} us of CPU "
                    f"each, other statuses {storm['other_statuses'] or 'none'}, {storm['transport_errors']} "
                    f"transport errors, RSS {storm['rss_before_mb']:.0f} -> {storm['rss_after_mb']:.0f} MB")
        met = (storm["goodput"] >= 0.8 * base["goodput"] and storm["all_p99_ms"] <= 1000
               and set(storm["other_statuses"]) <= {"504"} and storm["transport_errors"] == 0
               and storm["rss_after_mb"] <= 1.1 * storm["rss_before_mb"])
        return measured, met

    storm_lines, storms_met = [], []  # the goal is judged on the default loop's storms; uvloop's are shown beside
    for label in ("", f", --event-loop {OTHER_LOOP}"):
        base = wrk_phases.get(WRK_PEAK[0] + label)
        for number in range(1, STORMS + 1) if base else ():
            measured, met = storm_report(f"wrk storm {number}{label}", base, wrk_phases[storm_name(number) + label])
            storm_lines.append(measured)
            if not label:
                storms_met.append(met)
    python_measured, _ = storm_report("the Python client", peak, hammer)
    storm_lines.append(python_measured + f", client CPU {100 * hammer['client_cpu_share']:.0f}% of a core")
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
        (f"clients that ignore Retry-After at 1,024 connections, in {STORMS} storms of {STORMS} back to back "
         f"({STORM_GAP_SECONDS:g} s apart): only 200/503/504, goodput >= 80% of the peak, p99 of all answers <= 1 s, "
         "memory flat (judged with wrk, the storm's usual client, on the default event loop, asyncio's own; beside "
         f"it the same storms with the transformer on {OTHER_LOOP}, and the Python client, whose own CPU on the same "
         "two cores is part of what it measures)",
         "; ".join(storm_lines), (sum(storms_met) == STORMS) if storms_met else None),
        ("full service again as soon as load drops", f"after: {after['goodput']:.0f} ok/s, {after['shed']} shed, "
         f"p99 {after['admitted_p99_ms']:.1f} ms", after["shed"] == 0 and after["goodput"] >= 0.9 * peak["goodput"]),
    ]
    report = {"machine": machine(), "phases": phases, "wrk_phases": wrk_phases, "floor_storms": floors,
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
    if wrk_phases:
        lines += ["", f"Then with wrk, every answer counted by status; wrk re-sends the moment it is answered, 503s "
                  f"included. Its peak, then {STORMS} storms back to back with {STORM_GAP_SECONDS:g} s of quiet after "
                  "each; what each left behind is read at the end of that quiet (the request limit, the requests "
                  "inside, the transformer's TCP connections: its listening sockets and the predictor's pool "
                  f"included). Then the same on {OTHER_LOOP} (`--event-loop {OTHER_LOOP}`):", "",
                  "| phase | connections | seconds | requests | 200/s | 503 | other | p50 / p99 / p99.9 ms of all "
                  "answers | transformer CPU us per answer | client CPU | RSS MB before / after | left behind: "
                  "limit, inside, connections |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, ph in wrk_phases.items():
            left = ph.get("left_behind", {})
            lines.append(f"| {name} | {ph['connections']} | {ph['seconds']:.1f} | {ph['requests']} | {ph['goodput']:.0f} | "
                         f"{ph['shed']} | {ph['other_statuses'] or '-'} {ph['transport_errors'] or ''} | "
                         f"{ph['all_p50_ms']:.1f} / {ph['all_p99_ms']:.1f} / {ph['all_p999_ms']:.0f} | "
                         f"{1e6 * ph['transformer_cpu_s'] / max(ph['requests'], 1):.0f} | "
                         f"{100 * ph['client_cpu_share']:.0f}% | {ph['rss_before_mb']:.0f} / {ph['rss_after_mb']:.0f} | "
                         f"{left.get('limit')}, {left.get('inflight_requests')}, {left.get('connections')} |")
    if floors:
        lines += ["", f"The same storm ({STORM_CONNECTIONS} connections, wrk) against the Python HTTP floor, a bare "
                  "ASGI app on the transformer's server stack (`scripts/anchors/floor.py`), on each event loop: what "
                  "the stack alone does to the slowest answers, with no admission, pacing or model in the way:", "",
                  "| floor's event loop | seconds | answers/s | p50 / p99 / p99.9 ms of all answers | server CPU us "
                  "per answer | client CPU |", "| --- | --- | --- | --- | --- | --- |"]
        for loop, ph in floors.items():
            lines.append(f"| {loop} | {ph['seconds']:.1f} | {ph['requests'] / ph['seconds']:.0f} | "
                         f"{ph['all_p50_ms']:.1f} / {ph['all_p99_ms']:.1f} / {ph['all_p999_ms']:.0f} | "
                         f"{1e6 * ph['transformer_cpu_s'] / max(ph['requests'], 1):.0f} | "
                         f"{100 * ph['client_cpu_share']:.0f}% |")
    lines += ["", f"Machine: {report['machine']}", ""]
    (out / "overload.md").write_text("\n".join(lines))
    return report

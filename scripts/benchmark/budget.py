"""Where one request's CPU goes in the transformer, stage by stage: the CPU budget.

Two measurements over the same window of load. The kernel's CPU time of each of the process's threads
(``psutil``): how much CPU the event loop's thread, gRPC's polling thread and any worker thread spent. And
py-spy's samples of every thread (``py-spy record --threads --format raw``; the idle waiting of each thread left
out, as py-spy skips idle threads): where within each thread. Each sample goes to one stage: the innermost frame
of its stack that a stage claims (:data:`RULES`), so a kernel under ``Pipeline.rank`` is ranking and uvicorn's
``send`` under our endpoint is the HTTP server. A thread's CPU is split over the stages by its own samples; the
budget is the sum over threads, per request. gRPC's polling thread (a bare ``Thread.run``: its work is in C) is the
predictor hop's; a thread that spent CPU but was never caught running goes to the rest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from scripts.benchmark.paths import Target, cpu_seconds
from scripts.loadgen import run_load

# (stage, what it covers): in the order of the report's table, the path of one request.
STAGES = [
    ("http", "the HTTP server (uvicorn, httptools, Starlette's response)"),
    ("parse", "body read and parse (the codec's rows)"),
    ("edge", "the edge and admission (our ASGI route, deadline, shedding, request id)"),
    ("kserve", "KServe's DataPlane and Model.__call__ (and our glue in transformer/model.py)"),
    ("scale", "scaling (Pipeline.scale)"),
    ("hop", "the predictor hop, client side (our client, coalescing, grpc.aio or aiohttp, gRPC's thread)"),
    ("rank", "ranking (Pipeline.rank: segment, threshold, top-k)"),
    ("encode", "encoding the answer"),
    ("metrics", "metrics and drift (our series, prometheus_client)"),
    ("rest", "the rest (the event loop's own work, logging, garbage collection)"),
]
# (function, file under transformer/) of the codecs' work; py-spy names a method with or without its class.
PARSE = {("read_body", "serving/rest.py"), ("_chunks", "serving/rest.py"), ("decode_v1", "serving/rest.py"),
         ("decode_v2", "serving/rest.py"), ("decode_json", "protocols/v1.py"), ("decode_body", "protocols/v1.py"),
         ("parse_instances", "protocols/v1.py"), ("_plain_rows", "protocols/v1.py"),
         ("_checked_rows", "protocols/v1.py"), ("rows", "protocols/v1.py"), ("rows", "protocols/v2.py"),
         ("from_rest", "protocols/v2.py"), ("from_infer_request", "protocols/v2.py"), ("parse_v2", "protocols/v2.py"),
         ("codec_for", "model.py")}
ENCODE = {("encode_predictions", "protocols/v1.py"), ("answer", "protocols/v1.py"), ("answer", "protocols/v2.py"),
          ("encode_rest", "protocols/v2.py"), ("to_infer_response", "protocols/v2.py"),
          ("output_tensors", "protocols/v2.py"), ("json_response", "serving/rest.py")}


def _functions(places: set[tuple[str, str]]) -> re.Pattern:
    """Frames of these (function, file under transformer/) pairs: a bare name alone would also claim another
    file's function of that name (every ``__call__``)."""
    return re.compile("|".join(rf"^(?:\w+\.)?{re.escape(name)} \(transformer/{re.escape(file)}:"
                               for name, file in sorted(places)))


# Each frame, innermost first, is tried against these in order; the first that matches names the stage.
RULES: list[tuple[str, re.Pattern]] = [
    ("metrics", re.compile(r"transformer/serving/(metrics|drift)\.py|prometheus_client/")),
    ("scale", _functions({("scale", "pipeline.py")})),
    ("rank", _functions({("rank", "pipeline.py")})),
    ("encode", _functions(ENCODE)),
    ("parse", _functions(PARSE)),
    ("hop", re.compile(r"transformer/predictor/|transformer/serving/coalesce\.py|\(grpc/|\(aiohttp/|"
                       r"^(?:\w+\.)?(?:predict|serve_version|call|forward) \(transformer/model\.py")),
    ("edge", re.compile(r"transformer/serving/(edge|admission|rest)\.py")),
    ("kserve", re.compile(r"\(kserve/|\(transformer/model\.py")),
    ("http", re.compile(r"\((uvicorn|httptools|starlette|fastapi|h11)/")),
]
GRPC_THREAD = re.compile(r"^(?:Thread\.)?_bootstrap \(threading\.py:\d+\);(?:Thread\.)?_bootstrap_inner "
                         r"\(threading\.py:\d+\);(?:Thread\.)?run \(threading\.py:\d+\)$")
_LINE = re.compile(r"^(.*) (\d+)$")
_THREAD = re.compile(r"^thread \((\d+)\)[^;]*;?")


# The event loop's own frames: what a request's code is called from. Frames outside them (the command that
# started the server: KServe's ModelServer.start) are not the request's; time spent in them is the loop's.
LOOP = re.compile(r"^(?:\w+\.)?(?:run|run_until_complete|run_forever|_run_once) \(asyncio/")


def stage_of(stack: str) -> str:
    """The stage of one collapsed stack (frames outermost first, ``;``-separated)."""
    if GRPC_THREAD.match(stack):
        return "hop"
    frames = stack.split(";")
    loop = max((i for i, frame in enumerate(frames) if LOOP.match(frame)), default=-1)
    for frame in reversed(frames[loop + 1:]):
        for stage, pattern in RULES:
            if pattern.search(frame):
                return stage
    return "rest"


def thread_samples(folded: str) -> dict[int, Counter]:
    """{thread id: samples per stage} of py-spy's raw output (``stack count`` per line, the stack led by
    ``thread (<id>): <name>`` with ``--threads``; 0 for lines without)."""
    threads: dict[int, Counter] = {}
    for line in folded.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        stack, count = match.group(1), int(match.group(2))
        thread = _THREAD.match(stack)
        tid = int(thread.group(1)) if thread else 0
        stack = stack[thread.end():] if thread else stack
        threads.setdefault(tid, Counter())[stage_of(stack)] += count
    return threads


def read_samples(path: Path) -> str:
    """py-spy's raw output as text. Sampling without pausing the process (``--nonblocking``) can read a frame's name
    while the interpreter rewrites it: such a byte that is not UTF-8 becomes U+FFFD in that one frame, instead of
    ending the whole run (it did, 17 minutes into one)."""
    return path.read_text(encoding="utf-8", errors="replace")


def stage_samples(folded: str) -> Counter:
    """Samples per stage of py-spy's raw output, over every thread."""
    return sum(thread_samples(folded).values(), Counter())


def split_cpu(cpu: dict[int, float], samples: dict[int, Counter]) -> Counter:
    """CPU seconds per stage: each thread's CPU split by its own samples (all of it to the rest when none)."""
    stages: Counter = Counter()
    for tid, seconds in cpu.items():
        own = samples.get(tid)
        total = sum(own.values()) if own else 0
        if not total:
            stages["rest"] += seconds
            continue
        for stage, count in own.items():
            stages[stage] += seconds * count / total
    return stages


def thread_cpu(process) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a psutil process."""
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def _py_spy() -> str | None:
    """py-spy beside this Python (the venv's, from .[dev]) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def have_py_spy() -> bool:
    return _py_spy() is not None


def measure_budget(target: Target, batch: int, concurrency: int, seconds: float, warmup: float,
                   rate: int = 250, keep: Path | None = None) -> dict:
    """The transformer's CPU per request by stage at ``batch`` rows and ``concurrency`` clients: {"cpu_us",
    "requests", "samples", "threads", "stages": {stage: {"samples", "share", "us"}}}; a stage's share is of the
    CPU. ``keep``: also write py-spy's raw samples there (for a flame graph)."""
    process = target.processes["transformer"]
    body = target.bodies[batch]
    run_load(target.url, body, concurrency, warmup)
    with tempfile.TemporaryDirectory(prefix="budget-") as folder:
        raw = Path(folder) / "samples.txt"
        spy = subprocess.Popen([_py_spy(), "record", "--pid", str(process.pid), "--rate", str(rate), "--format",
                                "raw", "--threads", "--nonblocking", "--duration", str(max(1, round(seconds))), "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = thread_cpu(process)
        result = run_load(target.url, body, concurrency, seconds)
        after = thread_cpu(process)
        _, error = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy could not sample the transformer (pid {process.pid}): {error.strip()[-400:]}")
        folded = read_samples(raw)
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_text(folded)
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    samples = thread_samples(folded)
    stages = split_cpu(spent, samples)
    requests = max(result.requests, 1)
    total = sum(spent.values())
    counts = sum(samples.values(), Counter())
    return {"batch": batch, "concurrency": concurrency, "cpu_us": 1e6 * total / requests,
            "requests": result.requests, "samples": sum(counts.values()), "rate": rate,
            "threads": {("loop" if tid == process.pid else str(tid)): 1e6 * cpu / requests
                        for tid, cpu in spent.items() if cpu > 0},
            "stages": {stage: {"samples": counts[stage], "share": stages[stage] / max(total, 1e-12),
                               "us": 1e6 * stages[stage] / requests} for stage, _ in STAGES}}


def budget_table(budgets: list[dict], floor_us: dict[int, float],
                 unsampled_us: dict[tuple[str, int], float] | None = None) -> list[str]:
    """The report's table: a row per stage, a column per budget (its path and clients: CPU per request and
    share), then the totals, each path's CPU per request in its cell without the sampler (``unsampled_us`` by
    (path, clients): what py-spy costs it) and the floor's total at the same clients (``floor_us``)."""
    unsampled_us = unsampled_us or {}

    def clients(n: int) -> str:
        return f"{n} client{'s' if n > 1 else ''}"

    head = " | ".join(f"({b.get('target', 'b')}) {clients(b['concurrency'])}: us (share)" for b in budgets)
    lines = [f"| stage | {head} |", "| --- |" + " ---: |" * len(budgets)]
    for stage, description in STAGES:
        cells = " | ".join(f"{b['stages'][stage]['us']:,.0f} ({100 * b['stages'][stage]['share']:.0f}%)"
                           for b in budgets)
        lines.append(f"| {description} | {cells} |")
    lines.append("| **the transformer's CPU per request** | " +
                 " | ".join(f"**{b['cpu_us']:,.0f}**" for b in budgets) + " |")
    lines.append("| the same, in its cell without py-spy | " + " | ".join(
        f"{unsampled_us[(b.get('target', 'b'), b['concurrency'])]:,.0f}"
        if unsampled_us.get((b.get("target", "b"), b["concurrency"])) else "-" for b in budgets) + " |")
    lines.append("| the Python HTTP floor's, at the same clients | " + " | ".join(
        f"{floor_us[b['concurrency']]:,.0f} (x{b['cpu_us'] / floor_us[b['concurrency']]:.1f})"
        if floor_us.get(b["concurrency"]) else "-" for b in budgets) + " |")
    lines.append("| samples (requests) | " + " | ".join(f"{b['samples']:,} ({b['requests']:,})" for b in budgets)
                 + " |")
    return lines


def restaged(budget: dict, folded: str) -> dict:
    """The budget with its CPU split over the stages again, by today's rules, from the raw samples its run kept
    (``measure_budget``'s ``keep``): the same measured CPU of each thread, attributed anew."""
    main = re.search(r"^thread \((\d+)\): MainThread", folded, re.MULTILINE)
    cpu = {(int(main.group(1)) if name == "loop" and main else int(name) if name.isdigit() else -1): us
           for name, us in budget["threads"].items()}
    samples = thread_samples(folded)
    stages = split_cpu(cpu, samples)
    counts = sum(samples.values(), Counter())
    total = sum(cpu.values())
    return {**budget, "stages": {stage: {"samples": counts[stage], "share": stages[stage] / max(total, 1e-12),
                                         "us": stages[stage]} for stage, _ in STAGES}}

"""Every serving path side by side, in one run, on this machine, with the same requests.

    python -m scripts.benchmark             # full run (about 12 minutes), writes benchmarks/
    python -m scripts.benchmark --smoke     # a few seconds per path, writes to a temporary folder

Paths (all on loopback, each measured alone while the others sit idle):

    (a) predictor alone       pre-scaled features straight to TF Serving's REST API
    (h) predictor alone, gRPC the same request to TF Serving's gRPC API (tensor_content bytes)
    (b) transformer           our transformer (v1 REST in, numpy kernels) -> predictor over gRPC (the default)
    (g) transformer, REST hop the same with --predictor_api rest: JSON toward TF Serving
    (c) transformer, sklearn  the same transformer calling scikit-learn per request (the naive baseline)
    (d) fused alone           the fused SavedModel: raw features in, segment and items out
    (e) transformer v2 REST   the Open Inference Protocol's JSON at the transformer
    (f) transformer v2 gRPC   the Open Inference Protocol over gRPC, the rows as raw bytes
    (i) Python HTTP floor     a raw ASGI app on the same server stack answering a fixed body of our
                              answer's size (scripts/anchors/floor.py): no Python server costs less
    (j) plain KServe transformer  what a user would write from KServe's documentation: kserve.Model with
                              scikit-learn in preprocess/postprocess and KServe's own REST predictor
                              client (scripts/anchors/plain_transformer.py)

at batch sizes 1, 32, 256 and concurrency 1 and 16: p50/p90/p99 latency, throughput, the load
generator's own CPU, the servers' CPU per request, and (b, c) the pre+post time KServe measures
inside the transformer. Then a soak: many requests at concurrency 32 through (b), checking that
none is lost and that memory stays bounded. Writes results.md, results.json and latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

from scripts.loadgen import LoadResult, have_wrk, run_load, run_recorded
from scripts.localstack import ROOT, LocalStack, StackError
from transformer.store.bundle import bundle_dir, model_versions

MODEL = "embedder"
FUSED = "embedder-fused"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    url: str
    bodies: dict[int, bytes]  # batch size -> request body
    processes: dict  # name -> psutil.Process of each server on its path
    metrics_url: str | None = None  # transformer /metrics, for KServe's stage histograms


class Anchor:
    """A server of the benchmark's own (scripts/anchors/), started as a process on a free loopback port."""

    def __init__(self, module: str, args: list[str], ready_path: str, log: Path):
        from scripts.localstack import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", module, *[a.replace("{port}", str(self.port)) for a in args]]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"{module} exited with {self.process.returncode}: {log.read_text()[-800:]}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise StackError(f"{module} did not answer on {self.url}{ready_path} within 60 s: {log.read_text()[-800:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def newest_version_dir(build: Path) -> Path:
    """The newest model version folder (SavedModel + bundle), the one the transformer serves."""
    return build / "models" / MODEL / str(model_versions(build / "models" / MODEL)[-1])


def request_bodies(build: Path, batches: list[int]) -> dict[str, dict[int, bytes]]:
    """{kind: {batch size: body}}: the transformer's (raw rows; "v1" JSON, "v2_rest" JSON, "v2_grpc" with the
    rows as raw bytes), the "predictor"'s (scaled rows, REST JSON; "predictor_grpc": the PredictRequest
    the transformer itself sends) and the "fused" model's (raw rows)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    import joblib

    from model.synthetic import make_synthetic
    from transformer.store.bundle import load_bundle
    from transformer.pipeline import Pipeline
    from transformer.predictor.grpc import tensor_proto
    from transformer.predictor.protos import tfserving_pb2

    bundle = bundle_dir(newest_version_dir(build))
    manifest = json.loads((bundle / "manifest.json").read_text())
    scaler = joblib.load(bundle / "scaler.joblib")
    n_items = manifest["model"]["n_items"]
    raw = make_synthetic(n_users=max(batches), n_items=n_items, seed=2024).features
    scaled = scaler.transform(raw).astype(np.float32)
    # The predictor alone answers the same signature the transformer asks for (its best candidates
    # when the model has them), so (a) and (b) differ by the transformer hop only.
    signature = manifest["model"].get("candidates_signature") or manifest["model"]["signature_name"]
    contract = Pipeline(load_bundle(newest_version_dir(build))).contract
    assert contract.signature == signature
    transformer, predictor, fused, v2_rest, v2_grpc, predictor_grpc = {}, {}, {}, {}, {}, {}
    for b in batches:
        transformer[b] = json.dumps({"instances": raw[:b].tolist()}).encode()
        v2_rest[b] = json.dumps({"inputs": [{"name": "features", "datatype": "FP64", "shape": [b, raw.shape[1]],
                                             "data": raw[:b].ravel().tolist()}]}).encode()
        request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[raw[:b].astype("<f8").tobytes()])
        request.inputs.add(name="features", datatype="FP64", shape=[b, raw.shape[1]])
        v2_grpc[b] = request.SerializeToString()
        predictor[b] = json.dumps({"signature_name": signature,
                                   "inputs": [[float(v) for v in row] for row in scaled[:b]]}).encode()
        predict = tfserving_pb2.PredictRequest(output_filter=list(contract.outputs))
        predict.model_spec.name, predict.model_spec.signature_name = MODEL, signature
        predict.inputs[contract.input_name].CopyFrom(tensor_proto(scaled[:b]))
        predictor_grpc[b] = predict.SerializeToString()
        fused[b] = json.dumps({"inputs": raw[:b].astype(np.float32).astype(np.float64).tolist()}).encode()
    return {"v1": transformer, "predictor": predictor, "fused": fused, "v2_rest": v2_rest, "v2_grpc": v2_grpc,
            "predictor_grpc": predictor_grpc}


_STAGE = re.compile(r'^request_(pre|post)process_seconds_(sum|count)\{model_name="' + MODEL + r'"\} (\S+)$', re.M)


def stage_totals(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    return {f"{stage}_{kind}": float(value) for stage, kind, value in _STAGE.findall(text)}


def cpu_seconds(processes: dict) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}


def measure(target: Target, batch: int, concurrency: int, seconds: float, warmup: float) -> LoadResult:
    body = target.bodies[batch]
    run_load(target.url, body, concurrency, warmup)
    stages_before = stage_totals(target.metrics_url) if target.metrics_url else {}
    cpu_before = cpu_seconds(target.processes)
    result = run_load(target.url, body, concurrency, seconds)
    cpu_after = cpu_seconds(target.processes)
    spent = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
    result.extra["server_cpu_ms_per_request"] = 1000.0 * sum(spent.values()) / max(result.requests, 1)
    result.extra["cpu_share"] = {name: cpu / result.seconds for name, cpu in spent.items()}
    if target.metrics_url:
        after = stage_totals(target.metrics_url)
        count = after["pre_count"] - stages_before["pre_count"]
        spent = (after["pre_sum"] - stages_before["pre_sum"]) + (after["post_sum"] - stages_before["post_sum"])
        result.extra["pre_post_us"] = 1e6 * spent / max(count, 1)
    return result


def kernel_microbenchmark(build: Path, repeats: int) -> dict[str, float]:
    """Median pre+post compute in this process (parse and validate, scale, segment, rank, encode): ``numpy``
    and ``sklearn`` for one row given by name; ``numpy_<rows>_<form>`` for 1 and 256 rows, by name and as lists."""
    from model.synthetic import make_synthetic
    from transformer.store.bundle import load_bundle
    from transformer.protocols.v1 import encode_predictions, parse_instances
    from transformer.serving.metrics import VersionMetrics
    from transformer.pipeline import Pipeline

    results = {}
    raw = make_synthetic(n_users=256, n_items=10, seed=5).features
    for kernels in ("numpy", "sklearn"):
        pipeline = Pipeline(load_bundle(newest_version_dir(build), estimators=kernels == "sklearn"),
                            kernels=kernels)
        metrics = VersionMetrics(MODEL, pipeline.version, pipeline.feature_names, pipeline.bundle.feature_min,
                                 pipeline.bundle.feature_max, pipeline.bundle.n_segments)
        spec = pipeline.spec
        rng = np.random.default_rng(0)
        cases = [(1, "names")] if kernels == "sklearn" else [(1, "names"), (1, "lists"), (256, "names"),
                                                             (256, "lists")]
        for rows, form in cases:
            instances = raw[:rows].tolist()
            if form == "names":
                instances = [dict(zip(pipeline.feature_names, row)) for row in instances]
            doc = {"instances": instances}
            result = {name: (rng.integers(0, spec.n_items, (rows, width)) if dtype == "DT_INT64"
                             else rng.random((rows, width), dtype=np.float32))
                      for name, (dtype, width) in pipeline.contract.outputs.items()}
            timings = []
            for _ in range(repeats if rows == 1 else max(20, repeats // 20)):
                t0 = time.perf_counter_ns()
                X = parse_instances(doc, pipeline.feature_names, 1024)
                metrics.observe_rows(X)
                pipeline.scale(X)
                ranked = pipeline.rank(result)
                metrics.observe_segments(ranked.labels)
                encode_predictions(ranked.labels, ranked.distances, ranked.item_ids, ranked.item_scores, ranked.keep)
                timings.append(time.perf_counter_ns() - t0)
            key = kernels if (rows, form) == (1, "names") else f"{kernels}_{rows}_{form}"
            results[key] = float(np.median(timings) / 1000.0)
    return results


def graph_microbenchmark(build: Path, repeats: int) -> dict[str, float]:
    """Median time of one graph run for one row, in-process: the embedding model's signature the
    transformer uses, and the fused model (what each predictor spends inside TensorFlow)."""
    import tensorflow as tf

    manifest = json.loads((bundle_dir(newest_version_dir(build)) / "manifest.json").read_text())
    spec = manifest["model"]
    embedder = tf.saved_model.load(str(build / "models" / MODEL / str(spec["version"])))
    fused = tf.saved_model.load(str(build / "models" / FUSED / str(spec["version"])))
    x = tf.constant(np.zeros((1, spec["n_features"]), dtype=np.float32))
    calls = {
        "embedder": lambda: embedder.signatures[spec.get("candidates_signature") or spec["signature_name"]](features=x),
        "fused": lambda: fused.signatures["serving_default"](features=x),
    }
    result = {}
    for name, call in calls.items():
        for _ in range(50):
            call()
        timings = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            call()
            timings.append(time.perf_counter_ns() - t0)
        result[name] = float(np.median(timings) / 1000.0)
    return result


def explain(results: dict) -> list[str]:
    """Why a goal is missed or a number looks as it does, from this run's own figures."""
    runs = {(r["target"], r["batch"], r["concurrency"]): r for r in results["runs"]}
    notes = []
    g = results["graph_us"]
    gap = ""
    if ("a", 1, 1) in runs and ("d", 1, 1) in runs:
        us = 1000 * (runs[("d", 1, 1)]["percentiles_ms"]["50"] - runs[("a", 1, 1)]["percentiles_ms"]["50"])
        if us > 0:
            gap = (f" That is {g['fused'] - g['embedder']:.0f} of the {us:.0f} us between (d) and (a) at batch 1; "
                   "the rest is spent around the graph (a raw input, five outputs to convert and write).")
        else:
            gap = (f" Here (d) answered {-us:.0f} us faster than (a) at batch 1 all the same: (a)'s stand-in "
                   "writes every one of its outputs as JSON, (d) answers the segment and the items only.")
    notes.append(
        f"The fused graph runs the scaling, nearest-centroid and top-k steps as some 80 more small TensorFlow "
        f"ops than the embedding model: {g['fused']:.0f} us against {g['embedder']:.0f} us per one-row call "
        f"in-process (+{g['fused'] - g['embedder']:.0f} us), fixed per call, so its share shrinks as batches "
        f"grow (see the tables).{gap}"
    )
    top_batch, top_c = max(b for _, b, _ in runs), max(c for _, _, c in runs)
    if ("a", top_batch, top_c) in runs and ("b", top_batch, top_c) in runs:
        a, b = runs[("a", top_batch, top_c)], runs[("b", top_batch, top_c)]
        share = b["extra"]["cpu_share"].get("transformer", 0.0)
        notes.append(
            f"At {top_batch} rows per request and concurrency {top_c} the transformer reaches "
            f"{100 * b['throughput'] / a['throughput']:.0f}% of (a): its one Python process is busy "
            f"{share:.2f} of a core, {1000 * share / max(b['throughput'], 1e-9):.1f} ms per request "
            "(parsing and validating every value, scaling, ranking, JSON both ways), while the predictor is busy "
            f"{b['extra']['cpu_share'].get('predictor', 0.0):.2f} of a core. "
            "A single transformer process uses one core; scale replicas, or use fused mode for large batches."
        )
    protocols = [(key, label) for key, label in (("b", "v1 REST"), ("e", "v2 REST"), ("f", "v2 gRPC"))
                 if (key, top_batch, top_c) in runs]
    if len(protocols) > 1:
        cells = ", ".join(f"{label} {runs[(key, top_batch, top_c)]['throughput']:.0f} req/s "
                          f"(transformer {runs[(key, top_batch, top_c)]['extra']['cpu_share'].get('transformer', 0):.2f} "
                          "of a core)" for key, label in protocols)
        notes.append(
            f"The transformer's protocols at {top_batch} rows and concurrency {top_c}: {cells}. The hop to the "
            "predictor is gRPC in all three, so the differences are the transformer's own reading and writing: "
            "v2 carries each tensor as one flat list (or raw bytes over gRPC) where v1 has an object per row "
            "and per item. The gRPC load comes from a Python client on the same two cores, which costs more "
            "client CPU than wrk."
        )
    hop = ""
    if ("b", top_batch, top_c) in runs and ("g", top_batch, top_c) in runs:
        per_request = {k: 1000 * runs[(k, top_batch, top_c)]["extra"]["cpu_share"].get("transformer", 0.0)
                       / max(runs[(k, top_batch, top_c)]["throughput"], 1e-9) for k in "bg"}
        hop = (f" At {top_batch} rows and concurrency {top_c} the bytes of gRPC pay: the transformer's CPU per "
               f"request is {per_request['b']:.1f} ms with the gRPC hop against {per_request['g']:.1f} ms with REST.")
    notes.append(
        "Where the transformer's time goes: benchmarks/profile-hop.md (py-spy, before and after the fast path). "
        "Predict requests no longer pass through Starlette's and FastAPI's middleware, KServe's timing "
        "middleware (a CPU-time read per request) or FastAPI's routing; what is left per request is uvicorn's "
        "HTTP work (what (i) also pays), grpc.aio's call objects toward the predictor, KServe's Model.__call__ "
        "with its histograms and DataPlane, and the transformer's own parsing, kernels and metrics." + hop
    )
    cells = []
    for batch, c in sorted({(b, c) for _, b, c in runs}):
        if all((key, batch, c) in runs for key in "ahgb"):
            rate = {key: runs[(key, batch, c)]["throughput"] for key in "ahgb"}
            cells.append(f"batch {batch} x {c}: predictor alone {rate['a']:.0f} / {rate['h']:.0f}, "
                         f"transformer {rate['g']:.0f} / {rate['b']:.0f}")
    if cells:
        notes.append("REST / gRPC toward the predictor, in requests per second: " + "; ".join(cells) + ".")
    notes.append(
        "The predictor here is `python -m model.standin`, TF Serving's REST and gRPC APIs in Python over the "
        "same SavedModel (no container engine on this machine). Its own HTTP, JSON and gRPC work is slower than "
        "TF Serving's C++, which makes (a), (h) and (d) slower than on real TF Serving and the transformer's "
        "fixed hop cost relatively smaller; its gRPC server (grpc.aio) costs more per call than its REST "
        "server at small batches, which real TF Serving's does not."
    )
    return notes


def soak(stack: LocalStack, body: bytes, requests: int, concurrency: int) -> dict:
    """``requests`` requests at ``concurrency`` through the transformer: every one answered, memory bounded.

    Each request's outcome is recorded under its own number (its status, or the name of the client error); a
    request is *lost* when no outcome was recorded for it, whatever happened to the worker that sent it."""
    import asyncio

    transformer = psutil.Process(stack.processes["transformer"].pid)
    rss_before = transformer.memory_info().rss
    outcomes: dict[int, int | str] = {}

    async def run() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        queue = iter(range(requests))
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            async def worker():
                for number in queue:
                    try:
                        response = await client.post(f"{stack.transformer_url}/v1/models/{MODEL}:predict",
                                                     content=body, headers={"content-type": "application/json"})
                        outcomes[number] = response.status_code
                    except httpx.HTTPError as exc:
                        outcomes[number] = type(exc).__name__

            started = time.perf_counter()
            # A worker that fails otherwise stops; its request and those nobody else took stay without an outcome.
            await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
            return time.perf_counter() - started

    seconds = asyncio.run(run())
    rss_after = transformer.memory_info().rss
    statuses: dict[str, int] = {}
    for outcome in outcomes.values():
        statuses[str(outcome)] = statuses.get(str(outcome), 0) + 1
    errors = sum(1 for outcome in outcomes.values() if isinstance(outcome, str))
    return {
        "requests": requests, "concurrency": concurrency, "seconds": seconds, "answered": len(outcomes) - errors,
        "ok": statuses.get("200", 0), "statuses": statuses, "transport_errors": errors,
        "lost": sum(1 for number in range(requests) if number not in outcomes),
        "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
        "rss_growth_mb": (rss_after - rss_before) / 2**20,
    }


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


def chaos(build: Path, out: Path, requests: int = 100_000, connections: int = 64) -> dict:
    """``requests`` at ``connections`` while the predictor is killed and restarted twice and a model update lands.

    The store starts with the second-newest version of ``build``; the newest is published into it (copied
    under a temporary name, then renamed) between the two predictor kills.
    """
    import shutil
    import threading

    source = build / "models" / MODEL
    versions = model_versions(source)
    if len(versions) < 2:
        raise StackError(f"the chaos soak needs two model versions under {source}: run `python -m model.train` again")
    old, new = versions[-2:]
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    store = workdir / "models" / MODEL
    shutil.copytree(source / str(old), store / str(old))
    body = request_bodies(build, [1])["v1"][1]
    stack = LocalStack(build=workdir, predictor="local", log_dir=workdir / "logs").start()
    events: list[dict] = []
    try:
        url = f"{stack.transformer_url}/v1/models/{MODEL}:predict"
        transformer = psutil.Process(stack.processes["transformer"].pid)
        rate = len(run_recorded(url, body, connections, 3.0)["statuses"]) / 3.0  # warm-up, and the pace
        rss_before = transformer.memory_info().rss
        expected = requests / max(rate, 1.0)
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(run_recorded(url, body, connections, 3600.0,
                                                                           max_requests=requests)))
        started = time.monotonic()
        load.start()

        def at(fraction: float) -> None:
            while load.is_alive() and time.monotonic() - started < fraction * expected:
                time.sleep(0.05)

        def restart_predictor() -> None:
            t0 = time.monotonic()
            stack.processes["predictor"].kill()
            stack.processes["predictor"].wait()
            stack.processes.pop("predictor")
            stack.start_predictor()
            events.append({"event": "predictor killed and restarted", "at_s": round(t0 - started, 1),
                           "predictor_down_s": round(time.monotonic() - t0, 1)})

        at(0.15)
        restart_predictor()
        at(0.45)
        staging = store / f".incoming-{new}"
        shutil.copytree(source / str(new), staging)
        staging.rename(store / str(new))
        events.append({"event": f"model version {new} published", "at_s": round(time.monotonic() - started, 1)})
        at(0.7)
        restart_predictor()
        load.join()
        seconds = time.monotonic() - started
        metrics_text = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
        rss_after = transformer.memory_info().rss
    finally:
        stack.stop()
    statuses = result["statuses"]
    counts = {str(code): int((statuses == code).sum()) for code in np.unique(statuses)}
    version_now = re.search(r'^embedder_model_version\{model_name="embedder"\} (\S+)$', metrics_text, re.M)
    report = {
        "machine": machine(), "requests": requests, "connections": connections, "seconds": seconds,
        "answered": int(statuses.size), "statuses": counts, "lost": result["transport_errors"],
        "events": events, "model_version_at_end": float(version_now.group(1)) if version_now else None,
        "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
    }
    documented = {"200", "502", "503", "504"}
    report["goals"] = [
        {"goal": "every request answered 200 or a documented 5xx", "measured": f"{counts}",
         "met": set(counts) <= documented and report["answered"] == requests},
        {"goal": "nothing hangs, nothing is lost", "measured": f"{report['lost']} requests without an answer",
         "met": report["lost"] == 0},
        {"goal": "memory grows less than 10%", "measured": f"transformer RSS {report['rss_before_mb']:.0f} -> "
         f"{report['rss_after_mb']:.0f} MB", "met": rss_after < 1.1 * rss_before},
        {"goal": f"the update to version {new} took effect", "measured": f"embedder_model_version {report['model_version_at_end']}",
         "met": report["model_version_at_end"] == new},
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Chaos soak", "", f"`python -m scripts.benchmark --chaos`: {requests:,} one-row requests at {connections} "
             f"connections (`scripts/loadgen.py: run_recorded`, 30 s per-request timeout) through the transformer and the "
             f"TF Serving stand-in on loopback (gRPC between them, the default), while the predictor is killed (SIGKILL) and restarted twice and model "
             f"version {new} is published into the store between the two. {seconds:.0f} s in all.", "",
             "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in report["goals"]]
    lines += ["", "| event | at (s) | predictor down (s) |", "| --- | --- | --- |"]
    lines += [f"| {e['event']} | {e['at_s']} | {e.get('predictor_down_s', '')} |" for e in events]
    lines += ["", "503s come while the predictor is down (unreachable after bounded retries); the transformer "
              "itself never stops.", "", f"Machine: {report['machine']}", ""]
    (out / "chaos.md").write_text("\n".join(lines))
    return report


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    import sklearn
    import tensorflow as tf

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(), "kserve": version("kserve"),
        "tensorflow": tf.__version__, "scikit-learn": sklearn.__version__,
        "load_generator": "wrk " + (os.popen("wrk -v 2>&1").read().split()[1] if have_wrk() else "absent: python httpx"),
        "predictor": "python -m model.standin (TF Serving stand-in, REST and gRPC on one port; no container engine here)",
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = {t["key"]: t["label"] for t in results["targets"]}
    batches = sorted({r["batch"] for r in runs})
    concurrencies = sorted({r["concurrency"] for r in runs})
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {key: f"C{i}" for i, key in enumerate(labels)}
    for col, concurrency in enumerate(concurrencies[:2]):
        ax = axes[0][col]
        for key in labels:
            row = next((r for r in runs if r["target"] == key and r["batch"] == 1 and r["concurrency"] == concurrency), None)
            if row:
                ps = sorted((float(k), v) for k, v in row["percentiles_ms"].items())
                ax.plot([v for _, v in ps], [k for k, _ in ps], marker=".", color=colors[key], label=labels[key])
        ax.set_title(f"latency distribution, batch 1, concurrency {concurrency}")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("percentile")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for key in labels:
        for concurrency, style in zip(concurrencies, ("-", "--")):
            rows = [next((r for r in runs if r["target"] == key and r["batch"] == b and r["concurrency"] == concurrency), None)
                    for b in batches]
            xs = [b for b, r in zip(batches, rows) if r]
            axes[1][0].plot(xs, [r["percentiles_ms"]["50"] for r in rows if r], style, marker="o",
                            color=colors[key], label=f"{labels[key]}, c={concurrency}")
            axes[1][1].plot(xs, [r["throughput"] * b for b, r in zip(batches, rows) if r], style, marker="o",
                            color=colors[key], label=f"{labels[key]}, c={concurrency}")
    axes[1][0].set_title("p50 latency vs batch size")
    axes[1][0].set_ylabel("ms")
    axes[1][1].set_title("throughput (rows/s) vs batch size")
    axes[1][1].set_ylabel("rows / s")
    for ax in axes[1]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows per request")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def own_cpu_us(run: dict, server: str) -> float:
    """Microseconds of CPU ``server`` (one process of the path) spent per request in this cell."""
    return 1e6 * run["extra"]["cpu_share"].get(server, 0.0) / max(run["throughput"], 1e-9)


def verdicts(results: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for each performance goal, as ratios to the anchors measured in this run."""
    runs = {(r["target"], r["batch"], r["concurrency"]): r for r in results["runs"]}
    out = []
    kernel = results["kernel_us"]
    server = runs.get(("b", 1, 1), {}).get("extra", {}).get("pre_post_us")
    one = max(kernel.get("numpy", 0.0), kernel.get("numpy_1_lists", 0.0))
    out.append(("pre+post compute for a 1-row request <= 40 us in-process (rows by name and as lists)",
                f"{kernel['numpy']:.0f} us by name, {kernel.get('numpy_1_lists', float('nan')):.0f} us as a list, median "
                "in-process" + (f"; {server:.0f} us mean of KServe's pre+post histograms in the server"
                                if server is not None else ""), one <= 40))
    if "numpy_256_names" in kernel:
        many = max(kernel["numpy_256_names"], kernel["numpy_256_lists"])
        out.append(("pre+post compute for 256 rows <= 1 ms in-process (by name and as lists)",
                    f"{kernel['numpy_256_names']:.0f} us by name, {kernel['numpy_256_lists']:.0f} us as lists",
                    many <= 1000))
    if ("a", 1, 1) in runs and ("b", 1, 1) in runs:
        a, b = runs[("a", 1, 1)]["percentiles_ms"]["50"], runs[("b", 1, 1)]["percentiles_ms"]["50"]
        out.append(("hop at batch 1, 1 client <= +0.4 ms at p50 (transformer minus predictor alone)",
                    f"{b:.2f} ms vs {a:.2f} ms: {b - a:+.2f} ms", b - a <= 0.4))
    top = max(c for (_, _, c) in runs)
    if ("b", 1, top) in runs and ("i", 1, top) in runs:
        b, i = own_cpu_us(runs[("b", 1, top)], "transformer"), own_cpu_us(runs[("i", 1, top)], "floor")
        out.append((f"batch 1, {top} clients: the transformer's own CPU per request <= 5x the floor's",
                    f"{b:.0f} vs {i:.0f} us = {b / i:.1f}x", b <= 5 * i))
    for batch in sorted({b for (_, b, _) in runs}):
        share = 0.9 if batch >= 256 else 1.0
        if ("a", batch, top) in runs and ("b", batch, top) in runs:
            a, b = runs[("a", batch, top)]["throughput"], runs[("b", batch, top)]["throughput"]
            out.append((f"throughput at batch {batch}, {top} clients >= {100 * share:.0f}% of predictor alone",
                        f"{b:.0f} vs {a:.0f} req/s = {100 * b / a:.0f}%", b >= share * a))
    if ("b", 1, 1) in runs and ("f", 1, 1) in runs:
        b, f = runs[("b", 1, 1)]["percentiles_ms"]["50"], runs[("f", 1, 1)]["percentiles_ms"]["50"]
        out.append(("v2 gRPC at one row no slower than v1 REST (p50, 1 client)", f"{f:.2f} vs {b:.2f} ms", f <= b))
    cells = sorted({(b, c) for (t, b, c) in runs if t == "j" and ("b", b, c) in runs})
    if cells:
        behind = [f"batch {b} x {c}" for b, c in cells if runs[("b", b, c)]["throughput"] < runs[("j", b, c)]["throughput"]]
        ratios = ", ".join(f"{runs[('b', b, c)]['throughput'] / runs[('j', b, c)]['throughput']:.1f}x"
                           for b, c in cells)
        out.append(("ahead of the plain KServe transformer in every cell (req/s)",
                    f"(b) / (j): {ratios}" + (f"; behind at {', '.join(behind)}" if behind else ""), not behind))
    if ("a", 1, 1) in runs and ("d", 1, 1) in runs:
        a, d = runs[("a", 1, 1)]["percentiles_ms"]["50"], runs[("d", 1, 1)]["percentiles_ms"]["50"]
        out.append(("fused p50 within 10% of predictor alone (batch 1, 1 client)",
                    f"{d:.2f} ms vs {a:.2f} ms = {100 * (d / a - 1):+.0f}%", d <= 1.1 * a))
    return out


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "latency.png")
    labels = {t["key"]: t["label"] for t in results["targets"]}
    runs = results["runs"]
    lines = [
        "# Benchmark: every serving path side by side",
        "",
        f"Run {results['date']} with `{results['command']}`; {results['seconds']}s measured per cell after "
        f"{results['warmup']}s warm-up, the same requests for every path.",
        "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in results["machine"].items()) + ".",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {goal} | {measured} | {'yes' if met else '**no**'} |" for goal, measured, met in verdicts(results)]
    lines += ["", "## Latency and throughput", "",
              "Ratios are to (a), the predictor alone, to (j), the plain KServe transformer, and (own CPU) to (i), "
              "the Python HTTP floor, at the same batch size and concurrency. Own CPU is the path's own process "
              "(the transformer's, not the predictor's) per request. Client CPU is the "
              "load generator's share of one core; server CPU is the path's servers' CPU per request; busy cores is "
              "how many cores each server kept busy (2 in all on this machine, shared with the load generator).", ""]
    for batch in sorted({r["batch"] for r in runs}):
        for concurrency in sorted({r["concurrency"] for r in runs}):
            cell = [r for r in runs if r["batch"] == batch and r["concurrency"] == concurrency]
            if not cell:
                continue
            base = next((r for r in cell if r["target"] == "a"), None)
            floor = next((r for r in cell if r["target"] == "i"), None)
            plain = next((r for r in cell if r["target"] == "j"), None)
            lines += [f"### batch {batch}, concurrency {concurrency}", "",
                      "| path | p50 ms | p90 ms | p99 ms | req/s | rows/s | p50 / (a) | req/s / (a) | req/s / (j) | "
                      "own CPU us/req / (i)'s | errors | client CPU | server CPU ms/req | busy cores | pre+post us |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
            for r in cell:
                p = r["percentiles_ms"]
                ratio_p = f"{p['50'] / base['percentiles_ms']['50']:.2f}" if base else ""
                ratio_t = f"{r['throughput'] / base['throughput']:.2f}" if base else ""
                pre_post = r["extra"].get("pre_post_us")
                ratio_j = f"{r['throughput'] / plain['throughput']:.2f}" if plain else ""
                own = next((name for name in r["extra"]["cpu_share"] if name != "predictor"), None)
                ratio_cpu = (f"{own_cpu_us(r, own):.0f} / {own_cpu_us(r, own) / own_cpu_us(floor, 'floor'):.1f}x"
                             if floor and own else "")
                lines.append(
                    f"| ({r['target']}) {labels[r['target']]} | {p['50']:.2f} | {p['90']:.2f} | {p['99']:.2f} | "
                    f"{r['throughput']:.0f} | {r['throughput'] * batch:.0f} | {ratio_p} | {ratio_t} | {ratio_j} | "
                    f"{ratio_cpu} | "
                    f"{r['non_2xx'] + r['socket_errors']} | {100 * r['client_cpu_share']:.0f}% | "
                    f"{r['extra']['server_cpu_ms_per_request']:.2f} | "
                    + ", ".join(f"{name} {share:.2f}" for name, share in r["extra"]["cpu_share"].items())
                    + f" | {'' if pre_post is None else f'{pre_post:.0f}'} |")
            lines.append("")
    k = results["kernel_us"]
    lines += ["## Pre+post compute, one row, in-process", "",
              f"Median of {results['kernel_repeats']} calls (parse and validate, scale, segment, rank, encode): "
              f"numpy kernels {k['numpy']:.0f} us, scikit-learn per request {k['sklearn']:.0f} us "
              f"({k['sklearn'] / k['numpy']:.0f}x).", ""]
    if results.get("soak"):
        s = results["soak"]
        lines += ["## Soak", "",
                  f"{s['requests']} requests at concurrency {s['concurrency']} through (b) in {s['seconds']:.1f}s "
                  f"({s['requests'] / s['seconds']:.0f} req/s): {s['ok']} answered 200, statuses {s['statuses']}, "
                  f"{s['transport_errors']} transport errors, {s['lost']} lost. Transformer resident memory "
                  f"{s['rss_before_mb']:.0f} MB before, {s['rss_after_mb']:.0f} MB after "
                  f"({s['rss_growth_mb']:+.1f} MB).", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["![latency distributions and scaling](latency.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def rewrite_report(results_json: Path) -> None:
    """Write results.md and latency.png again from a results.json (same run, new wording)."""
    results = json.loads(results_json.read_text())
    results["notes"] = explain(results)
    write_report(results, results_json.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a quick run that only shows everything works")
    parser.add_argument("--chaos", action="store_true",
                        help="only the chaos soak (100,000 requests at 64 connections, two predictor kills and a "
                             "model update): writes chaos.md and .json")
    parser.add_argument("--overload", action="store_true",
                        help="only the overload scenario (16, 1,024, 16 connections): writes overload.md and .json")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell (not measured)")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--soak-requests", type=int, default=20000)
    parser.add_argument("--soak-concurrency", type=int, default=32)
    parser.add_argument("--build", type=Path, default=ROOT / "build")
    parser.add_argument("--out", type=Path, help="report folder (default: benchmarks/, or a temporary one with --smoke)")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report again from an earlier results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        rewrite_report(args.report_only)
        return 0
    if args.chaos:
        out = args.out or ROOT / "benchmarks"
        print("== chaos soak: 100,000 requests at 64 connections, the predictor killed twice, one model update")
        try:
            report = chaos(args.build, out)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for goal in report["goals"]:
            print(f"   {'met ' if goal['met'] else 'MISSED'} {goal['goal']}: {goal['measured']}")
        print(f"wrote {out / 'chaos.md'}")
        return 0
    if args.overload:
        if not model_versions(args.build / "models" / MODEL):
            print("error: no model in build/: run `python -m model.train` (or ./scripts/demo.sh) first", file=sys.stderr)
            return 1
        out = args.out or (Path(tempfile.mkdtemp(prefix="overload-")) if args.smoke else ROOT / "benchmarks")
        print(f"== overload: {', '.join(f'{n} ({c} connections, {t:g}s)' for n, c, t, _ in OVERLOAD_PHASES)}")
        report = overload(args.build, out, scale=0.2 if args.smoke else 1.0)
        print(f"wrote {out / 'overload.md'}")
        missed = [g["goal"] for g in report["goals"] if g["met"] is False]
        if missed:
            print("goals missed: " + "; ".join(missed))
        return 0
    if args.smoke:
        args.seconds, args.warmup, args.batches, args.concurrency = 1.0, 1.0, "1,32", "4"
        args.soak_requests, args.soak_concurrency = min(args.soak_requests, 300), 8
    out = args.out or (Path(tempfile.mkdtemp(prefix="benchmark-")) if args.smoke else ROOT / "benchmarks")
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    if not model_versions(args.build / "models" / MODEL) or not (args.build / "models" / FUSED).exists():
        print("== training first (build/ is incomplete)")
        from model.train import main as train

        if train(["--out", str(args.build), "--quiet"]) != 0:
            return 1
    if not have_wrk():
        print("note: wrk is not installed (apt-get install wrk); using the slower Python load generator")

    bodies = request_bodies(args.build, batches)
    transformer_bodies, predictor_bodies, fused_bodies = bodies["v1"], bodies["predictor"], bodies["fused"]
    v2_rest_bodies, v2_grpc_bodies = bodies["v2_rest"], bodies["v2_grpc"]
    logs = Path(tempfile.mkdtemp(prefix="benchmark-logs-"))
    main_stack = LocalStack(build=args.build, predictor="local", log_dir=logs / "main")
    baseline = main_stack.another_transformer(log_dir=logs / "baseline", transformer_args=["--kernels", "sklearn"])
    rest_hop = main_stack.another_transformer(log_dir=logs / "rest-hop", transformer_args=["--predictor_api", "rest"])
    fused = LocalStack(build=args.build, model_name=FUSED, predictor="local", log_dir=logs / "fused")
    anchors = []
    started = time.monotonic()
    try:
        main_stack.start()
        baseline.start_transformer()
        rest_hop.start_transformer()
        fused.start_predictor()
        # The floor answers a fixed body the size of the transformer's one-row answer.
        answer_bytes = len(httpx.post(f"{main_stack.transformer_url}/v1/models/{MODEL}:predict",
                                      content=transformer_bodies[1], timeout=10).content)
        floor = Anchor("scripts.anchors.floor", ["--port", "{port}", "--body-bytes", str(answer_bytes)], "/",
                       logs / "floor.log")
        anchors.append(floor)
        plain = Anchor("scripts.anchors.plain_transformer",
                       ["--model_name", MODEL, "--predictor_host", main_stack.predictor_url.removeprefix("http://"),
                        "--bundle", str(bundle_dir(newest_version_dir(args.build))), "--http_port", "{port}",
                        "--grpc_port", "0"], f"/v1/models/{MODEL}", logs / "plain.log")
        anchors.append(plain)
        proc = {name: psutil.Process(s.processes[part].pid) for name, s, part in (
            ("predictor", main_stack, "predictor"), ("transformer", main_stack, "transformer"),
            ("baseline", baseline, "transformer"), ("rest_hop", rest_hop, "transformer"),
            ("fused", fused, "predictor"))}
        proc["floor"], proc["plain"] = psutil.Process(floor.process.pid), psutil.Process(plain.process.pid)
        targets = [
            Target("a", "predictor alone", f"{main_stack.predictor_url}/v1/models/{MODEL}:predict", predictor_bodies,
                   {"predictor": proc["predictor"]}),
            Target("h", "predictor alone, gRPC",
                   f"grpc://127.0.0.1:{main_stack.predictor_grpc_port}/tensorflow.serving.PredictionService/Predict",
                   bodies["predictor_grpc"], {"predictor": proc["predictor"]}),
            Target("b", "transformer -> predictor", f"{main_stack.transformer_url}/v1/models/{MODEL}:predict",
                   transformer_bodies, {"transformer": proc["transformer"], "predictor": proc["predictor"]},
                   f"{main_stack.transformer_url}/metrics"),
            Target("g", "transformer -> predictor over REST", f"{rest_hop.transformer_url}/v1/models/{MODEL}:predict",
                   transformer_bodies, {"transformer": proc["rest_hop"], "predictor": proc["predictor"]},
                   f"{rest_hop.transformer_url}/metrics"),
            Target("c", "transformer, scikit-learn per request", f"{baseline.transformer_url}/v1/models/{MODEL}:predict",
                   transformer_bodies, {"transformer": proc["baseline"], "predictor": proc["predictor"]},
                   f"{baseline.transformer_url}/metrics"),
            Target("d", "fused alone", f"{fused.predictor_url}/v1/models/{FUSED}:predict", fused_bodies,
                   {"predictor": proc["fused"]}),
            Target("e", "transformer v2 REST -> predictor", f"{main_stack.transformer_url}/v2/models/{MODEL}/infer",
                   v2_rest_bodies, {"transformer": proc["transformer"], "predictor": proc["predictor"]},
                   f"{main_stack.transformer_url}/metrics"),
            Target("f", "transformer v2 gRPC -> predictor",
                   f"grpc://{main_stack.grpc_target}/inference.GRPCInferenceService/ModelInfer",
                   v2_grpc_bodies, {"transformer": proc["transformer"], "predictor": proc["predictor"]},
                   f"{main_stack.transformer_url}/metrics"),
            Target("i", "Python HTTP floor (fixed answer)", f"{floor.url}/v1/models/{MODEL}:predict", transformer_bodies,
                   {"floor": proc["floor"]}),
            Target("j", "plain KServe transformer -> predictor", f"{plain.url}/v1/models/{MODEL}:predict",
                   transformer_bodies, {"plain": proc["plain"], "predictor": proc["predictor"]},
                   f"{plain.url}/metrics"),
        ]
        runs = []
        for batch in batches:
            for concurrency in concurrencies:
                for target in targets:
                    result = measure(target, batch, concurrency, args.seconds, args.warmup)
                    runs.append({"target": target.key, "batch": batch, "concurrency": concurrency, **result.to_dict()})
                    print(f"({target.key}) {target.label:40s} batch {batch:3d} c={concurrency:2d}: "
                          f"p50 {result.p(50):7.2f} ms  p99 {result.p(99):7.2f} ms  {result.throughput:7.0f} req/s  "
                          f"client CPU {100 * result.client_cpu_share:3.0f}%", flush=True)
        soak_result = soak(main_stack, transformer_bodies[1], args.soak_requests, args.soak_concurrency)
        print(f"soak: {soak_result}", flush=True)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for anchor in anchors:
            anchor.stop()
        for stack in (baseline, rest_hop, main_stack, fused):
            stack.stop()
    repeats = 200 if args.smoke else 2000
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m scripts.benchmark" + (" --smoke" if args.smoke else ""),
        "seconds": args.seconds, "warmup": args.warmup, "machine": machine(),
        "targets": [{"key": t.key, "label": t.label} for t in targets],
        "runs": runs, "soak": soak_result,
        "kernel_us": kernel_microbenchmark(args.build, repeats), "kernel_repeats": repeats,
        "graph_us": graph_microbenchmark(args.build, repeats),
        "wall_seconds": time.monotonic() - started,
    }
    results["notes"] = explain(results)
    write_report(results, out)
    shutil.rmtree(logs, ignore_errors=True)
    print(f"wrote {out / 'results.md'}, results.json and latency.png")
    for goal, measured, met in verdicts(results):
        print(f"  [{'met' if met else 'MISSED'}] {goal}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency and throughput of every serving path, each measured alone with the same requests, and the soak."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

from scripts.benchmark.common import MODEL, newest_version_dir
from scripts.loadgen import LoadResult, run_load
from scripts.localstack import ROOT, LocalStack, StackError
from transformer.store.bundle import bundle_dir


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


def request_bodies(build: Path, batches: list[int]) -> dict[str, dict[int, bytes]]:
    """{kind: {batch size: body}}: the transformer's (raw rows; "v1" JSON, "v2_rest" JSON, "v2_grpc" with the
    rows as raw bytes), the "predictor"'s (scaled rows, REST JSON; "predictor_grpc": the PredictRequest
    the transformer itself sends) and the "fused" model's (raw rows)."""
    import joblib
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from model.synthetic import make_synthetic
    from transformer.pipeline import Pipeline
    from transformer.predictor.grpc import tensor_proto
    from transformer.predictor.protos import tfserving_pb2
    from transformer.store.bundle import load_bundle

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

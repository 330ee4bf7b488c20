"""``python -m scripts.benchmark``: the command line (see the package's docstring)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

import scripts.benchmark as package
from scripts.benchmark.budget import have_py_spy, measure_budget
from scripts.benchmark.chaos import chaos
from scripts.benchmark.common import FUSED, MODEL, machine, newest_version_dir
from scripts.benchmark.compute import graph_microbenchmark, kernel_microbenchmark
from scripts.benchmark.overload import OVERLOAD_PHASES, overload
from scripts.benchmark.paths import Anchor, Target, measure, request_bodies, soak
from scripts.benchmark.report import explain, rewrite_report, verdicts, write_report
from scripts.loadgen import have_wrk
from scripts.localstack import ROOT, LocalStack, StackError
from transformer.store.bundle import bundle_dir, model_versions
from transformer.helpformat import HelpFormatter


BUDGETED = ("b", "m", "k")  # the transformer over each hop at one row: REST on the loop's client (the default's
# choice at one row), gRPC (grpc.aio), REST on aiohttp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=package.__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a quick run that only shows everything works")
    parser.add_argument("--chaos", action="store_true",
                        help="only the chaos soak (100,000 requests at 64 connections, two predictor kills and a "
                             "model update): writes chaos.md and .json")
    parser.add_argument("--overload", action="store_true",
                        help="only the overload scenario (16, 1,024, 16 connections): writes overload.md and .json")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell (not measured)")
    parser.add_argument("--batches", default="1,32,256", help="rows per request of the measured cells, comma-separated")
    parser.add_argument("--concurrency", default="1,16", help="concurrent clients of the measured cells, comma-separated")
    parser.add_argument("--soak-requests", type=int, default=20000, help="requests of the soak after the cells")
    parser.add_argument("--soak-concurrency", type=int, default=32, help="concurrent clients of the soak")
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="the build folder whose model versions "
                        "are served (trained first when it holds none)")
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
    aiohttp_hop = main_stack.another_transformer(log_dir=logs / "aiohttp-hop", transformer_args=[
        "--predictor_api", "rest", "--predictor_rest_client", "aiohttp"])
    grpc_hop = main_stack.another_transformer(log_dir=logs / "grpc-hop", transformer_args=["--predictor_api", "grpc"])
    on_uvloop = main_stack.another_transformer(log_dir=logs / "uvloop", transformer_args=["--event-loop", "uvloop"])
    fused = LocalStack(build=args.build, model_name=FUSED, predictor="local", log_dir=logs / "fused")
    anchors = []
    started = time.monotonic()
    try:
        main_stack.start()
        baseline.start_transformer()
        rest_hop.start_transformer()
        aiohttp_hop.start_transformer()
        grpc_hop.start_transformer()
        on_uvloop.start_transformer()
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
            ("aiohttp_hop", aiohttp_hop, "transformer"), ("grpc_hop", grpc_hop, "transformer"),
            ("on_uvloop", on_uvloop, "transformer"),
            ("fused", fused, "predictor"))}
        proc["floor"], proc["plain"] = psutil.Process(floor.process.pid), psutil.Process(plain.process.pid)

        def v1_through(key: str, label: str, stack: LocalStack, process: str) -> Target:
            """One of our transformers taking v1 REST: its CPU and the predictor's counted, its stage histograms."""
            return Target(key, label, f"{stack.transformer_url}/v1/models/{MODEL}:predict", transformer_bodies,
                          {"transformer": proc[process], "predictor": proc["predictor"]},
                          f"{stack.transformer_url}/metrics")

        targets = [
            Target("a", "predictor alone", f"{main_stack.predictor_url}/v1/models/{MODEL}:predict", predictor_bodies,
                   {"predictor": proc["predictor"]}),
            Target("h", "predictor alone, gRPC",
                   f"grpc://127.0.0.1:{main_stack.predictor_grpc_port}/tensorflow.serving.PredictionService/Predict",
                   bodies["predictor_grpc"], {"predictor": proc["predictor"]}),
            v1_through("b", "transformer -> predictor (default: auto)", main_stack, "transformer"),
            v1_through("g", "transformer -> predictor over REST only", rest_hop, "rest_hop"),
            v1_through("k", "transformer -> predictor over REST, aiohttp", aiohttp_hop, "aiohttp_hop"),
            v1_through("m", "transformer -> predictor over gRPC only", grpc_hop, "grpc_hop"),
            v1_through("n", "transformer -> predictor on uvloop", on_uvloop, "on_uvloop"),
            v1_through("c", "transformer, scikit-learn per request", baseline, "baseline"),
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
        budgets = []
        if have_py_spy():
            for hop in (t for t in targets if t.key in BUDGETED):
                for concurrency in concurrencies:
                    budget = measure_budget(hop, 1, concurrency, args.seconds, args.warmup, rate=500,
                                            keep=out / "profiles" / f"budget-{hop.key}-1-row-{concurrency}-clients.folded")
                    budgets.append({"target": hop.key, **budget})
                    print(f"budget of ({hop.key}) batch 1 c={concurrency:2d}: {budget['cpu_us']:,.0f} us of CPU per "
                          "request; " + ", ".join(f"{stage} {cell['us']:,.0f}" for stage, cell in budget["stages"].items()),
                          flush=True)
        else:
            print("note: py-spy is not installed (it comes with .[dev]): no CPU budget per stage")
        soak_result = soak(main_stack, transformer_bodies[1], args.soak_requests, args.soak_concurrency)
        print(f"soak: {soak_result}", flush=True)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for anchor in anchors:
            anchor.stop()
        for stack in (baseline, rest_hop, aiohttp_hop, grpc_hop, on_uvloop, main_stack, fused):
            stack.stop()
    repeats = 200 if args.smoke else 2000
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m scripts.benchmark" + (" --smoke" if args.smoke else ""),
        "seconds": args.seconds, "warmup": args.warmup, "machine": machine(),
        "targets": [{"key": t.key, "label": t.label} for t in targets],
        "runs": runs, "budgets": budgets, "soak": soak_result,
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

"""The chaos soak: many requests while the predictor is killed and restarted twice and a model update lands."""

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
from scripts.benchmark.paths import request_bodies
from scripts.loadgen import run_recorded
from scripts.localstack import LocalStack, StackError
from transformer.store.bundle import model_versions


VERSION_WAIT_SECONDS = 30.0  # after the load, for the new version to answer


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
        # The new version answers once TF Serving, restarted last, has loaded it again and the transformer has seen
        # it AVAILABLE: on a short soak on a busy machine that can come after the last request (a 3,000-request soak
        # lasts about 2 s), so the version is read until it changes, for at most VERSION_WAIT_SECONDS.
        ended = time.monotonic()
        while True:
            metrics_text = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
            version_now = re.search(r'^embedder_model_version\{model_name="embedder"\} (\S+)$', metrics_text, re.M)
            if (version_now and float(version_now.group(1)) == new) or time.monotonic() - ended > VERSION_WAIT_SECONDS:
                break
            time.sleep(0.2)
        version_after_s = time.monotonic() - ended
        rss_after = transformer.memory_info().rss
    finally:
        stack.stop()
    statuses = result["statuses"]
    counts = {str(code): int((statuses == code).sum()) for code in np.unique(statuses)}
    report = {
        "machine": machine(), "requests": requests, "connections": connections, "seconds": seconds,
        "answered": int(statuses.size), "statuses": counts, "lost": result["transport_errors"],
        "events": events, "model_version_at_end": float(version_now.group(1)) if version_now else None,
        "version_seen_after_load_s": version_after_s,
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
        {"goal": f"the update to version {new} took effect", "measured": f"embedder_model_version {report['model_version_at_end']} ("
         f"{version_after_s:.1f} s after the last answer)",
         "met": report["model_version_at_end"] == new},
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Chaos soak", "", f"`python -m scripts.benchmark --chaos`: {requests:,} one-row requests at {connections} "
             f"connections (`scripts/loadgen.py: run_recorded`, 30 s per-request timeout) through the transformer and the "
             f"TF Serving stand-in on loopback (the transformer's default hop between them), while the predictor is killed (SIGKILL) and restarted twice and model "
             f"version {new} is published into the store between the two. {seconds:.0f} s in all.", "",
             "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in report["goals"]]
    lines += ["", "| event | at (s) | predictor down (s) |", "| --- | --- | --- |"]
    lines += [f"| {e['event']} | {e['at_s']} | {e.get('predictor_down_s', '')} |" for e in events]
    lines += ["", "503s come while the predictor is down (unreachable after bounded retries); the transformer "
              "itself never stops.", "", f"Machine: {report['machine']}", ""]
    (out / "chaos.md").write_text("\n".join(lines))
    return report

"""How training's time and memory grow with users, items and interactions: a table from real runs.

    python -m scripts.training_scale                         # the sizes of benchmarks/training-scale.md
    python -m scripts.training_scale --sizes 20000x2000x12   # users x items x interactions per user

For each size: synthetic users and interactions written as the two CSV files users bring
(``python -m model.synthetic``), then ``python -m model.train --data ... --interactions ...``
as a child process, its wall time and peak resident memory taken from the operating system
(``os.wait4``), its quality from the manifest it wrote. Writes a markdown report.
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
import time
from pathlib import Path

from scripts.localstack import ROOT
from transformer.helpformat import HelpFormatter

DEFAULT_SIZES = "100000x2000x20,100000x20000x20,300000x20000x20,1000000x20000x20"


def run_measured(argv: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, seconds, peak resident GiB) of a child process (Linux reports KiB)."""
    started = time.monotonic()
    with log.open("w") as out:
        child = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.monotonic() - started, usage.ru_maxrss / 2**20


def parse_size(text: str) -> tuple[int, int, float]:
    users, items, per_user = text.lower().split("x")
    return int(users), int(items), float(per_user)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.training_scale", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated USERSxITEMSxPER_USER")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "training-scale",
                        help="where data and builds go (removed size by size)")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "training-scale.md",
                        help="the Markdown report to write")
    parser.add_argument("--train-args", default="", help="extra arguments for model.train, e.g. '--epochs 5'")
    parser.add_argument("--workers", help="comma-separated worker counts to train each size with "
                        "(--distributed-workers, loopback): adds the workers, the seconds per step and the "
                        "gradient's size to the report")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    except ValueError:
        parser.error("--workers must look like 1,2")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes must look like 100000x2000x20 (users x items x interactions per user)")

    rows = []
    for (users, items, per_user), n_workers in [(size, w) for size in sizes for w in workers]:
        work = args.work / f"{users}x{items}x{per_user:g}" / f"workers-{n_workers or 1}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"{users} users x {items} items, {per_user:g} interactions per user"
              + (f", {n_workers} worker(s)" if n_workers else "") + ":", flush=True)
        code, gen_seconds, _ = run_measured(
            [sys.executable, "-m", "model.synthetic", "--users", str(users), "--items", str(items),
             "--per-user", str(per_user), "--item-prefix", "sku-", "--out", str(work / "data")], work / "synthetic.log")
        if code:
            print((work / "synthetic.log").read_text()[-2000:], file=sys.stderr)
            return 1
        code, seconds, peak = run_measured(
            [sys.executable, "-m", "model.train", "--data", str(work / "data" / "users.csv"), "--interactions",
             str(work / "data" / "interactions.csv"), "--out", str(work / "build"), "--quiet",
             *(["--distributed-workers", str(n_workers)] if n_workers else []), *args.train_args.split()],
            work / "train.log")
        if code:
            print((work / "train.log").read_text()[-2000:], file=sys.stderr)
            return 1
        written = int(re.search(r"(\d+) interactions", (work / "synthetic.log").read_text()).group(1))
        manifest = json.loads(next((work / "build" / "models" / "embedder").glob(
            "*/assets.extra/transformer-bundle/manifest.json")).read_text())
        training, quality = manifest["training"], manifest["training"]["quality"]
        size_mb = sum(f.stat().st_size for f in (work / "data").iterdir()) / 1e6
        per_step = training["training_seconds"] / (training["steps_per_epoch"] * training["epochs"])
        rows.append((users, items, written, training["n_train_interactions"], size_mb, training["batch_size"], seconds, peak,
                     quality["adjusted_rand_index"], quality["recall_at_k"], quality["popularity_recall_at_k"],
                     (n_workers, per_step, training["parameters"] * 4 / 1e6)))
        print(f"  {seconds:.0f} s, peak {peak:.2f} GiB, recall@10 {quality['recall_at_k']:.3f} "
              f"(popularity {quality['popularity_recall_at_k']:.3f})", flush=True)
        shutil.rmtree(work / "data", ignore_errors=True)

    lines = [
        "# Training at scale",
        "",
        f"`python -m scripts.training_scale --sizes {args.sizes}`"
        + (f" `--train-args '{args.train_args}'`" if args.train_args else "")
        + (f" `--workers {args.workers}`" if args.workers else "") + ", "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python {platform.python_version()}. Synthetic users "
        "(12 features, six planted segments) and string item ids, read from the two CSV files; "
        + (f"training with `{args.train_args}`" if args.train_args else "the default training (25 epochs, the fused "
           "model too)") + ". Time is the whole `python -m model.train` run (reading, "
        "scaling, training, KMeans, evaluation, export); memory is its peak resident set, from the kernel"
        + (" (of the largest worker); with N workers, N processes share this machine's cores, and seconds per step "
           "are the shards and the epochs over the steps" if args.workers else "") + ".",
        "",
        "| users | items | interactions | of training users | CSV MB | batch | time | peak memory | ARI | recall@10 "
        "| popularity |" + (" workers | s per step | gradient MB |" if args.workers else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.workers else ""),
    ]
    for users, items, written, interactions, size_mb, batch, seconds, peak, ari, recall, popularity, steps in rows:
        n_workers, per_step, gradient_mb = steps
        lines.append(f"| {users:,} | {items:,} | {written:,} | {interactions:,} | {size_mb:,.0f} | {batch} "
                     f"| {seconds / 60:.1f} min "
                     f"| {peak:.2f} GiB | {ari:.3f} | {recall:.3f} | {popularity:.3f} |"
                     + (f" {n_workers} | {per_step:.3f} | {gradient_mb:.1f} |" if args.workers else ""))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

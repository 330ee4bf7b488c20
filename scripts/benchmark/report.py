"""The benchmark's report: its goals judged against the anchors of the same run, the tables, the notes, the plot."""

from __future__ import annotations

import json
from pathlib import Path


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
    if all((k, top_batch, top_c) in runs for k in "bgm"):
        per_request = {k: 1000 * runs[(k, top_batch, top_c)]["extra"]["cpu_share"].get("transformer", 0.0)
                       / max(runs[(k, top_batch, top_c)]["throughput"], 1e-9) for k in "bgm"}
        hop = (f" At {top_batch} rows and concurrency {top_c} the transformer's CPU per request is "
               f"{per_request['m']:.1f} ms over gRPC only (m), {per_request['g']:.1f} ms over REST only (g) and "
               f"{per_request['b']:.1f} ms with the default, auto (b).")
    notes.append(
        "Where the transformer's time goes: the CPU budget per stage above (py-spy samples of each thread, split "
        "over the thread's measured CPU time). Predict requests no longer pass through Starlette's and FastAPI's "
        "middleware, KServe's timing middleware or FastAPI's routing (benchmarks/profile-hop.md); what is left per "
        "request is uvicorn's HTTP work (what (i) also pays), the event loop's own I/O, the hop toward the "
        "predictor, KServe's Model.__call__ with its histograms and DataPlane, and the transformer's own parsing, "
        "kernels and metrics." + hop
    )
    cells = []
    for batch, c in sorted({(b, c) for _, b, c in runs}):
        if all((key, batch, c) in runs for key in "ahgmb"):
            rate = {key: runs[(key, batch, c)]["throughput"] for key in "ahgmb"}
            cells.append(f"batch {batch} x {c}: predictor alone {rate['a']:.0f} / {rate['h']:.0f}, "
                         f"transformer {rate['g']:.0f} / {rate['m']:.0f} / {rate['b']:.0f}")
    if cells:
        notes.append("Requests per second toward the predictor over REST / gRPC (predictor alone) and over REST only / "
                     "gRPC only / auto (transformer): " + "; ".join(cells) + ".")
    notes.append(
        "The predictor here is `python -m model.standin`, TF Serving's REST and gRPC APIs in Python over the "
        "same SavedModel (no container engine on this machine). Its own HTTP, JSON and gRPC work is slower than "
        "TF Serving's C++, which makes (a), (h) and (d) slower than on real TF Serving and the transformer's "
        "fixed hop cost relatively smaller; its gRPC server (grpc.aio) costs more per call than its REST "
        "server at small batches, which real TF Serving's does not."
    )
    return notes


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
    if results.get("budgets"):
        from scripts.benchmark.budget import budget_table

        floor = {r["concurrency"]: own_cpu_us(r, "floor") for r in runs if r["target"] == "i" and r["batch"] == 1}
        first = results["budgets"][0]
        wakeups = (f" (its CPU per request at one client is {floor[min(floor)] / floor[max(floor)]:.1f} times its own "
                   f"at {max(floor)})" if len(floor) > 1 and floor[max(floor)] else "")
        lines += ["", "## CPU budget per stage: the transformer over each hop, one row", "",
                  f"Where the transformer's own CPU per request goes, at one row: over {results['seconds']}s of load "
                  "of its own, the kernel's CPU time of each of the process's threads, each thread's time split by "
                  f"py-spy's samples of that thread ({first['rate']} Hz, `--nonblocking`; idle waiting is not "
                  "sampled: an idle event loop gives none), each sample in the stage of the innermost frame a stage "
                  "claims (`scripts/benchmark/budget.py`). The transformer runs on asyncio's own event loop, whose "
                  "work is Python: a socket write counts in the stage that writes (the answers in the HTTP server, "
                  "the calls to TF Serving in the hop); the rest is the loop's own turn (selecting, reading the "
                  "sockets, running callbacks, timers). At one client every request wakes an idle loop twice "
                  f"(its arrival and the predictor's answer), which the floor pays too{wakeups}. At one row (b) calls "
                  "TF Serving over REST with the client on the event loop (`transformer/predictor/http1.py`), (m) over "
                  "gRPC (grpc.aio), (k) over REST with aiohttp. The raw samples, for a flame graph: "
                  "`profiles/budget-<path>-1-row-<clients>-clients.folded`.",
                  "", *budget_table(results["budgets"], floor, {(r["target"], r["concurrency"]): own_cpu_us(r, "transformer")
                                                                for r in runs if r["batch"] == 1})]
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
    """Write results.md and latency.png again from a results.json (same run, new wording); the CPU budgets are split
    over the stages again from the raw samples kept beside it, when they are there."""
    from scripts.benchmark.budget import read_samples, restaged

    results = json.loads(results_json.read_text())
    profiles = results_json.parent / "profiles"
    for i, budget in enumerate(results.get("budgets", [])):
        kept = profiles / f"budget-{budget['target']}-1-row-{budget['concurrency']}-clients.folded"
        if kept.exists():
            results["budgets"][i] = restaged(budget, read_samples(kept))
    results["notes"] = explain(results)
    write_report(results, results_json.parent)

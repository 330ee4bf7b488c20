"""The transformer's own arithmetic and the fused graph, timed in this process (no server, no network)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from scripts.benchmark.common import FUSED, MODEL, newest_version_dir
from transformer.store.bundle import bundle_dir


def kernel_microbenchmark(build: Path, repeats: int) -> dict[str, float]:
    """Median pre+post compute in this process (parse and validate, scale, segment, rank, encode): ``numpy``
    and ``sklearn`` for one row given by name; ``numpy_<rows>_<form>`` for 1 and 256 rows, by name and as lists."""
    from model.synthetic import make_synthetic
    from transformer.pipeline import Pipeline
    from transformer.protocols.v1 import encode_predictions, parse_instances
    from transformer.serving.metrics import VersionMetrics
    from transformer.store.bundle import load_bundle

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

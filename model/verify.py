"""Checks a model version must pass before it is published: what would refuse it later, found now.

* **The transformer's bundle checks** (``transformer.store.bundle.load_bundle``): the manifest, every
  listed file's sha256, the SavedModel the bundle belongs to, the library versions, the fitted numbers.
* **TF Serving's op set**: every op and op attribute of both graphs must be in TensorFlow 2.20's op
  registry (``model/tf-2.20-ops.json``, written by ``scripts/tf_op_registry.py`` under TensorFlow 2.20,
  the TensorFlow of the pinned TF Serving 2.20): training's newer TensorFlow may emit an op or attribute
  that TF Serving refuses to load ("NodeDef mentions attr ... not in Op").
* **Fused parity**: the fused model answers rows spread over the training range, and its edges, exactly as
  the bundle's steps around the SavedModel do (segments and item ids equal, numbers within 1e-5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REGISTRY = Path(__file__).with_name("tf-2.20-ops.json")
PARITY_ROWS = 2000
TOLERANCE = 1e-5


def registry(path: str | Path = REGISTRY) -> dict:
    return json.loads(Path(path).read_text())


def unknown_ops(saved_model_dir: str | Path, ops: dict[str, list[str]]) -> list[str]:
    """What in a SavedModel's graphs the given op registry does not know: ops, and attributes of ops."""
    from model.fuse import graph_nodes

    problems = set()
    for node in graph_nodes(saved_model_dir):
        if node.op not in ops:
            problems.add(f"op {node.op}")
            continue
        for attr in node.attr:
            if not attr.startswith("_") and attr not in ops[node.op]:
                problems.add(f"attribute {attr!r} of op {node.op}")
    return sorted(problems)


def parity_rows(feature_min, feature_max, n: int = PARITY_ROWS, seed: int = 0) -> np.ndarray:
    """Rows spread over the training range of each feature, plus its edges and just beyond them."""
    low, high = np.asarray(feature_min, dtype=np.float64), np.asarray(feature_max, dtype=np.float64)
    rows = np.random.default_rng(seed).uniform(low, high, size=(n, low.size))
    span = np.maximum(high - low, 1.0)
    return np.vstack([rows, low, high, low - span, high + span])


def fused_differences(version_dir: str | Path, fused_dir: str | Path, raw: np.ndarray) -> list[str]:
    """Where the fused model answers ``raw`` differently from the bundle's steps around the SavedModel."""
    import tensorflow as tf

    from model.gate import ranked_offline

    _, ranked = ranked_offline(version_dir, raw)
    fused = {k: v.numpy() for k, v in
             tf.saved_model.load(str(fused_dir)).signatures["serving_float64"](features=tf.constant(raw)).items()}
    problems = []
    if not np.array_equal(fused["segment"], ranked.labels):
        problems.append(f"segments differ on {int((fused['segment'] != ranked.labels).sum())} of {len(raw)} rows")
    if not np.allclose(fused["segment_distance"], ranked.distances, rtol=TOLERANCE, atol=TOLERANCE):
        problems.append("segment distances differ by more than 1e-5")
    # The fused model pads the slots the rules filter out (-1, or "" for text ids); compared as text.
    as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[object])
    pad = "-1" if np.asarray(ranked.item_ids).dtype.kind in "iu" else ""
    expected_ids = np.where(ranked.keep, as_text(ranked.item_ids), pad)
    if fused["item_ids"].shape != expected_ids.shape or not np.array_equal(as_text(fused["item_ids"]), expected_ids):
        problems.append("the items kept by the rules differ")
    elif not np.allclose(fused["item_scores"], np.where(ranked.keep, ranked.item_scores, -1.0),
                         rtol=TOLERANCE, atol=TOLERANCE):
        problems.append("item scores differ by more than 1e-5")
    return problems


@dataclass
class Verification:
    version: int
    checks: list[tuple[str, str]] = field(default_factory=list)  # (check, "ok" or what is wrong)

    @property
    def problems(self) -> list[str]:
        return [f"{name}: {what}" for name, what in self.checks if what != "ok"]

    def markdown(self) -> str:
        lines = [f"# Checks of version {self.version}: {'all pass' if not self.problems else 'FAILED'}", "",
                 "| check | result |", "| --- | --- |"]
        lines += [f"| {name} | {what} |" for name, what in self.checks]
        if self.problems:
            lines += ["", "Fails because:", *[f"- {p}" for p in self.problems]]
        return "\n".join(lines) + "\n"


def verify(version_dir: str | Path, fused_dir: str | Path | None = None) -> Verification:
    """Run every check on a model version folder (and its fused model, when there is one)."""
    from transformer.store.bundle import BundleError, load_bundle

    version_dir = Path(version_dir)
    try:
        bundle = load_bundle(version_dir)
    except BundleError as exc:
        result = Verification(version=-1)
        result.checks.append(("the transformer's bundle checks", str(exc)))
        return result
    result = Verification(version=bundle.version)
    result.checks.append(("the transformer's bundle checks", "ok"))
    ops = registry()
    for label, folder in (("embedder", version_dir), ("fused", fused_dir)):
        if folder is not None:
            unknown = unknown_ops(folder, ops["ops"])
            result.checks.append((f"{label} graph on TF Serving {ops['tensorflow'].rsplit('.', 1)[0]}",
                                  "ok" if not unknown else "unknown to its TensorFlow: " + ", ".join(unknown)))
    if fused_dir is not None:
        differences = fused_differences(version_dir, fused_dir, parity_rows(bundle.feature_min, bundle.feature_max))
        result.checks.append((f"fused parity on {PARITY_ROWS + 4} rows", "ok" if not differences else "; ".join(differences)))
    return result

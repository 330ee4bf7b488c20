"""Fused mode: the fitted scikit-learn steps compiled into TensorFlow ops, one SavedModel.

    python -m model.fuse      # the newest build/models/embedder/<v> (model + bundle) -> build/models/embedder-fused/<v>

The usual advice is ``tf.py_function`` around scikit-learn; TF Serving cannot
load such a graph (the Python callback is not saved) and the call holds the
GIL. Here each fitted estimator is translated into native ops, so stock TF
Serving answers alone, with no Python in the serving path:

* QuantileTransformer (uniform or normal output, any ``n_quantiles``): two
  ``searchsorted``-based linear interpolations that reproduce ``np.interp``,
  averaged like scikit-learn; its bounds (the absolute 1e-7 margin) and its
  clipping; all in float64, like the transformer's kernels.
* StandardScaler, MinMaxScaler, and a Pipeline of supported scalers.
* KMeans: nearest centroid (ties to the lowest index) and its distance.
* The rules: top-k by score (ties to the lower id), then the minimum score.

Signature ``serving_default``: ``features`` float32 [batch, F] (raw, unscaled) ->

    segment           int64   [batch]       nearest centroid
    segment_distance  float32 [batch]       Euclidean distance to it
    item_ids          int64   [batch, k]    best first, the items' own ids; -1 pads slots the rules
                                            filtered out (string [batch, k] padded with "" when the
                                            catalogue's ids are strings)
    item_scores       float32 [batch, k]    the matching scores; -1.0 in padded slots
    embedding         float32 [batch, D]

``serving_float64`` is the same with float64 input, for clients that send
JSON numbers and want them read at full precision (as the transformer does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from transformer.helpformat import HelpFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.fuse",
        description="Compile the fitted scikit-learn steps and the embedding model of one version into one "
                    "SavedModel that TF Serving serves alone.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=Path("build/models/embedder"),
                        help="the embedder's version folders (each with its transformer bundle)")
    parser.add_argument("--model-version", type=int, help="embedder version to compile (default: the newest)")
    parser.add_argument("--out", type=Path, default=Path("build/models/embedder-fused"),
                        help="where the fused model's version folders go")
    parser.add_argument("--version", type=int, help="version folder to write (default: the embedder's version)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # Run as a command: the arguments are read (and --help answered) before TensorFlow's import, which takes
    # seconds; main() below takes them.
    ARGS = parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import model  # noqa: F401,E402  (TensorFlow environment defaults)
from model.export import VersionExists, save_versioned
from transformer.store.bundle import PAD_ID, PAD_SCORE, PAD_TEXT_ID, Bundle, BundleError, Rules, load_bundle, model_versions
from transformer.steps.fitted import AffineStep, QuantileStep, UnsupportedEstimator, kmeans_centers, scaler_steps
from transformer.steps.kernels import BOUNDS_THRESHOLD
from scipy.special import ndtri

FUSED_SIGNATURE = "serving_default"
FLOAT64_SIGNATURE = "serving_float64"
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


def _interp_tables(xp: np.ndarray, fp: np.ndarray) -> dict[str, tf.Tensor]:
    """Knots [R, m], values [R, m] and the slope of each segment, computed once with numpy's arithmetic."""
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = (fp[:, 1:] - fp[:, :-1]) / (xp[:, 1:] - xp[:, :-1])
    slopes = np.where(np.isfinite(slopes), slopes, 0.0)  # repeated knots: never used (see below)
    return {"xp": tf.constant(xp), "fp": tf.constant(fp), "slope": tf.constant(slopes),
            "first": tf.constant(fp[:, :1]), "last": tf.constant(fp[:, -1:])}


def _interp(x: tf.Tensor, t: dict[str, tf.Tensor]) -> tf.Tensor:
    """``np.interp`` for each row of ``x`` [R, n] against its own knots (row r of the tables).

    As numpy: below the first knot -> the first value; at or above the last -> the last value;
    otherwise, with j the last knot <= x (so knot j+1 > x: never a repeated pair),
    ``slope[j] * (x - xp[j]) + fp[j]``, which is exactly ``fp[j]`` on a knot.
    """
    m = t["xp"].shape[1]
    j = tf.searchsorted(t["xp"], x, side="right") - 1
    jj = tf.clip_by_value(j, 0, m - 2)
    inner = tf.gather(t["slope"], jj, batch_dims=1) * (x - tf.gather(t["xp"], jj, batch_dims=1)) \
        + tf.gather(t["fp"], jj, batch_dims=1)
    edge = tf.where(j < 0, t["first"], t["last"])
    return tf.where((j >= 0) & (j < m - 1), inner, edge)


class _Quantile:
    def __init__(self, step: QuantileStep):
        q = step.quantiles.T  # [F, m]
        ref = step.references
        n_features = q.shape[0]
        self.normal = step.output_distribution == "normal"
        # Forward and backward interpolation in one pass: rows 0..F-1 interpolate x on the
        # quantiles, rows F..2F-1 interpolate -x on the reversed, negated quantiles.
        knots = np.vstack([q, -q[:, ::-1]])
        values = np.vstack([np.tile(ref, (n_features, 1)), np.tile(-ref[::-1], (n_features, 1))])
        self.tables = _interp_tables(knots, values)
        self.n_features = n_features
        self.low = tf.constant(q[:, 0])
        self.high = tf.constant(q[:, -1])
        self.clip_min = float(ndtri(BOUNDS_THRESHOLD - np.spacing(1)))
        self.clip_max = float(ndtri(1 - (BOUNDS_THRESHOLD - np.spacing(1))))

    def __call__(self, X: tf.Tensor) -> tf.Tensor:
        xt = tf.transpose(X)  # [F, batch]: one row of knots per feature
        both = _interp(tf.concat([xt, -xt], axis=0), self.tables)
        out = tf.transpose(0.5 * (both[: self.n_features] - both[self.n_features:]))
        if self.normal:
            lower = X - BOUNDS_THRESHOLD < self.low
            upper = X + BOUNDS_THRESHOLD > self.high
        else:
            lower = tf.equal(X, self.low)
            upper = tf.equal(X, self.high)
        out = tf.where(lower, tf.zeros_like(out), tf.where(upper, tf.ones_like(out), out))
        if self.normal:
            out = tf.clip_by_value(tf.math.ndtri(out), self.clip_min, self.clip_max)
        return out


class _Affine:
    def __init__(self, step: AffineStep):
        def const(v):
            return None if v is None else tf.constant(np.asarray(v, dtype=np.float64))

        self.subtract, self.divide, self.multiply, self.add = map(
            const, (step.subtract, step.divide, step.multiply, step.add))
        self.clip = None if step.clip is None else (float(step.clip[0]), float(step.clip[1]))

    def __call__(self, X: tf.Tensor) -> tf.Tensor:
        if self.subtract is not None:
            X = X - self.subtract
        if self.divide is not None:
            X = X / self.divide
        if self.multiply is not None:
            X = X * self.multiply
        if self.add is not None:
            X = X + self.add
        if self.clip is not None:
            X = tf.clip_by_value(X, self.clip[0], self.clip[1])
        return X


def compile_scaler(estimator: Any):
    """A TF function (float64 [batch, F] -> float64) equal to ``estimator.transform``."""
    return compile_steps(scaler_steps(estimator))


def compile_steps(steps) -> Any:
    """A TF function (float64 [batch, F] -> float64) applying a scaler's fitted steps (``transformer/steps/fitted.py``)."""
    ops = [_Quantile(s) if isinstance(s, QuantileStep) else _Affine(s) for s in steps]

    def apply(X: tf.Tensor) -> tf.Tensor:
        for op in ops:
            X = op(X)
        return X

    return apply


class _NearestCentroid:
    def __init__(self, centers: np.ndarray):
        centers = np.asarray(centers, dtype=np.float64)
        self.centers = tf.constant(centers)
        self.centers_t = tf.constant(np.ascontiguousarray(centers.T))
        self.half_sq_norms = tf.constant(0.5 * np.einsum("ij,ij->i", centers, centers))
        self.k = centers.shape[0]

    def __call__(self, E: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """float64 embeddings [batch, D] -> (labels int64, distances float64)."""
        d = self.half_sq_norms - tf.matmul(E, self.centers_t)
        best = tf.reduce_min(d, axis=1, keepdims=True)
        index = tf.range(self.k, dtype=tf.int64)
        labels = tf.reduce_min(tf.where(tf.equal(d, best), index, tf.constant(self.k, tf.int64)), axis=1)  # ties: lowest
        diff = E - tf.gather(self.centers, labels)
        return labels, tf.sqrt(tf.reduce_sum(diff * diff, axis=1))


def compile_segmenter(estimator: Any) -> _NearestCentroid:
    try:
        return _NearestCentroid(kmeans_centers(estimator))
    except UnsupportedEstimator:
        raise UnsupportedEstimator(f"cannot compile {type(estimator).__name__} into the graph; "
                                   "supported segmenters: KMeans") from None


def compile_rules(rules: Rules, n_items: int, item_ids: np.ndarray | None = None):
    """scores float32 [batch, n_items] -> (ids [batch, k], scores float32 [batch, k]), padded.

    The ids are the catalogue's (``item_ids``: int64 or text, looked up in a constant table) or,
    without a catalogue, the item indices.
    """
    k = min(rules.top_k, n_items)
    threshold = np.float32(rules.min_score)
    text = item_ids is not None and item_ids.dtype.kind == "U"
    table = None if item_ids is None else tf.constant(item_ids if text else item_ids.astype(np.int64))
    pad = tf.constant(PAD_TEXT_ID) if text else tf.constant(PAD_ID, tf.int64)

    def apply(scores: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        best, index = tf.math.top_k(scores, k=k, sorted=True)  # equal scores: lower index first
        keep = best >= threshold
        ids = tf.cast(index, tf.int64) if table is None else tf.gather(table, index)
        return tf.where(keep, ids, pad), tf.where(keep, best, tf.constant(PAD_SCORE, tf.float32))

    return apply


def _steps_width(steps) -> int | None:
    """How many features the first scaler step was fitted on (None when it holds no arrays)."""
    step = steps[0]
    if isinstance(step, QuantileStep):
        return step.quantiles.shape[1]
    arrays = [a for a in (step.subtract, step.divide, step.multiply, step.add) if a is not None]
    return arrays[0].shape[0] if arrays else None


class FusedPipeline(tf.Module):
    """Scaling, the embedding model, segmenting and the rules in one graph."""

    def __init__(self, bundle: Bundle, embedder: Any):
        super().__init__(name="embedder_fused")
        spec = bundle.model
        signature = embedder.signatures[spec.signature_name]
        _, inputs = signature.structured_input_signature
        model_input = inputs[spec.input_name]
        if model_input.shape.rank != 2 or model_input.shape[1] != len(bundle.feature_names):
            raise UnsupportedEstimator(
                f"the artifacts describe {len(bundle.feature_names)} features but the model's input "
                f"'{spec.input_name}' has shape {model_input.shape.as_list()}: they were not trained together"
            )
        n_in = _steps_width(bundle.fitted.scaler)
        if n_in not in (None, len(bundle.feature_names)):
            raise UnsupportedEstimator(
                f"the scaler was fitted on {n_in} features, the bundle lists {len(bundle.feature_names)}"
            )
        self.embedder = embedder  # tracked: its variables and functions are saved with this module
        self._model = signature
        self.spec = spec
        self.scale = compile_steps(bundle.fitted.scaler)
        self.segment = _NearestCentroid(bundle.fitted.centers)
        self.rules = compile_rules(bundle.rules, spec.n_items, bundle.fitted.item_ids)
        n = len(bundle.feature_names)
        self.serve = tf.function(self._serve_float32,
                                 input_signature=[tf.TensorSpec([None, n], tf.float32, name="features")])
        self.serve_float64 = tf.function(self._serve_float64,
                                         input_signature=[tf.TensorSpec([None, n], tf.float64, name="features")])

    def _run(self, raw64: tf.Tensor) -> dict[str, tf.Tensor]:
        scaled = tf.cast(self.scale(raw64), tf.float32)
        outputs = self._model(**{self.spec.input_name: scaled})
        embedding = outputs[self.spec.embedding_output]
        labels, distances = self.segment(tf.cast(embedding, tf.float64))
        item_ids, item_scores = self.rules(outputs[self.spec.scores_output])
        return {
            "segment": labels,
            "segment_distance": tf.cast(distances, tf.float32),
            "item_ids": item_ids,
            "item_scores": item_scores,
            "embedding": embedding,
        }

    def _serve_float32(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._run(tf.cast(features, tf.float64))

    def _serve_float64(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._run(features)


def graph_nodes(saved_model_dir: str | Path) -> list:
    """Every op node of a SavedModel: its graphs and all their library functions (a node that calls a
    library function by name is left out: the function's own nodes are listed)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    nodes = []
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library.function
        functions = {f.signature.name for f in library}
        for node in [*meta_graph.graph_def.node, *(n for f in library for n in f.node_def)]:
            if node.op not in functions:
                nodes.append(node)
    return nodes


def graph_ops(saved_model_dir: str | Path) -> set[str]:
    """Every op type in a SavedModel: the graphs and all their library functions."""
    return {node.op for node in graph_nodes(saved_model_dir)}


def export_fused(version_dir: str | Path, out_dir: str | Path, version: int | None = None) -> Path:
    """Compile an embedder version folder (SavedModel + its bundle) into ``out_dir/<version>``.

    The fused model takes the embedder's version number by default, so both modes name a
    model the same way.
    """
    version_dir = Path(version_dir)
    bundle = load_bundle(version_dir)
    pipeline = FusedPipeline(bundle, tf.saved_model.load(str(version_dir)))
    target = save_versioned(
        pipeline, out_dir, version if version is not None else bundle.version,
        {FUSED_SIGNATURE: pipeline.serve, FLOAT64_SIGNATURE: pipeline.serve_float64},
    )
    forbidden = graph_ops(target) & FORBIDDEN_OPS
    if forbidden:  # cannot happen with the compilers above; a guard for future steps
        raise UnsupportedEstimator(f"the fused graph contains {sorted(forbidden)}, which TF Serving cannot run")
    return target


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args if args is not None else parse_args(argv)
    versions = model_versions(args.model_dir)
    if not versions:
        print(f"error: no version folders under {args.model_dir}; run `python -m model.train` first",
              file=sys.stderr)
        return 2
    try:
        target = export_fused(args.model_dir / str(args.model_version or versions[-1]), args.out, args.version)
    except (BundleError, UnsupportedEstimator, VersionExists) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}  (signatures {FUSED_SIGNATURE}: float32 input, {FLOAT64_SIGNATURE}: float64 input)")
    return 0


if __name__ == "__main__":
    sys.exit(main(args=ARGS))

"""Export the embedding model as a SavedModel in TF Serving's folder layout.

``<base>/<name>/<version>/saved_model.pb`` plus ``variables/``: the layout TF
Serving (and ``python -m model.standin``) loads, highest version first. The
transformer's bundle is written into the same folder before it is renamed into
place (``assets.extra/transformer-bundle/``), and a version, once written, is
never replaced. The graph
is written in plain TensorFlow ops from :class:`model.embedder.EmbedderWeights`,
so no Keras or Python code is needed to serve it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from model.embedder import EmbedderWeights

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "features"
EMBEDDING_OUTPUT = "embedding"
SCORES_OUTPUT = "scores"
CANDIDATES_SIGNATURE = "candidates"
CANDIDATE_IDS_OUTPUT = "candidate_ids"
CANDIDATE_SCORES_OUTPUT = "candidate_scores"


class EmbedderGraph(tf.Module):
    """The user tower and item scoring as TensorFlow ops over tf.Variables."""

    def __init__(self, weights: EmbedderWeights, n_candidates: int = 10):
        super().__init__(name="embedder")
        self.n_candidates = min(n_candidates, weights.n_items)
        self.dense = [
            (tf.Variable(k, trainable=False, name=f"dense_{i}_kernel"), tf.Variable(b, trainable=False, name=f"dense_{i}_bias"))
            for i, (k, b) in enumerate(weights.dense)
        ]
        self.projection_kernel = tf.Variable(weights.projection[0], trainable=False, name="projection_kernel")
        self.projection_bias = tf.Variable(weights.projection[1], trainable=False, name="projection_bias")
        items = weights.item_embeddings / np.sqrt(
            np.maximum(np.sum(weights.item_embeddings**2, axis=1, keepdims=True), 1e-12)
        )
        self.item_matrix = tf.Variable(items.T.astype(np.float32), trainable=False, name="item_matrix")
        self.item_bias = tf.Variable(weights.item_bias, trainable=False, name="item_bias")
        self.temperature = tf.Variable(np.float32(np.exp(weights.log_temperature)), trainable=False, name="temperature")
        self.n_features = weights.n_features
        spec = [tf.TensorSpec([None, self.n_features], tf.float32, name=INPUT_NAME)]
        self.serve = tf.function(self.embed_and_score, input_signature=spec)
        self.serve_candidates = tf.function(self.best_candidates, input_signature=spec)

    def embed(self, features: tf.Tensor) -> tf.Tensor:
        """features (batch, F) float32, already scaled -> embedding (batch, D)."""
        h = features
        for kernel, bias in self.dense:
            h = tf.nn.relu(tf.matmul(h, kernel) + bias)
        return tf.math.l2_normalize(tf.matmul(h, self.projection_kernel) + self.projection_bias, axis=1)

    def embed_and_score(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        """features (batch, F) float32, already scaled -> embedding (batch, D), scores (batch, n_items)."""
        embedding = self.embed(features)
        logits = self.temperature * tf.matmul(embedding, self.item_matrix) + self.item_bias
        return {EMBEDDING_OUTPUT: embedding, SCORES_OUTPUT: tf.math.sigmoid(logits)}

    def best_candidates(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        """The embedding and the ``n_candidates`` best items, best first (equal scores: lower id first).

        The answer's size does not grow with the catalogue, unlike every score.
        """
        out = self.embed_and_score(features)
        scores, ids = tf.math.top_k(out[SCORES_OUTPUT], k=self.n_candidates, sorted=True)
        return {EMBEDDING_OUTPUT: out[EMBEDDING_OUTPUT], CANDIDATE_IDS_OUTPUT: tf.cast(ids, tf.int64),
                CANDIDATE_SCORES_OUTPUT: scores}


    def candidates_in_batches(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n, D), the ``n_candidates`` best item indices (n, k)) of scaled features X, through
        the traced ``serve_candidates`` a batch at a time: memory holds one batch's scores (at most 2**25
        floats), never n x n_items."""
        batch = max(64, 2**25 // int(self.item_bias.shape[0]))
        parts = [self.serve_candidates(tf.constant(X[i:i + batch])) for i in range(0, len(X), batch)]
        return (np.concatenate([p[EMBEDDING_OUTPUT].numpy() for p in parts]),
                np.concatenate([p[CANDIDATE_IDS_OUTPUT].numpy() for p in parts]))


class VersionExists(FileExistsError):
    """Training never overwrites a model version: versions are immutable once written."""


def next_version(*model_dirs: Path) -> int:
    """One more than the highest numeric version folder in any of ``model_dirs`` (1 for a new model).

    Training passes the embedder's and the fused model's folders, so a number stays unused
    in both, and a version removed from one (a rollback) is not reused by the next training.
    """
    versions = [int(p.name) for d in model_dirs for p in Path(d).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def save_versioned(module: tf.Module, model_dir: str | Path, version: int, signatures: dict,
                   complete: Callable[[Path], object] | None = None) -> Path:
    """Write ``model_dir/version`` atomically: TF Serving never sees a half-written version.

    ``complete(staging)`` adds files to the version folder before it is renamed into place (the
    transformer's bundle goes there), so the model and everything made from it appear together.
    An existing version is never replaced: a served version must not change under its number.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        raise VersionExists(f"{target} exists already: model versions are never overwritten; train into "
                            f"the next free version (the default) or remove {target} yourself")
    # A name TF Serving ignores (not all digits) while it is being written.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
        if complete is not None:
            complete(staging)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)  # mkdtemp makes it 0700; TF Serving may run as another user
        os.rename(staging, target)  # fails rather than replaces if the version appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_embedder(weights: EmbedderWeights, model_dir: str | Path, version: int, n_candidates: int,
                    complete: Callable[[Path], object] | None = None) -> Path:
    """Signatures ``serving_default`` (embedding, every score) and ``candidates`` (embedding, best items).

    ``complete`` writes the version's bundle into the staging folder (see :func:`save_versioned`).
    """
    graph = EmbedderGraph(weights, n_candidates)
    return save_versioned(graph, model_dir, version,
                          {SIGNATURE_NAME: graph.serve, CANDIDATES_SIGNATURE: graph.serve_candidates}, complete)

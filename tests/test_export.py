"""The exported SavedModel against the trained model itself.

Every other check of scores (fused parity, the transformer's recomputation, training quality) reads them back
through the exported SavedModel, so a mistake in how trained weights become the serving graph would be wrong the
same way everywhere and pass them all. Here the SavedModel, loaded as TF Serving loads it, answers the same rows as
the Keras layers training optimised, computed the way the training step computes them (model/embedder.py), and as
the weights' own arithmetic in numpy: for every signature."""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Keras layers as training builds them, every weight set to something a bug cannot hide behind (no zero
    biases, a temperature other than the initial one), their extracted weights, and the exported version."""
    from model.embedder import build_layers, extract_weights
    from model.export import export_embedder

    rng = np.random.default_rng(21)
    hidden, projection, items = build_layers(n_features=6, n_items=40, embedding_dim=8, hidden=(16, 12), seed=3)
    for layer in (*hidden, projection):
        layer.bias.assign(rng.normal(scale=0.3, size=layer.bias.shape).astype(np.float32))
    items.item_bias.assign(rng.normal(scale=0.5, size=40).astype(np.float32))
    items.item_embeddings.assign(rng.normal(scale=2.0, size=(40, 8)).astype(np.float32))  # not unit length
    items.log_temperature.assign(np.float32(np.log(3.7)))
    weights = extract_weights(hidden, projection, items)
    folder = export_embedder(weights, tmp_path_factory.mktemp("export") / "embedder", 1, n_candidates=7)
    features = rng.normal(size=(64, 6)).astype(np.float32)
    return hidden, projection, items, weights, tf.saved_model.load(str(folder)), features


def keras_forward(hidden, projection, items, features):
    """What the training step computes from the layers (model/embedder.py: ``step`` and ``logits``)."""
    h = tf.constant(features)
    for layer in hidden:
        h = layer(h)
    embedding = tf.math.l2_normalize(projection(h), axis=1)
    item_matrix = tf.math.l2_normalize(items.item_embeddings, axis=1)
    logits = tf.exp(items.log_temperature) * tf.matmul(embedding, item_matrix, transpose_b=True) + items.item_bias
    return embedding.numpy(), tf.math.sigmoid(logits).numpy()


def numpy_forward(weights, features):
    """The same from the extracted weights, in float64 numpy: an arithmetic of its own."""
    h = features.astype(np.float64)
    for kernel, bias in weights.dense:
        h = np.maximum(h @ kernel + bias, 0.0)
    z = h @ weights.projection[0] + weights.projection[1]
    embedding = z / np.linalg.norm(z, axis=1, keepdims=True)
    items = weights.item_embeddings / np.linalg.norm(weights.item_embeddings, axis=1, keepdims=True)
    logits = np.exp(weights.log_temperature) * embedding @ items.T + weights.item_bias
    return embedding, 1.0 / (1.0 + np.exp(-logits))


def test_serving_default_answers_what_the_trained_layers_compute(trained):
    hidden, projection, items, weights, saved, features = trained
    out = saved.signatures["serving_default"](features=tf.constant(features))
    embedding, scores = keras_forward(hidden, projection, items, features)
    np.testing.assert_allclose(out["embedding"].numpy(), embedding, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=0, atol=2e-6)
    arithmetic_embedding, arithmetic_scores = numpy_forward(weights, features)
    np.testing.assert_allclose(out["embedding"].numpy(), arithmetic_embedding, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out["scores"].numpy(), arithmetic_scores, rtol=0, atol=2e-6)
    assert np.ptp(scores) > 0.5  # the probes spread over the scores: a constant answer would not pass


def test_the_candidates_signature_answers_the_best_items_of_those_scores(trained):
    hidden, projection, items, weights, saved, features = trained
    out = saved.signatures["candidates"](features=tf.constant(features))
    embedding, scores = keras_forward(hidden, projection, items, features)
    np.testing.assert_allclose(out["embedding"].numpy(), embedding, rtol=0, atol=2e-6)
    ids, best = out["candidate_ids"].numpy(), out["candidate_scores"].numpy()
    assert ids.shape == best.shape == (len(features), 7)
    # Best first, equal scores to the lower id: a stable sort of the negated scores.
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(best, np.take_along_axis(scores, expected, axis=1), rtol=0, atol=2e-6)


def test_candidates_in_batches_answers_every_row_as_the_signature_does(trained):
    """What training's quality report and the segments are computed with: every row, the first included."""
    from model.export import EmbedderGraph

    _, _, _, weights, saved, features = trained
    embedding, ids = EmbedderGraph(weights, n_candidates=7).candidates_in_batches(features)
    out = saved.signatures["candidates"](features=tf.constant(features))
    assert embedding.shape == (len(features), 8) and ids.shape == (len(features), 7)
    np.testing.assert_allclose(embedding, out["embedding"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ids, out["candidate_ids"].numpy())


def test_a_version_is_written_whole_readable_by_another_user_and_numbered_after_every_other(trained, tmp_path):
    import stat

    from model.export import VersionExists, export_embedder, next_version

    weights = trained[3]
    nested = tmp_path / "store" / "models" / "embedder"  # parents made as needed
    umask = os.umask(0o077)  # a strict umask (a pod's, say): only the export's own chmod opens the folders
    try:
        folder = export_embedder(weights, nested, 3, n_candidates=5)
    finally:
        os.umask(umask)
    for path in (folder, folder / "variables"):  # TF Serving may run as another user
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    assert sorted(p.name for p in nested.iterdir()) == ["3"]  # no staging folder left
    fused = tmp_path / "store" / "models" / "embedder-fused"
    (fused / "7").mkdir(parents=True)
    (fused / ".staging-8-x").mkdir()  # a name TF Serving ignores: not a version
    assert next_version(nested, fused) == 8
    assert next_version(tmp_path / "none", tmp_path / "nothing") == 1
    with pytest.raises(VersionExists, match="exists already"):
        export_embedder(weights, nested, 3, n_candidates=5)


def test_a_failed_export_leaves_no_staging_folder_and_raises_its_own_error(trained, tmp_path):
    import shutil

    from model.export import export_embedder

    def fail(staging):
        raise ValueError("the bundle could not be written")

    with pytest.raises(ValueError, match="the bundle could not be written"):
        export_embedder(trained[3], tmp_path / "a", 1, n_candidates=5, complete=fail)
    assert list((tmp_path / "a").iterdir()) == []

    def fail_after_removing(staging):  # the clean-up finds nothing to remove: the cause still comes out
        shutil.rmtree(staging)
        raise ValueError("the disk went away")

    with pytest.raises(ValueError, match="the disk went away"):
        export_embedder(trained[3], tmp_path / "b", 1, n_candidates=5, complete=fail_after_removing)

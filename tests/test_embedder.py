"""The training loss itself, against its definition computed apart (model/embedder.py's docstring):

    per user u with items P:  sum_i softplus(l_ui) / n  +  sum_{i in P} (w_ui softplus(-l_ui) - softplus(l_ui)) / n

With a learning rate of zero the weights stay what they were built as, so the loss an epoch reports must be that
mean over users, computed here in numpy from the weights training returns. Then the biases' start at the items'
log-odds, and a few real epochs that lower the loss."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from model.input_pipeline import write_shards
    from model.synthetic import make_synthetic

    data = make_synthetic(n_users=300, n_items=25, seed=8)
    rng = np.random.default_rng(1)
    weighted = data.__class__(**{**data.__dict__, "weights": rng.uniform(0.5, 3.0, data.n_interactions)
                                 .astype(np.float32)})
    X = rng.normal(size=(data.n_users, data.features.shape[1])).astype(np.float32)
    files = write_shards(X, weighted, tmp_path_factory.mktemp("shards"), seed=0)
    return weighted, X, files


def full_loss(weights, X, data) -> float:
    """The documented loss of these weights on every user, in float64 numpy."""
    h = X.astype(np.float64)
    for kernel, bias in weights.dense:
        h = np.maximum(h @ kernel + bias, 0.0)
    z = h @ weights.projection[0] + weights.projection[1]
    # tf.math.l2_normalize: x / sqrt(max(|x|^2, 1e-12)), so a row of zeros (every unit of a small tower dead) stays 0
    embedding = z / np.sqrt(np.maximum((z * z).sum(axis=1, keepdims=True), 1e-12))
    items = weights.item_embeddings / np.sqrt(np.maximum((weights.item_embeddings ** 2).sum(axis=1, keepdims=True),
                                                        1e-12))
    logits = np.exp(weights.log_temperature) * embedding @ items.T + weights.item_bias
    softplus = np.logaddexp(0.0, logits)
    n = data.n_items
    per_user = softplus.sum(axis=1) / n
    for u in range(data.n_users):
        own = data.items_of(u)
        w = data.weights[data.indptr[u]:data.indptr[u + 1]]
        per_user[u] += (w * np.logaddexp(0.0, -logits[u, own]) - softplus[u, own]).sum() / n
    return float(per_user.mean())


def train(files, data, *, epochs, learning_rate, prior=None, negatives=64, batch_size=64, **more):
    from model.embedder import train_embedder

    losses = []
    weights = train_embedder(files, n_features=data.features.shape[1], n_items=data.n_items, weighted=True,
                             embedding_dim=6, hidden=(10,), epochs=epochs, batch_size=batch_size,
                             negatives=negatives, learning_rate=learning_rate, item_prior=prior, seed=2,
                             progress=lambda epoch, logs: losses.append(logs["loss"]), **more)
    return weights, losses


def test_the_reported_loss_is_the_documented_loss_of_the_weights(shards):
    data, X, files = shards
    prior = data.item_counts() / data.n_users
    prior[:2] = 0.0, 1.0  # an item no one chose and one everyone chose: their log-odds are infinite
    weights, losses = train(files, data, epochs=2, learning_rate=0.0, prior=prior)
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)  # nothing moved
    assert losses[0] == pytest.approx(full_loss(weights, X, data), rel=2e-5)
    # The biases start at each item's log-odds among the users, clipped away from 0 and 1.
    p = np.clip(prior, 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(weights.item_bias, np.log(p / (1 - p)), rtol=0, atol=1e-5)
    assert weights.item_bias[0] == pytest.approx(np.log(1e-6), abs=1e-3)
    assert weights.log_temperature == pytest.approx(np.log(5.0), rel=1e-6)  # the documented start


def test_sampled_negatives_estimate_the_loss_over_the_whole_catalogue_without_bias(shards):
    """Fewer negatives than items: each step draws its negatives uniformly from every item, so the losses
    reported over many epochs average to the full loss. Item 0 scores far above the rest (everyone chose it),
    so a draw that never picked it, or picked one item too often, would be off by a third of the loss."""
    data, X, files = shards
    prior = np.full(data.n_items, 0.2)
    prior[0] = 1.0
    weights, losses = train(files, data, epochs=40, learning_rate=0.0, prior=prior, negatives=5)
    exact = full_loss(weights, X, data)
    assert np.std(losses) > 0  # really sampled
    assert np.mean(losses) == pytest.approx(exact, rel=0.1), (np.mean(losses), exact)


@pytest.mark.parametrize("distributed", [False, True])
def test_an_epoch_of_one_user_reports_that_users_loss(shards, tmp_path, distributed):
    import tensorflow as tf

    from model.input_pipeline import write_shards

    data, X, _ = shards
    one = data.subset(np.array([5]))
    files = write_shards(X[5:6], one, tmp_path, seed=0)
    more = dict(strategy=tf.distribute.MultiWorkerMirroredStrategy(), steps_per_epoch=1) if distributed else {}
    weights, losses = train(files, one, epochs=1, learning_rate=0.0, batch_size=1, **more)
    assert losses[0] == pytest.approx(full_loss(weights, X[5:6], one), rel=2e-5)


def test_one_worker_under_a_distribution_strategy_reports_the_same_loss(shards):
    """The distributed epoch (steps counted, losses summed over workers) on a strategy of one worker: with nothing
    learnt, an epoch of exactly every user reports the documented loss of the weights."""
    import tensorflow as tf

    data, X, files = shards
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    weights, losses = train(files, data, epochs=2, learning_rate=0.0, batch_size=60, strategy=strategy,
                            steps_per_epoch=data.n_users // 60)
    assert losses[0] == pytest.approx(full_loss(weights, X, data), rel=2e-5)


def test_a_distribution_strategy_needs_the_steps_of_an_epoch(shards):
    data, _, files = shards
    with pytest.raises(ValueError, match="training under a tf.distribute strategy needs steps_per_epoch "
                                         r"\(the same on every worker\)"):
        train(files, data, epochs=1, learning_rate=0.0, strategy=object())


def test_the_weights_know_their_sizes():
    from model.embedder import EmbedderWeights

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    weights = EmbedderWeights(dense=((zeros(6, 5), zeros(5)), (zeros(5, 4), zeros(4))),
                              projection=(zeros(4, 3), zeros(3)), item_embeddings=zeros(7, 3), item_bias=zeros(7),
                              log_temperature=0.0)
    assert (weights.n_features, weights.embedding_dim, weights.n_items) == (6, 3, 7)
    assert weights.n_parameters == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3 + 7 * 3 + 7 + 1
    linear = EmbedderWeights(dense=(), projection=(zeros(2, 3), zeros(3)), item_embeddings=zeros(4, 3),
                             item_bias=zeros(4), log_temperature=0.0)
    assert (linear.n_features, linear.embedding_dim, linear.n_parameters) == (2, 3, 2 * 3 + 3 + 4 * 3 + 4 + 1)


def test_training_lowers_the_loss_it_reports(shards):
    data, X, files = shards
    weights, losses = train(files, data, epochs=6, learning_rate=0.01)
    assert losses[-1] < losses[0] * 0.9, losses
    assert full_loss(weights, X, data) < losses[0]

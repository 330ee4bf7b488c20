"""The two-tower embedding model: a Keras user tower trained against item embeddings.

User tower: scaled features -> dense layers -> L2-normalised embedding.
Item side:  one embedding and one bias per item.
Scores:     sigmoid(temperature * <user, item / |item|> + bias), one per item.

Training uses Keras layers and optimiser in a loop over sparse interactions
(:func:`train_embedder`); serving uses :class:`EmbedderWeights`, the trained numbers
taken out of Keras, so the exported graph is plain TensorFlow ops that any TF
Serving loads (see ``model/export.py``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbedderWeights:
    """Everything the forward pass needs, as float32 numpy arrays."""

    dense: tuple[tuple[np.ndarray, np.ndarray], ...]  # hidden (kernel, bias), relu
    projection: tuple[np.ndarray, np.ndarray]  # (kernel, bias) to the embedding
    item_embeddings: np.ndarray  # (n_items, D), not normalised
    item_bias: np.ndarray  # (n_items,)
    log_temperature: float

    @property
    def n_features(self) -> int:
        return self.dense[0][0].shape[0] if self.dense else self.projection[0].shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.projection[0].shape[1]

    @property
    def n_items(self) -> int:
        return self.item_embeddings.shape[0]

    @property
    def n_parameters(self) -> int:
        """Trained numbers: what every step's gradient all-reduce carries across workers (float32 each)."""
        arrays = [a for pair in (*self.dense, self.projection) for a in pair] + [self.item_embeddings, self.item_bias]
        return int(sum(a.size for a in arrays)) + 1  # + the temperature


def build_layers(n_features: int, n_items: int, embedding_dim: int, hidden: tuple[int, ...], seed: int):
    """The user tower's Keras layers (hidden, projection) and the item weights, built and seeded."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    class ItemWeights(layers.Layer):
        """One embedding and one bias per item, and the score temperature (log)."""

        def __init__(self, n_items: int, **kwargs):
            super().__init__(**kwargs)
            self.n_items = n_items

        def build(self, input_shape):
            self.item_embeddings = self.add_weight(
                shape=(self.n_items, input_shape[-1]), initializer="glorot_normal", name="item_embeddings"
            )
            self.item_bias = self.add_weight(shape=(self.n_items,), initializer="zeros", name="item_bias")
            self.log_temperature = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(np.log(5.0)), name="log_temperature"
            )

    hidden_layers = [layers.Dense(units, activation="relu", name=f"user_dense_{i}") for i, units in enumerate(hidden)]
    projection = layers.Dense(embedding_dim, name="user_projection")
    item_weights = ItemWeights(n_items, name="items")
    width = n_features
    for layer in hidden_layers:
        layer.build((None, width))
        width = layer.units
    projection.build((None, width))
    item_weights.build((None, embedding_dim))
    return hidden_layers, projection, item_weights


def extract_weights(hidden_layers, projection, item_scores) -> EmbedderWeights:
    def f32(value):
        return np.asarray(value, dtype=np.float32)

    return EmbedderWeights(
        dense=tuple((f32(layer.kernel.numpy()), f32(layer.bias.numpy())) for layer in hidden_layers),
        projection=(f32(projection.kernel.numpy()), f32(projection.bias.numpy())),
        item_embeddings=f32(item_scores.item_embeddings.numpy()),
        item_bias=f32(item_scores.item_bias.numpy()),
        log_temperature=float(item_scores.log_temperature.numpy()),
    )


def train_embedder(
    files: list,
    *,
    n_features: int,
    n_items: int,
    weighted: bool,
    embedding_dim: int,
    epochs: int,
    batch_size: int,
    negatives: int,
    seed: int,
    hidden: tuple[int, ...] = (64, 64),
    learning_rate: float = 3e-3,
    item_prior: np.ndarray | None = None,
    progress=None,
    strategy=None,
    steps_per_epoch: int | None = None,
) -> EmbedderWeights:
    """Train from the example shards of ``model/input_pipeline.py`` (scaled features, sparse items).

    The loss is the mean binary cross-entropy over the whole catalogue, as if every user had a
    multi-hot row of ``n_items`` targets, computed without that row: for user u with items P,

        sum_i softplus(l_ui) / n  +  sum_{i in P} (w_ui * softplus(-l_ui) - softplus(l_ui)) / n

    (``softplus(l)`` is -log(1 - sigmoid(l)), the loss of a negative). When the catalogue is
    larger than ``negatives``, the first sum is estimated from ``negatives`` items drawn
    uniformly per batch, an unbiased estimate: the optimum, and so the scores' meaning as
    probabilities that the rules threshold, stay those of the full loss. Smaller catalogues use
    every item, which is exactly the dense loss.

    The sizes, epochs, batch and seed have no defaults here: ``model/options.py`` holds the one set users
    see, and training passes each. The temperature starts at 5 (``build_layers``) and is learnt.

    Args:
        item_prior: the share of training users who chose each item. Each item's bias starts at its
            log-odds, the optimum of the loss for a model of biases alone (the popularity baseline),
            so training starts from popularity instead of learning it: with sampled negatives a
            rare item is seen in few steps, and from zero biases 100,000 users x 20,000 items ended
            below the popularity baseline (recall@10 0.007 against 0.009).
        progress: optional callable(epoch, logs) called after every epoch.
        strategy: a ``tf.distribute.MultiWorkerMirroredStrategy`` to train under (see ``model/distributed.py``):
            each worker reads the shards its ``InputContext`` assigns it, in batches of
            ``batch_size / workers`` users; the gradients of each step are summed over the workers (Keras'
            optimiser does the all-reduce) and divided by the step's users on all of them, so a step is
            the step one process would take on the whole ``batch_size`` users.
        steps_per_epoch: with ``strategy``, the steps every worker takes per epoch. Workers must take the
            same number of steps (each step is an all-reduce), so each one's examples repeat and an epoch is
            counted in steps rather than as a pass over its files.
    """
    import keras
    import tensorflow as tf

    from model.input_pipeline import training_dataset

    distributed = strategy is not None
    if distributed and not steps_per_epoch:
        raise ValueError("training under a tf.distribute strategy needs steps_per_epoch (the same on every worker)")
    with strategy.scope() if distributed else contextlib.nullcontext():
        # Under the strategy, every variable (the optimiser's and the generator's too) is mirrored on
        # every worker and starts from the same seeded values.
        hidden_layers, projection, item_scores = build_layers(n_features, n_items, embedding_dim, hidden, seed)
        if item_prior is not None:
            p = np.clip(np.asarray(item_prior, dtype=np.float64), 1e-6, 1 - 1e-6)
            item_scores.item_bias.assign(np.log(p / (1 - p)).astype(np.float32))
        variables = [v for layer in (*hidden_layers, projection, item_scores) for v in layer.trainable_variables]
        optimizer = keras.optimizers.Adam(learning_rate)
        optimizer.build(variables)
        draw = tf.random.Generator.from_seed(seed)  # in a strategy's scope: one stream per worker
    sampled = negatives < n_items
    inv_n = tf.constant(1.0 / n_items, tf.float32)

    def logits(embedding, item_matrix, item_bias):
        return tf.exp(item_scores.log_temperature) * tf.matmul(embedding, item_matrix, transpose_b=True) + item_bias

    @tf.autograph.experimental.do_not_convert  # plain ops: AutoGraph would only add tracing time
    def step(features, items, weights):
        with tf.GradientTape() as tape:
            h = features
            for layer in hidden_layers:
                h = layer(h)
            embedding = tf.math.l2_normalize(projection(h), axis=1)
            item_matrix = tf.math.l2_normalize(item_scores.item_embeddings, axis=1)
            if sampled:
                negative_ids = draw.uniform([negatives], 0, n_items, dtype=tf.int32)
                negative = logits(embedding, tf.gather(item_matrix, negative_ids),
                                  tf.gather(item_scores.item_bias, negative_ids))
            else:
                negative = logits(embedding, item_matrix, item_scores.item_bias)
            all_items = tf.reduce_mean(tf.math.softplus(negative), axis=1)
            rows, positives = items.value_rowids(), items.flat_values
            positive = (tf.exp(item_scores.log_temperature)
                        * tf.reduce_sum(tf.gather(embedding, rows) * tf.gather(item_matrix, positives), axis=1)
                        + tf.gather(item_scores.item_bias, positives))
            correction = weights.flat_values * tf.math.softplus(-positive) - tf.math.softplus(positive)
            per_user = all_items + inv_n * tf.math.unsorted_segment_sum(correction, rows, tf.shape(features)[0])
            loss = tf.reduce_sum(per_user)
        # The gradient of the batch mean; the sum is returned for the epoch's mean. Distributed, the batch is
        # every worker's users, and Keras' optimiser sums the gradients over the workers.
        size = tf.cast(tf.shape(features)[0], tf.float32)
        step_users = (tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, size)
                      if distributed else size)
        optimizer.apply_gradients(zip([g / step_users for g in tape.gradient(loss, variables)], variables))
        return loss, size

    if distributed:
        def worker_dataset(context):
            return training_dataset(files, context.get_per_replica_batch_size(batch_size), n_features=n_features,
                                    weighted=weighted, seed=seed, input_context=context).repeat()

        batches = iter(strategy.distribute_datasets_from_function(worker_dataset))
        total_of = functools.partial(strategy.reduce, tf.distribute.ReduceOp.SUM, axis=None)

        @tf.function
        def epoch():
            total, seen = tf.constant(0.0), tf.constant(0.0)
            for _ in tf.range(steps_per_epoch):
                loss, size = strategy.run(step, args=next(batches))
                total, seen = total + total_of(loss), seen + total_of(size)
            return total / tf.maximum(seen, 1.0)
    else:
        dataset = training_dataset(files, batch_size, n_features=n_features, weighted=weighted, seed=seed)

        @tf.function
        def epoch():
            # The whole epoch is one graph: no Python between steps (the demo trains 1.5x faster than a
            # Python loop over steps).
            total, seen = tf.constant(0.0), tf.constant(0.0)
            for features, items, weights in dataset:
                loss, size = step(features, items, weights)
                total, seen = total + loss, seen + size
            return total / tf.maximum(seen, 1.0)

    for i in range(epochs):
        mean_loss = float(epoch())
        if progress is not None:
            progress(i, {"loss": mean_loss})
    return extract_weights(hidden_layers, projection, item_scores)

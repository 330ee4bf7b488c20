"""The two-tower embedding model: a Keras user tower trained against item embeddings.

User tower: scaled features -> dense layers -> L2-normalised embedding.
Item side:  one embedding and one bias per item.
Scores:     sigmoid(temperature * <user, item / |item|> + bias), one per item.

Training uses Keras; serving uses :class:`EmbedderWeights`, the trained numbers
taken out of Keras, so the exported graph is plain TensorFlow ops that any TF
Serving loads (see ``model/export.py``).
"""

from __future__ import annotations

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


def build_models(n_features: int, n_items: int, embedding_dim: int, hidden: tuple[int, ...], seed: int):
    """The Keras training model (features -> scores) and the layers it is made of."""
    import keras
    from keras import layers, ops

    keras.utils.set_random_seed(seed)

    class ItemScores(layers.Layer):
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

        def call(self, embedding):
            items = ops.normalize(self.item_embeddings, axis=1, order=2)
            logits = ops.exp(self.log_temperature) * ops.matmul(embedding, ops.transpose(items))
            return ops.sigmoid(logits + self.item_bias)

    features = keras.Input((n_features,), name="features", dtype="float32")
    hidden_layers = [layers.Dense(units, activation="relu", name=f"user_dense_{i}") for i, units in enumerate(hidden)]
    projection = layers.Dense(embedding_dim, name="user_projection")
    item_scores = ItemScores(n_items, name="scores")
    h = features
    for layer in hidden_layers:
        h = layer(h)
    embedding = ops.normalize(projection(h), axis=1, order=2)
    scores = item_scores(embedding)
    training_model = keras.Model(features, scores)
    return training_model, hidden_layers, projection, item_scores


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
    X: np.ndarray,
    targets: np.ndarray,
    *,
    embedding_dim: int = 32,
    hidden: tuple[int, ...] = (64, 64),
    epochs: int = 25,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress=None,
) -> EmbedderWeights:
    """Train on scaled features X (n, F) float32 and multi-hot targets (n, n_items).

    Args:
        progress: optional callable(epoch, logs) called after every epoch.
    """
    import keras

    model, hidden_layers, projection, item_scores = build_models(
        X.shape[1], targets.shape[1], embedding_dim, hidden, seed
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
    )
    callbacks = []
    if progress is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=progress))
    model.fit(
        X.astype(np.float32),
        targets.astype(np.float32),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    return extract_weights(hidden_layers, projection, item_scores)

"""Training examples as files, read back with ``tf.data``: what one worker or many train from.

Training writes the scaled features and the sparse interactions of the training users,
in a shuffled order, as TFRecord shards (``examples-00000-of-00004.tfrecord``); each record
is a block of up to 4,096 users: features float32 [n, F], the number of items of each
user, the item indices and optionally their weights. :func:`training_dataset` reads them
into batches of users with their items as a ragged tensor.

Nothing here is global state: a worker of a ``tf.distribute`` strategy reads only the shards
its ``tf.distribute.InputContext`` assigns it (``dataset.shard`` over files), so the same
function feeds ``MultiWorkerMirroredStrategy`` when the data outgrows one machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from model.data import UserData

USERS_PER_RECORD = 4096
RECORDS_PER_SHARD = 64
_FEATURES, _LENGTHS, _ITEMS, _WEIGHTS = "features", "row_lengths", "items", "weights"


def _bytes(tensor) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(tensor).numpy()]))


def write_shards(X: np.ndarray, data: UserData, directory: str | Path, *, seed: int,
                 min_shards: int = 1) -> list[Path]:
    """Write the scaled features ``X`` (n_users, F) float32 and the interactions of ``data`` as TFRecord shards.

    Users go in a seeded random order, so each block is a random sample of users. ``min_shards``: at
    least this many files (smaller blocks if need be), so that each of that many workers has its own.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not 1 <= min_shards <= data.n_users:
        raise ValueError(f"min_shards must be within [1, {data.n_users}] (one user per shard at least), got {min_shards}")
    order = np.random.default_rng(seed).permutation(data.n_users)
    per_record = min(USERS_PER_RECORD, -(-data.n_users // min_shards))
    blocks = [order[i:i + per_record] for i in range(0, data.n_users, per_record)]
    n_shards = max(min_shards, -(-len(blocks) // RECORDS_PER_SHARD))
    paths = [directory / f"examples-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
    for shard, path in enumerate(paths):
        with tf.io.TFRecordWriter(str(path)) as writer:
            for rows in blocks[shard::n_shards]:
                part = data.subset(rows)
                feature = {
                    _FEATURES: _bytes(np.ascontiguousarray(X[rows], dtype=np.float32)),
                    _LENGTHS: _bytes(part.counts().astype(np.int64)),
                    _ITEMS: _bytes(part.indices.astype(np.int32)),
                }
                if part.weights is not None:
                    feature[_WEIGHTS] = _bytes(part.weights.astype(np.float32))
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return paths


def training_dataset(files: list[str | Path], batch_size: int, *, n_features: int, weighted: bool, seed: int,
                     cache: bool = True, shuffle_batches: int = 1024,
                     input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Batches of (features float32 [b, F], items int32 ragged [b, None], weights float32 ragged [b, None]).

    One pass over the files is one epoch. Users were written in a random order; every epoch
    reshuffles the order of shards and blocks and the users within each block. A batch holds users
    of one block (so a block's last batch may be smaller). Without weights, every interaction weighs 1.
    """
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in (_FEATURES, _LENGTHS, _ITEMS)}
    if weighted:
        spec[_WEIGHTS] = tf.io.FixedLenFeature([], tf.string)

    # Plain TensorFlow ops, no Python control flow: not worth AutoGraph's conversion (a second of tracing).
    @tf.autograph.experimental.do_not_convert
    def parse(record):
        parsed = tf.io.parse_single_example(record, spec)
        features = tf.ensure_shape(tf.io.parse_tensor(parsed[_FEATURES], tf.float32), [None, n_features])
        def vector(name, dtype):
            return tf.ensure_shape(tf.io.parse_tensor(parsed[name], dtype), [None])

        items = tf.RaggedTensor.from_row_lengths(vector(_ITEMS, tf.int32), vector(_LENGTHS, tf.int64))
        weights = vector(_WEIGHTS, tf.float32) if weighted else tf.ones_like(items.flat_values, tf.float32)
        return features, items, items.with_flat_values(weights)

    @tf.autograph.experimental.do_not_convert
    def batches(features, items, weights):
        n = tf.shape(features, out_type=tf.int64)[0]

        @tf.autograph.experimental.do_not_convert
        def cut(start):
            end = tf.minimum(start + batch_size, n)
            return features[start:end], items[start:end], weights[start:end]

        return tf.data.Dataset.range(0, n, batch_size).map(cut)

    files = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    if input_context is not None:
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    # Users were written in a random order, so each batch is a random sample of users; batches are cut
    # once and kept (per-epoch reshuffling of users within blocks cost 0.1-0.2 s an epoch on the demo's
    # 6,000 users, more than a third of the epoch) and come in a new order every epoch.
    batched = (files.interleave(tf.data.TFRecordDataset, cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE)
               .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
               .flat_map(batches))
    if cache:
        batched = batched.cache()
    return batched.shuffle(shuffle_batches, seed=seed, reshuffle_each_iteration=True).prefetch(tf.data.AUTOTUNE)

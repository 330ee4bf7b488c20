"""The training examples on disk and read back: every user once per epoch, with its own features, items and
weights; shards enough for every worker, and each worker reading only its own."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from model.input_pipeline import training_dataset, write_shards  # noqa: E402
from model.synthetic import make_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def data():
    base = make_synthetic(n_users=230, n_items=30, seed=4)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, base.n_interactions).astype(np.float32)
    return base.__class__(**{**base.__dict__, "weights": weights})


def features_of(data) -> np.ndarray:
    """Features that name their user: row u is (u, -u, u / 2)."""
    users = np.arange(data.n_users, dtype=np.float32)
    return np.stack([users, -users, users / 2], axis=1)


def one_epoch(files, batch_size, *, weighted, dataset=None, **more):
    """{user: (items, weights)} of one pass, and the batch sizes seen."""
    seen, sizes = {}, []
    dataset = dataset or training_dataset(files, batch_size, n_features=3, weighted=weighted, seed=0, **more)
    for features, items, weights in dataset:
        sizes.append(int(features.shape[0]))
        for row, item_row, weight_row in zip(features.numpy(), items.to_list(), weights.to_list()):
            user = int(row[0])
            assert user not in seen, f"user {user} twice in one epoch"
            np.testing.assert_array_equal(row, [user, -user, user / 2])
            seen[user] = (item_row, weight_row)
    return seen, sizes


def test_one_epoch_is_every_user_once_with_their_items_and_weights(data, tmp_path):
    files = write_shards(features_of(data), data, tmp_path, seed=0)
    assert [f.name for f in files] == ["examples-00000-of-00001.tfrecord"]
    seen, sizes = one_epoch(files, 64, weighted=True)
    assert sorted(seen) == list(range(data.n_users))
    for user, (items, weights) in seen.items():
        span = slice(data.indptr[user], data.indptr[user + 1])
        assert items == data.indices[span].tolist()
        np.testing.assert_allclose(weights, data.weights[span])
    assert max(sizes) == 64 and sum(sizes) == data.n_users


def test_without_weights_every_interaction_weighs_one(data, tmp_path):
    unweighted = data.__class__(**{**data.__dict__, "weights": None})
    files = write_shards(features_of(data), unweighted, tmp_path, seed=0)
    seen, _ = one_epoch(files, 50, weighted=False)
    assert all(w == [1.0] * len(items) for items, w in seen.values())


def test_a_batch_holds_users_of_one_block_and_epochs_come_in_a_new_order(data, tmp_path, monkeypatch):
    import model.input_pipeline as pipeline

    monkeypatch.setattr(pipeline, "USERS_PER_RECORD", 100)  # blocks of 100, 100 and 30 users
    files = write_shards(features_of(data), data, tmp_path, seed=0)
    dataset = training_dataset(files, 64, n_features=3, weighted=True, seed=1)
    epochs = [[tuple(f.numpy()[:, 0].astype(int)) for f, _, _ in dataset] for _ in range(2)]
    assert sorted(len(b) for b in epochs[0]) == [30, 36, 36, 64, 64]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])


@pytest.mark.parametrize("workers", [2, 3])
def test_each_worker_reads_its_own_shards_and_together_every_user(data, tmp_path, workers):
    files = write_shards(features_of(data), data, tmp_path / "shards", seed=0, min_shards=workers)
    assert len(files) == workers and files[0].name == f"examples-00000-of-{workers:05d}.tfrecord"
    everyone = {}
    for worker in range(workers):
        context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                             num_replicas_in_sync=workers)
        seen, _ = one_epoch(files, 16, weighted=True, input_context=context)
        assert seen and not set(seen) & set(everyone)
        everyone.update(seen)
    assert sorted(everyone) == list(range(data.n_users))


def test_users_go_in_a_seeded_random_order(data, tmp_path):
    def order(seed, folder):
        files = write_shards(features_of(data), data, tmp_path / folder, seed=seed)
        record = next(iter(tf.data.TFRecordDataset([str(f) for f in files])))
        example = tf.train.Example.FromString(record.numpy())
        features = tf.io.parse_tensor(example.features.feature["features"].bytes_list.value[0], tf.float32)
        return features.numpy()[:, 0].astype(int).tolist()

    first = order(0, "a")
    assert first == order(0, "b") and first != order(1, "c")
    assert first != sorted(first) and sorted(first) == list(range(data.n_users))


@pytest.mark.parametrize("min_shards", [0, 231])
def test_more_shards_than_users_or_none_is_refused(data, tmp_path, min_shards):
    with pytest.raises(ValueError, match=r"min_shards must be within \[1, 230\] \(one user per shard at least\), "
                                         f"got {min_shards}"):
        write_shards(features_of(data), data, tmp_path, seed=0, min_shards=min_shards)


def test_one_user_per_shard_at_the_most(data, tmp_path):
    small = data.subset(np.arange(5))
    files = write_shards(features_of(small), small, tmp_path, seed=0, min_shards=5)
    assert len(files) == 5
    seen, _ = one_epoch(files, 8, weighted=True)
    assert sorted(seen) == list(range(5))


def test_a_shard_holds_at_most_its_number_of_records(data, tmp_path, monkeypatch):
    import model.input_pipeline as pipeline

    monkeypatch.setattr(pipeline, "USERS_PER_RECORD", 1)  # 230 records of one user: 4 shards of up to 64, dealt in turn
    files = write_shards(features_of(data), data, tmp_path, seed=0)
    assert len(files) == 4
    assert [sum(1 for _ in tf.data.TFRecordDataset(str(f))) for f in files] == [58, 58, 57, 57]


def test_the_folder_is_made_with_its_parents(data, tmp_path):
    files = write_shards(features_of(data), data, tmp_path / "run" / "examples", seed=0)
    assert files[0].parent == tmp_path / "run" / "examples" and files[0].is_file()


def test_batches_are_read_from_the_files_once_and_kept(data, tmp_path):
    """The first epoch reads the files; later epochs come from memory, reshuffled (the files may be gone)."""
    files = write_shards(features_of(data), data, tmp_path, seed=0)
    dataset = training_dataset(files, 64, n_features=3, weighted=True, seed=0)
    first, _ = one_epoch(files, 64, weighted=True, dataset=dataset)
    for path in files:
        path.unlink()
    second, _ = one_epoch(files, 64, weighted=True, dataset=dataset)
    assert sorted(second) == sorted(first) == list(range(data.n_users))

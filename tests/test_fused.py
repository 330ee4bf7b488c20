"""Fused mode: the compiled graph answers like scikit-learn, like the kernels and like the transformer path."""

import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_same_predictions, version_dir
from sklearn.cluster import KMeans
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, QuantileTransformer, RobustScaler, StandardScaler

from model.fuse import (
    FORBIDDEN_OPS, FusedPipeline, compile_rules, compile_scaler, compile_segmenter, export_fused, graph_ops,
)
from scripts.cluster import fused_as_predictions
from scripts.localstack import LocalStack
from transformer.store.bundle import Rules, load_bundle
from transformer.steps.kernels import UnsupportedEstimator

FUSED = "embedder-fused"


@pytest.fixture(scope="module")
def fused_dir(build_dir):
    return build_dir / "models" / FUSED / "1"


@pytest.fixture(scope="module")
def fused(fused_dir):
    return tf.saved_model.load(str(fused_dir))


@pytest.fixture(scope="module")
def fused_server(build_dir, tmp_path_factory):
    stack = LocalStack(build=build_dir, model_name=FUSED, predictor="local", log_dir=tmp_path_factory.mktemp("fused"))
    stack.start_predictor()
    yield f"{stack.predictor_url}/v1/models/{FUSED}"
    stack.stop()


def adversarial_rows(offline, raw_users) -> np.ndarray:
    q = offline.scaler.quantiles_
    rows = [
        np.full(q.shape[1], 1e12), np.full(q.shape[1], -1e12), np.zeros(q.shape[1]),
        q[0], q[-1], q[len(q) // 2], q[0] - 1e-8, q[-1] + 1e-8, q[0] + 3e-7, q[-1] - 3e-7,
    ]
    rows += list(q[:: max(1, len(q) // 50)])  # exactly on quantiles, repeated ones included
    return np.vstack([np.asarray(rows, dtype=np.float64), raw_users[:50]])


def test_fused_graph_has_only_native_ops(fused_dir):
    ops = graph_ops(fused_dir)
    assert not ops & FORBIDDEN_OPS
    unknown = {op for op in ops if not hasattr(tf.raw_ops, op)}
    assert not unknown, f"ops that are not standard TensorFlow ops: {unknown}"
    assert {"UpperBound", "Ndtri", "TopKV2"} <= ops  # the compiled steps are really in the graph


def test_signature_outputs_and_padding(fused, offline, raw_users):
    out = fused.signatures["serving_default"](features=tf.constant(raw_users[:8].astype(np.float32)))
    k = offline.rules["top_k"]
    assert out["segment"].dtype == tf.int64 and out["segment"].shape == (8,)
    assert out["segment_distance"].dtype == tf.float32
    assert out["item_ids"].dtype == tf.int64 and out["item_ids"].shape == (8, k)
    assert out["item_scores"].dtype == tf.float32 and out["item_scores"].shape == (8, k)
    ids, scores = out["item_ids"].numpy(), out["item_scores"].numpy()
    assert np.array_equal(ids == -1, scores == -1.0)  # padded together
    assert (scores[ids != -1] >= np.float32(offline.rules["min_score"])).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parity_with_scikit_learn_on_thousands_of_rows(fused, offline, dtype):
    from model.synthetic import make_synthetic

    raw = make_synthetic(n_users=3000, n_items=60, seed=77).features.astype(dtype)
    signature = "serving_default" if dtype == np.float32 else "serving_float64"
    out = fused.signatures[signature](features=tf.constant(raw))
    # scikit-learn sees exactly the values the graph saw.
    assert_same_predictions(fused_as_predictions(out), offline.predictions(raw.astype(np.float64)))
    # the embedding output too: the SavedModel called on scikit-learn's scaling
    embedding, _ = offline.model_outputs(raw.astype(np.float64))
    assert out["embedding"].dtype == tf.float32 and out["embedding"].shape == embedding.shape
    np.testing.assert_allclose(out["embedding"].numpy(), embedding, rtol=1e-5, atol=1e-6)


def test_parity_on_adversarial_rows(fused, offline, raw_users):
    raw = adversarial_rows(offline, raw_users)
    out = fused.signatures["serving_float64"](features=tf.constant(raw))
    assert_same_predictions(fused_as_predictions(out), offline.predictions(raw))


def test_compiled_scalers_match_scikit_learn():
    rng = np.random.default_rng(4)
    X = np.column_stack([rng.lognormal(2, 2, 500), rng.integers(0, 3, 500), np.full(500, 5.0), rng.normal(size=500)])
    probe = np.vstack([X, np.full((1, 4), 1e9), np.full((1, 4), -1e9)])
    for estimator in (
        QuantileTransformer(n_quantiles=37, output_distribution="uniform"),
        QuantileTransformer(n_quantiles=500, output_distribution="normal"),
        StandardScaler(), MinMaxScaler(clip=True),
        make_pipeline(StandardScaler(), QuantileTransformer(n_quantiles=20)),
    ):
        estimator.fit(X)
        got = compile_scaler(estimator)(tf.constant(probe)).numpy()
        np.testing.assert_allclose(got, estimator.transform(probe), rtol=0, atol=1e-12, err_msg=str(estimator))


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_the_fused_scaler_matches_the_kernels_at_and_just_past_the_quantile_tables_ends(distribution):
    """Where interpolation ends: each quantile table's first and last entries, a hair inside and outside them
    (either side of scikit-learn's 1e-7 bound margin), between the last two and the first two entries, and far
    out. With normal output the far probes alone are clipped to the same bounds whatever the interpolation does,
    so the probes just past the ends are what would show a wrong extrapolation there."""
    from transformer.steps.fitted import scaler_steps
    from transformer.steps.kernels import steps_kernel

    rng = np.random.default_rng(9)
    X = np.column_stack([rng.lognormal(1, 1.5, 400), rng.integers(0, 5, 400).astype(float), rng.normal(size=400)])
    estimator = QuantileTransformer(n_quantiles=25, output_distribution=distribution).fit(X)
    table = estimator.quantiles_
    probes = [table[0], table[-1], (table[0] + table[1]) / 2, (table[-2] + table[-1]) / 2]
    for margin in (1e-9, 5e-8, 1e-7, 2e-7, 1e-6, 1e-3, 1.0):
        probes += [table[0] - margin, table[-1] + margin, table[0] + margin, table[-1] - margin]
    probes += [table[0] - 1e3, table[-1] + 1e3]
    probe = np.vstack(probes)
    fused = compile_scaler(estimator)(tf.constant(probe)).numpy()
    kernel = steps_kernel(scaler_steps(estimator)).transform(probe)
    np.testing.assert_allclose(fused, estimator.transform(probe), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fused, kernel, rtol=0, atol=1e-12)
    assert len(np.unique(fused[:, 0])) > 5  # the probes reach distinct values, not only the two bounds


def test_compiled_segmenter_ties_and_distances():
    centers = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    km = KMeans(n_clusters=3, n_init=1, init=centers, max_iter=1).fit(centers)
    km.cluster_centers_ = centers
    E = np.array([[0.0, 0.0], [0.0, -5.0], [0.5, 0.5], [0.9, 0.1]])
    labels, distances = compile_segmenter(km)(tf.constant(E))
    np.testing.assert_array_equal(labels.numpy(), km.predict(E))
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 0, 0])
    np.testing.assert_allclose(distances.numpy(), km.transform(E)[np.arange(4), labels.numpy()], atol=1e-12)


def test_compiled_segmenter_matches_kmeans_with_centroids_of_different_lengths():
    """|c|^2 / 2 - x.c ranks the centroids as the distance does only with the half: centroids of different lengths
    show it (the test above has unit centroids, where any multiple would do)."""
    rng = np.random.default_rng(12)
    data = np.vstack([rng.normal(loc, scale, size=(60, 3)) for loc, scale in ((0, 0.5), (4, 1.0), (-6, 2.0), (9, 0.3))])
    km = KMeans(n_clusters=4, n_init=2, random_state=0).fit(data)
    E = rng.normal(scale=6.0, size=(500, 3))
    labels, distances = compile_segmenter(km)(tf.constant(E))
    np.testing.assert_array_equal(labels.numpy(), km.predict(E))
    np.testing.assert_allclose(distances.numpy(), km.transform(E)[np.arange(len(E)), labels.numpy()], atol=1e-9)


def test_the_width_of_a_scaler_is_read_from_its_first_step():
    from model.fuse import _steps_width
    from transformer.steps.fitted import AffineStep, QuantileStep

    assert _steps_width([QuantileStep(np.zeros((10, 4)), np.linspace(0, 1, 10), "normal")]) == 4
    assert _steps_width([AffineStep(subtract=None, divide=np.ones(3))]) == 3
    assert _steps_width([AffineStep(subtract=np.ones(5), divide=np.ones(5))]) == 5
    assert _steps_width([AffineStep(clip=(0.0, 1.0))]) is None


def test_compiled_rules_threshold_and_ties():
    apply = compile_rules(Rules(min_score=0.3, top_k=3), n_items=5)
    scores = np.array([[0.3, 0.9, 0.3, 0.1, 0.9], [0.1, 0.2, 0.29999998, 0.0, 0.05], [0.5] * 5], dtype=np.float32)
    ids, kept = apply(tf.constant(scores))
    assert ids.numpy().tolist() == [[1, 4, 0], [-1, -1, -1], [0, 1, 2]]
    np.testing.assert_array_equal(kept.numpy()[1], [-1.0, -1.0, -1.0])
    assert kept.numpy()[0].tolist() == pytest.approx([0.9, 0.9, 0.3])


def test_compiled_rules_answer_the_catalogues_ids_text_or_numbers():
    scores = tf.constant(np.array([[0.1, 0.8, 0.5], [0.1, 0.2, 0.0]], dtype=np.float32))
    rules = Rules(min_score=0.3, top_k=2)
    ids, _ = compile_rules(rules, n_items=3, item_ids=np.array(["x", "y", "z"]))(scores)
    assert ids.numpy().tolist() == [[b"y", b"z"], [b"", b""]]  # text ids; "" pads what the rules drop
    ids, _ = compile_rules(rules, n_items=3, item_ids=np.array([70, 80, 90], dtype=np.int32))(scores)
    assert ids.dtype == tf.int64 and ids.numpy().tolist() == [[80, 90], [-1, -1]]


def test_unsupported_estimator_fails_at_compile_time():
    with pytest.raises(UnsupportedEstimator, match="RobustScaler is not supported as the scaler; supported scalers: QuantileTransformer"):
        compile_scaler(RobustScaler().fit(np.ones((4, 2))))
    with pytest.raises(UnsupportedEstimator, match="cannot compile StandardScaler into the graph; supported segmenters: KMeans"):
        compile_segmenter(StandardScaler().fit(np.ones((4, 2))))


def test_feature_count_mismatch_fails_at_compile_time(build_dir):
    bundle = load_bundle(version_dir(build_dir))
    rng = np.random.default_rng(0)
    wrong = QuantileTransformer(n_quantiles=10).fit(rng.normal(size=(50, len(bundle.feature_names) + 1)))
    import dataclasses

    from transformer.steps.fitted import FittedSteps, scaler_steps

    mismatched = dataclasses.replace(bundle, fitted=FittedSteps(tuple(scaler_steps(wrong)), bundle.fitted.centers))
    embedder = tf.saved_model.load(str(build_dir / "models" / "embedder" / "1"))
    with pytest.raises(UnsupportedEstimator, match=r"scaler was fitted on \d+ features, the bundle lists"):
        FusedPipeline(mismatched, embedder)
    short = dataclasses.replace(bundle, feature_names=bundle.feature_names[:-1])
    with pytest.raises(UnsupportedEstimator, match="the model's input 'features' has shape"):
        FusedPipeline(short, embedder)


def test_export_refuses_a_model_version_without_its_bundle(build_dir, tmp_path):
    import shutil

    from transformer.store.bundle import BundleError

    bare = tmp_path / "embedder" / "1"
    shutil.copytree(version_dir(build_dir), bare)
    shutil.rmtree(bare / "assets.extra")
    with pytest.raises(BundleError, match="this model version has no transformer bundle"):
        export_fused(bare, tmp_path / "out")


def test_fused_export_never_overwrites_a_version(build_dir, tmp_path):
    from model.export import VersionExists

    (tmp_path / "out" / "1").mkdir(parents=True)
    with pytest.raises(VersionExists, match="model versions are never overwritten"):
        export_fused(version_dir(build_dir), tmp_path / "out")


def test_fused_server_answers_like_the_transformer(stack, fused_server, raw_users):
    """JSON numbers through both servers: the float64 signature reads them at full precision."""
    rows = raw_users[:100]
    via_transformer = httpx.post(f"{stack.transformer_url}/v1/models/embedder:predict",
                                 json={"instances": rows.tolist()}, timeout=30).json()["predictions"]
    response = httpx.post(f"{fused_server}:predict",
                          json={"signature_name": "serving_float64", "inputs": rows.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    assert_same_predictions(fused_as_predictions(response.json()["outputs"]), via_transformer)


def test_fused_server_float32_rows(stack, fused_server, raw_users):
    """float32 input in row form: values a float32 holds exactly give the transformer's answers."""
    rows = raw_users[100:140].astype(np.float32).astype(np.float64)
    via_transformer = httpx.post(f"{stack.transformer_url}/v1/models/embedder:predict",
                                 json={"instances": rows.tolist()}, timeout=30).json()["predictions"]
    response = httpx.post(f"{fused_server}:predict", json={"instances": rows.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    rows_out = response.json()["predictions"]
    columns = {key: [r[key] for r in rows_out] for key in rows_out[0]}
    assert_same_predictions(fused_as_predictions(columns), via_transformer)


def test_the_cluster_smoke_test_reads_the_fused_model_like_the_transformer(stack, fused_server, offline):
    """scripts/cluster.py's fused path (raw rows in, tensors read back) against the local servers."""
    from scripts.cluster import post_examples, post_fused, same

    base = fused_server.rsplit("/v1/models/", 1)[0]
    fused = post_fused(base, FUSED, offline.feature_names)
    transformer = post_examples(stack.transformer_url, "embedder")[:len(fused)]
    assert [status for status, _ in fused] == [200, 200]
    assert same(fused, transformer) == []

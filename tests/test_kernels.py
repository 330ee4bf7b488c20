"""The numpy kernels against scikit-learn, on ordinary and adversarial input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from conftest import reference_top_items
from sklearn.cluster import KMeans
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, QuantileTransformer, RobustScaler, StandardScaler

from transformer.steps.kernels import (
    NearestCentroid, QuantileScaler, _Interpolation, UnsupportedEstimator, rules_on_candidates, scaler_kernel, top_items,
)


def heavy_tailed(rng, n, f=6):
    cols = [
        rng.lognormal(3, 1.5, n),
        rng.negative_binomial(1, 0.2, n).astype(float),
        rng.exponential(30, n).round(),
        np.full(n, 7.0),  # constant column: every quantile repeated
        rng.integers(0, 3, n).astype(float),  # three values: long runs of repeated quantiles
        rng.normal(0, 1, n),
    ]
    return np.column_stack(cols[:f])


@pytest.fixture(params=["normal", "uniform"])
def fitted(request):
    rng = np.random.default_rng(0)
    X = heavy_tailed(rng, 3000)
    qt = QuantileTransformer(n_quantiles=200, output_distribution=request.param, random_state=0).fit(X)
    return qt, X


def assert_parity(qt, X):
    expected = qt.transform(X)
    got = QuantileScaler.from_estimator(qt).transform(X)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_quantile_random_rows(fitted):
    qt, X = fitted
    rng = np.random.default_rng(1)
    assert_parity(qt, heavy_tailed(rng, 5000))


def test_quantile_far_outside_training_range(fitted):
    qt, X = fitted
    extremes = np.array([-1e30, -1e6, -1.0, 1e6, 1e30, 0.0])
    rows = np.tile(extremes[:, None], (1, X.shape[1]))
    assert_parity(qt, rows)


def test_quantile_exactly_on_quantiles_and_bounds(fitted):
    qt, X = fitted
    q = qt.quantiles_
    assert_parity(qt, q)  # every fitted quantile, the bounds included
    # Just inside and outside the bounds by less than and more than scikit-learn's 1e-7 margin.
    for delta in (-2e-7, -5e-8, 5e-8, 2e-7):
        assert_parity(qt, q[[0, -1]] + delta)


def test_quantile_midpoints_between_repeated_quantiles(fitted):
    qt, X = fitted
    q = qt.quantiles_
    assert_parity(qt, 0.5 * (q[1:] + q[:-1]))


def test_few_rows_and_many_rows_scale_bit_for_bit_alike(fitted):
    """Up to FEW_ROWS rows take one search over every feature's knots, more take np.interp per
    feature: the same float64 bits either way, on the awkward values too."""
    qt, X = fitted
    q = qt.quantiles_
    rng = np.random.default_rng(7)
    rows = np.concatenate([heavy_tailed(rng, 200), q, 0.5 * (q[1:] + q[:-1]), q[[0, -1]] + 5e-8, q[[0, -1]] - 5e-8,
                           np.tile(np.array([-1e30, -1.0, 0.0, -0.0, 1e30])[:, None], (1, q.shape[1]))])
    scaler = QuantileScaler.from_estimator(qt)
    few = _Interpolation.FEW_ROWS
    many = scaler.transform(rows)
    one_by_few = np.concatenate([scaler.transform(rows[i:i + few]) for i in range(0, len(rows), few)])
    assert len(rows) > few and np.array_equal(many.view(np.int64), one_by_few.view(np.int64))


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_knots_a_subnormal_apart_interpolate_as_numpy_does():
    xp = np.array([[0.0, 5e-324, 1.0, 2.0]])  # the first slope is infinite
    fp = np.array([0.0, 0.5, 0.75, 1.0])
    x = np.array([[0.0], [5e-324], [0.5], [1.0], [-1.0], [3.0]])
    expected = np.interp(x[:, 0], xp[0], fp)[:, None]
    assert np.array_equal(_Interpolation(xp, fp)(x), expected) and not np.isnan(expected).any()


def test_quantile_small_n_quantiles_and_single_row():
    rng = np.random.default_rng(3)
    X = heavy_tailed(rng, 50)
    qt = QuantileTransformer(n_quantiles=10, output_distribution="normal").fit(X)
    assert_parity(qt, X[:1])
    assert_parity(qt, heavy_tailed(rng, 7))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (4, 6), elements=st.floats(-1e12, 1e12, allow_nan=False)))
def test_quantile_any_finite_input(rows):
    rng = np.random.default_rng(0)
    qt = QuantileTransformer(n_quantiles=100, output_distribution="normal").fit(heavy_tailed(rng, 500))
    assert_parity(qt, rows)


def test_unsupported_scaler_is_named():
    with pytest.raises(UnsupportedEstimator, match="RobustScaler is not supported as the scaler; supported scalers: QuantileTransformer, StandardScaler"):
        scaler_kernel(RobustScaler().fit(np.ones((3, 2))))


@pytest.mark.parametrize("make", [
    lambda: StandardScaler(),
    lambda: StandardScaler(with_mean=False),
    lambda: MinMaxScaler(),
    lambda: MinMaxScaler(feature_range=(-1, 2), clip=True),
    lambda: make_pipeline(QuantileTransformer(n_quantiles=50), StandardScaler()),
    lambda: Pipeline([("skip", "passthrough"), ("mm", MinMaxScaler(clip=True)), ("q", QuantileTransformer(n_quantiles=30, output_distribution="normal"))]),
])
def test_other_scalers_and_pipelines(make):
    rng = np.random.default_rng(5)
    estimator = make().fit(heavy_tailed(rng, 400))
    X = np.vstack([heavy_tailed(rng, 300), np.full((1, 6), 1e9), np.full((1, 6), -1e9)])
    np.testing.assert_allclose(scaler_kernel(estimator).transform(X), estimator.transform(X), rtol=0, atol=1e-12)


def test_unfitted_quantile_transformer_is_refused():
    with pytest.raises(UnsupportedEstimator, match="QuantileTransformer is not fitted"):
        scaler_kernel(QuantileTransformer())


def kmeans(seed=0, k=6, d=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(600, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(X), rng


def test_nearest_centroid_matches_kmeans_predict():
    km, rng = kmeans()
    X = rng.normal(size=(5000, 8))
    labels, distances = NearestCentroid.from_estimator(km).assign(X)
    np.testing.assert_array_equal(labels, km.predict(X))
    np.testing.assert_allclose(distances, km.transform(X)[np.arange(len(X)), labels], rtol=1e-12, atol=1e-12)


def test_nearest_centroid_float32_embeddings():
    km, rng = kmeans(seed=2)
    X = rng.normal(size=(2000, 8)).astype(np.float32)
    labels, _ = NearestCentroid.from_estimator(km).assign(X)
    np.testing.assert_array_equal(labels, km.predict(X.astype(np.float64)))


def test_nearest_centroid_ties_go_to_lowest_index():
    centers = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    kernel = NearestCentroid(centers)
    X = np.array([[0.0, 0.0], [0.0, -5.0], [0.5, 0.5]])  # equidistant pairs / triples
    labels, distances = kernel.assign(X)
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_allclose(distances, [1.0, np.sqrt(26.0), np.sqrt(0.5)])
    # The same tie-break as scikit-learn.
    km = KMeans(n_clusters=3, n_init=1, init=centers, max_iter=1).fit(centers)
    km.cluster_centers_ = centers
    np.testing.assert_array_equal(km.predict(X), labels)


def test_nearest_centroid_refuses_other_estimators():
    with pytest.raises(UnsupportedEstimator, match="supported segmenters: KMeans"):
        NearestCentroid.from_estimator(StandardScaler())


def as_lists(ids, keep):
    return [[int(i) for i, k in zip(r, m) if k] for r, m in zip(ids, keep)]


def test_top_items_threshold_ties_and_k():
    scores = np.array(
        [
            [0.3, 0.9, 0.3, 0.1, 0.9],  # ties at the top and at the threshold
            [0.1, 0.2, 0.29999998, 0.0, 0.05],  # nothing reaches 0.3
            [0.5, 0.5, 0.5, 0.5, 0.5],  # all equal: lowest ids first
        ],
        dtype=np.float32,
    )
    ids, best, keep = top_items(scores, 0.3, 3)
    assert as_lists(ids, keep) == [[1, 4, 0], [], [0, 1, 2]]
    np.testing.assert_array_equal(best, np.take_along_axis(scores, ids, axis=1))
    assert as_lists(ids, keep) == reference_top_items(scores, 0.3, 3)


def test_top_items_k_larger_than_catalogue():
    scores = np.array([[0.4, 0.8]], dtype=np.float32)
    ids, _, keep = top_items(scores, 0.0, 10)
    assert as_lists(ids, keep) == [[1, 0]]


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float32, (3, 12), elements=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0])),
    st.sampled_from([0.0, 0.25, 0.3, 1.0]),
    st.integers(1, 15),
)
def test_top_items_matches_reference(scores, min_score, k):
    ids, _, keep = top_items(scores, min_score, k)
    assert as_lists(ids, keep) == reference_top_items(scores, min_score, k)


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float32, (3, 12), elements=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0])),
    st.sampled_from([0.0, 0.25, 0.3, 1.0]),
    st.integers(1, 12),
    st.integers(0, 6),
)
def test_rules_on_ranked_candidates_equal_rules_on_every_score(scores, min_score, k, extra):
    """What the 'candidates' signature returns (TF's top_k: best first, ties to the lower id), ruled,
    equals the rules on every score."""
    n_candidates = min(12, k + extra)
    ranked_ids = np.argsort(-scores, axis=1, kind="stable")[:, :n_candidates]
    ranked_scores = np.take_along_axis(scores, ranked_ids, axis=1)
    ids, best, keep = rules_on_candidates(ranked_ids, ranked_scores, min_score, k)
    assert as_lists(ids, keep) == reference_top_items(scores, min_score, k)


@pytest.mark.heavy
@pytest.mark.parametrize("bad_id", [-1, 60])
def test_candidate_ids_outside_the_catalogue_are_the_predictors_fault(build_dir, bad_id):
    """An item index the catalogue does not have means the predictor serves another model: 502, not 500."""
    from conftest import version_dir

    from transformer.store.bundle import load_bundle
    from transformer.pipeline import Pipeline as VersionPipeline
    from transformer.predictor import PredictorError

    pipeline = VersionPipeline(load_bundle(version_dir(build_dir)))
    spec = pipeline.spec
    ids = np.tile(np.arange(spec.n_candidates, dtype=np.int64), (2, 1))
    scores = np.tile(np.linspace(0.9, 0.5, spec.n_candidates, dtype=np.float32), (2, 1))
    outputs = {spec.embedding_output: np.ones((2, spec.embedding_dim), np.float32),
               spec.candidate_ids_output: ids, spec.candidate_scores_output: scores}
    assert pipeline.rank(outputs).item_ids.tolist() == ids[:, :pipeline.rules.top_k].tolist()
    ids[1, 0] = bad_id
    with pytest.raises(PredictorError, match=r"item indices outside \[0, 60\)") as error:
        pipeline.rank(outputs)
    assert (error.value.status, error.value.cause) == (502, "predictor_bad_answer")


def test_kernels_compute_in_their_documented_precision_whatever_they_are_given():
    """float64 for scaling and distances, float32 scores and int64 ids for the rules, from any input type."""
    rng = np.random.default_rng(4)
    ints = rng.integers(-50, 50, size=(40, 3))
    for scaler in (StandardScaler().fit(ints.astype(float)), MinMaxScaler().fit(ints.astype(float)),
                   QuantileTransformer(n_quantiles=20).fit(ints.astype(float))):
        got = scaler_kernel(scaler).transform(ints)  # integer rows in, as a JSON body of whole numbers gives
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, scaler.transform(ints.astype(float)))
    fine = rng.normal(size=(40, 3)).astype(np.float32)  # float32 rows, scaled in float64 as scikit-learn does
    quantiles = QuantileTransformer(n_quantiles=20).fit(fine.astype(float))
    np.testing.assert_array_equal(scaler_kernel(quantiles).transform(fine), quantiles.transform(fine.astype(float)))
    centers = np.array([[0, 0], [10, 10]], dtype=np.float32)
    labels, distances = NearestCentroid(centers).assign(np.array([[0.1, 0.2], [9, 9]], dtype=np.float32))
    assert labels.tolist() == [0, 1] and distances.dtype == np.float64
    assert distances.tolist() == [np.hypot(float(np.float32(0.1)), float(np.float32(0.2))), np.sqrt(2.0)]
    scores = np.array([[0.1, 0.7, 0.7000000000001]])  # float64: equal in float32, so the tie goes to the lower id
    ids, best, keep = top_items(scores, 0.5, 2)
    assert (ids.tolist(), best.dtype, keep.tolist()) == ([[1, 2]], np.float32, [[True, True]])
    ids, best, keep = rules_on_candidates(np.array([[7, 3]], dtype=np.int32), np.array([[0.9, 0.2]]), 0.5, 2)
    assert (ids.dtype, best.dtype, best.tolist(), keep.tolist()) == (np.int64, np.float32, [[np.float32(0.9), np.float32(0.2)]],
                                                                     [[True, False]])

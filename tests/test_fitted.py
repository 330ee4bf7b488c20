"""The fitted steps as plain data (``fitted.npz`` + the manifest's description): written from scikit-learn's
estimators, read back as exactly the same numbers without pickle, and every array or description that does
not fit refused with a message naming it. Fast: small estimators fitted in the test."""

import json

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, QuantileTransformer, RobustScaler, StandardScaler

from transformer.steps.fitted import (
    FITTED_FILE, AffineStep, FittedSteps, FittedStepsError, QuantileStep, UnsupportedEstimator, item_id_array,
    kmeans_centers, same_numbers, scaler_steps,
)

RNG = np.random.default_rng(11)
X = RNG.lognormal(1.0, 1.0, size=(200, 3))
EMBEDDINGS = RNG.normal(size=(200, 4))


def scaler():
    return Pipeline([("q", QuantileTransformer(n_quantiles=20, output_distribution="normal")),
                     ("s", StandardScaler()), ("skip", "passthrough"),
                     ("m", MinMaxScaler(feature_range=(-1, 2), clip=True))]).fit(X)


def segments(k=3):
    return KMeans(n_clusters=k, n_init=2, random_state=0).fit(EMBEDDINGS)


@pytest.fixture
def written(tmp_path):
    steps = FittedSteps.from_estimators(scaler(), segments(), item_ids=["sku-b", "sku-a", "sku-c", "sku-d"])
    description = steps.write(tmp_path)
    return steps, description, tmp_path


def read(directory, description, n_features=3, embedding_dim=4, n_items=4):
    return FittedSteps.read(directory, description, n_features, embedding_dim, n_items)


def test_estimators_become_their_numbers_in_the_order_they_apply():
    pipeline = scaler()
    quantile, standard, minmax = scaler_steps(pipeline)
    q = pipeline.named_steps["q"]
    assert quantile == QuantileStep(quantile.quantiles, quantile.references, "normal")
    assert np.array_equal(quantile.quantiles, q.quantiles_) and np.array_equal(quantile.references, q.references_)
    s = pipeline.named_steps["s"]
    assert np.array_equal(standard.subtract, s.mean_) and np.array_equal(standard.divide, s.scale_)
    assert (standard.multiply, standard.add, standard.clip) == (None, None, None)
    m = pipeline.named_steps["m"]
    assert np.array_equal(minmax.multiply, m.scale_) and np.array_equal(minmax.add, m.min_)
    assert (minmax.subtract, minmax.divide, minmax.clip) == (None, None, (-1.0, 2.0))
    assert all(a.dtype == np.float64 for step in (standard, minmax) for a in (step.multiply, step.add, step.subtract,
                                                                               step.divide) if a is not None)
    plain = StandardScaler(with_mean=False, with_std=True).fit(X)
    assert scaler_steps(plain) == [AffineStep(subtract=None, divide=scaler_steps(plain)[0].divide)]
    assert scaler_steps(StandardScaler(with_mean=True, with_std=False).fit(X))[0].divide is None
    assert scaler_steps(MinMaxScaler().fit(X))[0].clip is None
    assert scaler_steps(QuantileTransformer(n_quantiles=10).fit(X))[0].output_distribution == "uniform"


@pytest.mark.parametrize("estimator, message", [
    (RobustScaler().fit(X), "RobustScaler is not supported as the scaler; supported scalers: QuantileTransformer, "
                            "StandardScaler, MinMaxScaler, or a Pipeline of these"),
    (StandardScaler(), "the StandardScaler is not fitted; fit it before bundling"),
    (Pipeline([("q", QuantileTransformer(n_quantiles=10)), ("r", RobustScaler())]).fit(X),
     "RobustScaler is not supported as the scaler; supported scalers: QuantileTransformer, StandardScaler, "
     "MinMaxScaler, or a Pipeline of these"),
])
def test_unsupported_scalers_are_named(estimator, message):
    with pytest.raises(UnsupportedEstimator) as caught:
        scaler_steps(estimator)
    assert str(caught.value) == message


def test_an_unknown_output_distribution_is_refused():
    qt = QuantileTransformer(n_quantiles=10).fit(X)
    qt.output_distribution = "cauchy"
    with pytest.raises(UnsupportedEstimator) as caught:
        scaler_steps(qt)
    assert str(caught.value) == ("QuantileTransformer(output_distribution='cauchy') is not supported; use 'uniform' "
                                 "or 'normal'")


def test_kmeans_centers_and_training_share():
    fitted = segments()
    centers = kmeans_centers(fitted)
    assert centers.dtype == np.float64 and np.array_equal(centers, fitted.cluster_centers_)
    with pytest.raises(UnsupportedEstimator) as caught:
        kmeans_centers(StandardScaler())
    assert str(caught.value) == "no kernel for StandardScaler; supported segmenters: KMeans"
    steps = FittedSteps.from_estimators(scaler(), fitted)
    assert np.array_equal(steps.segment_share, np.bincount(fitted.labels_, minlength=3) / 200)
    assert steps.segment_share.sum() == pytest.approx(1.0) and steps.item_ids is None
    unlabelled = segments()
    del unlabelled.labels_
    assert FittedSteps.from_estimators(scaler(), unlabelled).segment_share is None


def test_item_ids_are_int64_or_text():
    assert item_id_array([3, 1]).dtype == np.int64
    assert item_id_array(np.array([3, 1], dtype=np.uint8)).tolist() == [3, 1]
    assert item_id_array(np.array(["a", "bb"], dtype=object)).dtype.kind == "U"
    with pytest.raises(FittedStepsError) as caught:
        item_id_array([0.5, 1.5])
    assert str(caught.value) == "item ids must be integers or strings, got float64"


def test_written_numbers_read_back_exactly_without_pickle(written):
    steps, description, directory = written
    assert description == {"file": FITTED_FILE, "scaler": [
        {"step": "quantile", "output_distribution": "normal"},
        {"step": "affine", "arrays": ["subtract", "divide"], "clip": None},
        {"step": "affine", "arrays": ["multiply", "add"], "clip": [-1, 2]}],
        "segments": {"step": "nearest_centroid"}, "items": {"ids": "string"}}
    back = read(directory, json.loads(json.dumps(description)))
    assert same_numbers(steps, back) and back.item_ids.tolist() == ["sku-b", "sku-a", "sku-c", "sku-d"]
    assert back.scaler[2].clip == (-1.0, 2.0) and isinstance(back.scaler[2].clip[0], float)
    with np.load(directory / FITTED_FILE, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["items.ids", "scaler.0.quantiles", "scaler.0.references", "scaler.1.divide",
                                     "scaler.1.subtract", "scaler.2.add", "scaler.2.multiply", "segments.centers",
                                     "segments.training_share"]
    numbered = FittedSteps.from_estimators(scaler(), segments(), item_ids=[7, 3, 5, 11])
    described = numbered.write(directory)
    assert described["items"] == {"ids": "int64"}
    assert read(directory, described).item_ids.dtype == np.int64
    bare = FittedSteps(numbered.scaler, numbered.centers)
    described = bare.write(directory)
    assert "items" not in described
    again = read(directory, described)
    assert again.item_ids is None and again.segment_share is None and same_numbers(bare, again)


def test_same_numbers_tells_any_difference(written):
    steps, _, _ = written
    from dataclasses import replace

    centers = steps.centers.copy()
    centers[0, 0] += 1e-12
    quantile = steps.scaler[0]
    other_q = QuantileStep(quantile.quantiles, quantile.references, "uniform")
    changed = [replace(steps, centers=centers), replace(steps, segment_share=None), replace(steps, item_ids=None),
               replace(steps, scaler=steps.scaler[:2]), replace(steps, scaler=(other_q,) + steps.scaler[1:]),
               replace(steps, scaler=(steps.scaler[1], steps.scaler[0], steps.scaler[2])),
               replace(steps, scaler=steps.scaler[:2] + (AffineStep(steps.scaler[2].multiply, steps.scaler[2].add),)),
               replace(steps, scaler=steps.scaler[:2] + (replace(steps.scaler[2], clip=(-1.0, 3.0)),)),
               replace(steps, item_ids=steps.item_ids[::-1])]
    assert [same_numbers(steps, c) for c in changed] == [False] * len(changed)
    assert [same_numbers(c, steps) for c in changed] == [False] * len(changed)
    assert same_numbers(steps, replace(steps))


def rewrite(directory, **arrays):
    """fitted.npz with some arrays replaced (None: removed)."""
    with np.load(directory / FITTED_FILE, allow_pickle=False) as npz:
        current = {name: npz[name] for name in npz.files}
    for name, value in arrays.items():
        if value is None:
            current.pop(name)
        else:
            current[name] = value
    np.savez(directory / FITTED_FILE, **current)


def refused(directory, description, **sizes) -> str:
    with pytest.raises(FittedStepsError) as caught:
        read(directory, description, **sizes)
    return str(caught.value).replace(str(directory / FITTED_FILE), "fitted.npz")


@pytest.mark.parametrize("arrays, message", [
    ({"scaler.0.quantiles": None}, "fitted.npz: 'scaler.0.quantiles' must be finite float64 numbers of 2 "
                                   "dimension(s), got missing"),
    ({"scaler.0.quantiles": np.zeros((20, 3), np.float32)}, "fitted.npz: 'scaler.0.quantiles' must be finite "
     "float64 numbers of 2 dimension(s), got float32 with shape [20, 3]"),
    ({"scaler.0.quantiles": np.zeros(20)}, "fitted.npz: 'scaler.0.quantiles' must be finite float64 numbers of 2 "
     "dimension(s), got float64 with shape [20]"),
    ({"scaler.0.quantiles": np.full((20, 3), np.nan)}, "fitted.npz: 'scaler.0.quantiles' must be finite float64 "
     "numbers of 2 dimension(s), got float64 with shape [20, 3]"),
    ({"scaler.0.quantiles": np.zeros((19, 3))}, "scaler step 0: quantiles [19, 3] and references [20] do not fit "
                                                "3 features"),
    ({"scaler.0.quantiles": np.zeros((20, 2))}, "scaler step 0: quantiles [20, 2] and references [20] do not fit "
                                                "3 features"),
    ({"scaler.0.quantiles": np.zeros((1, 3)), "scaler.0.references": np.zeros(1)},
     "scaler step 0: quantiles [1, 3] and references [1] do not fit 3 features"),
    ({"scaler.1.divide": np.ones(2)}, "scaler step 1: arrays ['divide', 'subtract'] do not fit 3 features"),
    ({"segments.centers": np.zeros((3, 5))}, "the segment centroids [3, 5] do not have the model's embedding size 4"),
    ({"segments.centers": np.zeros((0, 4))}, "the segment centroids [0, 4] do not have the model's embedding size 4"),
    ({"segments.training_share": np.array([0.5, 0.5])}, "fitted.npz: 'segments.training_share' must be 3 shares "
                                                         "summing to 1"),
    ({"segments.training_share": np.array([0.5, 0.5, 0.1])}, "fitted.npz: 'segments.training_share' must be 3 "
                                                              "shares summing to 1"),
    ({"segments.training_share": np.array([1.5, -0.25, -0.25])}, "fitted.npz: 'segments.training_share' must be 3 "
                                                                  "shares summing to 1"),
    ({"items.ids": None}, "fitted.npz: 'items.ids' must be 4 item ids of the kind the manifest names ('string'), "
                          "got missing"),
    ({"items.ids": np.array([1, 2, 3, 4])}, "fitted.npz: 'items.ids' must be 4 item ids of the kind the manifest "
                                            "names ('string'), got int64 with shape [4]"),
    ({"items.ids": np.array(["a", "b", "c"])}, "fitted.npz: 'items.ids' must be 4 item ids of the kind the manifest "
                                               "names ('string'), got <U1 with shape [3]"),
    ({"items.ids": np.array(["a", "b", "c", "a"])}, "fitted.npz: 'items.ids' must be distinct"),
])
def test_arrays_that_do_not_fit_are_refused(written, arrays, message):
    _, description, directory = written
    rewrite(directory, **arrays)
    assert refused(directory, description) == message


def test_integer_item_ids_must_be_distinct_and_non_negative(tmp_path):
    steps = FittedSteps.from_estimators(scaler(), segments(), item_ids=[0, 1, 2, 3])
    description = steps.write(tmp_path)
    rewrite(tmp_path, **{"items.ids": np.array([0, 1, 2, -1])})
    assert refused(tmp_path, description) == "fitted.npz: 'items.ids' must be distinct and non-negative"
    rewrite(tmp_path, **{"items.ids": np.array([0, 1, 2, 2])})
    assert refused(tmp_path, description) == "fitted.npz: 'items.ids' must be distinct and non-negative"
    assert refused(tmp_path, {**description, "items": {"ids": "float"}}) == (
        "fitted.npz: 'items.ids' must be 4 item ids of the kind the manifest names ('float'), got int64 with shape [4]")
    assert refused(tmp_path, {**description, "items": "int64"}) == (
        "fitted.npz: 'items.ids' must be 4 item ids of the kind the manifest names (None), got int64 with shape [4]")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["scaler"][0].update(output_distribution="cauchy"), "scaler step 0: unknown output distribution "
                                                                    "'cauchy'"),
    (lambda d: d["scaler"][1].update(step="robust"), "scaler step 1 is 'robust'; this transformer knows 'quantile' "
                                                     "and 'affine'"),
    (lambda d: d["scaler"][1].update(arrays=["subtract", "center"]), "fitted.npz: 'scaler.1.center' must be finite "
     "float64 numbers of 1 dimension(s), got missing"),
    (lambda d: d["segments"].update(step="gaussian_mixture"), "segments step 'gaussian_mixture' is not "
                                                              "'nearest_centroid'"),
    (lambda d: d.pop("segments"), "the manifest's 'fitted' entry is incomplete (KeyError: 'segments')"),
    (lambda d: d["scaler"][0].pop("output_distribution"), "the manifest's 'fitted' entry is incomplete (KeyError: "
                                                          "'output_distribution')"),
    (lambda d: d.update(scaler=[5]), "the manifest's 'fitted' entry is incomplete (TypeError: 'int' object is not "
                                     "subscriptable)"),
    (lambda d: d["scaler"][2].update(clip=[1]), "the manifest's 'fitted' entry is incomplete (IndexError: list index "
                                                "out of range)"),
    (lambda d: d.update(scaler=[]), "the manifest's 'fitted' entry lists no scaler step"),
])
def test_descriptions_that_do_not_fit_are_refused(written, change, message):
    _, description, directory = written
    description = json.loads(json.dumps(description))
    change(description)
    assert refused(directory, description) == message


def test_an_affine_step_naming_an_unknown_array_is_refused(written):
    _, description, directory = written
    rewrite(directory, **{"scaler.1.center": np.zeros(3)})
    description = json.loads(json.dumps(description))
    description["scaler"][1]["arrays"] = ["subtract", "center"]
    assert refused(directory, description) == "scaler step 1: arrays ['center', 'subtract'] do not fit 3 features"


def test_a_file_that_is_not_plain_arrays_is_refused(written):
    _, description, directory = written
    np.savez(directory / FITTED_FILE, **{"scaler.0.quantiles": np.array([{"a": 1}], dtype=object)})
    message = refused(directory, description)
    assert message.startswith("fitted.npz is not a readable array file of numbers (Object arrays cannot be loaded "
                              "when allow_pickle=False")
    (directory / FITTED_FILE).write_bytes(b"not a zip")
    assert refused(directory, description).startswith("fitted.npz is not a readable array file of numbers (")
    (directory / FITTED_FILE).unlink()
    assert refused(directory, description).startswith("fitted.npz is not a readable array file of numbers ([Errno 2]")


def test_the_smallest_valid_arrays_are_accepted(tmp_path):
    """One segment, two quantiles, a segment no training row fell in, item id 0, int32 ids read as int64."""
    one = FittedSteps.from_estimators(QuantileTransformer(n_quantiles=2).fit(X), KMeans(n_clusters=1, n_init=1).fit(
        EMBEDDINGS), item_ids=[0, 1, 2, 3])
    description = one.write(tmp_path)
    back = read(tmp_path, description)
    assert back.centers.shape == (1, 4) and back.scaler[0].quantiles.shape == (2, 3) and back.item_ids.tolist() == [
        0, 1, 2, 3]
    (tmp_path / "three").mkdir()
    three = FittedSteps.from_estimators(scaler(), segments(), item_ids=[0, 1, 2, 3]).write(tmp_path / "three")
    rewrite(tmp_path / "three", **{"segments.training_share": np.array([0.75, 0.25, 0.0]),
                                   "items.ids": np.array([3, 0, 1, 2], dtype=np.int32)})
    back = read(tmp_path / "three", three)
    assert back.segment_share.tolist() == [0.75, 0.25, 0.0]
    assert back.item_ids.dtype == np.int64 and back.item_ids.tolist() == [3, 0, 1, 2]


def test_a_segment_no_training_row_fell_in_has_a_share_of_zero():
    kmeans = KMeans(n_clusters=3, n_init=1, random_state=0).fit(np.array([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]]))
    kmeans.labels_ = np.array([0, 0, 1, 0])  # as if nobody in training had been nearest the third
    steps = FittedSteps.from_estimators(StandardScaler().fit(X), kmeans)
    assert steps.segment_share.tolist() == [0.75, 0.25, 0.0] and steps.segment_share.dtype == np.float64

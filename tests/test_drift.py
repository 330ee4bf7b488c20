"""Drift per feature from the fitted quantiles alone: low for in-distribution traffic, high for a shifted feature."""

import math
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import MODEL_NAME

from model.synthetic import make_synthetic
from transformer.serving.drift import SIGNIFICANT, STABLE, DriftMonitor, SlidingCounts, psi
from transformer.steps.fitted import AffineStep, FittedSteps


@pytest.fixture(scope="module")
def bundle():
    """The fitted steps as training makes them (model/train.py: QuantileTransformer with normal output; the
    segment mix of KMeans), on the synthetic users of the session's build, fitted here in a second."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import QuantileTransformer

    users = make_synthetic(n_users=1500, n_items=60, seed=0)
    scaler = QuantileTransformer(n_quantiles=1000, output_distribution="normal", random_state=0).fit(users.features)
    segments = KMeans(n_clusters=6, n_init=2, random_state=0).fit(scaler.transform(users.features))
    return SimpleNamespace(fitted=FittedSteps.from_estimators(scaler, segments), feature_names=users.feature_names)


def feed(monitor: DriftMonitor, X: np.ndarray, batch: int = 7) -> None:
    for start in range(0, len(X), batch):
        monitor.observe_rows(X[start:start + batch])


def test_in_distribution_traffic_stays_stable_and_a_scaled_feature_stands_out(bundle):
    users = make_synthetic(n_users=4000, n_items=60, seed=77).features  # same generator, unseen users
    monitor = DriftMonitor(bundle.fitted, bundle.feature_names, window=2000)
    feed(monitor, users)
    stable = monitor.feature_psi()
    assert set(stable) == set(bundle.feature_names)
    assert max(stable.values()) < STABLE, stable

    shifted = users.copy()
    j = bundle.feature_names.index("spend_90d")
    shifted[:, j] *= 3
    feed(monitor, shifted[:2000])  # one window of shifted rows
    drifted = monitor.feature_psi()
    assert drifted["spend_90d"] > SIGNIFICANT, drifted
    assert max(v for k, v in drifted.items() if k != "spend_90d") < STABLE, drifted


def test_nothing_is_said_before_enough_rows(bundle):
    monitor = DriftMonitor(bundle.fitted, bundle.feature_names, window=500, min_rows=200)
    feed(monitor, make_synthetic(n_users=150, n_items=60, seed=3).features)
    assert all(math.isnan(v) for v in monitor.feature_psi().values()) and math.isnan(monitor.segment_psi())


def test_segment_mix_against_the_training_mix(bundle):
    share = bundle.fitted.segment_share
    assert share is not None and abs(share.sum() - 1) < 1e-12
    monitor = DriftMonitor(bundle.fitted, bundle.feature_names, window=1000)
    like_training = np.repeat(np.arange(len(share)), np.round(share * 1000).astype(int))
    monitor.observe_segments(np.random.default_rng(0).permutation(like_training))
    assert monitor.segment_psi() < STABLE
    monitor.observe_segments(np.zeros(1000, dtype=np.int64))  # everyone in segment 0
    assert monitor.segment_psi() > SIGNIFICANT


def test_sliding_counts_equal_a_recount_of_the_last_rows():
    rng = np.random.default_rng(5)
    counts = SlidingCounts([4, 3], window=50)
    seen = []
    for size in rng.integers(1, 80, 40):  # batches smaller and larger than the window
        bins = np.column_stack([rng.integers(0, 4, size), rng.integers(0, 3, size)])
        counts.add(bins)
        seen.append(bins)
        last = np.concatenate(seen)[-50:]
        expected = np.concatenate([np.bincount(last[:, 0], minlength=4), np.bincount(last[:, 1], minlength=3)])
        assert counts.counts.tolist() == expected.tolist()
        assert counts.filled == min(len(np.concatenate(seen)), 50)


def test_psi_of_equal_distributions_is_zero_and_grows_with_the_difference():
    even = np.full(4, 0.25)
    assert psi(even, even) == 0.0
    assert 0 < psi(even, np.array([0.3, 0.2, 0.25, 0.25])) < psi(even, np.array([0.7, 0.1, 0.1, 0.1]))


@pytest.mark.heavy
def test_the_transformer_exposes_the_drift_gauges(stack, raw_users):
    body = {"instances": raw_users[:250].tolist()}
    assert httpx.post(f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30).status_code == 200
    text = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("embedder_feature_drift_psi{")]
    assert len(lines) == 12 and all(not math.isnan(float(line.rsplit(" ", 1)[1])) for line in lines), lines
    assert any(line.startswith(f'embedder_segment_mix_drift_psi{{model_name="{MODEL_NAME}"}}') for line in text.splitlines())


def test_drift_needs_the_training_quantiles():
    fitted = FittedSteps((AffineStep(subtract=np.zeros(2)),), np.zeros((2, 3)))
    with pytest.raises(ValueError) as caught:
        DriftMonitor(fitted, ("a", "b"))
    assert str(caught.value) == "drift needs the training quantiles: the first scaler step is not a QuantileTransformer"


def test_the_index_does_not_depend_on_how_rows_arrive(bundle):
    """Rows are binned 256 at a time or at a scrape: one row per request, or all at once, read the same."""
    users = make_synthetic(n_users=700, n_items=60, seed=5).features
    one_by_one, at_once = (DriftMonitor(bundle.fitted, bundle.feature_names, window=500) for _ in range(2))
    feed(one_by_one, users, batch=1)
    at_once.observe_rows(users)
    assert one_by_one.feature_psi() == at_once.feature_psi()
    without_mix = DriftMonitor(FittedSteps(bundle.fitted.scaler, bundle.fitted.centers), bundle.feature_names)
    without_mix.observe_segments(np.zeros(500, dtype=np.int64))  # no training mix recorded: nothing to say
    assert math.isnan(without_mix.segment_psi())


def test_the_index_speaks_from_exactly_min_rows_rows(bundle):
    users = make_synthetic(n_users=200, n_items=60, seed=6).features
    monitor = DriftMonitor(bundle.fitted, bundle.feature_names)  # the defaults: 2000 rows, said from 200
    assert (monitor.features.window, monitor.min_rows) == (2000, 200)
    labels = np.arange(200) % bundle.fitted.centers.shape[0]
    monitor.observe_rows(users[:100])  # two requests' rows, binned together at the scrape
    monitor.observe_rows(users[100:199])
    monitor.observe_segments(labels[:199])
    assert all(math.isnan(v) for v in monitor.feature_psi().values()) and math.isnan(monitor.segment_psi())
    monitor.observe_rows(users[199:])
    monitor.observe_segments(labels[199:])
    assert not any(math.isnan(v) for v in monitor.feature_psi().values()) and not math.isnan(monitor.segment_psi())


def test_at_most_batch_rows_rows_wait_to_be_binned(bundle):
    from transformer.serving.drift import BATCH_ROWS

    users = make_synthetic(n_users=BATCH_ROWS, n_items=60, seed=7).features
    monitor = DriftMonitor(bundle.fitted, bundle.feature_names)
    for row in users[:-1]:
        monitor.observe_rows(row[None, :])
    assert (monitor.features.rows, monitor._pending) == (0, BATCH_ROWS - 1)  # waiting for a scrape or more rows
    monitor.observe_rows(users[-1:])
    assert (monitor.features.rows, monitor._pending, monitor._rows) == (BATCH_ROWS, 0, [])

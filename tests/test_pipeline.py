"""One model version's pipeline, in process: the contract it asks TF Serving for, the scaling it sends and
the ranking it makes of the answer, compared with scikit-learn and the rules written in plain Python.
Fast: the bundle is built in memory from small estimators fitted in the test."""

from pathlib import Path

import numpy as np
import pytest
from conftest import reference_top_items
from sklearn.cluster import KMeans
from sklearn.preprocessing import QuantileTransformer

from transformer.store.bundle import Bundle, ModelSpec, Rules
from transformer.steps.fitted import FittedSteps
from transformer.pipeline import Pipeline
from transformer.predictor import Contract, PredictorError

RNG = np.random.default_rng(5)
X = RNG.lognormal(1.0, 1.0, size=(300, 3))
EMBEDDINGS = RNG.normal(size=(300, 4))
N_ITEMS = 6
SCALER = QuantileTransformer(n_quantiles=30, output_distribution="normal").fit(X)
SEGMENTS = KMeans(n_clusters=3, n_init=2, random_state=0).fit(EMBEDDINGS)


def spec(n_candidates=4, candidates_signature="candidates"):
    return ModelSpec(name="embedder", version=7, signature_name="serving_default", input_name="features",
                     embedding_output="embedding", scores_output="scores", n_features=3, embedding_dim=4,
                     n_items=N_ITEMS, candidates_signature=candidates_signature, n_candidates=n_candidates)


def bundle(model=None, rules=Rules(min_score=0.3, top_k=3), item_ids=None, estimators=True):
    fitted = FittedSteps.from_estimators(SCALER, SEGMENTS, item_ids)
    return Bundle(path=Path("nowhere"), version=7, feature_names=("a", "b", "c"), feature_min=(0.0,) * 3,
                  feature_max=(1.0,) * 3, model=model or spec(), rules=rules, fitted=fitted, manifest={},
                  scaler=SCALER if estimators else None, segments=SEGMENTS if estimators else None)


def test_the_contract_asks_for_candidates_when_the_model_ranks_enough_of_them():
    assert Pipeline(bundle()).contract == Contract("candidates", "features", 3, {
        "embedding": ("DT_FLOAT", 4), "candidate_ids": ("DT_INT64", 4), "candidate_scores": ("DT_FLOAT", 4)}, 7)
    every_score = Contract("serving_default", "features", 3, {"embedding": ("DT_FLOAT", 4),
                                                               "scores": ("DT_FLOAT", N_ITEMS)}, 7)
    assert Pipeline(bundle(), full_scores=True).contract == every_score
    assert Pipeline(bundle(spec(candidates_signature=""))).contract == every_score
    assert Pipeline(bundle(spec(n_candidates=2))).contract == every_score  # fewer than top_k = 3
    assert Pipeline(bundle(spec(n_candidates=3))).use_candidates  # exactly top_k
    # a rule asking for more than the catalogue holds needs only the whole catalogue as candidates
    wide = Pipeline(bundle(spec(n_candidates=N_ITEMS), rules=Rules(min_score=0.0, top_k=50)))
    assert wide.use_candidates and Pipeline(bundle(spec(n_candidates=N_ITEMS - 1), rules=Rules(0.0, 50))).contract \
        == every_score


@pytest.mark.parametrize("kernels", ["numpy", "sklearn"])
def test_scaling_is_scikit_learns_in_float64_then_float32(kernels):
    rows = np.vstack([X[:20], [[-5.0, 0.0, 1e6]]])
    scaled = Pipeline(bundle(), kernels=kernels).scale(rows)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, SCALER.transform(rows).astype(np.float32))


@pytest.mark.parametrize("kernels", ["numpy", "sklearn"])
def test_ranking_every_score_matches_scikit_learn_and_the_rules(kernels):
    pipeline = Pipeline(bundle(), kernels=kernels, full_scores=True)
    embeddings = EMBEDDINGS[:40].astype(np.float32)
    scores = RNG.uniform(0, 1, size=(40, N_ITEMS)).astype(np.float32)
    scores[0] = [0.5, 0.9, 0.5, 0.1, 0.3, 0.2999]  # ties to the lower id, the threshold itself kept
    ranked = pipeline.rank({"embedding": embeddings, "scores": scores})
    np.testing.assert_array_equal(ranked.labels, SEGMENTS.predict(embeddings.astype(np.float64)))
    np.testing.assert_allclose(ranked.distances, SEGMENTS.transform(embeddings.astype(np.float64)).min(axis=1),
                               rtol=1e-12)
    expected = reference_top_items(scores, 0.3, 3)
    assert [row[keep].tolist() for row, keep in zip(ranked.item_ids, ranked.keep)] == expected
    assert expected[0] == [1, 0, 2]
    assert [s[k].tolist() for s, k in zip(ranked.item_scores, ranked.keep)] == [
        [float(scores[i, j]) for j in row] for i, row in enumerate(expected)]


def test_ranking_candidates_gives_the_same_answer_as_every_score():
    scores = RNG.uniform(0, 1, size=(25, N_ITEMS)).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    embeddings = EMBEDDINGS[:25].astype(np.float32)
    full = Pipeline(bundle(), full_scores=True).rank({"embedding": embeddings, "scores": scores})
    candidates = Pipeline(bundle()).rank({"embedding": embeddings, "candidate_ids": order,
                                          "candidate_scores": np.take_along_axis(scores, order, axis=1)})
    for a, b in ((full.item_ids, candidates.item_ids), (full.keep, candidates.keep), (full.labels, candidates.labels)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.where(full.keep, full.item_scores, 0), np.where(candidates.keep,
                                                                                    candidates.item_scores, 0))


@pytest.mark.parametrize("bad", [-1, N_ITEMS])
def test_candidate_ids_outside_the_catalogue_are_the_predictors_fault(bad):
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    ids = np.array([[0, 1, bad, 2]])
    with pytest.raises(PredictorError) as caught:
        Pipeline(bundle()).rank({"embedding": EMBEDDINGS[:1], "candidate_ids": ids, "candidate_scores": scores})
    assert (caught.value.status, caught.value.cause, str(caught.value)) == (
        502, "predictor_bad_answer", "the predictor's 'candidate_ids' holds item indices outside [0, 6): is it "
                                     "serving the model this bundle was trained with?")
    # past top_k the candidates are not read, so not judged
    ranked = Pipeline(bundle()).rank({"embedding": EMBEDDINGS[:1], "candidate_ids": np.array([[0, 1, 2, bad]]),
                                      "candidate_scores": scores})
    assert ranked.item_ids.tolist() == [[0, 1, 2]]


def test_answers_carry_the_users_own_item_ids():
    catalogue = [f"sku-{i}" for i in range(N_ITEMS)]
    pipeline = Pipeline(bundle(item_ids=catalogue), full_scores=True)
    scores = np.array([[0.1, 0.9, 0.8, 0.2, 0.7, 0.6]], np.float32)
    ranked = pipeline.rank({"embedding": EMBEDDINGS[:1], "scores": scores})
    assert ranked.item_ids.tolist() == [["sku-1", "sku-2", "sku-4"]] and ranked.keep.all()


def test_a_pipeline_that_cannot_be_built_says_why():
    with pytest.raises(ValueError) as caught:
        Pipeline(bundle(), kernels="torch")
    assert str(caught.value) == "kernels must be one of numpy, sklearn, got 'torch'"
    with pytest.raises(ValueError) as caught:
        Pipeline(bundle(estimators=False), kernels="sklearn")
    assert str(caught.value) == "kernels='sklearn' needs the estimators: load the bundle with estimators=True"
    assert Pipeline(bundle(estimators=False)).version == 7  # the numpy kernels need only the numbers
    from dataclasses import replace

    for half in (replace(bundle(), segments=None), replace(bundle(), scaler=None)):  # either estimator missing
        with pytest.raises(ValueError):
            Pipeline(half, kernels="sklearn")


def test_too_few_candidates_for_the_rules_is_said_once_when_the_version_is_built(caplog):
    with caplog.at_level("INFO", logger="transformer"):
        pipeline = Pipeline(bundle(spec(n_candidates=2)))
    assert pipeline.use_candidates is False and pipeline.bundle.version == 7
    assert caplog.messages == ["version 7 ranks 2 candidates, the rules want 3: asking for every score"]


@pytest.mark.parametrize("min_score, top_k, message", [
    (-0.01, 3, "min_score must be within [0, 1], got -0.01"), (1.01, 3, "min_score must be within [0, 1], got 1.01"),
    (0.5, 0, "top_k must be at least 1, got 0"),
])
def test_rules_out_of_range_are_refused(min_score, top_k, message):
    with pytest.raises(ValueError) as caught:
        Rules(min_score=min_score, top_k=top_k)
    assert str(caught.value) == message
    assert Rules(min_score=0.0, top_k=1) and Rules(min_score=1.0, top_k=1)

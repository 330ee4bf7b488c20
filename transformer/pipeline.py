"""What one model version computes around TF Serving, with no protocol in sight.

    raw features (n, F) float64 --scale--> float32 (n, F) --[TF Serving, pinned version]-->
    outputs --rank--> segments, distances, best item ids and scores

A :class:`Pipeline` is built once per model version from its verified bundle and
never changes; requests hold the pipeline they started with, so a model update
never mixes the steps of two versions in one answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from transformer.store.bundle import Bundle
from transformer.steps.kernels import (
    NearestCentroid, SklearnScaler, SklearnSegmenter, rules_on_candidates, steps_kernel, top_items,
)
from transformer.predictor import Contract, PredictorError

log = logging.getLogger("transformer")

KERNELS = ("numpy", "sklearn")


@dataclass(frozen=True)
class Ranked:
    """The answer for n rows: segment and distance per row, best items (n, k) by their own ids (int64 or
    text) with ``keep`` marking the entries that pass the rules."""

    labels: np.ndarray
    distances: np.ndarray
    item_ids: np.ndarray
    item_scores: np.ndarray
    keep: np.ndarray


class Pipeline:
    """The fitted steps of one model version and the TF Serving contract they were fitted for."""

    def __init__(self, bundle: Bundle, *, kernels: str = "numpy", full_scores: bool = False):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.bundle = bundle
        self.version = bundle.version
        self.feature_names = bundle.feature_names
        self.spec = bundle.model
        self.rules = bundle.rules
        self.catalogue = bundle.fitted.item_ids  # item index -> the users' own id; None: the index is the id
        if kernels == "numpy":  # the fitted numbers, read without unpickling anything
            self.scaler = steps_kernel(bundle.fitted.scaler)
            self.segmenter = NearestCentroid(bundle.fitted.centers)
        else:  # the naive baseline, for the benchmark: needs the unpickled estimators
            if bundle.scaler is None or bundle.segments is None:
                raise ValueError("kernels='sklearn' needs the estimators: load the bundle with estimators=True")
            self.scaler = SklearnScaler(bundle.scaler)
            self.segmenter = SklearnSegmenter(bundle.segments)
        self.contract, self.use_candidates = self._contract(full_scores)

    def _contract(self, full_scores: bool) -> tuple[Contract, bool]:
        """Ask for the model's best candidates when it offers enough of them, else for every score."""
        spec, rules = self.spec, self.rules
        outputs = {spec.embedding_output: ("DT_FLOAT", spec.embedding_dim)}
        use_candidates = bool(spec.candidates_signature) and not full_scores
        if use_candidates and spec.n_candidates < min(rules.top_k, spec.n_items):
            log.info("version %d ranks %d candidates, the rules want %d: asking for every score",
                     self.version, spec.n_candidates, rules.top_k)
            use_candidates = False
        if use_candidates:
            outputs[spec.candidate_ids_output] = ("DT_INT64", spec.n_candidates)
            outputs[spec.candidate_scores_output] = ("DT_FLOAT", spec.n_candidates)
            signature = spec.candidates_signature
        else:
            outputs[spec.scores_output] = ("DT_FLOAT", spec.n_items)
            signature = spec.signature_name
        return Contract(signature, spec.input_name, spec.n_features, outputs, self.version), use_candidates

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Raw features (n, F) float64 -> the model's input, float32 (scaled in float64 first:
        scikit-learn's bounds are an absolute 1e-7 that float32 cannot resolve)."""
        return self.scaler.transform(X).astype(np.float32)

    def rank(self, outputs: dict[str, np.ndarray]) -> Ranked:
        """TF Serving's outputs -> nearest centroid and the best items under the rules."""
        spec, rules = self.spec, self.rules
        labels, distances = self.segmenter.assign(outputs[spec.embedding_output])
        if self.use_candidates:
            ids, scores, keep = rules_on_candidates(outputs[spec.candidate_ids_output],
                                                    outputs[spec.candidate_scores_output], rules.min_score, rules.top_k)
            if ids.size and (ids.min() < 0 or ids.max() >= spec.n_items):
                raise PredictorError(502, f"the predictor's {spec.candidate_ids_output!r} holds item indices outside "
                                     f"[0, {spec.n_items}): is it serving the model this bundle was trained with?",
                                     "predictor_bad_answer")
        else:
            ids, scores, keep = top_items(outputs[spec.scores_output], rules.min_score, rules.top_k)
        if self.catalogue is not None:
            ids = self.catalogue[ids]
        return Ranked(labels, distances, ids, scores, keep)

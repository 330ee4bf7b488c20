"""The quality gate: a candidate version against the served one, on the same held-out users.

Both versions answer the held-out users of the candidate's training (the split its manifest records)
the way the transformer would: the bundle's fitted steps (``transformer/pipeline.py``) around the
version's own SavedModel, called directly. Items are compared by their own ids, so two versions with
different catalogues are judged alike. The candidate passes when

* its recall@k beats the popularity baseline of its training users by ``min_lift_over_popularity``
  (a model no better than "everyone gets the bestsellers" is not worth serving), and
* it loses at most ``max_drop_from_served`` of the served version's recall@k (relative): retraining
  on the same kind of data moves recall by a few percent (the demo's synthetic data with seeds 0-4:
  recall@10 from 0.412 to 0.429, 4% apart), a broken training far more.

Before anything is scored, the candidate's interface (features by name and order, top-k, segment count, item
id type: :mod:`transformer.store.interface`) must be the served version's: a candidate its clients could not call fails
with the differences named, and the served version is not asked to answer rows it cannot read.

The segments' agreement (adjusted Rand index of the two versions' segments on the same users, and of
the candidate's with known labels when the data has them) is reported, not gated: a retrained KMeans
may split users differently and still be right.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.data import UserData
from model.quality import recall_at_k_of_ids

if TYPE_CHECKING:
    from transformer.pipeline import Ranked

BATCH_ROWS = 4096


@dataclass(frozen=True)
class Thresholds:
    min_lift_over_popularity: float = 0.10
    max_drop_from_served: float = 0.10

    def __post_init__(self) -> None:
        if self.min_lift_over_popularity < 0:
            raise ValueError(f"min_lift_over_popularity must be >= 0, got {self.min_lift_over_popularity}")
        if not 0 <= self.max_drop_from_served < 1:
            raise ValueError(f"max_drop_from_served must be within [0, 1), got {self.max_drop_from_served}")


@dataclass(frozen=True)
class VersionAnswers:
    version: int
    segments: np.ndarray  # (n,) the nearest centroid of each user
    top_ids: np.ndarray  # (n, k) the k best items by their own ids, best first (before the minimum score)


def ranked_offline(version_dir: str | Path, raw: np.ndarray) -> tuple[int, Ranked]:
    """(version, what the transformer answers for raw feature rows): the version's bundle steps around its
    SavedModel, called directly, in batches of BATCH_ROWS."""
    import tensorflow as tf

    from transformer.pipeline import Pipeline, Ranked
    from transformer.store.bundle import load_bundle

    pipeline = Pipeline(load_bundle(version_dir))
    signature = tf.saved_model.load(str(version_dir)).signatures[pipeline.contract.signature]
    parts = []
    for start in range(0, raw.shape[0], BATCH_ROWS):
        scaled = pipeline.scale(raw[start:start + BATCH_ROWS])
        outputs = signature(**{pipeline.spec.input_name: tf.constant(scaled)})
        parts.append(pipeline.rank({name: value.numpy() for name, value in outputs.items()}))
    return pipeline.version, Ranked(*(np.concatenate([getattr(p, f) for p in parts])
                                      for f in ("labels", "distances", "item_ids", "item_scores", "keep")))


def answers_of(version_dir: str | Path, raw: np.ndarray, k: int) -> VersionAnswers:
    """A model version's segments and k best items (before the minimum score) for raw feature rows."""
    version, ranked = ranked_offline(version_dir, raw)
    return VersionAnswers(version, ranked.labels, ranked.item_ids[:, :k])


@dataclass
class Evaluation:
    k: int
    n_users: int
    candidate: int
    candidate_recall: float
    popularity_recall: float
    served: int | None = None
    served_recall: float | None = None
    segment_agreement: float | None = None  # ARI of the two versions' segments
    known_segment_agreement: float | None = None  # ARI of the candidate's segments with known labels
    thresholds: Thresholds = field(default_factory=Thresholds)
    interface_changes: list[str] = field(default_factory=list)  # what a served version's client would find changed
    n_train_users: int | None = None  # the candidate's training users, from its manifest
    split_problem: str = ""  # why the held-out users are not the candidate's test split ("": they are)
    reasons: list[str] = field(default_factory=list)  # why the candidate fails; empty: it passes

    @property
    def passed(self) -> bool:
        return not self.reasons

    def metrics(self) -> dict[str, float]:
        """The numbers, for the pipeline's metrics output (absent ones left out)."""
        values = {f"candidate_recall_at_{self.k}": self.candidate_recall,
                  f"popularity_recall_at_{self.k}": self.popularity_recall,
                  f"served_recall_at_{self.k}": self.served_recall,
                  "segment_agreement_with_served": self.segment_agreement,
                  "segment_agreement_with_known_labels": self.known_segment_agreement,
                  "held_out_users": float(self.n_users), "passed": float(self.passed)}
        return {name: float(v) for name, v in values.items() if v is not None}

    def markdown(self) -> str:
        def num(v):
            return "n/a" if v is None else f"{v:.4f}"

        t = self.thresholds
        lines = [
            f"# Quality gate: version {self.candidate} {'passes' if self.passed else 'fails'}",
            "",
            f"On {self.n_users} held-out users (the candidate's test split"
            + (f"; it was trained on {self.n_train_users} others" if self.n_train_users is not None else "")
            + f"), best {self.k} items, ids compared as text.",
            "",
            "| | recall@k | segments' agreement (ARI) |",
            "| --- | ---: | ---: |",
            f"| candidate (version {self.candidate}) | {num(self.candidate_recall)} | "
            + (f"{num(self.known_segment_agreement)} with known labels |" if self.known_segment_agreement is not None
               else "no known labels |"),
            f"| served (version {self.served if self.served is not None else 'none'}) | {num(self.served_recall)} | "
            + (f"{num(self.segment_agreement)} with the candidate |" if self.segment_agreement is not None else "|"),
            f"| popularity baseline | {num(self.popularity_recall)} | |",
            "",
            f"Thresholds: beat popularity by {t.min_lift_over_popularity:.0%}; lose at most "
            f"{t.max_drop_from_served:.0%} of the served version's recall.",
        ]
        if self.interface_changes:
            lines += ["", f"The candidate's interface differs from version {self.served}'s (not scored against it):",
                      *[f"  - {c}" for c in self.interface_changes]]
        if self.reasons:
            lines += ["", "Fails because:", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines) + "\n"


def read_held_out(directory: str | Path) -> tuple[UserData, list[str]]:
    """The held-out users ``python -m model.train --held-out DIR`` wrote, and the popularity baseline's items."""
    from model.csv_input import load_two_files

    def columns(path: Path) -> list[str]:
        with path.open(newline="") as f:
            return next(csv.reader(f), [])

    directory = Path(directory)
    users, interactions = directory / "users.csv", directory / "interactions.csv"
    data, _ = load_two_files(users, interactions,
                             weight_column="weight" if "weight" in columns(interactions) else None,
                             label_column="segment" if "segment" in columns(users) else None)
    return data, json.loads((directory / "popularity.json").read_text())["item_ids"]


def evaluate(candidate_dir: str | Path, served_dir: str | Path | None, held_out: UserData, popularity_ids: list[str],
             *, k: int = 10, thresholds: Thresholds = Thresholds()) -> Evaluation:
    """Judge the candidate version folder against the served one (None: nothing is served yet) on the
    held-out users; ``popularity_ids``: the training users' most chosen items, best first."""
    from sklearn.metrics import adjusted_rand_score

    from transformer.store.interface import Interface, differences
    from transformer.store.bundle import load_bundle

    changes = []
    if served_dir is not None:
        changes = differences(Interface.of(load_bundle(served_dir)), Interface.of(load_bundle(candidate_dir)))
    training = load_bundle(candidate_dir).manifest.get("training", {})
    candidate = answers_of(candidate_dir, held_out.features, k)
    served = answers_of(served_dir, held_out.features, k) if served_dir is not None and not changes else None
    # Every list is cut to the shortest (a version ranks at most its rules' top-k): recall@k of equals.
    k = min(k, len(popularity_ids), candidate.top_ids.shape[1], *([served.top_ids.shape[1]] if served else []))
    popularity = np.broadcast_to(np.asarray(popularity_ids[:k], dtype=object), (held_out.n_users, k))
    result = Evaluation(k=k, n_users=held_out.n_users, candidate=candidate.version,
                        candidate_recall=recall_at_k_of_ids(candidate.top_ids[:, :k], held_out),
                        popularity_recall=recall_at_k_of_ids(popularity, held_out), thresholds=thresholds,
                        interface_changes=changes, n_train_users=training.get("n_train_users"),
                        split_problem=split_problem(training.get("held_out"), held_out))
    if changes:
        result.served = load_bundle(served_dir).version
    if held_out.segments is not None:
        result.known_segment_agreement = float(adjusted_rand_score(held_out.segments, candidate.segments))
    if served is not None:
        result.served, result.served_recall = served.version, recall_at_k_of_ids(served.top_ids[:, :k], held_out)
        result.segment_agreement = float(adjusted_rand_score(served.segments, candidate.segments))

    result.reasons = reasons_to_fail(result)
    return result


def split_problem(recorded: dict | None, held_out: UserData) -> str:
    """Why ``held_out`` is not the test split the candidate's training recorded ("": it is, or nothing was
    recorded). Measured on users it was trained on, a candidate would look better than it is."""
    if not recorded:
        return ""
    fingerprint = held_out.ids_fingerprint()
    if fingerprint == recorded.get("train_ids_sha256"):
        return (f"the held-out users are the candidate's training users ({held_out.n_users} of them), not its test "
                "split: its figures would be measured on users it learned from")
    if held_out.n_users != recorded.get("users") or fingerprint != recorded.get("ids_sha256"):
        return (f"the held-out users ({held_out.n_users}) are not the candidate's test split ({recorded.get('users')} "
                "users, by their ids): pass the held-out folder its own training wrote")
    return ""


def reasons_to_fail(result: Evaluation) -> list[str]:
    """Why the measured candidate fails its thresholds (empty: it passes)."""
    t, k, recall = result.thresholds, result.k, result.candidate_recall
    reasons = [result.split_problem] if result.split_problem else []
    if result.interface_changes:
        reasons.append(
            f"its interface is not version {result.served}'s, so every client of that version would break ("
            + "; ".join(result.interface_changes) + "): keep the features, top-k and segments, or publish it as a "
            "new model served beside this one (run-local --model-name NEW --new-model; the pipeline's model_name)")
    floor = result.popularity_recall * (1 + t.min_lift_over_popularity)
    if not recall > floor:
        reasons.append(
            f"recall@{k} {recall:.4f} does not beat the popularity baseline {result.popularity_recall:.4f} by "
            f"{t.min_lift_over_popularity:.0%} (needs > {floor:.4f}): the features did not teach the model which "
            "items users take; check the interactions (user ids matched to the right users?)")
    if result.served_recall is not None:
        least = result.served_recall * (1 - t.max_drop_from_served)
        if recall < least:
            reasons.append(
                f"recall@{k} {recall:.4f} is below the served version {result.served}'s {result.served_recall:.4f} "
                f"by more than {t.max_drop_from_served:.0%} (needs >= {least:.4f})")
    return reasons

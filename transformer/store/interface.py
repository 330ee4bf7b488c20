"""A model version's interface: what its clients send and get back, compared between two versions.

Clients build requests from the served version's features (their names, in order: the v1 rows by name, the v2
``features`` tensor by position) and read its answers (the segments, at most ``top_k`` items, ids of one type).
A retrained version that changes any of it answers existing clients 400 or something they do not expect, however
good its recall. The quality gate (:mod:`model.gate`) therefore refuses such a candidate, saying what differs,
before anything is scored; a deliberate change is published under a new model name, served beside the old one
until the clients have moved (README, "Change the features without breaking clients").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interface:
    features: tuple[str, ...]  # the request's columns, in order
    top_k: int  # at most this many items an answer
    n_segments: int  # segment ids are 0..n_segments-1
    item_id_type: str  # "integer" or "text"

    @classmethod
    def of(cls, bundle) -> "Interface":
        """A loaded bundle's interface (``transformer.store.bundle.load_bundle``)."""
        ids = bundle.fitted.item_ids
        text = ids is not None and not np.issubdtype(np.asarray(ids).dtype, np.integer)
        return cls(tuple(bundle.feature_names), int(bundle.rules.top_k), int(bundle.n_segments),
                   "text" if text else "integer")


def differences(served: Interface, candidate: Interface) -> list[str]:
    """What a client of ``served`` would find changed in ``candidate`` (empty: nothing), each said in full."""
    found = []
    if served.features != candidate.features:
        old, new = list(served.features), list(candidate.features)
        missing = [f for f in old if f not in new]
        added = [f for f in new if f not in old]
        parts = []
        if missing:
            parts.append("no longer has " + ", ".join(repr(f) for f in missing))
        if added:
            parts.append("adds " + ", ".join(repr(f) for f in added))
        if not missing and not added:
            parts.append(f"orders them {new} instead of {old}")
        elif len(old) != len(new):
            parts.append(f"{len(new)} features instead of {len(old)}")
        found.append("features: the candidate " + "; ".join(parts))
    if served.top_k != candidate.top_k:
        found.append(f"top_k: answers hold at most {candidate.top_k} items instead of {served.top_k}")
    if served.n_segments != candidate.n_segments:
        found.append(f"segments: {candidate.n_segments} instead of {served.n_segments}")
    if served.item_id_type != candidate.item_id_type:
        found.append(f"item ids: {candidate.item_id_type} instead of {served.item_id_type}")
    return found

"""A model version's interface: what its clients send and get back, compared between two versions.

Clients build requests from the served version's features (their names, in order: the v1 rows by name, the v2
``features`` tensor by position) and read its answers (the segments, at most ``top_k`` items, ids of one type).
A retrained version that changes any of it answers existing clients 400 or something they do not expect, however
good its recall. So three places refuse such a version, each saying what differs: the quality gate
(:mod:`model.gate`) before anything is scored, training (``model.train``) before it trains into a store whose
model serves another interface, and the transformer (:mod:`transformer.store.versions`), which keeps serving the
interface it serves. A deliberate change is published under a new model name, served beside the old one until the
clients have moved (model/README.md, "Change the features without breaking clients").

The transformer reads no TensorFlow and no scikit-learn, so this module lives on its side of the import graph
(``model`` imports ``transformer``, never the reverse).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The interface a model name's clients are served, beside its version folders: ``<store>/<model>/interface.json``.
# TF Serving reads only numeric folders there and every reader of ours ignores other names, so it travels with the
# versions (a volume's subPath, a bucket prefix the storage initializer copies) and outlives any one transformer:
# a pod started after an incompatible version landed still serves the interface its clients call.
INTERFACE_FILE = "interface.json"


class InterfaceFileError(ValueError):
    """The model's interface file cannot be read; the message says which file and what to do."""


@dataclass(frozen=True)
class Interface:
    features: tuple[str, ...]  # the request's columns, in order
    top_k: int  # at most this many items an answer
    n_segments: int  # segment ids are 0..n_segments-1
    item_id_type: str  # "integer" or "text"

    @classmethod
    def of(cls, bundle) -> "Interface":
        """A loaded bundle's interface (``transformer.store.bundle.load_bundle``)."""
        return cls.of_parts(bundle.feature_names, bundle.rules.top_k, bundle.n_segments, bundle.fitted.item_ids)

    @classmethod
    def of_parts(cls, features, top_k: int, n_segments: int, item_ids) -> "Interface":
        """The interface a version trained with these would have (``item_ids``: the catalogue, or None for
        ids that are the item indices)."""
        text = item_ids is not None and not np.issubdtype(np.asarray(item_ids).dtype, np.integer)
        return cls(tuple(features), int(top_k), int(n_segments), "text" if text else "integer")

    def features_flag(self) -> str:
        """The training option that keeps these features in this order."""
        return "--features " + ",".join(self.features)


def interface_file(model_dir: str | Path) -> Path:
    return Path(model_dir) / INTERFACE_FILE


def read_interface(model_dir: str | Path) -> Interface | None:
    """The interface recorded for the model whose version folders are in ``model_dir`` (None: none recorded).

    Raises:
        InterfaceFileError: the file is there but is not an interface.
    """
    path = interface_file(model_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InterfaceFileError(f"{path} cannot be read ({exc}): check its permissions") from None
    return parse_interface(text, str(path))


def parse_interface(text: str, where: str) -> Interface:
    """An interface file's text (``where``: its path or URI, for the message). Raises InterfaceFileError."""
    try:
        data = json.loads(text)
        return Interface(tuple(str(f) for f in data["features"]), int(data["top_k"]), int(data["n_segments"]),
                         str(data["item_id_type"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InterfaceFileError(f"{where} is not a model interface ({type(exc).__name__}: {exc}): restore it, or "
                                 "delete it to take the newest version's interface") from None


def interface_text(interface: Interface) -> str:
    return json.dumps({**asdict(interface), "features": list(interface.features)}, indent=2) + "\n"


def write_interface(model_dir: str | Path, interface: Interface) -> Path:
    """Record ``interface`` as the model's, replacing the file in one rename (a reader sees the old or the new)."""
    path = interface_file(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".interface-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(interface_text(interface))
        os.chmod(staging, 0o644)  # mkstemp's 0600 would hide it from the serving images' user
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


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

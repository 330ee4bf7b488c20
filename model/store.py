"""The model store: where published versions live, and where TF Serving and the transformer read them.

Two kinds behind one interface, chosen by the location's form (:func:`open_store`):

* a **folder**, ``/path/to/models`` (local, or a volume mounted into the pipeline's pods), holding
  ``<model>/<version>/`` folders; a version appears in one rename (:mod:`model.publish`).
* an **S3-compatible bucket**, ``s3://bucket/prefix``, holding ``<prefix>/<model>/<version>/...`` objects: what
  the production overlay's ``storageUri`` reads (:mod:`model.bucket`). A bucket has no rename, so a version's
  files are put one by one with its markers last, and readers take a version only with them.

Every step of the retraining pipeline that touches the store (the next version's number, the served version
the gate compares with, publish, retire) goes through this interface, so the same pipeline runs against either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from model.publish import PublishError, publish, retire
from transformer.store.bundle import model_versions
from transformer.store.interface import Interface, read_interface, write_interface

S3_SCHEME = "s3://"
RETIRED_PREFIX = ".retired-"  # a retired version's folder: .retired-<version>-<time>, ignored by every reader


class StoreError(RuntimeError):
    """The store cannot be read or written; the message says which and what to check."""


class Store(Protocol):
    location: str

    def models(self) -> list[str]:
        """The names of the models in the store."""

    def holds_model(self, name: str) -> bool:
        """Whether the store has a folder (or prefix) for this model at all."""

    def numbers(self, name: str) -> list[int]:
        """Every version number the model has used here: complete, half-published and retired ones."""

    def versions(self, name: str) -> list[int]:
        """The model's complete versions, oldest first."""

    def fetch(self, name: str, version: int, into: Path) -> Path:
        """A local folder holding that version (a folder store's own; a bucket's, downloaded into ``into``)."""

    def publish(self, folders: dict[str, Path], version: int) -> list[str]:
        """Put each ``{model name: version folder}`` into the store as ``version``, so that no reader ever takes
        half of it for a version. Raises PublishError when the version exists, changing nothing."""

    def retire(self, names: list[str], version: int) -> list[str]:
        """Take ``version`` out for each model name, where every reader ignores it and a person can restore it."""

    def interface(self, name: str) -> Interface | None:
        """The interface recorded for the model's clients (None: none recorded). Raises InterfaceFileError."""

    def record_interface(self, name: str, interface: Interface) -> None:
        """Record the interface the model's clients call, read by every transformer that starts from now on."""


class FolderStore:
    """A folder of ``<model>/<version>/`` folders."""

    def __init__(self, location: str | Path):
        self.root = Path(location)
        self.location = str(location)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def holds_model(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def numbers_in_place(self, name: str) -> list[int]:
        return model_versions(self.root / name) if name else model_versions(self.root)

    def numbers(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        found += [int(p.name.split("-")[1]) for p in folder.glob(f"{RETIRED_PREFIX}*-*") if p.name.split("-")[1].isdigit()]
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        return model_versions(self.root / name)

    def fetch(self, name: str, version: int, into: Path) -> Path:
        return self.root / name / str(version)

    def publish(self, folders: dict[str, Path], version: int) -> list[str]:
        return [str(p) for p in publish(folders, self.root, version)]

    def retire(self, names: list[str], version: int) -> list[str]:
        return [str(p) for p in retire(self.root, names, version)]

    def interface(self, name: str) -> Interface | None:
        return read_interface(self.root / name)

    def record_interface(self, name: str, interface: Interface) -> None:
        write_interface(self.root / name, interface)


def is_bucket(location: str | Path) -> bool:
    return str(location).startswith(S3_SCHEME)


def open_store(location: str | Path, endpoint: str | None = None) -> Store:
    """The store at ``location``: ``s3://bucket/prefix`` (``endpoint``: the S3 API's URL, default
    ``$AWS_ENDPOINT_URL`` or AWS itself) or a folder."""
    if is_bucket(location):
        from model.bucket import BucketStore

        return BucketStore(str(location), endpoint or os.environ.get("AWS_ENDPOINT_URL") or None)
    return FolderStore(location)


__all__ = ["FolderStore", "PublishError", "Store", "StoreError", "is_bucket", "open_store"]

"""Put a model version into the model store so that no reader ever sees half of it, and take one out.

The store is a folder (a local one, or a volume mounted into the pipeline's pods) that holds
``<model>/<version>/`` folders: what TF Serving and the transformer read. Both take a numeric folder as
complete and ignore every other name, so a version is copied under a hidden name in the same
folder (``.staging-<version>-<random>``, the same file system) and renamed into place in one step;
an existing version is never replaced. Taking a version out is one rename too, to
``.retired-<version>-<time>``, which both readers ignore and from which a person can restore it.

A bucket has no rename: :mod:`model.bucket` publishes there with each reader's marker last instead, behind the
same interface (:mod:`model.store`).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path


class PublishError(RuntimeError):
    """The version could not be published; nothing in the store was changed."""


def publish(version_dirs: dict[str, Path], store: str | Path, version: int) -> list[Path]:
    """Copy each ``{model name: version folder}`` into ``store/<model name>/<version>``, atomically per folder.

    Every target is checked first, so a version that exists for any model changes nothing.
    Returns the published folders.
    """
    store = Path(store)
    targets = {name: store / name / str(version) for name in version_dirs}
    taken = [str(t) for t in targets.values() if t.exists()]
    if taken:
        raise PublishError(f"version {version} exists already in the store ({', '.join(taken)}): versions are "
                           "never overwritten; train again to get the next free number")
    staged = {}
    try:
        for name, source in version_dirs.items():
            staging = store / name / f".staging-{version}-{uuid.uuid4().hex[:8]}"
            staging.parent.mkdir(parents=True, exist_ok=True)
            staged[name] = staging  # removed below if anything fails, a half copy included
            shutil.copytree(source, staging)
        published = []
        # The fused folders first, the embedder's last: the transformer serves the embedder's, so once it
        # is there, every model of the version is.
        for name in sorted(staged, key=lambda n: not n.endswith("-fused")):
            os.rename(staged.pop(name), targets[name])
            published.append(targets[name])
        return published
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)


def retire(store: str | Path, names: list[str], version: int) -> list[Path]:
    """Take ``version`` out of the store for each model name (a rename readers ignore); the new names."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for name in names:
        folder = Path(store) / name / str(version)
        if folder.is_dir():
            target = folder.with_name(f".retired-{version}-{stamp}")
            os.rename(folder, target)
            moved.append(target)
    return moved

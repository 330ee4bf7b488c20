"""A small model version folder written in milliseconds: a stand-in SavedModel fingerprint and a bundle of
small estimators fitted here (2 features, 3-dimensional embeddings, 2 segments, 3 items "x", "y", "z")."""

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import QuantileTransformer

from transformer.bundle import ModelSpec, Rules, write_bundle

RNG = np.random.default_rng(3)
X = RNG.normal(size=(120, 2))
SCALER = QuantileTransformer(n_quantiles=10).fit(X)
SEGMENTS = KMeans(n_clusters=2, n_init=2, random_state=0).fit(RNG.normal(size=(120, 3)))
SPEC = ModelSpec(name="embedder", version=4, signature_name="serving_default", input_name="features",
                 embedding_output="embedding", scores_output="scores", n_features=2, embedding_dim=3, n_items=3)
RULES = Rules(min_score=0.25, top_k=2)


def new_version(base, number=4, fingerprint=b"\x08\x01fingerprint"):
    """An empty model version folder ``<base>/embedder/<number>`` holding only a SavedModel fingerprint."""
    folder = base / "embedder" / str(number)
    folder.mkdir(parents=True)
    (folder / "fingerprint.pb").write_bytes(fingerprint)
    return folder


def write(folder, **changes):
    """The bundle of the small estimators into ``folder`` (``changes`` override write_bundle's arguments)."""
    from dataclasses import replace

    options = dict(scaler=SCALER, segments=SEGMENTS, feature_names=("a", "b"), feature_min=(-1.0, -2.0),
                   feature_max=(1.0, 2.0), model=replace(SPEC, version=int(folder.name)), rules=RULES,
                   item_ids=["x", "y", "z"])
    return write_bundle(folder, **{**options, **changes})

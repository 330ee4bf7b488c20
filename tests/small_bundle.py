"""A small model, made in milliseconds: version folders with a stand-in SavedModel fingerprint and a bundle of
small estimators fitted here (2 features, 3-dimensional embeddings, 2 segments, 3 items "x", "y", "z"); TF
Serving scripted as a fixed function of the rows it is sent; the transformer over both; and the answer
computed offline (scikit-learn, the same function, the rules in plain Python) to compare with."""

import numpy as np
from conftest import reference_top_items
from sklearn.cluster import KMeans
from sklearn.preprocessing import QuantileTransformer

from transformer.store.bundle import ModelSpec, Rules, write_bundle
from transformer.predictor import PredictorError, VersionNotServed

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


W = np.array([[1.0, -0.5, 0.25], [0.5, 1.0, -1.0]], np.float32)  # scaled features (2) -> embedding (3)
V = np.array([[1.0, 0.0, -1.0], [0.5, -0.5, 1.0], [-1.0, 1.0, 0.5]], np.float32)  # embedding -> 3 item scores
ROWS = np.array([[0.1, -0.3], [2.0, 1.5], [-1.2, 0.4], [0.0, 0.0], [-3.0, 2.5]])


def model_outputs(scaled: np.ndarray) -> dict:
    """What the scripted TF Serving computes from the float32 rows it is sent."""
    embedding = scaled @ W
    return {"embedding": embedding, "scores": (1 / (1 + np.exp(-(embedding @ V)))).astype(np.float32)}


def offline(rows: np.ndarray, item_ids=("x", "y", "z")) -> list[dict]:
    """The answer computed without the transformer: scikit-learn, the function above, the rules in Python."""
    outputs = model_outputs(SCALER.transform(rows).astype(np.float32))
    embedding = outputs["embedding"].astype(np.float64)
    labels = SEGMENTS.predict(embedding)
    distances = SEGMENTS.transform(embedding)[np.arange(len(rows)), labels]
    best = reference_top_items(outputs["scores"], RULES.min_score, RULES.top_k)
    return [{"segment": int(label), "segment_distance": np.float32(distance),
             "items": [{"id": item_ids[i], "score": outputs["scores"][r, i]} for i in best[r]]}
            for r, (label, distance) in enumerate(zip(labels, distances))]


def signature(input_width: int = 2) -> dict:
    """TF Serving's metadata of the small model (REST JSON form); another ``input_width`` does not fit it."""
    def info(width):
        return {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}, {"size": str(width)}]}}

    return {"metadata": {"signature_def": {"signature_def": {"serving_default": {
        "inputs": {"features": info(input_width)}, "outputs": {"embedding": info(3), "scores": info(3)}}}}}}


class TFServing:
    """TF Serving as the transformer sees it, scripted: the state of each version (AVAILABLE for those
    given), the metadata of each (the small model's, or what ``metadata_by_version`` says: a document or
    an exception to raise), unreachable on demand, and predict on a pinned version."""

    model_name = "embedder"

    def __init__(self, *versions):
        self.states = {v: "AVAILABLE" for v in versions}
        self.metadata_by_version: dict = {}
        self.unreachable = False
        self.gone: set[int] = set()  # versions whose predict calls answer NOT_FOUND
        self.asked: list = []  # "states" and ("metadata", version), in order
        self.calls: list[tuple[int, int]] = []  # (version, rows) of each predict call

    async def predict(self, features, contract):
        self.calls.append((contract.version, features.shape[0]))
        assert features.dtype == np.float32
        if contract.version in self.gone:
            raise VersionNotServed(contract.version, f"TF Serving does not serve version {contract.version}")
        return {name: model_outputs(features)[name] for name in contract.outputs}

    async def version_states(self):
        self.asked.append("states")
        if self.unreachable:
            raise PredictorError(503, "connection refused", "predictor_unreachable")
        return dict(self.states)

    async def metadata(self, version=None):
        self.asked.append(("metadata", version))
        answer = self.metadata_by_version.get(version, signature())
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self):
        pass


def transformer(tmp_path, *versions, tf_serving=None, **options):
    """The KServe model over version folders ``versions`` (written under ``tmp_path``), loaded, its TF Serving
    scripted (by default serving every one of them)."""
    from transformer.model import EmbedderTransformer

    for v in versions:
        write(new_version(tmp_path, v))
    model = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused", **options)
    model._predictor = tf_serving or TFServing(*versions)
    model.load()
    return model

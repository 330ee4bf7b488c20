"""Shared fixtures: one small trained build per test session, and the local stack over it."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

import model  # noqa: F401  (TensorFlow environment defaults, before TensorFlow is imported)
from scripts.localstack import LocalStack

MODEL_NAME = "embedder"

ROOT = Path(__file__).resolve().parent.parent


def fast_files() -> list[str]:
    """The test files of the fast tests: the one list, in pyproject.toml's mutation selection."""
    import tomllib

    selection = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"][
        "pytest_add_cli_args_test_selection"]
    return [arg for arg in selection if arg.startswith("tests/")]


def pytest_collection_modifyitems(config, items):
    """Mark ``fast`` the tests of those files that start no process and train nothing (not ``heavy``):
    ``pytest -m fast`` (README) and the mutation runs (``-m fast`` in the same selection) run exactly these."""
    files = {ROOT / name for name in fast_files()}
    for item in items:
        if Path(item.fspath) in files and item.get_closest_marker("heavy") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    """A build folder trained on small synthetic data (a few seconds)."""
    from model.train import main as train

    out = tmp_path_factory.mktemp("build")
    code = train(["--users", "1500", "--items", "60", "--epochs", "8", "--embedding-dim", "16",
                  "--top-k", "5", "--min-score", "0.2", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def stack(build_dir, tmp_path_factory):
    """The predictor (python -m model.standin) and the transformer, on free loopback ports."""
    with LocalStack(build=build_dir, predictor="local", log_dir=tmp_path_factory.mktemp("logs")) as running:
        yield running


def metric_value(metric: str, model_name: str = "embedder", **labels) -> float:
    """A sample of the process's Prometheus registry (0 while the series does not exist yet)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(metric, {"model_name": model_name, **labels}) or 0.0


def latency_logged(caplog) -> list[str]:
    """The request ids of KServe's latency log lines (``--enable_latency_logging``)."""
    return [r.getMessage().split(",")[0].removeprefix("requestId: ") for r in caplog.records
            if r.getMessage().startswith("requestId: ")]


def progress_line(request, prefix: str):
    """A function that writes one line of a long fixture's progress (a build, a start-up) to pytest's terminal."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[{prefix}] {line}")

    return say


def wait_until(condition, timeout: float, what: str) -> None:
    """Wait for ``condition()`` to hold, checking every 5 ms; fail naming ``what`` after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)


def reference_top_items(scores, min_score, k) -> list[list[int]]:
    """The rules in plain Python: sort by (-score, id), keep the first k, drop those below the minimum."""
    out = []
    for row in scores:
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        out.append([i for i in ranked if row[i] >= np.float32(min_score)])
    return out


def version_dir(build: Path, version: int = 1) -> Path:
    """A model version folder: the SavedModel with its transformer bundle inside."""
    return build / "models" / MODEL_NAME / str(version)


def bundle_path(build: Path, version: int = 1) -> Path:
    from transformer.store.bundle import bundle_dir

    return bundle_dir(version_dir(build, version))


class Offline:
    """The answers computed without the servers: scikit-learn and the SavedModel of one version called directly."""

    def __init__(self, build: Path, version: int = 1):
        import joblib
        import tensorflow as tf

        from transformer.store.bundle import read_manifest

        bundle = bundle_path(build, version)
        self.version = version
        self.manifest = read_manifest(bundle)
        self.scaler = joblib.load(bundle / "scaler.joblib")
        self.kmeans = joblib.load(bundle / "segments.joblib")
        assert self.manifest["model"]["version"] == version
        self.signature = tf.saved_model.load(str(version_dir(build, version))).signatures["serving_default"]
        self.feature_names = [f["name"] for f in self.manifest["features"]]
        self.rules = self.manifest["rules"]
        with np.load(bundle / "fitted.npz", allow_pickle=False) as fitted:  # the catalogue: index -> own id
            self.item_ids = fitted["items.ids"].tolist() if "items.ids" in fitted.files else None

    def model_outputs(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        scaled = self.scaler.transform(np.asarray(raw, dtype=np.float64)).astype(np.float32)
        out = self.signature(features=tf.constant(scaled))
        return out["embedding"].numpy(), out["scores"].numpy()

    def predictions(self, raw: np.ndarray) -> list[dict]:
        embedding, scores = self.model_outputs(raw)
        e64 = embedding.astype(np.float64)
        labels = self.kmeans.predict(e64)
        distances = self.kmeans.transform(e64)[np.arange(len(labels)), labels]
        items = reference_top_items(scores, self.rules["min_score"], self.rules["top_k"])
        return [
            {"segment": int(label), "segment_distance": float(distance),
             "items": [{"id": self.item_ids[i] if self.item_ids else i, "score": float(row[i])} for i in kept]}
            for label, distance, row, kept in zip(labels, distances, scores, items)
        ]


@pytest.fixture(scope="session")
def offline(build_dir) -> Offline:
    return Offline(build_dir)


@pytest.fixture(scope="session")
def raw_users():
    """Raw feature rows of users the model has not seen."""
    from model.synthetic import make_synthetic

    return make_synthetic(n_users=400, n_items=60, seed=123).features


def assert_same_predictions(got: list[dict], expected: list[dict], tol: float = 1e-5) -> None:
    assert len(got) == len(expected)
    for row, (g, e) in enumerate(zip(got, expected)):
        assert g["segment"] == e["segment"], f"row {row}"
        assert abs(g["segment_distance"] - e["segment_distance"]) <= tol, f"row {row}"
        assert [i["id"] for i in g["items"]] == [i["id"] for i in e["items"]], f"row {row}"
        for gi, ei in zip(g["items"], e["items"]):
            assert abs(gi["score"] - ei["score"]) <= tol, f"row {row}"


TRAIN_ARGS = ["--users", "1500", "--items", "60", "--epochs", "8", "--embedding-dim", "16",
              "--top-k", "5", "--min-score", "0.2", "--quiet", "--no-fused"]


def train_version(out: Path, seed: int) -> None:
    from model.train import main as train

    assert train([*TRAIN_ARGS, "--out", str(out), "--seed", str(seed)]) == 0


@pytest.fixture(scope="session")
def two_versions(build_dir, tmp_path_factory) -> Path:
    """A build with version 1 (the session's) and version 2 (trained with another seed)."""
    build = tmp_path_factory.mktemp("two-versions")
    shutil.copytree(version_dir(build_dir, 1), version_dir(build, 1))
    train_version(build, seed=7)
    assert (version_dir(build, 2) / "saved_model.pb").is_file()
    return build


def edit_manifest(bundle: Path, change) -> None:
    """Change a bundle's manifest in place (``change`` edits the parsed JSON)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def rewrite_digest(bundle: Path, name: str) -> None:
    """What an attacker with write access to the store does: change a file, then its sha256 in the manifest."""
    from transformer.store.bundle import sha256_of

    edit_manifest(bundle, lambda m: m["files"][name].__setitem__("sha256", sha256_of(bundle / name)))


class RunsCode:
    """Unpickled, this opens (creates) a marker file: any code could run the same way."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poison(path: Path, marker: Path) -> None:
    """Replace a pickled artifact by one that runs code when loaded."""
    path.write_bytes(pickle.dumps(RunsCode(marker)))


# -- Open Inference Protocol (v2) helpers: requests built and answers read with KServe's own types --------

def run(coro):
    import asyncio

    return asyncio.run(coro)


def matrix_request(rows: np.ndarray, datatype: str = "FP64", binary: bool = False, request_id: str = "r1"):
    from kserve import InferInput, InferRequest

    tensor = InferInput(name="features", shape=list(rows.shape), datatype=datatype)
    tensor.set_data_from_numpy(rows.astype(np.float64 if datatype == "FP64" else np.float32), binary_data=binary)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], request_id=request_id)


def column_request(rows: np.ndarray, names: list[str], binary: bool = False):
    from kserve import InferInput, InferRequest

    inputs = []
    for j, name in enumerate(names):
        tensor = InferInput(name=name, shape=[rows.shape[0]], datatype="FP64")
        tensor.set_data_from_numpy(np.ascontiguousarray(rows[:, j]), binary_data=binary)
        inputs.append(tensor)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=inputs[::-1])  # any order: matched by name


def as_predictions(response) -> list[dict]:
    """An InferResponse's tensors in the v1 answer shape (padding dropped), to compare with the offline answers."""
    from scripts.cluster import fused_as_predictions

    return fused_as_predictions({out.name: out.as_numpy() for out in response.outputs})


async def grpc_infer(stack, request, headers=None):
    from kserve import InferenceGRPCClient

    async with InferenceGRPCClient(stack.grpc_target, retries=0, timeout=30) as client:
        return await client.infer(request, headers=headers)


@dataclass
class Traffic:
    """Requests sent without pause from a few threads: when each was sent and answered, and how."""

    url: str
    bodies: list[tuple[int, bytes]]  # (first row index, body)
    threads: int = 4
    log: list = field(default_factory=list)  # (sent, answered, status, version, first row, body)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list = field(default_factory=list)

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = offset
            while not self.stop.is_set():
                first, body = self.bodies[i % len(self.bodies)]
                i += self.threads
                sent = time.monotonic()
                try:
                    response = client.post(self.url, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:  # counted as lost: no answer at all
                    self.errors.append(repr(exc))
                    continue
                self.log.append((sent, time.monotonic(), response.status_code,
                                 response.headers.get("x-model-version"), first, response.json()))

    def __enter__(self) -> "Traffic":
        self._workers = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(30)

    def answered_by(self, version: str) -> list:
        return [entry for entry in self.log if entry[2] == 200 and entry[3] == version]


def check_answers(log: list, raw_users: np.ndarray, rows: int, offline: dict[str, Offline]) -> None:
    """Every 200 equals the offline answer of the version it names, for its own rows."""
    expected = {v: o.predictions(raw_users) for v, o in offline.items()}
    for sent, answered, status, version, first, body in log:
        if status != 200:
            continue
        assert version in expected, f"an answer names version {version!r}"
        assert_same_predictions(body["predictions"], expected[version][first:first + rows])

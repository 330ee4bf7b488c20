"""Model updates: a version and its fitted steps are one unit; switching and rolling back never mix them.

End to end, with the predictor (``python -m model.standin``, TF Serving's version policy ``latest 2``)
and the transformer as processes, a client sending requests all the time, and every answer
compared with an offline recomputation (scikit-learn and the SavedModel called directly) of the
version the answer names.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    MODEL_NAME, Offline, Traffic, assert_same_predictions, check_answers, train_version, version_dir, wait_until,
)

from scripts.localstack import LocalStack
from transformer.pipeline import Pipeline
from transformer.store.bundle import model_versions
from transformer.predictor import Contract, PredictorError
from transformer.store.versions import ModelVersions, NoServableVersion, ServedVersion

def publish(source: Path, models: Path) -> Path:
    """Copy a version folder into a model store the way a user should: whole, then one rename."""
    staging = models / f".incoming-{source.name}"
    shutil.copytree(source, staging)
    target = models / source.name
    staging.rename(target)
    return target


# -- the registry on its own, against a scripted TF Serving ---------------------------------------

class ScriptedTFServing:
    """What TF Serving reports: version states and, per version, whether the metadata fits."""

    model_name = MODEL_NAME

    def __init__(self):
        self.states: dict[int, str] = {}
        self.misfit: set[int] = set()
        self.reachable = True

    async def version_states(self) -> dict[int, str]:
        if not self.reachable:
            raise PredictorError(503, "the predictor at 127.0.0.1:9 is unreachable")
        return dict(self.states)

    async def metadata(self, version: int) -> dict:
        outputs = {"embedding": ("DT_FLOAT", 16 if version not in self.misfit else 99)}
        return {"metadata": {"signature_def": {"signature_def": {"s": {
            "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}, {"size": "12"}]}}},
            "outputs": {n: {"dtype": d, "tensor_shape": {"dim": [{"size": "-1"}, {"size": str(w)}]}}
                        for n, (d, w) in outputs.items()},
        }}}}}


def contract_for(pipeline: Pipeline) -> Contract:
    return Contract("s", "x", 12, {"embedding": ("DT_FLOAT", 16)}, pipeline.version)


@pytest.fixture
def store(two_versions, tmp_path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(version_dir(two_versions, 1), models / "1")
    return models


def registry(store: Path, tf_serving: ScriptedTFServing, built: list) -> ModelVersions:
    def build(bundle):
        built.append(bundle.version)
        pipeline = Pipeline(bundle)
        pipeline.contract = contract_for(pipeline)
        return ServedVersion(pipeline, forward=None)

    return ModelVersions(store, tf_serving, build, keep=2, poll_seconds=60)


def test_the_newest_version_both_sides_have_is_active(two_versions, store):
    tf_serving, built = ScriptedTFServing(), []
    versions = registry(store, tf_serving, built)

    async def scenario():
        tf_serving.states = {1: "AVAILABLE"}
        await versions.refresh()
        assert versions.current().version == 1 and versions.ready_now()

        publish(version_dir(two_versions, 2), store)  # a new version in the store, not served yet
        await versions.refresh()
        assert sorted(versions.loaded) == [1, 2] and versions.current().version == 1
        tf_serving.states = {1: "AVAILABLE", 2: "LOADING"}
        await versions.refresh()
        assert versions.current().version == 1
        tf_serving.states = {1: "AVAILABLE", 2: "AVAILABLE"}
        await versions.refresh()
        assert versions.current().version == 2
        assert versions.current(exclude=2).version == 1  # the retry of a request TF Serving refused for 2
        assert built == [1, 2]  # each bundle loaded once

        # Rollback: version 2 leaves the store; TF Serving still serves it a moment longer.
        (store / "2").rename(store.parent / "retired-2")
        await versions.refresh()
        assert versions.current().version == 1 and sorted(versions.loaded) == [1]

        # TF Serving serves only a version the transformer has no bundle for: not ready, 503 naming both.
        tf_serving.states = {1: "END", 2: "AVAILABLE"}
        await versions.refresh()
        assert not versions.ready_now()
        with pytest.raises(NoServableVersion) as caught:
            versions.current()
        assert caught.value.status == 503
        assert ("TF Serving serves version(s) 2 of model 'embedder'; the transformer has verified bundles "
                "for version(s) 1") in str(caught.value)

    asyncio.run(scenario())


def test_a_version_that_does_not_fit_or_does_not_verify_is_skipped(two_versions, store):
    tf_serving, built = ScriptedTFServing(), []
    versions = registry(store, tf_serving, built)
    tampered = publish(version_dir(two_versions, 2), store)
    scaler = tampered / "assets.extra" / "transformer-bundle" / "scaler.joblib"
    scaler.write_bytes(scaler.read_bytes() + b"\0")

    async def scenario():
        tf_serving.states = {1: "AVAILABLE", 2: "AVAILABLE"}
        await versions.refresh()
        assert versions.current().version == 1 and built == [1]
        assert "version 2:" in versions.problems()[0] and "sha256" in versions.problems()[0]
        await versions.refresh()
        assert built == [1]  # not tried again while its files are unchanged
        scaler.write_bytes(scaler.read_bytes()[:-1])  # the copy is complete now
        await versions.refresh()
        assert built == [1, 2] and versions.current().version == 2 and versions.problems() == []

        # TF Serving's version 2 does not fit its bundle: stay on 1, and say why when nothing fits.
        tf_serving.misfit = {2}
        versions.fits.clear()
        await versions.refresh()
        assert versions.current().version == 1
        tf_serving.states = {2: "AVAILABLE"}
        await versions.refresh()
        with pytest.raises(NoServableVersion, match=r"version 2 does not fit its bundle: output 'embedding'"):
            versions.current()

        # An unreachable TF Serving: not ready, the active version kept for when it returns.
        tf_serving.misfit, tf_serving.states = set(), {1: "AVAILABLE", 2: "AVAILABLE"}
        versions.fits.clear()
        await versions.refresh()
        assert versions.ready_now()
        tf_serving.reachable = False
        await versions.refresh()
        assert not versions.ready_now() and versions.current().version == 2
        assert "TF Serving is unreachable" in versions.reason

    asyncio.run(scenario())


# -- end to end: a client sending requests while versions change ---------------------------------

def test_update_and_rollback_under_traffic_never_mix_versions(build_dir, two_versions, tmp_path, raw_users, capsys):
    """Train a new version into the served folder while requests flow, then roll it back."""
    rows = 3
    build = tmp_path / "build"
    shutil.copytree(version_dir(build_dir, 1), version_dir(build, 1))
    offline = {"1": Offline(build_dir, 1)}
    bodies = [(i, json.dumps({"instances": raw_users[i:i + rows].tolist()}).encode())
              for i in range(0, len(raw_users) - rows, rows)]
    with LocalStack(build=build, predictor="local", log_dir=tmp_path / "logs") as stack:
        url = f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"
        with Traffic(url, bodies) as traffic:
            wait_until(lambda: len(traffic.log) >= 50, 60, "traffic on version 1")
            train_version(build, seed=7)  # writes version 2 into the folder both servers read
            written = time.monotonic()
            wait_until(lambda: traffic.answered_by("2"), 60, "the first answer from version 2")
            switched = min(entry[1] for entry in traffic.answered_by("2"))
            wait_until(lambda: sum(1 for e in traffic.log if e[0] > switched) >= 100, 60, "traffic on version 2")

            # Rollback: take version 2 out of the model store (one rename).
            (version_dir(build, 2)).rename(tmp_path / "retired-2")
            removed = time.monotonic()
            wait_until(lambda: any(e[0] > removed and e[3] == "1" for e in traffic.log), 60,
                       "the first answer from version 1 after the rollback")
            rolled_back = min(e[1] for e in traffic.log if e[0] > removed and e[3] == "1")
            wait_until(lambda: sum(1 for e in traffic.log if e[0] > rolled_back) >= 100, 60, "traffic after rollback")
        log = list(traffic.log)

    offline["2"] = _offline_of(tmp_path / "retired-2", 2)
    v1, v2 = offline["1"].predictions(raw_users), offline["2"].predictions(raw_users)
    differing = sum(a["segment"] != b["segment"] or [i["id"] for i in a["items"]] != [i["id"] for i in b["items"]]
                    for a, b in zip(v1, v2))
    assert differing > len(v1) // 2  # the two versions answer differently: a mix could not pass as either
    check_answers(log, raw_users, rows, offline)

    statuses = {entry[2] for entry in log}
    failed = [entry for entry in log if entry[2] != 200]
    assert statuses <= {200, 503} and not traffic.errors, (statuses, traffic.errors[:3])
    for sent, answered, status, *_ in failed:  # a 503 only while a switch is under way
        assert written <= answered <= switched + 1.0 or removed <= answered <= rolled_back + 1.0
    # Once an answer came from the new version, every request sent afterwards is answered by it.
    assert all(e[3] == "2" for e in log if e[2] == 200 and switched < e[0] < removed)
    assert all(e[3] == "1" for e in log if e[2] == 200 and e[0] > rolled_back)
    with capsys.disabled():
        print(f"\n[model update] {len(log)} requests, {len(failed)} non-200, 0 mixed; "
              f"version 2 written -> first answer from it: {switched - written:.2f}s; "
              f"version 2 removed -> first answer from version 1: {rolled_back - removed:.2f}s")


def _offline_of(version_folder: Path, version: int) -> Offline:
    """The offline computation of a version folder that lives outside a build tree."""
    build = version_folder.parent / f"offline-{version}"
    shutil.copytree(version_folder, version_dir(build, version))
    return Offline(build, version)


def test_a_served_version_without_a_bundle_is_refused_then_recovers(two_versions, tmp_path, raw_users):
    """TF Serving serves version 2, the transformer has only version 1's bundle: readiness false and
    503 naming both; when version 2's folder reaches the transformer's store, it serves version 2."""
    predictor_store = tmp_path / "predictor" / "models" / MODEL_NAME
    shutil.copytree(version_dir(two_versions, 2), predictor_store / "2")
    transformer_store = tmp_path / "transformer-models"
    shutil.copytree(version_dir(two_versions, 1), transformer_store / "1")

    stack = LocalStack(build=tmp_path / "predictor", predictor="local", log_dir=tmp_path / "logs")
    stack.start_predictor()
    try:
        stack._spawn("transformer", stack.transformer_command(transformer_store))
        health = f"{stack.transformer_url}/v1/models/{MODEL_NAME}"
        stack._wait("transformer", f"{stack.transformer_url}/", lambda r: r.status_code == 200, 60)
        url = f"{health}:predict"
        body = {"instances": raw_users[:4].tolist()}
        for _ in range(3):  # stays so: never a 200 from a mix of version 2's model and version 1's steps
            assert httpx.get(health, timeout=10).status_code == 503
            refused = httpx.post(url, json=body, timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            message = refused.json()["error"]
            assert ("TF Serving serves version(s) 2 of model 'embedder'; the transformer has verified bundles "
                    "for version(s) 1") in message, message

        publish(version_dir(two_versions, 2), transformer_store)
        wait_until(lambda: httpx.get(health, timeout=10).status_code == 200, 30, "readiness with version 2")
        answer = httpx.post(url, json=body, timeout=10)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "2"
        assert_same_predictions(answer.json()["predictions"], Offline(two_versions, 2).predictions(raw_users[:4]))
        metrics = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
        assert f'embedder_model_version{{model_name="{MODEL_NAME}"}} 2.0' in metrics
        assert (f'embedder_requests_total{{cause="no_servable_version",model_name="{MODEL_NAME}",model_version="",'
                f'outcome="predictor_error"}} 3.0') in metrics
    finally:
        stack.stop()


def test_nothing_written_into_the_store_breaks_the_clients_of_a_running_transformer(build_dir, tmp_path, raw_users):
    """What a new user did: a plain ``model.train`` on a users file with one renamed column into the store a running
    stack serves, then (refused) the same version copied in by hand. Every client keeps its 200s from version 1, the
    log and a metric name the difference, and a transformer started afterwards serves version 1 too."""
    import subprocess
    import sys

    from model.csv_input import write_one_file
    from model.synthetic import make_synthetic
    from scripts.localstack import ROOT

    models = tmp_path / "build" / "models" / MODEL_NAME
    shutil.copytree(build_dir / "models" / MODEL_NAME, models)  # version 1 and the interface it recorded
    data = make_synthetic(n_users=400, n_items=60, seed=3)
    users = write_one_file(data, tmp_path / "users.csv")
    header, rest = users.read_text().split("\n", 1)
    users.write_text(header.replace("sessions_30d", "visits_30d", 1) + "\n" + rest)
    rows = 3
    bodies = [(i, json.dumps({"instances": raw_users[i:i + rows].tolist()}).encode())
              for i in range(0, len(raw_users) - rows, rows)]
    with LocalStack(build=tmp_path / "build", predictor="local", log_dir=tmp_path / "logs") as stack:
        url = f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"
        with Traffic(url, bodies) as traffic:
            wait_until(lambda: len(traffic.log) >= 50, 60, "traffic on version 1")
            plain = subprocess.run([sys.executable, "-m", "model.train", "--data", str(users), "--epochs", "1",
                                    "--top-k", "5", "--min-score", "0.2", "--no-fused", "--quiet",
                                    "--out", str(tmp_path / "build")],
                                   cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert plain.returncode == 2, plain.stderr
            assert "features: the candidate no longer has 'sessions_30d'; adds 'visits_30d'" in plain.stderr
            assert model_versions(models) == [1]

            # The same training elsewhere, copied in by hand (or by a script that knows no better).
            elsewhere = tmp_path / "elsewhere"
            train = subprocess.run([sys.executable, "-m", "model.train", "--data", str(users), "--epochs", "1",
                                    "--top-k", "5", "--min-score", "0.2", "--no-fused", "--quiet", "--version", "2",
                                    "--out", str(elsewhere)], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert train.returncode == 0, train.stderr
            publish(version_dir(elsewhere, 2), models)
            copied = time.monotonic()
            log_file = tmp_path / "logs" / "transformer.log"
            wait_until(lambda: "model_interface_refused" in log_file.read_text(), 30, "the refusal in the log")
            tf_serving = f"{stack.predictor_url}/v1/models/{MODEL_NAME}/versions/2"
            wait_until(lambda: httpx.get(tf_serving, timeout=5).status_code == 200, 30, "TF Serving serving version 2")
            wait_until(lambda: sum(1 for e in traffic.log if e[0] > copied) >= 200, 60, "traffic after the copy")
            later = stack.another_transformer(log_dir=tmp_path / "later-logs")
            later.start_transformer()  # a pod started after the copy
            try:
                answer = httpx.post(f"{later.transformer_url}/v1/models/{MODEL_NAME}:predict",
                                    json={"instances": raw_users[:2].tolist()}, timeout=10)
                assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
            finally:
                later.stop()
            metrics = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
            ready = httpx.get(f"{stack.transformer_url}/v1/models/{MODEL_NAME}", timeout=10).status_code
        log = list(traffic.log)

    assert ready == 200
    assert not traffic.errors and {e[2] for e in log} == {200} and {e[3] for e in log} == {"1"}
    check_answers(log, raw_users, rows, {"1": Offline(build_dir, 1)})
    assert f'embedder_interface_refusals_total{{model_name="{MODEL_NAME}",model_version="2"}} 1.0' in metrics
    assert f'embedder_model_version{{model_name="{MODEL_NAME}"}} 1.0' in metrics
    (line,) = [json.loads(text[text.index("{"):]) for text in log_file.read_text().splitlines()
               if "model_interface_refused" in text]
    assert line["model_version"] == 2 and line["serving"] == 1
    assert line["differences"][0] == "features: the candidate no longer has 'sessions_30d'; adds 'visits_30d'"

"""The retraining pipeline end to end: ``python -m model.pipeline run-local`` (KFP's local runner) against a
running local stack, the quality gate refusing a broken candidate, and training on two tf.distribute workers.

Every answer is compared with the offline computation (scikit-learn and the SavedModel called directly) of
the version it names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import MODEL_NAME, TRAIN_ARGS, Offline, Traffic, check_answers, version_dir, wait_until

from model.csv_input import write_two_files
from model.synthetic import make_synthetic
from scripts.localstack import ROOT, LocalStack
from transformer.store.bundle import sha256_of

pytestmark = pytest.mark.heavy

# The session build's training options (conftest.TRAIN_ARGS), as run-local takes them.
SMALL = ["--epochs", "8", "--embedding-dim", "16", "--top-k", "5", "--min-score", "0.2"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrain-data")
    users, interactions = folder / "users.csv", folder / "interactions.csv"
    write_two_files(make_synthetic(n_users=1500, n_items=60, seed=11), users, interactions)
    shuffled = pd.read_csv(interactions)
    # Each interaction's item goes to a random other row: the items no longer belong to their users.
    shuffled["item_id"] = np.random.default_rng(0).permutation(shuffled["item_id"].to_numpy())
    shuffled.to_csv(folder / "shuffled.csv", index=False)
    return users, interactions, folder / "shuffled.csv"


@pytest.fixture(scope="module")
def served(build_dir, tmp_path_factory):
    """A local stack serving version 1 (the session's build) from a store of its own."""
    build = tmp_path_factory.mktemp("retrain-build")
    for model in (MODEL_NAME, f"{MODEL_NAME}-fused"):
        shutil.copytree(build_dir / "models" / model / "1", build / "models" / model / "1")
    with LocalStack(build=build, predictor="local", log_dir=tmp_path_factory.mktemp("retrain-logs")) as stack:
        yield build, stack


def run_local(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.pipeline", "run-local", *args, *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def versions_in(store) -> dict[str, list[str]]:
    return {model: sorted(p.name for p in (store / model).iterdir()) for model in (MODEL_NAME, f"{MODEL_NAME}-fused")}


def test_a_candidate_trained_on_shuffled_interactions_fails_the_gate_and_nothing_is_published(served, data_files):
    build, stack = served
    users, _, shuffled = data_files
    before = versions_in(build / "models")
    url = f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"
    row = make_synthetic(n_users=1, n_items=60, seed=3).features.tolist()
    serving = httpx.post(url, json={"instances": row}, timeout=10).headers["x-model-version"]

    result = run_local("--data", str(users), "--interactions", str(shuffled), "--model-store", str(build / "models"),
                       "--transformer-url", stack.transformer_url)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "error: the pipeline failed: Quality gate: version" in result.stderr
    assert "does not beat the popularity baseline" in result.stderr
    # Quiet: a line per task, the gate's table, the outcome; KFP's executor logs are in the run's log file.
    assert task_lines(result.stdout) == [("train", "SUCCESS"), ("evaluate", "FAILURE")]
    assert "| candidate (version" in result.stdout and "executor" not in result.stdout.lower()
    log = Path(re.search(r"every task's log: (\S+)", result.stderr).group(1))
    assert "Task 'evaluate' finished with status FAILURE" in strip_colours(log.read_text())
    assert "Executing task 'publish'" not in strip_colours(log.read_text())
    assert versions_in(build / "models") == before  # no version, no staging folder
    answer = httpx.post(url, json={"instances": row}, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == serving


def test_a_renamed_feature_is_refused_by_the_gate_and_published_only_as_a_new_model(served, data_files, tmp_path):
    """A retrain with one column renamed would answer every existing client 400: the gate refuses it, naming the
    change; published on purpose under a new model name, it serves beside the old model, whose clients keep their
    answers."""
    build, stack = served
    users, interactions, _ = data_files
    table = pd.read_csv(users)
    old_name = [c for c in table.columns if c not in ("user_id", "segment")][0]
    renamed = tmp_path / "renamed.csv"
    table.rename(columns={old_name: "renamed_feature"}).to_csv(renamed, index=False)
    before = versions_in(build / "models")
    url = f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"
    row = make_synthetic(n_users=1, n_items=60, seed=3).features.tolist()
    answer = httpx.post(url, json={"instances": row}, timeout=10)

    result = run_local("--data", str(renamed), "--interactions", str(interactions), "--model-store",
                       str(build / "models"), "--transformer-url", stack.transformer_url)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "its interface is not version" in result.stderr, result.stderr[-2000:]
    assert f"features: the candidate no longer has {old_name!r}; adds 'renamed_feature'" in result.stderr
    assert versions_in(build / "models") == before
    again = httpx.post(url, json={"instances": row}, timeout=10)
    assert again.status_code == 200 and again.json() == answer.json()

    result = run_local("--data", str(renamed), "--interactions", str(interactions), "--model-store",
                       str(build / "models"), "--model-name", "embedder-v2", "--new-model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (build / "models" / "embedder-v2" / "1" / "saved_model.pb").exists()
    assert versions_in(build / "models") == before  # the old model is untouched
    again = httpx.post(url, json={"instances": row}, timeout=10)
    assert again.status_code == 200 and again.json() == answer.json()


def test_run_local_trains_gates_publishes_and_serves_the_new_version_under_traffic(served, data_files, raw_users,
                                                                                  capsys):
    build, stack = served
    users, interactions, _ = data_files
    served_before = max(int(v) for v in versions_in(build / "models")[MODEL_NAME] if v.isdigit())
    new = str(served_before + 1)
    rows = 3
    bodies = [(i, json.dumps({"instances": raw_users[i:i + rows].tolist()}).encode())
              for i in range(0, len(raw_users) - rows, rows)]
    url = f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict"
    with Traffic(url, bodies) as traffic:
        wait_until(lambda: len(traffic.log) >= 20, 60, "traffic on the served version")
        started = time.monotonic()
        result = run_local("--data", str(users), "--interactions", str(interactions),
                           "--model-store", str(build / "models"), "--transformer-url", stack.transformer_url)
        finished = time.monotonic()
        wait_until(lambda: sum(1 for e in traffic.log if e[0] > finished) >= 20, 60, "traffic after the run")
    log = list(traffic.log)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = strip_colours(result.stdout + result.stderr)
    digest = sha256_of(version_dir(build, int(new)) / "assets.extra" / "transformer-bundle" / "manifest.json")
    assert f"answers with version {new} (manifest sha256 {digest[:12]}) after" in out
    assert task_lines(result.stdout) == [(task, "SUCCESS") for task in ("train", "evaluate", "verify", "publish",
                                                                          "rollout")]
    assert f"# Quality gate: version {new} passes" in out and "all pass" in out
    assert len(result.stdout.splitlines()) < 40  # KFP's executor input and warnings stay in the log file

    assert not traffic.errors and {e[2] for e in log} == {200}, {e[2] for e in log}
    assert all(e[3] is not None for e in log)  # every answer says its version
    assert all(e[3] == new for e in log if e[0] > finished)  # once the run is done, only the new version
    assert any(e[3] == new for e in log) and any(e[3] == str(served_before) for e in log if e[0] < started)
    check_answers(log, raw_users, rows, {v: Offline(build, int(v)) for v in {e[3] for e in log}})
    assert versions_in(build / "models")[f"{MODEL_NAME}-fused"][-1] == new
    with capsys.disabled():
        print(f"\n[pipeline] run-local in {finished - started:.0f}s; {len(log)} answers, all 200, "
              f"{sum(e[3] == new for e in log)} from version {new}")


def strip_colours(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def task_lines(stdout: str) -> list[tuple[str, str]]:
    """run-local's line per task: (task, status), in order."""
    return re.findall(r"^(train|evaluate|verify|publish|rollout) +(SUCCESS|FAILURE) in \d+s$", stdout, re.MULTILINE)


def test_the_same_options_train_the_same_model_through_model_train_and_run_local(data_files, tmp_path):
    """The training options are defined once: a run through the pipeline, with options of every kind (columns,
    a switch, numbers), trains exactly what model.train trains from them (same seed: the same fitted numbers)."""
    users, interactions, _ = data_files
    table = pd.read_csv(users)
    table.insert(1, "country", np.where(np.arange(len(table)) % 2, "DE", "FR"))  # a text column to leave out
    with_text = tmp_path / "customers.csv"
    table.to_csv(with_text, index=False)
    features = [c for c in table.columns if c not in ("user_id", "segment", "country")][::-1]
    options = ["--epochs", "3", "--embedding-dim", "8", "--top-k", "4", "--min-score", "0.1", "--seed", "5",
               "--exclude-columns", "country", "--segments", "3", "--candidates", "8", "--skip-unknown-users",
               "--test-fraction", "0.25"]

    direct = tmp_path / "direct"
    done = subprocess.run([sys.executable, "-m", "model.train", "--data", str(with_text), "--interactions",
                           str(interactions), "--out", str(direct), "--no-fused", *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"features ({len(features)}, in this order): {', '.join(features[::-1])}" in done.stdout
    assert "not features: user_id: user id (--user-column); country: --exclude-columns; segment: known" in done.stdout

    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "model.pipeline", "run-local", "--data", str(with_text),
                             "--interactions", str(interactions), "--model-store", str(store), "--new-model",
                             *options], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    piped, trained = store / MODEL_NAME / "1", direct / "models" / MODEL_NAME / "1"
    bundle = Path("assets.extra") / "transformer-bundle"
    manifests = [json.loads((v / bundle / "manifest.json").read_text()) for v in (piped, trained)]
    for key in ("features", "model", "rules", "fitted"):
        assert manifests[0][key] == manifests[1][key], key
    assert manifests[0]["model"]["n_candidates"] == 8 and manifests[0]["rules"] == {"min_score": 0.1, "top_k": 4}
    fitted = [np.load(v / bundle / "fitted.npz") for v in (piped, trained)]
    assert fitted[0].files == fitted[1].files
    for name in fitted[0].files:
        np.testing.assert_array_equal(fitted[0][name], fitted[1][name], err_msg=name)
    assert fitted[0]["segments.centers"].shape == (3, 8)


def test_a_version_published_where_the_transformer_does_not_read_is_not_called_served(served, data_files, tmp_path):
    """The false success: the store given to the pipeline is not the one the transformer serves, and the number
    published there is the one the transformer already answers with (another training). The rollout waits for the
    published manifest, not the number, and fails saying so."""
    build, stack = served
    users, interactions, _ = data_files
    serving = max(int(v) for v in versions_in(build / "models")[MODEL_NAME] if v.isdigit())
    elsewhere = tmp_path / "elsewhere"
    for model in (MODEL_NAME, f"{MODEL_NAME}-fused"):  # the same store, less its newest version
        for version in range(1, serving):
            if (build / "models" / model / str(version)).is_dir():
                shutil.copytree(build / "models" / model / str(version), elsewhere / model / str(version))
        (elsewhere / model).mkdir(parents=True, exist_ok=True)

    result = run_local("--data", str(users), "--interactions", str(interactions), "--model-store", str(elsewhere),
                       "--transformer-url", stack.transformer_url, "--rollout-timeout", "5",
                       "--min-lift-over-popularity", "0")
    assert result.returncode == 1, result.stdout[-3000:]
    assert task_lines(result.stdout)[-1] == ("rollout", "FAILURE")
    assert f"did not answer with version {serving} (manifest sha256 " in result.stderr, result.stderr[-2000:]
    assert "that is another artifact under the same number: the transformer does not serve what was published" \
        in result.stderr


def test_two_distributed_workers_train_a_version_the_transformer_serves(build_dir, tmp_path, raw_users, capsys):
    """Two MultiWorkerMirroredStrategy workers on loopback; the version passes the pre-publish checks (fused
    parity included), the transformer serves it, and its quality is one worker's within the retraining noise."""
    from model.verify import verify

    build = tmp_path / "build"
    args = [arg for arg in TRAIN_ARGS if arg != "--no-fused"]
    result = subprocess.run([sys.executable, "-m", "model.train", *args, "--out", str(build), "--distributed-workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checks = verify(version_dir(build, 1), build / "models" / f"{MODEL_NAME}-fused" / "1")
    assert checks.problems == [] and len(checks.checks) == 4

    two = json.loads((version_dir(build, 1) / "assets.extra" / "transformer-bundle" / "manifest.json").read_text())
    one = json.loads((version_dir(build_dir, 1) / "assets.extra" / "transformer-bundle" / "manifest.json").read_text())
    assert two["training"]["workers"] == 2 and one["training"]["workers"] == 1
    q2, q1 = two["training"]["quality"], one["training"]["quality"]
    # Not bit for bit (a step's users differ); within the spread of retraining (seeds: 4% of recall).
    assert abs(q2["recall_at_k"] - q1["recall_at_k"]) <= 0.05 * q1["recall_at_k"], (q1, q2)
    assert abs(q2["adjusted_rand_index"] - q1["adjusted_rand_index"]) <= 0.1, (q1, q2)

    with LocalStack(build=build, predictor="local", log_dir=tmp_path / "logs") as stack:
        answer = httpx.post(f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict",
                            json={"instances": raw_users[:20].tolist()}, timeout=30)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
    from conftest import assert_same_predictions

    assert_same_predictions(answer.json()["predictions"], Offline(build, 1).predictions(raw_users[:20]))
    with capsys.disabled():
        print(f"\n[two workers] recall@{q1['k']} {q2['recall_at_k']:.3f} (one worker {q1['recall_at_k']:.3f}), "
              f"ARI {q2['adjusted_rand_index']:.3f} ({q1['adjusted_rand_index']:.3f})")

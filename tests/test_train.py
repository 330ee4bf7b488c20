"""Training: the exported layout, the quality it reports, its command line, both input forms, its memory."""

import json
import subprocess
import time
import sys

import numpy as np
import pytest

from conftest import bundle_path

from model.csv_input import write_one_file, write_two_files
from model.synthetic import make_synthetic
from scripts.localstack import ROOT
from transformer.store.bundle import model_versions


def test_build_layout_and_reported_quality(build_dir):
    from transformer.store.bundle import load_bundle

    version_dir = build_dir / "models" / "embedder" / "1"
    # As many segments as the synthetic data has (conftest's build: 1,500 users, 60 items)
    truth = make_synthetic(n_users=1500, n_items=60, seed=0).segments
    assert load_bundle(version_dir).n_segments == int(truth.max()) + 1
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    manifest = json.loads((bundle_path(build_dir) / "manifest.json").read_text())
    assert manifest["model"]["version"] == 1
    quality = manifest["training"]["quality"]
    assert quality["recall_at_k"] > quality["popularity_recall_at_k"]  # the model learned something
    assert quality["adjusted_rand_index"] > 0.5
    assert manifest["model"]["signature_name"] == "serving_default"


def test_train_on_a_csv_from_the_command_line(tmp_path):
    data = make_synthetic(n_users=300, n_items=20, seed=5)
    write_one_file(data, tmp_path / "users.csv")
    result = subprocess.run(
        [sys.executable, "-m", "model.train", "--data", str(tmp_path / "users.csv"), "--epochs", "2",
         "--out", str(tmp_path / "build"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((bundle_path(tmp_path / "build") / "manifest.json").read_text())
    assert [f["name"] for f in manifest["features"]] == list(data.feature_names)
    assert manifest["model"]["n_items"] == 20


def test_train_reports_a_bad_csv_without_a_traceback(tmp_path):
    (tmp_path / "users.csv").write_text("a,b\n1,2\n")
    result = subprocess.run([sys.executable, "-m", "model.train", "--data", str(tmp_path / "users.csv")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no 'items' column" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["model.train", "model.synthetic", "model.standin", "transformer", "scripts.localstack",
                                    "scripts.demo", "scripts.training_scale", "model.pipeline"])
def test_every_command_explains_itself(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout


def test_training_adds_a_version_and_never_overwrites_one(tmp_path):
    """Each run writes the next version folder with its own bundle; an existing version is refused."""
    from transformer.store.bundle import load_bundle

    out = tmp_path / "build"
    args = ["--users", "200", "--items", "15", "--epochs", "1", "--out", str(out), "--quiet", "--no-fused"]
    from model.train import main as train

    assert train([*args, "--seed", "1"]) == 0
    first = (bundle_path(out, 1) / "scaler.joblib").read_bytes()
    assert train([*args, "--seed", "2"]) == 0
    assert load_bundle(out / "models" / "embedder" / "2").version == 2
    assert (bundle_path(out, 1) / "scaler.joblib").read_bytes() == first  # version 1 untouched

    result = subprocess.run([sys.executable, "-m", "model.train", *args, "--version", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "exists already and model versions are never overwritten" in result.stderr
    assert (bundle_path(out, 1) / "scaler.joblib").read_bytes() == first

    # A rolled-back version (removed from the store) leaves its number used: the next run takes 4.
    (out / "models" / "embedder" / "2").rename(tmp_path / "retired-2")
    (out / "models" / "embedder-fused" / "3").mkdir(parents=True)  # say, a fused model compiled later
    assert train([*args, "--seed", "3"]) == 0
    assert load_bundle(out / "models" / "embedder" / "4").version == 4


def test_two_files_train_the_same_model_as_one_file(tmp_path):
    """The same users as one file and as two files: the same catalogue, fitted numbers and model outputs."""
    import tensorflow as tf

    from model.train import main as train
    from transformer.store.bundle import load_bundle
    from transformer.steps.fitted import same_numbers

    data = make_synthetic(n_users=600, n_items=40, seed=9, item_prefix="sku-")
    write_one_file(data, tmp_path / "one.csv")
    write_two_files(data, tmp_path / "users.csv", tmp_path / "events.csv")
    common = ["--epochs", "3", "--quiet", "--no-fused", "--seed", "4"]
    assert train(["--data", str(tmp_path / "one.csv"), "--out", str(tmp_path / "a"), *common]) == 0
    assert train(["--data", str(tmp_path / "users.csv"), "--interactions", str(tmp_path / "events.csv"),
                  "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (load_bundle(tmp_path / build / "models" / "embedder" / "1") for build in "ab")
    assert a.fitted.item_ids.tolist() == b.fitted.item_ids.tolist() == data.item_ids.tolist()
    assert same_numbers(a.fitted, b.fitted)
    features = tf.constant(np.asarray(data.features[:200], np.float32))
    out_a, out_b = (tf.saved_model.load(str(bundle.path.parents[1])).signatures["serving_default"](features=features)
                    for bundle in (a, b))
    np.testing.assert_array_equal(out_a["embedding"].numpy(), out_b["embedding"].numpy())
    np.testing.assert_array_equal(out_a["scores"].numpy(), out_b["scores"].numpy())


PEAK_MEMORY = """
import resource, sys
from model.train import main
code = main(sys.argv[1:])
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_memory_does_not_grow_with_users_times_items(tmp_path):
    """16,000 training users x 100,000 items: a dense float32 interaction matrix alone would take 6.4 GB;
    training reads, trains and evaluates within 2 GiB (1.38 measured; TensorFlow itself takes about 0.6)."""
    data = make_synthetic(n_users=20_000, n_items=100_000, seed=3, per_user=8)
    write_two_files(data, tmp_path / "users.csv", tmp_path / "events.csv")
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, "--data", str(tmp_path / "users.csv"), "--interactions",
         str(tmp_path / "events.csv"), "--epochs", "2", "--no-fused", "--quiet", "--out", str(tmp_path / "build")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gib = int(result.stdout.split("peak_kib")[-1]) / 2**20
    print(f"[memory] 20,000 users x 100,000 items, {data.n_interactions} interactions: peak {peak_gib:.2f} GiB")
    assert peak_gib < 2.0
    manifest = json.loads((bundle_path(tmp_path / "build") / "manifest.json").read_text())
    assert manifest["model"]["n_items"] == len(np.unique(data.indices))


def test_string_item_ids_reach_the_answers_of_both_modes(tmp_path):
    """Item ids of the interactions file ("sku-00017") come back in the transformer's answers and in the fused
    model's, equal to the offline computation mapped through the catalogue."""
    import httpx

    from conftest import Offline, as_predictions, assert_same_predictions, grpc_infer, matrix_request, run
    from model.train import main as train
    from scripts.cluster import fused_as_predictions
    from scripts.localstack import LocalStack

    data = make_synthetic(n_users=800, n_items=30, seed=2, item_prefix="sku-")
    write_two_files(data, tmp_path / "users.csv", tmp_path / "events.csv")
    build = tmp_path / "build"
    assert train(["--data", str(tmp_path / "users.csv"), "--interactions", str(tmp_path / "events.csv"),
                  "--epochs", "3", "--top-k", "4", "--min-score", "0.01", "--quiet", "--out", str(build)]) == 0
    rows = make_synthetic(n_users=60, n_items=30, seed=8).features
    expected = Offline(build).predictions(rows)
    assert all(isinstance(i["id"], str) and i["id"].startswith("sku-") for p in expected for i in p["items"])
    assert sum(len(p["items"]) for p in expected) > 60

    v2_body = {"inputs": [{"name": "features", "datatype": "FP64", "shape": list(rows.shape),
                           "data": rows.ravel().tolist()}]}
    with LocalStack(build=build, predictor="local", log_dir=tmp_path / "logs") as stack:
        answer = httpx.post(f"{stack.transformer_url}/v1/models/embedder:predict",
                            json={"instances": rows.tolist()}, timeout=30)
        v2 = httpx.post(f"{stack.transformer_url}/v2/models/embedder/infer", json=v2_body, timeout=30)
        metadata = httpx.get(f"{stack.transformer_url}/v2/models/embedder", timeout=10).json()
        over_grpc = run(grpc_infer(stack, matrix_request(rows)))
    assert answer.status_code == 200, answer.text
    assert_same_predictions(answer.json()["predictions"], expected)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"])
               for o in v2.json()["outputs"]}
    assert_same_predictions(fused_as_predictions(outputs), expected)
    assert_same_predictions(as_predictions(over_grpc), expected)
    assert {"name": "item_ids", "datatype": "BYTES", "shape": [-1, 4]} in metadata["outputs"]

    fused = LocalStack(build=build, model_name="embedder-fused", predictor="local", log_dir=tmp_path / "fused-logs")
    try:
        fused.start_predictor()
        answer = httpx.post(f"{fused.predictor_url}/v1/models/embedder-fused:predict",
                            json={"signature_name": "serving_float64", "inputs": rows.tolist()}, timeout=30)
    finally:
        fused.stop()
    assert answer.status_code == 200, answer.text
    assert_same_predictions(fused_as_predictions(answer.json()["outputs"]), expected)


def test_the_training_scale_report_comes_from_real_runs(tmp_path):
    """scripts/training_scale.py at a tiny size: it writes the files, trains from them, and reports what the
    run's manifest says."""
    report = tmp_path / "scale.md"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.training_scale", "--sizes", "400x30x5", "--train-args",
         "--epochs 1 --no-fused", "--work", str(tmp_path / "work"), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(next((tmp_path / "work").glob("*/*/build/models/embedder/1/assets.extra/"
                                                           "transformer-bundle/manifest.json")).read_text())
    row = report.read_text().strip().splitlines()[-1].split("|")
    assert row[1].strip() == "400" and row[2].strip() == "30"
    assert row[4].strip() == f"{manifest['training']['n_train_interactions']:,}"
    assert int(row[3].replace(",", "")) > int(row[4].replace(",", ""))  # all users' interactions, from the files
    assert row[-2].strip() == f"{manifest['training']['quality']['popularity_recall_at_k']:.3f}"


def test_the_training_scale_report_compares_worker_counts(tmp_path):
    report = tmp_path / "workers.md"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.training_scale", "--sizes", "400x30x5", "--train-args",
         "--epochs 2 --no-fused", "--workers", "1,2", "--work", str(tmp_path / "work"), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in report.read_text().strip().splitlines()[-2:]]
    for row, workers in zip(rows, (1, 2)):
        manifest = json.loads(next((tmp_path / "work").glob(f"*/workers-{workers}/build/models/embedder/1/"
                                                            "assets.extra/transformer-bundle/manifest.json")).read_text())
        training = manifest["training"]
        assert training["workers"] == workers and row[-4].strip() == str(workers)
        assert row[-3].strip() == f"{training['training_seconds'] / (training['steps_per_epoch'] * 2):.3f}"
        assert row[-2].strip() == f"{training['parameters'] * 4 / 1e6:.1f}"


@pytest.mark.parametrize("module", ["model.train", "model.fuse", "scripts.demo", "scripts.localstack",
                                    "scripts.benchmark", "model.pipeline"])
def test_command_line_tools_do_not_import_kserve(module):
    # Importing kserve parses sys.argv with the model server's parser: the demo's
    # `--predictor local` then died as an "ambiguous option" once training had run.
    probe = (f"import importlib, sys; importlib.import_module({module!r}); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kserve'))")
    result = subprocess.run([sys.executable, "-c", probe, "--predictor", "local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sigterm_during_training_exits_143_and_leaves_nothing_behind(tmp_path):
    """A pod deleted or a pipeline task cancelled mid-training: the examples' shards and the half-written version
    are removed on the way out; the exit status says it was terminated."""
    import signal
    import time

    out = tmp_path / "build"
    process = subprocess.Popen([sys.executable, "-m", "model.train", "--users", "3000", "--items", "80", "--epochs",
                                "200", "--embedding-dim", "8", "--out", str(out), "--quiet"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".examples-*/*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert list(out.glob(".examples-*")), "training never wrote its examples"
    time.sleep(1.0)  # into the epochs
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [], sorted(p.name for p in out.iterdir())
    assert "Traceback" not in err


def test_the_held_out_users_are_the_test_split_and_the_baseline_the_training_users(tmp_path):
    """What the quality gate judges on: training's held-out folder holds exactly its test split (the count, the
    users, none it trained on), the popularity baseline is the training users' (not the held-out ones'), the
    manifest records which users each side was, and the gate measures on them and refuses the other side."""
    import json

    from model.gate import Thresholds, evaluate, read_held_out
    from model.quality import popularity_top
    from model.train import main as train, split_users

    data = make_synthetic(n_users=800, n_items=40, seed=5)
    users, interactions = tmp_path / "users.csv", tmp_path / "interactions.csv"
    write_two_files(data, users, interactions)
    out, held = tmp_path / "build", tmp_path / "held-out"
    assert train(["--data", str(users), "--interactions", str(interactions), "--epochs", "2", "--embedding-dim", "8",
                  "--top-k", "5", "--seed", "3", "--test-fraction", "0.25", "--out", str(out), "--held-out", str(held),
                  "--no-fused", "--quiet"]) == 0

    train_rows, test_rows = split_users(data.n_users, 0.25, 3)
    expected_test, expected_train = data.subset(test_rows), data.subset(train_rows)
    written, popularity = read_held_out(held)
    assert written.n_users == expected_test.n_users == 200
    assert sorted(written.user_ids) == sorted(expected_test.user_ids)
    assert not set(written.user_ids) & set(expected_train.user_ids)
    np.testing.assert_array_equal(written.features[np.argsort(written.user_ids)],
                                  expected_test.features[np.argsort(expected_test.user_ids)])
    by_training = [str(i) for i in data.item_ids[popularity_top(expected_train, 1, 5)[0]]]
    by_held_out = [str(i) for i in data.item_ids[popularity_top(expected_test, 1, 5)[0]]]
    assert popularity == by_training and by_training != by_held_out  # a swap would show

    version = out / "models" / "embedder" / "1"
    manifest = json.loads((bundle_path(out, 1) / "manifest.json").read_text())["training"]
    assert manifest["n_train_users"] == 600 and manifest["held_out"]["users"] == 200
    result = evaluate(version, None, written, popularity, k=5, thresholds=Thresholds(0.0, 0.1))
    assert result.split_problem == "" and "On 200 held-out users (the candidate's test split; it was trained on 600 " \
        "others)" in result.markdown()
    # The same gate given the training users instead refuses, whatever the recall there.
    trained_on = tmp_path / "wrong"
    trained_on.mkdir()
    write_two_files(expected_train, trained_on / "users.csv", trained_on / "interactions.csv")
    wrong = evaluate(version, None, read_held_out_with(trained_on, popularity), popularity, k=5)
    assert not wrong.passed and wrong.reasons[0].startswith("the held-out users are the candidate's training users")


def read_held_out_with(folder, popularity):
    import json

    from model.gate import read_held_out

    (folder / "popularity.json").write_text(json.dumps({"k": len(popularity), "item_ids": popularity}))
    return read_held_out(folder)[0]


def test_the_split_is_seeded_disjoint_sorted_and_never_leaves_the_test_side_empty():
    from model.train import split_users

    train, test = split_users(100, 0.2, seed=4)
    assert len(test) == 20 and len(train) == 80
    assert sorted({*train, *test}) == list(range(100)) and list(train) == sorted(train) and list(test) == sorted(test)
    again, _ = split_users(100, 0.2, seed=4)
    other, _ = split_users(100, 0.2, seed=5)
    assert list(again) == list(train) and list(other) != list(train)
    assert len(split_users(30, 0.01, seed=0)[1]) == 1  # rounds to none: one user is still held out
    assert len(split_users(30, 0.05, seed=0)[1]) == 2  # 1.5 rounds to 2


@pytest.mark.parametrize("users, given, expected", [(4800, None, 256), (800_000, None, 2048), (100, None, 128),
                                                    (0, None, 128), (5000, 77, 77), (7000, None, 256)])
def test_the_batch_is_a_twentieth_of_the_users_as_a_power_of_two_from_128_to_2048(users, given, expected):
    import argparse

    from model.train import batch_size_for

    assert batch_size_for(argparse.Namespace(batch_size=given), users) == expected


def test_the_workers_flag_is_taken_off_each_workers_command_line():
    from model.train import without_workers_flag

    assert without_workers_flag(["--epochs", "2", "--distributed-workers", "3", "--out", "b",
                                 "--distributed-workers=2", "--quiet"]) == ["--epochs", "2", "--out", "b", "--quiet"]


def test_a_run_writes_into_the_embedders_folder_and_the_fused_ones_unless_told_not_to(tmp_path):
    import argparse

    from model.train import output_dirs

    args = argparse.Namespace(out=tmp_path, model_name="m", no_fused=False)
    assert output_dirs(args) == [tmp_path / "models" / "m", tmp_path / "models" / "m-fused"]
    assert output_dirs(argparse.Namespace(out=tmp_path, model_name="m", no_fused=True)) == [tmp_path / "models" / "m"]


def test_peak_memory_is_this_processs_in_gib_and_a_pid_runs_until_it_is_gone(monkeypatch):
    import os
    import time

    import psutil

    from model.train import _running, peak_memory_gib

    assert 0.01 < peak_memory_gib() < 64  # KiB read as bytes or as MiB would land far outside
    assert peak_memory_gib() >= psutil.Process().memory_info().rss / 2**30 * 0.99  # never below what it holds now
    # A running process is asked about without being signalled: one that exits on SIGHUP is still there after.
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGHUP, "
                              "lambda *a: sys.exit(3)); print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert _running(child.pid)
        time.sleep(0.2)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
    assert not _running(child.pid)

    def not_ours(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_ours)
    assert _running(12345)  # another user's process runs too: its folder is kept


def test_sigterm_ends_training_with_143_and_only_the_main_thread_takes_the_signal():
    import signal
    import threading

    from model.train import Terminated, _main_thread, _terminate

    with pytest.raises(Terminated) as caught:
        _terminate(signal.SIGTERM, None)
    assert caught.value.code == 143
    assert _main_thread()
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_main_thread()))
    worker.start()
    worker.join()
    assert seen == [False]


def test_quiet_training_prints_nothing_and_otherwise_says_what_it_read(tmp_path, capsys):
    from model.train import main as train

    data = make_synthetic(n_users=200, n_items=20, seed=5)
    users, interactions = tmp_path / "users.csv", tmp_path / "interactions.csv"
    write_two_files(data, users, interactions)
    common = ["--data", str(users), "--interactions", str(interactions), "--epochs", "1", "--embedding-dim", "4",
              "--no-fused"]
    assert train([*common, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    out = tmp_path / "runs" / "told"  # its parent is made too
    assert train([*common, "--out", str(out)]) == 0
    told = capsys.readouterr()
    training = json.loads((bundle_path(out) / "manifest.json").read_text())["training"]
    # What the run was, in the manifest: its own options and sizes (a 4-wide embedding over 20 items).
    assert (training["epochs"], training["test_fraction"], training["seed"]) == (1, 0.2, 0)
    assert training["n_train_users"] == 160 and training["parameters"] > 20 * 4 + 20
    assert "features (" in told.out and "data: 200 users x" in told.out, told.out
    assert "reading" in told.err  # the progress of the read, on stderr
    import re

    assert re.search(r"training: 1/1 epoch \(loss=\d+\.\d{4}\)", told.err), told.err[-500:]  # the mean loss


def test_training_into_a_store_that_serves_another_interface_is_refused_before_it_trains(tmp_path):
    """A renamed column, another top-k or segment count would break every client of the served version: training
    says so at once (nothing written, no model trained) with the flags that keep the interface, and goes ahead only
    with --new-model or under another --model-name."""
    from model.train import main as train
    from transformer.store.interface import Interface, read_interface

    data = make_synthetic(n_users=300, n_items=20, seed=5)
    write_one_file(data, tmp_path / "users.csv")
    out = tmp_path / "build"
    common = ["--epochs", "1", "--quiet", "--no-fused", "--out", str(out)]
    assert train(["--data", str(tmp_path / "users.csv"), *common]) == 0
    model_dir = out / "models" / "embedder"
    served = read_interface(model_dir)
    assert served == Interface(tuple(data.feature_names), 10, 6, "integer")
    renamed = tmp_path / "renamed.csv"
    header, rest = (tmp_path / "users.csv").read_text().split("\n", 1)
    renamed.write_text(header.replace(data.feature_names[0], "visits_30d") + "\n" + rest)

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "model.train", "--data", str(renamed), "--top-k", "5", *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training" not in result.stdout  # refused before a single epoch
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: {model_dir} serves another interface ({model_dir / 'interface.json'}), and every " \
                       "client of it would break:"
    assert lines[1] == f"  features: the candidate no longer has '{data.feature_names[0]}'; adds 'visits_30d'"
    assert lines[2] == "  top_k: answers hold at most 5 items instead of 10"
    assert lines[3] == "To keep it, train with:  --features " + ",".join(data.feature_names) + "  --top-k 10"
    assert "--model-name embedder-v2" in result.stderr and "--new-model" in result.stderr
    assert model_versions(model_dir) == [1] and time.monotonic() - started < 60

    # The record is gone (a store written before it): the newest version that verifies is the served interface.
    (model_dir / "interface.json").unlink()
    assert train(["--data", str(renamed), *common]) == 2 and model_versions(model_dir) == [1]
    assert train(["--data", str(tmp_path / "users.csv"), "--segments", "3", *common]) == 2

    # Under a new name it is a new model; with --new-model it starts this model's interface anew.
    assert train(["--data", str(renamed), *common, "--model-name", "embedder-v2"]) == 0
    assert read_interface(out / "models" / "embedder-v2").features[0] == "visits_30d"
    assert read_interface(model_dir) is None  # a store from before the record gets one at its next version
    assert train(["--data", str(renamed), *common, "--new-model"]) == 0
    assert model_versions(model_dir) == [1, 2] and read_interface(model_dir).features[0] == "visits_30d"
    # The same interface again trains as always.
    assert train(["--data", str(renamed), *common]) == 0 and model_versions(model_dir) == [1, 2, 3]

"""Training: data loading, the exported layout, the quality it reports, its command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import bundle_path

from model.data import load_csv, make_synthetic, write_csv
from scripts.localstack import ROOT


def test_synthetic_data_is_deterministic_and_heavy_tailed():
    a, b = make_synthetic(n_users=500, seed=3), make_synthetic(n_users=500, seed=3)
    np.testing.assert_array_equal(a.features, b.features)
    assert all(np.array_equal(x, y) for x, y in zip(a.interactions, b.interactions))
    spend = a.features[:, a.feature_names.index("spend_90d")]
    assert spend.max() > 10 * np.median(spend[spend > 0])  # a long tail worth quantile scaling


def test_csv_round_trip(tmp_path):
    data = make_synthetic(n_users=50, n_items=30, seed=1)
    path = tmp_path / "users.csv"
    write_csv(data, path)
    loaded = load_csv(path, n_items=30)
    assert loaded.feature_names == data.feature_names
    np.testing.assert_allclose(loaded.features, data.features)
    assert all(np.array_equal(x, y) for x, y in zip(loaded.interactions, data.interactions))
    np.testing.assert_array_equal(loaded.segments, data.segments)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b\n1,2\n", "no 'items' column"),
        ("a,items\n1,3 4\nx,5\n", "users.csv:3: column 'a' must be a number, got 'x'"),
        ("a,items\n1,3 four\n", "column 'items' must hold whole item ids"),
        ("a,items\n1,-3\n", "item ids must be >= 0"),
        ("a,items\n", "no data rows"),
        ("a,items\nnan,1\n", "column 'a' must be finite"),
    ],
)
def test_csv_errors_name_line_and_column(tmp_path, text, message):
    path = tmp_path / "users.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_csv(path)


def test_build_layout_and_reported_quality(build_dir):
    version_dir = build_dir / "models" / "embedder" / "1"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    manifest = json.loads((bundle_path(build_dir) / "manifest.json").read_text())
    assert manifest["model"]["version"] == 1
    quality = manifest["training"]["quality"]
    assert quality["recall_at_k"] > quality["popularity_recall_at_k"]  # the model learned something
    assert quality["adjusted_rand_index"] > 0.5
    assert manifest["model"]["signature_name"] == "serving_default"


def test_train_on_a_csv_from_the_command_line(tmp_path):
    data = make_synthetic(n_users=300, n_items=20, seed=5)
    write_csv(data, tmp_path / "users.csv")
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


@pytest.mark.parametrize("module", ["model.train", "model.serve", "transformer", "scripts.localstack", "scripts.demo"])
def test_every_command_explains_itself(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout


def test_training_adds_a_version_and_never_overwrites_one(tmp_path):
    """Each run writes the next version folder with its own bundle; an existing version is refused."""
    from transformer.bundle import load_bundle

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

"""The artifact bundle: written atomically, verified before unpickling, refused when altered."""

import json
import shutil
import subprocess
import sys

import pytest

from scripts.localstack import ROOT
from transformer.bundle import BundleError, load_bundle


@pytest.fixture
def bundle(build_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(build_dir / "bundle", copy)
    return copy


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_loads_and_describes_the_model(bundle):
    loaded = load_bundle(bundle)
    assert loaded.model.name == "embedder"
    assert loaded.model.n_features == len(loaded.feature_names) == loaded.scaler.n_features_in_
    assert loaded.segments.cluster_centers_.shape[1] == loaded.model.embedding_dim
    assert loaded.rules.top_k == 5 and loaded.rules.min_score == pytest.approx(0.2)
    assert set(loaded.manifest["files"]) == {"scaler.joblib", "segments.joblib"}


def test_altered_file_is_refused_before_unpickling(bundle):
    with (bundle / "segments.joblib").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"segments.joblib has sha256 .* the manifest says"):
        load_bundle(bundle)


def test_missing_file_is_refused(bundle):
    (bundle / "scaler.joblib").unlink()
    with pytest.raises(BundleError, match="scaler.joblib is listed in the manifest but missing"):
        load_bundle(bundle)


def test_unlisted_file_is_refused(bundle):
    (bundle / "extra.pkl").write_bytes(b"anything")
    with pytest.raises(BundleError, match="files the manifest does not list: extra.pkl"):
        load_bundle(bundle)


def test_other_scikit_learn_minor_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["versions"].__setitem__("scikit-learn", "1.4.2"))
    with pytest.raises(BundleError, match=r"made with scikit-learn 1.4.2.*re-run training"):
        load_bundle(bundle)


def test_other_format_version_is_refused(bundle):
    edit_manifest(bundle, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(bundle)


def test_no_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist: run `python -m model.train`"):
        load_bundle(tmp_path / "nothing")


def test_inconsistent_feature_count(bundle):
    edit_manifest(bundle, lambda m: m["features"].pop())
    with pytest.raises(BundleError, match="the bundle is inconsistent"):
        load_bundle(bundle)


def test_transformer_refuses_to_start_on_a_tampered_bundle(bundle):
    with (bundle / "scaler.joblib").open("ab") as handle:
        handle.write(b"\0")
    result = subprocess.run(
        [sys.executable, "-m", "transformer", "--model_name", "embedder", "--predictor_host", "127.0.0.1:9",
         "--bundle", str(bundle), "--http_port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "cannot load the artifact bundle" in result.stderr and "scaler.joblib has sha256" in result.stderr


def test_rewriting_a_bundle_replaces_it_whole(build_dir, bundle):
    from transformer.bundle import write_bundle

    loaded = load_bundle(bundle)
    write_bundle(bundle, scaler=loaded.scaler, segments=loaded.segments, feature_names=loaded.feature_names,
                 feature_min=loaded.feature_min, feature_max=loaded.feature_max, model=loaded.model,
                 rules=loaded.rules)
    assert load_bundle(bundle).feature_names == loaded.feature_names
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir() if p.name != bundle.name)

"""The artifact bundle: inside its model version folder, verified before unpickling, refused when altered."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import MODEL_NAME, version_dir

from scripts.localstack import ROOT
from transformer.bundle import BUNDLE_SUBDIR, BundleError, bundle_dir, load_bundle, write_bundle


@pytest.fixture
def version(build_dir, tmp_path):
    """A copy of version 1 (SavedModel + bundle) in a model base path of its own."""
    copy = tmp_path / "models" / MODEL_NAME / "1"
    shutil.copytree(version_dir(build_dir), copy)
    return copy


@pytest.fixture
def bundle(version):
    return bundle_dir(version)


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_loads_and_describes_the_model(version):
    loaded = load_bundle(version)
    assert loaded.version == loaded.model.version == 1
    assert loaded.path == version / BUNDLE_SUBDIR
    assert loaded.model.name == "embedder"
    assert loaded.model.n_features == len(loaded.feature_names) == loaded.scaler.n_features_in_
    assert loaded.segments.cluster_centers_.shape[1] == loaded.model.embedding_dim
    assert loaded.rules.top_k == 5 and loaded.rules.min_score == pytest.approx(0.2)
    assert set(loaded.manifest["files"]) == {"scaler.joblib", "segments.joblib"}
    assert len(loaded.manifest["saved_model"]["fingerprint_sha256"]) == 64


def test_altered_file_is_refused_before_unpickling(version, bundle):
    with (bundle / "segments.joblib").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"segments.joblib has sha256 .* the manifest says"):
        load_bundle(version)


def test_missing_file_is_refused(version, bundle):
    (bundle / "scaler.joblib").unlink()
    with pytest.raises(BundleError, match="scaler.joblib is listed in the manifest but missing"):
        load_bundle(version)


def test_unlisted_file_is_refused(version, bundle):
    (bundle / "extra.pkl").write_bytes(b"anything")
    with pytest.raises(BundleError, match="files the manifest does not list: extra.pkl"):
        load_bundle(version)


def test_other_scikit_learn_minor_is_refused(version, bundle):
    edit_manifest(bundle, lambda m: m["versions"].__setitem__("scikit-learn", "1.4.2"))
    with pytest.raises(BundleError, match=r"made with scikit-learn 1.4.2.*re-run training"):
        load_bundle(version)


def test_other_format_version_is_refused(version, bundle):
    edit_manifest(bundle, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(version)


def test_no_version_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist: run `python -m model.train`"):
        load_bundle(tmp_path / "nothing")


def test_a_model_version_without_a_bundle(version):
    shutil.rmtree(version / "assets.extra")
    with pytest.raises(BundleError, match="this model version has no transformer bundle"):
        load_bundle(version)


def test_inconsistent_feature_count(version, bundle):
    edit_manifest(bundle, lambda m: m["features"].pop())
    with pytest.raises(BundleError, match="the bundle is inconsistent"):
        load_bundle(version)


def test_a_bundle_moved_to_another_version_folder_is_refused(version):
    moved = version.with_name("2")
    version.rename(moved)
    with pytest.raises(BundleError, match="made for model version 1, but it sits in version folder 2"):
        load_bundle(moved)


def test_a_bundle_beside_another_savedmodel_is_refused(build_dir, version):
    """Same version number, other model (the fingerprint differs): the steps were not fitted on it."""
    other = version.parent.parent / "other" / "1"
    shutil.copytree(version_dir(build_dir), other)
    (other / "fingerprint.pb").write_bytes((other / "fingerprint.pb").read_bytes() + b"\x08\x01")
    with pytest.raises(BundleError, match="fingerprint.pb has sha256 .* not the one the bundle was made with"):
        load_bundle(other)
    (other / "fingerprint.pb").unlink()
    with pytest.raises(BundleError, match="fingerprint.pb is missing"):
        load_bundle(other)


def test_transformer_refuses_to_start_on_a_tampered_bundle(version, bundle):
    with (bundle / "scaler.joblib").open("ab") as handle:
        handle.write(b"\0")
    result = subprocess.run(
        [sys.executable, "-m", "transformer", "--model_name", "embedder", "--predictor_host", "127.0.0.1:9",
         "--model_base_path", str(version.parent), "--http_port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "cannot load the artifact bundle" in result.stderr and "scaler.joblib has sha256" in result.stderr
    assert "no model version under" in result.stderr and "version 1:" in result.stderr


def test_a_bundle_is_written_once(version):
    loaded = load_bundle(version)
    with pytest.raises(BundleError, match="exists already: a bundle is written once"):
        write_bundle(version, scaler=loaded.scaler, segments=loaded.segments, feature_names=loaded.feature_names,
                     feature_min=loaded.feature_min, feature_max=loaded.feature_max, model=loaded.model,
                     rules=loaded.rules)

"""The artifact bundle: inside its model version folder, verified before unpickling, refused when altered."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MODEL_NAME, edit_manifest, poison, rewrite_digest, version_dir

from scripts.localstack import ROOT
from transformer.store.bundle import BUNDLE_SUBDIR, BundleError, bundle_dir, load_bundle, sha256_of, write_bundle


@pytest.fixture
def version(build_dir, tmp_path):
    """A copy of version 1 (SavedModel + bundle) in a model base path of its own."""
    copy = tmp_path / "models" / MODEL_NAME / "1"
    shutil.copytree(version_dir(build_dir), copy)
    return copy


@pytest.fixture
def bundle(version):
    return bundle_dir(version)


def test_loads_and_describes_the_model(version):
    loaded = load_bundle(version, estimators=True)
    assert loaded.version == loaded.model.version == 1
    assert loaded.path == version / BUNDLE_SUBDIR
    assert loaded.model.name == "embedder"
    assert loaded.model.n_features == len(loaded.feature_names) == loaded.scaler.n_features_in_
    assert loaded.segments.cluster_centers_.shape[1] == loaded.model.embedding_dim
    assert loaded.rules.top_k == 5 and loaded.rules.min_score == pytest.approx(0.2)
    assert set(loaded.manifest["files"]) == {"fitted.npz", "scaler.joblib", "segments.joblib"}
    assert len(loaded.manifest["saved_model"]["fingerprint_sha256"]) == 64
    # The plain numbers are exactly the estimators' fitted attributes.
    assert np.array_equal(loaded.fitted.centers, loaded.segments.cluster_centers_)
    (step,) = loaded.fitted.scaler
    assert np.array_equal(step.quantiles, loaded.scaler.quantiles_) and step.output_distribution == "normal"
    assert loaded.n_segments == loaded.segments.n_clusters


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


def test_a_poisoned_pickle_is_never_loaded_for_serving(version, bundle, tmp_path):
    marker = tmp_path / "pwned"
    poison(bundle / "scaler.joblib", marker)
    rewrite_digest(bundle, "scaler.joblib")
    loaded = load_bundle(version)  # what the transformer does: numbers from fitted.npz only
    assert not marker.exists()
    assert loaded.scaler is None and loaded.fitted.centers.shape[1] == loaded.model.embedding_dim


def test_fitted_numbers_must_be_plain_arrays(version, bundle):
    """An object array in fitted.npz would need pickle to load: refused, nothing run."""
    with np.load(bundle / "fitted.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["segments.centers"] = np.array([{"not": "numbers"}], dtype=object)
    with (bundle / "fitted.npz").open("wb") as handle:
        np.savez(handle, **arrays)
    rewrite_digest(bundle, "fitted.npz")
    with pytest.raises(BundleError, match="fitted.npz is not a readable array file of numbers"):
        load_bundle(version)


def test_fitted_numbers_that_do_not_fit_the_manifest_are_refused(version, bundle):
    with np.load(bundle / "fitted.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["segments.centers"] = arrays["segments.centers"][:, :-1]
    with (bundle / "fitted.npz").open("wb") as handle:
        np.savez(handle, **arrays)
    rewrite_digest(bundle, "fitted.npz")
    with pytest.raises(BundleError, match="do not have the model's embedding size 16"):
        load_bundle(version)
    with pytest.raises(BundleError, match="do not have the model's embedding size 16"):
        load_bundle(version, estimators=True)  # refused before anything is unpickled


@pytest.mark.parametrize("change, message", [
    (lambda ids: ids[:-1], "must be 60 item ids of the kind the manifest names"),
    (lambda ids: np.where(ids == 1, 0, ids), "must be distinct and non-negative"),
    (lambda ids: np.where(ids == 1, -1, ids), "must be distinct and non-negative"),  # -1 pads answers
    (lambda ids: ids.astype(str), "of the kind the manifest names \\('int64'\\), got <U2"),
])
def test_a_catalogue_that_does_not_fit_is_refused(version, bundle, change, message):
    """The item ids answers carry: one distinct id per item the model scores, of the recorded kind."""
    with np.load(bundle / "fitted.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert arrays["items.ids"].tolist() == list(range(60))  # synthetic data: the ids are 0 .. 59
    arrays["items.ids"] = change(arrays["items.ids"])
    with (bundle / "fitted.npz").open("wb") as handle:
        np.savez(handle, **arrays)
    rewrite_digest(bundle, "fitted.npz")
    with pytest.raises(BundleError, match=message):
        load_bundle(version)


def test_a_rewritten_manifest_is_refused_when_digests_are_pinned(version, bundle):
    trusted = {sha256_of(bundle / "manifest.json")}
    assert load_bundle(version, trusted=trusted).version == 1
    edit_manifest(bundle, lambda m: m["rules"].__setitem__("top_k", 50))
    with pytest.raises(BundleError, match=r"has sha256 [0-9a-f]{64}, which is not among the trusted manifest digests"):
        load_bundle(version, trusted=trusted)
    assert load_bundle(version).rules.top_k == 50  # without a pin, any manifest whose files verify

"""Each check of a bundle on its own, with its whole message: a version folder with a stand-in fingerprint
and small estimators fitted in the test, so these run in a second (tests/test_bundle.py runs the same
checks on the bundle training writes)."""

import json
import shutil

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.cluster import KMeans
from sklearn.preprocessing import RobustScaler
from small_bundle import RNG, SCALER, SEGMENTS, SPEC, X, new_version, write

from transformer.store.bundle import (
    BUNDLE_SUBDIR, FORMAT_VERSION, BundleError, Rules, bundle_dir, check_model, check_versions, library_versions,
    load_bundle, model_versions, read_manifest, sha256_of, verify_files,
)

HERE = ".".join(sklearn.__version__.split(".")[:2])


@pytest.fixture
def version(tmp_path):
    folder = new_version(tmp_path)
    write(folder, extra={"training": {"epochs": 1}})
    return folder


def manifest_of(folder):
    return json.loads((bundle_dir(folder) / "manifest.json").read_text())


def edit(folder, change):
    manifest = manifest_of(folder)
    change(manifest)
    (bundle_dir(folder) / "manifest.json").write_text(json.dumps(manifest))


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(BundleError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def test_a_written_bundle_loads_with_everything_its_manifest_says(version):
    directory = version / BUNDLE_SUBDIR
    manifest = manifest_of(version)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["saved_model"] == {"fingerprint_sha256": sha256_of(version / "fingerprint.pb")}
    assert manifest["features"] == [{"name": "a", "train_min": -1.0, "train_max": 1.0},
                                    {"name": "b", "train_min": -2.0, "train_max": 2.0}]
    assert manifest["rules"] == {"min_score": 0.25, "top_k": 2} and manifest["n_segments"] == 2
    assert manifest["model"]["version"] == 4 and manifest["training"] == {"epochs": 1}
    assert manifest["versions"] == library_versions()
    assert manifest["files"] == {name: {"sha256": sha256_of(directory / name), "bytes": (directory / name).stat().st_size}
                                 for name in ("fitted.npz", "scaler.joblib", "segments.joblib")}
    loaded = load_bundle(version)
    assert (loaded.path, loaded.version, loaded.feature_names) == (directory, 4, ("a", "b"))
    assert (loaded.feature_min, loaded.feature_max) == ((-1.0, -2.0), (1.0, 2.0))
    assert (loaded.model, loaded.rules, loaded.manifest) == (SPEC, Rules(0.25, 2), manifest)
    assert loaded.scaler is None and loaded.segments is None and loaded.n_segments == 2
    assert loaded.fitted.item_ids.tolist() == ["x", "y", "z"]
    with_estimators = load_bundle(version, estimators=True)
    assert np.array_equal(with_estimators.scaler.quantiles_, SCALER.quantiles_)
    assert np.array_equal(with_estimators.segments.cluster_centers_, SEGMENTS.cluster_centers_)


def test_a_bundle_is_written_only_beside_its_savedmodel_and_only_once(tmp_path, version):
    bare = tmp_path / "bare" / "4"
    bare.mkdir(parents=True)
    assert refused(write, bare) == (f"{bare} has no fingerprint.pb: write the SavedModel (TensorFlow >= 2.12) before "
                                    "its bundle")
    assert refused(write, version) == (f"{bundle_dir(version)} exists already: a bundle is written once, with its "
                                       "model version")
    other = new_version(tmp_path / "other")
    assert refused(write, other, item_ids=["x", "y"]) == "2 item ids for a model scoring 3 items"
    assert not bundle_dir(other).exists()  # nothing half-written
    from transformer.steps.fitted import UnsupportedEstimator

    with pytest.raises(UnsupportedEstimator):
        write(other, scaler=RobustScaler().fit(X))
    assert not bundle_dir(other).exists()


def test_the_manifest_is_read_only_when_it_is_there_trusted_json_and_this_format(version):
    directory = bundle_dir(version)
    digest = sha256_of(directory / "manifest.json")
    assert read_manifest(directory, trusted={digest, "0" * 64})["model"]["version"] == 4
    assert read_manifest(directory, trusted=set())["model"]["version"] == 4  # no pins: not checked
    assert refused(read_manifest, directory, trusted={"0" * 64}) == (
        f"{directory / 'manifest.json'} has sha256 {digest}, which is not among the trusted manifest digests "
        "(--trusted_manifests): the bundle was changed after it was trusted, or it is new; add the digest that "
        "training printed for this version to the trusted set")
    edit(version, lambda m: m.update(format_version=FORMAT_VERSION - 1))
    assert refused(read_manifest, directory) == (
        f"{directory / 'manifest.json'} has format_version {FORMAT_VERSION - 1}, this transformer reads "
        f"{FORMAT_VERSION}; re-run training with this version of the project")
    edit(version, lambda m: m.pop("format_version"))
    assert "has format_version None, this transformer reads" in refused(read_manifest, directory)
    (directory / "manifest.json").write_text("{not json")
    assert refused(read_manifest, directory).startswith(f"{directory / 'manifest.json'} is not readable JSON (")
    (directory / "manifest.json").unlink()
    assert refused(read_manifest, directory) == (
        f"no manifest.json in {directory}: this model version has no transformer bundle; train it with "
        "`python -m model.train`, which writes both into one version folder")


def test_the_folder_must_hold_exactly_the_listed_files_as_they_were(version):
    directory = bundle_dir(version)
    manifest = manifest_of(version)
    verify_files(directory, manifest)
    (directory / ".hidden").write_text("editors leave these")  # dot files are not part of the bundle
    verify_files(directory, manifest)
    (directory / "b.pkl").write_bytes(b"x")
    (directory / "a.pkl").write_bytes(b"x")
    assert refused(verify_files, directory, manifest) == (
        f"{directory} holds files the manifest does not list: a.pkl, b.pkl; remove them or re-run training to "
        "write a fresh bundle")
    for name in ("a.pkl", "b.pkl"):
        (directory / name).unlink()
    expected = manifest["files"]["segments.joblib"]["sha256"]
    with (directory / "segments.joblib").open("ab") as handle:
        handle.write(b"\0")
    assert refused(verify_files, directory, manifest) == (
        f"{directory / 'segments.joblib'} has sha256 {sha256_of(directory / 'segments.joblib')}, the manifest says "
        f"{expected}: the file was altered or truncated; copy the bundle again or re-run training")
    (directory / "segments.joblib").unlink()
    assert refused(verify_files, directory, manifest) == (
        f"{directory / 'segments.joblib'} is listed in the manifest but missing; copy the whole bundle")
    assert refused(verify_files, directory, {}) == (  # a manifest listing nothing vouches for nothing
        f"{directory} holds files the manifest does not list: fitted.npz, scaler.joblib; remove them or re-run "
        "training to write a fresh bundle")


def test_the_bundle_belongs_to_the_savedmodel_beside_it(version):
    manifest = manifest_of(version)
    assert check_model(version, manifest) == 4
    moved = version.with_name("5")
    shutil.copytree(version, moved)
    assert refused(check_model, moved, manifest) == (
        f"the bundle in {moved} was made for model version 4, but it sits in version folder 5: version folders are "
        "written whole by training; do not copy or rename bundles between them")
    recorded = manifest["saved_model"]["fingerprint_sha256"]
    (version / "fingerprint.pb").write_bytes(b"another model")
    assert refused(check_model, version, manifest) == (
        f"{version / 'fingerprint.pb'} has sha256 {sha256_of(version / 'fingerprint.pb')}, the bundle was fitted on "
        f"a SavedModel whose fingerprint has sha256 {recorded}: the model in this version folder is not the one the "
        "bundle was made with; re-run training to write a new version")
    (version / "fingerprint.pb").unlink()
    assert refused(check_model, version, manifest).startswith(f"{version / 'fingerprint.pb'} is missing, the bundle")


@pytest.mark.parametrize("made_with, refusal", [
    (sklearn.__version__, None),
    (f"{HERE}.99", None),  # another patch release of the same minor: same pickles
    ("1.4.2", "the artifacts were made with scikit-learn 1.4.2, this process has {here}: re-run training with "
              "scikit-learn {minor}.x, or install scikit-learn==1.4.2 here"),
    ("2." + HERE.split(".")[1] + ".0", "the artifacts were made with scikit-learn 2.{m}.0, this process has {here}: "
                                       "re-run training with scikit-learn {minor}.x, or install scikit-learn==2.{m}.0 "
                                       "here"),
])
def test_artifacts_of_another_scikit_learn_minor_are_refused(made_with, refusal):
    manifest = {"versions": {"scikit-learn": made_with}}
    if refusal is None:
        check_versions(manifest)
    else:
        assert refused(check_versions, manifest) == refusal.format(here=sklearn.__version__, minor=HERE,
                                                                   m=HERE.split(".")[1])


def test_a_manifest_silent_on_scikit_learn_is_refused():
    for manifest in ({}, {"versions": None}, {"versions": {"numpy": "2.0.0"}}):
        assert refused(check_versions, manifest) == ("the manifest does not say which scikit-learn made the "
                                                     "artifacts; re-run training")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("rules"), "is incomplete ('rules'); re-run training"),
    (lambda m: m["model"].update(colour="red"), "is incomplete (ModelSpec.__init__() got an unexpected keyword "
                                                "argument 'colour'); re-run training"),
    (lambda m: m["rules"].update(top_k=0), "is incomplete (top_k must be at least 1, got 0); re-run training"),
    (lambda m: m["features"][0].update(train_min="low"), "is incomplete (could not convert string to float: 'low'); "
                                                         "re-run training"),
    (lambda m: m.update(features=None), "is incomplete ('NoneType' object is not iterable); re-run training"),
    (lambda m: m.pop("fitted"), "is incomplete ('fitted'); re-run training"),
])
def test_an_incomplete_manifest_is_refused(version, change, message):
    edit(version, change)
    assert refused(load_bundle, version) == f"{bundle_dir(version) / 'manifest.json'} {message}"


def test_a_bundle_inconsistent_with_itself_is_refused(version):
    edit(version, lambda m: m["features"].pop())
    assert refused(load_bundle, version) == ("the manifest lists 1 features and the model 2: the bundle is "
                                             "inconsistent; re-run training")
    edit(version, lambda m: m["features"].append({"name": "b", "train_min": 0, "train_max": 1}))
    edit(version, lambda m: m["model"].update(embedding_dim=5))
    assert refused(load_bundle, version) == ("the segment centroids [2, 3] do not have the model's embedding size 5: "
                                             "the bundle is inconsistent; re-run training")


def test_pickles_that_disagree_with_the_plain_numbers_are_refused(version):
    directory = bundle_dir(version)
    other = KMeans(n_clusters=2, n_init=2, random_state=1).fit(RNG.normal(size=(50, 3)))
    joblib.dump(other, directory / "segments.joblib")
    edit(version, lambda m: m["files"]["segments.joblib"].update(sha256=sha256_of(directory / "segments.joblib")))
    assert load_bundle(version).fitted.centers.tolist() == SEGMENTS.cluster_centers_.tolist()  # serving: numbers
    assert refused(load_bundle, version, estimators=True) == (
        f"{directory}: the pickled estimators and fitted.npz hold different numbers; re-run training")


def test_a_missing_version_folder_says_what_to_pass(tmp_path):
    assert refused(load_bundle, tmp_path / "nothing" / "1") == (
        f"model version folder {tmp_path / 'nothing' / '1'} does not exist: run `python -m model.train`, and pass "
        "--model_base_path with the folder that holds the numeric version folders")


def test_model_versions_lists_numeric_folders_oldest_first(tmp_path):
    assert model_versions(tmp_path / "missing") == []
    for name in ("10", "2", "tmp-3", ".4"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert model_versions(tmp_path) == [2, 10]
    assert model_versions(str(tmp_path)) == [2, 10]

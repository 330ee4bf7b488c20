"""The model store in an S3 bucket, against a real S3 server (MinIO, built from its Go module, on loopback):
publishing through the pipeline's own client code (model/bucket.py, boto3), and reading back the way a pod does,
with KServe's own storage initializer (``kserve_storage.Storage``, run as a process with the pod's variables).

A version is published file by file (a bucket has no rename), so every point where a copy can stop is tried:
what is left is never taken for a version, by the transformer (its manifest) or by TF Serving (its
``saved_model.pb``), and its number is never given again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from small_bundle import new_version, write

from model.bucket import BucketStore, complete, upload_order
from model.publish import PublishError
from model.release import next_version, publish_candidate, retire_version, served_version_dir, store_problem
from model.store import StoreError, open_store
from tests.controlplane.build import BuildUnavailable
from tests.objectstore import ObjectStore, build
from transformer.store.bundle import BundleError, load_bundle, model_versions
from transformer.store.interface import Interface, read_interface

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        binary = build()
    except BuildUnavailable as exc:
        pytest.skip(f"no S3 server: {exc}")
    with ObjectStore(binary, tmp_path_factory.mktemp("minio-logs")) as running:
        yield running


@pytest.fixture
def bucket(server, monkeypatch):
    """A new bucket on the server; boto3's variables set as a pod's would be."""
    name = f"models-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=name)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return name


def candidate(root: Path, version: int, fused: bool = True) -> Path:
    """A training's candidate folder: the small model's version (a bundle, a stand-in SavedModel) and its fused twin."""
    folder = write(new_version(root / "models", version))
    version_dir = folder.parent.parent
    (version_dir / "saved_model.pb").write_bytes(b"graph %d" % version)
    (version_dir / "variables").mkdir()
    (version_dir / "variables" / "variables.index").write_bytes(b"index")
    (version_dir / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights %d" % version)
    if fused:
        twin = root / "models" / "embedder-fused" / str(version)
        (twin / "variables").mkdir(parents=True)
        (twin / "saved_model.pb").write_bytes(b"fused graph")
        (twin / "variables" / "variables.index").write_bytes(b"index")
    return root


def storage_initializer(uri: str, out: Path, env: dict) -> Path:
    """KServe's storage initializer, as a pod's init container runs it: download ``uri`` into ``out``."""
    code = "import sys; from kserve_storage import Storage; Storage.download_files([sys.argv[1]], [sys.argv[2]])"
    done = subprocess.run([sys.executable, "-c", code, uri, str(out)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_published_version_is_what_the_storage_initializer_downloads_and_the_transformer_loads(
        bucket, server, tmp_path):
    store = open_store(f"s3://{bucket}/recsys/models", server.endpoint)
    assert store.versions("embedder") == [] and next_version(store, "embedder") == 1
    assert publish_candidate(candidate(tmp_path / "c1", 1), store, "embedder") == 1
    assert store.versions("embedder") == [1] and store.versions("embedder-fused") == [1]
    assert store.models() == ["embedder", "embedder-fused"]

    # The production overlay's storageUri form: the model's prefix, with its slash.
    pod = storage_initializer(f"s3://{bucket}/recsys/models/embedder/", tmp_path / "mnt-models", server.env())
    assert model_versions(pod) == [1]
    assert tree(pod / "1") == tree(tmp_path / "c1" / "models" / "embedder" / "1")
    bundle = load_bundle(pod / "1")  # every file's sha256 checked against the manifest
    assert bundle.version == 1 and bundle.feature_names == ("a", "b")
    # The interface its clients call travels with the versions, so a pod started later serves that one.
    assert read_interface(pod) == Interface.of(bundle) == store.interface("embedder")
    # The gate reads the served version the same way, through the store.
    assert served_version_dir(store, "embedder", tmp_path / "gate").name == "1"

    with pytest.raises(PublishError, match="version 1 exists already in the store"):
        publish_candidate(candidate(tmp_path / "again", 1), store, "embedder")


def test_without_its_slash_the_storage_uri_also_downloads_every_model_whose_name_starts_alike(bucket, server, tmp_path):
    """KServe's S3 download lists objects by the URI's text as a prefix: s3://b/models/embedder matches
    models/embedder-fused/... too, which lands in /mnt/models/-fused/. Readers ignore that folder, but the pod downloads
    the fused model for nothing: the overlays' storageUri ends with a slash."""
    store = open_store(f"s3://{bucket}/models", server.endpoint)
    publish_candidate(candidate(tmp_path / "c", 1), store, "embedder")
    loose = storage_initializer(f"s3://{bucket}/models/embedder", tmp_path / "loose", server.env())
    assert sorted(p.name for p in loose.iterdir()) == ["-fused", "1", "interface.json"]
    exact = storage_initializer(f"s3://{bucket}/models/embedder/", tmp_path / "exact", server.env())
    assert sorted(p.name for p in exact.iterdir()) == ["1", "interface.json"]


def test_a_copy_stopped_at_any_point_leaves_nothing_a_reader_takes_for_a_version(bucket, server, tmp_path):
    """A pod killed mid-copy (simulated: uploads stop after n objects and the clean-up cannot run) at every n: the
    half version is not complete, the storage initializer's copy of it loads in neither reader, the served version is
    still the older one, and its number is not given again."""
    location = f"s3://{bucket}/models"
    publish_candidate(candidate(tmp_path / "c1", 1), open_store(location, server.endpoint), "embedder")
    source = candidate(tmp_path / "c2", 2)
    total = len(upload_order(source / "models" / "embedder" / "2")) + \
        len(upload_order(source / "models" / "embedder-fused" / "2"))

    class Killed(BaseException):
        """The process ending mid-copy: nothing after it runs (no clean-up either)."""

    for cut in range(total):
        client = server.client()
        put = []

        def upload_file(*args, **kwargs):
            if len(put) == cut:
                raise Killed()
            put.append(kwargs["Key"])
            return client.upload_file(*args, **kwargs)

        def delete_object(**kwargs):
            raise Killed()  # the clean-up never happens in a killed pod

        class Stub:
            def __getattr__(self, name):
                return {"upload_file": upload_file, "delete_object": delete_object}.get(name) or getattr(client, name)

        store = BucketStore(location, server.endpoint, client=Stub())
        with pytest.raises(Killed):
            store.publish({"embedder": source / "models" / "embedder" / "2",
                           "embedder-fused": source / "models" / "embedder-fused" / "2"}, 2)
        plain = open_store(location, server.endpoint)
        assert plain.versions("embedder") == [1], cut
        assert 2 not in plain.versions("embedder-fused") or cut >= len(upload_order(
            source / "models" / "embedder-fused" / "2")), cut  # the fused twin is whole once its marker is in
        pod = storage_initializer(f"s3://{bucket}/models/embedder/", tmp_path / f"pod-{cut}", server.env())
        if (pod / "2").exists():
            assert not complete(tree(pod / "2")), cut
            if "saved_model.pb" in tree(pod / "2"):  # TF Serving loads it: then the whole SavedModel is there
                graph = {f for f in tree(source / "models" / "embedder" / "2") if not f.startswith("assets.extra/")}
                assert graph <= tree(pod / "2"), cut
            with pytest.raises(BundleError):
                load_bundle(pod / "2")
        assert served_version_dir(plain, "embedder", tmp_path / f"served-{cut}").name == "1"
        if cut:
            assert next_version(plain, "embedder") == 3, cut  # the half-used number stays used
        for key in put:  # the next cut starts from version 1 alone
            client.delete_object(Bucket=bucket, Key=key)


def test_a_failed_copy_takes_back_what_it_put(bucket, server, tmp_path):
    location = f"s3://{bucket}/models"
    source = candidate(tmp_path / "c", 1)
    client = server.client()
    calls = []

    def upload_file(*args, **kwargs):
        calls.append(kwargs["Key"])
        if len(calls) == 4:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                              "PutObject")
        return client.upload_file(*args, **kwargs)

    class Stub:
        def __getattr__(self, name):
            return upload_file if name == "upload_file" else getattr(client, name)

    with pytest.raises(PublishError) as failed:
        BucketStore(location, server.endpoint, client=Stub()).publish(
            {"embedder": source / "models" / "embedder" / "1"}, 1)
    assert str(failed.value).startswith(f"version 1 was not published: {location} at {server.endpoint}: uploading ")
    assert "SlowDown" in str(failed.value) and "check the bucket, the credentials" in str(failed.value)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # nothing left behind


def test_a_retired_version_leaves_the_models_prefix_and_keeps_its_number(bucket, server, tmp_path):
    store = open_store(f"s3://{bucket}/models", server.endpoint)
    for version in (1, 2):
        publish_candidate(candidate(tmp_path / f"c{version}", version), store, "embedder")
    moved = retire_version(store, "embedder", 2)
    assert [m.rsplit("/", 2)[-2] for m in moved] == ["embedder", "embedder-fused"]
    assert all(m.startswith(f"s3://{bucket}/models/.retired/") for m in moved)
    assert store.versions("embedder") == [1] and next_version(store, "embedder") == 3
    pod = storage_initializer(f"s3://{bucket}/models/embedder/", tmp_path / "pod", server.env())
    assert model_versions(pod) == [1] and sorted(p.name for p in pod.iterdir()) == ["1", "interface.json"]
    assert retire_version(store, "embedder", 7) == []


def test_the_store_checks_and_errors_name_the_bucket(bucket, server, tmp_path):
    store = open_store(f"s3://{bucket}/models", server.endpoint)
    publish_candidate(candidate(tmp_path / "c", 1, fused=False), store, "embedder")
    assert store_problem(store, "embedder", False) is None
    assert store_problem(open_store(f"s3://{bucket}/models/embedder", server.endpoint), "embedder", False) == (
        f"s3://{bucket}/models/embedder is the folder of one model (it holds version folders 1): pass the store that "
        f"holds it, s3://{bucket}/models")
    assert store_problem(store, "other", False).startswith(f"s3://{bucket}/models holds no model 'other' (it holds "
                                                           "embedder)")
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-here/models at http://127.0.0.1:\d+: listing"):
        open_store("s3://no-such-bucket-here/models", server.endpoint).versions("embedder")
    with pytest.raises(StoreError, match="not an S3 location"):
        BucketStore("s3:///models")
    json.dumps(store.numbers("embedder"))  # plain ints


def test_the_pipeline_publishes_into_the_bucket_and_gates_against_the_version_served_from_it(bucket, server, tmp_path):
    """run-local with an s3:// store: the first run starts the model there, the second is gated against version 1
    read back from the bucket and publishes version 2; what a pod's storage initializer then downloads is both,
    each loading with its manifest."""
    from model.csv_input import write_two_files
    from model.synthetic import make_synthetic
    from scripts.localstack import ROOT

    users, interactions = tmp_path / "users.csv", tmp_path / "interactions.csv"
    write_two_files(make_synthetic(n_users=1200, n_items=50, seed=4), users, interactions)
    location = f"s3://{bucket}/recsys/models"
    base = [sys.executable, "-m", "model.pipeline", "run-local", "--data", str(users), "--interactions",
            str(interactions), "--model-store", location, "--s3-endpoint", server.endpoint, "--workdir",
            str(tmp_path / "runs"), "--epochs", "4", "--embedding-dim", "8", "--top-k", "5", "--min-score", "0.1"]
    env = {**os.environ, **server.env()}
    first = subprocess.run([*base, "--new-model"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"published version 1 into {location}" in first.stdout
    second = subprocess.run([*base, "--seed", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "| served (version 1) |" in second.stdout  # the gate compared with the bucket's version 1
    assert f"published version 2 into {location}" in second.stdout

    store = open_store(location, server.endpoint)
    assert store.versions("embedder") == [1, 2] and store.versions("embedder-fused") == [1, 2]
    pod = storage_initializer(f"{location}/embedder/", tmp_path / "mnt-models", server.env())
    assert model_versions(pod) == [1, 2]
    assert [load_bundle(pod / str(v)).version for v in (1, 2)] == [1, 2]


def test_training_inputs_can_be_objects_in_a_bucket(bucket, server, tmp_path):
    from model.release import InputMissing, local_input

    (tmp_path / "users.csv").write_text("user_id,a\nu1,1\n")
    server.client().upload_file(str(tmp_path / "users.csv"), bucket, "data/users.csv")
    into = tmp_path / "inputs"
    into.mkdir()
    got = local_input(f"s3://{bucket}/data/users.csv", into, server.endpoint, "users")
    assert Path(got).read_text() == "user_id,a\nu1,1\n"
    with pytest.raises(InputMissing, match=f"the interactions file s3://{bucket}/data/interactions.csv could not be "
                                           "read .*give the pipeline's interactions_path parameter"):
        local_input(f"s3://{bucket}/data/interactions.csv", into, server.endpoint, "interactions")

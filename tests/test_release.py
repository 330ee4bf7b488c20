"""The retraining pipeline's pieces on their own: the gate's decision, publishing into a store, the
cluster rollout against a fake Kubernetes API, TF_CONFIG, and the compiled pipeline's tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from model.data import from_pairs
from model.distributed import ClusterConfigError, Role, role_from_environment
from model.gate import Evaluation, Thresholds, reasons_to_fail
from model.publish import PublishError, publish, retire
from model.quality import catalogue_indices, recall_at_k, recall_at_k_of_ids
from model.release import next_version, training_argv
from model.rollout import VERSION_ANNOTATION, Answer, ClusterTarget, RolloutFailed, probe_row, rollout_on_cluster
from model.train import without_workers_flag


# -- the gate's decision ----------------------------------------------------------------------------

def measured(candidate, popularity, served=None, thresholds=Thresholds()):
    return Evaluation(k=10, n_users=100, candidate=2, candidate_recall=candidate, popularity_recall=popularity,
                      served=None if served is None else 1, served_recall=served, thresholds=thresholds)


def test_a_candidate_no_better_than_popularity_fails_with_the_reason():
    assert reasons_to_fail(measured(0.42, 0.15, served=0.43)) == []
    (reason,) = reasons_to_fail(measured(0.16, 0.15, served=None))
    assert "does not beat the popularity baseline 0.1500 by 10% (needs > 0.1650)" in reason
    assert reasons_to_fail(measured(0.166, 0.15)) == []


def test_a_candidate_clearly_worse_than_the_served_version_fails():
    (reason,) = reasons_to_fail(measured(0.37, 0.15, served=0.43))
    assert "below the served version 1's 0.4300 by more than 10% (needs >= 0.3870)" in reason
    assert reasons_to_fail(measured(0.39, 0.15, served=0.43)) == []  # within the retraining noise
    strict = Thresholds(min_lift_over_popularity=0.0, max_drop_from_served=0.0)
    assert len(reasons_to_fail(measured(0.15, 0.15, served=0.43, thresholds=strict))) == 2


@pytest.mark.parametrize("lift, drop", [(-0.1, 0.1), (0.1, 1.0), (0.1, -0.01)])
def test_thresholds_outside_their_range_are_refused(lift, drop):
    with pytest.raises(ValueError):
        Thresholds(lift, drop)


def test_the_report_names_both_versions_and_the_reasons():
    result = measured(0.16, 0.15, served=0.43)
    result.reasons = reasons_to_fail(result)
    text = result.markdown()
    assert text.startswith("# Quality gate: version 2 fails")
    assert "| served (version 1) | 0.4300 |" in text and "- recall@10 0.1600" in text
    assert result.metrics()["passed"] == 0.0 and result.metrics()["served_recall_at_10"] == 0.43


def test_recall_by_item_ids_equals_recall_by_catalogue_index():
    data, _ = from_pairs(np.zeros((3, 1)), ("f",), np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 3]),
                         item_ids=np.array(["a", "b", "c", "d"], dtype=object))
    top = np.array([[0, 2], [1, 0], [3, 2]])
    assert recall_at_k_of_ids(data.item_ids[top], data) == recall_at_k(top, data) == pytest.approx((0.5 + 1 + 1) / 3)
    # An item the catalogue does not know is a miss, never another user's hit.
    assert catalogue_indices(np.array([["zz", "b"]], dtype=object), data).tolist() == [[-1, 1]]
    assert recall_at_k_of_ids(np.array([["zz", "a"], ["zz", "zz"], ["c", "zz"]], dtype=object), data) == \
        pytest.approx((0.5 + 0 + 0.5) / 3)


# -- publishing into the store ----------------------------------------------------------------------

def version_folder(root, text="saved"):
    root.mkdir(parents=True)
    (root / "saved_model.pb").write_text(text)
    (root / "variables").mkdir()
    (root / "variables" / "variables.index").write_text(text)
    return root


def test_publish_renames_whole_folders_into_place_and_never_overwrites(tmp_path):
    store = tmp_path / "store"
    sources = {"embedder": version_folder(tmp_path / "c" / "e"), "embedder-fused": version_folder(tmp_path / "c" / "f")}
    published = publish(sources, store, 3)
    assert [p.relative_to(store).as_posix() for p in published] == ["embedder-fused/3", "embedder/3"]
    assert (store / "embedder" / "3" / "variables" / "variables.index").read_text() == "saved"
    assert sorted(p.name for p in (store / "embedder").iterdir()) == ["3"]  # no staging folder left
    with pytest.raises(PublishError, match="version 3 exists already"):
        publish({"embedder": version_folder(tmp_path / "d" / "e", "other")}, store, 3)
    assert (store / "embedder" / "3" / "saved_model.pb").read_text() == "saved"


def test_a_version_taken_for_one_model_publishes_nothing(tmp_path):
    store = tmp_path / "store"
    version_folder(store / "embedder-fused" / "4")
    with pytest.raises(PublishError):
        publish({"embedder": version_folder(tmp_path / "e"), "embedder-fused": version_folder(tmp_path / "f")}, store, 4)
    assert not (store / "embedder").exists() or list((store / "embedder").iterdir()) == []


def test_a_failed_copy_leaves_no_staging_folder(tmp_path, monkeypatch):
    import shutil

    store = tmp_path / "store"

    def broken_copy(source, target):
        os.makedirs(target)
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken_copy)
    with pytest.raises(OSError):
        publish({"embedder": version_folder(tmp_path / "e")}, store, 1)
    assert list((store / "embedder").iterdir()) == []


def test_retired_versions_are_hidden_from_readers_and_their_numbers_never_reused(tmp_path):
    store = tmp_path / "store"
    for v in (1, 2):
        version_folder(store / "embedder" / str(v))
    version_folder(store / "embedder-fused" / "2")
    assert next_version(store, "embedder") == 3
    moved = retire(store, ["embedder", "embedder-fused", "missing"], 2)
    assert [p.name.startswith(".retired-2-") for p in moved] == [True, True]
    assert sorted(p.name for p in (store / "embedder").iterdir() if p.name.isdigit()) == ["1"]
    assert next_version(store, "embedder") == 3
    assert next_version(tmp_path / "empty", "embedder") == 1


def test_training_options_become_the_training_command_line():
    argv = training_argv("u.csv", "i.csv", "out", "held", "embedder", 4,
                         {"epochs": 3, "segments": 0, "weight_column": "", "min_score": 0.25})
    assert argv == ["--data", "u.csv", "--interactions", "i.csv", "--out", "out", "--held-out", "held",
                    "--model-name", "embedder", "--version", "4", "--quiet", "--epochs", "3", "--min-score", "0.25"]
    with pytest.raises(ValueError, match="not a training option"):
        training_argv("u", "i", "o", "h", "embedder", 1, {"out": "elsewhere"})


# -- TF_CONFIG ----------------------------------------------------------------------------------------

def tf_config(cluster, task_type, index):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


def test_the_role_comes_from_tf_config():
    assert role_from_environment({}) is None
    workers = {"worker": ["a:1", "b:1", "c:1"]}
    assert role_from_environment(tf_config(workers, "worker", 0)) == Role(workers=3, index=0, task="worker")
    assert not role_from_environment(tf_config(workers, "worker", 2)).is_chief
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert role_from_environment(tf_config(with_chief, "chief", 0)).is_chief
    assert role_from_environment(tf_config(with_chief, "worker", 0)) == Role(workers=3, index=1, task="worker")


@pytest.mark.parametrize("environ, message", [
    ({"TF_CONFIG": "{not json"}, "not a cluster and task description"),
    (tf_config({"worker": ["a:1"], "ps": ["p:1"]}, "worker", 0), "names ps tasks"),
    (tf_config({"worker": ["a:1"]}, "worker", 1), "task worker 1 is not in its cluster"),
    (tf_config({"chief": ["a:1", "b:1"]}, "chief", 0), "2 chief tasks"),
])
def test_tf_config_that_cannot_describe_a_cluster_is_refused(environ, message):
    with pytest.raises(ClusterConfigError, match=message):
        role_from_environment(environ)


def test_each_worker_gets_the_command_line_without_the_workers_flag():
    assert without_workers_flag(["--epochs", "3", "--distributed-workers", "2", "--quiet"]) == ["--epochs", "3", "--quiet"]
    assert without_workers_flag(["--distributed-workers=4", "--seed", "1"]) == ["--seed", "1"]


# -- the cluster rollout, against a fake Kubernetes API ----------------------------------------------

class FakeCluster:
    """KServe and the Deployment controller as the API shows them (as recorded from KServe v0.20.0's controller,
    tests/data/controlplane/): a patch makes a new generation; after a few polls KServe copies the components'
    annotations onto their Deployments' pod templates; then each Deployment rolls a new ReplicaSet (old and new
    pods side by side) while Ready stays True all along, as KServe reports it."""

    def __init__(self, reconcile_after=2, roll_steps=3, roll=True):
        from test_cluster_wait import deployment, isvc

        self.make_deployment = deployment
        self.isvc = isvc(1, 1)
        self.isvc["spec"]["predictor"]["annotations"] = {VERSION_ANNOTATION: "1"}
        self.patches, self.polls_since_patch = [], 0
        self.reconcile_after, self.roll_steps, self.roll = reconcile_after, roll_steps, roll
        self.now, self.history = 0.0, []
        self.templates = {c: dict(self.isvc["spec"][c].get("annotations") or {}) for c in ("predictor", "transformer")}
        self.templates_before = self.templates

    def sleep(self, seconds):
        self.now += seconds
        self.polls_since_patch += 1

    def clock(self):
        return self.now

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        assert (group, version, plural, namespace, name) == ("serving.kserve.io", "v1beta1", "inferenceservices",
                                                             "embedder", "embedder")
        for component, change in body["spec"].items():
            notes = self.isvc["spec"][component].setdefault("annotations", {})
            for key, value in change["annotations"].items():
                if value is None:
                    notes.pop(key, None)
                else:
                    notes[key] = value
        self.isvc["metadata"]["generation"] += 1
        self.templates_before = self.templates
        self.templates = {c: dict(self.isvc["spec"][c].get("annotations") or {}) for c in ("predictor", "transformer")}
        self.patches.append(body)
        self.polls_since_patch = 0

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (namespace, name) == ("embedder", "embedder"), (namespace, name)
        return json.loads(json.dumps(self.isvc))

    def read_namespaced_deployment(self, name, namespace):
        assert namespace == "embedder" and name in ("embedder-predictor", "embedder-transformer"), (namespace, name)
        generation = len(self.patches) + 1
        step = self.polls_since_patch - self.reconcile_after
        if not self.patches or (self.roll and step >= self.roll_steps):
            state = (generation, generation, 1, 1, 1)  # rolled out
        elif step < 0:
            state = (generation - 1, generation - 1, 1, 1, 1)  # KServe has not updated it yet
        else:
            state = (generation, generation, 2, 1 if step else 0, 1)  # the new pod starting beside the old
        self.history.append((name, state))
        made = self.make_deployment(name, *state)
        templates = self.templates_before if step < 0 and self.patches else self.templates
        made.spec.template.metadata.annotations = dict(templates[name.removeprefix("embedder-")])
        return made

    crashing: tuple | None = None  # (component, container, exit code, message): the new pods' container crashes

    def list_namespaced_pod(self, namespace, label_selector):
        """The component's pods: the newest template's once it rolls (crashing as ``crashing`` says), else none."""
        from types import SimpleNamespace

        from kubernetes import client

        assert namespace == "embedder" and label_selector.startswith("serving.kserve.io/inferenceservice=embedder,")
        component = label_selector.rsplit("component=", 1)[1]
        if self.crashing is None or self.crashing[0] != component or not self.patches:
            return SimpleNamespace(items=[])
        _, container, code, message = self.crashing
        ended = client.V1ContainerStateTerminated(exit_code=code, reason="Error", message=message)
        status = client.V1ContainerStatus(
            name=container, image="i", image_id="", ready=False, restart_count=min(self.polls_since_patch, 5),
            last_state=client.V1ContainerState(terminated=ended),
            state=client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason="CrashLoopBackOff")))
        pod = client.V1Pod(metadata=client.V1ObjectMeta(name=f"embedder-{component}-new", annotations=dict(
            self.templates[component])), status=client.V1PodStatus(container_statuses=[status]))
        return SimpleNamespace(items=[pod])


def rollout(cluster, smoke, retire=None, timeout=600.0):
    return rollout_on_cluster(ClusterTarget(), 2, [0.0], custom=cluster, apps=cluster, retire=retire, timeout=timeout,
                              sleep=cluster.sleep, clock=cluster.clock, smoke=smoke, say=lambda line: None)


def test_the_rollout_waits_through_a_redeploy_that_stays_ready_then_smokes():
    cluster = FakeCluster()
    smoked_at = []

    def smoke():
        smoked_at.append(list(cluster.history))
        return 0.5

    line = rollout(cluster, smoke)
    assert "embedder/embedder serves version 2" in line
    assert cluster.patches == [{"spec": {c: {"annotations": {VERSION_ANNOTATION: "2"}}
                                         for c in ("predictor", "transformer")}}]
    # Ready was True at every poll; the smoke test came only once both Deployments had rolled out, after
    # polls that saw the new pod starting beside the old one.
    (seen,) = smoked_at
    assert any(state[2] == 2 for _, state in seen)
    assert [state for name, state in seen[-2:]] == [(2, 2, 1, 1, 1)] * 2


def test_a_failed_smoke_rolls_back_the_annotations_and_retires_the_version():
    cluster = FakeCluster()
    retired = []

    def smoke():
        raise RolloutFailed("http://embedder-transformer.embedder.svc.cluster.local/... did not answer with version 2")

    with pytest.raises(RolloutFailed, match="smoke test through the Service failed") as failed:
        rollout(cluster, smoke, retire=lambda: retired.append(cluster.isvc["metadata"]["generation"]))
    assert str(failed.value).endswith("did not answer with version 2; rolled back")
    assert retired == [2]  # before the annotations went back
    assert cluster.patches[-1] == {"spec": {"predictor": {"annotations": {VERSION_ANNOTATION: "1"}},
                                            "transformer": {"annotations": {VERSION_ANNOTATION: None}}}}
    assert cluster.isvc["spec"]["predictor"]["annotations"] == {VERSION_ANNOTATION: "1"}
    assert VERSION_ANNOTATION not in cluster.isvc["spec"]["transformer"].get("annotations", {})


def test_a_rollout_that_never_finishes_is_rolled_back_without_a_smoke():
    cluster = FakeCluster(roll=False)
    smoked = []
    with pytest.raises(RolloutFailed, match="did not finish within 60s: deployment embedder-predictor"):
        rollout(cluster, lambda: smoked.append(1), timeout=60)
    assert smoked == [] and len(cluster.patches) == 2


def test_the_rollout_refuses_a_missing_inference_service():
    from kubernetes.client.exceptions import ApiException

    class Empty(FakeCluster):
        def get_namespaced_custom_object(self, *args):
            raise ApiException(status=404)

    with pytest.raises(RolloutFailed, match="does not exist: deploy it first"):
        rollout(Empty(), lambda: 0.0)


def test_the_probe_row_and_the_service_url():
    assert probe_row([0, -2], [4, 2]) == [2.0, 0.0]
    assert ClusterTarget().predict_url == \
        "http://embedder-transformer.embedder.svc.cluster.local/v1/models/embedder:predict"
    assert ClusterTarget(service_url="http://x:8080/").predict_url == "http://x:8080/v1/models/embedder:predict"


# -- the compiled pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from model.pipeline import compile_pipeline

    # Two documents: the pipeline spec, then its Kubernetes platform spec (the volume mounts).
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml").read_text())
    return {**spec, **platform}


def test_the_compiled_pipeline_runs_its_tasks_in_order(compiled):
    tasks = compiled["root"]["dag"]["tasks"]
    assert set(tasks) == {"train", "evaluate", "verify", "publish", "rollout"}

    def upstream(task):
        spec = tasks[task]
        after = set(spec.get("dependentTasks", []))
        for arg in (spec.get("inputs", {}).get("artifacts", {}) | spec.get("inputs", {}).get("parameters", {})).values():
            producer = (arg.get("taskOutputArtifact") or arg.get("taskOutputParameter") or {}).get("producerTask")
            if producer:
                after.add(producer)
        return after

    assert upstream("train") == set()
    assert {n: a["componentInputParameter"] for n, a in tasks["train"]["inputs"]["parameters"].items()
            if n.endswith("_path")} == {"users_path": "users_path", "interactions_path": "interactions_path"}
    assert upstream("evaluate") == {"train"}
    assert upstream("verify") == {"train", "evaluate"}
    assert upstream("publish") == {"train", "verify"}
    assert upstream("rollout") == {"train", "publish"}
    assert tasks["rollout"]["inputs"]["parameters"]["version"]["taskOutputParameter"]["producerTask"] == "publish"
    assert all(tasks[t]["cachingOptions"] == {} or not tasks[t]["cachingOptions"].get("enableCache")
               for t in ("train", "evaluate", "verify", "publish", "rollout"))


def test_the_compiled_pipeline_has_its_parameters_with_defaults(compiled):
    from model.options import defaults as training_defaults

    parameters = compiled["root"]["inputDefinitions"]["parameters"]
    defaults = {n: p.get("defaultValue") for n, p in parameters.items()}
    # The users' files are read from the model store's claim, which the train task mounts (no importer: KFP's
    # launcher cannot read a volume, and finds nothing without error where no one uploaded the files).
    assert defaults["users_path"] == "/mnt/model-store/data/users.csv"
    assert defaults["interactions_path"] == "/mnt/model-store/data/interactions.csv"
    assert defaults["model_store"] == "/mnt/model-store/models"
    assert defaults["min_lift_over_popularity"] == 0.1 and defaults["max_drop_from_served"] == 0.1
    assert defaults["rollout_mode"] == "cluster"
    assert (defaults["namespace"], defaults["isvc_name"], defaults["store_claim"]) == ("embedder", "embedder",
                                                                                      "embedder-model-store")
    # model.train's options, defined once (model/options.py), are one JSON object: every one of them, at its default.
    assert parameters["training"]["parameterType"] == "STRUCT"
    assert defaults["training"] == training_defaults() and defaults["training"]["epochs"] == 25
    train_inputs = compiled["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train_inputs["training"]["componentInputParameter"] == "training"


def test_every_component_runs_the_training_image_without_installing_anything(compiled):
    from model.pipeline import TRAINING_IMAGE

    executors = compiled["deploymentSpec"]["executors"]
    containers = {name: e["container"] for name, e in executors.items() if "container" in e}
    assert len(containers) == 5
    for name, container in containers.items():
        assert container["image"] == TRAINING_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name
    assert not [e for e in executors.values() if "importer" in e]


def test_the_tasks_that_touch_the_store_mount_its_volume(compiled):
    from model.pipeline import STORE_MOUNT

    config = compiled["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name: spec["pvcMount"] for name, spec in config.items()}
    assert set(mounted) == {"exec-train", "exec-evaluate", "exec-publish", "exec-rollout"}
    for mounts in mounted.values():
        (mount,) = mounts
        assert mount["mountPath"] == STORE_MOUNT
        assert mount["pvcNameParameter"] == {"componentInputParameter": "store_claim"}
    assert not any("secretAsEnv" in spec for spec in config.values())  # no bucket, no credentials


def test_the_compiled_yaml_carries_the_given_image_claim_and_store(tmp_path):
    """compile --image/--claim/--model-store/--s3-secret/--namespace/--isvc-name: what a cluster other than kind needs,
    in the YAML it runs."""
    from model.pipeline import main

    out = tmp_path / "retrain.yaml"
    assert main(["compile", "--out", str(out), "--image", "registry.example.com/ml/training:1.2",
                 "--claim", "models-rwx", "--model-store", "s3://ml-models/embedder/models", "--s3-secret",
                 "embedder-s3-credentials", "--s3-endpoint", "http://minio.minio:9000", "--namespace", "recsys",
                 "--isvc-name", "users", "--users-path", "s3://ml-data/users.csv"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/ml/training:1.2"}
    defaults = {n: p.get("defaultValue") for n, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert {k: defaults[k] for k in ("store_claim", "model_store", "s3_secret", "s3_endpoint", "namespace",
                                     "isvc_name", "users_path")} == {
        "store_claim": "models-rwx", "model_store": "s3://ml-models/embedder/models",
        "s3_secret": "embedder-s3-credentials", "s3_endpoint": "http://minio.minio:9000", "namespace": "recsys",
        "isvc_name": "users", "users_path": "s3://ml-data/users.csv"}
    config = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(config) == {"exec-train", "exec-evaluate", "exec-publish", "exec-rollout"}
    for spec_of in config.values():
        (secret,) = spec_of["secretAsEnv"]
        assert secret["secretNameParameter"] == {"componentInputParameter": "s3_secret"}
        assert {(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}
        assert spec_of["pvcMount"][0]["pvcNameParameter"] == {"componentInputParameter": "store_claim"}

    # All in a bucket: no volume at all.
    assert main(["compile", "--out", str(out), "--claim", "", "--model-store", "s3://ml-models/models"]) == 0
    _, platform = yaml.safe_load_all(out.read_text()) if len(list(yaml.safe_load_all(out.read_text()))) == 2 \
        else (None, {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {}}}}})
    assert not any("pvcMount" in e for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values())


# -- the store as the release steps read it (small bundles, made in milliseconds) ---------------------

def test_the_served_version_is_the_newest_whose_bundle_verifies(tmp_path):
    from small_bundle import new_version, write

    from model.release import served_version_dir

    store = tmp_path / "store"
    assert served_version_dir(store, "embedder") is None
    for number in (1, 2, 3):
        write(new_version(store, number))
    assert served_version_dir(store, "embedder") == store / "embedder" / "3"
    (store / "embedder" / "3" / "assets.extra" / "transformer-bundle" / "fitted.npz").write_bytes(b"altered")
    assert served_version_dir(store, "embedder") == store / "embedder" / "2"  # what the transformer serves too


def test_a_candidate_is_one_version_published_with_its_fused_twin_and_retired_together(tmp_path):
    from small_bundle import new_version, write

    from model.release import candidate_dir, publish_candidate, retire_version

    candidate = tmp_path / "candidate"
    write(new_version(candidate / "models", 5))
    version_folder(candidate / "models" / "embedder-fused" / "5")
    assert candidate_dir(candidate, "embedder") == candidate / "models" / "embedder" / "5"
    assert candidate_dir(candidate, "embedder", fused=True) == candidate / "models" / "embedder-fused" / "5"
    store = tmp_path / "store"
    assert publish_candidate(candidate, store, "embedder") == 5
    assert (store / "embedder" / "5" / "fingerprint.pb").is_file()
    assert (store / "embedder-fused" / "5" / "saved_model.pb").is_file()
    assert [Path(p).parent.name for p in retire_version(store, "embedder", 5)] == ["embedder", "embedder-fused"]
    assert next_version(store, "embedder") == 6
    write(new_version(candidate / "models", 6))
    with pytest.raises(ValueError, match=r"holds versions \[5, 6\]"):
        candidate_dir(candidate, "embedder")


def test_a_models_first_publish_records_the_interface_its_clients_call_and_later_ones_keep_it(tmp_path):
    from small_bundle import new_version, write

    from model.release import publish_candidate
    from transformer.store.interface import Interface, read_interface, write_interface

    store = tmp_path / "store"
    write(new_version(tmp_path / "first" / "models", 1))
    publish_candidate(tmp_path / "first", store, "embedder")
    assert read_interface(store / "embedder") == Interface(("a", "b"), 2, 2, "text")
    write_interface(store / "embedder", Interface(("a", "b"), 2, 2, "integer"))  # a record that is not the version's
    write(new_version(tmp_path / "next" / "models", 2))
    publish_candidate(tmp_path / "next", store, "embedder")
    assert read_interface(store / "embedder").item_id_type == "integer"  # the gate judges interfaces, not publish


# -- waiting for a version through HTTP --------------------------------------------------------------

@pytest.fixture
def transformer_answers():
    """A loopback HTTP server answering predict requests as scripted: (status, x-model-version[, body[,
    x-model-manifest-sha256]]) in turn."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    script, received = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            status, version, *text = script.pop(0) if len(script) > 1 else script[0]
            text, digest = (text + [None, None])[:2]
            body = text.encode() if text else b'{"predictions": []}' if status == 200 else b'{"error": "no version"}'
            self.send_response(status)
            if version:
                self.send_header("x-model-version", version)
            if digest:
                self.send_header("x-model-manifest-sha256", digest)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/models/embedder:predict", script, received
    server.shutdown()


def test_the_wait_ends_when_the_transformer_answers_with_the_version(transformer_answers):
    from model.rollout import served_version, wait_until_served

    url, script, received = transformer_answers
    script += [(503, None), (200, "1"), (200, "2")]
    clock = iter(range(100, 200))
    seconds = wait_until_served(url, 2, [0.5, 1.5], timeout=60, sleep=lambda s: None, clock=lambda: next(clock))
    assert seconds == 3 and received == [{"instances": [[0.5, 1.5]]}] * 3
    assert served_version(url, [0.0]) == Answer(2, None, "HTTP 200 from version 2 (manifest sha256 not given)")


def test_a_rollout_that_sees_another_artifact_under_the_same_number_does_not_succeed(transformer_answers):
    """The false success: version 1 was published where nothing serves it, and the transformer's own, older version 1
    answered. Judged by the manifest's sha256, the wait goes on until the published artifact answers, or fails
    saying that another one answers under its number."""
    from model.rollout import wait_until_served

    url, script, _ = transformer_answers
    published, older = "a" * 64, "b" * 64
    script += [(200, "1", None, older), (200, "1", None, published)]
    clock = iter(range(100))
    assert wait_until_served(url, 1, [0.0], timeout=60, manifest_sha256=published, sleep=lambda s: None,
                             clock=lambda: next(clock)) == 2
    script[:] = [(200, "1", None, older)]
    clock = iter(range(100))
    with pytest.raises(RolloutFailed) as failed:
        wait_until_served(url, 1, [0.0], timeout=5, manifest_sha256=published, sleep=lambda s: None,
                          clock=lambda: next(clock))
    assert str(failed.value) == (
        f"{url} did not answer with version 1 (manifest sha256 {published}) within 5s; last: HTTP 200 from version 1 "
        f"(manifest sha256 {older}); that is another artifact under the same number: the transformer does not serve "
        "what was published (is the store it reads the one the version went into?)")


def test_the_wait_gives_up_with_the_last_answer(transformer_answers):
    from model.rollout import served_version, wait_until_served

    url, script, _ = transformer_answers
    script += [(503, None)]
    clock = iter(range(100))
    with pytest.raises(RolloutFailed, match=r"did not answer with version 2 within 5s; last: HTTP 503: .*no version"):
        wait_until_served(url, 2, [0.0], timeout=5, sleep=lambda s: None, clock=lambda: next(clock))
    answer = served_version("http://127.0.0.1:9/v1/models/embedder:predict", [0.0], timeout=1)
    assert answer.version is None and answer.what.startswith("ConnectError")


def test_loopback_workers_get_one_cluster_and_their_own_task():
    from model.distributed import loopback_configs

    configs = [json.loads(c) for c in loopback_configs(3)]
    (cluster,) = {json.dumps(c["cluster"]) for c in configs}
    workers = json.loads(cluster)["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert [role_from_environment({"TF_CONFIG": json.dumps(c)}).index for c in configs] == [0, 1, 2]


def test_the_gate_report_in_full():
    result = Evaluation(k=5, n_users=300, candidate=3, candidate_recall=0.16, popularity_recall=0.15, served=2,
                        served_recall=0.43, segment_agreement=0.5, known_segment_agreement=0.25)
    result.reasons = reasons_to_fail(result)
    assert result.markdown() == (
        "# Quality gate: version 3 fails\n"
        "\n"
        "On 300 held-out users (the candidate's test split), best 5 items, ids compared as text.\n"
        "\n"
        "| | recall@k | segments' agreement (ARI) |\n"
        "| --- | ---: | ---: |\n"
        "| candidate (version 3) | 0.1600 | 0.2500 with known labels |\n"
        "| served (version 2) | 0.4300 | 0.5000 with the candidate |\n"
        "| popularity baseline | 0.1500 | |\n"
        "\n"
        "Thresholds: beat popularity by 10%; lose at most 10% of the served version's recall.\n"
        "\n"
        "Fails because:\n"
        "- recall@5 0.1600 does not beat the popularity baseline 0.1500 by 10% (needs > 0.1650): the features did "
        "not teach the model which items users take; check the interactions (user ids matched to the right users?)\n"
        "- recall@5 0.1600 is below the served version 2's 0.4300 by more than 10% (needs >= 0.3870)\n")
    assert result.metrics() == {"candidate_recall_at_5": 0.16, "popularity_recall_at_5": 0.15,
                                "served_recall_at_5": 0.43, "segment_agreement_with_served": 0.5,
                                "segment_agreement_with_known_labels": 0.25, "held_out_users": 300.0, "passed": 0.0}
    first = Evaluation(k=10, n_users=9, candidate=1, candidate_recall=0.5, popularity_recall=0.25)
    assert first.passed and first.markdown().splitlines()[0] == "# Quality gate: version 1 passes"
    assert "| served (version none) | n/a | |" in first.markdown()  # nothing served yet: nothing to agree with
    assert "| candidate (version 1) | 0.5000 | no known labels |" in first.markdown()
    assert first.markdown().endswith("recall.\n")  # no reasons
    assert set(first.metrics()) == {"candidate_recall_at_10", "popularity_recall_at_10", "held_out_users", "passed"}


def test_the_gate_passes_a_candidate_exactly_at_its_thresholds():
    at_the_drop = measured(0.25, 0.125, served=0.5, thresholds=Thresholds(0.5, 0.5))  # 0.25 >= 0.5 * (1 - 0.5)
    assert reasons_to_fail(at_the_drop) == []
    at_the_lift = measured(0.1875, 0.125, thresholds=Thresholds(0.5, 0.5))  # needs more than 0.125 * 1.5
    assert len(reasons_to_fail(at_the_lift)) == 1


def test_threshold_messages_name_the_value():
    with pytest.raises(ValueError) as low:
        Thresholds(-0.5, 0.1)
    assert str(low.value) == "min_lift_over_popularity must be >= 0, got -0.5"
    with pytest.raises(ValueError) as high:
        Thresholds(0.1, 1.5)
    assert str(high.value) == "max_drop_from_served must be within [0, 1), got 1.5"


def test_publish_names_its_staging_folder_and_adds_versions_beside_others(tmp_path, monkeypatch):
    import re

    store = tmp_path / "store"
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((str(a), str(b))), real_rename(a, b)))
    publish({"embedder": version_folder(tmp_path / "a")}, store, 3)
    publish({"embedder": version_folder(tmp_path / "b")}, store, 4)  # its folder exists already
    assert [re.fullmatch(rf"{store}/embedder/\.staging-{v}-[0-9a-f]{{8}}", a) is not None for (a, _), v in
            zip(renames, (3, 4))] == [True, True]
    assert [b for _, b in renames] == [f"{store}/embedder/3", f"{store}/embedder/4"]
    with pytest.raises(PublishError) as taken:
        publish({"embedder": version_folder(tmp_path / "c"), "embedder-fused": version_folder(tmp_path / "d")}, store, 4)
    assert str(taken.value) == (f"version 4 exists already in the store ({store}/embedder/4): versions are never "
                                "overwritten; train again to get the next free number")


def test_a_copy_failing_before_it_starts_reports_its_own_error(tmp_path, monkeypatch):
    import shutil

    def refused(source, target):
        raise PermissionError(f"cannot write {target}")

    monkeypatch.setattr(shutil, "copytree", refused)
    with pytest.raises(PermissionError, match="cannot write"):
        publish({"embedder": version_folder(tmp_path / "e")}, tmp_path / "store", 1)


def test_a_retired_folder_is_named_by_version_and_time(tmp_path):
    import re

    version_folder(tmp_path / "store" / "embedder" / "7")
    (moved,) = retire(tmp_path / "store", ["embedder"], 7)
    assert re.fullmatch(r"\.retired-7-\d{8}T\d{6}", moved.name), moved.name


def test_the_next_version_counts_both_models_and_every_option_but_segments_0_is_passed(tmp_path):
    store = tmp_path / "store"
    version_folder(store / "embedder" / "5")
    version_folder(store / "embedder-fused" / "2")
    assert next_version(store, "embedder") == 6
    version_folder(store / "embedder-fused" / "9")
    assert next_version(store, "embedder") == 10
    # An option at its default is left out (the command line says what the run changed); numbers that came through
    # KFP's JSON object as doubles are whole again.
    argv = training_argv("u", "i", "o", "h", "embedder", 1, {"seed": 0, "segments": 0.0, "epochs": 7.0})
    assert argv[-2:] == ["--epochs", "7"]
    with pytest.raises(ValueError) as wrong:
        training_argv("u", "i", "o", "h", "embedder", 1, {"out": "x", "epochs": 0, "top_k": 2.5})
    assert str(wrong.value).startswith("'out' is not a training option; they are: user_column, item_column, ")
    assert str(wrong.value).endswith("; --top-k must be a whole number, got 2.5")


def test_tf_config_messages_say_what_to_change():
    with pytest.raises(ClusterConfigError) as bad:
        role_from_environment({"TF_CONFIG": "[]"})
    assert str(bad.value).startswith("TF_CONFIG is not a cluster and task description (")
    assert str(bad.value).endswith('expected {"cluster": {"worker": ["host:port", ...]}, '
                                   '"task": {"type": "worker", "index": 0}}')
    with pytest.raises(ClusterConfigError) as extra:
        role_from_environment(tf_config({"worker": ["a:1"], "ps": ["p:1"], "evaluator": ["e:1"]}, "worker", 0))
    assert str(extra.value) == ("TF_CONFIG names evaluator, ps tasks; training here uses only chief and worker tasks "
                                "(MultiWorkerMirroredStrategy): remove them from the TFJob")
    assert role_from_environment(tf_config({"chief": ["c:1"]}, "chief", 0)) == Role(workers=1, index=0, task="chief")
    with pytest.raises(ClusterConfigError, match="task evaluator 0"):
        role_from_environment(tf_config({"worker": ["a:1"]}, "evaluator", 0))


def test_recall_leaves_out_users_without_interactions_and_is_nan_without_any():
    data, _ = from_pairs(np.zeros((3, 1)), ("f",), np.array([0, 2]), np.array([1, 0]),
                         item_ids=np.array([10, 11], dtype=np.int64))
    top = np.array([[1], [1], [1]], dtype=np.int32)
    assert recall_at_k(top, data) == 0.5  # user 1 has no interactions and does not count
    assert catalogue_indices(np.array([[11, 12]]), data).dtype == np.int64
    assert catalogue_indices(np.array([[11, 12]]), data).tolist() == [[1, -1]]
    none, _ = from_pairs(np.zeros((2, 1)), ("f",), np.array([], dtype=np.int64), np.array([], dtype=np.int64),
                         item_ids=np.array([10, 11], dtype=np.int64))
    assert np.isnan(recall_at_k(np.zeros((2, 1), dtype=np.int64), none))


def test_a_fresh_deployment_and_a_not_ready_service_say_what_they_wait_for():
    from kubernetes import client

    from model.rollout import conditions, deployment_pending, rollout_pending, spec_components

    fresh = client.V1Deployment(metadata=client.V1ObjectMeta(name="d", generation=1),
                                spec=client.V1DeploymentSpec(replicas=None, selector=client.V1LabelSelector(),
                                                             template=client.V1PodTemplateSpec()),
                                status=client.V1DeploymentStatus())
    assert deployment_pending("d", fresh) == "deployment d: generation 1 not yet seen by its controller"
    fresh.status.observed_generation = 1
    assert deployment_pending("d", fresh) == "deployment d: 0 of 1 replicas updated, 0 available"
    fresh.status.updated_replicas = fresh.status.available_replicas = fresh.status.replicas = 1
    assert deployment_pending("d", fresh) is None
    fresh.metadata.generation = None
    fresh.status.observed_generation = None
    assert deployment_pending("d", fresh) is None  # nothing to wait for
    fresh.spec.replicas = 0
    fresh.status.updated_replicas = fresh.status.available_replicas = fresh.status.replicas = None
    assert deployment_pending("d", fresh) is None  # scaled to zero

    from test_cluster_wait import isvc

    service = isvc(2, 2, ready="False")
    service["status"]["conditions"][0].update(reason="MinimumReplicasUnavailable", message="0/1 available")
    deployments = {c: client.V1Deployment(metadata=client.V1ObjectMeta(generation=1), spec=fresh.spec,
                                          status=client.V1DeploymentStatus(observed_generation=1))
                   for c in ("predictor", "transformer")}
    for d in deployments.values():
        d.spec = client.V1DeploymentSpec(replicas=1, selector=client.V1LabelSelector(),
                                         template=client.V1PodTemplateSpec())
        d.status.updated_replicas = d.status.available_replicas = d.status.replicas = 1
    assert rollout_pending(service, deployments) == (
        "not Ready: PredictorReady: MinimumReplicasUnavailable 0/1 available; Ready:")
    service["status"]["conditions"] = []
    assert rollout_pending(service, deployments) == "not Ready: no conditions yet"
    del service["status"]["conditions"]
    assert conditions(service) == {} and conditions({}) == {}
    assert spec_components({"spec": {}}) == ["predictor"]
    assert spec_components({"spec": {"predictor": {}, "transformer": {}}}) == ["predictor"]


def test_the_rollout_reads_its_own_service_and_says_each_step():
    cluster = FakeCluster()
    cluster.isvc["metadata"]["namespace"] = "shop"
    asked = []
    get, read = cluster.get_namespaced_custom_object, cluster.read_namespaced_deployment
    cluster.get_namespaced_custom_object = lambda g, v, ns, p, name: (asked.append((ns, name)), get(
        g, v, "embedder", p, "embedder"))[1]
    cluster.read_namespaced_deployment = lambda name, ns: (asked.append((ns, name)), read(
        name.replace("recs", "embedder"), "embedder"))[1]
    cluster.patch_namespaced_custom_object = (lambda patch: lambda g, v, ns, p, name, body: (
        asked.append((ns, name)), patch(g, v, "embedder", p, "embedder", body)))(cluster.patch_namespaced_custom_object)
    said = []
    target = ClusterTarget(namespace="shop", name="recs")
    line = rollout_on_cluster(target, 2, [0.0], custom=cluster, apps=cluster, timeout=600, sleep=cluster.sleep,
                              clock=cluster.clock, smoke=lambda: 1.25, say=said.append)
    assert set(asked) == {("shop", "recs"), ("shop", "recs-predictor"), ("shop", "recs-transformer")}
    assert line == ("shop/recs serves version 2: rolled out and answered through "
                    "http://recs-transformer.shop.svc.cluster.local/v1/models/embedder:predict (1.2s)")
    assert said[0] == ("shop/recs: rolling out version 2 (annotation embedder.example.com/model-store=2 on "
                       "predictor, transformer)")
    assert said[1:] and all(line.startswith("[") and "shop/recs: " in line for line in said[1:])
    states = [line.split("] ", 1)[1] for line in said[1:]]
    assert len(states) == len(set(states))  # each state said once, however long it lasts


def test_a_failed_rollout_says_it_rolls_back_and_whether_that_finished(capsys):
    cluster = FakeCluster(roll=False)
    said = []
    with pytest.raises(RolloutFailed) as failed:
        rollout_on_cluster(ClusterTarget(), 2, [0.0], custom=cluster, apps=cluster, timeout=30, sleep=cluster.sleep,
                           clock=cluster.clock, smoke=lambda: 0.0, say=said.append)
    assert str(failed.value).endswith("; the rollback did not finish either: deployment embedder-predictor: "
                                      "1 of 1 replicas updated, 1 available, 1 old still running")
    assert ("embedder/embedder: the rollout did not finish within 30s: deployment embedder-predictor: 1 of 1 replicas "
            "updated, 1 available, 1 old still running; rolling back") in said
    rollback = said[said.index(next(line for line in said if line.endswith("rolling back"))) + 1:]
    assert rollback and capsys.readouterr().out == ""  # the rollback's wait is said too, to the same say


def test_the_rollout_polls_every_three_seconds_until_its_timeout_counted_from_its_start():
    from model.rollout import wait_rolled_out

    cluster = FakeCluster(roll=False)
    cluster.now = 1000.0
    slept = []
    cluster.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", "embedder", "inferenceservices",
                                           "embedder", {"spec": {"predictor": {"annotations": {VERSION_ANNOTATION: "3"}}}})

    def sleep(seconds):
        slept.append(seconds)
        cluster.sleep(seconds)

    pending, isvc = wait_rolled_out("embedder", "embedder", 9, custom=cluster, apps=cluster, sleep=sleep,
                                    clock=cluster.clock, say=lambda line: None)
    assert slept == [3, 3, 3] and pending.startswith("deployment embedder-predictor")
    assert isvc["metadata"]["generation"] == 2


def test_the_default_smoke_test_asks_the_service_over_http(transformer_answers):
    url, script, received = transformer_answers
    script += [(200, "1"), (200, "2")]
    base = url.rsplit("/v1/", 1)[0]
    cluster = FakeCluster()
    line = rollout_on_cluster(ClusterTarget(service_url=base), 2, [3.0], custom=cluster, apps=cluster,
                              sleep=cluster.sleep, clock=cluster.clock, say=lambda line: None, smoke_timeout=60)
    assert line.startswith(f"embedder/embedder serves version 2: rolled out and answered through {url}")
    assert received == [{"instances": [[3.0]]}] * 2


def test_waiting_for_a_version_sleeps_half_a_second_and_times_from_its_start(transformer_answers):
    from model.rollout import served_version, wait_until_served

    url, script, _ = transformer_answers
    script += [(200, "1")]
    now, slept = [500.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    with pytest.raises(RolloutFailed, match=r"within 2s; last: HTTP 200 from version 1 \(manifest sha256 not given\)$"):
        wait_until_served(url, 2, [0.0], timeout=2, sleep=sleep, clock=lambda: now[0])
    assert slept == [0.5, 0.5, 0.5, 0.5]
    script[:] = [(200, "v2")]
    assert served_version(url, [0.0]).version is None
    script[:] = [(200, None)]
    assert served_version(url, [0.0]) == Answer(None, None, "HTTP 200 from version None (manifest sha256 not given)")


def test_the_default_smoke_test_uses_its_own_timeout_and_the_rollouts_clock(transformer_answers):
    url, script, received = transformer_answers
    script += [(200, "1")]
    cluster = FakeCluster()
    with pytest.raises(RolloutFailed, match="did not answer with version 2 within 1s"):
        rollout_on_cluster(ClusterTarget(service_url=url.rsplit("/v1/", 1)[0]), 2, [0.0], custom=cluster, apps=cluster,
                           sleep=cluster.sleep, clock=cluster.clock, say=lambda line: None, smoke_timeout=1)
    assert len(received) == 3  # at 0, 0.5 and 1 second of the rollout's own clock


def test_without_clients_given_the_rollout_makes_its_own(monkeypatch, capsys):
    import model.rollout as rollout_module

    cluster = FakeCluster()
    monkeypatch.setattr(rollout_module, "custom_objects", lambda: cluster)
    monkeypatch.setattr(rollout_module, "apps_api", lambda: cluster)
    monkeypatch.setattr(rollout_module, "core_api", lambda: cluster)
    said = []
    line = rollout_on_cluster(ClusterTarget(), 2, [0.0], sleep=cluster.sleep, clock=cluster.clock,
                              smoke=lambda: 0.0, say=said.append)
    assert line.startswith("embedder/embedder serves version 2") and len(said) > 1
    assert capsys.readouterr().out == ""  # every line went to the given say


def test_a_long_refusal_is_cut_to_300_characters(transformer_answers):
    from model.rollout import served_version

    url, script, _ = transformer_answers
    script += [(503, None, "x" * 299 + "yz")]
    assert served_version(url, [0.0]).what == "HTTP 503: " + "x" * 299 + "y"


def test_publish_names_every_taken_folder(tmp_path):
    store = tmp_path / "store"
    for model in ("embedder", "embedder-fused"):
        version_folder(store / model / "2")
    with pytest.raises(PublishError) as taken:
        publish({"embedder": version_folder(tmp_path / "e"), "embedder-fused": version_folder(tmp_path / "f")}, store, 2)
    assert f"({store}/embedder/2, {store}/embedder-fused/2)" in str(taken.value)


def test_a_transformer_that_never_answers_is_given_up_on_after_the_timeout():
    import socket

    from model.rollout import served_version

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections are accepted by the kernel, never answered
    try:
        answer = served_version(f"http://127.0.0.1:{silent.getsockname()[1]}/v1/models/embedder:predict",
                                [0.0], timeout=0.2)
    finally:
        silent.close()
    assert answer.version is None and answer.what.startswith("ReadTimeout")


def test_a_failed_runs_reason_is_its_own_report_not_an_earlier_runs(tmp_path):
    from model.pipeline import failure_reason

    old = tmp_path / "outputs" / "run-1" / "evaluate" / "report"
    old.parent.mkdir(parents=True)
    old.write_text("# Quality gate: version 2 fails\n\nFails because:\n- recall too low\n")
    os.utime(old, (1000.0, 1000.0))
    assert failure_reason(tmp_path) == "Quality gate: version 2 fails: recall too low"
    assert failure_reason(tmp_path, since=2000.0) is None  # this run failed elsewhere (in training, say)
    new = tmp_path / "outputs" / "run-2" / "verify" / "report"
    new.parent.mkdir(parents=True)
    new.write_text("# Checks of version 3: FAILED\n\n| check | result |\n\nFails because:\n- fused parity: x\n"
                   "- ops: y\n")
    passed = tmp_path / "outputs" / "run-2" / "evaluate" / "report"
    passed.parent.mkdir(parents=True)
    passed.write_text("# Quality gate: version 3 passes\n")
    assert failure_reason(tmp_path, since=2000.0) == "Checks of version 3: FAILED: fused parity: x; ops: y"


def test_training_refuses_an_input_that_is_not_there_saying_where_to_put_it(tmp_path):
    from model.release import InputMissing, train_candidate

    users = tmp_path / "users.csv"
    users.write_text("user_id,a\n1,2\n")
    with pytest.raises(InputMissing, match=r"the interactions file /mnt/model-store/data/interactions.csv does not "
                                           r"exist: on a cluster, copy it onto the model store's volume"):
        train_candidate(str(users), "/mnt/model-store/data/interactions.csv", tmp_path / "c", tmp_path / "h",
                        tmp_path / "store", "embedder", {})
    assert not (tmp_path / "c").exists()


def test_the_candidate_records_which_files_it_was_trained_on(tmp_path):
    import hashlib

    from model.release import input_digests

    users, interactions = tmp_path / "u.csv", tmp_path / "i.csv"
    users.write_bytes(b"user_id\n1\n")
    interactions.write_bytes(b"user_id,item_id\n1,2\n" * 100_000)  # read in blocks
    assert input_digests(str(users), str(interactions)) == {
        "users": str(users), "users_sha256": hashlib.sha256(users.read_bytes()).hexdigest(),
        "interactions": str(interactions), "interactions_sha256": hashlib.sha256(interactions.read_bytes()).hexdigest()}


# -- the interface a version's clients rely on -------------------------------------------------------------------

def interface(features=("a", "b", "c"), top_k=10, n_segments=4, ids="integer"):
    from transformer.store.interface import Interface

    return Interface(tuple(features), top_k, n_segments, ids)


def test_an_unchanged_interface_has_no_differences():
    from transformer.store.interface import differences

    assert differences(interface(), interface()) == []


@pytest.mark.parametrize("candidate, said", [
    (dict(features=("a", "x", "c")), "features: the candidate no longer has 'b'; adds 'x'"),
    (dict(features=("a", "b", "c", "d")), "features: the candidate adds 'd'; 4 features instead of 3"),
    (dict(features=("a", "b")), "features: the candidate no longer has 'c'; 2 features instead of 3"),
    (dict(features=("b", "a", "c")), "features: the candidate orders them ['b', 'a', 'c'] instead of ['a', 'b', 'c']"),
    (dict(top_k=5), "top_k: answers hold at most 5 items instead of 10"),
    (dict(n_segments=6), "segments: 6 instead of 4"),
    (dict(ids="text"), "item ids: text instead of integer"),
])
def test_each_change_a_client_would_meet_is_named(candidate, said):
    from transformer.store.interface import differences

    assert differences(interface(), interface(**candidate)) == [said]


def test_a_bundles_interface_is_read_from_it(tmp_path):
    from small_bundle import new_version, write

    from transformer.store.interface import Interface
    from transformer.store.bundle import load_bundle

    folder = new_version(tmp_path)
    write(folder)
    assert Interface.of(load_bundle(folder)) == Interface(("a", "b"), 2, 2, "text")
    other = new_version(tmp_path, 5)
    write(other, item_ids=[7, 8, 9])
    assert Interface.of(load_bundle(other)).item_id_type == "integer"


def test_an_interface_change_fails_the_gate_naming_it_and_the_way_to_change_on_purpose():
    result = Evaluation(k=10, n_users=100, candidate=2, candidate_recall=0.9, popularity_recall=0.1, served=1,
                        interface_changes=["features: the candidate no longer has 'app_share'; adds 'mobile_share'"])
    (reason,) = reasons_to_fail(result)
    assert reason.startswith("its interface is not version 1's, so every client of that version would break "
                             "(features: the candidate no longer has 'app_share'; adds 'mobile_share')")
    assert "--model-name NEW --new-model" in reason
    report = result.markdown()
    assert "The candidate's interface differs from version 1's (not scored against it):" in report
    assert "  - features: the candidate no longer has 'app_share'" in report


def test_run_local_refuses_a_store_that_is_one_models_folder_or_lacks_the_model(tmp_path):
    from model.release import store_problem

    (tmp_path / "models" / "embedder" / "1").mkdir(parents=True)
    (tmp_path / "models" / "other").mkdir()
    assert store_problem(tmp_path / "models", "embedder", False) is None
    assert store_problem(tmp_path / "models" / "embedder", "embedder", False) == (
        f"{tmp_path}/models/embedder is the folder of one model (it holds version folders 1): pass the "
        f"store that holds it, {tmp_path}/models")
    assert store_problem(tmp_path / "models", "embedder-v2", False).startswith(
        f"{tmp_path}/models holds no model 'embedder-v2' (it holds embedder, other): pass the store")
    assert store_problem(tmp_path / "models", "embedder-v2", True) is None
    assert "it is empty or does not exist" in store_problem(tmp_path / "nothing", "embedder", False)


def test_the_gate_refuses_held_out_users_that_are_not_the_candidates_test_split():
    from model.data import UserData
    from model.gate import split_problem

    def users(ids):
        return UserData(features=np.zeros((len(ids), 1)), feature_names=("a",),
                        indptr=np.zeros(len(ids) + 1, dtype=np.int64), indices=np.zeros(0, dtype=np.int32),
                        item_ids=np.array([1, 2]), user_ids=np.array(ids))

    test, train = users(["u3", "u1"]), users(["u2", "u4", "u5"])
    recorded = {"users": 2, "ids_sha256": test.ids_fingerprint(), "train_ids_sha256": train.ids_fingerprint()}
    assert split_problem(recorded, users(["u1", "u3"])) == ""  # the same users, in any order
    assert split_problem(None, train) == ""  # a candidate trained before the split was recorded
    assert split_problem(recorded, train) == (
        "the held-out users are the candidate's training users (3 of them), not its test split: its figures would be "
        "measured on users it learned from")
    assert split_problem(recorded, users(["u1", "u9"])) == (
        "the held-out users (2) are not the candidate's test split (2 users, by their ids): pass the held-out folder "
        "its own training wrote")


def test_a_version_whose_new_pods_crash_on_start_is_rolled_back_at_once_naming_the_container_and_its_exit():
    """Without looking at the pods the rollout waited its whole timeout (10 minutes) for pods that exit at start, and
    said only "0 available"; it now stops at the second exit, names the container, its exit code and its last words,
    and rolls back."""
    cluster = FakeCluster(roll=False)
    cluster.crashing = ("transformer", "kserve-container", 2, "loading bundles\nerror: no model version under "
                        "/mnt/models has a usable bundle")
    retired = []
    with pytest.raises(RolloutFailed) as failed:
        rollout_on_cluster(ClusterTarget(), 2, [0.0], custom=cluster, apps=cluster, core=cluster, timeout=600,
                           retire=lambda: retired.append(2), sleep=cluster.sleep, clock=cluster.clock, say=lambda _: 0)
    message = str(failed.value)
    assert message.startswith("version 2 was not rolled out to embedder/embedder: the new pods do not start: container "
                              "kserve-container of pod embedder-transformer-new exited with code 2 (Error), 2 times: "
                              "loading bundles | error: no model version under /mnt/models has a usable bundle")
    assert cluster.now < 60 and retired == [2]  # at the second exit, not after 600 s
    assert cluster.isvc["spec"]["predictor"]["annotations"] == {VERSION_ANNOTATION: "1"}  # the annotations restored


def test_a_container_that_cannot_start_is_named_with_its_reason_and_one_exit_is_not_yet_a_crash():
    from kubernetes import client

    from model.rollout import container_failure

    def pod(*statuses):
        return client.V1Pod(metadata=client.V1ObjectMeta(name="p"), status=client.V1PodStatus(
            container_statuses=list(statuses)))

    def status(restarts=0, waiting=None, message=None, terminated=None):
        return client.V1ContainerStatus(name="kserve-container", image="i", image_id="", ready=False,
                                        restart_count=restarts, state=client.V1ContainerState(
                                            waiting=client.V1ContainerStateWaiting(reason=waiting, message=message)
                                            if waiting else None, terminated=terminated))

    assert container_failure(pod(status(waiting="ErrImageNeverPull", message="image kserve-embedder-transformer:dev "
                                         "is not present"))) == (
        "container kserve-container of pod p cannot start: ErrImageNeverPull (image kserve-embedder-transformer:dev "
        "is not present)")
    once = client.V1ContainerStateTerminated(exit_code=1, reason="Error")
    assert container_failure(pod(status(restarts=1, terminated=once))) is None  # a fluke, for all we know
    assert container_failure(pod(status(restarts=2, terminated=once))) == (
        "container kserve-container of pod p exited with code 1 (Error), 2 times")
    finished = client.V1ContainerStateTerminated(exit_code=0, reason="Completed")
    assert container_failure(pod(status(restarts=3, terminated=finished))) is None  # exit 0 is no crash
    assert container_failure(pod(status(waiting="ContainerCreating"))) is None

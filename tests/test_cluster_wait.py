"""The cluster scripts' wait for a (re)deployed InferenceService, against recorded KServe and Deployment statuses
served by a fake Kubernetes API (the kubernetes client's own models).

KServe never resets Ready when the spec changes, so a redeploy looks Ready at once: the wait must see the
controller reconcile the new generation and each component's Deployment roll out before it trusts Ready."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from scripts import cluster


def isvc(generation: int, observed: int | None, ready: str = "True", transformer: bool = True) -> dict:
    spec = {"predictor": {"model": {"modelFormat": {"name": "tensorflow"}}}}
    if transformer:
        spec["transformer"] = {"containers": [{"name": "kserve-container", "image": "t:dev"}]}
    status = {"url": "http://embedder.embedder.example.com",
              "conditions": [{"type": "PredictorReady", "status": ready}, {"type": "IngressReady", "status": "True"},
                             {"type": "Ready", "status": ready}]}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"name": "embedder", "namespace": "embedder", "generation": generation}, "spec": spec,
            "status": status}


def deployment(name: str, generation: int, observed: int, replicas: int, updated: int, available: int,
               want: int = 1):
    """A V1Deployment with the fields the API server reports during a rolling update (old and new pods side by
    side): the kubernetes client's own models, as it hands them to callers."""
    from kubernetes import client

    labels = client.V1LabelSelector(match_labels={"app": name})
    template = client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"app": name}),
                                        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="i")]))
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, namespace="embedder", generation=generation),
        spec=client.V1DeploymentSpec(replicas=want, selector=labels, template=template),
        status=client.V1DeploymentStatus(observed_generation=observed, replicas=replicas, updated_replicas=updated,
                                         available_replicas=available, ready_replicas=available))


class Timeline:
    """The API's answers over time: each sleep of the wait moves to the next recorded snapshot."""

    def __init__(self, snapshots):
        self.snapshots, self.at, self.now = snapshots, 0, 0.0

    def sleep(self, seconds):
        self.now += seconds
        self.at = min(self.at + 1, len(self.snapshots) - 1)

    def clock(self):
        return self.now

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("serving.kserve.io", "v1beta1", "inferenceservices")
        found = self.snapshots[self.at]["isvc"]
        if found is None:
            raise ApiException(status=404)
        return found

    def read_namespaced_deployment(self, name, namespace):
        found = self.snapshots[self.at]["deployments"].get(name)
        if found is None:
            raise ApiException(status=404)
        return found


def run(snapshots, timeout=600.0, capsys=None):
    timeline = Timeline(snapshots)
    code = cluster.wait_ready("embedder", "embedder", timeout, custom=timeline, apps=timeline, sleep=timeline.sleep,
                              clock=timeline.clock)
    return code, timeline


ROLLED = {"embedder-predictor": deployment("embedder-predictor", 1, 1, 1, 1, 1),
          "embedder-transformer": deployment("embedder-transformer", 1, 1, 1, 1, 1)}


def test_a_redeploy_that_stays_ready_waits_for_the_new_generation_and_the_new_replicaset(capsys):
    """Ready is True throughout, as KServe reports it during a redeploy; the wait still sees every step."""
    snapshots = [
        {"isvc": isvc(2, 1), "deployments": ROLLED},  # the spec changed; KServe has not reconciled it
        {"isvc": isvc(2, 2), "deployments": {  # reconciled: the transformer's Deployment has its new spec...
            "embedder-predictor": ROLLED["embedder-predictor"],
            "embedder-transformer": deployment("embedder-transformer", 2, 1, 1, 0, 1)}},  # ...not yet observed
        {"isvc": isvc(2, 2), "deployments": {  # the new ReplicaSet scales up beside the old pod
            "embedder-predictor": ROLLED["embedder-predictor"],
            "embedder-transformer": deployment("embedder-transformer", 2, 2, 2, 1, 1)}},
        {"isvc": isvc(2, 2), "deployments": {  # the new pod is available, the old one still terminating
            "embedder-predictor": ROLLED["embedder-predictor"],
            "embedder-transformer": deployment("embedder-transformer", 2, 2, 2, 1, 2)}},
        {"isvc": isvc(2, 2), "deployments": {  # rolled out
            "embedder-predictor": ROLLED["embedder-predictor"],
            "embedder-transformer": deployment("embedder-transformer", 2, 2, 1, 1, 1)}},
    ]
    code, timeline = run(snapshots)
    out = capsys.readouterr().out
    assert code == 0 and timeline.at == 4, out
    assert [line.split(": ", 1)[1] for line in out.splitlines()[:-1]] == [
        "KServe has not reconciled generation 2 yet (it observed 1)",
        "deployment embedder-transformer: generation 2 not yet seen by its controller",
        "deployment embedder-transformer: 1 of 1 replicas updated, 1 available, 1 old still running",
        "deployment embedder-transformer: 1 of 1 replicas updated, 2 available, 1 old still running",
    ]
    assert out.splitlines()[-1] == "embedder/embedder is Ready at generation 2: http://embedder.embedder.example.com"


def test_a_rollout_that_never_completes_times_out_naming_the_deployment(capsys):
    stuck = {"isvc": isvc(3, 3), "deployments": {
        "embedder-predictor": deployment("embedder-predictor", 3, 3, 2, 1, 1),  # the new pod never gets ready
        "embedder-transformer": ROLLED["embedder-transformer"]}}
    code, timeline = run([stuck], timeout=30)
    err = capsys.readouterr().err
    assert code == 1 and timeline.now >= 30
    assert "error: embedder/embedder did not roll out within 30s: deployment embedder-predictor: 1 of 1 replicas " \
           "updated, 1 available, 1 old still running" in err
    assert "kubectl -n embedder rollout status deploy/embedder-predictor" in err


def test_a_first_deploy_waits_for_the_service_its_deployments_and_ready(capsys):
    snapshots = [
        {"isvc": None, "deployments": {}},
        {"isvc": isvc(1, 1, ready="False"), "deployments": {}},
        {"isvc": isvc(1, 1, ready="False"), "deployments": {
            "embedder-predictor": deployment("embedder-predictor", 1, 1, 1, 1, 0),
            "embedder-transformer": ROLLED["embedder-transformer"]}},
        {"isvc": isvc(1, 1, ready="False"), "deployments": ROLLED},
        {"isvc": isvc(1, 1), "deployments": ROLLED},
    ]
    code, _ = run(snapshots)
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split(": ", 1)[1] for line in lines[:-1]] == [
        "the InferenceService does not exist yet",
        "deployment embedder-predictor does not exist yet",
        "deployment embedder-predictor: 1 of 1 replicas updated, 0 available",
        "not Ready: PredictorReady:; Ready:",
    ]


def test_a_spec_without_a_transformer_waits_for_the_predictor_only():
    snapshots = [{"isvc": isvc(4, 4, transformer=False),
                  "deployments": {"embedder-predictor": deployment("embedder-predictor", 4, 4, 1, 1, 1)}}]
    assert run(snapshots)[0] == 0


class Deleting:
    """The APIs remove_stale_components calls; records the deletions, 404 for what does not exist."""

    def __init__(self, spec_isvc, existing):
        self.isvc, self.existing, self.deleted = spec_isvc, set(existing), []

    def get_namespaced_custom_object(self, *args):
        return self.isvc

    def _delete(self, kind):
        def delete(name, namespace):
            if (kind, name) not in self.existing:
                raise ApiException(status=404)
            self.deleted.append((kind, name, namespace))
        return delete

    def __getattr__(self, attribute):
        kinds = {"delete_namespaced_deployment": "deployment", "delete_namespaced_service": "service",
                 "delete_namespaced_horizontal_pod_autoscaler": "horizontalpodautoscaler"}
        if attribute in kinds:
            return self._delete(kinds[attribute])
        raise AttributeError(attribute)


def test_switching_to_an_overlay_without_a_transformer_deletes_what_kserve_left_of_it(capsys):
    api = Deleting(isvc(5, 5, transformer=False), {("deployment", "embedder-transformer"),
                                                   ("service", "embedder-transformer")})
    deleted = cluster.remove_stale_components("embedder", "embedder", custom=api, apps=api, core=api, autoscaling=api)
    assert deleted == ["deployment/embedder-transformer", "service/embedder-transformer"]
    assert api.deleted == [("deployment", "embedder-transformer", "embedder"), ("service", "embedder-transformer",
                                                                                 "embedder")]
    assert "deleted deployment/embedder-transformer: the InferenceService no longer has a transformer" in \
        capsys.readouterr().out
    keeps = Deleting(isvc(5, 5, transformer=True), {("deployment", "embedder-transformer")})
    assert cluster.remove_stale_components("embedder", "embedder", custom=keeps, apps=keeps, core=keeps,
                                           autoscaling=keeps) == [] and keeps.deleted == []


def test_an_api_error_other_than_not_found_is_not_swallowed():
    class Failing(Timeline):
        def read_namespaced_deployment(self, name, namespace):
            raise ApiException(status=403, reason="Forbidden")

    timeline = Failing([{"isvc": isvc(1, 1), "deployments": {}}])
    with pytest.raises(ApiException):
        cluster.wait_ready("embedder", "embedder", 10, custom=timeline, apps=timeline, sleep=timeline.sleep,
                           clock=timeline.clock)

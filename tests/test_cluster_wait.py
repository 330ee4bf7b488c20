"""The cluster scripts' wait for a (re)deployed InferenceService, against KServe and Deployment statuses served by
a fake Kubernetes API (the kubernetes client's own models): recorded from KServe v0.20.0's own controller on a real
control plane (tests/data/controlplane/, ``python -m tests.controlplane.record``), and a few written by hand.

KServe never resets Ready when the spec changes, so a redeploy looks Ready at once: the wait must see KServe copy
the spec's annotations onto each component's Deployment and that Deployment roll out before it trusts Ready."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from model.rollout import REVISION_ANNOTATION, VERSION_ANNOTATION, rollout_pending, spec_components
from scripts import cluster

NEVER_READY = "97"  # the version KWOK holds un-Ready in the recordings (tests/controlplane/cluster.py)


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


# --- statuses recorded from KServe's own controller (python -m tests.controlplane.record) --------------------------

RECORDED = Path(__file__).resolve().parent / "data" / "controlplane"
SCENARIOS = ("first-deploy", "new-image", "rollout-restart", "version-rollout", "never-ready")


def as_deployment(data: dict):
    """A Deployment's JSON as the kubernetes client hands it to callers (its own model)."""
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(data, "V1Deployment")


def recorded(scenario: str) -> list[dict]:
    states = json.loads((RECORDED / f"{scenario}.json").read_text())
    return [{"isvc": state["isvc"], "pods": state["pods"],
             "deployments": {name: as_deployment(d) for name, d in state["deployments"].items()}} for state in states]


def pending(state: dict) -> str | None:
    """The wait's verdict on one recorded state (its Deployments by component, as read_state gives them)."""
    return rollout_pending(state["isvc"], {name.removeprefix("embedder-"): d for name, d in state["deployments"].items()})


def serving_what_the_spec_asks(state: dict) -> bool:
    """Independently of the wait's rules: every live pod of each component the spec has carries that component's
    revision and model version, and is Ready (the pods' own record, beside the statuses)."""
    spec = state["isvc"]["spec"]
    for component in spec_components(state["isvc"]):
        asked = spec[component].get("annotations") or {}
        live = [p for p in state["pods"].get(component, []) if not p["deleting"]]
        if not live or not all(p["ready"] for p in live):
            return False
        if any(p["revision"] != asked.get(REVISION_ANNOTATION) or p["version"] != asked.get(VERSION_ANNOTATION)
               for p in live):
            return False
    return True


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_on_kserves_recorded_statuses_the_wait_ends_only_once_the_new_pods_serve(scenario):
    states = recorded(scenario)
    verdicts = [pending(s) if s["isvc"] else "no InferenceService" for s in states]
    for index, (state, verdict) in enumerate(zip(states, verdicts)):
        if verdict is None:
            assert serving_what_the_spec_asks(state), f"{scenario} state {index}: the wait would end on {state['pods']}"
    assert verdicts[-1] is None, verdicts  # every scenario ends rolled out (never-ready: once it is rolled back)
    assert any(v is not None for v in verdicts)  # and each had something to wait for


def test_a_recorded_redeploy_with_a_new_image_is_waited_through_every_step(capsys):
    """Ready is True throughout, as KServe reports it during a redeploy; the wait still sees every step."""
    states = recorded("new-image")
    states = states[next(i for i, s in enumerate(states) if s["isvc"]["metadata"]["generation"] == 2):]  # applied
    code, timeline = run(states)
    out = capsys.readouterr().out
    first_done = next(i for i, s in enumerate(states) if pending(s) is None)
    assert code == 0 and timeline.at == first_done, out
    said = [line.split(": ", 1)[1] for line in out.splitlines()[:-1]]
    assert said[0].startswith("deployment embedder-transformer: KServe has not reconciled the newest spec yet "
                              "(embedder.example.com/revision=")
    assert any("1 old still running" in line for line in said), said
    assert out.splitlines()[-1].startswith("embedder/embedder is Ready at generation 2")


def test_after_kserve_undid_a_restart_the_old_rule_would_wait_forever():
    """``kubectl rollout restart`` raised the Deployment's generation twice (the restart, KServe's revert), and KServe
    copied the Deployment's observedGeneration into the InferenceService's: the counters the old wait compared."""
    final = recorded("rollout-restart")[-1]
    meta, status = final["isvc"]["metadata"], final["isvc"]["status"]
    assert status["observedGeneration"] == final["deployments"]["embedder-transformer"].status.observed_generation
    assert status["observedGeneration"] > meta["generation"]
    template = final["deployments"]["embedder-transformer"].spec.template.metadata.annotations
    assert "kubectl.kubernetes.io/restartedAt" not in template  # KServe dropped it
    assert pending(final) is None


def test_recorded_pods_that_never_turn_ready_keep_the_wait_pending_naming_the_deployment():
    states = recorded("never-ready")
    asked_never = [s for s in states
                   if s["isvc"]["spec"]["predictor"]["annotations"].get(VERSION_ANNOTATION) == NEVER_READY]
    reasons = [pending(s) for s in asked_never]
    assert reasons and all(r and r.startswith("deployment embedder-") for r in reasons), reasons
    assert any("1 old still running" in r for r in reasons), reasons


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


# --- the revision stamp (python -m scripts.cluster apply) --------------------------------------------------------

def rendered(overlay: str) -> list[dict]:
    import subprocess

    import yaml

    done = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests" / "overlays" / overlay)], capture_output=True,
                          text=True, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def stamps(overlay: str, image_id: str) -> dict[str, str]:
    (isvc_doc,) = [d for d in cluster.stamp_revisions(rendered(overlay), {TRANSFORMER: image_id})
                   if d["kind"] == "InferenceService"]
    return {c: isvc_doc["spec"][c]["annotations"][REVISION_ANNOTATION] for c in spec_components(isvc_doc)}


ROOT = Path(__file__).resolve().parent.parent
TRANSFORMER = "kserve-embedder-transformer:dev"


@pytest.mark.heavy  # renders the overlays with kubectl kustomize (a process)
def test_a_new_transformer_image_changes_the_stamp_of_the_component_that_runs_it_only():
    first, again, new = stamps("kind", "sha256:1"), stamps("kind", "sha256:1"), stamps("kind", "sha256:2")
    assert first == again and set(first) == {"predictor", "transformer"}
    assert new["transformer"] != first["transformer"] and new["predictor"] == first["predictor"]
    # Collocated, the transformer runs in the predictor's pod: its stamp follows the image.
    assert stamps("collocated", "sha256:1")["predictor"] != stamps("collocated", "sha256:2")["predictor"]
    assert stamps("fused", "sha256:1") == stamps("fused", "sha256:2")  # no transformer image at all


@pytest.mark.heavy  # renders the overlays with kubectl kustomize (a process)
def test_the_stamp_follows_the_spec_and_not_itself():
    docs = rendered("kind")
    (isvc_doc,) = [d for d in docs if d["kind"] == "InferenceService"]
    before, predictor = cluster.revision(isvc_doc, "transformer", {}), cluster.revision(isvc_doc, "predictor", {})
    isvc_doc["spec"]["transformer"]["annotations"][REVISION_ANNOTATION] = "anything"
    assert cluster.revision(isvc_doc, "transformer", {}) == before
    isvc_doc["spec"]["transformer"]["containers"][0]["args"].append("--max_rows=8")
    assert cluster.revision(isvc_doc, "transformer", {}) != before
    assert cluster.revision(isvc_doc, "predictor", {}) == predictor  # another component's spec is not its own
    isvc_doc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] = "none"
    assert cluster.revision(isvc_doc, "predictor", {}) != predictor  # the metadata KServe copies into every pod is


def test_image_ids_are_given_as_image_equals_id():
    assert cluster.parse_image_ids(["a:dev=sha256:1", "b=x=y"]) == {"a:dev": "sha256:1", "b": "x=y"}
    with pytest.raises(SystemExit, match="--image-id takes IMAGE=ID"):
        cluster.parse_image_ids(["a:dev"])

"""Roll a published model version out, and wait until it is what clients get.

On a cluster (:func:`rollout_on_cluster`, the kubernetes Python client): patch the
InferenceService so both components roll, wait until KServe has reconciled that spec and
both Deployments have rolled out, smoke through the transformer's Service, and roll back when any
of it fails. Locally (:func:`wait_until_served`): the running transformer picks a new version up
from the store by itself; wait until its answers say that version.

What proves that KServe reconciled a spec is the component Deployment's pod template carrying
what the spec asks for: KServe copies each component's annotations onto it, so every annotation of
ours (``embedder.example.com/...``) must be there with the same value before a rollout counts
(:func:`rollout_pending`, which ``python -m scripts.cluster wait-ready`` uses too). Neither of the
two counters KServe exposes says it: in Standard mode the InferenceService's
``status.observedGeneration`` is copied from its first Deployment's, an unrelated counter (seen on
KServe v0.20.0's controller, tests/test_control_plane.py), and ``Ready`` is never reset when the
spec changes (a rollout keeps the old pod until the new one is ready).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# Our annotations on a component: KServe copies them onto the component Deployment's pod template, so a change
# of one is a rollout, and the template carrying them proves KServe reconciled the spec that set them.
ANNOTATION_PREFIX = "embedder.example.com/"
# The model store version both components serve, set by the pipeline's rollout (README, "Update the model").
VERSION_ANNOTATION = "embedder.example.com/model-store"
# A digest of a component's spec and of the images it runs, set by ``python -m scripts.cluster apply``
# (deploy.sh): a new image under the same tag changes it, so KServe rolls the pods out and keeps the change.
REVISION_ANNOTATION = "embedder.example.com/revision"
COMPONENTS = ("predictor", "transformer")  # KServe Standard mode: Deployment <isvc>-<component>


def _load_config():
    from kubernetes import config

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()


def custom_objects():
    from kubernetes import client

    _load_config()
    return client.CustomObjectsApi()


def apps_api():
    from kubernetes import client

    _load_config()
    return client.AppsV1Api()


def core_api():
    from kubernetes import client

    _load_config()
    return client.CoreV1Api()


def conditions(isvc: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (isvc.get("status") or {}).get("conditions", [])}


def spec_components(isvc: dict) -> list[str]:
    """The components the InferenceService's spec asks for (the predictor always)."""
    spec = isvc.get("spec") or {}
    return [c for c in COMPONENTS if c == "predictor" or spec.get(c)]


def deployment_pending(name: str, deployment) -> str | None:
    """Why a Deployment has not rolled out its newest spec yet (None: rolled out), as `kubectl rollout status`
    judges it: the Deployment controller saw the newest generation, and every replica is updated and available."""
    if deployment is None:
        return f"deployment {name} does not exist yet"
    meta, spec, status = deployment.metadata, deployment.spec, deployment.status
    if (status.observed_generation or 0) < (meta.generation or 0):
        return f"deployment {name}: generation {meta.generation} not yet seen by its controller"
    want = spec.replicas if spec.replicas is not None else 1
    updated, ready = status.updated_replicas or 0, status.available_replicas or 0
    total = status.replicas or 0
    if updated < want or total > updated or ready < updated:
        return (f"deployment {name}: {updated} of {want} replicas updated, {ready} available"
                + (f", {total - updated} old still running" if total > updated else ""))
    return None


def ours(annotations: dict | None) -> dict[str, str]:
    """Our annotations (:data:`ANNOTATION_PREFIX`) among ``annotations``."""
    return {k: v for k, v in (annotations or {}).items() if k.startswith(ANNOTATION_PREFIX)}


def component_annotations(isvc: dict, component: str) -> dict[str, str]:
    """Our annotations on one component of the InferenceService's spec."""
    return ours(((isvc.get("spec") or {}).get(component) or {}).get("annotations"))


def template_pending(name: str, wanted: dict[str, str], deployment) -> str | None:
    """Why the Deployment's pod template does not show the spec ``wanted`` came from yet (None: it does)."""
    if deployment is None:
        return f"deployment {name} does not exist yet"
    template = deployment.spec.template.metadata
    have = ours(template.annotations if template is not None else None)
    if have == wanted:
        return None
    differ = sorted(set(have) | set(wanted), key=str)
    shown = ", ".join(f"{k}={have.get(k)!s} (asked: {wanted.get(k)!s})" for k in differ if have.get(k) != wanted.get(k))
    return f"deployment {name}: KServe has not reconciled the newest spec yet ({shown})"


def rollout_pending(isvc: dict, deployments: dict) -> str | None:
    """What keeps a (re)deployed InferenceService from serving its newest spec (None: it does).

    First KServe must have reconciled the spec: each component Deployment's pod template carries the component's
    annotations of ours (:func:`template_pending`); then each Deployment must have rolled that template out
    (:func:`deployment_pending`); only then does Ready mean the new pods. A spec with none of our annotations
    (applied by hand, not with ``python -m scripts.cluster apply``) cannot be told from its predecessor: only the
    Deployments' own rollout is waited for (:func:`unproven_components` names them)."""
    if not isvc:
        return "the InferenceService does not exist yet"
    name = isvc["metadata"]["name"]
    for component in spec_components(isvc):
        deployment = deployments.get(component)
        why = (template_pending(f"{name}-{component}", component_annotations(isvc, component), deployment)
               or deployment_pending(f"{name}-{component}", deployment))
        if why:
            return why
    ready = conditions(isvc).get("Ready", {})
    if ready.get("status") != "True":
        not_ready = [f"{t}: {c.get('reason', '')} {c.get('message', '')}".strip()
                     for t, c in conditions(isvc).items() if c.get("status") != "True"]
        return "not Ready: " + ("; ".join(not_ready) or "no conditions yet")
    return None


def unproven_components(isvc: dict) -> list[str]:
    """The components whose spec has none of our annotations: a wait for them cannot prove KServe saw the spec."""
    return [c for c in spec_components(isvc) if not component_annotations(isvc, c)]


def read_state(custom, apps, namespace: str, name: str) -> tuple[dict, dict]:
    """The InferenceService ({} when it does not exist) and its component Deployments (None when absent)."""
    from kubernetes.client.exceptions import ApiException

    try:
        isvc = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return {}, {}
    deployments = {}
    for component in spec_components(isvc):
        try:
            deployments[component] = apps.read_namespaced_deployment(f"{name}-{component}", namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            deployments[component] = None
    return isvc, deployments


# A container of the newest spec's pods that has exited this many times on start keeps crashing: the rollout has
# failed, whatever time is left (Kubernetes' back-off alone would take minutes to say so). Once can be a fluke.
CRASHES = 2
# Waiting reasons that no wait mends: the image is not on the node (kind: not loaded) or the pod spec is wrong.
STUCK = ("ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
         "CreateContainerError", "RunContainerError")


def container_failure(pod) -> str | None:
    """Why one of the pod's containers cannot start (None: none has failed so far), naming the container, its exit
    code and what it said (its termination message: the manifests ask for the log's last lines on an error)."""
    status = pod.status
    for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        state, last = container.state, container.last_state
        waiting = state.waiting if state is not None else None
        if waiting is not None and waiting.reason in STUCK:
            return (f"container {container.name} of pod {pod.metadata.name} cannot start: {waiting.reason}"
                    + (f" ({waiting.message})" if waiting.message else ""))
        ended = (last.terminated if last is not None else None) or (state.terminated if state is not None else None)
        if ended is not None and ended.exit_code and (container.restart_count or 0) >= CRASHES:
            said = " | ".join(line for line in (ended.message or "").strip().splitlines()[-3:] if line.strip())
            return (f"container {container.name} of pod {pod.metadata.name} exited with code {ended.exit_code}"
                    f"{f' ({ended.reason})' if ended.reason else ''}, {container.restart_count} times"
                    + (f": {said}" if said else ""))
    return None


def crashed(core, isvc: dict) -> str | None:
    """A container of the newest spec's pods that keeps failing to start (None: none), or None when the pods cannot
    be read (no ``pods list`` permission: then only the wait's timeout tells)."""
    from kubernetes.client.exceptions import ApiException

    meta = isvc["metadata"]
    for component in spec_components(isvc):
        wanted = component_annotations(isvc, component)
        try:
            pods = core.list_namespaced_pod(meta["namespace"], label_selector=(
                f"serving.kserve.io/inferenceservice={meta['name']},component={component}")).items
        except ApiException as exc:
            if exc.status in (401, 403):
                return None
            raise
        for pod in pods:
            if ours(pod.metadata.annotations) == wanted and not pod.metadata.deletion_timestamp:
                why = container_failure(pod)
                if why:
                    return why
    return None


def gave_up_early(pending: str | None) -> bool:
    """Whether a wait ended before its timeout because the new pods cannot start (:func:`crashed`)."""
    return bool(pending) and pending.startswith("container ")


def wait_rolled_out(namespace: str, name: str, timeout: float, *, custom, apps, core=None, sleep=time.sleep,
                    clock=time.monotonic, say=lambda line: print(line, flush=True)) -> tuple[str | None, dict]:
    """Wait until the InferenceService serves its newest spec (:func:`rollout_pending`), saying each change; with
    ``core`` (a CoreV1Api), stop early when a container of the new pods keeps crashing (:func:`crashed`).

    Returns (None, the InferenceService) once it does, or (what it still waits for, the last seen) at the timeout.
    """
    started, last = clock(), None
    while True:
        isvc, deployments = read_state(custom, apps, namespace, name)
        pending = rollout_pending(isvc, deployments)
        elapsed = clock() - started
        failure = crashed(core, isvc) if pending is not None and core is not None and isvc else None
        if failure:
            return f"{failure} ({pending})", isvc
        if pending is None or elapsed >= timeout:
            return pending, isvc
        if pending != last:
            say(f"[{elapsed:5.0f}s] {namespace}/{name}: {pending}")
            last = pending
        sleep(3)


class RolloutFailed(RuntimeError):
    """The new version did not become what clients get (it was rolled back when that was possible)."""


def probe_row(feature_min, feature_max) -> list[float]:
    """One user row every version accepts: the middle of each feature's training range."""
    return [float(v) for v in (np.asarray(feature_min, dtype=np.float64) + np.asarray(feature_max, dtype=np.float64)) / 2]


VERSION_HEADER, MANIFEST_HEADER = "x-model-version", "x-model-manifest-sha256"  # transformer/model.py's


@dataclass(frozen=True)
class Answer:
    """What one probe request found: the version and manifest sha256 that answered (None: no answer), and how."""

    version: int | None
    manifest_sha256: str | None
    what: str

    def is_of(self, version: int, manifest_sha256: str | None) -> bool:
        return self.version == version and (manifest_sha256 is None or self.manifest_sha256 == manifest_sha256)


def served_version(predict_url: str, row: list[float], *, timeout: float = 10.0) -> Answer:
    """Send one row to a transformer's v1 predict URL: which version (and which artifact: its manifest's sha256)
    answered."""
    import httpx

    try:
        response = httpx.post(predict_url, json={"instances": [row]}, timeout=timeout)
    except httpx.HTTPError as exc:
        return Answer(None, None, f"{type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return Answer(None, None, f"HTTP {response.status_code}: {response.text[:300]}")
    version, digest = response.headers.get(VERSION_HEADER), response.headers.get(MANIFEST_HEADER)
    return Answer(int(version) if version and version.isdigit() else None, digest,
                  f"HTTP 200 from version {version} (manifest sha256 {digest or 'not given'})")


def wait_until_served(predict_url: str, version: int, row: list[float], *, timeout: float = 120.0,
                      manifest_sha256: str | None = None, sleep=time.sleep, clock=time.monotonic) -> float:
    """Wait until the transformer at ``predict_url`` answers with ``version`` (and, when given, the artifact whose
    manifest has that sha256: one number can name two trainings, as when the version went into another store than
    the one served); the seconds it took.

    Raises:
        RolloutFailed: it did not within ``timeout`` (with its last answer).
    """
    started = clock()
    wanted = f"version {version}" + (f" (manifest sha256 {manifest_sha256})" if manifest_sha256 else "")
    while True:
        answer = served_version(predict_url, row)
        if answer.is_of(version, manifest_sha256):
            return clock() - started
        if clock() - started >= timeout:
            other = (answer.version == version and manifest_sha256 is not None)
            raise RolloutFailed(
                f"{predict_url} did not answer with {wanted} within {timeout:.0f}s; last: {answer.what}"
                + ("; that is another artifact under the same number: the transformer does not serve what was "
                   "published (is the store it reads the one the version went into?)" if other else ""))
        sleep(0.5)


@dataclass(frozen=True)
class ClusterTarget:
    """The InferenceService a version rolls out to, and where its transformer answers inside the cluster."""

    namespace: str = "embedder"
    name: str = "embedder"
    model: str = "embedder"
    service_url: str = ""  # default: the transformer's Service, http://<name>-transformer.<namespace>.svc

    @property
    def predict_url(self) -> str:
        base = self.service_url or f"http://{self.name}-transformer.{self.namespace}.svc.cluster.local"
        return f"{base.rstrip('/')}/v1/models/{self.model}:predict"


def _annotations(isvc: dict) -> dict[str, str | None]:
    spec = isvc.get("spec") or {}
    return {c: ((spec.get(c) or {}).get("annotations") or {}).get(VERSION_ANNOTATION) for c in spec_components(isvc)}


def _patch(custom, target: ClusterTarget, values: dict[str, str | None]) -> None:
    """Set (or, with None, remove) the version annotation of each component: a new generation to roll."""
    body = {"spec": {c: {"annotations": {VERSION_ANNOTATION: v}} for c, v in values.items()}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL, target.name, body)


def rollout_on_cluster(target: ClusterTarget, version: int, row: list[float], *, custom=None, apps=None, core=None,
                       retire: Callable[[], None] | None = None, timeout: float = 600.0, smoke_timeout: float = 120.0,
                       manifest_sha256: str | None = None, sleep=time.sleep, clock=time.monotonic, smoke=None,
                       say=lambda line: print(line, flush=True)) -> str:
    """Roll ``version`` out to ``target`` and check that clients get it; roll back if not.

    Patches the version annotation of both components (KServe then rolls both Deployments), waits for
    the rollout (:func:`wait_rolled_out`), then sends ``row`` through the transformer's Service until it
    answers with ``version`` (and the artifact whose manifest has ``manifest_sha256``, when given). On a failure it calls ``retire`` (which takes the version out of the model
    store, so that no pod serves it again), restores the annotations, and waits for that rollout too.

    Returns: a line saying what was rolled out. Raises: RolloutFailed, after the rollback.
    """
    # A caller that brings its own API objects brings the pods' too (or none: no early end on a crash).
    core = core if core is not None or custom is not None else core_api()
    custom = custom if custom is not None else custom_objects()
    apps = apps if apps is not None else apps_api()
    smoke = smoke or (lambda: wait_until_served(target.predict_url, version, row, timeout=smoke_timeout,
                                                manifest_sha256=manifest_sha256, sleep=sleep, clock=clock))
    where = f"{target.namespace}/{target.name}"
    isvc, _ = read_state(custom, apps, target.namespace, target.name)
    if not isvc:
        raise RolloutFailed(f"InferenceService {where} does not exist: deploy it first (scripts/deploy.sh)")
    before = _annotations(isvc)
    _patch(custom, target, {c: str(version) for c in before})
    say(f"{where}: rolling out version {version} (annotation {VERSION_ANNOTATION}={version} on {', '.join(before)})")
    pending, _ = wait_rolled_out(target.namespace, target.name, timeout, custom=custom, apps=apps, core=core, sleep=sleep,
                                 clock=clock, say=say)
    failure = (None if not pending else f"the new pods do not start: {pending}" if gave_up_early(pending)
               else f"the rollout did not finish within {timeout:.0f}s: {pending}")
    if failure is None:
        try:
            seconds = smoke()
        except RolloutFailed as exc:
            failure = f"the smoke test through the Service failed: {exc}"
        else:
            return f"{where} serves version {version}: rolled out and answered through {target.predict_url} ({seconds:.1f}s)"
    say(f"{where}: {failure}; rolling back")
    # The annotations are restored whatever retiring the version does: a store the task cannot write (EACCES on a
    # hostPath volume) must not leave the InferenceService asking for the failed version.
    retired = ""
    if retire is not None:
        try:
            retire()
        except Exception as exc:  # noqa: BLE001  (any failure to retire is reported, after the rollback)
            retired = f"; the version could not be retired from the model store ({type(exc).__name__}: {exc})"
            say(f"{where}: could not retire version {version}: {exc}; restoring the annotations anyway")
    _patch(custom, target, before)
    pending, _ = wait_rolled_out(target.namespace, target.name, timeout, custom=custom, apps=apps, core=core, sleep=sleep,
                                 clock=clock, say=say)
    back = "rolled back" if pending is None else f"the rollback did not finish either: {pending}"
    raise RolloutFailed(f"version {version} was not rolled out to {where}: {failure}; {back}{retired}")

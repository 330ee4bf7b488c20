"""Talk to the cluster with the kubernetes Python client: wait for the InferenceService, smoke-test it.

    python -m scripts.cluster wait-ready   [--namespace embedder] [--timeout 600]
    python -m scripts.cluster remove-stale [--namespace embedder]
    python -m scripts.cluster smoke      [--namespace embedder] [--entry transformer|collocated|fused]

``smoke`` reaches the service's entry point through ``kubectl port-forward`` (the
transformer's Service; with ``collocated`` or ``fused``, the predictor's), sends the
example requests in scripts/requests/ and compares every answer with the one the
local stack (same build/ folder) gives. The fused model speaks TF Serving's API: it
gets the valid examples as raw feature rows, and its tensors are read back as the
transformer's answers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from scripts.localstack import ROOT, LocalStack, StackError, free_port

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
REQUESTS = ("one-user.json", "batch.json", "bad-row.json")
VALID_REQUESTS = REQUESTS[:2]
ENTRIES = {"transformer": "transformer", "collocated": "predictor", "fused": "predictor"}  # -> Service


def _item_id(value):
    """An item id as the transformer writes it: an int, or text (TensorFlow gives text ids as bytes)."""
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else int(value)


def fused_as_predictions(outputs: dict) -> list[dict]:
    """The fused model's tensors in the transformer's answer shape (padding, id -1 or "", dropped)."""
    outputs = {name: value.numpy().tolist() if hasattr(value, "numpy") else
               value.tolist() if hasattr(value, "tolist") else value for name, value in outputs.items()}
    return [
        {"segment": int(outputs["segment"][i]), "segment_distance": float(outputs["segment_distance"][i]),
         "items": [{"id": _item_id(d), "score": float(s)}
                   for d, s in zip(outputs["item_ids"][i], outputs["item_scores"][i]) if _item_id(d) not in (-1, "")]}
        for i in range(len(outputs["segment"]))
    ]


def newest_features(models: Path) -> list[str]:
    """The feature order of the newest model version under ``models``."""
    from transformer.store.bundle import bundle_dir, model_versions, read_manifest

    return [f["name"] for f in read_manifest(bundle_dir(models / str(model_versions(models)[-1])))["features"]]


def post_fused(base_url: str, model: str, features: list[str]) -> list[tuple[int, dict]]:
    """The valid examples to the fused model, as raw rows in the given feature order."""
    answers = []
    with httpx.Client(timeout=30.0) as client:
        for name in VALID_REQUESTS:
            instances = json.loads((ROOT / "scripts" / "requests" / name).read_text())["instances"]
            rows = [[row[f] for f in features] if isinstance(row, dict) else row for row in instances]
            response = client.post(f"{base_url}/v1/models/{model}:predict",
                                   json={"signature_name": "serving_float64", "inputs": rows})
            body = response.json()
            answers.append((response.status_code, {"predictions": fused_as_predictions(body["outputs"])}
                            if response.status_code == 200 else body))
    return answers


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


def conditions(isvc: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (isvc.get("status") or {}).get("conditions", [])}


COMPONENTS = ("predictor", "transformer")  # KServe Standard mode: Deployment <isvc>-<component>


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


def rollout_pending(isvc: dict, deployments: dict) -> str | None:
    """What keeps a (re)deployed InferenceService from serving its newest spec (None: it does).

    KServe never resets Ready when the spec changes (Ready = PredictorReady + IngressReady, PredictorReady =
    the Deployment is Available, and a rollout keeps the old pod until the new one is ready), so Ready alone
    says nothing about a redeploy: first the controller must have reconciled the newest generation, then
    each component's Deployment must have rolled out, and only then does Ready mean the new pods."""
    if not isvc:
        return "the InferenceService does not exist yet"
    generation = (isvc.get("metadata") or {}).get("generation")
    observed = (isvc.get("status") or {}).get("observedGeneration")
    if generation is not None and observed != generation:
        return f"KServe has not reconciled generation {generation} yet (it observed {observed})"
    name = isvc["metadata"]["name"]
    for component in spec_components(isvc):
        why = deployment_pending(f"{name}-{component}", deployments.get(component))
        if why:
            return why
    ready = conditions(isvc).get("Ready", {})
    if ready.get("status") != "True":
        not_ready = [f"{t}: {c.get('reason', '')} {c.get('message', '')}".strip()
                     for t, c in conditions(isvc).items() if c.get("status") != "True"]
        return "not Ready: " + ("; ".join(not_ready) or "no conditions yet")
    return None


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


def wait_ready(namespace: str, name: str, timeout: float, custom=None, apps=None, sleep=time.sleep,
               clock=time.monotonic) -> int:
    """Wait until the InferenceService serves its newest spec (:func:`rollout_pending`), printing each change."""
    custom = custom if custom is not None else custom_objects()
    apps = apps if apps is not None else apps_api()
    started = clock()
    last = None
    while True:
        isvc, deployments = read_state(custom, apps, namespace, name)
        pending = rollout_pending(isvc, deployments)
        if pending is None:
            print(f"{namespace}/{name} is Ready at generation {isvc['metadata'].get('generation')}: "
                  f"{isvc['status'].get('url', '')}", flush=True)
            return 0
        elapsed = clock() - started
        if pending != last:
            print(f"[{elapsed:5.0f}s] {namespace}/{name}: {pending}", flush=True)
            last = pending
        if elapsed >= timeout:
            print(f"error: {namespace}/{name} did not roll out within {timeout:.0f}s: {pending}", file=sys.stderr)
            print(f"look at: kubectl -n {namespace} get pods; kubectl -n {namespace} describe isvc {name}; "
                  f"kubectl -n {namespace} rollout status deploy/{name}-predictor", file=sys.stderr)
            return 1
        sleep(3)


def remove_stale_components(namespace: str, name: str, custom=None, apps=None, core=None, autoscaling=None) -> list[str]:
    """Delete the component objects KServe made for a component the spec no longer has: removing
    ``spec.transformer`` (the fused or collocated overlay after the kind one) leaves the ``<name>-transformer``
    Deployment, Service and HPA running, since KServe does not delete them. Returns what was deleted."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = custom if custom is not None else custom_objects()
    apps = apps if apps is not None else apps_api()
    core = core if core is not None else client.CoreV1Api()
    autoscaling = autoscaling if autoscaling is not None else client.AutoscalingV2Api()
    isvc = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    deleted = []
    for component in set(COMPONENTS) - set(spec_components(isvc)):
        object_name = f"{name}-{component}"
        for kind, delete in (("deployment", apps.delete_namespaced_deployment),
                             ("service", core.delete_namespaced_service),
                             ("horizontalpodautoscaler", autoscaling.delete_namespaced_horizontal_pod_autoscaler)):
            try:
                delete(object_name, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                continue
            deleted.append(f"{kind}/{object_name}")
            print(f"deleted {kind}/{object_name}: the InferenceService no longer has a {component}", flush=True)
    return deleted


def post_examples(base_url: str, model: str) -> list[tuple[int, dict]]:
    answers = []
    with httpx.Client(timeout=30.0) as client:
        for name in REQUESTS:
            response = client.post(f"{base_url}/v1/models/{model}:predict",
                                   content=(ROOT / "scripts" / "requests" / name).read_bytes(),
                                   headers={"content-type": "application/json"})
            answers.append((response.status_code, response.json()))
    return answers


def same(a: list[tuple[int, dict]], b: list[tuple[int, dict]], tol: float = 1e-5) -> list[str]:
    """Differences between two sets of answers (empty when they agree)."""
    problems = []
    for name, (status_a, body_a), (status_b, body_b) in zip(REQUESTS, a, b):
        if status_a != status_b:
            problems.append(f"{name}: status {status_a} on the cluster, {status_b} locally")
            continue
        if status_a != 200:
            continue
        if len(body_a["predictions"]) != len(body_b["predictions"]):
            problems.append(f"{name}: {len(body_a['predictions'])} predictions on the cluster, "
                            f"{len(body_b['predictions'])} locally")
            continue
        for i, (p, q) in enumerate(zip(body_a["predictions"], body_b["predictions"])):
            if p["segment"] != q["segment"] or [x["id"] for x in p["items"]] != [x["id"] for x in q["items"]]:
                problems.append(f"{name} row {i}: {p} != {q}")
            elif abs(p["segment_distance"] - q["segment_distance"]) > tol or any(
                abs(x["score"] - y["score"]) > tol for x, y in zip(p["items"], q["items"])
            ):
                problems.append(f"{name} row {i}: numbers differ by more than {tol}")
    return problems


def smoke(namespace: str, name: str, entry: str = "transformer") -> int:
    port = free_port()
    forward = subprocess.Popen(
        ["kubectl", "-n", namespace, "port-forward", f"svc/{name}-{ENTRIES[entry]}", f"{port}:80"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/v1/models/{name}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or forward.poll() is not None:
                print(f"error: could not reach svc/{name}-{ENTRIES[entry]} through kubectl port-forward",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        remote = (post_fused(base, name, newest_features(ROOT / "build" / "models" / name)) if entry == "fused"
                  else post_examples(base, name))
    finally:
        forward.terminate()
        forward.wait()
    try:
        with LocalStack(predictor="local") as stack:
            local = post_examples(stack.transformer_url, "embedder")
    except StackError as exc:
        print(f"error: the local stack did not start: {exc}", file=sys.stderr)
        return 1
    sent = VALID_REQUESTS if entry == "fused" else REQUESTS
    problems = same(remote, local[:len(sent)])
    for request, (status, body) in zip(sent, remote):
        print(f"{request}: HTTP {status}, {len(body.get('predictions', [])) or body.get('error', '')}")
    if problems:
        print("error: the cluster answers differently from the local stack:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    print(f"smoke test passed ({entry}): the cluster answers exactly like the local stack")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["wait-ready", "remove-stale", "smoke"],
                        help="wait-ready: until the newest spec is rolled out and Ready; remove-stale: delete the "
                             "objects of components the spec no longer has; smoke: compare answers with the local stack")
    parser.add_argument("--namespace", default="embedder")
    parser.add_argument("--name", default="embedder", help="InferenceService name")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="transformer",
                        help="the overlay deployed: transformer (kind, production), collocated or fused")
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return wait_ready(args.namespace, args.name, args.timeout)
    if args.command == "remove-stale":
        remove_stale_components(args.namespace, args.name)
        return 0
    return smoke(args.namespace, args.name, args.entry)


if __name__ == "__main__":
    sys.exit(main())

"""Talk to the cluster with the kubernetes Python client: apply an overlay, wait for the InferenceService, smoke-test it.

    python -m scripts.cluster apply --overlay manifests/overlays/kind [--image-id IMAGE=ID ...]
    python -m scripts.cluster wait-ready   [--namespace embedder] [--timeout 600]
    python -m scripts.cluster remove-stale [--namespace embedder]
    python -m scripts.cluster smoke      [--namespace embedder] [--entry transformer|collocated|fused]

``apply`` renders the overlay (``kubectl kustomize``), stamps each InferenceService component with
``embedder.example.com/revision``, a digest of that component's spec and of the ids of the images it runs,
and applies the result (``kubectl apply -f -``). KServe copies the stamp onto the component's Deployment,
which is what ``wait-ready`` waits to see: a new image under the same tag is a new stamp, so KServe rolls
the pods out (a ``kubectl rollout restart`` it would revert), and the wait cannot end on the old pods.

``smoke`` reaches the service's entry point through ``kubectl port-forward`` (the
transformer's Service; with ``collocated`` or ``fused``, the predictor's), sends the
example requests in scripts/requests/ and compares every answer with the one the
local stack (same build/ folder) gives. The fused model speaks TF Serving's API: it
gets the valid examples as raw feature rows, and its tensors are read back as the
transformer's answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from model.rollout import (  # noqa: F401  (rollout_pending, deployment_pending: the wait's rules, tested here)
    COMPONENTS, GROUP, PLURAL, REVISION_ANNOTATION, VERSION, apps_api, core_api, custom_objects, deployment_pending,
    gave_up_early, rollout_pending, spec_components, unproven_components, wait_rolled_out,
)
from scripts.localstack import ROOT, LocalStack, StackError, free_port
from transformer.helpformat import HelpFormatter

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


def component_images(component: dict) -> list[str]:
    """The images a component's pods run (its containers'; a predictor's model server comes from its runtime)."""
    containers = list(component.get("containers") or [])
    for key in ("model", "transformer-container"):
        if isinstance(component.get(key), dict) and component[key].get("image"):
            containers.append(component[key])
    return sorted({c["image"] for c in containers if c.get("image")})


def revision(isvc: dict, component: str, image_ids: dict[str, str]) -> str:
    """A digest of what one component's pods are made of: the InferenceService's metadata that KServe copies into
    them, the component's spec (without this stamp), and the id of each image it runs that ``image_ids`` knows."""
    spec = {k: v for k, v in isvc["spec"][component].items()}
    spec["annotations"] = {k: v for k, v in (spec.get("annotations") or {}).items() if k != REVISION_ANNOTATION}
    meta = isvc.get("metadata") or {}
    made_of = {"annotations": meta.get("annotations") or {}, "labels": meta.get("labels") or {}, "spec": spec,
               "images": {image: image_ids.get(image, "") for image in component_images(spec)}}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def stamp_revisions(docs: list[dict], image_ids: dict[str, str]) -> list[dict]:
    """Each InferenceService's components stamped with :func:`revision` (the documents are changed in place)."""
    for doc in docs:
        if doc.get("kind") != "InferenceService":
            continue
        for component in COMPONENTS:
            if (doc.get("spec") or {}).get(component):
                stamp = revision(doc, component, image_ids)
                doc["spec"][component].setdefault("annotations", {})[REVISION_ANNOTATION] = stamp
    return docs


def render(overlay: Path, image_ids: dict[str, str]) -> str:
    """The overlay as ``kubectl kustomize`` renders it, with every component stamped."""
    import yaml

    done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: kubectl kustomize {overlay} failed: {done.stderr.strip()}")
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return yaml.safe_dump_all(stamp_revisions(docs, image_ids), sort_keys=False)


def apply(overlay: Path, image_ids: dict[str, str], kubectl_args: list[str] = ()) -> int:
    """Render, stamp and apply an overlay (``kubectl apply -f -``, with ``kubectl_args`` before ``-f``)."""
    rendered = render(overlay, image_ids)
    done = subprocess.run(["kubectl", "apply", *kubectl_args, "-f", "-"], input=rendered, text=True)
    return done.returncode


def parse_image_ids(values: list[str]) -> dict[str, str]:
    ids = {}
    for value in values:
        image, sep, image_id = value.partition("=")
        if not sep or not image or not image_id:
            raise SystemExit(f"error: --image-id takes IMAGE=ID (as the manifests name the image, and its id from "
                             f"`docker image inspect --format '{{{{.Id}}}}' IMAGE`), got {value!r}")
        ids[image] = image_id
    return ids


def wait_ready(namespace: str, name: str, timeout: float, custom=None, apps=None, core=None, sleep=time.sleep,
               clock=time.monotonic) -> int:
    """Wait until the InferenceService serves its newest spec (:func:`model.rollout.rollout_pending`), or one of its
    new pods' containers keeps crashing (:func:`model.rollout.crashed`)."""
    core = core if core is not None or custom is not None else core_api()
    custom = custom if custom is not None else custom_objects()
    apps = apps if apps is not None else apps_api()
    pending, isvc = wait_rolled_out(namespace, name, timeout, custom=custom, apps=apps, core=core, sleep=sleep,
                                    clock=clock)
    unproven = unproven_components(isvc) if isvc else []
    if unproven:
        print(f"note: {', '.join(unproven)} of {namespace}/{name} carry no embedder.example.com/ annotation, so "
              "nothing tells KServe's reconcile of this spec from the last one: only the Deployments' own rollout "
              "was waited for. Apply with `python -m scripts.cluster apply --overlay DIR` (as deploy.sh does) to "
              "wait for the spec you applied.", file=sys.stderr)
    if pending is None:
        print(f"{namespace}/{name} is Ready at generation {isvc['metadata'].get('generation')}: "
              f"{isvc['status'].get('url', '')}", flush=True)
        return 0
    within = "" if gave_up_early(pending) else f" within {timeout:.0f}s"
    print(f"error: {namespace}/{name} did not roll out{within}: {pending}", file=sys.stderr)
    # The old pods keep serving: a Deployment removes them only once the new ones are available.
    print(f"look at: kubectl -n {namespace} get pods; kubectl -n {namespace} describe isvc {name}; "
          f"kubectl -n {namespace} rollout status deploy/{name}-predictor", file=sys.stderr)
    return 1


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


def smoke(namespace: str, name: str, entry: str = "transformer", build: Path = ROOT / "build") -> int:
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
        remote = (post_fused(base, name, newest_features(build / "models" / name)) if entry == "fused"
                  else post_examples(base, name))
    finally:
        forward.terminate()
        forward.wait()
    try:
        with LocalStack(build=build, predictor="local", log_dir=build / "logs" / "smoke") as stack:
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
    parser = argparse.ArgumentParser(prog="python -m scripts.cluster", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("command", choices=["apply", "wait-ready", "remove-stale", "smoke"],
                        help="apply: render, stamp and apply an overlay; wait-ready: until the newest spec is rolled "
                             "out and Ready; remove-stale: delete the objects of components the spec no longer has; "
                             "smoke: compare answers with the local stack")
    parser.add_argument("--overlay", type=Path, help="apply: the kustomize folder (e.g. manifests/overlays/kind)")
    parser.add_argument("--image-id", action="append", default=[], metavar="IMAGE=ID",
                        help="apply: the id of an image the manifests name (repeatable); a new id rolls its pods")
    parser.add_argument("--server-side", action="store_true", help="apply: kubectl apply --server-side")
    parser.add_argument("--namespace", default="embedder", help="the InferenceService's namespace")
    parser.add_argument("--name", default="embedder", help="InferenceService name")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="transformer",
                        help="the overlay deployed: transformer (kind, production), collocated or fused")
    parser.add_argument("--build", type=Path, default=ROOT / "build",
                        help="smoke: the build folder the cluster serves (kind-up.sh mounts build/ into the node); "
                             "the local stack serves the same models/ for the comparison")
    args = parser.parse_args(argv)
    if args.command == "apply":
        if args.overlay is None:
            parser.error("apply needs --overlay DIR")
        return apply(args.overlay, parse_image_ids(args.image_id), ["--server-side"] if args.server_side else [])
    if args.command == "wait-ready":
        return wait_ready(args.namespace, args.name, args.timeout)
    if args.command == "remove-stale":
        remove_stale_components(args.namespace, args.name)
        return 0
    return smoke(args.namespace, args.name, args.entry, args.build)


if __name__ == "__main__":
    sys.exit(main())

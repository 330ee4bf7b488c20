"""Talk to the cluster with the kubernetes Python client: wait for the InferenceService, smoke-test it.

    python -m scripts.cluster wait-ready [--namespace embedder] [--timeout 600]
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


def custom_objects():
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    return client.CustomObjectsApi()


def conditions(isvc: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (isvc.get("status") or {}).get("conditions", [])}


def wait_ready(namespace: str, name: str, timeout: float) -> int:
    """Poll the InferenceService until its Ready condition is True, printing a progress line."""
    from kubernetes.client.exceptions import ApiException

    api = custom_objects()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            isvc = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            isvc = {}
        conds = conditions(isvc)
        summary = ", ".join(f"{t}={c.get('status')}" for t, c in sorted(conds.items())) or "no status yet"
        elapsed = timeout - (deadline - time.monotonic())
        if summary != last:
            print(f"\r[{elapsed:5.0f}s] {namespace}/{name}: {summary}".ljust(100), flush=True)
            last = summary
        if conds.get("Ready", {}).get("status") == "True":
            print(f"{namespace}/{name} is Ready: {isvc['status'].get('url', '')}")
            return 0
        time.sleep(3)
    not_ready = [f"{t}: {c.get('reason', '')} {c.get('message', '')}".strip()
                 for t, c in conditions(isvc).items() if c.get("status") != "True"]
    print(f"error: {namespace}/{name} not Ready after {timeout:.0f}s. " + "; ".join(not_ready), file=sys.stderr)
    print(f"look at: kubectl -n {namespace} get pods; kubectl -n {namespace} describe isvc {name}", file=sys.stderr)
    return 1


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
    parser.add_argument("command", choices=["wait-ready", "smoke"])
    parser.add_argument("--namespace", default="embedder")
    parser.add_argument("--name", default="embedder", help="InferenceService name")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="transformer",
                        help="the overlay deployed: transformer (kind, production), collocated or fused")
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return wait_ready(args.namespace, args.name, args.timeout)
    return smoke(args.namespace, args.name, args.entry)


if __name__ == "__main__":
    sys.exit(main())

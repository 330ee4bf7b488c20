"""Record what KServe and the Deployment controller report during a deploy, for tests/test_cluster_wait.py.

    python -m tests.controlplane.record [--out tests/data/controlplane]

Starts the control plane, then for each scenario polls the InferenceService, its Deployments and its pods every
few milliseconds while the project's own commands act, and writes every distinct state it saw, in order, to
``<scenario>.json``. The states are the API's own JSON (trimmed of bookkeeping fields) and, for each component, what
its live pods carry (revision, model version, Ready), the independent record of which pods were serving:

- ``first-deploy``: ``scripts.cluster apply`` of the kind overlay on an empty namespace;
- ``new-image``: the same overlay applied again with a new transformer image id;
- ``rollout-restart``: ``kubectl rollout restart`` of the transformer, which KServe undoes;
- ``version-rollout``: the pipeline's annotation patch to a new model version on both components;
- ``never-ready``: a version whose new pods never turn Ready (KWOK holds them), then the annotations restored.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.controlplane.build import build
from tests.controlplane.cluster import NEVER_READY_VERSION, ControlPlane

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE, NAME = "embedder", "embedder"
BOOKKEEPING = ("managedFields", "uid", "resourceVersion", "creationTimestamp", "selfLink")


def trimmed(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    for key in BOOKKEEPING:
        meta.pop(key, None)
    (meta.get("annotations") or {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return obj


def pod_summary(pod: dict) -> dict:
    annotations = pod["metadata"].get("annotations") or {}
    return {"name": pod["metadata"]["name"], "deleting": bool(pod["metadata"].get("deletionTimestamp")),
            "revision": annotations.get("embedder.example.com/revision"),
            "version": annotations.get("embedder.example.com/model-store"),
            "ready": any(c["type"] == "Ready" and c["status"] == "True"
                         for c in (pod.get("status") or {}).get("conditions", []))}


class Recorder:
    """Polls the API on a thread of its own; ``states`` holds each distinct state once, in the order seen."""

    def __init__(self, kubeconfig: Path):
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(kubeconfig))
        self.custom, self.apps, self.core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
        self.states: list[dict] = []
        self._stop = threading.Event()

    def snapshot(self) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            isvc = self.custom.get_namespaced_custom_object("serving.kserve.io", "v1beta1", NAMESPACE,
                                                            "inferenceservices", NAME)
        except ApiException as exc:
            if exc.status != 404:
                raise
            isvc = None
        deployments = {}
        for d in self.apps.list_namespaced_deployment(NAMESPACE, _preload_content=False).json()["items"]:
            deployments[d["metadata"]["name"]] = trimmed(d)
        pods = {}
        for p in self.core.list_namespaced_pod(NAMESPACE, _preload_content=False).json()["items"]:
            component = (p["metadata"].get("labels") or {}).get("component", "?")
            pods.setdefault(component, []).append(pod_summary(p))
        for summaries in pods.values():
            summaries.sort(key=lambda s: s["name"])
        return {"isvc": trimmed(isvc) if isvc else None, "deployments": deployments, "pods": pods}

    def run(self):
        last = None
        while not self._stop.is_set():
            state = self.snapshot()
            key = json.dumps(state, sort_keys=True)
            if key != last:
                self.states.append(state)
                last = key
            time.sleep(0.005)

    def during(self, act, settle: float = 3.0) -> list[dict]:
        """Record while ``act()`` runs and ``settle`` seconds after; the states seen."""
        self.states, self._stop = [], threading.Event()
        self.states.append(self.snapshot())
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        act()
        time.sleep(settle)
        self._stop.set()
        thread.join()
        return self.states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "controlplane",
                        help="where the <scenario>.json files go (default: %(default)s)")
    args = parser.parse_args(argv)
    build()
    work = ROOT / "build" / "controlplane" / "record"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    with ControlPlane.start(work) as cp:
        def project(*command: str) -> None:
            done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=cp.env, capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: {' '.join(command)}: {done.stderr}")

        def apply(image_id: str):
            return lambda: project("scripts.cluster", "apply", "--overlay", "manifests/overlays/kind", "--image-id",
                                   f"kserve-embedder-transformer:dev={image_id}")

        def patch(version: str):
            body = {"spec": {c: {"annotations": {"embedder.example.com/model-store": version}}
                             for c in ("predictor", "transformer")}}
            return lambda: cp.kubectl("-n", NAMESPACE, "patch", "inferenceservice", NAME, "--type", "merge",
                                      "-p", json.dumps(body))

        cp.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
        recorder = Recorder(cp.kubeconfig)
        scenarios = {
            "first-deploy": apply("sha256:" + "1" * 64),
            "new-image": apply("sha256:" + "2" * 64),
            "rollout-restart": lambda: cp.kubectl("-n", NAMESPACE, "rollout", "restart", f"deploy/{NAME}-transformer"),
            "version-rollout": patch("5"),
            "never-ready": lambda: (patch(NEVER_READY_VERSION)(), time.sleep(8), patch("5")()),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for name, act in scenarios.items():
            states = recorder.during(act)
            (args.out / f"{name}.json").write_text(json.dumps(states, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {len(states)} states -> {args.out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

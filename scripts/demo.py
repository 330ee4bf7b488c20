"""The whole pipeline on this machine: train, serve, send real requests, show the answers, stop.

    python -m scripts.demo              # what ./scripts/demo.sh runs
    python -m scripts.demo --no-train   # serve the newest version the demo trained before

The demo keeps to a build folder of its own, build/demo/: its model store (each run adds a version to
build/demo/models/embedder/) and its servers' logs. A stack serving your models from build/models/ beside it is
left alone: the demo's synthetic versions never reach its store, nor its logs.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from scripts.localstack import ROOT, LocalStack, StackError
from transformer.store.bundle import model_versions

REQUESTS = ROOT / "scripts" / "requests"
DEMO_BUILD = ROOT / "build" / "demo"


def show(title: str, response: httpx.Response, elapsed_ms: float) -> None:
    version = response.headers.get("x-model-version")
    print(f"\n== {title}: HTTP {response.status_code} in {elapsed_ms:.1f} ms"
          + (f", model version {version}" if version else ""))
    body = response.json()
    if response.status_code != 200:
        print(f"   error: {body.get('error')}")
        return
    if "outputs" in body:  # v2: tensors, printed as they came
        for output in body["outputs"]:
            print(f"   {output['name']:17s} {output['datatype']:5s} {output['shape']}  {output['data']}")
        return
    for i, prediction in enumerate(body["predictions"]):
        items = ", ".join(f"{item['id']} ({item['score']:.2f})" for item in prediction["items"]) or "none above the minimum score"
        print(f"   user {i}: segment {prediction['segment']} (distance {prediction['segment_distance']:.3f})")
        print(f"           items {items}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-train", action="store_true", help="serve the newest model version the demo trained "
                        "before (in build/demo/)")
    parser.add_argument("--predictor", choices=["auto", "container", "local"], default="auto",
                        help="container: tensorflow/serving image; local: python -m model.standin; auto: container if one runs")
    args = parser.parse_args(argv)

    started = time.monotonic()
    if not args.no_train or not model_versions(DEMO_BUILD / "models" / "embedder"):
        print(f"== training (synthetic users, into {DEMO_BUILD.relative_to(ROOT)}/; see `python -m model.train --help` "
              "for your own CSV)")
        from model.train import main as train

        if train(["--out", str(DEMO_BUILD)]) != 0:
            return 1

    print("\n== starting the predictor (TF Serving REST API) and the transformer on 127.0.0.1")
    stack = LocalStack(build=DEMO_BUILD, predictor=args.predictor)
    try:
        stack.start()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"   predictor:   {stack.predictor_url}/v1/models/embedder   ({stack.predictor_kind})")
        print(f"   transformer: {stack.transformer_url}/v1/models/embedder:predict")
        print(f"                {stack.transformer_url}/v2/models/embedder/infer   (and v2 gRPC on {stack.grpc_target})")
        url = f"{stack.transformer_url}/v1/models/embedder:predict"
        v2_url = f"{stack.transformer_url}/v2/models/embedder/infer"
        with httpx.Client(timeout=10.0) as client:
            for name, title, target in (
                ("one-user.json", "one user, features by name", url),
                ("batch.json", "five users, by name and as lists in manifest order", url),
                ("bad-row.json", "a request with a bad value (expect 400)", url),
                ("v2-two-users.json", "two users over the Open Inference Protocol (v2): tensors in, tensors out", v2_url),
            ):
                body = (REQUESTS / name).read_bytes()
                t0 = time.perf_counter()
                response = client.post(target, content=body, headers={"content-type": "application/json"})
                show(f"{title}  [scripts/requests/{name}]", response, (time.perf_counter() - t0) * 1000)
            print("\n   to try it yourself, keep both running with  .venv/bin/python -m scripts.localstack up --build build/demo  and send")
            print("   curl -s -H 'content-type: application/json' -d @scripts/requests/one-user.json "
                  "http://127.0.0.1:8080/v1/models/embedder:predict")
            ok = client.post(url, content=(REQUESTS / "batch.json").read_bytes(),
                             headers={"content-type": "application/json"}).status_code == 200
    finally:
        stack.stop()
    print(f"\n== stopped both servers; whole demo took {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A local server that speaks TF Serving's REST and gRPC APIs over a SavedModel folder.

For machines without ``tensorflow_model_server`` (it ships only as the
``tensorflow/serving`` container image). It takes the same flags, reads the
same layout (``<model_base_path>/<version>/saved_model.pb``) and serves the
versions TF Serving's version policy names (the latest one by default; a
``--model_config_file`` may say ``latest { num_versions: N }``, ``all`` or
``specific``). Like TF Serving it watches the folder: a new version is loaded
before an older one is unloaded (availability preserving), a version whose
folder is removed is unloaded. It answers like TF Serving's REST API
(``tensorflow_serving/g3doc/api_rest.md``):

    GET  /v1/models/<name>[/versions/<v>]              model status
    GET  /v1/models/<name>[/versions/<v>]/metadata     signature defs
    POST /v1/models/<name>[/versions/<v>]:predict      row or columnar JSON

Errors come back as ``{"error": "..."}`` with TF Serving's status codes. On ``--port``
it serves TF Serving's gRPC API (``grpc_api.py``: Predict, GetModelMetadata,
GetModelStatus) from the same loaded versions.

    python -m model.standin --model_name embedder --model_base_path build/models/embedder \
        --port 8500 --rest_api_port 8501
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

import model  # noqa: F401  (TensorFlow environment defaults)
from model.standin.serving_config import ConfigError, VersionPolicy, read_model_config
from model.standin.tfjson import (
    TensorJsonError,
    TensorSpecInfo,
    check_shapes,
    loads,
    parse_predict_request,
    render_predict_response,
)
from transformer.helpformat import HelpFormatter

log = logging.getLogger("model.standin")

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"

# The two route patterns of TF Serving's http_rest_api_handler.cc.
_PREDICTION_RE = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)"
)
_STATUS_RE = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)


class ServingError(Exception):
    """A status with its HTTP code, answered as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Signature:
    function: object
    inputs: dict[str, TensorSpecInfo]
    method_name: str


@dataclass
class Servable:
    """One loaded version of the model."""

    name: str
    version: int
    path: Path
    signatures: dict[str, Signature]
    signature_defs: dict  # JSON form of the MetaGraphDef's signature_def map

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> "Servable":
        import tensorflow as tf
        from google.protobuf.json_format import MessageToDict
        from tensorflow.core.protobuf import saved_model_pb2

        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        meta_graph = next(
            (m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags), proto.meta_graphs[0]
        )
        signature_defs = {
            key: MessageToDict(sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for key, sig in meta_graph.signature_def.items()
        }
        loaded = tf.saved_model.load(str(path))
        signatures = {}
        for key, function in loaded.signatures.items():
            _, kwargs = function.structured_input_signature
            inputs = {
                alias: TensorSpecInfo(
                    dtype=np.dtype(object) if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype),
                    shape=None if spec.shape.rank is None else tuple(spec.shape.as_list()),
                )
                for alias, spec in kwargs.items()
            }
            method = meta_graph.signature_def[key].method_name or PREDICT_METHOD
            signatures[key] = Signature(function=function, inputs=inputs, method_name=method)
        return cls(name=name, version=version, path=path, signatures=signatures,
                   signature_defs=signature_defs)

    def signature(self, name: str) -> Signature:
        key = name or DEFAULT_SIGNATURE
        if key not in self.signatures:
            raise TensorJsonError(f'Serving signature name: "{key}" not found in signature def')
        return self.signatures[key]

    def run(self, signature: Signature, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        tensors = {k: tf.constant(v) for k, v in arrays.items()}
        try:
            outputs = signature.function(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise ServingError(400, str(exc).strip().splitlines()[0]) from None
        return {k: v.numpy() for k, v in outputs.items()}


def _version_dirs(base: Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(
        int(p.name) for p in base.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()
    )


class ModelStore:
    """The versions of one model that the version policy aspires to, loaded from ``base_path``."""

    def __init__(self, name: str, base_path: Path, policy: VersionPolicy = VersionPolicy()):
        self.name = name
        self.base_path = base_path
        self.policy = policy
        self.loaded: dict[int, Servable] = {}
        self.retired: set[int] = set()
        self.failed: set[int] = set()

    def refresh(self) -> bool:
        """Load the aspired versions not loaded yet, then unload the others (TF Serving's
        availability-preserving order). Returns True when the served set changed."""
        aspired = self.policy.aspired(_version_dirs(self.base_path))
        changed = False
        for version in sorted(set(aspired) - set(self.loaded) - self.failed, reverse=True):
            try:
                servable = Servable.load(self.name, version, self.base_path / str(version))
            except Exception:  # noqa: BLE001 - a broken version must not stop serving the others
                log.exception("could not load version %d of %s; serving the others", version, self.name)
                self.failed.add(version)
                continue
            self.loaded[version] = servable
            self.retired.discard(version)
            changed = True
            log.info("serving %s version %d from %s", self.name, version, servable.path)
        for version in set(self.loaded) - set(aspired):
            del self.loaded[version]
            self.retired.add(version)
            changed = True
            log.info("unloaded %s version %d", self.name, version)
        self.failed &= set(_version_dirs(self.base_path))  # a version folder written again is tried again
        return changed

    def _check_name(self, name: str, missing_message: str) -> None:
        if name != self.name or not self.loaded:
            raise ServingError(404, missing_message)

    def servable(self, name: str, version: str | None, label: str | None) -> Servable:
        request = (f"Specific({name}, {version})" if version else
                   f"Label({name}, {label})" if label else f"Latest({name})")
        self._check_name(name, f"Servable not found for request: {request}")
        if label or (version and int(version) not in self.loaded):
            raise ServingError(404, f"Servable not found for request: {request}")
        return self.loaded[int(version) if version else max(self.loaded)]

    def status(self, name: str, version: str | None) -> dict:
        if name != self.name or not (self.loaded or self.retired):
            raise ServingError(404, f"Could not find any versions of model {name}")
        entries = sorted([(v, "END") for v in self.retired] + [(v, "AVAILABLE") for v in self.loaded])
        if version is not None:
            entries = [e for e in entries if e[0] == int(version)]
            if not entries:
                raise ServingError(404, f"Could not find version {version} of model {name}")
        return {
            "model_version_status": [
                {"version": str(v), "state": state, "status": {"error_code": "OK", "error_message": ""}}
                for v, state in entries
            ]
        }

    def metadata(self, name: str, version: str | None, label: str | None) -> dict:
        servable = self.servable(name, version, label)
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": servable.signature_defs}},
        }


class TFServingApp:
    """The ASGI application: routing and status codes as in TF Serving's REST handler."""

    def __init__(self, store: ModelStore, threads: int = 4):
        self.store = store
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="predict")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            status, payload = await self.handle(scope["method"], scope["path"], bytes(body))
        except ServingError as exc:
            status, payload = exc.status, orjson.dumps({"error": str(exc)})
        except TensorJsonError as exc:
            status, payload = 400, orjson.dumps({"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a server answers, it does not crash
            log.exception("internal error")
            status, payload = 500, orjson.dumps({"error": f"Internal: {exc}"})
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        })
        await send({"type": "http.response.body", "body": payload})

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if not path.lower().startswith("/v1/"):
            raise ServingError(404, f"Not found: {method} {path}")
        match = _PREDICTION_RE.fullmatch(path)
        if method == "POST" and match:
            name, version, label, verb = match.groups()
            servable = self.store.servable(name, version, label)
            return 200, await self.predict(servable, verb.lower(), body)
        match = _STATUS_RE.fullmatch(path)
        if method == "GET" and match and match.group(1):
            name, version, label, metadata = match.groups()
            if metadata:
                return 200, orjson.dumps(self.store.metadata(name, version, label))
            if label:
                raise ServingError(400, "Model status by label is not supported")
            return 200, orjson.dumps(self.store.status(name, version))
        raise ServingError(400, f"Malformed request: {method} {path}")

    async def predict(self, servable: Servable, verb: str, body: bytes) -> bytes:
        doc = loads(body)
        signature_name, arrays, form = parse_predict_request(
            doc, lambda name: servable.signature(name).inputs
        )
        signature = servable.signature(signature_name)
        if verb != "predict":
            raise TensorJsonError(
                f"Expected {'classification' if verb == 'classify' else 'regression'} signature "
                f"method_name to be tensorflow/serving/{verb}. Was: {signature.method_name}"
            )
        check_shapes(arrays, signature.inputs)
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self.executor, servable.run, signature, arrays)
        return render_predict_response(outputs, form)


async def _poll(store: ModelStore, seconds: float, config_file: Path | None, config_seconds: float) -> None:
    """Look for new and removed versions every ``seconds``, and re-read the config file every
    ``config_seconds`` (0: never), as ``--model_config_file_poll_wait_seconds`` does."""
    loop = asyncio.get_running_loop()
    config_read = time.monotonic()
    while True:
        await asyncio.sleep(seconds)
        if config_file is not None and config_seconds > 0 and time.monotonic() - config_read >= config_seconds:
            config_read = time.monotonic()
            try:
                (config,) = read_model_config(config_file)
                store.policy, store.base_path = config.policy, config.base_path
            except (ConfigError, ValueError) as exc:
                log.error("keeping the previous model config: %s", exc)
        try:
            await loop.run_in_executor(None, store.refresh)
        except Exception:  # noqa: BLE001 - a broken new version must not stop serving the old one
            log.exception("could not load a new version of %s; still serving the previous one", store.name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.standin",
        description="Serve a SavedModel folder over TF Serving's REST API (a stand-in for "
                    "tensorflow_model_server where it cannot run). Flags follow tensorflow_model_server.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model_name", default="embedder", help="name in the URL: /v1/models/<model_name>")
    parser.add_argument("--model_base_path", type=Path, default=Path("build/models/embedder"),
                        help="folder holding numeric version folders, each a SavedModel")
    parser.add_argument("--port", type=int, default=8500, help="port of the gRPC API (0: any free port, logged)")
    parser.add_argument("--rest_api_port", type=int, default=8501, help="port of the REST API")
    parser.add_argument("--rest_api_host", default="127.0.0.1", help="address both APIs listen on")
    parser.add_argument("--rest_api_num_threads", type=int, default=4, help="threads running the model")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="how often to look for new and removed versions (0 to never look)")
    parser.add_argument("--model_config_file", type=Path,
                        help="a text-format ModelServerConfig naming the model, its base path and its version "
                             "policy (latest { num_versions: N }, all {}, specific { versions: V }); "
                             "--model_name and --model_base_path are then ignored, as in TF Serving")
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                        help="how often to re-read --model_config_file (0: read it once)")
    # What KServe's TF Serving runtime and this project's manifests pass to tensorflow_model_server besides: taken,
    # so the stand-in starts from the very command line a predictor pod gives TF Serving, and said at start.
    unserved = parser.add_argument_group("accepted as tensorflow_model_server takes them, not implemented here")
    unserved.add_argument("--rest_api_timeout_in_ms", type=int, help="TF Serving's REST request timeout")
    unserved.add_argument("--monitoring_config_file", type=Path, help="TF Serving's Prometheus endpoint")
    unserved.add_argument("--enable_batching", type=_boolean, help="TF Serving's server-side batching")
    unserved.add_argument("--batching_parameters_file", type=Path, help="its batching parameters")
    return parser.parse_args(argv)


UNSERVED_FLAGS = ("rest_api_timeout_in_ms", "monitoring_config_file", "enable_batching", "batching_parameters_file")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = [f"--{name}" for name in UNSERVED_FLAGS if getattr(args, name) is not None]
    if given:
        log.warning("accepted and not implemented by the stand-in (TF Serving itself would honour them): %s",
                    ", ".join(given))
    if args.model_config_file is not None:
        try:
            configs = read_model_config(args.model_config_file)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if len(configs) != 1:
            print(f"error: {args.model_config_file} configures {len(configs)} models; this server serves one",
                  file=sys.stderr)
            return 2
        store = ModelStore(configs[0].name, configs[0].base_path, configs[0].policy)
    else:
        store = ModelStore(args.model_name, args.model_base_path)
    if not _version_dirs(store.base_path):
        print(
            f"error: no version folder with a saved_model.pb under {store.base_path}; "
            "run `python -m model.train` first (it writes build/models/<name>/<version>/)",
            file=sys.stderr,
        )
        return 2
    store.refresh()
    app = TFServingApp(store, threads=args.rest_api_num_threads)
    # TensorFlow's many long-lived objects stay out of the collector's full passes (no pauses under load).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=args.rest_api_host, port=args.rest_api_port, log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)

    async def run() -> None:
        from model.standin.grpc_api import grpc_server

        try:
            grpc_api_server, grpc_port = grpc_server(app, args.rest_api_host, args.port)
        except (OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        await grpc_api_server.start()
        log.info("gRPC API at %s:%d (tensorflow.serving.PredictionService, ModelService)", args.rest_api_host,
                 grpc_port)
        poller = (asyncio.create_task(_poll(store, args.file_system_poll_wait_seconds, args.model_config_file,
                                            args.model_config_file_poll_wait_seconds))
                  if args.file_system_poll_wait_seconds > 0 else None)
        log.info("REST API at http://%s:%d/v1/models/%s (versions %s)", args.rest_api_host, args.rest_api_port,
                 store.name, ", ".join(map(str, sorted(store.loaded))))
        try:
            await server.serve()
        finally:
            if poller:
                poller.cancel()
            await grpc_api_server.stop(grace=1.0)

    asyncio.run(run())
    return 0

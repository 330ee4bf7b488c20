"""Start the transformer: ``python -m transformer --model_name embedder --predictor_host HOST:PORT``.

Takes every flag of KServe's ModelServer (KServe's controller injects ``--model_name``, ``--predictor_host``,
``--http_port`` and, from ``containerConcurrency``, ``--workers``) plus the ones below. None of KServe's is ignored:
each is honoured with KServe's meaning (the server's ports, threads, TLS and logging; the predictor's timeout,
retries and TLS, mapped onto this transformer's own client) or refused with what to use instead
(:data:`KSERVE_PREDICTOR_FLAGS`, :func:`resolve_kserve_flags`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from kserve import model_server

from transformer.serving.admission import Admission
from transformer.store.bundle import BundleError
from transformer.steps.kernels import UnsupportedEstimator
from transformer.predictor import APIS, REST_CLIENTS, PredictorError, RetryPolicy, connect, metadata_problems
from transformer.serving.rest import PREDICT_PATHS
from transformer.helpformat import HelpFormatter

DEFAULT_MODEL_BASE_PATH = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
TRUSTED_ENV = "EMBEDDER_TRUSTED_MANIFESTS"  # set on the container, outside the model store

# KServe's flags about calling the predictor, which KServe's own client would read: here the transformer's client
# (transformer/predictor/) does the calling, so each is mapped onto it, with the help text saying how.
KSERVE_PREDICTOR_FLAGS = {
    "protocol": "deprecated alias of --predictor_protocol",
    "predictor_protocol": "v1 (TF Serving's REST and gRPC APIs are its v1); TF Serving has no Open Inference Protocol, "
                          "so v2 and grpc-v2 are refused: choose the API with --predictor_api",
    "predictor_use_ssl": "call TF Serving over TLS (https for --predictor_api rest, a TLS channel for grpc)",
    "predictor_request_timeout_seconds": "the same as --predictor_timeout (either sets it)",
    "predictor_request_retries": "the same as --predictor_retries (either sets it)",
    "enable_predictor_health_check": "always on here: readiness asks TF Serving that the version is AVAILABLE and "
                                     "that its signature fits the bundle",
}

# KServe's --event-loop defaults to auto (uvloop). Here asyncio's own loop is the default: uvloop's libuv accepts one
# connection per turn of the loop, so on a busy transformer a burst of new connections waits in the listen queue
# (the Python HTTP floor on uvloop: of 1,000 wrk connections, 464 still waiting to be accepted after 1 s and 344
# after 4 s; p99 of all answers 6.4 s at 1,024, against 87 ms on asyncio's loop, which accepts every waiting
# connection at once). In three retry storms back to back the transformer answered with a p99 of 0.72-0.78 s on
# asyncio's loop against 1.5-1.7 s on uvloop, for a CPU per one-row request within noise of uvloop's
# (benchmarks/overload.md, benchmarks/results.md).
EVENT_LOOP_HELP = ("the event loop: asyncio (the default here: it accepts every waiting connection when a burst "
                   "arrives) or uvloop (KServe's default, auto; it accepts one connection per turn of the loop, so "
                   "under load new connections wait: benchmarks/overload.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transformer",
        parents=[model_server.parser],
        description="KServe transformer: quantile-scales raw user features, calls the TF Serving "
                    "embedding model, assigns a segment and returns the best items.",
        formatter_class=HelpFormatter,
    )
    # KServe's predictor flags: "not given" must be told from their defaults to map them onto ours.
    parser.set_defaults(protocol=None, predictor_protocol=None, predictor_request_timeout_seconds=None,
                        predictor_request_retries=None, event_loop="asyncio")
    for action in parser._actions:
        if action.dest in KSERVE_PREDICTOR_FLAGS:
            action.help = KSERVE_PREDICTOR_FLAGS[action.dest]
        elif action.dest == "event_loop":
            action.help = EVENT_LOOP_HELP
    ours = parser.add_argument_group("transformer")
    ours.add_argument("--model_base_path", default=DEFAULT_MODEL_BASE_PATH,
                      help="the model's version folders, the same that TF Serving serves: each holds a "
                           "SavedModel and, in assets.extra/transformer-bundle/, the fitted steps made with it")
    ours.add_argument("--model_versions", type=int, default=2,
                      help="how many of the newest version folders to load (keep it equal to TF Serving's "
                           "version policy, latest 2 in the manifests, so both sides can serve the previous one)")
    ours.add_argument("--model_poll_seconds", type=float, default=1.0,
                      help="how often to look for new version folders and at what TF Serving serves")
    ours.add_argument("--max_inflight", type=int, default=256,
                      help="requests admitted at once, at most; more get 503 with Retry-After at once. The limit "
                           "in force moves between --min_inflight and this, keeping the p90 time of admitted "
                           "requests inside the process within --latency_budget_ms (admission.py)")
    ours.add_argument("--early_retry_wait_ms", type=float, default=500.0,
                      help="how long a request waits before it is admitted or refused when the transformer is full "
                           "and its connection was refused before and told a Retry-After that is not over (0: "
                           "refused at once). Bounds the refusals to one per connection per wait, however fast "
                           "clients re-send")
    ours.add_argument("--max_waiting", type=int, default=4096,
                      help="requests waiting so at once, at most; more get 503 at once")
    ours.add_argument("--min_inflight", type=int, default=32,
                      help="the floor of the request limit: this many concurrent requests are never shed")
    ours.add_argument("--latency_budget_ms", type=float, default=50.0,
                      help="the p90 time inside the process that the request limit aims to keep")
    ours.add_argument("--max_inflight_rows", type=int, default=8192,
                      help="rows admitted at once; more get 503 (the default is about 100 ms of work at the "
                           "measured 68,600 rows/s)")
    ours.add_argument("--request_timeout", type=float, default=10.0,
                      help="seconds after which a request's queued work is dropped (504), when the client does "
                           "not send x-request-timeout-ms")
    ours.add_argument("--drift_window", type=int, default=2000,
                      help="recent rows the drift gauges (population stability index per feature) look at")
    ours.add_argument("--trusted_manifests", default=os.environ.get(TRUSTED_ENV, ""),
                      help="comma-separated sha256 digests of the bundle manifests that may be loaded (training "
                           f"prints each one); a bundle whose manifest is not among them is refused. Default: "
                           f"${TRUSTED_ENV}; empty: any manifest whose files verify")
    ours.add_argument("--predictor_api", choices=APIS, default="auto",
                      help="how to call TF Serving: grpc (its gRPC API on --predictor_grpc_port of the predictor "
                           "host, tensors as bytes), rest (its REST API at --predictor_host, JSON) or auto (REST for "
                           "batches of up to --predictor_rest_rows rows, gRPC above)")
    ours.add_argument("--predictor_rest_client", choices=sorted(REST_CLIENTS), default="loop",
                      help="the HTTP client of the REST API: loop (a keep-alive HTTP/1.1 client on the event loop, "
                           "httptools parsing the answers) or aiohttp")
    ours.add_argument("--predictor_rest_rows", type=int, default=64,
                      help="with --predictor_api auto, the largest batch sent over REST (larger ones go over gRPC)")
    ours.add_argument("--predictor_grpc_port", type=int, default=9000,
                      help="TF Serving's gRPC port (tensorflow_model_server --port; KServe's TF Serving runtime "
                           "uses 9000) on the host of --predictor_host")
    ours.add_argument("--predictor_timeout", type=float, default=5.0,
                      help="seconds to wait for TF Serving before answering 504 (KServe's own client would wait 600)")
    ours.add_argument("--predictor_retries", type=int, default=2,
                      help="extra tries when TF Serving cannot be reached or answers 503 (backoff waits of at most "
                           "2 s in all)")
    ours.add_argument("--max_rows", type=int, default=1024, help="rows accepted in one request (413 past it)")
    ours.add_argument("--max_body_bytes", type=int, default=8 * 1024 * 1024,
                      help="request body size accepted (413 past it, without reading the rest)")
    ours.add_argument("--predict_path", choices=PREDICT_PATHS, default="fast",
                      help="fast: predict requests answered by the transformer's own ASGI layer in front of KServe's "
                           "application; kserve: through FastAPI's routing and KServe's middleware (the same "
                           "answers, more CPU a request); everything else is KServe's either way")
    ours.add_argument("--graceful_shutdown_seconds", type=int, default=20,
                      help="on SIGTERM, how long in-flight requests may take to finish")
    ours.add_argument("--coalesce_inflight", type=int, default=2,
                      help="predictor calls in flight before concurrent requests are merged into one call "
                           "(0: never merge)")
    ours.add_argument("--coalesce_rows", type=int, default=256, help="rows in one merged predictor call, at most")
    ours.add_argument("--offload_rows", type=int, default=0,
                      help="run pre/post-processing of requests with more rows than this in a worker thread "
                           "(0: never; measured slower, see benchmarks/results.md)")
    ours.add_argument("--full_scores", action="store_true",
                      help="ask TF Serving for every item's score even when the model offers its best "
                           "candidates (a larger answer; the same results)")
    ours.add_argument("--kernels", choices=["numpy", "sklearn"], default="numpy",
                      help="numpy: the fitted steps as numpy kernels; sklearn: call scikit-learn per request "
                           "(the naive baseline, for benchmarks; it unpickles the estimators' joblib files)")
    ours.add_argument("--access_log", action="store_true",
                      help="log a line per request (off by default: failed requests are always logged, "
                           "with their request id)")
    ours.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="level of the transformer's own (JSON) log lines")
    return parser


def resolve_kserve_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """KServe's predictor flags, given KServe's meaning on this transformer's own flags, or refused."""
    protocol = args.predictor_protocol or args.protocol
    if protocol not in (None, "v1"):
        parser.error(f"--predictor_protocol {protocol}: TF Serving speaks no Open Inference Protocol (v2), only its "
                     "own v1 REST and gRPC APIs: leave --predictor_protocol out (or v1) and choose the API with "
                     "--predictor_api rest or grpc")
    for theirs, ours in (("predictor_request_timeout_seconds", "predictor_timeout"),
                         ("predictor_request_retries", "predictor_retries")):
        given, own = getattr(args, theirs), getattr(args, ours)
        if given is None:
            continue
        if own != parser.get_default(ours) and own != given:
            parser.error(f"--{theirs} {given} and --{ours} {own} disagree: they mean the same, give one")
        setattr(args, ours, type(own)(given))
    # KServe's view of the same settings (its PredictorConfig is built from these): the values in force.
    args.protocol = args.predictor_protocol = "v1"
    args.predictor_request_timeout_seconds = args.predictor_timeout
    args.predictor_request_retries = args.predictor_retries


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_kserve_flags(parser, args)
    if not args.predictor_host:
        parser.error("--predictor_host HOST[:PORT] is required (TF Serving's REST address; over gRPC, its host "
                     "with --predictor_grpc_port)")
    if args.workers != 1:
        parser.error("--workers must be 1: KServe's multi-process mode loses the predictor "
                     "configuration; scale with replicas instead")
    if args.predictor_rest_rows < 0:
        parser.error(f"--predictor_rest_rows must be 0 or more (0: every batch over gRPC), got {args.predictor_rest_rows}")
    if min(args.max_rows, args.max_body_bytes) < 1 or args.predictor_timeout <= 0 or args.predictor_retries < 0:
        parser.error("--max_rows, --max_body_bytes and --predictor_timeout must be positive, --predictor_retries >= 0")
    if min(args.model_versions, args.drift_window, args.max_inflight, args.min_inflight, args.max_inflight_rows) < 1 \
            or min(args.model_poll_seconds, args.request_timeout, args.latency_budget_ms) <= 0 \
            or min(args.early_retry_wait_ms, args.max_waiting) < 0:
        parser.error("--model_versions, --drift_window, --max_inflight, --min_inflight and --max_inflight_rows must "
                     "be at least 1; --model_poll_seconds, --request_timeout and --latency_budget_ms positive; "
                     "--early_retry_wait_ms and --max_waiting not negative")
    trusted = frozenset(d.strip().lower() for d in args.trusted_manifests.split(",") if d.strip())
    malformed = sorted(d for d in trusted if len(d) != 64 or any(c not in "0123456789abcdef" for c in d))
    if malformed:
        parser.error(f"--trusted_manifests (or ${TRUSTED_ENV}) takes sha256 digests (64 hex digits), got "
                     f"{', '.join(malformed)}")
    configure_logging(args.log_level)

    from transformer.model import EmbedderTransformer
    from transformer.serving.server import serve

    model = EmbedderTransformer(
        args.model_name,
        args.model_base_path,
        predictor_host=args.predictor_host,
        predictor_api=args.predictor_api,
        predictor_rest_client=args.predictor_rest_client,
        predictor_rest_rows=args.predictor_rest_rows,
        predictor_grpc_port=args.predictor_grpc_port,
        predictor_timeout=args.predictor_timeout,
        predictor_use_ssl=args.predictor_use_ssl,
        retry=RetryPolicy(attempts=args.predictor_retries + 1),
        max_rows=args.max_rows,
        kernels=args.kernels,
        coalesce_inflight=args.coalesce_inflight,
        coalesce_rows=args.coalesce_rows,
        full_scores=args.full_scores,
        offload_rows=args.offload_rows,
        keep_versions=args.model_versions,
        poll_seconds=args.model_poll_seconds,
        trusted_manifests=trusted,
        drift_window=args.drift_window,
        admission=Admission(args.max_inflight, args.max_inflight_rows, args.request_timeout,
                            min_requests=args.min_inflight, latency_budget=args.latency_budget_ms / 1000.0,
                            early_retry_wait=args.early_retry_wait_ms / 1000.0, max_waiting=args.max_waiting),
    )
    try:
        model.load()
    except (BundleError, UnsupportedEstimator) as exc:
        print(f"error: cannot load the artifact bundle: {exc}", file=sys.stderr)
        return 2
    contracts = {v: served.pipeline.contract for v, served in model.versions.loaded.items()}
    problems = asyncio.run(check_predictor(connect(args.predictor_api, args.predictor_host, args.model_name,
                                                   grpc_port=args.predictor_grpc_port, timeout=3.0,
                                                   rest_client=args.predictor_rest_client,
                                                   rest_rows=args.predictor_rest_rows,
                                                   use_ssl=args.predictor_use_ssl,
                                                   retry=RetryPolicy(attempts=1)), contracts))
    asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run closed its loop; KServe expects one
    if problems:
        # Said, not fatal: on a cluster the predictor behind the Service may be the one being replaced (the fused
        # overlay's, while the kind overlay's starts), and a transformer that exited there crash-looped through the
        # rollout. It stays un-Ready, with this reason, until a version fits, as it does for a misfit found later.
        print("warning: the predictor's model does not fit the bundle: " + "; ".join(problems)
              + ". Readiness stays false until it does. TF Serving and the transformer must read the same model base "
              "path (same storage URI).", file=sys.stderr, flush=True)
    serve(model, args)
    return 0


async def check_predictor(client, contracts: dict) -> list[str]:
    """Compare TF Serving's metadata with each loaded bundle whose version it serves, if it answers already.

    An unreachable predictor is not an error here: readiness stays false until it answers
    and a version fits (the same check runs there)."""
    try:
        states = await client.version_states()
        problems = []
        for version, contract in sorted(contracts.items()):
            if states.get(version) == "AVAILABLE":
                problems += [f"version {version}: {problem}"
                             for problem in metadata_problems(await client.metadata(version), contract)]
        return problems
    except PredictorError as exc:
        logging.getLogger("transformer").warning("predictor not checked at start-up (%s); "
                                                 "readiness stays false until it answers", exc)
        return []
    finally:
        await client.close()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("transformer")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())

"""The transformer's process: KServe's ModelServer with the transformer's REST endpoints installed
(``rest.py``), run until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging

from kserve import ModelServer, model_server
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.grpc.servicer import InferenceServicer

from transformer.serving.rest import install


class Servicer(InferenceServicer):
    """KServe's gRPC servicer, whose ModelMetadata answers the model's versions too (KServe's leaves them out)."""

    async def ModelMetadata(self, request, context):
        answer = await super().ModelMetadata(request, context)
        model = self._data_plane.model_registry.get_model(request.name)
        try:
            answer.versions.extend(model.metadata()["versions"])
        except (AttributeError, KeyError):  # another kind of model, or no version loaded yet
            pass
        return answer


def serve(model, args: argparse.Namespace) -> None:
    """Run the ModelServer with ``model`` until SIGTERM/SIGINT, then drain in-flight requests."""
    # KServe reads some of its flags from its own parse of the command line (logging, the gRPC server's message
    # limits): make that the one given here, so every KServe flag means what it says whoever calls serve().
    for name, value in vars(args).items():
        if hasattr(model_server.args, name):
            setattr(model_server.args, name, value)
    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        # On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish, this long at most.
        grace_period=args.graceful_shutdown_seconds,
    )
    if not args.enable_latency_logging:
        # KServe's timing middleware writes a trace line per request; it is off with latency logging.
        from kserve.logging import trace_logger

        trace_logger.setLevel(logging.WARNING)
    install(model_server.app, server.dataplane, model, args.model_name, args.max_body_bytes, args.predict_path)
    # gRPC messages are bounded like REST bodies (gRPC refuses larger ones with RESOURCE_EXHAUSTED), and by KServe's
    # own limit where that is lower.
    model_server.args.grpc_max_receive_message_length = min(args.max_body_bytes, args.grpc_max_receive_message_length)
    if not args.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    if args.event_loop in ("auto", "uvloop"):
        # ModelServer runs uvicorn inside asyncio.run(), which ignores uvicorn's loop setting.
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.set_event_loop(asyncio.new_event_loop())
        except ImportError:
            if args.event_loop == "uvloop":
                raise
    grpc_server.InferenceServicer = Servicer  # the class KServe's gRPC server instantiates
    # Everything loaded so far lives as long as the process: keep it out of the garbage collector's
    # full passes, which would otherwise scan it and stall the event loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    server.start([model])

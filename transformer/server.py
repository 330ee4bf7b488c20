"""Wiring of the transformer into KServe's ModelServer: error statuses and start-up.

KServe answers 500 for most failures. Here every failure the transformer
knows about carries its own status: 4xx for requests it cannot serve, 502,
503 or 504 when the predictor fails; the body is ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import logging

from fastapi.responses import ORJSONResponse
from kserve import ModelServer, model_server

from transformer.codec import RequestError
from transformer.predictor import PredictorError

log = logging.getLogger("transformer")


async def _request_error(_, exc: RequestError) -> ORJSONResponse:
    log.info("rejected request: %s", exc)
    return ORJSONResponse(status_code=exc.status, content={"error": str(exc)})


async def _predictor_error(_, exc: PredictorError) -> ORJSONResponse:
    log.warning("predictor call failed (%d): %s", exc.status, exc)
    return ORJSONResponse(status_code=exc.status, content={"error": str(exc)})


def install_error_handlers(app) -> None:
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(PredictorError, _predictor_error)


def serve(model, args: argparse.Namespace) -> None:
    """Run the ModelServer with ``model`` until SIGTERM/SIGINT."""
    install_error_handlers(model_server.app)
    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    server.start([model])

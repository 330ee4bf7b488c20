"""The transformer's clients for TF Serving, one interface (``base.PredictorClient``) over two transports:
gRPC (``grpc.py``, the default: tensors as bytes) and REST (``rest.py``, JSON). :func:`connect` makes the
one ``--predictor_api`` names; the rest of the transformer imports from here.
"""

from __future__ import annotations

from transformer.predictor.base import (  # noqa: F401  (the package's interface)
    APIS, Contract, PredictorClient, PredictorError, Retryable, RetryPolicy, VersionNotServed, grpc_address,
    metadata_problems,
)
from transformer.predictor.grpc import GrpcPredictorClient
from transformer.predictor.rest import Answer, LoopRestPredictorClient, RestPredictorClient  # noqa: F401

REST_CLIENTS = {"loop": LoopRestPredictorClient, "aiohttp": RestPredictorClient}  # --predictor_rest_client


def connect(api: str, host: str, model_name: str, *, grpc_port: int = 9000, rest_client: str = "loop",
            rest_rows: int = 64, **options) -> PredictorClient:
    """The client for ``--predictor_api``: REST at ``host`` (KServe's --predictor_host, port 80 when it
    names none) through ``rest_client`` (:data:`REST_CLIENTS`), gRPC at the same host on ``grpc_port``
    (TF Serving's --port), or auto: REST for batches of up to ``rest_rows`` rows and gRPC above
    (``routed.py``)."""
    if api == "rest":
        if rest_client not in REST_CLIENTS:
            raise ValueError(f"the REST client must be one of {', '.join(REST_CLIENTS)}, got {rest_client!r}")
        return REST_CLIENTS[rest_client](host, model_name, **options)
    if api == "grpc":
        return GrpcPredictorClient(grpc_address(host, grpc_port), model_name, **options)
    if api == "auto":
        from transformer.predictor.routed import RoutedPredictorClient

        return RoutedPredictorClient(connect("rest", host, model_name, rest_client=rest_client, **options),
                                     connect("grpc", host, model_name, grpc_port=grpc_port, **options), rest_rows)
    raise ValueError(f"predictor api must be one of {', '.join(APIS)}, got {api!r}")

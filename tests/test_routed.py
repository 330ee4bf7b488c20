"""--predictor_api auto (transformer/predictor/routed.py): each batch over the API that carries it cheaper,
readiness from both APIs."""

import asyncio

import numpy as np
import pytest

from transformer.predictor import PredictorClient, PredictorError, connect
from transformer.predictor.grpc import GrpcPredictorClient
from transformer.predictor.rest import LoopRestPredictorClient
from transformer.predictor.routed import RoutedPredictorClient


class Recorded(PredictorClient):
    def __init__(self, name, states=None, fail=None):
        super().__init__(f"{name}-host", "embedder")
        self.name, self.states, self.fail, self.calls, self.closed = name, states or {}, fail, [], False

    async def predict(self, features, contract):
        self.calls.append(features.shape[0])
        return {"by": self.name}

    async def version_states(self):
        if self.fail:
            raise PredictorError(503, self.fail, "predictor_unreachable")
        return self.states

    async def metadata(self, version=None):
        self.calls.append(("metadata", version))
        return {"from": self.name}

    async def close(self):
        self.closed = True


def test_small_batches_go_over_rest_and_larger_ones_over_grpc():
    rest, grpc = Recorded("rest"), Recorded("grpc")
    client = RoutedPredictorClient(rest, grpc, rest_rows=64)

    async def go():
        return [await client.predict(np.zeros((n, 3), np.float32), None) for n in (1, 64, 65, 1024)]

    assert [answer["by"] for answer in asyncio.run(go())] == ["rest", "rest", "grpc", "grpc"]
    assert (rest.calls, grpc.calls) == ([1, 64], [65, 1024])
    assert asyncio.run(client.metadata(3)) == {"from": "grpc"}
    asyncio.run(client.close())
    assert rest.closed and grpc.closed
    everything_grpc = RoutedPredictorClient(Recorded("rest"), Recorded("grpc"), rest_rows=0)
    assert everything_grpc.client_for(1) is everything_grpc.grpc


def test_a_version_is_available_only_when_both_apis_say_so():
    both = {1: "AVAILABLE", 2: "AVAILABLE", 3: "LOADING"}
    client = RoutedPredictorClient(Recorded("rest", {1: "AVAILABLE", 3: "LOADING"}), Recorded("grpc", both), 64)
    assert asyncio.run(client.version_states()) == {
        1: "AVAILABLE", 2: "AVAILABLE over gRPC, not known over REST", 3: "LOADING"}
    down = RoutedPredictorClient(Recorded("rest", fail="the REST port is closed"), Recorded("grpc", both), 64)
    with pytest.raises(PredictorError, match="the REST port is closed"):
        asyncio.run(down.version_states())


def test_auto_connects_both_apis_to_the_predictor_host():
    client = connect("auto", "tf:8501", "embedder", grpc_port=9001, rest_rows=16, timeout=2.0)
    assert isinstance(client, RoutedPredictorClient) and client.rest_rows == 16
    assert isinstance(client.rest, LoopRestPredictorClient) and client.rest.base_url == "http://tf:8501"
    assert isinstance(client.grpc, GrpcPredictorClient) and client.grpc.address == "tf:9001"
    assert client.rest.timeout == client.grpc.timeout == client.timeout == 2.0
    assert client.address == "tf:8501 (REST) and tf:9001 (gRPC)"
    assert connect("auto", "tf", "embedder", rest_client="aiohttp").rest.__class__.__name__ == "RestPredictorClient"

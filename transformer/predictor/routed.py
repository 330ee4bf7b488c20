"""Both of TF Serving's APIs, each for the batches it carries cheaper (``--predictor_api auto``).

One call's cost on the transformer's side is mostly fixed per call at a few rows and grows with the rows past
that: over REST through the loop's client (``http1.py``) the fixed part is the smallest (no thread hand-off, one
write, httptools' parser), while gRPC sends a tensor as raw bytes where REST writes and parses JSON. So a batch
of up to ``rest_rows`` rows goes over REST and a larger one over gRPC (the measurements are in
benchmarks/results.md). Both clients keep their own connections, retries, statuses and messages.

Readiness asks both APIs: a version counts as AVAILABLE only where both say so, so a port that does not answer
makes the transformer unready instead of failing the requests of one size.
"""

from __future__ import annotations

import asyncio

import numpy as np

from transformer.predictor.base import Contract, PredictorClient


class RoutedPredictorClient(PredictorClient):
    """REST for batches of up to ``rest_rows`` rows, gRPC above; metadata over gRPC; readiness from both."""

    def __init__(self, rest: PredictorClient, grpc: PredictorClient, rest_rows: int):
        super().__init__(f"{rest.address} (REST) and {grpc.address} (gRPC)", rest.model_name, timeout=rest.timeout,
                         retry=rest.retry)
        self.rest, self.grpc, self.rest_rows = rest, grpc, rest_rows

    def client_for(self, rows: int) -> PredictorClient:
        return self.rest if rows <= self.rest_rows else self.grpc

    async def predict(self, features: np.ndarray, contract: Contract) -> dict[str, np.ndarray]:
        return await self.client_for(features.shape[0]).predict(features, contract)

    async def version_states(self) -> dict[int, str]:
        over_rest, over_grpc = await asyncio.gather(self.rest.version_states(), self.grpc.version_states())
        return {version: state if over_rest.get(version) == state else f"{state} over gRPC, "
                f"{over_rest.get(version, 'not known')} over REST" for version, state in over_grpc.items()}

    async def metadata(self, version: int | None = None) -> dict:
        return await self.grpc.metadata(version)

    async def close(self) -> None:
        await asyncio.gather(self.rest.close(), self.grpc.close())

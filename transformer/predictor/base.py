"""What the transformer's clients for TF Serving share: the contract, the errors, the retry loop.

Two transports speak to TF Serving: its gRPC API (``grpc.py``, the default: tensors travel as
bytes) and its REST API (``rest.py``, JSON). Both build on this module, so a request fails the
same way over either.

One pooled connection set per process; bounded timeouts; retries with jittered
backoff only where a retry cannot do harm (the connection could not be made or
dropped before the answer, or TF Serving said it is unavailable); every failure
mapped to a status the client can act on:

    predictor unreachable / unavailable after retries  -> 503
    the pinned model version is not served             -> 503 (VersionNotServed: the transformer
                                                          looks again at what TF Serving serves)
    no answer within the timeout                       -> 504
    TF Serving rejected the input                      -> 400, with its message
    anything else                                      -> 502

Every predict call names the model version whose fitted steps scaled its input
(``/v1/models/<name>/versions/<v>:predict``, or ``model_spec.version`` over gRPC), so
TF Serving loading a newer version never changes what an answer means.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import numpy as np

log = logging.getLogger("transformer")

T = TypeVar("T")
APIS = ("grpc", "rest", "auto")  # how the transformer talks to TF Serving (--predictor_api); auto: routed.py


class PredictorError(Exception):
    """The predictor call failed; ``status`` is what the transformer answers, ``cause`` a metrics label."""

    def __init__(self, status: int, message: str, cause: str = "predictor_failed"):
        super().__init__(message)
        self.status = status
        self.cause = cause


class Retryable(Exception):
    """Raised by one try of a call when trying again may succeed; carries the error to answer if not."""

    def __init__(self, error: PredictorError):
        super().__init__(str(error))
        self.error = error


class VersionNotServed(PredictorError):
    """TF Serving does not (or no longer) serve the version a request is pinned to."""

    def __init__(self, version: int, message: str):
        super().__init__(503, message, "version_not_served")
        self.version = version


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # in all, the first try included
    base_delay: float = 0.05
    max_delay: float = 0.5
    budget: float = 2.0  # seconds spent waiting between tries, at most

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before try number ``attempt + 1``."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))


@dataclass(frozen=True)
class Contract:
    """What the transformer asks of TF Serving: a signature, its input, and its outputs.

    ``outputs`` maps each output name to (TF dtype name, width): every output is [batch, width].
    ``version`` pins the calls to one model version (None: whatever TF Serving serves newest).
    """

    signature: str
    input_name: str
    n_features: int
    outputs: dict
    version: int | None = None

    def numpy_dtype(self, output: str):
        return np.int64 if self.outputs[output][0] == "DT_INT64" else np.float32


class PredictorClient:
    """What the transformer asks of TF Serving, whatever the transport: predict on a pinned version,
    the state of each version, a version's signatures (in the REST API's JSON form)."""

    def __init__(self, address: str, model_name: str, *, timeout: float = 5.0, retry: RetryPolicy = RetryPolicy(),
                 on_retry: Callable[[str], None] | None = None):
        self.address = address
        self.model_name = model_name
        self.timeout = timeout
        self.retry = retry
        self._on_retry = on_retry or (lambda reason: None)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        """Run ``attempt`` until it returns, raises a PredictorError, or has raised Retryable for the
        last time allowed by the retry policy (tries and seconds spent waiting)."""
        waited = 0.0
        last: PredictorError | None = None
        for number in range(self.retry.attempts if retry else 1):
            if number:
                remaining = self.retry.budget - waited
                if remaining <= 0:
                    break
                self._on_retry(last.cause)
                pause = min(self.retry.delay(number - 1), remaining)
                await asyncio.sleep(pause)
                waited += pause
            try:
                return await attempt()
            except Retryable as exc:
                last = exc.error
        raise last

    @staticmethod
    def checked_shapes(arrays: dict[str, np.ndarray], rows: int, contract: Contract) -> dict[str, np.ndarray]:
        for name, (_, width) in contract.outputs.items():
            if arrays[name].shape != (rows, width):
                raise PredictorError(
                    502, f"the predictor's output {name!r} has shape {list(arrays[name].shape)}, expected "
                    f"{[rows, width]}: is it serving the model this bundle was trained with?", "predictor_bad_answer")
        return arrays

    async def predict(self, features: np.ndarray, contract: Contract) -> dict[str, np.ndarray]:
        """Predict on the contract's version: float32 features (n, F) -> {output: array (n, width)}."""
        raise NotImplementedError

    async def version_states(self) -> dict[int, str]:
        """{version: state} for every version TF Serving knows (``AVAILABLE`` when it serves it)."""
        raise NotImplementedError

    async def metadata(self, version: int | None = None) -> dict:
        """The model's metadata as TF Serving's REST API writes it (``metadata.signature_def...``)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


def split_address(address: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (host, port or None): an IPv6 literal as ``[::1]:port``, ``[::1]`` or bare ``::1``
    (bare, it has no port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, port
    return address, None


def grpc_address(host: str, grpc_port: int) -> str:
    """``host[:port]`` -> ``host:grpc_port``; IPv6 literals as ``[::1]:port``."""
    name, _ = split_address(host)
    return f"{f'[{name}]' if ':' in name else name}:{grpc_port}"


def _dims(tensor_info: dict) -> list[int] | None:
    shape = tensor_info.get("tensor_shape") or {}
    if shape.get("unknown_rank"):
        return None
    return [int(d.get("size", -1)) for d in shape.get("dim", [])]


def metadata_problems(metadata: dict, contract: Contract) -> list[str]:
    """What in TF Serving's model metadata does not fit the contract (empty when all fits)."""
    try:
        signatures = metadata["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        return ["the predictor's metadata has no signature_def map"]
    signature = signatures.get(contract.signature)
    if signature is None:
        return [f"the predictor's model has no signature '{contract.signature}' "
                f"(it has: {', '.join(sorted(signatures))})"]
    problems = []
    expected = {"inputs": {contract.input_name: ("DT_FLOAT", contract.n_features)}, "outputs": contract.outputs}
    for kind, tensors_expected in expected.items():
        tensors = signature.get(kind) or {}
        for name, (dtype, width) in tensors_expected.items():
            info = tensors.get(name)
            if info is None:
                problems.append(f"signature '{contract.signature}' has no {kind[:-1]} '{name}' "
                                f"(it has: {', '.join(sorted(tensors))})")
                continue
            got = _dims(info)
            if info.get("dtype") != dtype or (got is not None and got != [-1, width]):
                problems.append(f"{kind[:-1]} '{name}' is {info.get('dtype')} {got}, the bundle expects "
                                f"{dtype} {[-1, width]}")
    return problems

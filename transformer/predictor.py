"""The transformer's clients for TF Serving: what they share, and the REST one.

Two transports speak to TF Serving: its gRPC API (``predictor_grpc.py``, the default:
tensors travel as bytes) and its REST API (below, JSON). Both share this module's
contract, errors and retry loop, so a request fails the same way over either.

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
import json
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiohttp
import numpy as np
import orjson

log = logging.getLogger("transformer")

T = TypeVar("T")
APIS = ("grpc", "rest")  # how the transformer talks to TF Serving (--predictor_api)


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
class Answer:
    status: int
    content: bytes

    def json(self):
        return _loads(self.content)


def _error_text(answer: Answer) -> str:
    try:
        body = answer.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except ValueError:
        pass
    return answer.content[:500].decode(errors="replace") or f"HTTP {answer.status}"


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


def _loads(content: bytes):
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)  # TF Serving writes NaN / Infinity tokens


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


def connect(api: str, host: str, model_name: str, *, grpc_port: int = 9000, **options) -> PredictorClient:
    """The client for ``--predictor_api``: REST at ``host`` (KServe's --predictor_host, port 80 when it
    names none), or gRPC at the same host on ``grpc_port`` (TF Serving's --port)."""
    if api == "rest":
        return RestPredictorClient(host, model_name, **options)
    if api == "grpc":
        from transformer.predictor_grpc import GrpcPredictorClient

        return GrpcPredictorClient(grpc_address(host, grpc_port), model_name, **options)
    raise ValueError(f"predictor api must be one of {', '.join(APIS)}, got {api!r}")


def grpc_address(host: str, grpc_port: int) -> str:
    """``host[:port]`` -> ``host:grpc_port``; IPv6 literals as ``[::1]:port``."""
    if host.startswith("["):
        name = host[: host.index("]") + 1]
    elif host.count(":") == 1:
        name = host.split(":")[0]
    elif ":" in host:
        name = f"[{host}]"  # a bare IPv6 literal
    else:
        name = host
    return f"{name}:{grpc_port}"


class RestPredictorClient(PredictorClient):
    """Calls ``/v1/models/<name>:predict`` and the status/metadata endpoints.

    aiohttp (its HTTP parser is C) keeps a pool of keep-alive connections. Predict is a
    pure function of its input, so a call whose connection failed, or dropped before the
    answer, can be repeated safely; a timeout is not repeated (the predictor is busy).
    """

    def __init__(self, host: str, model_name: str, *, use_ssl: bool = False, max_connections: int = 64, **options):
        super().__init__(host, model_name, **options)
        self.base_url = f"{'https' if use_ssl else 'http'}://{host}"
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._status_url = f"{self.base_url}/v1/models/{model_name}"

    def _url(self, version: int | None, suffix: str) -> str:
        return self._status_url + (f"/versions/{version}" if version is not None else "") + suffix

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:  # made on first use, inside the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(self.timeout, 2.0)),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(self, method: str, url: str, content: bytes | None = None, retry: bool = True) -> Answer:
        """One request, retried on connection failures and 503 within the retry budget."""
        headers = {"Content-Type": "application/json"} if content is not None else None

        async def attempt() -> Answer:
            try:
                async with self._client().request(method, url, data=content, headers=headers) as response:
                    answer = Answer(response.status, await response.read())
            except aiohttp.ClientConnectorError as exc:
                raise Retryable(PredictorError(
                    503, f"the predictor at {self.base_url} is unreachable ({exc.os_error or exc})",
                    "predictor_unreachable")) from None
            except asyncio.TimeoutError:
                raise PredictorError(
                    504, f"the predictor at {self.base_url} did not answer within {self.timeout:g}s", "predictor_timeout"
                ) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
                raise Retryable(PredictorError(502, f"the connection to the predictor failed: {type(exc).__name__}",
                                               "predictor_connection_lost")) from None
            except aiohttp.ClientError as exc:
                raise PredictorError(502, f"the call to the predictor failed: {exc}", "predictor_failed") from None
            if answer.status == 503:
                raise Retryable(PredictorError(503, f"the predictor is unavailable: {_error_text(answer)}",
                                               "predictor_unavailable"))
            return answer

        return await self._retrying(attempt, retry)

    async def predict(self, features: np.ndarray, contract: Contract) -> dict[str, np.ndarray]:
        body = orjson.dumps(
            {"signature_name": contract.signature, "inputs": np.ascontiguousarray(features, np.float32)},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        answer = await self._send("POST", self._url(contract.version, ":predict"), body)
        if answer.status == 400:
            raise PredictorError(400, f"the predictor rejected the request: {_error_text(answer)}",
                                 "predictor_rejected")
        if answer.status == 404 and contract.version is not None:
            raise VersionNotServed(contract.version, f"TF Serving does not serve version {contract.version} of "
                                   f"model {self.model_name!r} ({_error_text(answer)})")
        if answer.status != 200:
            raise PredictorError(
                502, f"the predictor answered {answer.status}: {_error_text(answer)}", "predictor_failed"
            )
        try:
            outputs = answer.json()["outputs"]
            arrays = {name: np.asarray(outputs[name], dtype=contract.numpy_dtype(name)) for name in contract.outputs}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PredictorError(502, f"the predictor's answer is not a columnar predict response with "
                                 f"{', '.join(contract.outputs)} ({type(exc).__name__}: {exc})",
                                 "predictor_bad_answer") from None
        return self.checked_shapes(arrays, features.shape[0], contract)

    async def version_states(self) -> dict[int, str]:
        answer = await self._send("GET", self._status_url, retry=False)
        if answer.status == 404:
            return {}  # TF Serving has no version of this model (yet)
        if answer.status != 200:
            raise PredictorError(502, f"model status answered {answer.status}: {_error_text(answer)}")
        try:
            return {int(s["version"]): str(s.get("state", "UNKNOWN")) for s in answer.json()["model_version_status"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PredictorError(502, f"model status is not TF Serving's format ({exc})") from None

    async def metadata(self, version: int | None = None) -> dict:
        answer = await self._send("GET", self._url(version, "/metadata"))
        if answer.status != 200:
            raise PredictorError(502, f"model metadata answered {answer.status}: {_error_text(answer)}")
        return answer.json()


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

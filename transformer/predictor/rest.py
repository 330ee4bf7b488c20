"""The transformer's clients for TF Serving's REST API: ``/v1/models/<name>[/versions/<v>]:predict``,
model status and metadata, as JSON over a pool of keep-alive connections.

What is asked and how answers and failures are read is one class (:class:`RestPredictorClient`); how the bytes
travel is its ``_exchange``: aiohttp's client session there, or (:class:`LoopRestPredictorClient`) the small
HTTP/1.1 client on the event loop of ``http1.py``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass

import aiohttp
import numpy as np
import orjson

from transformer.predictor import http1
from transformer.predictor.base import (
    Contract, PredictorClient, PredictorError, Retryable, VersionNotServed, split_address,
)


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


def _loads(content: bytes):
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)  # TF Serving writes NaN / Infinity tokens


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

    def _unreachable(self, reason) -> Retryable:
        return Retryable(PredictorError(503, f"the predictor at {self.base_url} is unreachable ({reason})",
                                        "predictor_unreachable"))

    def _timed_out(self) -> PredictorError:
        return PredictorError(504, f"the predictor at {self.base_url} did not answer within {self.timeout:g}s",
                              "predictor_timeout")

    @staticmethod
    def _lost(kind: str) -> Retryable:
        return Retryable(PredictorError(502, f"the connection to the predictor failed: {kind}",
                                        "predictor_connection_lost"))

    async def _exchange(self, method: str, url: str, content: bytes | None) -> Answer:
        """One HTTP exchange; transport failures raised as the PredictorError (or Retryable) they mean."""
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            async with self._client().request(method, url, data=content, headers=headers) as response:
                return Answer(response.status, await response.read())
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc.os_error or exc) from None
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            raise self._lost(type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise PredictorError(502, f"the call to the predictor failed: {exc}", "predictor_failed") from None

    async def _send(self, method: str, url: str, content: bytes | None = None, retry: bool = True) -> Answer:
        """One request, retried on connection failures and 503 within the retry budget."""

        async def attempt() -> Answer:
            answer = await self._exchange(method, url, content)
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


def host_and_port(address: str, use_ssl: bool) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` for IPv6 literals) -> (host, port); 80, or 443 with TLS, when none."""
    host, port = split_address(address)
    return host, int(port) if port and port.isdigit() else (443 if use_ssl else 80)


class LoopRestPredictorClient(RestPredictorClient):
    """The same client over ``http1.py``: one asyncio protocol per keep-alive connection, the answer parsed by
    httptools as it arrives, the request written in one piece. Everything but the exchange (the URLs, retries,
    statuses and messages) is :class:`RestPredictorClient`'s."""

    def __init__(self, host: str, model_name: str, *, use_ssl: bool = False, max_connections: int = 64, **options):
        super().__init__(host, model_name, use_ssl=use_ssl, max_connections=max_connections, **options)
        self._host, self._port = host_and_port(host, use_ssl)
        self._use_ssl = use_ssl
        self._pool: http1.ConnectionPool | None = None
        self._heads: dict[tuple[str, str], bytes] = {}  # (method, url) -> the request head up to its length

    def _connections(self) -> http1.ConnectionPool:
        if self._pool is None:  # made on first use, inside the running loop
            self._pool = http1.ConnectionPool(self._host, self._port,
                                              ssl=ssl.create_default_context() if self._use_ssl else None,
                                              limit=self.max_connections, connect_timeout=min(self.timeout, 2.0))
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def _request(self, method: str, url: str, content: bytes | None) -> bytes:
        head = self._heads.get((method, url))
        if head is None:
            lines = [f"{method} {url[len(self.base_url):]} HTTP/1.1", f"Host: {self.address}"]
            if content is not None:
                lines += ["Content-Type: application/json", "Content-Length: "]
            head = self._heads[(method, url)] = "\r\n".join(lines).encode("latin-1")
        if content is None:
            return head + b"\r\n\r\n"
        return b"".join((head, str(len(content)).encode(), b"\r\n\r\n", content))

    async def _exchange(self, method: str, url: str, content: bytes | None) -> Answer:
        request = self._request(method, url, content)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._connections().request(request)
        except TimeoutError:
            raise self._timed_out() from None
        except (http1.ServerDisconnectedError, http1.ClientPayloadError) as exc:
            raise self._lost(type(exc).__name__) from None
        except http1.HttpClientError as exc:
            raise PredictorError(502, f"the call to the predictor failed: {exc}", "predictor_failed") from None
        except OSError as exc:  # the connection could not be made
            raise self._unreachable(exc) from None
        return Answer(response.status, response.body)

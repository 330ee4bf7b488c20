"""A small HTTP/1.1 client on the event loop itself, for the one server the transformer calls.

Each connection is an ``asyncio.Protocol`` whose bytes go straight into httptools' response parser (the C
parser uvicorn uses for requests): a call writes one pre-built request and awaits one future, with no stream
objects, no thread and no per-call session machinery. Connections are kept alive and reused, newest first,
up to a limit; one the server closed while idle is dropped when it closes, and one it closes under a request
fails that request with :class:`ServerDisconnectedError` (before any answer) or :class:`ClientPayloadError`
(mid-answer), which the REST client retries as it does for aiohttp (the names are aiohttp's for the same
conditions, so the transformer's messages do not depend on the client).

Only what TF Serving's REST API needs: a status, a body with Content-Length or chunked, keep-alive. No
redirects, cookies, proxies or compression.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from dataclasses import dataclass

import httptools


class HttpClientError(Exception):
    """A call that produced no usable answer."""


class ServerDisconnectedError(HttpClientError):
    """The server closed the connection before any byte of the answer."""


class ClientPayloadError(HttpClientError):
    """The server closed the connection in the middle of the answer."""


class NotHttpError(HttpClientError):
    """The server answered with something that is not HTTP/1.1."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer read by httptools."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future | None = None
        self._chunks: list[bytes] = []
        self._started = False  # any byte of the current answer received
        self._complete = False  # the answer is whole and the server lets the connection be kept

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - TF Serving never upgrades
            self._fail(NotHttpError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(NotHttpError(f"the answer is not HTTP ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._started:
                self._answer.set_exception(ClientPayloadError("the connection closed in the middle of the answer"))
            else:
                self._answer.set_exception(ServerDisconnectedError("the connection closed before any answer"))

    # -- httptools callbacks --------------------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        # Read now: once this callback returns, the parser starts over and says False.
        self._complete = self._parser.should_keep_alive()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(Response(self._parser.get_status_code(), b"".join(self._chunks)))

    # -- calls ----------------------------------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self.close()

    def reusable(self) -> bool:
        return not self.closed and self._complete

    async def call(self, request: bytes) -> Response:
        self._answer = asyncio.get_running_loop().create_future()
        self._chunks, self._started, self._complete = [], False, False
        self.transport.write(request)
        try:
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Keep-alive connections to one ``host:port``, at most ``limit`` of them at once (callers beyond it wait)."""

    def __init__(self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None, limit: int = 64,
                 connect_timeout: float = 2.0):
        self.host, self.port, self.ssl = host, port, ssl
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self.limit = limit
        self.opened = 0  # connections made, in all (tests count what reuse saves)
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Idle connections still open (those in use are not counted)."""
        return sum(not c.closed for c in self._idle)

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl,
                                   server_hostname=self.host if self.ssl else None),
            self.connect_timeout)
        self.opened += 1
        return connection

    async def request(self, request: bytes) -> Response:
        """Send a complete request (head and body) and read its answer. A connection is put back only after a
        complete answer the server lets it keep; on any failure or cancellation it is closed."""
        if self._closed:
            raise HttpClientError("the connection pool is closed")
        async with self._slots:
            connection = await self._connection()
            try:
                response = await connection.call(request)
            except BaseException:
                connection.close()
                raise
            if connection.reusable() and not self._closed:
                self._idle.append(connection)
            else:
                connection.close()
            return response

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        await asyncio.sleep(0)  # let the transports finish closing

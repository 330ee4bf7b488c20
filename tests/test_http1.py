"""The REST hop's client on the event loop (transformer/predictor/http1.py, ``LoopRestPredictorClient``).

First, every behaviour test of the aiohttp REST client, imported unchanged from tests/test_predictor_clients.py
and run here with the loop client in its place: the same answers, statuses, messages, causes and tries. Then
what only a client of its own can get wrong: a half-written answer, a reset in the middle of one, an answer that
is not HTTP, keep-alive connections the server closes (idle, or with ``Connection: close``), reuse, TLS, and
no connection leaked after 10,000 calls with failures mixed in."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess

import numpy as np
import psutil
import pytest
import test_predictor_clients as scripted
from test_predictor_clients import (  # noqa: F401  (collected here too, with the loop client)
    CONTRACT, FAST, FEATURES, GOOD, run, test_a_connection_dropped_before_the_answer_is_tried_again_then_502,
    test_error_bodies_are_shown_cut_and_readable, test_rest_503_is_retried_within_the_policy_then_answered,
    test_rest_failures_map_to_statuses_without_retrying, test_rest_model_status_and_metadata,
    test_rest_predict_pins_the_version_and_reads_the_columnar_answer, test_rest_reads_nan_tokens_as_tf_serving_writes_them,
    test_rest_retries_stop_at_the_budget, test_rest_sends_float32_json_with_its_content_type_and_no_user_agent,
    test_rest_timeout_is_504_and_never_retried,
)

from transformer.predictor import LoopRestPredictorClient, PredictorError, connect
from transformer.predictor.rest import host_and_port


@pytest.fixture(autouse=True)
def loop_client(monkeypatch):
    """The imported tests build ``RestPredictorClient``: here they get the loop client."""
    monkeypatch.setattr(scripted, "RestPredictorClient", LoopRestPredictorClient)


def answer_bytes(status=200, body=b'{"outputs": {"ids": [[1, 2], [3, 4]], "scores": [[0.5, 0.25], [0.75, 0.125]]}}',
                 extra=b"") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


class RawServer:
    """A TF Serving double that writes raw bytes: ``behaviours`` in turn per request (the last repeats), each a
    callable (reader, writer) -> awaitable. Counts the connections it accepted and those still open."""

    def __init__(self, *behaviours, tls: ssl.SSLContext | None = None):
        self.behaviours = list(behaviours)
        self.tls = tls
        self.accepted = 0
        self.open = 0
        self.requests = 0

    async def _serve(self, reader, writer):
        self.accepted += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                behaviour = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
                self.requests += 1
                if await behaviour(reader, writer) == "closed":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def good(extra=b""):
    async def behaviour(reader, writer):
        writer.write(answer_bytes(extra=extra))
        await writer.drain()
        if b"close" in extra:
            writer.close()
            return "closed"
    return behaviour


async def half_written(reader, writer):
    writer.write(answer_bytes()[:-20])  # the head and part of the body, then the connection closes
    await writer.drain()
    writer.close()
    return "closed"


async def reset_mid_answer(reader, writer):
    writer.write(answer_bytes()[:60])
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    writer.transport.abort()
    return "closed"


async def not_http(reader, writer):
    writer.write(b"SMTP ready\r\n\r\n")
    await writer.drain()
    writer.close()
    return "closed"


async def slow(reader, writer):
    await asyncio.sleep(1.0)
    writer.write(answer_bytes())
    await writer.drain()


async def unavailable(reader, writer):
    writer.write(answer_bytes(503, b'{"error": "busy"}'))
    await writer.drain()


async def drop(reader, writer):
    writer.close()
    return "closed"


async def with_client(server: RawServer, work, **options):
    async with server:
        retries = []
        client = LoopRestPredictorClient(f"127.0.0.1:{server.port}", "embedder", retry=FAST,
                                         on_retry=retries.append, **options)
        try:
            return await work(client), retries, server
        except PredictorError as exc:
            return exc, retries, server
        finally:
            await client.close()


def predict(client):
    return client.predict(FEATURES, CONTRACT)


def test_a_half_written_answer_is_tried_again_then_502():
    result, retries, server = run(with_client(RawServer(half_written, good()), predict))
    assert result["ids"].tolist() == [[1, 2], [3, 4]] and retries == ["predictor_connection_lost"]
    error, retries, server = run(with_client(RawServer(half_written), predict))
    assert (error.status, error.cause, str(error)) == (
        502, "predictor_connection_lost", "the connection to the predictor failed: ClientPayloadError")
    assert server.requests == 3 and retries == ["predictor_connection_lost"] * 2


def test_a_reset_in_the_middle_of_the_answer_is_a_lost_connection():
    error, retries, server = run(with_client(RawServer(reset_mid_answer), predict))
    assert (error.status, error.cause) == (502, "predictor_connection_lost") and server.requests == 3


def test_an_answer_that_is_not_http_is_a_502_not_retried():
    error, retries, server = run(with_client(RawServer(not_http), lambda client: client.metadata()))
    assert (error.status, error.cause, retries, server.requests) == (502, "predictor_failed", [], 1)
    assert str(error).startswith("the call to the predictor failed: the answer is not HTTP (")


def test_a_slow_answer_past_the_timeout_is_504_and_its_connection_is_not_reused():
    async def work(client):
        with pytest.raises(PredictorError) as caught:
            await predict(client)
        return caught.value, client._connections().open_connections

    (error, idle), retries, server = run(with_client(RawServer(slow), work, timeout=0.2))
    assert (error.status, error.cause, str(error), retries) == (
        504, "predictor_timeout", f"the predictor at http://127.0.0.1:{server.port} did not answer within 0.2s", [])
    assert idle == 0  # a connection with an answer still due is closed, never handed to the next call


def test_connections_are_kept_alive_and_reused():
    async def work(client):
        for _ in range(50):
            await predict(client)
        return client._connections().opened

    opened, retries, server = run(with_client(RawServer(good()), work))
    assert opened == server.accepted == 1 and server.requests == 50 and retries == []


def test_keep_alive_closed_by_the_server_costs_no_retry():
    async def work(client):
        first = await predict(client)
        await asyncio.sleep(0.05)  # the server closed the connection after answering: seen before the next call
        second = await predict(client)
        return first, second

    (first, second), retries, server = run(with_client(RawServer(good(b"Connection: close\r\n")), work))
    assert first["ids"].tolist() == second["ids"].tolist() == [[1, 2], [3, 4]]
    assert retries == [] and server.accepted == 2

    async def idle_closed(reader, writer):  # answers, then closes the idle connection (a keep-alive timeout)
        writer.write(answer_bytes())
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()
        return "closed"

    (first, second), retries, server = run(with_client(RawServer(idle_closed), work))
    assert retries == [] and server.accepted == 2


def test_answers_in_chunks_are_read_whole():
    body = b'{"outputs": {"ids": [[1, 2], [3, 4]], "scores": [[0.5, 0.25], [0.75, 0.125]]}}'

    async def chunked(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (body[:10], body[10:]):
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    result, retries, _ = run(with_client(RawServer(chunked), predict))
    assert result["scores"].tolist() == [[0.5, 0.25], [0.75, 0.125]]


def test_no_connection_leaks_after_ten_thousand_calls_with_failures_mixed_in():
    """The server's behaviours cycle: answers, 503s, connections dropped before the answer and in its middle,
    answers that close the connection. Afterwards the client holds at most its idle connections, the server
    sees no more open than that, and the process has the file descriptors it had."""
    cycle = [good(), good(), unavailable, good(), drop, good(), half_written, good(b"Connection: close\r\n"), good()]

    async def work(client):
        outcomes = {}
        for number in range(10_000):
            try:
                await predict(client)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except PredictorError as exc:
                outcomes[exc.cause] = outcomes.get(exc.cause, 0) + 1
            if number % 100 == 0:
                await asyncio.sleep(0)
        return outcomes, client._connections()

    process = psutil.Process()
    before = process.num_fds()

    async def go():
        server = RawServer(*(cycle * 1200))
        async with server:
            client = LoopRestPredictorClient(f"127.0.0.1:{server.port}", "embedder", retry=FAST, max_connections=4)
            try:
                outcomes, pool = await work(client)
                idle, opened, server_open = pool.open_connections, pool.opened, server.open
            finally:
                await client.close()
            await asyncio.sleep(0.05)
            return outcomes, idle, opened, server_open, server.open

    outcomes, idle, opened, server_open_during, server_open_after = run(go())
    assert outcomes["ok"] >= 9_000 and sum(outcomes.values()) == 10_000
    assert idle <= 1 and server_open_during <= 1  # one call at a time: one connection at most
    assert server_open_after == 0 and opened > 1000  # every failure cost its connection, and only that
    assert process.num_fds() <= before + 2


def test_tls_toward_tf_serving(tmp_path, monkeypatch):
    """--predictor_use_ssl with the loop client: the server's certificate is checked against the trust store the
    environment names (SSL_CERT_FILE), and the calls go over TLS."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def go():
        async with RawServer(good(), tls=server_tls) as server:
            client = connect("rest", f"localhost:{server.port}", "embedder", use_ssl=True, retry=FAST)
            try:
                return await predict(client), client.base_url
            finally:
                await client.close()

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    result, base_url = run(go())
    monkeypatch.delenv("SSL_CERT_FILE")
    assert result["ids"].tolist() == [[1, 2], [3, 4]] and base_url.startswith("https://localhost:")

    async def untrusted():  # without the certificate in the trust store: refused, not retried as unreachable
        async with RawServer(good(), tls=server_tls) as server:
            client = connect("rest", f"localhost:{server.port}", "embedder", use_ssl=True, retry=FAST)
            try:
                with pytest.raises(PredictorError) as caught:
                    await predict(client)
                return caught.value
            finally:
                await client.close()

    error = run(untrusted())
    assert error.status == 503 and "CERTIFICATE_VERIFY_FAILED" in str(error)


@pytest.mark.parametrize("address, use_ssl, expected", [
    ("tf:8501", False, ("tf", 8501)), ("tf", False, ("tf", 80)), ("tf", True, ("tf", 443)),
    ("[::1]:8501", False, ("::1", 8501)), ("[::1]", True, ("::1", 443)), ("::1", False, ("::1", 80)),
    ("10.0.0.5:9", False, ("10.0.0.5", 9)),
])
def test_the_host_and_port_of_the_predictor_host(address, use_ssl, expected):
    assert host_and_port(address, use_ssl) == expected


def test_the_rest_client_is_chosen_by_name():
    from transformer.predictor import RestPredictorClient

    assert type(connect("rest", "tf:8501", "embedder")) is LoopRestPredictorClient
    assert type(connect("rest", "tf:8501", "embedder", rest_client="aiohttp")) is RestPredictorClient
    with pytest.raises(ValueError, match="the REST client must be one of loop, aiohttp, got 'curl'"):
        connect("rest", "tf:8501", "embedder", rest_client="curl")
    assert np.float32(1.0)  # numpy is imported for the scripted tests' answers

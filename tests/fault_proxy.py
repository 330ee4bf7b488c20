"""A controllable HTTP proxy in front of the real predictor, for fault tests.

Modes: forward (default), status (answer with a code and a TF Serving error body),
delay (wait, then forward), drop (close the connection without answering). A mode
applies to predict calls (POST); the model status and metadata reads (GET), which
the transformer makes every second, are always forwarded. stop() and start()
close and reopen the listening socket on the same port, so the transformer sees
connection refused in between.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from scripts.localstack import free_port


class FaultProxy:
    def __init__(self, upstream: str, port: int | None = None):
        self.upstream = upstream
        self.port = port or free_port()
        self.mode: tuple = ("forward",)
        self.requests = 0  # predict calls (POST) received
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._client = httpx.Client(base_url=upstream, timeout=30.0)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                proxy._connections.add(self.connection)

            def finish(self):
                proxy._connections.discard(self.connection)
                super().finish()

            def _handle(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                mode = ("forward",)
                if self.command == "POST":
                    proxy.requests += 1
                    mode = proxy.mode
                if mode[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode[0] == "status":
                    self._reply(mode[1], mode[2].encode())
                    return
                if mode[0] == "delay":
                    time.sleep(mode[1])
                upstream = proxy._client.request(self.command, self.path, content=body or None,
                                                 headers={"content-type": "application/json"})
                self._reply(upstream.status_code, upstream.content)

            def _reply(self, status: int, payload: bytes):
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection: the next call is refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        self._client.close()


"""The two ways between the machine's loopback, where the control plane listens, and the node's network namespace.

    python -m tests.node.bridge --netns NAME --api 127.0.0.1:PORT --listen 127.0.0.1:6443 --egress PATH

* **Node to API server.** The kubelet, kube-proxy and CoreDNS run inside the node's namespace, where the machine's
  loopback is not: ``--listen`` (in the node's namespace) is relayed to ``--api`` (on the machine's loopback).
* **API server to node.** ``kubectl logs``, ``exec`` and ``port-forward`` (what ``scripts/smoke.sh`` uses) make the
  API server dial the kubelet at the node's address, which only the node's namespace routes. The API server's own
  egress selector (``--egress-selector-config-file``, its ``cluster`` egress over ``HTTPConnect`` on a Unix
  socket: how Konnectivity is plugged in) sends those connections to ``--egress``, a Unix socket served here: each
  ``CONNECT host:port`` is dialled from inside the node's namespace, except loopback targets (the control plane's
  own webhooks), dialled on the machine's loopback.

So no address but loopback is ever added to the machine's own namespace. A socket belongs to the namespace its
creator was in when it was made: this one process switches its thread into the right namespace (``setns``) for
each socket it makes and back, then pipes the bytes on one asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


class Namespaces:
    """The machine's network namespace (this process's at start) and the node's (``/run/netns/NAME``)."""

    def __init__(self, netns: str):
        self.host = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.node = os.open(f"/run/netns/{netns}", os.O_RDONLY)

    @contextlib.contextmanager
    def inside(self, fd: int):
        _setns(fd)
        try:
            yield
        finally:
            _setns(self.host)

    def tcp(self, fd: int) -> socket.socket:
        with self.inside(fd):
            made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made.setblocking(False)
        return made


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def join(a: tuple, b: tuple) -> None:
    await asyncio.gather(pipe(a[0], b[1]), pipe(b[0], a[1]))


async def dial(namespaces: Namespaces, fd: int, address: tuple[str, int]):
    made = namespaces.tcp(fd)
    try:
        await asyncio.get_running_loop().sock_connect(made, address)
    except BaseException:
        made.close()
        raise
    return await asyncio.open_connection(sock=made)


async def serve(netns: str, api: str, listen: str, egress: str) -> None:
    namespaces = Namespaces(netns)
    api_address = split(api)

    async def to_api(reader, writer):
        try:
            upstream = await dial(namespaces, namespaces.host, api_address)
        except OSError:
            writer.close()
            return
        await join((reader, writer), upstream)

    async def connect(reader, writer):
        """One HTTP CONNECT from the API server's egress selector."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            host, port = split(target)
            if method != "CONNECT":
                raise ValueError(method)
            where = namespaces.host if host.startswith("127.") or host == "localhost" else namespaces.node
            upstream = await dial(namespaces, where, (host, port))
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            with contextlib.suppress(Exception):
                writer.write(f"HTTP/1.1 502 Bad Gateway\r\n\r\n{exc}".encode())
                writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await join((reader, writer), upstream)

    listener = namespaces.tcp(namespaces.node)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(split(listen))
    api_server = await asyncio.start_server(to_api, sock=listener)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(egress)
    egress_server = await asyncio.start_unix_server(connect, path=egress)
    print(f"bridge: {listen} in {netns} -> {api}; CONNECT on {egress}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with api_server, egress_server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.node.bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", required=True, help="the node's network namespace (ip netns add NAME)")
    parser.add_argument("--api", required=True, help="the API server on the machine's loopback, HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:6443", help="where the node reaches it, in its namespace")
    parser.add_argument("--egress", required=True, help="the Unix socket the API server's egress selector dials")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.netns, args.api, args.listen, args.egress))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop HTTP load: ``wrk`` when installed (C, not the bottleneck), else a Python fallback.

Both send the same POST body over ``concurrency`` keep-alive connections for a
fixed time and report latency percentiles, throughput, errors and the load
generator's own CPU use (so a report can show the client was not the limit).
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.9]

_LUA = """
local f = io.open("%(body)s", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local parts = {}
  for _, p in ipairs({%(percentiles)s}) do
    table.insert(parts, string.format('"%%s": %%d', tostring(p), latency:percentile(p)))
  end
  io.write(string.format(
    'WRKJSON{"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "socket_errors": %%d, "percentiles_us": {%%s}}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ", ")))
end
"""


# The same, counting the answers by status in each thread (for overload runs: how many were 200, 503, 504).
_LUA_STATUSES = _LUA.replace("done = function", """local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) s200, s503, s504, sother = 0, 0, 0, 0 end
response = function(status, headers, body)
  if status == 200 then s200 = s200 + 1 elseif status == 503 then s503 = s503 + 1
  elseif status == 504 then s504 = s504 + 1 else sother = sother + 1 end
end
done = function""", 1).replace("table.concat(parts, \", \")))", """table.concat(parts, ", ")))
  local c = {0, 0, 0, 0}
  for _, t in ipairs(threads) do
    c[1] = c[1] + t:get("s200"); c[2] = c[2] + t:get("s503"); c[3] = c[3] + t:get("s504"); c[4] = c[4] + t:get("sother")
  end
  io.write(string.format('WRKSTATUSES{"200": %%d, "503": %%d, "504": %%d, "other": %%d}\\n', c[1], c[2], c[3], c[4]))""")


@dataclass
class LoadResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    percentiles_ms: dict[str, float]
    client_cpu_seconds: float
    generator: str
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def client_cpu_share(self) -> float:
        """Share of one core the load generator used."""
        return self.client_cpu_seconds / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        return self.percentiles_ms[str(q)]

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput": self.throughput, "client_cpu_share": self.client_cpu_share}


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, body: bytes, concurrency: int, seconds: float, statuses: bool = False) -> LoadResult:
    """wrk's run; with ``statuses`` its answers are also counted by status (``extra["statuses"]``)."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text((_LUA_STATUSES if statuses else _LUA) % {
            "body": body_path, "percentiles": ", ".join(map(str, PERCENTILES))})
        before = _children_cpu()
        completed = subprocess.run(
            ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
             "--timeout", "10s", "-s", str(script), url],  # wrk takes whole seconds
            capture_output=True, text=True, timeout=seconds + 60,
        )
        cpu = _children_cpu() - before
    line = next((l for l in completed.stdout.splitlines() if l.startswith("WRKJSON")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {completed.stdout[-500:]} {completed.stderr[-500:]}")
    data = json.loads(line[len("WRKJSON"):])
    load = LoadResult(
        requests=data["requests"], seconds=data["duration_us"] / 1e6, non_2xx=data["non_2xx"],
        socket_errors=data["socket_errors"],
        percentiles_ms={k: v / 1000.0 for k, v in data["percentiles_us"].items()},
        client_cpu_seconds=cpu, generator="wrk",
    )
    counted = next((l for l in completed.stdout.splitlines() if l.startswith("WRKSTATUSES")), None)
    if counted is not None:
        load.extra["statuses"] = json.loads(counted[len("WRKSTATUSES"):])
    return load


async def _python_load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], int, int]:
    import httpx

    latencies: list[float] = []
    non_2xx = errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        async def worker():
            nonlocal non_2xx, errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers={"content-type": "application/json"})
                    if response.status_code // 100 != 2:
                        non_2xx += 1
                except Exception:  # noqa: BLE001 - counted, the load goes on
                    errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, non_2xx, errors


async def _grpc_load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], int, int]:
    """Unary gRPC calls of an already serialized request, ``concurrency`` at a time on one channel
    (``url``: ``grpc://host:port/package.Service/Method``); a non-OK status counts as a non-2xx."""
    import grpc

    target, method = url.removeprefix("grpc://").split("/", 1)
    latencies: list[float] = []
    non_ok = errors = 0
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{method}")  # bytes in, bytes out: no (de)serialising in the client

        async def worker():
            nonlocal non_ok, errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await call(body, timeout=10.0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
                        errors += 1
                    else:
                        non_ok += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, non_ok, errors


def run_python(url: str, body: bytes, concurrency: int, seconds: float) -> LoadResult:
    """httpx for http:// URLs, a gRPC channel for grpc:// ones."""
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    load = _grpc_load if url.startswith("grpc://") else _python_load
    latencies, non_2xx, errors = asyncio.run(load(url, body, concurrency, seconds))
    wall = time.perf_counter() - wall_before
    values = np.percentile(np.array(latencies) * 1000.0, PERCENTILES) if latencies else [float("nan")] * len(PERCENTILES)
    return LoadResult(
        requests=len(latencies), seconds=wall, non_2xx=non_2xx, socket_errors=errors,
        percentiles_ms={str(p): float(v) for p, v in zip(PERCENTILES, values)},
        client_cpu_seconds=time.process_time() - cpu_before,
        generator="python-grpc" if url.startswith("grpc://") else "python",
    )


def run_load(url: str, body: bytes, concurrency: int, seconds: float) -> LoadResult:
    """wrk for HTTP when installed, else Python; gRPC (``grpc://``) always from Python."""
    if have_wrk() and not url.startswith("grpc://"):
        return run_wrk(url, body, concurrency, seconds)
    return run_python(url, body, concurrency, seconds)


async def _recorded_load(host: str, port: int, path: str, body: bytes, concurrency: int,
                         seconds: float, honour_retry_after: bool, max_requests: int | None = None,
                         timeout: float = 30.0) -> tuple[list[int], list[float], list[float], list[float], int]:
    """A lean HTTP/1.1 keep-alive client on asyncio streams: (status, latency, Retry-After, time sent) of every
    request.

    httpx costs too much client CPU per request for a thousand connections on a small machine.
    With ``honour_retry_after`` a connection told 503 + Retry-After waits that long before its
    next request, as a well-behaved client does; without it, it sends the next one at once.
    ``max_requests`` stops the load after that many requests in all; a request without an answer
    within ``timeout`` counts as a transport error (status 0 is never recorded).
    """
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    statuses: list[int] = []
    latencies: list[float] = []
    waits: list[float] = []  # the Retry-After of each answer (0: none)
    sent_at: list[float] = []  # seconds from the start of the load to each request
    errors = 0
    begun = time.perf_counter()
    deadline = begun + seconds
    budget = [max_requests if max_requests is not None else float("inf")]

    def more() -> bool:
        return time.perf_counter() < deadline and budget[0] > 0

    async def one(reader, writer) -> tuple[int, bool, float]:
        writer.write(request)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        length, close, retry_after = 0, False, 0.0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                close = True
            elif name == "retry-after":
                retry_after = float(value)
        await reader.readexactly(length)
        return int(status_line.split()[1]), close, retry_after

    async def worker() -> None:
        nonlocal errors
        while more():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while more():
                    budget[0] -= 1
                    started = time.perf_counter()
                    status, close, retry_after = await asyncio.wait_for(one(reader, writer), timeout)
                    statuses.append(status)
                    latencies.append(time.perf_counter() - started)
                    waits.append(retry_after)
                    sent_at.append(started - begun)
                    if close:
                        break
                    if honour_retry_after and status == 503 and retry_after:
                        await asyncio.sleep(min(retry_after, max(0.0, deadline - time.perf_counter())))
            except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError,
                    IndexError):
                errors += 1
            finally:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, latencies, waits, sent_at, errors


def run_recorded(url: str, body: bytes, concurrency: int, seconds: float, honour_retry_after: bool = True,
                 max_requests: int | None = None) -> dict:
    """Load like run_load, keeping each request's status and latency (for shedding under overload)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    statuses, latencies, waits, sent_at, errors = runner(_recorded_load(
        parts.hostname, parts.port, parts.path, body, concurrency, seconds, honour_retry_after, max_requests))
    return {"statuses": np.array(statuses, dtype=np.int64), "latencies_s": np.array(latencies),
            "retry_after_s": np.array(waits), "sent_at_s": np.array(sent_at),
            "seconds": time.perf_counter() - wall_before, "client_cpu_seconds": time.process_time() - cpu_before,
            "transport_errors": errors}

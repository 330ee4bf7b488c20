"""Every serving path side by side, in one run, on this machine, with the same requests.

    python -m scripts.benchmark             # full run (about 12 minutes), writes benchmarks/
    python -m scripts.benchmark --smoke     # a few seconds per path, writes to a temporary folder

Paths (all on loopback, each measured alone while the others sit idle):

    (a) predictor alone       pre-scaled features straight to TF Serving's REST API
    (h) predictor alone, gRPC the same request to TF Serving's gRPC API (tensor_content bytes)
    (b) transformer           our transformer (v1 REST in, numpy kernels) -> predictor, its default hop
                              (--predictor_api auto: REST through the HTTP/1.1 client on the event loop for
                              up to 64 rows, gRPC above)
    (g) REST hop only         the same with --predictor_api rest: JSON toward TF Serving at every size
    (k) REST hop, aiohttp     the same through aiohttp (--predictor_rest_client aiohttp)
    (m) gRPC hop only         --predictor_api grpc: grpc.aio toward TF Serving at every size
    (n) on uvloop             (b) with --event-loop uvloop (KServe's default) instead of asyncio's own
                              event loop (the transformer's default: it accepts a burst of connections at
                              once, benchmarks/overload.md); what uvloop would save here
    (c) transformer, sklearn  the same transformer calling scikit-learn per request (the naive baseline)
    (d) fused alone           the fused SavedModel: raw features in, segment and items out
    (e) transformer v2 REST   the Open Inference Protocol's JSON at the transformer
    (f) transformer v2 gRPC   the Open Inference Protocol over gRPC, the rows as raw bytes
    (i) Python HTTP floor     a raw ASGI app on the same server stack answering a fixed body of our
                              answer's size (scripts/anchors/floor.py): no Python server costs less
    (j) plain KServe transformer  what a user would write from KServe's documentation: kserve.Model with
                              scikit-learn in preprocess/postprocess and KServe's own REST predictor
                              client (scripts/anchors/plain_transformer.py)

at batch sizes 1, 32, 256 and concurrency 1 and 16: p50/p90/p99 latency, throughput, the load
generator's own CPU, the servers' CPU per request, and (b, c) the pre+post time KServe measures
inside the transformer. Then the CPU budget of (b), (m) and (k) at one row, stage by stage (``budget.py``: each thread's
CPU time split by py-spy's samples of it), at each concurrency. Then a soak: many requests at concurrency 32 through (b), checking that
none is lost and that memory stays bounded. Writes results.md, results.json and latency.png.

One module per thing measured: ``paths.py`` (every serving path, the anchors, the soak), ``budget.py`` (where
one request's CPU goes), ``compute.py``
(the arithmetic in-process), ``overload.py``, ``chaos.py``; ``report.py`` writes and judges them and
``cli.py`` is the command line.
"""

from scripts.benchmark.chaos import chaos  # noqa: F401  (what tests and scripts import)
from scripts.benchmark.overload import OVERLOAD_PHASES, overload  # noqa: F401
from scripts.benchmark.paths import request_bodies, soak  # noqa: F401

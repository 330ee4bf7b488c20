"""The edge every request passes, in process: each outcome answered with its status, headers and message,
counted once by outcome and cause, the admitted work released on every path; the shedding middleware."""

import asyncio
import contextvars
import itertools
import logging

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from transformer.serving import edge
from transformer.serving.admission import Admission, Refused
from transformer.protocols.v1 import RequestError
from transformer.serving.edge import Failure, grpc_code, handle
from transformer.serving.metrics import ModelMetrics, VersionMetrics
from transformer.predictor import PredictorError

_names = itertools.count()


class Model:
    """What the edge reads of a model: its metrics and admission (fresh label values per test)."""

    def __init__(self, admission=None):
        self.name = f"edge-test-{next(_names)}"
        self.metrics = ModelMetrics(self.name)
        self.admission = admission if admission is not None else Admission(max_requests=2)


def count(model, outcome, cause, version=""):
    value = REGISTRY.get_sample_value("embedder_requests_total", {"model_name": model.name, "model_version": version,
                                                                  "outcome": outcome, "cause": cause})
    return value or 0.0


def outcomes(model) -> dict[tuple[str, str, str], float]:
    return {(s.labels["model_version"], s.labels["outcome"], s.labels["cause"]): s.value
            for metric in REGISTRY.collect() if metric.name == "embedder_requests"
            for s in metric.samples if s.labels.get("model_name") == model.name and s.name.endswith("_total")}


def run(model, work, request_id="rid-1", timeout_header=None):
    async def call():
        return await handle(model, model.name, request_id, timeout_header, work)

    return contextvars.copy_context().run(asyncio.run, call())


def work_of(version=None, result=None, error=None):
    """A request's work: it picks ``version`` (as the model's preprocess does), then answers or fails."""

    async def work():
        if version is not None:
            edge.request_version.set(version)
        if error is not None:
            raise error
        return result

    return work


def answering(result, version=None):
    return work_of(version, result=result)


def raising(error, version=None):
    return work_of(version, error=error)


def test_an_answer_is_counted_once_as_ok_by_the_version_that_gave_it():
    model = Model()
    assert run(model, answering("answer", version=7)) == "answer"
    assert outcomes(model) == {("7", "ok", "ok"): 1.0}
    assert (model.admission.requests, model.admission.rows) == (0, 0)


@pytest.mark.parametrize("exc, status, outcome, headers", [
    (RequestError("instances[0]: bad", cause="invalid_row"), 400, "client_error", {}),
    (RequestError("too many", status=413, cause="too_many_rows"), 413, "client_error", {}),
    (PredictorError(502, "TF Serving answered garbage", "bad_output"), 502, "predictor_error", {}),
    (PredictorError(503, "TF Serving is unreachable", "unreachable"), 503, "predictor_error", {"retry-after": "1"}),
    (PredictorError(504, "TF Serving took too long", "timeout"), 504, "predictor_error", {}),
    (Refused(504, "deadline passed", "deadline_exceeded"), 504, "shed", {}),
    (Refused(503, "full", "overloaded_rows", retry_after=4), 503, "shed", {"retry-after": "4"}),
    (Refused(400, "bad timeout", "invalid_timeout"), 400, "client_error", {}),
])
def test_each_failure_is_answered_with_its_status_and_counted_by_outcome_and_cause(exc, status, outcome, headers):
    model = Model()
    with pytest.raises(Failure) as caught:
        run(model, raising(exc, version=3))
    failure = caught.value
    assert (failure.status, failure.message) == (status, str(exc))
    assert failure.headers == {"x-request-id": "rid-1", **headers}
    assert outcomes(model) == {("3", outcome, exc.cause): 1.0}
    assert (model.admission.requests, model.admission.rows) == (0, 0)  # released whatever the outcome


def test_a_crash_is_a_500_naming_the_request_and_the_server_goes_on(caplog):
    model = Model()
    with caplog.at_level(logging.ERROR, logger="transformer"), pytest.raises(Failure) as caught:
        run(model, raising(KeyError("boom"), version=2), request_id="req-500")
    assert (caught.value.status, caught.value.message) == (500, "internal error (request id req-500)")
    assert caught.value.headers == {"x-request-id": "req-500"}
    assert outcomes(model) == {("2", "internal_error", "KeyError"): 1.0}
    (record,) = [r for r in caplog.records if "request_crashed" in r.getMessage()]
    assert orjson.loads(record.getMessage()) == {"event": "request_crashed", "request_id": "req-500"}
    assert record.exc_info[0] is KeyError  # the traceback is logged, not answered
    assert run(model, answering(1)) == 1 and model.admission.requests == 0


def test_a_full_transformer_refuses_without_running_the_work():
    model = Model(Admission(max_requests=1, min_requests=1))
    model.admission.requests = 1  # one request inside
    ran = []

    async def work():
        ran.append(1)

    with pytest.raises(Failure) as caught:
        run(model, work)
    assert caught.value.status == 503 and caught.value.headers == {"x-request-id": "rid-1", "retry-after": "1"}
    assert caught.value.message == "the transformer is at capacity (1 requests in progress, at most 1 now); retry " \
                                   "after 1s"
    assert ran == [] and model.admission.requests == 1  # nothing entered, so nothing left
    assert outcomes(model) == {("", "shed", "overloaded_requests"): 1.0}


def test_the_deadline_header_reaches_the_work():
    from transformer.serving.admission import deadline

    model = Model()
    seen = []

    async def work():
        seen.append(deadline.get() - asyncio.get_running_loop().time())

    run(model, work, timeout_header="1500")
    assert len(seen) == 1 and 1.0 < seen[0] <= 1.5 + 0.5  # loop time and monotonic share a clock on Linux


def test_a_failure_logs_the_request_at_the_level_its_cause_deserves(caplog):
    model = Model()
    with caplog.at_level(logging.DEBUG, logger="transformer"):
        for exc in (RequestError("bad row", cause="invalid_row"), PredictorError(502, "garbage", "bad_output"),
                    Refused(503, "full", "overloaded_requests")):
            with pytest.raises(Failure):
                run(model, raising(exc, version=1), request_id=f"r-{exc.cause}")
    levels = {orjson.loads(r.getMessage())["cause"]: r.levelno for r in caplog.records}
    assert levels == {"invalid_row": logging.INFO, "bad_output": logging.WARNING, "overloaded_requests": logging.DEBUG}
    event = orjson.loads(next(r.getMessage() for r in caplog.records if "bad_output" in r.getMessage()))
    assert {k: v for k, v in event.items() if k != "ms"} == {
        "event": "request_failed", "request_id": "r-bad_output", "model": model.name, "model_version": 1,
        "status": 502, "cause": "bad_output", "error": "garbage"}
    assert event["ms"] >= 0


def test_grpc_codes_follow_grpcs_own_http_mapping():
    import grpc

    assert {s: grpc_code(s) for s in (400, 404, 413, 500, 502, 503, 504)} == {
        400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 502: grpc.StatusCode.UNAVAILABLE,
        503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


# -- what one version saw ------------------------------------------------------------------------------------


def test_version_metrics_count_rows_outside_the_training_range_and_segments_exactly():
    name = f"edge-test-{next(_names)}"
    seen = VersionMetrics(name, 5, ("a", "b"), feature_min=[0.0, 10.0], feature_max=[1.0, 20.0], n_segments=3)
    seen.observe_rows(np.array([[0.0, 9.0], [1.0, 21.0], [-0.1, 20.0], [1.5, 5.0]]))
    seen.observe_segments(np.array([2, 0, 2, 2]))

    def value(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"model_name": name, "model_version": "5", **labels}) or 0.0

    ranges = {(f, side): value("embedder_feature_out_of_range_total", feature=f, side=side)
              for f in "ab" for side in ("below", "above")}
    # the edges themselves are inside the range
    assert ranges == {("a", "below"): 1, ("a", "above"): 1, ("b", "below"): 2, ("b", "above"): 1}
    assert [value("embedder_segment_assignments_total", segment=str(s)) for s in range(3)] == [1, 0, 3]
    # one row at a time, as most requests come: inside the range counts nothing, outside counts its side
    for row in ([0.5, 15.0], [0.0, 20.0], [2.0, 15.0], [0.5, 9.5], [-1.0, 30.0]):
        seen.observe_rows(np.array([row]))
    for label in (1, 1, 0):
        seen.observe_segments(np.array([label]))
    ranges = {(f, side): value("embedder_feature_out_of_range_total", feature=f, side=side)
              for f in "ab" for side in ("below", "above")}
    assert ranges == {("a", "below"): 2, ("a", "above"): 2, ("b", "below"): 3, ("b", "above"): 2}
    assert [value("embedder_segment_assignments_total", segment=str(s)) for s in range(3)] == [2, 2, 3]


# -- the shedding middleware ---------------------------------------------------------------------------------


def asgi(middleware, method="POST", path="/v1/models/m:predict", headers=()):
    sent, calls = [], []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}

    async def call():
        await middleware(scope, receive, send)

    calls.append(scope)
    asyncio.run(call())
    return sent


def test_a_full_transformer_refuses_predict_requests_before_routing():
    from transformer.serving.rest import ShedWhenFull

    model = Model(Admission(max_requests=1, min_requests=1))
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    shed = ShedWhenFull(app, model=model, model_name=model.name)
    assert asgi(shed) == [] and reached == ["/v1/models/m:predict"]  # room: passed on
    model.admission.requests = 1
    for method, path in (("GET", "/v1/models/m:predict"), ("POST", "/v1/models/m"), ("GET", "/metrics")):
        asgi(shed, method, path)  # readiness, metadata and metrics are never shed
    assert reached == ["/v1/models/m:predict", "/v1/models/m:predict", "/v1/models/m", "/metrics"]
    for path in ("/v1/models/m:predict", "/v2/models/m/infer"):
        start, body = asgi(shed, path=path, headers=[(b"x-request-id", b"abc")])
        message = "the transformer is at capacity (1 requests in progress, at most 1 now); retry after 1s"
        assert body == {"type": "http.response.body", "body": orjson.dumps({"error": message})}
        assert start == {"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body["body"])).encode()),
            (b"x-request-id", b"abc"), (b"retry-after", b"1")]}
    assert len(reached) == 4 and outcomes(model) == {("", "shed", "overloaded_requests"): 2.0}
    start, _ = asgi(shed)  # without an id: one is made
    request_id = dict(start["headers"])[b"x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0


def test_drift_is_reported_for_each_model_by_the_version_answering_it():
    from types import SimpleNamespace

    first, second = ModelMetrics(f"edge-test-{next(_names)}"), ModelMetrics(f"edge-test-{next(_names)}")
    monitor = SimpleNamespace(feature_psi=lambda: {"a": 0.5, "b": 0.01}, segment_psi=lambda: 0.3)
    first.switched(4, monitor)
    second.switched(2, None)  # a version without a drift monitor: nothing reported for it

    def psi(metric, model, **labels):
        return REGISTRY.get_sample_value(metric, {"model_name": model.model_name, **labels})

    assert (psi("embedder_feature_drift_psi", first, feature="a"), psi("embedder_feature_drift_psi", first,
                                                                       feature="b")) == (0.5, 0.01)
    assert psi("embedder_segment_mix_drift_psi", first) == 0.3
    assert psi("embedder_segment_mix_drift_psi", second) is None
    assert REGISTRY.get_sample_value("embedder_model_version", {"model_name": second.model_name}) == 2
    first.switched(None)  # no version answers: its drift goes too, the version reads 0
    assert psi("embedder_segment_mix_drift_psi", first) is None
    assert REGISTRY.get_sample_value("embedder_model_version", {"model_name": first.model_name}) == 0


class Timed(Admission):
    """An admission that keeps the time each request was inside, as the edge reports it."""

    def leave(self, seconds):
        self.told = getattr(self, "told", []) + [seconds]
        super().leave(seconds)


def test_the_time_inside_is_what_the_admission_learns_and_the_log_shows(caplog):
    import time

    model = Model(admission=Timed(max_requests=2))

    async def slow():
        await asyncio.sleep(0.02)  # the work's own duration, measured below
        raise RequestError("rows[0]: bad", cause="invalid_rows")

    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="transformer"), pytest.raises(Failure) as caught:
        run(model, slow)
    elapsed = time.perf_counter() - started
    assert str(caught.value) == "rows[0]: bad"
    [told] = model.admission.told
    assert 0.02 <= told <= elapsed
    [line] = [orjson.loads(r.getMessage()) for r in caplog.records]
    assert 20 <= line["ms"] <= elapsed * 1000 and line["ms"] == round(line["ms"], 3) and isinstance(line["ms"], float)


def test_the_admission_learns_the_time_after_admitting_not_a_paced_clients_wait_before_it(caplog):
    """A client that came back before its Retry-After waits (``early_retry_wait``) before it is admitted. That wait
    is not work inside the process: the limit follows the time after admission, so a storm of early re-senders
    does not push it to its floor. The log line still shows the whole time the request took."""
    import time

    model = Model(admission=Timed(max_requests=1, min_requests=1, early_retry_wait=0.2))
    client = ("10.0.0.9", 4242)

    async def scenario():
        model.admission.enter(None, client=("10.0.0.1", 1))  # the one slot taken
        with pytest.raises(Failure):  # refused, and told to come back later
            await handle(model, model.name, "rid-first", None, answering({"ok": 1}), client)

        async def free_the_slot():
            while model.admission.waiting == 0:  # once the re-sent request waits, the slot's request leaves
                await asyncio.sleep(0)
            model.admission.leave(0.001)

        freeing = asyncio.get_running_loop().create_task(free_the_slot())

        async def work():
            await asyncio.sleep(0.02)
            return {"ok": 2}

        started = time.perf_counter()
        with caplog.at_level(logging.INFO, logger="transformer"):
            answer = await handle(model, model.name, "rid-paced", None, work, client)
        await freeing
        return answer, time.perf_counter() - started

    answer, elapsed = contextvars.copy_context().run(asyncio.run, scenario())
    assert answer == {"ok": 2} and elapsed >= 0.2  # it was paced, then admitted
    assert model.admission.told[0] == 0.001  # the slot's own request
    assert 0.02 <= model.admission.told[1] < 0.2  # the paced request: its work, not its wait


def test_a_model_without_metrics_or_admission_is_still_answered():
    from types import SimpleNamespace

    assert run(SimpleNamespace(name="bare"), answering({"ok": 1})) == {"ok": 1}


def test_log_lines_write_any_value_as_text(caplog):
    from pathlib import Path

    with caplog.at_level(logging.INFO, logger="transformer"):
        edge.log_event(logging.INFO, "loaded", path=Path("/models/embedder/3"), version=3)
    assert [orjson.loads(r.getMessage()) for r in caplog.records] == [
        {"event": "loaded", "path": "/models/embedder/3", "version": 3}]


@pytest.mark.heavy  # starts a process
def test_request_ids_made_here_are_unique_hex_and_differ_between_processes():
    import subprocess
    import sys

    from transformer.serving.edge import new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    other = subprocess.run([sys.executable, "-c", "from transformer.serving.edge import new_request_id as n; "
                            "print(n())"], capture_output=True, text=True, check=True).stdout.strip()
    assert other[:16] != ids[0][:16] and other not in ids

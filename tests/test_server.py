"""The REST endpoints in process: the small model behind KServe's DataPlane, wired into a FastAPI application by
the same ``server.install`` the transformer runs, called with Starlette's test client. Bounded bodies, the
protocol's decoder, the request id, the version header and the statuses; answers compared with the offline
computation. tests/test_reliability.py and tests/test_protocols.py send the same over real sockets."""

import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from kserve.errors import ModelNotFound, model_not_found_handler
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from conftest import latency_logged, metric_value
from small_bundle import ROWS, offline, transformer
from starlette.testclient import TestClient

from transformer.serving.admission import Admission
from transformer.protocols.v2 import HEADER_LENGTH
from transformer.serving.rest import install

LIMIT = 2000  # bytes of body accepted


def serving(tmp_path, predict_path):
    """The small model behind an application wired as the transformer wires KServe's, and a client of it."""
    model = transformer(tmp_path, 4, admission=Admission(max_requests=2, min_requests=2))
    repository = ModelRepository()
    repository.update(model)
    app = FastAPI()
    app.add_exception_handler(ModelNotFound, model_not_found_handler)
    install(app, DataPlane(model_registry=repository), model, "embedder", LIMIT, predict_path)
    client = TestClient(app)
    client.__enter__()
    client.portal.call(model.versions.refresh)
    return client, model


@pytest.fixture(params=["fast", "kserve"])
def served(tmp_path, request):
    """Each test runs on both predict paths: the fast ASGI layer and FastAPI's routes."""
    client, model = serving(tmp_path, request.param)
    yield client, model
    client.__exit__(None, None, None)


def test_a_v1_request_is_answered_with_its_id_and_version(served):
    client, _ = served
    response = client.post("/v1/models/embedder:predict", content=orjson.dumps({"instances": ROWS.tolist()}),
                           headers={"x-request-id": "r-1"})
    assert response.status_code == 200
    assert (response.headers["x-request-id"], response.headers["x-model-version"]) == ("r-1", "4")
    assert response.headers["content-type"] == "application/json"
    got, expected = response.json()["predictions"], offline(ROWS)
    assert [(p["segment"], [i["id"] for i in p["items"]]) for p in got] == \
        [(p["segment"], [i["id"] for i in p["items"]]) for p in expected]
    # each score is written as the shortest text that reads back to its float32 (not its float64 value)
    assert [i["score"] for p in got for i in p["items"]] == [float(str(np.float32(i["score"]))) for p in expected
                                                             for i in p["items"]]
    shortest = str(np.float32(expected[0]["items"][0]["score"]))  # e.g. 0.73229724, not 0.7322972416877747
    assert f'"score":{shortest}}}'.encode() in response.content
    generated = client.post("/v1/models/embedder:predict", content=orjson.dumps({"instances": ROWS[:1].tolist()}))
    assert len(generated.headers["x-request-id"]) == 32 and int(generated.headers["x-request-id"], 16) >= 0


def test_a_v2_request_can_ask_for_binary_tensors(served):
    client, _ = served
    body = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2],
                                     "data": ROWS.ravel().tolist()}],
                         "parameters": {"binary_data_output": True}})
    response = client.post("/v2/models/embedder/infer", content=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER_LENGTH])
    header = orjson.loads(response.content[:length])
    segments = np.frombuffer(response.content[length:length + 5 * 8], "<i8")
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 40}
    assert segments.tolist() == [p["segment"] for p in offline(ROWS)]
    binary_in = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2],
                                          "parameters": {"binary_data_size": 80}}]})
    response = client.post("/v2/models/embedder/infer", content=binary_in + ROWS.astype("<f8").tobytes(),
                           headers={HEADER_LENGTH: str(len(binary_in))})
    assert response.status_code == 200
    assert [o["data"] for o in response.json()["outputs"] if o["name"] == "segment"] == [segments.tolist()]


@pytest.mark.parametrize("path, body, headers, status, message", [
    ("/v1/models/embedder:predict", b"x" * (LIMIT + 1), {}, 413,
     f"the body is {LIMIT + 1} bytes, at most {LIMIT} are accepted; send fewer rows per request"),
    ("/v1/models/embedder:predict", b"x" * LIMIT, {}, 400,
     'the body is not valid JSON: Expecting value at line 1 column 1; send {"instances": [...]}'),
    ("/v1/models/embedder:predict", b'{"instances": [[1, 2, 3]]}', {}, 400,
     "instances[0]: a list row must have 2 values in this order: a, b; got 3"),
    ("/v2/models/embedder/infer", b"{}", {HEADER_LENGTH: "twelve"}, 400,
     f"the {HEADER_LENGTH} header must be a number of bytes, got 'twelve'"),
    ("/v2/models/embedder/infer", b'{"instances": []}', {}, 400,
     "the body must be an object with a non-empty list 'inputs' (this endpoint takes v2 'inputs', not v1 'instances'); "
     'send {"inputs": [{"name": "features", "datatype": "FP64", "shape": [n, F], "data": [...]}]}'),
    ("/v1/models/embedder:predict", b'{"instances": [[1, 2]]}', {"x-request-timeout-ms": "soon"}, 400,
     "x-request-timeout-ms must be a number of milliseconds between 0 and 3600000, got 'soon'"),
])
def test_a_bad_request_is_refused_with_its_status_and_message(served, path, body, headers, status, message):
    client, model = served
    response = client.post(path, content=body, headers={"x-request-id": "bad-1", **headers})
    assert (response.status_code, response.json()) == (status, {"error": message})
    assert response.headers["x-request-id"] == "bad-1" and "x-model-version" not in response.headers
    assert model.admission.requests == 0


def test_a_streamed_body_past_the_limit_is_refused_as_it_arrives(served):
    client, _ = served

    def chunks():
        for _ in range(5):
            yield b"x" * (LIMIT // 2)

    response = client.post("/v1/models/embedder:predict", content=chunks())
    assert (response.status_code, response.json()) == (413, {"error": f"the body is more than {LIMIT} bytes; send "
                                                                      "fewer rows per request"})


def test_an_unknown_model_is_kserves_404(served):
    client, _ = served
    response = client.post("/v1/models/other:predict", content=b'{"instances": [[1, 2]]}')
    assert response.status_code == 404 and "other" in response.json()["error"]


def test_a_full_transformer_refuses_before_reading(served):
    client, model = served
    model.admission.requests = 2  # two requests inside, at the limit
    response = client.post("/v1/models/embedder:predict", content=b"not even json", headers={"x-request-id": "f-1"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": "the transformer is at capacity (2 requests in progress, at most 2 now); "
                                        "retry after 1s"}
    model.admission.requests = 0
    assert client.post("/v1/models/embedder:predict", content=b'{"instances": [[1, 2]]}').status_code == 200


def requests_counted(outcome, cause):
    return metric_value("embedder_requests_total", model_version="", outcome=outcome, cause=cause)


def test_refusals_are_counted_and_logged_under_the_model_with_the_request_id(served, caplog):
    client, model = served
    too_large, shed = requests_counted("client_error", "body_too_large"), requests_counted("shed", "overloaded_requests")
    with caplog.at_level("DEBUG", logger="transformer"):
        assert client.post("/v1/models/embedder:predict", content=b"x" * (LIMIT + 1),
                           headers={"x-request-id": "big-1"}).status_code == 413
        model.admission.requests = 2
        assert client.post("/v1/models/embedder:predict", content=b"{}", headers={"x-request-id": "full-1"}
                           ).status_code == 503
        model.admission.requests = 0
    assert requests_counted("client_error", "body_too_large") == too_large + 1
    assert requests_counted("shed", "overloaded_requests") == shed + 1
    logged = [orjson.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [(line["request_id"], line["model"], line["status"], line["cause"]) for line in logged] == [
        ("big-1", "embedder", 413, "body_too_large"), ("full-1", "embedder", 503, "overloaded_requests")]


def test_the_request_id_reaches_kserves_own_latency_log(served, caplog):
    client, model = served
    model.enable_latency_logging = True
    with caplog.at_level("INFO"):
        assert client.post("/v1/models/embedder:predict", content=b'{"instances": [[1, 2]]}',
                           headers={"x-request-id": "lat-1"}).status_code == 200
        body = b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 2], "data": [1, 2]}]}'
        assert client.post("/v2/models/embedder/infer", content=body, headers={"x-request-id": "lat-2"}
                           ).status_code == 200
        made = client.post("/v1/models/embedder:predict", content=b'{"instances": [[1, 2]]}').headers["x-request-id"]
    assert latency_logged(caplog) == ["lat-1", "lat-2", made]  # a made id is KServe's too


def test_a_binary_header_length_that_is_not_a_number_is_named(served):
    client, _ = served
    response = client.post("/v2/models/embedder/infer", content=b"{}", headers={HEADER_LENGTH: "twelve-bytes-or-so-maybe"})
    assert (response.status_code, response.json()) == (400, {"error": f"the {HEADER_LENGTH} header must be a number of "
                                                                       "bytes, got 'twelve-bytes-or-so-m'"})


def _battery():
    """Every malformed request of the codecs' batteries, valid ones, and the edge cases of the transport."""
    import json

    from test_codec import BAD_REQUESTS as V1_BAD
    from test_codec_v2 import BAD_REQUESTS as V2_BAD

    v1, v2 = "/v1/models/embedder:predict", "/v2/models/embedder/infer"
    v2_row = b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2], "data": %s}]}' % (
        orjson.dumps(ROWS.ravel().tolist()))
    cases = [("POST", v1, json.dumps(doc).encode(), {}) for doc, *_ in V1_BAD]
    cases += [("POST", v2, body, {HEADER_LENGTH: str(length)} if length is not None else {})
              for body, length, *_ in V2_BAD]
    cases += [
        ("POST", v1, orjson.dumps({"instances": ROWS.tolist()}), {}),
        ("POST", v1, orjson.dumps({"instances": [{"b": 2, "a": 1}]}), {"content-type": "application/json"}),
        ("POST", v1, orjson.dumps({"instances": [[1, 2]]}), {"content-type": "text/plain"}),
        ("POST", v2, v2_row, {}),
        ("POST", v2, orjson.dumps({"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2],
                                              "data": ROWS.ravel().tolist()}],
                                   "parameters": {"binary_data_output": True}}), {}),
        ("POST", v1, b"x" * (LIMIT + 1), {}),
        ("POST", v1, b"", {}),
        ("POST", v1, b'{"instances": [[1, 2]]}', {"x-request-timeout-ms": "soon"}),
        ("POST", v1, b'{"instances": [[1, 2]]}', {"x-request-timeout-ms": "30000"}),
        ("POST", v2, b"{}", {HEADER_LENGTH: "twelve"}),
        ("POST", "/v1/models/other:predict", b'{"instances": [[1, 2]]}', {}),
        ("POST", "/v2/models/other/infer", b"{}", {}),
        ("POST", "/v1/models/embedder/extra:predict", b"{}", {}),
        ("GET", v1, b"", {}),
        ("GET", "/v1/models/embedder", b"", {}),
        ("GET", "/v2/models/embedder/ready", b"", {}),
        ("GET", "/", b"", {}),
    ]
    return cases


def test_the_fast_path_answers_exactly_as_fastapis_routes(tmp_path, monkeypatch):
    """Status, body and headers of every request of the battery, on both paths (only the date differs)."""
    from transformer.serving import rest as server

    routed_calls = []
    endpoint = server.Endpoint.__call__

    async def counted(self, model_name: str, request: Request):
        routed_calls.append(request.url.path)
        return await endpoint(self, model_name, request)

    monkeypatch.setattr(server.Endpoint, "__call__", counted)
    fast, _ = serving(tmp_path / "fast", "fast")
    routed, _ = serving(tmp_path / "kserve", "kserve")
    try:
        for number, (method, path, body, headers) in enumerate(_battery()):
            answers = []
            for client in (fast, routed):
                routed_calls.clear()
                response = client.request(method, path, content=body, headers={"x-request-id": f"b-{number}",
                                                                                 **headers})
                answers.append((response.status_code, response.content,
                                sorted((k, v) for k, v in response.headers.items() if k != "date")))
                # a predict request for the served model never reaches FastAPI's route on the fast path
                predict = method == "POST" and "extra" not in path
                expected = [] if client is fast and "embedder" in path or not predict else [path]
                assert routed_calls == expected, (path, routed_calls)
            assert answers[0] == answers[1], (method, path, body[:80], headers)
            assert answers[0][0] < 500, (path, body[:80], answers[0][:2])
    finally:
        for client in (fast, routed):
            client.__exit__(None, None, None)


def test_a_client_gone_before_its_body_is_counted_not_logged_as_a_crash(served, caplog):
    """A client that closes before its body arrives (as the paced clients of a storm do when it ends): no
    answer is computed, no crash is logged, the request is counted, and its admission is released."""
    client, model = served
    gone = requests_counted("client_error", "client_disconnected")
    sent = []

    async def call():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/models/embedder:predict", "raw_path": b"/v1/models/embedder:predict",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50123), "server": ("testserver", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"20"),
                             (b"x-request-id", b"gone-1")]}

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await client.app(scope, receive, send)

    with caplog.at_level("DEBUG", logger="transformer"):
        client.portal.call(call)
    assert requests_counted("client_error", "client_disconnected") == gone + 1
    assert not [r for r in caplog.records if "request_crashed" in r.getMessage()]
    (line,) = [orjson.loads(r.getMessage()) for r in caplog.records if "gone-1" in r.getMessage()]
    assert (line["status"], line["cause"]) == (499, "client_disconnected") and line["model"] == "embedder"
    assert model.admission.requests == 0
    assert sent[0]["status"] == 499  # written to a connection nobody reads: uvicorn drops it


def test_the_fast_path_asks_a_paced_client_whether_it_is_still_there_without_losing_its_body(tmp_path):
    """A paced request (its connection refused before, back too early) is asked after its wait whether its
    client is still there; one that left gets 499 and takes no slot, one that stayed is answered in full."""
    client, model = serving(tmp_path, "fast")
    try:
        body = orjson.dumps({"instances": ROWS[:1].tolist()})

        async def call(address, messages):
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/models/embedder:predict", "query_string": b"", "root_path": "",
                     "raw_path": b"/v1/models/embedder:predict", "client": address, "server": ("testserver", 80),
                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
            queue, sent = list(messages), []

            async def receive():
                return queue.pop(0)

            async def send(message):
                sent.append(message)

            await client.app(scope, receive, send)
            return sent

        admission = model.admission
        admission.early_retry_wait = 0.01
        for address in (("10.1.1.1", 1), ("10.1.1.1", 2)):
            admission.requests = admission.limit  # full: both connections refused once and told to wait
            assert client.portal.call(call, address, [])[0]["status"] == 503
        admission.requests = 0  # room again by the time they are back
        left = client.portal.call(call, ("10.1.1.1", 1), [{"type": "http.disconnect"}])
        assert left[0]["status"] == 499 and admission.requests == 0
        admission.requests = admission.limit - 1
        stayed = client.portal.call(call, ("10.1.1.1", 2), [{"type": "http.request", "body": body, "more_body": False}])
        admission.requests = 0
        assert stayed[0]["status"] == 200
        assert [p["segment"] for p in orjson.loads(stayed[1]["body"])["predictions"]] == \
            [p["segment"] for p in offline(ROWS[:1])]
    finally:
        client.__exit__(None, None, None)


# -- the fast path's ASGI pieces, driven as uvicorn drives them -----------------------------------------------

def messages(*items):
    queue = list(items)

    async def receive():
        return queue.pop(0)

    return receive


def collect(generator):
    import asyncio

    async def run():
        return [chunk async for chunk in generator]

    return asyncio.run(run())


def test_the_body_is_read_in_the_chunks_asgi_delivers_and_a_disconnect_stops_it():
    from starlette.requests import ClientDisconnect

    from transformer.serving.rest import _chunks

    assert collect(_chunks(messages({"type": "http.request", "body": b"ab", "more_body": True},
                                    {"type": "http.request", "more_body": True},
                                    {"type": "http.request", "body": b"c"}))) == [b"ab", b"", b"c"]
    assert collect(_chunks(messages({"type": "http.request", "body": b"x"}, {"type": "http.request", "body": b"y"}))) \
        == [b"x"]
    assert collect(_chunks(messages({"type": "http.request"}))) == [b""]
    with pytest.raises(ClientDisconnect):
        collect(_chunks(messages({"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.disconnect"})))


def test_a_streamed_body_is_refused_once_its_chunks_pass_the_limit():
    import asyncio

    from transformer.protocols.v1 import RequestError
    from transformer.serving.rest import read_body

    async def chunks():
        for part in (b"x" * 6, b"y" * 6):
            yield part

    with pytest.raises(RequestError) as refused:
        asyncio.run(read_body(None, chunks(), 10))
    assert (refused.value.status, refused.value.cause) == (413, "body_too_large")
    assert str(refused.value) == "the body is more than 10 bytes; send fewer rows per request"
    assert asyncio.run(read_body("12", chunks(), 12)) == b"x" * 6 + b"y" * 6


def test_looking_ahead_for_a_disconnect_loses_no_message():
    import asyncio

    from transformer.serving.rest import _LookAhead

    first, second = {"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.request", "body": b"b"}

    async def scenario():
        ahead = _LookAhead(messages(first, second))
        assert await ahead.connected() is True
        assert [await ahead(), await ahead()] == [first, second]
        gone = _LookAhead(messages({"type": "http.disconnect"}))
        assert await gone.connected() is False
        assert await gone() == {"type": "http.disconnect"}

    asyncio.run(scenario())


def test_only_the_two_predict_paths_of_one_model_name_are_routed_fast():
    from transformer.serving.rest import FastPath, decode_v1, decode_v2

    fast = FastPath(app=None, dataplane=None, max_body_bytes=1)
    assert fast.route("/v1/models/embedder:predict") == ("embedder", decode_v1)
    assert fast.route("/v2/models/embedder/infer") == ("embedder", decode_v2)
    for path in ("/v1/models/a/b:predict", "/v1/models/:predict", "/x/models/embedder:predict",
                 "/v2/models/embedder/ready", "/v1/models/embedder"):
        assert fast.route(path) is None, path


def test_install_refuses_an_unknown_path_and_defaults_to_the_fast_one():
    from transformer.serving.rest import FastPath, ShedWhenFull

    with pytest.raises(ValueError) as unknown:
        install(FastAPI(), None, None, "embedder", 10, predict_path="slow")
    assert str(unknown.value) == "predict_path must be one of fast, kserve, got 'slow'"
    app, model = FastAPI(), object()
    install(app, None, model, "embedder", 10)
    assert isinstance(app.build_middleware_stack(), FastPath)
    (shed,) = [m for m in app.user_middleware if m.cls is ShedWhenFull]
    assert shed.kwargs == {"model": model, "model_name": "embedder"}


def test_shedding_tells_each_client_its_wait_and_lets_a_client_back_early_through_to_be_paced():
    import asyncio
    from types import SimpleNamespace

    from transformer.serving.rest import ShedWhenFull

    admission = Admission(max_requests=1, min_requests=1)
    admission.requests = 1  # full
    passed, sent = [], []

    async def app(scope, receive, send):
        passed.append(scope["client"])

    async def send(message):
        sent.append(message)

    shed = ShedWhenFull(app, SimpleNamespace(admission=admission, metrics=None), "embedder")
    scope = {"type": "http", "method": "POST", "path": "/v1/models/embedder:predict", "headers": [],
             "client": ("10.0.0.7", 4100)}
    asyncio.run(shed(scope, messages(), send))
    assert sent[0]["status"] == 503 and passed == []
    assert ("10.0.0.7", 4100) in admission._told  # told its wait
    asyncio.run(shed(scope, messages(), send))  # back before it: through, to be paced by the edge
    assert passed == [("10.0.0.7", 4100)] and len(sent) == 2


class RecordingAdmission(Admission):
    """Admission that records who each request said it came from, and whether its client was still there."""

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    async def admit(self, timeout_header, client=None, connected=None):
        self.seen.append((client, None if connected is None else await connected()))
        await super().admit(timeout_header, client, connected)


def stub_server():
    """A dataplane and model as respond() uses them: the model's admission, and an answer for any payload."""
    from types import SimpleNamespace

    class Plane:
        def __init__(self, model):
            self.model_registry = SimpleNamespace(get_model=lambda name: model if name == "embedder" else None)
            self.payloads = []

        async def infer(self, name, payload, headers):
            self.payloads.append(payload)
            return {"predictions": []}, {"x-model-version": "4"}

    model = SimpleNamespace(admission=RecordingAdmission(), metrics=None)
    return Plane(model), model


def run_asgi(app, scope, *received):
    import asyncio

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, messages(*received), send))
    return sent


def test_the_fast_path_hands_admission_its_client_and_whether_it_is_still_there():
    from transformer.serving.rest import FastPath

    plane, model = stub_server()
    fast = FastPath(app=None, dataplane=plane, max_body_bytes=1000)
    scope = {"type": "http", "method": "POST", "path": "/v1/models/embedder:predict", "client": ("10.1.1.1", 80),
             "headers": [(b"content-type", b"application/json")], "query_string": b""}
    sent = run_asgi(fast, scope, {"type": "http.request", "body": b'{"instances": [[1, 2]]}'})
    assert sent[0]["status"] == 200
    assert model.admission.seen == [(("10.1.1.1", 80), True)]
    assert plane.payloads and model.admission.requests == 0  # the request left admission


def test_a_client_gone_before_its_body_is_a_499_with_the_reason(caplog):
    import orjson as json_lib

    from transformer.serving.rest import FastPath

    plane, model = stub_server()
    scope = {"type": "http", "method": "POST", "path": "/v1/models/embedder:predict", "client": ("10.1.1.2", 81),
             "headers": [], "query_string": b""}
    sent = run_asgi(FastPath(app=None, dataplane=plane, max_body_bytes=1000), scope, {"type": "http.disconnect"},
                    {"type": "http.disconnect"})
    assert sent[0]["status"] == 499 and plane.payloads == []
    assert json_lib.loads(sent[1]["body"]) == {"error": "the client closed the connection before its body was read"}


def test_the_kserve_route_hands_admission_its_client_too():
    plane, model = stub_server()
    app = FastAPI()
    install(app, plane, model, "embedder", 1000, predict_path="kserve")
    with TestClient(app) as client:
        answer = client.post("/v1/models/embedder:predict", json={"instances": [[1, 2]]})
    assert answer.status_code == 200
    assert model.admission.seen == [(("testclient", 50000), None)]  # FastAPI's route cannot tell


def test_every_per_version_series_moves_on_the_version_that_answered_across_an_update(tmp_path):
    """A request on version 4, a switch to version 5, a request on version 5: each per-version series (requests by
    outcome, features out of range, the segment mix) moves on the answering version only, and the drift gauges
    follow the version answering new requests. Dashboards watch a rollout through exactly these."""
    from small_bundle import new_version, write

    from transformer.serving.metrics import DRIFT

    client, model = serving(tmp_path, "fast")
    try:
        def series(version):
            v = str(version)
            return {"ok": metric_value("embedder_requests_total", model_version=v, outcome="ok", cause="ok"),
                    "bad": metric_value("embedder_requests_total", model_version=v, outcome="client_error",
                                        cause="invalid_value"),
                    "segments": sum(metric_value("embedder_segment_assignments_total", model_version=v, segment=s)
                                    for s in ("0", "1")),
                    "out_of_range": sum(metric_value("embedder_feature_out_of_range_total", model_version=v,
                                                     feature=f, side=side) for f in ("a", "b")
                                        for side in ("below", "above"))}

        def moved(before, version):
            after = series(version)
            return {k: after[k] - before[k] for k in after}

        body = orjson.dumps({"instances": ROWS.tolist()})  # 5 rows; 4 values outside the training range
        bad = orjson.dumps({"instances": [[float("nan"), 1.0]]}, option=orjson.OPT_SERIALIZE_NUMPY).replace(
            b"null", b"NaN")
        four, five = series(4), series(5)
        assert client.post("/v1/models/embedder:predict", content=body).headers["x-model-version"] == "4"
        assert client.post("/v1/models/embedder:predict", content=bad).status_code == 400
        assert moved(four, 4) == {"ok": 1, "bad": 1, "segments": 5, "out_of_range": 4}
        assert moved(five, 5) == {"ok": 0, "bad": 0, "segments": 0, "out_of_range": 0}
        assert DRIFT.monitors["embedder"] is model.versions.loaded[4].metrics.drift

        write(new_version(tmp_path, 5))
        model._predictor.states[5] = "AVAILABLE"
        client.portal.call(model.versions.refresh)
        assert model.versions.active.version == 5
        four, five = series(4), series(5)
        assert client.post("/v1/models/embedder:predict", content=body).headers["x-model-version"] == "5"
        assert client.post("/v1/models/embedder:predict", content=bad).status_code == 400
        assert moved(five, 5) == {"ok": 1, "bad": 1, "segments": 5, "out_of_range": 4}
        assert moved(four, 4) == {"ok": 0, "bad": 0, "segments": 0, "out_of_range": 0}
        assert DRIFT.monitors["embedder"] is model.versions.loaded[5].metrics.drift is not None
        assert metric_value("embedder_model_version") == 5
    finally:
        client.__exit__(None, None, None)

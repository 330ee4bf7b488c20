"""The clients for TF Serving, in process: a scripted TF Serving on loopback (aiohttp for REST, grpc.aio
for gRPC) in the test's own event loop answers what each case needs, and each client must turn it into
the right arrays or the right PredictorError: status, message and cause, with exactly as many calls as
the retry policy allows (a timeout is never retried; UNAVAILABLE and 503 are, within the budget).

tests/test_tfserving_grpc.py and tests/test_reliability.py run the same clients against the stand-in and
through a fault proxy; these run in milliseconds, so the mutation run judges the clients too.
"""

import asyncio
import json
import socket

import grpc
import numpy as np
import pytest
from aiohttp import web

from transformer.predictor import (
    Contract, PredictorError, RestPredictorClient, RetryPolicy, VersionNotServed, connect, grpc_address,
    metadata_problems,
)
from transformer.predictor.grpc import (
    GET_MODEL_METADATA, GET_MODEL_STATUS, PREDICT, SIGNATURE_DEF_MAP_URL, GrpcPredictorClient, tensor_array,
    tensor_proto, type_name,
)
from transformer.predictor.protos import tfserving_pb2 as pb

CONTRACT = Contract("candidates", "features", 3, {"ids": ("DT_INT64", 2), "scores": ("DT_FLOAT", 2)}, version=3)
UNPINNED = Contract("candidates", "features", 3, {"ids": ("DT_INT64", 2), "scores": ("DT_FLOAT", 2)})
FEATURES = np.array([[1.0, 2.5, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002, budget=1.0)


def run(coro):
    return asyncio.run(coro)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


class Script:
    """What the fake TF Serving answers, in order (the last answer repeats), and what it was asked."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.seen = []
        self.headers = []  # the headers of each request, as sent

    def next(self):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# -- REST ------------------------------------------------------------------------------------------------------


async def rest(script: Script, work, *, timeout=2.0, retry=FAST, retries=None):
    """Serve ``script`` over HTTP on a free loopback port and run ``work(client)`` against it."""

    async def handler(request):
        script.seen.append((request.method, request.path, await request.read()))
        script.headers.append(dict(request.headers))
        status, body, *pause = script.next()
        if status == "drop":  # the connection closes before any answer
            request.transport.close()
            return web.Response()
        if pause:
            await asyncio.sleep(pause[0])
        return web.Response(status=status, body=body if isinstance(body, bytes) else json.dumps(body).encode())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = RestPredictorClient(f"127.0.0.1:{port}", "embedder", timeout=timeout, retry=retry,
                                 on_retry=(retries.append if retries is not None else None))
    try:
        return await work(client)
    finally:
        await client.close()
        await runner.cleanup()


def rest_outcome(script, work, **options):
    try:
        return run(rest(script, work, **options))
    except PredictorError as exc:
        return exc


def predict(contract=CONTRACT):
    return lambda client: client.predict(FEATURES, contract)


def test_rest_predict_pins_the_version_and_reads_the_columnar_answer():
    script = Script((200, {"outputs": {"ids": [[4, 1], [0, 3]], "scores": [[0.75, 0.5], [0.25, 0.125]],
                                       "embedding": [[0.0], [0.0]]}}))
    arrays = run(rest(script, predict()))
    assert arrays.keys() == {"ids", "scores"}
    assert arrays["ids"].dtype == np.int64 and arrays["ids"].tolist() == [[4, 1], [0, 3]]
    assert arrays["scores"].dtype == np.float32 and arrays["scores"].tolist() == [[0.75, 0.5], [0.25, 0.125]]
    ((method, path, body),) = script.seen
    assert (method, path) == ("POST", "/v1/models/embedder/versions/3:predict")
    assert json.loads(body) == {"signature_name": "candidates", "inputs": [[1.0, 2.5, 3.0], [4.0, 5.0, 6.0]]}
    run(rest(script, predict(UNPINNED)))
    assert script.seen[-1][1] == "/v1/models/embedder:predict"


def test_rest_reads_nan_tokens_as_tf_serving_writes_them():
    script = Script((200, b'{"outputs": {"ids": [[1, 2], [3, 4]], "scores": [[NaN, 1.0], [Infinity, 0.5]]}}'))
    scores = run(rest(script, predict()))["scores"]
    assert np.isnan(scores[0, 0]) and np.isposinf(scores[1, 0]) and scores[0, 1] == 1.0


GOOD = (200, {"outputs": {"ids": [[1, 2], [3, 4]], "scores": [[0.5, 0.25], [0.5, 0.25]]}})


@pytest.mark.parametrize("answer, contract, status, cause, message", [
    ((400, {"error": "Expected float, got string"}), CONTRACT, 400, "predictor_rejected",
     "the predictor rejected the request: Expected float, got string"),
    ((404, {"error": "Servable not found for request: Specific(embedder, 3)"}), CONTRACT, 503, "version_not_served",
     "TF Serving does not serve version 3 of model 'embedder' (Servable not found for request: "
     "Specific(embedder, 3))"),
    ((404, b"no such model"), UNPINNED, 502, "predictor_failed", "the predictor answered 404: no such model"),
    ((500, b""), CONTRACT, 502, "predictor_failed", "the predictor answered 500: HTTP 500"),
    ((500, {"other": 1}), CONTRACT, 502, "predictor_failed", 'the predictor answered 500: {"other": 1}'),
    ((200, {"predictions": [[1]]}), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's answer is not a columnar predict response with ids, scores (KeyError: 'outputs')"),
    ((200, {"outputs": {"ids": [[1, 2]], "scores": [["a", "b"]]}}), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's answer is not a columnar predict response with ids, scores (ValueError: could not convert "
     "string to float: 'a')"),
    ((200, {"outputs": [1, 2]}), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's answer is not a columnar predict response with ids, scores (TypeError: list indices must be "
     "integers or slices, not str)"),
    ((200, {"outputs": {"ids": [[1, 2]], "scores": [[0.5, 0.25]]}}), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's output 'ids' has shape [1, 2], expected [2, 2]: is it serving the model this bundle was "
     "trained with?"),
    ((200, {"outputs": {"ids": [[1, 2], [3, 4]], "scores": [[0.5], [0.5]]}}), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's output 'scores' has shape [2, 1], expected [2, 2]: is it serving the model this bundle was "
     "trained with?"),
])
def test_rest_failures_map_to_statuses_without_retrying(answer, contract, status, cause, message):
    script, retries = Script(answer), []
    error = rest_outcome(script, predict(contract), retries=retries)
    assert (type(error), error.status, error.cause, str(error)) == (
        VersionNotServed if cause == "version_not_served" else PredictorError, status, cause, message)
    assert len(script.seen) == 1 and retries == []
    if isinstance(error, VersionNotServed):
        assert error.version == 3


def test_rest_503_is_retried_within_the_policy_then_answered():
    script, retries = Script((503, {"error": "busy"}), GOOD), []
    assert run(rest(script, predict(), retries=retries))["ids"].tolist() == [[1, 2], [3, 4]]
    assert len(script.seen) == 2 and retries == ["predictor_unavailable"]
    script, retries = Script((503, {"error": "busy"})), []
    error = rest_outcome(script, predict(), retries=retries)
    assert (error.status, error.cause, str(error)) == (503, "predictor_unavailable", "the predictor is unavailable: busy")
    assert len(script.seen) == 3 and retries == ["predictor_unavailable"] * 2  # three tries in all


def test_rest_retries_stop_at_the_budget():
    script, retries = Script((503, {"error": "busy"})), []
    error = rest_outcome(script, predict(), retry=RetryPolicy(attempts=5, budget=0.0), retries=retries)
    assert error.status == 503 and len(script.seen) == 1 and retries == []
    script = Script((503, {"error": "busy"}))
    error = rest_outcome(script, predict(), retry=RetryPolicy(attempts=1))
    assert error.status == 503 and len(script.seen) == 1


def test_rest_timeout_is_504_and_never_retried():
    script, retries = Script((200, GOOD[1], 1.0)), []
    error = rest_outcome(script, predict(), timeout=0.2, retries=retries)
    assert (error.status, error.cause) == (504, "predictor_timeout")
    assert str(error).startswith("the predictor at http://127.0.0.1:") and str(error).endswith(
        " did not answer within 0.2s")
    assert len(script.seen) == 1 and retries == []


def test_rest_sends_float32_json_with_its_content_type_and_no_user_agent():
    script = Script(GOOD, (200, {"metadata": {}}))
    third = np.full((2, 3), 1 / 3)  # float64 in: float32 on the wire, its shortest text
    run(rest(script, lambda client: client.predict(third, CONTRACT)))
    run(rest(script, lambda client: client.metadata(3)))
    assert json.loads(script.seen[0][2])["inputs"] == [[0.33333334] * 3] * 2
    sent = [{k.lower(): v for k, v in headers.items()} for headers in script.headers]
    assert sent[0]["content-type"] == "application/json" and "content-type" not in sent[1]
    assert not any("user-agent" in headers for headers in sent)


def test_a_connection_dropped_before_the_answer_is_tried_again_then_502():
    script, retries = Script(("drop", b""), GOOD), []
    assert run(rest(script, predict(), retries=retries))["ids"].tolist() == [[1, 2], [3, 4]]
    assert len(script.seen) == 2 and retries == ["predictor_connection_lost"]
    script, retries = Script(("drop", b"")), []
    error = rest_outcome(script, predict(), retries=retries)
    assert (type(error), error.status, error.cause, str(error)) == (
        PredictorError, 502, "predictor_connection_lost", "the connection to the predictor failed: ServerDisconnectedError")
    assert len(script.seen) == 3 and retries == ["predictor_connection_lost"] * 2


def test_an_answer_that_is_not_http_is_a_502_not_retried():
    async def garbage(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        writer.close()

    async def go():
        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        retries = []
        client = RestPredictorClient(f"127.0.0.1:{port}", "embedder", retry=FAST, on_retry=retries.append)
        try:
            with pytest.raises(PredictorError) as caught:
                await client.metadata()
            return caught.value, retries
        finally:
            await client.close()
            server.close()

    error, retries = run(go())
    assert (error.status, error.cause, retries) == (502, "predictor_failed", [])
    assert str(error).startswith("the call to the predictor failed: 400, message=") and "Bad status line" in str(error)


@pytest.mark.parametrize("host, address", [
    ("tf", "tf:9000"), ("tf:8501", "tf:9000"), ("[::1]:8501", "[::1]:9000"), ("[::1]", "[::1]:9000"),
    ("::1", "[::1]:9000"), ("fe80::1:2", "[fe80::1:2]:9000"),
])
def test_the_grpc_address_is_the_predictor_hosts_name_on_the_grpc_port(host, address):
    assert grpc_address(host, 9000) == address


def test_error_bodies_are_shown_cut_and_readable():
    script = Script((500, b"x" * 600))
    assert str(rest_outcome(script, predict())) == "the predictor answered 500: " + "x" * 500
    script = Script((500, b"bad \xff byte"))
    assert str(rest_outcome(script, predict())) == "the predictor answered 500: bad \ufffd byte"


def test_rest_client_connection_settings():
    plain = RestPredictorClient("tf:8501", "embedder")
    assert (plain.base_url, plain.address, plain.timeout, plain.retry.attempts) == ("http://tf:8501", "tf:8501", 5.0, 3)
    assert RestPredictorClient("tf:8443", "embedder", use_ssl=True).base_url == "https://tf:8443"

    async def session():
        client = RestPredictorClient("tf:8501", "embedder", timeout=1.5, max_connections=8)
        await client.close()  # nothing opened yet: nothing to close
        made = client._client()
        settings = (made.connector.limit, made.connector._keepalive_timeout, made.timeout.total,
                    made.timeout.sock_connect)
        await client.close()
        return settings, made.closed

    assert run(session()) == ((8, 30, 1.5, 1.5), True)
    assert RestPredictorClient("tf:8501", "embedder").max_connections == 64

    async def connect_limit():
        client = RestPredictorClient("tf:8501", "embedder")
        limit = client._client().timeout.sock_connect
        await client.close()
        return limit

    assert run(connect_limit()) == 2.0  # connect within 2 s, answer within 5


def test_rest_model_status_and_metadata():
    status = Script((200, {"model_version_status": [{"version": "2", "state": "AVAILABLE"}, {"version": "1"}]}))
    assert run(rest(status, lambda c: c.version_states())) == {2: "AVAILABLE", 1: "UNKNOWN"}
    assert status.seen == [("GET", "/v1/models/embedder", b"")]
    assert run(rest(Script((404, {"error": "not found"})), lambda c: c.version_states())) == {}
    for answer, status, cause, message in [
            ((500, {"error": "boom"}), 502, "predictor_failed", "model status answered 500: boom"),
            ((200, {"model_version_status": [{"state": "AVAILABLE"}]}), 502, "predictor_failed",
             "model status is not TF Serving's format ('version')"),
            ((503, {"error": "busy"}), 503, "predictor_unavailable", "the predictor is unavailable: busy")]:
        script, retries = Script(answer), []
        error = rest_outcome(script, lambda c: c.version_states(), retries=retries)
        assert (error.status, error.cause, str(error)) == (status, cause, message)
        assert len(script.seen) == 1 and retries == []  # readiness is never retried
    meta = Script((200, {"model_spec": {"name": "embedder"}, "metadata": {}}))
    assert run(rest(meta, lambda c: c.metadata(2))) == {"model_spec": {"name": "embedder"}, "metadata": {}}
    run(rest(meta, lambda c: c.metadata()))
    assert [p for _, p, _ in meta.seen] == ["/v1/models/embedder/versions/2/metadata", "/v1/models/embedder/metadata"]
    error = rest_outcome(Script((404, {"error": "nope"})), lambda c: c.metadata(2))
    assert (error.status, str(error)) == (502, "model metadata answered 404: nope")


# -- gRPC ------------------------------------------------------------------------------------------------------


def tensor(values, dtype=pb.DT_FLOAT, shape=None, field=None):
    """A TensorProto in tensor_content, or in a typed field (``field``) as TF Serving's Predict writes it."""
    values = np.asarray(values)
    if field is None:
        return tensor_proto(values, dtype)
    proto = pb.TensorProto(dtype=dtype)
    getattr(proto, field).extend(values.ravel().tolist())
    proto.tensor_shape.dim.extend(pb.TensorShapeProto.Dim(size=n) for n in (shape or values.shape))
    return proto


def grpc_answer(**outputs):
    response = pb.PredictResponse()
    for name, proto in outputs.items():
        response.outputs[name].CopyFrom(proto)
    return response


GOOD_GRPC = grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64), scores=tensor([[0.5, 0.25], [0.5, 0.25]]))


async def served_grpc(script: Script, work, *, timeout=2.0, retry=FAST, retries=None, address=None):
    """Serve ``script`` as TF Serving's gRPC API on a free loopback port and run ``work(client)``."""

    async def answer(request, context):
        script.seen.append(request)
        reply = script.next()
        if isinstance(reply, tuple):
            if reply[0] == "sleep":
                await asyncio.sleep(reply[1])
                return reply[2]
            await context.abort(*reply)
        return reply

    def method(request_type):
        return grpc.unary_unary_rpc_method_handler(answer, request_deserializer=request_type.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            PREDICT.rsplit("/", 1)[1]: method(pb.PredictRequest),
            GET_MODEL_METADATA.rsplit("/", 1)[1]: method(pb.GetModelMetadataRequest)}),
        grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
            GET_MODEL_STATUS.rsplit("/", 1)[1]: method(pb.GetModelStatusRequest)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcPredictorClient(address or f"127.0.0.1:{port}", "embedder", timeout=timeout, retry=retry,
                                 on_retry=(retries.append if retries is not None else None))
    try:
        return await work(client)
    finally:
        await client.close()
        await server.stop(None)


def grpc_outcome(script, work, **options):
    try:
        return run(served_grpc(script, work, **options))
    except PredictorError as exc:
        return exc


def test_grpc_predict_pins_the_version_filters_the_outputs_and_sends_bytes():
    script = Script(grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64), scores=tensor([[0.5, 0.25], [1, 2]]),
                                embedding=tensor([[0.0], [0.0]])))
    arrays = run(served_grpc(script, predict()))
    assert arrays.keys() == {"ids", "scores"}
    assert arrays["ids"].dtype == np.int64 and arrays["ids"].tolist() == [[1, 2], [3, 4]]
    assert arrays["scores"].dtype == np.float32 and arrays["scores"].tolist() == [[0.5, 0.25], [1.0, 2.0]]
    (request,) = script.seen
    assert (request.model_spec.name, request.model_spec.signature_name) == ("embedder", "candidates")
    assert request.model_spec.HasField("version") and request.model_spec.version.value == 3
    assert list(request.output_filter) == ["ids", "scores"]
    sent = request.inputs["features"]
    assert sent.dtype == pb.DT_FLOAT and [d.size for d in sent.tensor_shape.dim] == [2, 3]
    assert sent.tensor_content == FEATURES.tobytes() and not sent.float_val
    run(served_grpc(script, predict(UNPINNED)))
    assert not script.seen[-1].model_spec.HasField("version")


def test_grpc_reads_typed_fields_as_tensorflow_does():
    # TF Serving's Predict answers with typed fields; a last value repeats to fill the shape.
    script = Script(grpc_answer(ids=tensor([7], pb.DT_INT64, shape=(2, 2), field="int64_val"),
                                scores=tensor([0.5, 0.25, 0.125], shape=(2, 2), field="float_val")))
    arrays = run(served_grpc(script, predict()))
    assert arrays["ids"].tolist() == [[7, 7], [7, 7]]
    assert arrays["scores"].tolist() == [[0.5, 0.25], [0.125, 0.125]]


@pytest.mark.parametrize("reply, contract, status, cause, message", [
    ((grpc.StatusCode.INVALID_ARGUMENT, "input size does not match"), CONTRACT, 400, "predictor_rejected",
     "the predictor rejected the request: input size does not match"),
    ((grpc.StatusCode.FAILED_PRECONDITION, "Serving signature key not found"), CONTRACT, 400, "predictor_rejected",
     "the predictor rejected the request: Serving signature key not found"),
    ((grpc.StatusCode.NOT_FOUND, "Servable not found"), CONTRACT, 503, "version_not_served",
     "TF Serving does not serve version 3 of model 'embedder' (Servable not found)"),
    ((grpc.StatusCode.NOT_FOUND, "no model"), UNPINNED, 502, "predictor_failed",
     "the predictor answered NOT_FOUND: no model"),
    ((grpc.StatusCode.INTERNAL, "oops"), CONTRACT, 502, "predictor_failed", "the predictor answered INTERNAL: oops"),
    (grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64)), CONTRACT, 502, "predictor_bad_answer",
     "the predictor's answer has no output 'scores' (it has: ids)"),
    (grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64), scores=tensor([[0.5, 0.25], [1, 2]], pb.DT_DOUBLE)),
     CONTRACT, 502, "predictor_bad_answer",
     "the predictor's output 'scores' cannot be read: it is DT_DOUBLE, the bundle expects DT_FLOAT"),
    (grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64), scores=tensor([0.5] * 5, shape=(2, 2),
                                                                          field="float_val")),
     CONTRACT, 502, "predictor_bad_answer",
     "the predictor's output 'scores' cannot be read: the tensor holds 5 values for shape [2, 2]"),
    (grpc_answer(ids=tensor([[1, 2, 3], [3, 4, 5]], pb.DT_INT64), scores=tensor([[0.5, 0.25], [1, 2]])),
     CONTRACT, 502, "predictor_bad_answer",
     "the predictor's output 'ids' has shape [2, 3], expected [2, 2]: is it serving the model this bundle was "
     "trained with?"),
])
def test_grpc_failures_map_to_statuses_without_retrying(reply, contract, status, cause, message):
    script, retries = Script(reply), []
    error = grpc_outcome(script, predict(contract), retries=retries)
    assert (error.status, error.cause, str(error)) == (status, cause, message)
    assert isinstance(error, VersionNotServed) == (cause == "version_not_served")
    if isinstance(error, VersionNotServed):
        assert error.version == 3  # the retry on another version reads it
    assert len(script.seen) == 1 and retries == []


def test_a_grpc_answer_missing_an_output_names_every_output_it_has():
    reply = grpc_answer(ids=tensor([[1, 2], [3, 4]], pb.DT_INT64), extra=tensor([[1.0]]), more=tensor([[2.0]]))
    error = grpc_outcome(Script(reply), predict(CONTRACT), retries=[])
    assert str(error) == "the predictor's answer has no output 'scores' (it has: extra, ids, more)"


def test_grpc_unavailable_is_retried_within_the_policy_then_answered():
    busy = (grpc.StatusCode.UNAVAILABLE, "the batch queue is full")
    script, retries = Script(busy, GOOD_GRPC), []
    assert run(served_grpc(script, predict(), retries=retries))["ids"].tolist() == [[1, 2], [3, 4]]
    assert len(script.seen) == 2 and retries == ["predictor_unavailable"]
    script, retries = Script(busy), []
    error = grpc_outcome(script, predict(), retries=retries)
    assert (error.status, error.cause) == (503, "predictor_unavailable")
    assert str(error).endswith("is unavailable (the batch queue is full)")
    assert len(script.seen) == 3 and retries == ["predictor_unavailable"] * 2


def test_grpc_deadline_is_504_and_never_retried():
    script, retries = Script(("sleep", 1.0, GOOD_GRPC)), []
    error = grpc_outcome(script, predict(), timeout=0.2, retries=retries)
    assert (error.status, error.cause) == (504, "predictor_timeout")
    assert str(error).endswith("did not answer within 0.2s")
    assert len(script.seen) == 1 and retries == []


@pytest.mark.parametrize("client_type, scheme", [(RestPredictorClient, "http://"), (GrpcPredictorClient, "")],
                         ids=["rest", "grpc"])
def test_an_unreachable_predictor_is_503_after_every_try(client_type, scheme):
    port, retries = closed_port(), []
    client = client_type(f"127.0.0.1:{port}", "embedder", retry=FAST, on_retry=retries.append)

    async def call():
        try:
            return await client.predict(FEATURES, CONTRACT)
        finally:
            await client.close()

    with pytest.raises(PredictorError) as caught:
        run(call())
    assert (caught.value.status, caught.value.cause) == (503, "predictor_unreachable")
    assert str(caught.value).startswith(f"the predictor at {scheme}127.0.0.1:{port} is unreachable (")
    assert retries == ["predictor_unreachable"] * 2
    if client_type is RestPredictorClient:  # the operating system's words, not aiohttp's longer wrapping
        assert str(caught.value).endswith(f"unreachable ([Errno 111] Connect call failed ('127.0.0.1', {port}))")


def status_reply(*pairs):
    response = pb.GetModelStatusResponse()
    for version, state in pairs:
        response.model_version_status.add(version=version, state=state)
    return response


def test_grpc_model_status():
    script = Script(status_reply((2, pb.ModelVersionStatus.AVAILABLE), (1, pb.ModelVersionStatus.LOADING), (4, 99)))
    assert run(served_grpc(script, lambda c: c.version_states())) == {2: "AVAILABLE", 1: "LOADING", 4: "UNKNOWN"}
    (request,) = script.seen
    assert request.model_spec.name == "embedder" and not request.model_spec.HasField("version")
    assert run(served_grpc(Script((grpc.StatusCode.NOT_FOUND, "no model")), lambda c: c.version_states())) == {}
    script = Script((grpc.StatusCode.UNAVAILABLE, "restarting"))
    error = grpc_outcome(script, lambda c: c.version_states())
    assert error.status == 503 and len(script.seen) == 1  # readiness is never retried
    error = grpc_outcome(Script((grpc.StatusCode.INTERNAL, "boom")), lambda c: c.version_states())
    assert (error.status, str(error)) == (502, "model status answered INTERNAL: boom")


def metadata_reply(type_url=SIGNATURE_DEF_MAP_URL, key="signature_def"):
    signatures = pb.SignatureDefMap()
    signature = signatures.signature_def["candidates"]
    signature.method_name = "tensorflow/serving/predict"
    info = signature.inputs["features"]
    info.name, info.dtype = "serving_features:0", pb.DT_FLOAT
    info.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=-1), pb.TensorShapeProto.Dim(size=3)])
    response = pb.GetModelMetadataResponse()
    response.model_spec.name = "embedder"
    response.model_spec.version.value = 3
    response.metadata[key].type_url = type_url
    response.metadata[key].value = signatures.SerializeToString()
    return response


def test_grpc_metadata_in_the_rest_apis_json_form():
    script = Script(metadata_reply())
    metadata = run(served_grpc(script, lambda c: c.metadata(3)))
    assert metadata["model_spec"] == {"name": "embedder", "version": "3"}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["candidates"]
    assert signature["inputs"]["features"] == {"name": "serving_features:0", "dtype": "DT_FLOAT",
                                               "tensor_shape": {"dim": [{"size": "-1", "name": ""},
                                                                        {"size": "3", "name": ""}],
                                                                "unknown_rank": False}}
    assert signature["outputs"] == {} and signature["method_name"] == "tensorflow/serving/predict"
    (request,) = script.seen
    assert list(request.metadata_field) == ["signature_def"] and request.model_spec.version.value == 3
    assert request.model_spec.signature_name == ""  # metadata is asked of the model, not of one signature

    async def closed_and_opened_again(client):
        first = await client.metadata(3)
        await client.close()
        closed = client._channel
        return first == await client.metadata(3), closed  # a closed client opens a new channel when used again

    assert run(served_grpc(Script(metadata_reply()), closed_and_opened_again)) == (True, None)
    for reply, message in [(metadata_reply(type_url="type.googleapis.com/other"),
                            f"model metadata has no {SIGNATURE_DEF_MAP_URL} under 'signature_def'"),
                           (metadata_reply(key="other"),
                            f"model metadata has no {SIGNATURE_DEF_MAP_URL} under 'signature_def'"),
                           ((grpc.StatusCode.NOT_FOUND, "no version 3"), "model metadata answered NOT_FOUND: "
                                                                         "no version 3")]:
        error = grpc_outcome(Script(reply), lambda c: c.metadata(3))
        assert (error.status, str(error)) == (502, message)
    # what the start-up check makes of it: the outputs are missing
    assert metadata_problems(metadata, CONTRACT) == [
        "signature 'candidates' has no output 'ids' (it has: )", "signature 'candidates' has no output 'scores' "
                                                                 "(it has: )"]


def test_tensor_bytes_both_ways():
    for dtype, numpy_type in ((pb.DT_FLOAT, "<f4"), (pb.DT_DOUBLE, "<f8"), (pb.DT_INT32, "<i4"),
                              (pb.DT_INT64, "<i8")):
        values = np.arange(6).reshape(2, 3) * 1.5 if dtype in (pb.DT_FLOAT, pb.DT_DOUBLE) else \
            np.arange(6).reshape(2, 3) - 2
        proto = tensor_proto(values, dtype)
        assert proto.tensor_content == values.astype(numpy_type).tobytes()
        back = tensor_array(proto)
        assert back.dtype == np.dtype(numpy_type) and back.tolist() == values.tolist()
    empty = pb.TensorProto(dtype=pb.DT_INT64)  # no values at all: zeros, as TensorFlow reads it
    empty.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=2)])
    assert tensor_array(empty).tolist() == [0, 0]
    assert tensor_array(tensor([], pb.DT_FLOAT, shape=(0, 3), field="float_val")).shape == (0, 3)


@pytest.mark.parametrize("proto, message", [
    (pb.TensorProto(dtype=pb.DT_FLOAT, tensor_shape=pb.TensorShapeProto(unknown_rank=True)),
     "the tensor has an unknown rank"),
    (pb.TensorProto(dtype=pb.DT_STRING), "the tensor is DT_STRING, not one of DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64"),
    (pb.TensorProto(dtype=19), "the tensor is DataType 19, not one of DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64"),
    (pb.TensorProto(dtype=pb.DT_FLOAT, tensor_content=np.zeros(3, "<f4").tobytes(),
                    tensor_shape=pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=2)] * 2)),
     "the tensor holds 3 values for shape [2, 2]"),
])
def test_tensors_that_cannot_be_read_are_named(proto, message):
    with pytest.raises(ValueError) as caught:
        tensor_array(proto)
    assert str(caught.value) == message
    assert type_name(pb.DT_INT64) == "DT_INT64"


# -- what both share -------------------------------------------------------------------------------------------


def test_connect_picks_the_transport_and_refuses_others():
    rest_client = connect("rest", "embedder-predictor.default", "embedder", timeout=3.0)
    assert isinstance(rest_client, RestPredictorClient)
    assert (rest_client.base_url, rest_client.timeout) == ("http://embedder-predictor.default", 3.0)
    grpc_client = connect("grpc", "embedder-predictor.default:80", "embedder", grpc_port=9001)
    assert isinstance(grpc_client, GrpcPredictorClient) and grpc_client.address == "embedder-predictor.default:9001"
    assert (rest_client.model_name, grpc_client.model_name, grpc_client.timeout) == ("embedder", "embedder", 5.0)
    assert connect("grpc", "tf", "embedder", timeout=2.0).timeout == 2.0
    assert connect("grpc", "tf", "embedder").address == "tf:9000"  # TF Serving's gRPC port in KServe's runtime
    with pytest.raises(ValueError) as caught:
        connect("thrift", "host", "embedder")
    assert str(caught.value) == "predictor api must be one of grpc, rest, auto, got 'thrift'"


def test_backoff_is_full_jitter_under_a_growing_cap(monkeypatch):
    import transformer.predictor.base as module

    monkeypatch.setattr(module.random, "uniform", lambda low, high: (low, high))
    policy = RetryPolicy(base_delay=0.05, max_delay=0.5)
    assert [policy.delay(n) for n in range(5)] == [(0.0, 0.05), (0.0, 0.1), (0.0, 0.2), (0.0, 0.4), (0.0, 0.5)]
    assert RetryPolicy() == RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.5, budget=2.0)


def test_the_wait_between_tries_never_exceeds_the_budget(monkeypatch):
    import transformer.predictor.base as module

    pauses = []

    async def sleep(seconds):
        pauses.append(seconds)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)
    monkeypatch.setattr(module.random, "uniform", lambda low, high: high)
    client = module.PredictorClient("nowhere", "embedder", retry=RetryPolicy(attempts=10, base_delay=0.3,
                                                                             max_delay=1.0, budget=1.0))
    tries = []

    async def attempt():
        tries.append(1)
        raise module.Retryable(PredictorError(503, "busy", "predictor_unavailable"))

    with pytest.raises(PredictorError, match="^busy$"):
        run(client._retrying(attempt))
    assert pauses == [0.3, 0.6, pytest.approx(0.1)] and len(tries) == 4  # 0.3 + 0.6 + the 0.1 left


SIGNATURE_METADATA = {"metadata": {"signature_def": {"signature_def": {"candidates": {
    "inputs": {"features": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}, {"size": "3"}]}}},
    "outputs": {"ids": {"dtype": "DT_INT64", "tensor_shape": {"dim": [{"size": "-1"}, {"size": "2"}]}},
                "scores": {"dtype": "DT_FLOAT", "tensor_shape": {"unknown_rank": True}}}}}}}}


def test_metadata_that_fits_the_contract_has_no_problems_and_each_misfit_is_named():
    assert metadata_problems(SIGNATURE_METADATA, CONTRACT) == []  # an unknown rank fits any shape
    assert metadata_problems({"metadata": {}}, CONTRACT) == ["the predictor's metadata has no signature_def map"]
    assert metadata_problems([], CONTRACT) == ["the predictor's metadata has no signature_def map"]
    other = Contract("serving_default", "features", 3, CONTRACT.outputs)
    assert metadata_problems(SIGNATURE_METADATA, other) == [
        "the predictor's model has no signature 'serving_default' (it has: candidates)"]
    two = {"metadata": {"signature_def": {"signature_def": {"b": {}, "a": {}}}}}
    assert metadata_problems(two, other) == ["the predictor's model has no signature 'serving_default' (it has: a, b)"]
    wide = Contract("candidates", "features", 4, {"ids": ("DT_FLOAT", 2), "scores": ("DT_FLOAT", 2),
                                                  "extra": ("DT_FLOAT", 1)})
    assert metadata_problems(SIGNATURE_METADATA, wide) == [
        "input 'features' is DT_FLOAT [-1, 3], the bundle expects DT_FLOAT [-1, 4]",
        "output 'ids' is DT_INT64 [-1, 2], the bundle expects DT_FLOAT [-1, 2]",
        "signature 'candidates' has no output 'extra' (it has: ids, scores)"]
    # TF Serving leaves out a dimension's size when it is unknown (-1), and the dimensions of a scalar
    sizes = {"metadata": {"signature_def": {"signature_def": {"candidates": {
        "inputs": {"features": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{}, {"size": "3"}]}}},
        "outputs": {"ids": {"dtype": "DT_INT64", "tensor_shape": {}}, "scores": {"dtype": "DT_FLOAT"}}}}}}}
    assert metadata_problems(sizes, CONTRACT) == ["output 'ids' is DT_INT64 [], the bundle expects DT_INT64 [-1, 2]",
                                                  "output 'scores' is DT_FLOAT [], the bundle expects DT_FLOAT [-1, 2]"]


@pytest.mark.parametrize("dtype, field, numpy_type", [(pb.DT_FLOAT, "float_val", "<f4"),
                                                      (pb.DT_DOUBLE, "double_val", "<f8")])
def test_floats_in_the_repeated_field_are_read_from_their_wire_bytes_exactly(dtype, field, numpy_type):
    """TF Serving answers Predict in float_val: read from the packed bytes, every value as the field holds it,
    whatever other fields stand before or after it; a short field still repeats its last value."""
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.standard_normal(300), [0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38]]).astype(numpy_type)
    proto = pb.TensorProto(dtype=dtype, version_number=3)
    proto.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=2), pb.TensorShapeProto.Dim(size=153)])
    getattr(proto, field).extend(values.tolist())
    proto.int64_val.extend([1, 2, 3])  # a field after it, as a sender might fill
    back = tensor_array(proto)
    assert back.dtype == np.dtype(numpy_type) and back.shape == (2, 153)
    assert back.ravel().view(f"u{back.itemsize}").tolist() == values.view(f"u{values.itemsize}").tolist()
    short = pb.TensorProto(dtype=dtype)
    short.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=4)])
    getattr(short, field).extend([1.5, 2.5])
    assert tensor_array(short).tolist() == [1.5, 2.5, 2.5, 2.5]
    none = pb.TensorProto(dtype=dtype)
    none.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=2)])
    assert tensor_array(none).tolist() == [0.0, 0.0]


def test_tensors_without_values_and_long_packed_runs_keep_their_types():
    for dtype, numpy_type in ((pb.DT_FLOAT, "<f4"), (pb.DT_DOUBLE, "<f8"), (pb.DT_INT32, "<i4"), (pb.DT_INT64, "<i8")):
        none = pb.TensorProto(dtype=dtype)
        none.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=2)])
        assert tensor_array(none).dtype == np.dtype(numpy_type)
        empty = pb.TensorProto(dtype=dtype)
        empty.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=0), pb.TensorShapeProto.Dim(size=3)])
        assert tensor_array(empty).dtype == np.dtype(numpy_type) and tensor_array(empty).shape == (0, 3)
    small = pb.TensorProto(dtype=pb.DT_INT32)
    small.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=3)])
    small.int_val.extend([7, -1, 2])
    assert tensor_array(small).dtype == np.dtype("<i4") and tensor_array(small).tolist() == [7, -1, 2]
    # 4,096 floats: a 16,384-byte run, whose length takes three bytes (0x80 0x80 0x01) to say
    values = np.arange(4096, dtype="<f4") / 7
    long = pb.TensorProto(dtype=pb.DT_FLOAT)
    long.tensor_shape.dim.extend([pb.TensorShapeProto.Dim(size=4096)])
    long.float_val.extend(values.tolist())
    assert tensor_array(long).tolist() == values.tolist()

"""Bad input, failing predictors, tampered artifacts, shutdown: statuses, messages, recovery."""

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import (
    MODEL_NAME, assert_same_predictions, bundle_path, edit_manifest, poison, rewrite_digest, version_dir, wait_until,
)
from fault_proxy import FaultProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import json_documents, valid_rows

from model.synthetic import SYNTHETIC_FEATURES
from scripts.localstack import ROOT, LocalStack


def predict_url(base: str) -> str:
    return f"{base}/v1/models/{MODEL_NAME}:predict"


def valid_body(raw_users, n=1) -> dict:
    return {"instances": raw_users[:n].tolist()}


def assert_still_serving(base: str, raw_users) -> None:
    response = httpx.post(predict_url(base), json=valid_body(raw_users), timeout=30)
    assert response.status_code == 200, response.text


# -- input ---------------------------------------------------------------------------------------

def row_with(offline, raw_users, index, value):
    row = raw_users[0].tolist()
    row[index] = value
    return row


MALFORMED = [
    # (name, body bytes or callable(offline, raw_users) -> bytes, content-type, status, message fragment)
    ("not JSON", b'{"instances": [1, 2', "application/json", 400, "the body is not valid JSON"),
    ("empty body", b"", "application/json", 400, "the body is empty"),
    ("no instances", b'{"rows": []}', "application/json", 400, "the body has no 'instances' field"),
    ("instances not a list", b'{"instances": 3}', "application/json", 400, "'instances' must be a list of rows"),
    ("empty list", b'{"instances": []}', "application/json", 400, "'instances' is empty"),
    ("top level list", b"[[1, 2]]", "application/json", 400, "the body must be a JSON object"),
    ("row of wrong length", b'{"instances": [[1, 2, 3]]}', "application/json", 400,
     "instances[0]: a list row must have 12 values in this order: sessions_30d"),
    ("unknown feature", lambda o, r: json.dumps({"instances": [{**dict(zip(o.feature_names, r[0].tolist())), "shoe_size": 3}]}),
     "application/json", 400, "instances[0]: unknown feature(s) 'shoe_size'"),
    ("missing feature", lambda o, r: json.dumps({"instances": [dict(list(zip(o.feature_names, r[0].tolist()))[1:])]}),
     "application/json", 400, "instances[0]: missing feature(s) 'sessions_30d'"),
    ("string", lambda o, r: json.dumps({"instances": [r[0].tolist(), row_with(o, r, 3, "12.5")]}),
     "application/json", 400, "instances[1]: feature 'spend_90d' must be a number, got a string '12.5'"),
    ("boolean", lambda o, r: json.dumps({"instances": [row_with(o, r, 0, True)]}),
     "application/json", 400, "instances[0]: feature 'sessions_30d' must be a number, got a boolean"),
    ("null", lambda o, r: json.dumps({"instances": [row_with(o, r, 11, None)]}),
     "application/json", 400, "instances[0]: feature 'reviews_written' must be a number, got null"),
    ("NaN", lambda o, r: json.dumps({"instances": [row_with(o, r, 4, math.nan)]}),
     "application/json", 400, "instances[0]: feature 'avg_order_value' must be a finite number, got nan"),
    ("Infinity", lambda o, r: json.dumps({"instances": [r[0].tolist(), r[1].tolist(), row_with(o, r, 5, -math.inf)]}),
     "application/json", 400, "instances[2]: feature 'days_since_last_order' must be a finite number, got -inf"),
    ("nested list", lambda o, r: json.dumps({"instances": [row_with(o, r, 2, [1, 2])]}),
     "application/json", 400, "instances[0]: feature 'orders_90d' must be a number, got a list"),
    ("too large for float32", lambda o, r: json.dumps({"instances": [row_with(o, r, 3, 1e300)]}),
     "application/json", 400, "feature 'spend_90d' must be a number within float32 range"),
    ("garbage without content type", b"instances=1,2,3", None, 400, "the body is not valid JSON"),
    ("too many rows", lambda o, r: json.dumps({"instances": [r[0].tolist()] * 1025}),
     "application/json", 413, "'instances' has 1025 rows, at most 1024"),
]


@pytest.mark.parametrize("name, body, content_type, status, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_named_then_service_goes_on(stack, offline, raw_users, name, body, content_type,
                                                         status, fragment):
    payload = body(offline, raw_users) if callable(body) else body
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(predict_url(stack.transformer_url), content=payload, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert response.headers.get("x-request-id")
    assert_still_serving(stack.transformer_url, raw_users)


def test_valid_body_without_content_type_is_served(stack, raw_users):
    response = httpx.post(predict_url(stack.transformer_url), content=json.dumps(valid_body(raw_users)).encode(),
                          headers={"content-type": ""}, timeout=30)
    assert response.status_code == 200, response.text


def test_too_large_body_is_refused_without_being_read(stack, raw_users):
    """Content-Length says 100 MB, a few bytes follow: 413 comes at once, not after a read timeout."""
    with socket.create_connection(("127.0.0.1", stack.transformer_port), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {100 * 1024 * 1024}\r\n\r\n{{\"instances\": [".encode()
        )
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", reply).group(1)):
            chunk = conn.recv(65536)  # headers and body may come in separate segments
            assert chunk, reply
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "at most 8388608 are accepted" in reply
    assert time.monotonic() - started < 5
    assert_still_serving(stack.transformer_url, raw_users)


def test_chunked_body_past_the_limit_is_refused(stack, raw_users):
    def chunks():
        yield b'{"instances": ['
        for _ in range(9 * 1024):
            yield (b"[" + b",".join([b"1.0"] * 12) + b"],") * 20  # ~1 KB

    response = httpx.post(predict_url(stack.transformer_url), content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "more than 8388608 bytes" in response.json()["error"]
    assert_still_serving(stack.transformer_url, raw_users)


json_values = json_documents(["instances", "inputs", "sessions_30d", "spend_90d", "x"], max_leaves=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values, raw=st.binary(max_size=64), as_bytes=st.booleans())
def test_generated_garbage_never_yields_5xx(stack, doc, raw, as_bytes):
    body = raw if as_bytes else json.dumps(doc, allow_nan=True).encode()
    response = httpx.post(predict_url(stack.transformer_url), content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code < 500, (body[:200], response.text)


FEATURE_NAMES = list(SYNTHETIC_FEATURES)  # the session build's features


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_and_rows=valid_rows(FEATURE_NAMES, max_rows=4))
def test_generated_valid_requests_are_answered_as_offline(stack, offline, request_and_rows):
    """Valid rows of any values in float32 range, as lists or objects in any key order: 200 and the offline answer."""
    assert offline.feature_names == FEATURE_NAMES
    doc, rows = request_and_rows
    response = httpx.post(predict_url(stack.transformer_url), json=doc, timeout=30)
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"], offline.predictions(np.array(rows)))


def test_request_id_is_echoed_and_logged(stack):
    response = httpx.post(predict_url(stack.transformer_url), content=b'{"instances": [[1]]}',
                          headers={"x-request-id": "req-7f3a", "content-type": "application/json"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "req-7f3a"
    deadline = time.monotonic() + 5
    while "req-7f3a" not in stack.log_tail("transformer", 200) and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(l for l in stack.log_tail("transformer", 200).splitlines() if "req-7f3a" in l)
    event = json.loads(line[line.index("{"):])
    assert event == {**event, "event": "request_failed", "request_id": "req-7f3a", "status": 400,
                     "cause": "invalid_row"}


def test_metrics_count_outcomes_rows_drift_and_segments(stack, raw_users):
    far = raw_users[0].copy()
    far[3] = 1e9  # spend far above anything seen in training
    httpx.post(predict_url(stack.transformer_url), json={"instances": [far.tolist()]}, timeout=30)
    httpx.post(predict_url(stack.transformer_url), json={"instances": [[1]]}, timeout=30)
    text = httpx.get(f"{stack.transformer_url}/metrics").text
    assert 'embedder_requests_total{cause="ok",model_name="embedder",model_version="1",outcome="ok"}' in text
    assert ('embedder_requests_total{cause="invalid_row",model_name="embedder",model_version="1",'
            'outcome="client_error"}') in text
    assert ('embedder_feature_out_of_range_total{feature="spend_90d",model_name="embedder",model_version="1",'
            'side="above"}') in text
    assert 'embedder_segment_assignments_total{model_name="embedder",model_version="1",segment=' in text
    assert 'embedder_model_version{model_name="embedder"} 1.0' in text
    assert "embedder_request_rows_bucket" in text and "embedder_predictor_request_seconds_bucket" in text
    assert "request_preprocess_seconds_bucket" in text  # KServe's own histograms stay


# -- the predictor -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxied(stack, tmp_path_factory):
    """A transformer whose predictor is a fault proxy in front of the real one."""
    proxy = FaultProxy(stack.predictor_url).start()
    transformer = LocalStack(build=stack.build, predictor_port=proxy.port, log_dir=tmp_path_factory.mktemp("proxied"),
                             transformer_args=["--predictor_api", "rest", "--predictor_timeout", "1",
                                               "--predictor_retries", "2"])
    transformer.start_transformer()
    yield proxy, transformer.transformer_url
    transformer.stop()
    proxy.close()


def timed_post(base, raw_users):
    started = time.monotonic()
    response = httpx.post(predict_url(base), json=valid_body(raw_users), timeout=30)
    return response, time.monotonic() - started


@pytest.mark.parametrize(
    "mode, status, fragment",
    [
        (("status", 400, '{"error": "Matrix size-incompatible"}'), 400,
         "the predictor rejected the request: Matrix size-incompatible"),
        (("status", 500, '{"error": "Internal: kernel crashed"}'), 502, "the predictor answered 500: Internal: kernel crashed"),
        # Calls are pinned to the bundle's version: a 404 means TF Serving does not serve it (any more).
        (("status", 404, '{"error": "Servable not found for request: Specific(embedder, 1)"}'), 503,
         "TF Serving does not serve version 1 of model 'embedder' (Servable not found"),
        (("status", 503, '{"error": "overloaded"}'), 503, "the predictor is unavailable: overloaded"),
        (("status", 200, '{"predictions": []}'), 502, "not a columnar predict response"),
        (("drop",), 502, "the connection to the predictor failed"),
        (("delay", 3.0), 504, "did not answer within 1s"),
    ],
)
def test_predictor_failures_map_to_statuses_then_recover(proxied, raw_users, mode, status, fragment):
    proxy, base = proxied
    proxy.mode = mode
    try:
        response, elapsed = timed_post(base, raw_users)
    finally:
        proxy.mode = ("forward",)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert elapsed < 4.0
    assert_still_serving(base, raw_users)


def test_503_is_retried_with_backoff(proxied, raw_users):
    proxy, base = proxied
    before = proxy.requests
    proxy.mode = ("status", 503, '{"error": "busy"}')
    try:
        response, _ = timed_post(base, raw_users)
    finally:
        proxy.mode = ("forward",)
    assert response.status_code == 503
    assert proxy.requests - before == 3  # the first try and --predictor_retries 2
    metrics = httpx.get(f"{base}/metrics").text
    assert 'embedder_predictor_retries_total{model_name="embedder",reason="predictor_unavailable"}' in metrics


def test_connection_refused_answers_503_at_once_and_readiness_follows(proxied, raw_users):
    proxy, base = proxied
    proxy.stop()
    try:
        response, elapsed = timed_post(base, raw_users)
        assert response.status_code == 503
        assert "unreachable" in response.json()["error"]
        assert elapsed < 2.0
        deadline = time.monotonic() + 5  # the transformer looks at TF Serving every second
        while httpx.get(f"{base}/v1/models/{MODEL_NAME}").status_code != 503:
            assert time.monotonic() < deadline, "readiness did not turn false"
            time.sleep(0.1)
        assert httpx.get(f"{base}/").status_code == 200  # alive all the same
    finally:
        proxy.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/v1/models/{MODEL_NAME}").status_code != 200:
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.2)
    assert_still_serving(base, raw_users)


def test_predictor_killed_mid_stream_and_restarted(build_dir, raw_users, tmp_path):
    stack = LocalStack(build=build_dir, predictor="local", log_dir=tmp_path)
    stack.start()
    statuses: list[int] = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                statuses.append(client.post(predict_url(stack.transformer_url), json=valid_body(raw_users)).status_code)

    worker = threading.Thread(target=hammer)
    try:
        worker.start()
        wait_until(lambda: statuses.count(200) >= 20, 30, "answers before the predictor is killed")
        stack.stop_process("predictor")
        down = len(statuses)
        wait_until(lambda: 503 in statuses[down:], 30, "a 503 while the predictor is down")
        stack.start_predictor()  # same port
        back = len(statuses)
        wait_until(lambda: statuses[back:].count(200) >= 20, 30, "answers after the predictor is back")
    finally:
        stop.set()
        worker.join()
        try:
            assert set(statuses) <= {200, 502, 503}, set(statuses)
            assert statuses[-1] == 200  # failed while down, recovered without a restart
            assert_still_serving(stack.transformer_url, raw_users)
        finally:
            stack.stop()


def test_sigterm_lets_in_flight_requests_finish(stack, raw_users, tmp_path):
    proxy = FaultProxy(stack.predictor_url).start()
    transformer = LocalStack(build=stack.build, predictor_port=proxy.port, log_dir=tmp_path,
                             transformer_args=["--predictor_api", "rest", "--graceful_shutdown_seconds", "10"])
    transformer.start_transformer()
    result = {}
    try:
        proxy.mode = ("delay", 1.5)

        def slow():
            result["response"] = httpx.post(predict_url(transformer.transformer_url), json=valid_body(raw_users),
                                            timeout=30)

        calls = proxy.requests
        worker = threading.Thread(target=slow)
        worker.start()
        wait_until(lambda: proxy.requests > calls, 10, "the request to reach the predictor")
        process = transformer.processes["transformer"]
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        def refused() -> bool:  # a bare connect: it sends no request, so it adds no work in flight
            try:
                socket.create_connection(("127.0.0.1", transformer.transformer_port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 5, "the transformer to stop accepting connections")  # nothing new is accepted
        assert worker.is_alive()  # ... while the request in flight still waits for the predictor
        with pytest.raises(httpx.ConnectError):
            httpx.post(predict_url(transformer.transformer_url), json=valid_body(raw_users), timeout=5)
        worker.join(10)
        assert result["response"].status_code == 200  # the in-flight request finished
        assert process.wait(15) == 0  # a clean exit
        assert time.monotonic() - signalled < 10  # within --graceful_shutdown_seconds
    finally:
        transformer.stop()
        proxy.close()


# -- artifacts -----------------------------------------------------------------------------------

def start_transformer(base_path, stack=None, *more):
    """Start ``python -m transformer`` on a model base path and wait for it to exit (it should, with 2);
    against the stack's predictor, or against nothing listening."""
    predictor = (["--predictor_host", f"127.0.0.1:{stack.predictor_port}", "--predictor_grpc_port",
                  str(stack.predictor_grpc_port)] if stack else ["--predictor_host", "127.0.0.1:9"])
    return subprocess.run(
        [sys.executable, "-m", "transformer", "--model_name", MODEL_NAME, *predictor,
         "--model_base_path", str(base_path), "--http_port", "0", *more],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def copy_of_version_1(build_dir, tmp_path):
    """A model base path holding a copy of version 1; returns (base path, its bundle folder)."""
    base = tmp_path / "models" / MODEL_NAME
    shutil.copytree(version_dir(build_dir), base / "1")
    return base, bundle_path(tmp_path)


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (lambda b: (b / "segments.joblib").write_bytes((b / "segments.joblib").read_bytes()[:-10]), "was altered or truncated"),
        (lambda b: (b / "scaler.joblib").unlink(), "listed in the manifest but missing"),
        (lambda b: (b / "evil.pkl").write_bytes(b"x"), "files the manifest does not list: evil.pkl"),
        (lambda b: edit_manifest(b, lambda m: m["versions"].__setitem__("scikit-learn", "1.3.0")),
         "made with scikit-learn 1.3.0"),
    ],
    ids=["altered", "missing", "unlisted", "sklearn-version"],
)
def test_transformer_refuses_bad_artifacts_at_start(build_dir, tmp_path, tamper, fragment):
    base, bundle = copy_of_version_1(build_dir, tmp_path)
    tamper(bundle)
    result = start_transformer(base)
    assert result.returncode == 2
    assert "cannot load the artifact bundle" in result.stderr and fragment in result.stderr


def test_a_predictor_model_that_does_not_fit_is_said_at_start_and_never_served(stack, build_dir, tmp_path):
    """Said at once and un-Ready, not an exit: on a cluster the predictor behind the Service can be the one being
    replaced (the fused overlay's while the kind overlay's starts), and an exit there crash-looped the transformer
    through the rollout (seen on the tests' real node)."""
    base, bundle = copy_of_version_1(build_dir, tmp_path)
    edit_manifest(bundle, lambda m: m["model"].__setitem__("n_candidates", 7))  # the model returns 5
    misfit = stack.another_transformer(log_dir=tmp_path / "logs", model_dir=base)
    misfit._spawn("transformer", misfit.transformer_command(base))
    try:
        misfit._wait("transformer", f"{misfit.transformer_url}/", lambda r: r.status_code == 200, 60)
        health = httpx.get(f"{misfit.transformer_url}/v1/models/{MODEL_NAME}", timeout=10)
        refused = httpx.post(f"{misfit.transformer_url}/v1/models/{MODEL_NAME}:predict",
                             json={"instances": [[0.0] * 12]}, timeout=10)
        log = misfit.log_tail("transformer", 200)
    finally:
        misfit.stop()
    said = ("the predictor's model does not fit the bundle: version 1: output 'candidate_ids' is DT_INT64 [-1, 5], "
            "the bundle expects DT_INT64 [-1, 7]")
    assert f"warning: {said}" in log
    assert health.status_code == 503 and refused.status_code == 503
    assert "version 1 does not fit its bundle: output 'candidate_ids' is DT_INT64 [-1, 5]" in refused.json()["error"]


def test_a_poisoned_pickle_runs_nothing_and_a_pin_refuses_the_rewritten_manifest(
        stack, build_dir, tmp_path, offline, raw_users):
    """Whoever can write the model store replaces scaler.joblib with code and fixes its sha256 in the
    manifest: the transformer serves from fitted.npz and never unpickles it; with the manifest's
    digest pinned from outside the store, the rewritten manifest is refused."""
    from transformer.store.bundle import sha256_of

    base, bundle = copy_of_version_1(build_dir, tmp_path)
    trusted = sha256_of(bundle / "manifest.json")
    marker = tmp_path / "pwned"
    poison(bundle / "scaler.joblib", marker)
    rewrite_digest(bundle, "scaler.joblib")

    poisoned = stack.another_transformer(build=tmp_path, log_dir=tmp_path / "logs")
    poisoned.start_transformer()
    try:
        response = httpx.post(predict_url(poisoned.transformer_url), json=valid_body(raw_users, 5), timeout=30)
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"], offline.predictions(raw_users[:5]))
    finally:
        poisoned.stop()
    assert not marker.exists()

    result = start_transformer(base, stack, "--trusted_manifests", trusted)
    assert result.returncode == 2
    assert f"has sha256 {sha256_of(bundle / 'manifest.json')}, which is not among the trusted" in result.stderr
    assert not marker.exists()
    bad = start_transformer(base, None, "--trusted_manifests", "not-a-digest")
    assert bad.returncode == 2 and "takes sha256 digests (64 hex digits), got not-a-digest" in bad.stderr


def test_bounded_soak_loses_nothing(stack, raw_users):
    """3,000 requests at concurrency 32: every one answered 200, memory bounded.
    (The benchmark runs the same soak with 20,000 requests and reports it.)"""
    from scripts.benchmark import soak

    result = soak(stack, json.dumps(valid_body(raw_users)).encode(), requests=3000, concurrency=32)
    assert result["ok"] == 3000 and result["lost"] == 0 and result["transport_errors"] == 0, result
    assert result["rss_growth_mb"] < 25, result

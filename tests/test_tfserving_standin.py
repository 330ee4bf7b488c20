"""``python -m model.standin`` answers like TF Serving's REST API (g3doc/api_rest.md)."""

import json
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import MODEL_NAME
from hypothesis import HealthCheck, given, settings
from strategies import json_documents

from model.standin.tfjson import TensorJsonError, TensorSpecInfo, parse_predict_request, render_predict_response
from scripts.localstack import ROOT


@pytest.fixture(scope="module")
def api(stack):
    return f"{stack.predictor_url}/v1/models/{MODEL_NAME}"


@pytest.fixture(scope="module")
def scaled(offline, raw_users):
    return offline.scaler.transform(raw_users[:3]).astype(np.float32)


def test_model_status_format(api):
    response = httpx.get(api)
    assert response.status_code == 200
    assert response.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert httpx.get(f"{api}/versions/1").status_code == 200


def test_metadata_lists_the_signature(api, offline):
    body = httpx.get(f"{api}/metadata").json()
    assert body["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    n_features = len(offline.feature_names)
    features = signature["inputs"]["features"]
    assert features["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in features["tensor_shape"]["dim"]] == ["-1", str(n_features)]
    assert set(signature["outputs"]) == {"embedding", "scores"}
    assert signature["method_name"] == "tensorflow/serving/predict"


def test_row_format_returns_an_object_per_row(api, offline, scaled):
    response = httpx.post(f"{api}:predict", json={"instances": scaled.tolist()})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    expected_embedding, expected_scores = offline_outputs(offline, scaled)
    assert len(predictions) == 3 and set(predictions[0]) == {"embedding", "scores"}
    np.testing.assert_allclose(np.array([p["embedding"] for p in predictions]), expected_embedding, atol=1e-6)
    np.testing.assert_allclose(np.array([p["scores"] for p in predictions]), expected_scores, atol=1e-6)


def offline_outputs(offline, scaled):
    import tensorflow as tf

    out = offline.signature(features=tf.constant(scaled))
    return out["embedding"].numpy(), out["scores"].numpy()


def test_columnar_format_and_version_route(api, offline, scaled):
    body = {"signature_name": "serving_default", "inputs": {"features": scaled.tolist()}}
    response = httpx.post(f"{api}/versions/1:predict", json=body)
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    expected_embedding, expected_scores = offline_outputs(offline, scaled)
    np.testing.assert_allclose(outputs["embedding"], expected_embedding, atol=1e-6)
    np.testing.assert_allclose(outputs["scores"], expected_scores, atol=1e-6)


def test_float32_values_round_trip_exactly(api, offline, scaled):
    """Outputs are written as the shortest decimal of each float32: parsing gives the same float32."""
    response = httpx.post(f"{api}:predict", json={"inputs": scaled.tolist()})
    got = np.asarray(response.json()["outputs"]["scores"], dtype=np.float32)
    _, expected = offline_outputs(offline, scaled)
    assert np.array_equal(got, expected)


def test_nan_and_infinity_tokens_are_accepted(api, scaled):
    text = "[" + ",".join(["NaN", "Infinity", "-Infinity"] + [repr(float(v)) for v in scaled[0][3:]]) + "]"
    response = httpx.post(f"{api}:predict", content=f'{{"instances": [{text}]}}')
    assert response.status_code == 200
    assert "NaN" in response.text  # NaN propagates and is written with TF Serving's token


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"", 400, "JSON Parse error: The document is empty"),
        (b"{not json", 400, "JSON Parse error"),
        (b"[1, 2]", 400, "Is not object"),
        (b'{"instances": [[1]], "inputs": [[1]]}', 400, "expecting only one of 'inputs' or 'instances'"),
        (b'{"instances": 3}', 400, "Excepting 'instances' to be an list/array"),
        (b'{"instances": []}', 400, "No values in 'instances' array"),
        (b'{"signature_name": 3, "instances": [[1]]}', 400, "'signature_name' key must be a string value"),
        (b'{"signature_name": "nope", "instances": [[1]]}', 400, 'Serving signature name: "nope" not found'),
        (b'{"foo": 1}', 400, "Missing 'inputs' or 'instances' key"),
        (b'{"instances": [[true]]}', 400, "JSON Value: true Type: True is not of expected type: float"),
        (b'{"instances": [["a"]]}', 400, 'JSON Value: "a" Type: String is not of expected type: float'),
        (b'{"instances": [[16777217]]}', 400, "Cannot convert JSON value: 16777217 to float without loss of precision."),
        (b'{"instances": [[1e39]]}', 400, "without loss of precision"),
        (b'{"instances": [[1, 2], [1]]}', 400, "Failed to process element: 1 of 'instances' list"),
        (b'{"instances": [{"features": [1]}, [1]]}', 400, "Expecting object but got list at item 1"),
        (b'{"instances": [{"other": [1]}]}', 400, "does not have named input: other"),
        (b'{"inputs": {"other": [[1]]}}', 400, "Missing named input: features in 'inputs' object."),
        (b'{"instances": [[1.0, 2.0]]}', 400, "has shape [1,2], the signature expects [-1,"),
    ],
)
def test_errors_are_tf_serving_statuses(api, body, status, fragment):
    response = httpx.post(f"{api}:predict", content=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_not_found_and_malformed_routes(stack, api):
    assert httpx.get(f"{stack.predictor_url}/v1/models/other").json() == {
        "error": "Could not find any versions of model other"
    }
    missing = httpx.post(f"{stack.predictor_url}/v1/models/other:predict", json={"instances": [[1]]})
    assert (missing.status_code, missing.json()["error"]) == (404, "Servable not found for request: Latest(other)")
    version = httpx.post(f"{api}/versions/7:predict", json={"instances": [[1]]})
    assert (version.status_code, version.json()["error"]) == (
        404, f"Servable not found for request: Specific({MODEL_NAME}, 7)")
    assert httpx.get(f"{api}/versions/7").status_code == 404
    bad = httpx.get(f"{api}:predict")
    assert bad.status_code == 400 and bad.json()["error"].startswith("Malformed request: GET")
    classify = httpx.post(f"{api}:classify", json={"instances": [[1]]})
    assert classify.status_code == 400 and "tensorflow/serving/classify" in classify.json()["error"]


def wait_for_states(url: str, expected: dict, timeout: float = 30.0) -> dict:
    """Poll TF Serving's model status until the version states are ``expected`` (or time runs out)."""
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        states = {s["version"]: s["state"] for s in httpx.get(url).json()["model_version_status"]}
        if states == expected:
            break
        time.sleep(0.2)
    return states


@pytest.mark.parametrize("policy", ["default", "latest 2"])
def test_new_and_removed_versions_follow_the_version_policy(build_dir, tmp_path, policy):
    """TF Serving's default serves the newest version only; ``latest { num_versions: 2 }`` (what the
    local stack and the manifests use) keeps the previous one loaded beside it. A removed version
    is unloaded, and the policy then aspires the next one again."""
    from scripts.localstack import LocalStack, model_config

    models = tmp_path / "models" / MODEL_NAME
    shutil.copytree(build_dir / "models" / MODEL_NAME / "1", models / "1")
    stack = LocalStack(build=tmp_path, predictor="local", log_dir=tmp_path / "logs")
    if policy == "default":  # no --model_config_file: the flags alone, as `tensorflow_model_server` takes them
        stack._spawn("predictor", [sys.executable, "-m", "model.standin", "--model_name", MODEL_NAME,
                                   "--model_base_path", str(models), "--rest_api_port", str(stack.predictor_port),
                                   "--port", str(stack.predictor_grpc_port)])
        stack._wait("predictor", f"{stack.predictor_url}/v1/models/{MODEL_NAME}", lambda r: r.status_code == 200, 60)
    else:
        stack.start_predictor()
        assert "num_versions: 2" in (tmp_path / "logs" / "models.config").read_text()
        assert (tmp_path / "logs" / "models.config").read_text() == model_config(MODEL_NAME, str(models.resolve()))
    try:
        url = f"{stack.predictor_url}/v1/models/{MODEL_NAME}"
        shutil.copytree(models / "1", models / "2")
        both = {"1": "AVAILABLE", "2": "AVAILABLE"} if policy == "latest 2" else {"1": "END", "2": "AVAILABLE"}
        assert wait_for_states(url, both) == both
        assert httpx.get(f"{url}/metadata").json()["model_spec"]["version"] == "2"  # Latest: the newest
        pinned = httpx.post(f"{url}/versions/1:predict", json={"instances": [[0.0] * 12]})
        if policy == "latest 2":
            assert pinned.status_code == 200, pinned.text
            assert httpx.get(f"{url}/versions/1/metadata").json()["model_spec"]["version"] == "1"
        else:
            assert (pinned.status_code, pinned.json()["error"]) == (
                404, f"Servable not found for request: Specific({MODEL_NAME}, 1)")
        shutil.rmtree(models / "2")
        back = {"1": "AVAILABLE", "2": "END"}
        assert wait_for_states(url, back) == back
    finally:
        stack.stop()


@pytest.mark.parametrize("text, message", [
    ("model_config_list { config { name: 'm' base_path: '/x' model_platform: 'pytorch' } }", "platform 'pytorch'"),
    ("model_config_list { }", "configures no model"),
    ("model_config_list { config { name: 'm' ", "Invalid protobuf file"),
])
def test_bad_model_config_files_are_refused(tmp_path, text, message):
    config = tmp_path / "models.config"
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "model.standin", "--model_config_file", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_model_config_policies():
    from model.standin.serving_config import parse_model_config

    def aspired(policy_text):
        (config,) = parse_model_config(
            f"model_config_list {{ config {{ name: 'm' base_path: '/x' {policy_text} }} }}")
        return config.policy.aspired([1, 2, 3, 5])

    assert aspired("") == [5]
    assert aspired("model_version_policy { latest { num_versions: 2 } }") == [3, 5]
    assert aspired("model_version_policy: { all: {} }") == [1, 2, 3, 5]
    assert aspired("model_version_policy { specific { versions: 2 versions: 4 } }") == [2]
    # Fields this server does not use (labels, logging) are skipped, as a config written for TF Serving has them.
    assert aspired("version_labels { key: 'stable' value: 3 } model_version_policy { latest {} }") == [5]


# The JSON mapping itself, for shapes our model does not have.

SPEC = {"x": TensorSpecInfo(np.dtype(np.float32), (None, 2))}


def test_single_output_row_and_columnar_rendering():
    out = {"y": np.array([[1.0, 0.1]], dtype=np.float32)}
    assert render_predict_response(out, "row") == b'{"predictions":[[1.0,0.1]]}'
    assert render_predict_response(out, "columnar") == b'{"outputs":[[1.0,0.1]]}'


def test_non_finite_outputs_use_tokens():
    out = {"a": np.array([np.nan, np.inf], dtype=np.float32), "b": np.array([1, 2], dtype=np.int64)}
    assert render_predict_response(out, "row") == b'{"predictions":[{"a":NaN,"b":1},{"a":Infinity,"b":2}]}'


def test_inconsistent_batch_size_in_row_format():
    out = {"a": np.zeros((2, 1), np.float32), "b": np.zeros((3,), np.float32)}
    with pytest.raises(TensorJsonError, match="inconsistent batch size: 3 expecting: 2"):
        render_predict_response(out, "row")


def test_plain_instances_with_several_inputs_is_refused():
    specs = {"a": SPEC["x"], "b": SPEC["x"]}
    with pytest.raises(TensorJsonError, match="instances is a plain list, but expecting list of objects"):
        parse_predict_request({"instances": [[1, 2]]}, lambda _: specs)


def test_b64_objects_are_values_not_rows():
    specs = {"x": TensorSpecInfo(np.dtype(object), (None,))}
    _, arrays, form = parse_predict_request({"instances": [{"b64": "aGk="}, "plain"]}, lambda _: specs)
    assert form == "row" and arrays["x"].tolist() == [b"hi", "plain"]


_values = json_documents(["instances", "inputs", "signature_name", "features", "b64"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_values)
def test_generated_requests_get_tf_serving_statuses_never_500(api, doc):
    response = httpx.post(f"{api}:predict", content=json.dumps(doc, allow_nan=True).encode(), timeout=30)
    assert response.status_code in (200, 400), (doc, response.text)
    assert response.status_code == 200 or "error" in response.json()

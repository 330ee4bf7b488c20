"""TF Serving's gRPC API: our protos against the official stubs, the stand-in's gRPC server, and the
transformer calling TF Serving over gRPC (the default) and over REST with the same answers."""

import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODEL_NAME, assert_same_predictions, version_dir
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from scripts.localstack import ROOT
from transformer.predictor.grpc import SIGNATURE_DEF_MAP_URL, tensor_array, tensor_proto
from transformer.predictor.protos import tfserving_pb2 as ours

# -- our messages are TF Serving's bytes -----------------------------------------------------------


def test_the_generated_module_is_the_proto_file(tmp_path):
    """tfserving_pb2.py was regenerated after the last change to tfserving.proto (compared as
    descriptors, so another protoc version writing the module differently does not matter)."""
    from google.protobuf import descriptor_pb2

    out = tmp_path / "tfserving.desc"
    # In a process of its own: protoc's C++ protobuf and TensorFlow's do not share one process.
    compiled = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Itransformer/predictor/protos",
                               f"--descriptor_set_out={out}", "transformer/predictor/protos/tfserving.proto"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert compiled.returncode == 0, compiled.stderr
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in compiled.message_type:  # the Python generator leaves out the json names
        for each in (message, *message.nested_type):
            for field in each.field:
                field.ClearField("json_name")
    assert descriptor_pb2.FileDescriptorProto.FromString(ours.DESCRIPTOR.serialized_pb) == compiled


def official_predict_request(features: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.version.value = 3
    request.model_spec.signature_name = "candidates"
    request.output_filter.extend(["candidate_ids", "candidate_scores"])
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(features))  # tensor_content, as ours
    return request


def test_predict_request_bytes_equal_the_official_stubs_both_ways():
    features = np.random.default_rng(0).random((4, 12), dtype=np.float32)
    request = ours.PredictRequest(model_spec=ours.ModelSpec(name=MODEL_NAME, signature_name="candidates"),
                                  output_filter=["candidate_ids", "candidate_scores"])
    request.model_spec.version.value = 3
    request.inputs["features"].CopyFrom(tensor_proto(features))
    official = official_predict_request(features)
    assert request.SerializeToString(deterministic=True) == official.SerializeToString(deterministic=True)
    parsed = ours.PredictRequest.FromString(official.SerializeToString())
    assert (parsed.model_spec.name, parsed.model_spec.version.value, parsed.model_spec.signature_name) == (
        MODEL_NAME, 3, "candidates")
    np.testing.assert_array_equal(tensor_array(parsed.inputs["features"]), features)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([[5, -1, 2**40]], dtype=np.int64),
    np.array([1.5, 2.5], dtype=np.float64),
    np.array([[7, 8, 9]], dtype=np.int32),
], ids=["float", "int64", "double", "int32"])
def test_tensors_read_as_tensorflow_reads_them(array):
    """Both encodings TF writes (tensor_content, and the typed fields TF Serving's Predict answers
    with) parse to the array TensorFlow itself makes of the same bytes."""
    content = tf.make_tensor_proto(array)
    assert content.tensor_content  # the bytes form
    as_field = tf.make_tensor_proto(array)
    as_field.ClearField("tensor_content")
    getattr(as_field, {np.float32: "float_val", np.int64: "int64_val", np.float64: "double_val",
                       np.int32: "int_val"}[array.dtype.type]).extend(array.ravel().tolist())
    for proto in (content, as_field):
        got = tensor_array(ours.TensorProto.FromString(proto.SerializeToString()))
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, tf.make_ndarray(proto))


def test_a_short_repeated_field_fills_the_shape_with_its_last_value_as_tensorflow_does():
    proto = ours.TensorProto(dtype=ours.DT_FLOAT, float_val=[1.0, 2.0])
    proto.tensor_shape.dim.extend([ours.TensorShapeProto.Dim(size=2), ours.TensorShapeProto.Dim(size=3)])
    official = tf.make_tensor_proto(0.0)
    official.ParseFromString(proto.SerializeToString())
    np.testing.assert_array_equal(tensor_array(proto), tf.make_ndarray(official))
    too_many = ours.TensorProto(dtype=ours.DT_FLOAT, float_val=[1.0, 2.0, 3.0])
    too_many.tensor_shape.dim.add(size=2)
    with pytest.raises(ValueError, match="3 values for shape \\[2\\]"):
        tensor_array(too_many)
    text = ours.TensorProto(dtype=ours.DT_STRING, string_val=[b"a"])
    with pytest.raises(ValueError, match="DT_STRING, not one of"):
        tensor_array(text)


def test_status_and_metadata_messages_match_the_official_stubs(build_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    status = get_model_status_pb2.GetModelStatusResponse()
    entry = status.model_version_status.add(version=2, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    entry.status.error_message = "fine"
    mine = ours.GetModelStatusResponse.FromString(status.SerializeToString())
    assert (mine.model_version_status[0].version, mine.model_version_status[0].state) == (2, ours.ModelVersionStatus.AVAILABLE)
    assert mine.SerializeToString() == status.SerializeToString()

    saved = saved_model_pb2.SavedModel.FromString((version_dir(build_dir) / "saved_model.pb").read_bytes())
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in saved.meta_graphs[0].signature_def.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].Pack(signature_map)
    assert response.metadata["signature_def"].type_url == SIGNATURE_DEF_MAP_URL
    mine = ours.GetModelMetadataResponse.FromString(response.SerializeToString())
    signatures = ours.SignatureDefMap.FromString(mine.metadata["signature_def"].value)
    official = signature_map.signature_def["serving_default"]
    got = signatures.signature_def["serving_default"]
    assert set(got.outputs) == set(official.outputs) and got.method_name == official.method_name
    for name, info in official.outputs.items():
        assert got.outputs[name].dtype == info.dtype
        assert [d.size for d in got.outputs[name].tensor_shape.dim] == [d.size for d in info.tensor_shape.dim]


# -- the stand-in's gRPC API, called with the official stubs ------------------------------------------


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.predictor_grpc_port}") as open_channel:
        yield open_channel


def test_standin_predict_answers_as_the_savedmodel(channel, offline, raw_users):
    scaled = offline.scaler.transform(raw_users[:7]).astype(np.float32)
    request = official_predict_request(scaled)
    request.model_spec.version.value = 1
    request.model_spec.signature_name = "serving_default"
    del request.output_filter[:]
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    expected = offline.signature(features=tf.constant(scaled))
    assert set(response.outputs) == set(expected)
    for name, tensor in expected.items():
        assert not response.outputs[name].tensor_content  # typed fields, as TF Serving's Predict writes
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs[name]), tensor.numpy())
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL_NAME, 1)


def test_standin_status_and_metadata_over_grpc(channel, build_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL_NAME}), timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": MODEL_NAME},
                                                             metadata_field=["signature_def"])
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    saved = saved_model_pb2.SavedModel.FromString((version_dir(build_dir) / "saved_model.pb").read_bytes())
    for key in ("serving_default", "candidates"):
        assert signature_map.signature_def[key] == saved.meta_graphs[0].signature_def[key]


@pytest.mark.parametrize("change, code, message", [
    (lambda r: r.model_spec.version.__setattr__("value", 9), grpc.StatusCode.NOT_FOUND,
     f"Servable not found for request: Specific({MODEL_NAME}, 9)"),
    (lambda r: r.model_spec.__setattr__("name", "other"), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Specific(other, 1)"),
    (lambda r: r.model_spec.__setattr__("signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION,
     'Serving signature key "nope" not found.'),
    (lambda r: r.inputs["features"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 5), np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, "features"),
    (lambda r: r.inputs["features"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 12), np.float64))),
     grpc.StatusCode.INVALID_ARGUMENT, "Expects arg[0] to be float but DT_DOUBLE is provided"),
    (lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 12), np.float32))),
     grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {extra}"),
    (lambda r: r.output_filter.append("nothing"), grpc.StatusCode.INVALID_ARGUMENT,
     "output tensor alias not found in signature: nothing"),
], ids=["version", "model", "signature", "shape", "dtype", "extra-input", "output-filter"])
def test_standin_errors_carry_tf_servings_codes(channel, change, code, message):
    request = official_predict_request(np.zeros((2, 12), np.float32))
    request.model_spec.version.value = 1
    request.model_spec.signature_name = "serving_default"
    del request.output_filter[:]
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert caught.value.code() == code and message in caught.value.details()


# -- the transformer: gRPC toward TF Serving (the default) and REST give the same answers ----------------


def test_grpc_and_rest_toward_tf_serving_give_identical_answers(stack, offline, raw_users, tmp_path):
    rest = stack.another_transformer(log_dir=tmp_path, transformer_args=["--predictor_api", "rest"])
    rest.start_transformer()
    try:
        for rows in (raw_users[:1], raw_users[:37], raw_users[:300]):
            body = {"instances": rows.tolist()}
            over_grpc = httpx.post(f"{stack.transformer_url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30)
            over_rest = httpx.post(f"{rest.transformer_url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30)
            assert over_grpc.status_code == over_rest.status_code == 200, over_grpc.text + over_rest.text
            assert over_grpc.content == over_rest.content  # the same bytes, float for float
            assert_same_predictions(over_grpc.json()["predictions"], offline.predictions(rows))
    finally:
        rest.stop()


@pytest.mark.parametrize("signature", [[], ["--full_scores"]], ids=["candidates", "every-score"])
def test_each_rest_client_answers_what_grpc_does_for_every_batch_and_both_signatures(stack, offline, raw_users,
                                                                                     tmp_path, signature):
    """The REST hop through the loop client (the default) and through aiohttp, and auto (REST up to 37 rows, gRPC
    above), against the gRPC hop: the same bytes for 1 to 1,024 rows, with the candidates signature and with every
    score."""
    paths = {name: stack.another_transformer(log_dir=tmp_path / name, transformer_args=[*args, *signature])
             for name, args in (("grpc", []), ("loop", ["--predictor_api", "rest"]),
                                ("aiohttp", ["--predictor_api", "rest", "--predictor_rest_client", "aiohttp"]),
                                ("auto", ["--predictor_api", "auto", "--predictor_rest_rows", "37"]))}
    try:
        for path in paths.values():
            path.start_transformer()
        for n in (1, 2, 37, 256, 1024):
            rows = raw_users[np.arange(n) % len(raw_users)]
            answers = {name: httpx.post(f"{path.transformer_url}/v1/models/{MODEL_NAME}:predict",
                                        json={"instances": rows.tolist()}, timeout=60)
                       for name, path in paths.items()}
            assert all(a.status_code == 200 for a in answers.values()), {k: a.text[:300] for k, a in answers.items()}
            assert answers["loop"].content == answers["grpc"].content == answers["aiohttp"].content \
                == answers["auto"].content, n
            assert_same_predictions(answers["loop"].json()["predictions"], offline.predictions(rows))
    finally:
        for path in paths.values():
            path.stop()


def test_grpc_predictor_down_means_503_then_service_returns(stack, build_dir, raw_users, tmp_path):
    """A predictor of its own, stopped and started again: 503 (UNAVAILABLE after the retries, not
    a hang), readiness false, then answers again once it is back, without restarting the transformer."""
    own = type(stack)(build=build_dir, predictor="local", log_dir=tmp_path,
                      transformer_args=["--predictor_retries", "1", "--model_poll_seconds", "0.2"])
    own.start()
    url = f"{own.transformer_url}/v1/models/{MODEL_NAME}"
    body = {"instances": raw_users[:2].tolist()}
    try:
        assert httpx.post(f"{url}:predict", json=body, timeout=10).status_code == 200
        own.stop_process("predictor")
        started = time.monotonic()
        down = httpx.post(f"{url}:predict", json=body, timeout=10)
        assert down.status_code == 503, down.text
        assert "unreachable" in down.json()["error"] or "unavailable" in down.json()["error"]
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 10
        while httpx.get(url, timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url, timeout=5).status_code == 503  # not ready while TF Serving is away
        own.start_predictor()
        deadline = time.monotonic() + 30
        while httpx.get(url, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, own.log_tail("transformer")
            time.sleep(0.1)
        assert httpx.post(f"{url}:predict", json=body, timeout=10).status_code == 200
    finally:
        own.stop()



@pytest.mark.parametrize("host, address", [
    ("embedder-predictor.models", "embedder-predictor.models:9000"),  # what KServe passes: no port
    ("127.0.0.1:8501", "127.0.0.1:9000"),
    ("[::1]:8501", "[::1]:9000"),
    ("::1", "[::1]:9000"),
])
def test_the_grpc_address_is_the_predictor_host_on_the_grpc_port(host, address):
    from transformer.predictor import grpc_address

    assert grpc_address(host, 9000) == address

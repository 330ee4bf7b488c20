"""The Open Inference Protocol (v2) at the transformer, over REST and gRPC, through KServe's own clients.

Every answer is compared with the offline computation (scikit-learn and the SavedModel called
directly); malformed requests get precise 4xx statuses or gRPC codes, never 5xx or INTERNAL.
"""


import json
import subprocess
import sys

import grpc
import httpx
import numpy as np
import orjson
import pytest
from conftest import (
    MODEL_NAME, as_predictions, bundle_path, assert_same_predictions, column_request, grpc_infer, matrix_request, run,
)
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc



async def rest_infer(stack, request, **kwargs):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    try:
        return await client.infer(stack.transformer_url, request, model_name=MODEL_NAME, **kwargs)
    finally:
        await client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary-extension"])
def test_v2_rest_matrix_form_matches_offline(stack, offline, raw_users, binary):
    rows = raw_users[:300]
    headers = {}
    response = run(rest_infer(stack, matrix_request(rows, binary=binary), response_headers=headers))
    assert response.model_name == MODEL_NAME and response.id == "r1"  # (KServe's REST client drops model_version)
    assert headers["x-model-version"] == "1"
    assert [o.name for o in response.outputs] == ["segment", "segment_distance", "item_ids", "item_scores"]
    assert [o.datatype for o in response.outputs] == ["INT64", "FP32", "INT64", "FP32"]
    assert_same_predictions(as_predictions(response), offline.predictions(rows))


def test_v2_rest_per_feature_form_and_fp32_match_offline(stack, offline, raw_users):
    rows = raw_users[:120]
    response = run(rest_infer(stack, column_request(rows, offline.feature_names)))
    assert_same_predictions(as_predictions(response), offline.predictions(rows))
    # FP32 input: the values a float32 holds, read exactly.
    response = run(rest_infer(stack, matrix_request(rows, datatype="FP32", binary=True)))
    assert_same_predictions(as_predictions(response), offline.predictions(rows.astype(np.float32).astype(np.float64)))


def test_v2_rest_binary_outputs_when_asked(stack, offline, raw_users):
    rows = raw_users[:40]
    request = matrix_request(rows)
    request.parameters = {"binary_data_output": True}
    answer = httpx.post(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/infer", timeout=30,
                        content=orjson.dumps({**request.to_rest()[0], "parameters":
                                                            {"binary_data_output": True}}))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    from kserve import InferResponse

    json_length = int(answer.headers["inference-header-content-length"])
    assert orjson.loads(answer.content[:json_length])["model_version"] == "1"
    response = InferResponse.from_bytes(answer.content, json_length)
    assert_same_predictions(as_predictions(response), offline.predictions(rows))


@pytest.mark.parametrize("binary", [False, True], ids=["typed-contents", "raw-contents"])
def test_v2_grpc_both_forms_match_offline(stack, offline, raw_users, binary):
    rows = raw_users[:250]
    response = run(grpc_infer(stack, matrix_request(rows, binary=binary)))
    assert response.model_name == MODEL_NAME and response.id == "r1" and response.model_version == "1"
    assert_same_predictions(as_predictions(response), offline.predictions(rows))
    response = run(grpc_infer(stack, column_request(rows[:50], offline.feature_names, binary=binary)))
    assert_same_predictions(as_predictions(response), offline.predictions(rows[:50]))


def test_v2_metadata_and_readiness_over_rest_and_grpc(stack, offline, build_dir):
    from transformer.store.bundle import sha256_of

    meta = httpx.get(f"{stack.transformer_url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert meta["inputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, len(offline.feature_names)]}]
    # Beyond KServe's own ("versions": null, the tensors only): the versions, the artifact, both input forms.
    digest = sha256_of(bundle_path(build_dir, 1) / "manifest.json")
    assert meta["versions"] == ["1"] and meta["parameters"]["version"] == "1"
    assert meta["parameters"]["manifest_sha256"] == digest
    assert meta["parameters"]["feature_names"] == list(offline.feature_names)
    assert [t["name"] for t in meta["parameters"]["per_feature_inputs"]] == list(offline.feature_names)
    assert httpx.get(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/versions/1", timeout=10).json() == meta
    missing = httpx.get(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/versions/99", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": f"model {MODEL_NAME} has no version 99 "
                                                                      "loaded; it has 1"}
    assert httpx.get(f"{stack.transformer_url}/v2/models/nope", timeout=10).status_code == 404
    k = offline.rules["top_k"]
    assert meta["outputs"] == [
        {"name": "segment", "datatype": "INT64", "shape": [-1]},
        {"name": "segment_distance", "datatype": "FP32", "shape": [-1]},
        {"name": "item_ids", "datatype": "INT64", "shape": [-1, k]},
        {"name": "item_scores", "datatype": "FP32", "shape": [-1, k]},
    ]
    assert httpx.get(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/ready", timeout=10).status_code == 200

    async def over_grpc():
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=10)
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=10)
            return ready.ready, meta

    ready, meta = run(over_grpc())
    assert ready and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("features", "FP64", [-1, len(offline.feature_names)])]

    # Triton's client, in a process of its own: its protos and KServe's share the package name "inference".
    probe = ("import json, sys, tritonclient.grpc as triton; "
             "print(json.dumps(triton.InferenceServerClient(sys.argv[1]).get_model_metadata(sys.argv[2], as_json=True)))")
    done = subprocess.run([sys.executable, "-c", probe, stack.grpc_target, MODEL_NAME], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    triton_meta = json.loads(done.stdout)
    assert triton_meta["name"] == MODEL_NAME and triton_meta["versions"] == ["1"]
    assert [t["name"] for t in triton_meta["outputs"]] == ["segment", "segment_distance", "item_ids", "item_scores"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("segment", "INT64", [-1]), ("segment_distance", "FP32", [-1]),
        ("item_ids", "INT64", [-1, k]), ("item_scores", "FP32", [-1, k])]


def test_exactly_max_rows_are_accepted_and_one_more_is_refused(stack, raw_users):
    rows = np.resize(raw_users, (1024, raw_users.shape[1]))  # the stack's --max_rows default
    assert len(run(grpc_infer(stack, matrix_request(rows))).outputs[0].data) == 1024
    more = np.resize(raw_users, (1025, raw_users.shape[1]))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(grpc_infer(stack, matrix_request(more)))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1025 rows, at most 1024 are accepted" in error.value.details()
    answer = httpx.post(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/infer", timeout=30,
                        content=orjson.dumps(matrix_request(more).to_rest()[0]))
    assert answer.status_code == 413 and "1025 rows, at most 1024" in answer.json()["error"]


def _input(name="features", datatype="FP64", shape=(1, 12), data=None):
    return {"name": name, "datatype": datatype, "shape": list(shape),
            "data": data if data is not None else [1.0] * int(np.prod(shape))}


# (request body as JSON, message fragment) -- every one a 400 over REST and INVALID_ARGUMENT over gRPC.
MALFORMED = [
    ({"inputs": []}, "non-empty list 'inputs'"),
    ({"instances": [[1.0] * 12]}, "takes v2 'inputs', not v1 'instances'"),
    ({"inputs": [_input(datatype="BYTES")]}, "datatype BYTES is not accepted; send FP64 or FP32"),
    ({"inputs": [_input(datatype="INT64")]}, "datatype INT64 is not accepted for the matrix"),
    ({"inputs": [_input(shape=(1, 11))]}, "shape [1, 11], expected [n, 12]"),
    ({"inputs": [_input(shape=(2, 12), data=[1.0] * 23)]}, "its shape holds 24 values, got 23 values"),
    ({"inputs": [_input(data=[1.0] * 11 + ["x"])]}, "value 11 must be a number, got str 'x'"),
    ({"inputs": [_input(data=[1.0] * 11 + [True])]}, "value 11 must be a number, got bool"),
    ({"inputs": [_input(data=[1.0] * 11 + [1e300])]}, "feature 'reviews_written' must be a finite number within "
                                                      "float32 range"),
    ({"inputs": [_input(shape=(0, 12), data=[])]}, "no rows; send at least one"),
    ({"inputs": [_input(name="sessions_30d", shape=(1,), data=[1.0])]}, "missing 'page_views_30d'"),
    ({"inputs": [_input(), _input()]}, "'features' comes 2 times: send it once"),
    ({"inputs": [_input(name="nope")]}, "unknown 'nope'"),
    ({"inputs": [_input()], "outputs": [{"name": "embedding"}]}, "unknown output(s) 'embedding'"),
]


@pytest.mark.parametrize("body, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_v2_requests_over_rest(stack, body, message):
    answer = httpx.post(f"{stack.transformer_url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=10)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    assert answer.headers["x-request-id"]


@pytest.mark.parametrize("body, message", [m for m in MALFORMED if "instances" not in m[0]],
                         ids=[m for b, m in MALFORMED if "instances" not in b])
def test_malformed_v2_requests_over_grpc(stack, body, message):
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    for item in body["inputs"]:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        data = item["data"]
        if all(type(v) in (int, float) for v in data):
            if item["datatype"] == "FP64":
                tensor.contents.fp64_contents.extend(data)
            elif item["datatype"] == "INT64":
                tensor.contents.int64_contents.extend(int(v) for v in data)
            else:
                tensor.contents.bytes_contents.extend(str(v).encode() for v in data)
        else:  # values protobuf cannot carry as numbers: sent as bytes of an FP64 tensor (8 bytes each)
            request.raw_input_contents.append(b"\0" * 7)
    for output in body.get("outputs", []):
        request.outputs.add(name=output["name"])

    async def call():
        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            return await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(call())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    if request.raw_input_contents:
        assert "7 bytes of FP64 data" in error.value.details()
    else:
        assert message in error.value.details()


def test_the_server_keeps_serving_after_the_battery_and_counts_by_outcome(stack, offline, raw_users):
    def count(outcome):
        text = httpx.get(f"{stack.transformer_url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("embedder_requests_total{") and f'outcome="{outcome}"' in line)

    ok, client_errors = count("ok"), count("client_error")
    with pytest.raises(grpc.aio.AioRpcError):
        run(grpc_infer(stack, matrix_request(np.ones((1, 11)))))
    response = run(grpc_infer(stack, matrix_request(raw_users[:5]), headers=[("x-request-id", "grpc-42")]))
    assert_same_predictions(as_predictions(response), offline.predictions(raw_users[:5]))
    assert count("client_error") == client_errors + 1 and count("ok") == ok + 1

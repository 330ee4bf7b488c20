"""The KServe model in process: ``EmbedderTransformer`` on small version folders, TF Serving scripted as a
deterministic function of its input, KServe's own pre -> predict -> post. Every answer is compared with the
offline computation (scikit-learn's scaler and KMeans, the same function, the rules in plain Python); the
version retry, the gRPC edge and v2 metadata are pinned here too. The servers run in tests/test_integration.py
and tests/test_protocols.py; these run in milliseconds."""

import asyncio

import grpc
import orjson
import pytest
from grpc_interceptor.exceptions import GrpcException
from small_bundle import ROWS, TFServing, new_version, offline, transformer, write

from transformer.admission import Admission
from transformer.bundle import BundleError
from transformer.model import EmbedderTransformer
from transformer.predictor import PredictorError, VersionNotServed


def call(model, body, headers=None):
    async def go():
        await model.versions.refresh()
        return await model(body, headers or {})

    return asyncio.run(go())


def same(got: list[dict], expected: list[dict]) -> None:
    assert [(p["segment"], [i["id"] for i in p["items"]]) for p in got] == \
        [(p["segment"], [i["id"] for i in p["items"]]) for p in expected]
    for g, e in zip(got, expected):
        assert g["segment_distance"] == pytest.approx(e["segment_distance"], rel=1e-6)
        assert [i["score"] for i in g["items"]] == [i["score"] for i in e["items"]]  # float32, exactly


def test_a_v1_request_is_answered_as_offline_and_names_its_version(tmp_path):
    model = transformer(tmp_path, 4)
    answer, headers = call(model, {"instances": ROWS.tolist()})
    same(answer["predictions"], offline(ROWS))
    assert headers == {"x-model-version": "4"}
    assert model._predictor.calls == [(4, 5)]


def test_rows_as_objects_and_the_sklearn_kernels_answer_alike(tmp_path):
    model = transformer(tmp_path, 4, kernels="sklearn", coalesce_inflight=0)
    answer, _ = call(model, {"instances": [{"b": float(b), "a": float(a)} for a, b in ROWS]})
    same(answer["predictions"], offline(ROWS))


def test_a_v2_request_is_answered_with_fused_modes_tensors(tmp_path):
    from transformer.codec_v2 import from_rest

    model = transformer(tmp_path, 4)
    body = b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [5, 2], "data": %s}]}' % (
        str(ROWS.ravel().tolist()).encode())
    answer, headers = call(model, from_rest(body))
    tensors = {o["name"]: o["data"] for o in orjson.loads(answer.body)["outputs"]}
    expected = offline(ROWS)
    assert tensors["segment"] == [p["segment"] for p in expected]
    assert tensors["item_ids"] == [i for p in expected for i in ([j["id"] for j in p["items"]] + [""] * 2)[:2]]
    assert headers == {"x-model-version": "4"}
    assert model.get_input_types() == [{"name": "features", "datatype": "FP64", "shape": [-1, 2]}]
    assert [o["datatype"] for o in model.get_output_types()] == ["INT64", "FP32", "BYTES", "FP32"]


def test_a_request_whose_version_tf_serving_dropped_is_answered_once_more_by_the_other(tmp_path):
    tf_serving = TFServing(3)
    model = transformer(tmp_path, 3, 4, tf_serving=tf_serving)

    async def go():
        await model.versions.refresh()  # version 3 answers (and its metadata is checked)
        tf_serving.states[4] = "AVAILABLE"
        await model.versions.refresh()  # then version 4
        tf_serving.gone.add(4)  # unloaded, but TF Serving still lists it AVAILABLE a moment longer
        return await model({"instances": ROWS[:2].tolist()}, {})

    answer, headers = asyncio.run(go())
    same(answer["predictions"], offline(ROWS[:2]))
    assert headers == {"x-model-version": "3"} and tf_serving.calls == [(4, 2), (3, 2)]


def test_a_dropped_version_with_no_other_to_answer_is_tf_servings_own_503(tmp_path):
    tf_serving = TFServing(4)
    model = transformer(tmp_path, 4, tf_serving=tf_serving)
    tf_serving.gone.add(4)
    with pytest.raises(VersionNotServed) as caught:
        call(model, {"instances": ROWS[:1].tolist()})
    assert (caught.value.status, str(caught.value)) == (503, "TF Serving does not serve version 4")
    assert tf_serving.calls == [(4, 1)]  # not tried again on the same version


def test_grpc_requests_go_through_the_edge_and_fail_with_grpc_codes(tmp_path):
    from kserve import InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    model = transformer(tmp_path, 4, admission=Admission(max_requests=4))

    def infer(shape, values):
        request = pb.ModelInferRequest(model_name="embedder", id="g-1")
        request.inputs.add(name="features", datatype="FP64", shape=shape).contents.fp64_contents.extend(values)
        return InferRequest.from_grpc(request)

    response, _ = call(model, infer([5, 2], ROWS.ravel().tolist()))
    assert response.outputs[0].name == "segment"
    assert response.outputs[0].as_numpy().tolist() == [p["segment"] for p in offline(ROWS)]
    with pytest.raises(GrpcException) as caught:
        call(model, infer([1, 3], [1.0, 2.0, 3.0]))
    assert caught.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "inputs[0] 'features': shape [1, 3], expected [n, 2] (features in this order: a, b)"
    assert model.admission.requests == 0


def test_a_missing_or_unusable_model_store_stops_the_start(tmp_path):
    empty = EmbedderTransformer("embedder", tmp_path / "nothing", predictor_host="unused")
    with pytest.raises(BundleError) as caught:
        empty.load()
    assert str(caught.value) == (f"no model version under {tmp_path / 'nothing'} has a usable bundle (no numeric "
                                 "version folders there): run `python -m model.train`, and point --model_base_path at "
                                 "the folder TF Serving serves (it holds the version folders)")
    new_version(tmp_path, 2)  # a SavedModel without its bundle
    bare = EmbedderTransformer("embedder", tmp_path / "embedder", predictor_host="unused")
    with pytest.raises(BundleError) as caught:
        bare.load()
    assert str(caught.value).startswith(f"no model version under {tmp_path / 'embedder'} has a usable bundle: "
                                        "version 2: no manifest.json in ")


def test_no_predictor_host_is_a_503_naming_the_flag(tmp_path):
    write(new_version(tmp_path, 4))
    model = EmbedderTransformer("embedder", tmp_path / "embedder")
    model.load()
    with pytest.raises(PredictorError) as caught:
        model.predictor
    assert (caught.value.status, str(caught.value)) == (503, "no predictor host configured: start with "
                                                             "--predictor_host HOST:PORT")

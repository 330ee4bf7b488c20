"""The Open Inference Protocol (v2) codec, in process: each request form read exactly, each bad request
refused with its whole message, status and cause, each answer form written byte for byte.

The same codec serves REST and gRPC (tests/test_protocols.py sends these through the running server with
KServe's clients); here every branch is reached without a server, so the mutation run judges it.
"""

import json
import struct
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from transformer.protocols.v1 import RequestError
from transformer.protocols.v2 import (
    HEADER_LENGTH, V2Codec, V2Request, datatype_of, encode_rest, from_infer_request, from_rest, output_tensors,
    parse_v2, tensor_metadata,
)

FEATURE_NAMES = tuple(f"f{i}" for i in range(3))
ORDER = "(features in this order: f0, f1, f2)"
HINT = 'send {"inputs": [{"name": "features", "datatype": "FP64", "shape": [n, F], "data": [...]}]}'
NO_INPUTS = f"the body must be an object with a non-empty list 'inputs'; {HINT}"
PER_FEATURE = "inputs: send one tensor 'features' [n, 3] or one tensor [n] per feature ({}); the features are: f0, f1, f2"


def v2_body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()  # json: integers beyond 64 bits too


def matrix(data=None, shape=(1, 3), datatype="FP64", name="features", **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape),
            "data": data if data is not None else [1.0] * int(np.prod(shape)), **extra}


def column(name, data, datatype="FP64", shape=None):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def binary(values: np.ndarray, datatype="FP64", name="features", extra=b"", size=None) -> tuple[bytes, int]:
    """A body in the binary tensor extension, and the length of its JSON part."""
    raw = values.tobytes()
    header = orjson.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(values.shape),
                                       "parameters": {"binary_data_size": len(raw) if size is None else size}}]})
    return header + raw + extra, len(header)


def read(body, header_length=None, max_rows=10):
    return parse_v2(from_rest(body, header_length), FEATURE_NAMES, max_rows)


def refused(call, *args) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args)
    return caught.value


NAN_AND = '{{"inputs": [{{"name": "features", "datatype": "FP64", "shape": [1, 3], "data": [NaN, {}, {}]}}]}}'
ONE_ROW = binary(np.ones((1, 3)))[0]

# (body, JSON length or None, status, cause, the whole message)
BAD_REQUESTS = [
    (b'{"inputs": []}', None, 400, "invalid_tensor", NO_INPUTS),
    (b'{"inputs": "x"}', None, 400, "invalid_tensor", NO_INPUTS),
    (b'[{"inputs": [1]}]', None, 400, "invalid_tensor", NO_INPUTS),
    (b'{"instances": [[1, 2, 3]]}', None, 400, "invalid_tensor",
     f"the body must be an object with a non-empty list 'inputs' (this endpoint takes v2 'inputs', not v1 "
     f"'instances'); {HINT}"),
    (b"", None, 400, "invalid_json", f"the body is empty; {HINT}"),
    (b'{"inputs": [', None, 400, "invalid_json",
     f"the body is not valid JSON: Expecting value at line 1 column 13; {HINT}"),
    (v2_body(5), None, 400, "invalid_tensor", "inputs[0]: each input needs a string 'name' and 'datatype'"),
    (v2_body({"datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}), None, 400, "invalid_tensor",
     "inputs[0]: each input needs a string 'name' and 'datatype'"),
    (v2_body({"name": "features", "shape": [1, 3], "data": [1, 2, 3]}), None, 400, "invalid_tensor",
     "inputs[0] 'features': each input needs a string 'name' and 'datatype'"),
    (v2_body(matrix(datatype="BYTES")), None, 400, "invalid_tensor",
     "inputs[0] 'features': datatype BYTES is not accepted; send FP64 or FP32 (one tensor per feature may also "
     "be INT64 or INT32)"),
    (v2_body(matrix(datatype="INT64")), None, 400, "invalid_tensor",
     "inputs[0] 'features': datatype INT64 is not accepted for the matrix; send FP64 or FP32"),
    (v2_body(matrix(shape=(1, 2))), None, 400, "invalid_tensor",
     f"inputs[0] 'features': shape [1, 2], expected [n, 3] {ORDER}"),
    (v2_body(matrix(shape=(1, 3, 1))), None, 400, "invalid_tensor",
     f"inputs[0] 'features': shape [1, 3, 1], expected [n, 3] {ORDER}"),
    (v2_body(matrix(shape=(3,))), None, 400, "invalid_tensor", f"inputs[0] 'features': shape [3], expected [n, 3] {ORDER}"),
    (v2_body(matrix(shape=[2**31, 3], data=[])), None, 400, "invalid_tensor",
     "inputs[0] 'features': 'shape' must be a list of non-negative integers, got [2147483648, 3]"),
    (v2_body(matrix(shape=[-1, 3], data=[])), None, 400, "invalid_tensor",
     "inputs[0] 'features': 'shape' must be a list of non-negative integers, got [-1, 3]"),
    (v2_body(matrix(shape=[True, 3], data=[])), None, 400, "invalid_tensor",
     "inputs[0] 'features': 'shape' must be a list of non-negative integers, got [True, 3]"),
    (v2_body(matrix(shape=[1] * 9, data=[1])), None, 400, "invalid_tensor",
     "inputs[0] 'features': 'shape' must be a list of non-negative integers, got [1, 1, 1, 1, 1, 1, 1, 1, 1]"),
    (v2_body({"name": "features", "datatype": "FP64", "shape": "1x3", "data": [1, 2, 3]}), None, 400,
     "invalid_tensor", "inputs[0] 'features': 'shape' must be a list of non-negative integers, got 1x3"),
    (v2_body(matrix(shape=(2, 3), data=[1.0] * 5)), None, 400, "invalid_tensor",
     "inputs[0] 'features': its shape holds 6 values, got 5 values"),
    (v2_body(matrix(data="1 2 3")), None, 400, "invalid_tensor",
     "inputs[0] 'features': its shape holds 3 values, got 'data' of type str"),
    (v2_body(matrix(data=[1.0, 2.0, "x"])), None, 400, "invalid_value",
     "inputs[0] 'features': value 2 must be a number, got str 'x'"),
    (v2_body(matrix(data=[1.0, True, 3])), None, 400, "invalid_value",
     "inputs[0] 'features': value 1 must be a number, got bool 'True'"),
    (v2_body(matrix(data=[None, 2, 3])), None, 400, "invalid_value",
     "inputs[0] 'features': value 0 must be a number, got NoneType 'None'"),
    (v2_body(matrix(data=[[1], 2, 3])), None, 400, "invalid_value",
     "inputs[0] 'features': value 0 must be a number, got list '[1]'"),
    (v2_body(matrix(data=[1, 2, "y" * 50])), None, 400, "invalid_value",
     f"inputs[0] 'features': value 2 must be a number, got str {'y' * 40!r}"),
    # Integers past 64 bits reach the codec as Python integers when a NaN token sends the body to the json
    # module (orjson reads them as floats): past float32, and past float64 too, they are named, not converted.
    (NAN_AND.format(10**40, -(10**40)).encode(), None, 400, "invalid_value",
     "inputs[0] 'features': value 1 must be within float32 range (|x| <= 3.403e+38), got " + "1" + "0" * 39),
    (NAN_AND.format(2, -(10**400)).encode(), None, 400, "invalid_value",
     "inputs[0] 'features': value 2 must be within float32 range (|x| <= 3.403e+38), got -" + "1" + "0" * 38),
    (v2_body(matrix(data=[1.0, 2.0, 1e300])), None, 400, "invalid_value",
     "row 0: feature 'f2' must be a finite number within float32 range, got 1e+300"),
    (v2_body(matrix(shape=(2, 3), data=[1, 2, 3, 4, -3.5e38, 6])), None, 400, "invalid_value",
     "row 1: feature 'f1' must be a finite number within float32 range, got -3.5e+38"),
    (b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3], "data": [1, NaN, 3]}]}', None, 400,
     "invalid_value", "row 0: feature 'f1' must be a finite number within float32 range, got nan"),
    (v2_body(matrix(shape=(0, 3), data=[])), None, 400, "invalid_tensor",
     "inputs[0] 'features': no rows; send at least one"),
    (v2_body(matrix(shape=(11, 3))), None, 413, "too_many_rows",
     "inputs[0] 'features': 11 rows, at most 10 are accepted per request; split the request"),
    (v2_body({"name": "features", "datatype": "FP64", "shape": [1, 3]}), None, 400, "invalid_tensor",
     f"inputs[0] 'features': no 'data', and no binary data of the size its 'binary_data_size' says after the "
     f"{HEADER_LENGTH} bytes of JSON"),
    (v2_body(column("f0", [1.5], "INT64"), column("f1", [1]), column("f2", [1])), None, 400, "invalid_value",
     "inputs[0] 'f0': value 0 must be a whole number for datatype INT64, got 1.5"),
    (v2_body(column("f1", [1]), column("f2", [1]), column("f0", [1, 2.25], "INT32")), None, 400, "invalid_value",
     "inputs[2] 'f0': value 1 must be a whole number for datatype INT32, got 2.25"),
    (v2_body(column("f0", [1])), None, 400, "invalid_tensor", PER_FEATURE.format("missing 'f1', 'f2'")),
    (v2_body(column("f0", [1]), column("f1", [1]), column("nope", [1])), None, 400, "invalid_tensor",
     PER_FEATURE.format("missing 'f2'; unknown 'nope'")),
    (v2_body(*(column(n, [1]) for n in ("f0", "f1", "f0", "f2"))), None, 400, "invalid_tensor",
     PER_FEATURE.format("repeated 'f0'")),
    (v2_body(matrix(), matrix()), None, 400, "invalid_tensor",
     "inputs: 'features' [n, 3] is the only tensor of the matrix form; 'features' comes 2 times: send it once (or "
     "send one tensor [n] per feature instead of 'features')"),
    # The valid matrix beside something else: only the something else is wrong.
    (v2_body(matrix(), column("x", [1])), None, 400, "invalid_tensor",
     "inputs: 'features' [n, 3] is the only tensor of the matrix form; remove 'x' (or send one tensor [n] per "
     "feature instead of 'features')"),
    (v2_body(column("f0", [1]), column("f1", [1, 2], shape=[1, 2]), column("f2", [1])), None, 400,
     "invalid_tensor", "inputs[1] 'f1': shape [1, 2], expected [n] (or [n, 1])"),
    (v2_body(column("f0", [1]), column("f1", [1], shape=[1, 1, 1]), column("f2", [1])), None, 400,
     "invalid_tensor", "inputs[1] 'f1': shape [1, 1, 1], expected [n] (or [n, 1])"),
    (v2_body(column("f2", [1, 2]), column("f1", [1]), column("f0", [1, 2])), None, 400, "invalid_tensor",
     "inputs[1] 'f1': 1 rows, the tensors before it have 2"),
    (v2_body(*(column(n, []) for n in FEATURE_NAMES)), None, 400, "invalid_tensor", "inputs: no rows; send at least one"),
    (v2_body(*(column(n, [1.0] * 11) for n in FEATURE_NAMES)), None, 413, "too_many_rows",
     "inputs: 11 rows, at most 10 are accepted per request; split the request"),
    (v2_body(matrix(), outputs=[{"name": "embedding"}, {"name": "segment"}, {"name": "x"}]), None, 400,
     "invalid_tensor", "outputs: unknown output(s) 'embedding', 'x'; this model answers segment, segment_distance, "
     "item_ids, item_scores"),
    (v2_body(matrix(), outputs={"name": "segment"}), None, 400, "invalid_tensor",
     "'outputs' must be a list of objects with a 'name'"),
    (v2_body(matrix(), outputs=[{"name": "segment"}, "item_ids"]), None, 400, "invalid_tensor",
     "'outputs' must be a list of objects with a 'name'"),
    (v2_body(matrix(), outputs=[{"name": 3}]), None, 400, "invalid_tensor",
     "'outputs' must be a list of objects with a 'name'"),
    # the binary tensor extension
    (ONE_ROW, 0, 400, "invalid_tensor", f"the {HEADER_LENGTH} header says 0 bytes of JSON, the body has "
                                        f"{len(ONE_ROW)}"),
    (ONE_ROW, len(ONE_ROW) + 1, 400, "invalid_tensor",
     f"the {HEADER_LENGTH} header says {len(ONE_ROW) + 1} bytes of JSON, the body has {len(ONE_ROW)}"),
    (*binary(np.ones((1, 3)), extra=b"\0" * 8), 400, "invalid_tensor",
     "8 bytes after the last binary input: the inputs' binary_data_size values do not add up to the body"),
    (*binary(np.ones((1, 3)), size=16), 400, "invalid_tensor",
     "inputs[0] 'features': 16 bytes of FP64 data for shape [1, 3] (24 expected)"),
    (*binary(np.ones((1, 3)), size=32), 400, "invalid_tensor",
     f"inputs[0] 'features': no 'data', and no binary data of the size its 'binary_data_size' says after the "
     f"{HEADER_LENGTH} bytes of JSON"),
    (*binary(np.ones((1, 3)), size=-1), 400, "invalid_tensor",
     f"inputs[0] 'features': no 'data', and no binary data of the size its 'binary_data_size' says after the "
     f"{HEADER_LENGTH} bytes of JSON"),
    (*binary(np.ones((1, 3)), size=24.0), 400, "invalid_tensor",
     f"inputs[0] 'features': no 'data', and no binary data of the size its 'binary_data_size' says after the "
     f"{HEADER_LENGTH} bytes of JSON"),
    (*binary(np.zeros((0, 3))), 400, "invalid_tensor", "inputs[0] 'features': no rows; send at least one"),
    (*binary(np.array([[1.0, np.inf, 3.0]])), 400, "invalid_value",
     "row 0: feature 'f1' must be a finite number within float32 range, got inf"),
]


@pytest.mark.parametrize("body, header_length, status, cause, message", BAD_REQUESTS)
def test_each_bad_request_is_refused_with_its_whole_message(body, header_length, status, cause, message):
    error = refused(read, body, header_length)
    assert (str(error), error.status, error.cause) == (message, status, cause)


def test_exactly_the_row_limit_is_accepted_in_both_forms():
    assert read(v2_body(matrix(shape=(10, 3)))).shape == (10, 3)
    assert read(v2_body(*(column(n, [1.0] * 10) for n in FEATURE_NAMES))).shape == (10, 3)
    assert read(v2_body(matrix(shape=(1, 3))), max_rows=1).shape == (1, 3)


def test_float32_range_edges_are_accepted():
    edge = float(np.finfo(np.float32).max)
    X = read(v2_body(matrix(data=[edge, -edge, 3])))
    assert X.tolist() == [[edge, -edge, 3.0]]
    whole = int(edge)  # an integer at the float32 limit: accepted
    assert read(v2_body(matrix(data=[whole, 1, 2])))[0, 0] == float(whole)


def test_a_well_formed_request_is_read_with_its_options():
    body = v2_body(matrix(data=[[1, 2.5, 3]]), id="req-7", parameters={"binary_data_output": True},
                   outputs=[{"name": "item_ids", "parameters": {"binary_data": False}}, {"name": "segment"},
                            {"name": "item_scores", "parameters": {"binary_data": True}},
                            {"name": "segment_distance", "parameters": {"other": 1}}])
    request = from_rest(body)
    assert request == V2Request("req-7", request.inputs, ("item_ids", "segment", "item_scores", "segment_distance"),
                                True, False, {"item_ids": False, "item_scores": True})
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("features", "FP64", (1, 3))
    assert tensor.values.dtype == np.float64 and tensor.values.tolist() == [1.0, 2.5, 3.0]
    assert parse_v2(request, FEATURE_NAMES, 10).tolist() == [[1.0, 2.5, 3.0]]


@pytest.mark.parametrize("extra, expected", [
    ({}, (None, None, False, {})),
    ({"id": 5, "parameters": "binary"}, (None, None, False, {})),  # an id must be text; parameters an object
    ({"id": "", "parameters": {"binary_data_output": False}}, ("", None, False, {})),
    ({"outputs": None}, (None, None, False, {})),
    ({"outputs": [{"name": "segment", "parameters": None}]}, (None, ("segment",), False, {})),
])
def test_the_options_a_request_leaves_out_take_their_defaults(extra, expected):
    request = from_rest(v2_body(matrix(), **extra))
    assert (request.id, request.outputs, request.binary_outputs, request.output_binary) == expected
    assert request.grpc is False


def test_the_binary_extension_reads_the_exact_values():
    values = np.array([[0.1, 2, 3], [4, 5, 1e30]], dtype=np.float32)
    body, length = binary(values, "FP32")
    X = read(body, length)
    assert X.dtype == np.float64 and X.tolist() == values.astype(np.float64).tolist()
    # The JSON part may end exactly at the body's end when every input carries its data in JSON.
    body = v2_body(matrix(data=[1, 2, 3]))
    assert read(body, len(body)).tolist() == [[1.0, 2.0, 3.0]]


def test_binary_and_json_inputs_mix_in_their_order():
    f0 = np.array([1, 2], dtype="<i4")
    f2 = np.array([5.5, 6.5], dtype="<f8")
    header = orjson.dumps({"inputs": [
        {"name": "f0", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "f1", "datatype": "INT64", "shape": [2, 1], "data": [[3], [4]]},
        {"name": "f2", "datatype": "FP64", "shape": [2], "parameters": {"binary_data_size": 16}}]})
    X = read(header + f0.tobytes() + f2.tobytes(), len(header))
    assert X.tolist() == [[1.0, 3.0, 5.5], [2.0, 4.0, 6.5]]


def test_per_feature_tensors_in_any_order_and_nested_data():
    columns = [{"name": name, "datatype": "INT64" if i == 1 else "FP64", "shape": [2, 1],
                "data": [[float(i)], [float(10 + i)]]} for i, name in reversed(list(enumerate(FEATURE_NAMES)))]
    assert read(v2_body(*columns)).tolist() == [[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]


# -- from KServe's InferRequest (what its gRPC servicer hands over) --------------------------------------------


def grpc_request(*inputs, raw: list[bytes] = (), outputs=(), request_id="", binary_outputs=False):
    from kserve import InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="embedder", id=request_id)
    for name, datatype, shape, values in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if values is not None:
            field = {"FP64": "fp64_contents", "FP32": "fp32_contents", "INT64": "int64_contents",
                     "INT32": "int_contents", "BYTES": "bytes_contents"}[datatype]
            getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    if binary_outputs:
        request.parameters["binary_data_output"].bool_param = True
    return InferRequest.from_grpc(request)


def test_a_grpc_request_in_both_forms():
    matrix_form = from_infer_request(grpc_request(("features", "FP64", [2, 3], [1, 2, 3, 4, 5, 6]),
                                                  request_id="g-1", outputs=["segment"]))
    assert (matrix_form.id, matrix_form.outputs, matrix_form.grpc) == ("g-1", ("segment",), True)
    assert parse_v2(matrix_form, FEATURE_NAMES, 10).tolist() == [[1, 2, 3], [4, 5, 6]]
    columns = from_infer_request(grpc_request(("f2", "INT32", [1], [7]), ("f0", "FP32", [1], [0.5]),
                                              ("f1", "INT64", [1, 1], [2])))
    assert (columns.id, columns.outputs, columns.binary_outputs) == (None, None, False)
    assert parse_v2(columns, FEATURE_NAMES, 10).tolist() == [[0.5, 2.0, 7.0]]
    raw = from_infer_request(grpc_request(("features", "FP32", [1, 3], None),
                                          raw=[np.array([1, 2, 3], dtype="<f4").tobytes()], binary_outputs=True))
    assert raw.binary_outputs is True and parse_v2(raw, FEATURE_NAMES, 10).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("inputs, raw, message", [
    ([("features", "BYTES", [1, 3], [b"1", b"2", b"3"])], [], "inputs[0] 'features': datatype BYTES is not "
     "accepted; send FP64 or FP32 (one tensor per feature may also be INT64 or INT32)"),
    ([("features", "FP64", [1, 3], None)], [b"\0" * 7], "inputs[0] 'features': 7 bytes of FP64 data for shape "
     "[1, 3] (24 expected)"),
    ([("features", "FP64", [2, 3], [1, 2, 3])], [], "inputs[0] 'features': its shape holds 6 values, got 3 values"),
    ([("features", "FP64", [1, -2], [])], [], "inputs[0] 'features': 'shape' must be a list of non-negative "
     "integers, got [1, -2]"),
    ([], [], f"the request must have a non-empty list 'inputs'; {HINT}"),
])
def test_a_bad_grpc_request_is_refused_with_its_whole_message(inputs, raw, message):
    error = refused(from_infer_request, grpc_request(*inputs, raw=raw))
    assert (str(error), error.status, error.cause) == (message, 400, "invalid_tensor")


# -- answers ---------------------------------------------------------------------------------------------------


def tensors(text_ids=False):
    ids = np.array([["sku-1", "sku-22"], ["sku-3", "sku-4"]]) if text_ids else np.array([[4, 1], [0, 3]])
    return output_tensors(np.array([2, 0]), np.array([0.1, 1.0]), ids,
                          np.array([[0.7, 0.2], [0.9, 0.3]], dtype=np.float32),
                          np.array([[True, False], [True, True]]))


def test_answer_tensors_are_padded_and_typed_as_fused_mode_answers():
    numbers, text = tensors(), tensors(text_ids=True)
    assert list(numbers) == ["segment", "segment_distance", "item_ids", "item_scores"]
    assert {k: v.dtype.str for k, v in numbers.items()} == {"segment": "<i8", "segment_distance": "<f4",
                                                            "item_ids": "<i8", "item_scores": "<f4"}
    assert numbers["item_ids"].tolist() == [[4, -1], [0, 3]]
    assert numbers["item_scores"].tolist() == [[np.float32(0.7), -1.0], [np.float32(0.9), np.float32(0.3)]]
    assert numbers["segment_distance"].tolist() == [np.float32(0.1), 1.0]
    assert text["item_ids"].dtype == object and text["item_ids"].tolist() == [["sku-1", ""], ["sku-3", "sku-4"]]
    assert [datatype_of(v) for v in text.values()] == ["INT64", "FP32", "BYTES", "FP32"]
    assert datatype_of(np.zeros(1)) == "FP64"


def test_a_json_answer_writes_float32_as_its_shortest_text():
    body, json_length = encode_rest(tensors(text_ids=True), V2Request(id="x", inputs=()), "embedder", "3")
    assert json_length is None
    assert body == (b'{"model_name":"embedder","model_version":"3","outputs":['
                    b'{"name":"segment","datatype":"INT64","shape":[2],"data":[2,0]},'
                    b'{"name":"segment_distance","datatype":"FP32","shape":[2],"data":[0.1,1.0]},'
                    b'{"name":"item_ids","datatype":"BYTES","shape":[2,2],"data":["sku-1","","sku-3","sku-4"]},'
                    b'{"name":"item_scores","datatype":"FP32","shape":[2,2],"data":[0.7,-1.0,0.9,0.3]}],"id":"x"}')
    no_id, _ = encode_rest(tensors(), V2Request(id=None, inputs=(), outputs=("item_scores", "segment")), "m", "1")
    assert orjson.loads(no_id) == {"model_name": "m", "model_version": "1", "outputs": [
        {"name": "item_scores", "datatype": "FP32", "shape": [2, 2], "data": [0.7, -1.0, 0.9, 0.3]},
        {"name": "segment", "datatype": "INT64", "shape": [2], "data": [2, 0]}]}


def test_a_binary_answer_carries_each_tensor_after_the_json_and_honours_each_output_choice():
    request = V2Request(id=None, inputs=(), outputs=("item_ids", "segment", "item_scores"), binary_outputs=True,
                        output_binary={"segment": False})
    body, json_length = encode_rest(tensors(text_ids=True), request, "embedder", "2")
    header = orjson.loads(body[:json_length])
    assert [(o["name"], o.get("parameters"), o.get("data")) for o in header["outputs"]] == [
        ("item_ids", {"binary_data_size": 4 * 4 + 5 + 0 + 5 + 5}, None), ("segment", None, [2, 0]),
        ("item_scores", {"binary_data_size": 16}, None)]
    raw = body[json_length:]
    ids = b"".join(struct.pack("<I", len(t)) + t for t in (b"sku-1", b"", b"sku-3", b"sku-4"))
    assert raw == ids + np.array([0.7, -1.0, 0.9, 0.3], dtype="<f4").tobytes()
    # one output asked in binary while the rest stay JSON
    body, json_length = encode_rest(tensors(), V2Request(id=None, inputs=(), output_binary={"item_ids": True}),
                                    "embedder", "2")
    assert body[json_length:] == np.array([4, -1, 0, 3], dtype="<i8").tobytes()
    assert [o.get("parameters") for o in orjson.loads(body[:json_length])["outputs"]] == [
        None, None, {"binary_data_size": 32}, None]


def ranked(text_ids=False):
    ids = np.array([["sku-1", "sku-22"], ["sku-3", "sku-4"]]) if text_ids else np.array([[4, 1], [0, 3]])
    return SimpleNamespace(labels=np.array([2, 0]), distances=np.array([0.1, 1.0]), item_ids=ids,
                           item_scores=np.array([[0.7, 0.2], [0.9, 0.3]], dtype=np.float32),
                           keep=np.array([[True, False], [True, True]]))


def test_the_codec_answers_in_the_transport_it_was_asked_in():
    as_json = V2Codec(from_rest(v2_body(matrix()))).answer(ranked(), "embedder", 4)
    assert (as_json.media_type, as_json.headers) == ("application/json", {})
    assert orjson.loads(as_json.body)["model_version"] == "4"
    as_binary = V2Codec(from_rest(v2_body(matrix(), parameters={"binary_data_output": True}))).answer(
        ranked(), "embedder", 4)
    length = int(as_binary.headers[HEADER_LENGTH])
    assert as_binary.media_type == "application/octet-stream" and set(as_binary.headers) == {HEADER_LENGTH}
    assert len(as_binary.body) == length + 2 * 8 + 2 * 4 + 4 * 8 + 4 * 4
    assert orjson.loads(as_binary.body[:length])["model_version"] == "4"
    codec = V2Codec(grpc_request(("features", "FP64", [1, 3], [1, 2, 3]), request_id="g-2"))
    assert codec.rows(FEATURE_NAMES, 10).tolist() == [[1.0, 2.0, 3.0]]
    response = codec.answer(ranked(text_ids=True), "embedder", 4)
    assert (response.id, response.model_name, response.model_version) == ("g-2", "embedder", "4")
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name) == ["segment", "segment_distance", "item_ids", "item_scores"]
    assert by_name["item_ids"].datatype == "BYTES" and by_name["item_ids"].shape == [2, 2]
    assert by_name["item_ids"].as_numpy().tolist() == [["sku-1", ""], ["sku-3", "sku-4"]]
    assert by_name["item_scores"].as_numpy().tolist() == [[np.float32(0.7), -1.0], [np.float32(0.9),
                                                                                     np.float32(0.3)]]
    assert by_name["segment"].as_numpy().dtype == np.int64


def test_metadata_names_the_matrix_input_and_the_outputs():
    inputs, outputs = tensor_metadata(FEATURE_NAMES, 5, text_ids=False)
    assert inputs == [{"name": "features", "datatype": "FP64", "shape": [-1, 3]}]
    assert outputs == [{"name": "segment", "datatype": "INT64", "shape": [-1]},
                       {"name": "segment_distance", "datatype": "FP32", "shape": [-1]},
                       {"name": "item_ids", "datatype": "INT64", "shape": [-1, 5]},
                       {"name": "item_scores", "datatype": "FP32", "shape": [-1, 5]}]
    assert tensor_metadata(FEATURE_NAMES, 5, text_ids=True)[1][2]["datatype"] == "BYTES"


def test_shape_limits_are_exact():
    assert read(v2_body(matrix(shape=(100, 3))), max_rows=100).shape == (100, 3)  # dimensions past 2 * 31 too
    eight = refused(read, v2_body({**matrix(), "shape": [1] * 7 + [3]}))  # eight dimensions are a shape
    assert str(eight) == ("inputs[0] 'features': shape [1, 1, 1, 1, 1, 1, 1, 3], expected [n, 3] (features in this "
                          "order: f0, f1, f2)")
    nine = refused(read, v2_body({**matrix(), "shape": [2**31] * 9}))  # the shown shape is cut at 60 characters
    assert str(nine) == ("inputs[0] 'features': 'shape' must be a list of non-negative integers, got [2147483648, "
                         "2147483648, 2147483648, 2147483648, 2147483648,")
    largest = refused(read, v2_body({**matrix(), "shape": [2**31 - 1, 3]}), )
    assert "'shape' must be" not in str(largest)  # 2**31 - 1 is a dimension; the data does not match it


def test_an_integer_at_the_float32_limit_is_accepted():
    edge = int(np.finfo(np.float32).max)
    assert read(v2_body(matrix(data=[edge, -edge, 0]))).tolist() == [[float(edge), -float(edge), 0.0]]


def test_answers_name_the_model_and_keep_the_grpc_id_and_binary_choice():
    as_json = V2Codec(from_rest(v2_body(matrix()))).answer(ranked(), "embedder", 4)
    assert orjson.loads(as_json.body)["model_name"] == "embedder"
    plain = V2Codec(grpc_request(("features", "FP64", [1, 3], [1, 2, 3]))).answer(ranked(), "embedder", 4)
    assert plain.id == "" and len(plain.to_grpc().raw_output_contents) == 0
    # KServe's rule: a gRPC request sent as raw_input_contents is answered in raw_output_contents
    sent_raw = grpc_request(("features", "FP64", [1, 3], None), raw=[np.array([1.0, 2.0, 3.0]).tobytes()])
    raw = V2Codec(sent_raw).answer(ranked(), "embedder", 4).to_grpc()
    assert len(raw.raw_output_contents) == 4 and not raw.outputs[0].contents.int64_contents
    assert np.frombuffer(raw.raw_output_contents[0], np.int64).tolist() == ranked().labels.tolist()

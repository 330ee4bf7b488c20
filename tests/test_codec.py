"""Request parsing and validation: every bad request names the row, the field and what was expected."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import json_documents

from transformer.codec import RequestError, decode_body, encode_predictions, parse_instances

NAMES = ("a", "b", "c")


def parse(doc, max_rows=10):
    return parse_instances(doc, NAMES, max_rows)


def test_objects_and_lists_give_the_same_matrix():
    X = parse({"instances": [{"c": 3, "a": 1, "b": 2.5}, [1, 2.5, 3]]})
    np.testing.assert_array_equal(X, [[1, 2.5, 3], [1, 2.5, 3]])
    assert X.dtype == np.float64


@pytest.mark.parametrize(
    "doc, message",
    [
        ([1, 2], "must be a JSON object"),
        ({"inputs": [[1, 2, 3]]}, "no 'instances' field (this endpoint takes the row form"),
        ({"instances": {"a": 1}}, "'instances' must be a list of rows, got an object"),
        ({"instances": []}, "'instances' is empty"),
        ({"instances": [[1, 2]]}, "instances[0]: a list row must have 3 values in this order: a, b, c; got 2"),
        ({"instances": [[1, 2, 3], [1, 2, 3, 4]]}, "instances[1]: a list row must have 3 values"),
        ({"instances": [{"a": 1, "b": 2}]}, "instances[0]: missing feature(s) 'c'; expected exactly: a, b, c"),
        ({"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}]}, "instances[0]: unknown feature(s) 'd'"),
        ({"instances": [{"a": 1, "b": 2, "x": 4}]}, "missing feature(s) 'c'; unknown feature(s) 'x'"),
        ({"instances": [[1, "2", 3]]}, "instances[0]: feature 'b' must be a number, got a string '2'"),
        ({"instances": [[1, 2, True]]}, "feature 'c' must be a number, got a boolean"),
        ({"instances": [[None, 2, 3]]}, "feature 'a' must be a number, got null"),
        ({"instances": [[1, [2], 3]]}, "feature 'b' must be a number, got a list"),
        ({"instances": [[1, 2, {"v": 3}]]}, "feature 'c' must be a number, got an object"),
        ({"instances": [[1, 2, math.nan]]}, "feature 'c' must be a finite number, got nan"),
        ({"instances": [[1, math.inf, 3]]}, "feature 'b' must be a finite number, got inf"),
        ({"instances": [[1, 2, 1e39]]}, "feature 'c' must be a number within float32 range"),
        ({"instances": [[1, 2, 3], [1, 2, -(10**40)]]}, "instances[1]: feature 'c' must be a number within float32"),
        ({"instances": [[1, 2, 10**400]]}, "feature 'c' must be a number within float32"),
        ({"instances": ["abc"]}, "instances[0]: a row must be an object keyed by feature name or a list of 3 numbers"),
    ],
)
def test_bad_requests_are_named(doc, message):
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert message in str(info.value)
    assert info.value.status == 400


def test_too_many_rows_is_413():
    with pytest.raises(RequestError, match="11 rows, at most 10") as info:
        parse({"instances": [[1, 2, 3]] * 11})
    assert info.value.status == 413


def test_raw_bytes_are_parsed_and_garbage_is_named():
    assert decode_body(b'{"instances": []}') == {"instances": []}
    with pytest.raises(RequestError, match="not UTF-8"):
        decode_body(b"{\x80}")
    with pytest.raises(RequestError, match="not valid JSON: Expecting value at line 1 column 15"):
        decode_body(b'{"instances": }')
    assert math.isnan(decode_body(b'{"instances": [[NaN]]}')["instances"][0][0])


@settings(max_examples=300, deadline=None)
@given(json_documents(["a", "b", "c", "instances", "x"], max_leaves=20))
def test_any_json_either_parses_or_is_a_request_error(doc):
    try:
        X = parse(doc)
    except RequestError:
        return
    assert X.ndim == 2 and X.shape[1] == 3 and np.isfinite(X).all()


def test_response_shape_and_float32_values():
    body = encode_predictions(
        labels=np.array([2, 0]),
        distances=np.array([0.123456789, 1.0]),
        item_ids=np.array([[4, 1], [0, 3]]),
        item_scores=np.array([[0.75, 0.5], [0.9, 0.3]], dtype=np.float32),
        keep=np.array([[True, False], [True, True]]),
    )
    assert body["predictions"][0]["segment"] == 2
    assert body["predictions"][0]["items"] == [{"id": 4, "score": np.float32(0.75)}]
    assert [i["id"] for i in body["predictions"][1]["items"]] == [0, 3]
    assert body["predictions"][0]["segment_distance"].dtype == np.float32


# -- the Open Inference Protocol (v2) codec ---------------------------------------------------------

FEATURE_NAMES = tuple(f"f{i}" for i in range(3))


def v2_body(*inputs, **extra) -> bytes:
    import json

    return json.dumps({"inputs": list(inputs), **extra}).encode()  # json: integers beyond 64 bits too


@pytest.mark.parametrize("body, header_length, message", [
    (b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3], '
     b'"parameters": {"binary_data_size": 24}}]}' + np.ones(3).tobytes(), 200, "header says 200 bytes of JSON"),
    (b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3], '
     b'"parameters": {"binary_data_size": 24}}]}' + np.ones(2).tobytes(), 111, "no binary data of the size"),
    (b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3], '
     b'"parameters": {"binary_data_size": 24}}]}' + np.ones(4).tobytes(), 111, "8 bytes after the last binary input"),
    (b'{"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3], '
     b'"parameters": {"binary_data_size": 16}}]}' + np.ones(2).tobytes(), 111, "16 bytes of FP64 data for shape [1, 3]"),
])
def test_v2_binary_extension_errors(body, header_length, message):
    from transformer.codec_v2 import from_rest

    with pytest.raises(RequestError, match=re.escape(message)):
        from_rest(body, header_length)


def test_v2_binary_extension_reads_the_exact_values():
    from transformer.codec_v2 import from_rest, parse_v2

    header = (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 3], '
              b'"parameters": {"binary_data_size": 24}}]}')
    values = np.array([[0.1, 2, 3], [4, 5, 1e30]], dtype=np.float32)
    X = parse_v2(from_rest(header + values.tobytes(), len(header)), FEATURE_NAMES, 10)
    assert X.dtype == np.float64 and X.tolist() == values.astype(np.float64).tolist()


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "f0", "datatype": "INT64", "shape": [1], "data": [1.5]}], "value 0 must be a whole number for "
                                                                         "datatype INT64, got 1.5"),
    ([{"name": "features", "datatype": "FP64", "shape": [2**31, 3], "data": []}], "'shape' must be a list of "
                                                                                  "non-negative integers"),
    ([{"name": "features", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 10**40]}],
     "row 0: feature 'f2' must be a finite number within float32 range, got 1e+40"),
    ([{"name": "features", "datatype": "FP64", "shape": [1, 3]}], "no 'data', and no binary data"),
    ([{"datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}], "each input needs a string 'name'"),
])
def test_v2_values_are_checked_not_coerced(inputs, message):
    from transformer.codec_v2 import from_rest, parse_v2

    with pytest.raises(RequestError, match=re.escape(message)):
        parse_v2(from_rest(v2_body(*inputs)), FEATURE_NAMES, 10)


def test_v2_per_feature_tensors_in_any_order_and_nested_data():
    from transformer.codec_v2 import from_rest, parse_v2

    columns = [{"name": name, "datatype": "INT64" if i == 1 else "FP64", "shape": [2, 1],
                "data": [[float(i)], [float(10 + i)]]} for i, name in reversed(list(enumerate(FEATURE_NAMES)))]
    X = parse_v2(from_rest(v2_body(*columns)), FEATURE_NAMES, 10)
    assert X.tolist() == [[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]
    with pytest.raises(RequestError, match=r"inputs\[1\] 'f1': 1 rows, the tensors before it have 2"):
        columns[1] = {**columns[1], "shape": [1], "data": [1.0]}
        parse_v2(from_rest(v2_body(*columns)), FEATURE_NAMES, 10)


def test_v2_answer_pads_and_writes_float32_shortest():
    import orjson

    from transformer.codec_v2 import V2Request, encode_rest, output_tensors

    tensors = output_tensors(np.array([2]), np.array([0.1]), np.array([["sku-1", "sku-2"]]),
                             np.array([[np.float32(0.7), np.float32(0.2)]]), np.array([[True, False]]))
    body, json_length = encode_rest(tensors, V2Request(id="x", inputs=()), "embedder", "3")
    assert json_length is None
    doc = orjson.loads(body)
    assert doc["model_version"] == "3" and doc["id"] == "x"
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["item_ids"] == {"name": "item_ids", "datatype": "BYTES", "shape": [1, 2], "data": ["sku-1", ""]}
    assert by_name["item_scores"]["data"] == [0.7, -1.0]
    assert b'"data":[0.7,-1.0]' in body and b'"data":[0.1]' in body  # float32 0.7 written as 0.7

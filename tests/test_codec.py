"""Request parsing and validation: every bad request names the row, the field and what was expected."""

import math

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

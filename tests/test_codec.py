"""Request parsing and validation: every bad request names the row, the field and what was expected."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import json_documents, valid_rows

from transformer.protocols.v1 import RequestError, decode_body, encode_predictions, parse_instances

NAMES = ("a", "b", "c")


def parse(doc, max_rows=10):
    return parse_instances(doc, NAMES, max_rows)


def test_objects_and_lists_give_the_same_matrix():
    X = parse({"instances": [{"c": 3, "a": 1, "b": 2.5}, [1, 2.5, 3]]})
    np.testing.assert_array_equal(X, [[1, 2.5, 3], [1, 2.5, 3]])
    assert X.dtype == np.float64


EXPECTED = "must be a number within float32 range (|x| <= 3.403e+38), got"
ROW_FORM = "a row must be an object keyed by feature name or a list of 3 numbers, got"

# (document, status, cause, the whole message)
BAD_REQUESTS = [
    ([1, 2], 400, "invalid_request", 'the body must be a JSON object like {"instances": [...]}, got a list'),
    (3.25, 400, "invalid_request", 'the body must be a JSON object like {"instances": [...]}, got 3.25'),
    ("x" * 50, 400, "invalid_request",
     f'the body must be a JSON object like {{"instances": [...]}}, got a string {"x" * 40!r}'),
    ({"inputs": [[1, 2, 3]]}, 400, "invalid_request",
     "the body has no 'instances' field (this endpoint takes the row form 'instances', not 'inputs')"),
    ({"other": 1}, 400, "invalid_request", "the body has no 'instances' field"),
    ({"instances": {"a": 1}}, 400, "invalid_request", "'instances' must be a list of rows, got an object"),
    ({"instances": []}, 400, "invalid_request", "'instances' is empty: send at least one row"),
    ({"instances": [[1, 2, 3]] * 11}, 413, "too_many_rows",
     "'instances' has 11 rows, at most 10 are accepted per request; split the request"),
    ({"instances": [[1, 2]]}, 400, "invalid_row", "instances[0]: a list row must have 3 values in this order: a, b, c; "
                                                  "got 2"),
    ({"instances": [[1, 2, 3], [1, 2, 3, 4]]}, 400, "invalid_row",
     "instances[1]: a list row must have 3 values in this order: a, b, c; got 4"),
    ({"instances": [{"a": 1, "b": 2}]}, 400, "invalid_row", "instances[0]: missing feature(s) 'c'; expected exactly: "
                                                            "a, b, c"),
    ({"instances": [{"c": 1}]}, 400, "invalid_row", "instances[0]: missing feature(s) 'a', 'b'; expected exactly: "
                                                    "a, b, c"),
    ({"instances": [{"a": 1, "b": 2, "c": 3, "d": 4}]}, 400, "invalid_row",
     "instances[0]: unknown feature(s) 'd'; expected exactly: a, b, c"),
    ({"instances": [{"a": 1, "b": 2, "y": 4, "x": 5}]}, 400, "invalid_row",
     "instances[0]: missing feature(s) 'c'; unknown feature(s) 'x', 'y'; expected exactly: a, b, c"),
    ({"instances": ["abc"]}, 400, "invalid_row", f"instances[0]: {ROW_FORM} a string 'abc'"),
    ({"instances": [[1, 2, 3], 5]}, 400, "invalid_row", f"instances[1]: {ROW_FORM} 5"),
    ({"instances": [[1, "2", 3]]}, 400, "invalid_value", "instances[0]: feature 'b' must be a number, got a string '2'"),
    ({"instances": [[1, 2, "z" * 60]]}, 400, "invalid_value",
     f"instances[0]: feature 'c' must be a number, got a string {'z' * 40!r}"),
    ({"instances": [[1, 2, True]]}, 400, "invalid_value", "instances[0]: feature 'c' must be a number, got a boolean"),
    ({"instances": [[None, 2, 3]]}, 400, "invalid_value", "instances[0]: feature 'a' must be a number, got null"),
    ({"instances": [[1, [2], 3]]}, 400, "invalid_value", "instances[0]: feature 'b' must be a number, got a list"),
    ({"instances": [[1, 2, {"v": 3}]]}, 400, "invalid_value", "instances[0]: feature 'c' must be a number, got an "
                                                              "object"),
    ({"instances": [[1, 2, math.nan]]}, 400, "invalid_value", "instances[0]: feature 'c' must be a finite number, "
                                                              "got nan"),
    ({"instances": [[1, 2, 3], [1, -math.inf, 3]]}, 400, "invalid_value",
     "instances[1]: feature 'b' must be a finite number, got -inf"),
    ({"instances": [[1, 2, 1e39]]}, 400, "invalid_value", f"instances[0]: feature 'c' {EXPECTED} 1e+39"),
    ({"instances": [{"a": 1, "b": -3.5e38, "c": 3}]}, 400, "invalid_value",
     f"instances[0]: feature 'b' {EXPECTED} -3.5e+38"),
    ({"instances": [[1, 2, 3], [1, 2, 10**39]]}, 400, "invalid_value",  # 40 characters: written whole
     f"instances[1]: feature 'c' {EXPECTED} 1{'0' * 39}"),
    ({"instances": [[1, 2, -(10**39)]]}, 400, "invalid_value",  # 41: shortened
     f"instances[0]: feature 'c' {EXPECTED} -1{'0' * 18}...(41 characters)"),  # the first 20 characters
    ({"instances": [[1, 2, 10**400]]}, 400, "invalid_value",
     f"instances[0]: feature 'c' {EXPECTED} 1{'0' * 19}...(401 characters)"),
]


@pytest.mark.parametrize("doc, status, cause, message", BAD_REQUESTS)
def test_bad_requests_are_named(doc, status, cause, message):
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert (str(info.value), info.value.status, info.value.cause) == (message, status, cause)


def test_the_row_limit_and_float32_range_are_accepted_up_to_their_edges():
    assert parse({"instances": [[1, 2, 3]] * 10}).shape == (10, 3)
    edge = float(np.finfo(np.float32).max)
    assert parse({"instances": [[edge, -edge, int(edge)]]}).tolist() == [[edge, -edge, edge]]
    assert parse({"instances": [[1, 2, 3]]}, max_rows=1).shape == (1, 3)


@pytest.mark.parametrize("body, message", [
    (b"", 'the body is empty; send {"instances": [...]}'),
    (b" \n ", 'the body is empty; send {"instances": [...]}'),
    (b"{\x80}", 'the body is not UTF-8 text; send {"instances": [...]} as JSON'),
    (b'{"instances": }', 'the body is not valid JSON: Expecting value at line 1 column 15; send {"instances": [...]}'),
    (b"[" * 100_000, 'the body is nested too deeply; send {"instances": [...]} as JSON'),
])
def test_a_body_that_is_not_json_is_named(body, message):
    with pytest.raises(RequestError) as info:
        decode_body(body)
    assert (str(info.value), info.value.status, info.value.cause) == (message, 400, "invalid_json")


def test_raw_bytes_are_parsed_nan_tokens_included():
    assert decode_body(b'{"instances": []}') == {"instances": []}
    assert decode_body('{"instances": [1]}') == {"instances": [1]}
    assert math.isnan(decode_body(b'{"instances": [[NaN]]}')["instances"][0][0])
    assert decode_body({"instances": [2]}) == {"instances": [2]}  # already parsed by KServe


@settings(max_examples=300, deadline=None)
@given(json_documents(["a", "b", "c", "instances", "x"], max_leaves=20))
def test_any_json_either_parses_or_is_a_request_error(doc):
    try:
        X = parse(doc)
    except RequestError:
        return
    assert X.ndim == 2 and X.shape[1] == 3 and np.isfinite(X).all()


@settings(max_examples=300, deadline=None)
@given(valid_rows(list(NAMES)))
def test_any_valid_request_parses_to_exactly_its_numbers(request_and_rows):
    doc, rows = request_and_rows
    X = parse(doc)
    assert X.dtype == np.float64 and X.tolist() == rows


@settings(max_examples=400, deadline=None)
@given(st.one_of(valid_rows(list(NAMES)).map(lambda request: request[0]),
                 st.lists(json_documents(list(NAMES), max_leaves=12), min_size=1, max_size=4).map(
                     lambda rows: {"instances": rows})))
def test_the_fast_rows_accept_exactly_what_the_checked_rows_accept(doc):
    """The fast path (a few passes in C) takes a request only when the value-by-value checks would take it too,
    with the same matrix; everything else goes to the checks, which name the problem."""
    from transformer.protocols.v1 import _checked_rows, _plain_rows

    instances = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(instances, list) or not instances:
        return
    fast = _plain_rows(instances, NAMES)
    try:
        checked = _checked_rows(instances, NAMES)
    except RequestError:
        assert fast is None
        return
    assert fast is None or (fast.dtype == np.float64 and fast.tolist() == checked.tolist())


@pytest.mark.parametrize("doc, status, cause, message", [b for b in BAD_REQUESTS if isinstance(b[0], dict)
                                                         and isinstance(b[0].get("instances"), list)
                                                         and b[0]["instances"]])
def test_every_bad_row_of_the_battery_is_left_to_the_checks(doc, status, cause, message):
    from transformer.protocols.v1 import _plain_rows

    assert _plain_rows(doc["instances"], NAMES) is None or status == 413  # 413: too many rows, checked before


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


def test_a_model_of_one_feature_reads_rows_by_name_and_as_lists():
    X = parse_instances({"instances": [{"a": 1.5}, [2], {"a": -3}]}, ("a",), 10)
    assert X.shape == (3, 1) and X.tolist() == [[1.5], [2.0], [-3.0]]


def test_well_formed_rows_take_the_fast_parse_and_anything_else_the_checked_one():
    """The two parses give the same matrix; the fast one must be what well-formed rows get (it is the one
    measured), up to the float32 range's edge, integers and floats mixed, rows as lists or by name."""
    from transformer.protocols.v1 import FLOAT32_MAX, _plain_rows

    names = ("a", "b")
    for rows in ([[1, 2.5], [3.0, -4]], [{"a": 1, "b": 2.5}, {"b": -4, "a": 3.0}], [[FLOAT32_MAX, -FLOAT32_MAX]],
                 [[0, 0]]):
        fast = _plain_rows(rows, names)
        assert fast is not None, rows
        np.testing.assert_array_equal(fast, parse_instances({"instances": rows}, names, 100))
        assert fast.dtype == np.float64 and fast.shape == (len(rows), 2)
    for rows in ([[1, True]], [[1]], [{"a": 1}], [{"a": 1, "c": 2}], [[1, "2"]], [(1, 2)], [[1, 2 * FLOAT32_MAX]],
                 [[1, float("nan")]], [[1, 10 ** 400]]):
        assert _plain_rows(rows, names) is None, rows

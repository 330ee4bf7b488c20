"""TF Serving's JSON mapping for the predict API, in Python.

Follows ``tensorflow_serving/util/json_tensor.cc`` as the REST reference
(``g3doc/api_rest.md``) describes it: requests in row (``instances``) or
columnar (``inputs``) form; ``NaN``, ``Infinity`` and ``-Infinity`` accepted as
numbers; values checked against the signature's dtype, including TF Serving's
"without loss of precision" rule for floats; responses as ``predictions``
(one value, or an object per row when there are several outputs) or
``outputs``. Error texts are TF Serving's, so clients see the same messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import orjson


class TensorJsonError(ValueError):
    """An INVALID_ARGUMENT status: the request does not fit the signature (HTTP 400)."""


@dataclass(frozen=True)
class TensorSpecInfo:
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: unknown rank

    @property
    def tf_name(self) -> str:
        return _TF_NAMES.get(self.dtype, str(self.dtype))


_TF_NAMES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.int16): "int16",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.bool_): "bool",
    np.dtype(object): "string",
}
_FLOAT_LIMITS = {np.dtype(np.float32): (float(np.finfo(np.float32).max), (1 << 24) - 1),
                 np.dtype(np.float64): (float(np.finfo(np.float64).max), (1 << 53) - 1)}
_INT_RANGES = {
    np.dtype(np.int8): (-(1 << 7), (1 << 7) - 1),
    np.dtype(np.uint8): (0, (1 << 8) - 1),
    np.dtype(np.int16): (-(1 << 15), (1 << 15) - 1),
    np.dtype(np.int32): (-(1 << 31), (1 << 31) - 1),
    np.dtype(np.int64): (-(1 << 63), (1 << 63) - 1),
}


def loads(body: bytes) -> object:
    """Parse a request body like TF Serving (rapidjson with kParseNanAndInfFlag)."""
    if not body:
        raise TensorJsonError("JSON Parse error: The document is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # NaN / Infinity tokens, or really invalid: the standard parser decides
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        offset = getattr(exc, "pos", 0)
        raise TensorJsonError(f"JSON Parse error: Invalid value. at offset: {offset}") from None


def value_to_string(value: object) -> str:
    """JSON text of a value, for error messages (NaN/Infinity written as TF Serving does)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def _json_type(value: object) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _type_error(value: object, spec: TensorSpecInfo) -> TensorJsonError:
    return TensorJsonError(
        f"JSON Value: {value_to_string(value)} Type: {_json_type(value)} "
        f"is not of expected type: {spec.tf_name}"
    )


def _check_scalar(value: object, spec: TensorSpecInfo) -> None:
    kind = spec.dtype.kind
    is_number = type(value) in (int, float)  # bool is not a JSON number
    if kind == "f":
        if not is_number:
            raise _type_error(value, spec)
        max_float, max_int = _FLOAT_LIMITS[spec.dtype]
        if type(value) is int:
            lossless = abs(value) <= max_int
        else:
            lossless = not math.isfinite(value) or -max_float <= value <= max_float
        if not lossless:
            raise TensorJsonError(
                f"Cannot convert JSON value: {value_to_string(value)} to {spec.tf_name} "
                "without loss of precision."
            )
    elif kind in "iu":
        low, high = _INT_RANGES[spec.dtype]
        if type(value) is not int or not low <= value <= high:
            raise _type_error(value, spec)
    elif kind == "b":
        if type(value) is not bool:
            raise _type_error(value, spec)
    elif kind == "O":
        if not isinstance(value, str):
            raise _type_error(value, spec)


def _dense_shape(value: object) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: object, level: int, shape: list[int], spec: TensorSpecInfo, flat: list) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise TensorJsonError(
                f"JSON Value: {value_to_string(value)} found at incorrect level: {level + 1} "
                f"in the JSON DOM. Expected at level: {rank}"
            )
        if isinstance(value, dict):
            if spec.dtype.kind != "O" or not _is_b64(value):
                raise _type_error(value, spec)
            try:
                value = base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise TensorJsonError("Unable to base64 decode") from None
        else:
            _check_scalar(value, spec)
        flat.append(value)
        return
    if level >= rank:
        raise TensorJsonError(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise TensorJsonError(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    if level == rank - 1 and all(type(v) in (int, float) for v in value) and spec.dtype.kind == "f":
        for v in value:  # fast path for the innermost list of numbers
            _check_scalar(v, spec)
        flat.extend(value)
        return
    for item in value:
        _fill(item, level + 1, shape, spec, flat)


def value_to_array(value: object, spec: TensorSpecInfo) -> np.ndarray:
    """One JSON value (scalar or nested lists) as a dense array of the spec's dtype."""
    shape = _dense_shape(value)
    flat: list = []
    _fill(value, 0, shape, spec, flat)
    return np.array(flat, dtype=spec.dtype).reshape(shape)


def _is_b64(value: object) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def parse_predict_request(
    doc: object, inputs_of: Callable[[str], dict[str, TensorSpecInfo]]
) -> tuple[str, dict[str, np.ndarray], str]:
    """A parsed predict body -> (signature_name, input arrays, "row" or "columnar").

    ``inputs_of(signature_name)`` returns the signature's inputs {alias: TensorSpecInfo}
    and raises TensorJsonError when there is no such signature.
    """
    if not isinstance(doc, dict):
        raise TensorJsonError(f"JSON Value: {value_to_string(doc)} Is not object")
    signature_name = doc.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise TensorJsonError(
            f"JSON Value: {value_to_string(doc)} not formatted correctly. "
            "'signature_name' key must be a string value."
        )
    specs = inputs_of(signature_name)
    if "instances" in doc and "inputs" in doc:
        raise TensorJsonError(
            f"JSON Value: {value_to_string(doc)} Not formatted correctly expecting only one of "
            "'inputs' or 'instances' keys to exist "
        )
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise TensorJsonError(f"JSON Value: {value_to_string(doc)} Excepting 'instances' to be an list/array")
        if not instances:
            raise TensorJsonError(f"JSON Value: {value_to_string(doc)} No values in 'instances' array")
        return signature_name, _from_instances(instances, specs), "row"
    if "inputs" in doc:
        return signature_name, _from_inputs(doc["inputs"], specs), "columnar"
    raise TensorJsonError("Missing 'inputs' or 'instances' key")


def _from_instances(instances: list, specs: dict[str, TensorSpecInfo]) -> dict[str, np.ndarray]:
    def is_object(v: object) -> bool:
        return isinstance(v, dict) and not _is_b64(v)

    objects = is_object(instances[0])
    if not isinstance(instances[0], dict) and len(specs) > 1:
        raise TensorJsonError(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    names = set(specs)
    columns: dict[str, list] = {name: [] for name in specs}
    for index, element in enumerate(instances):
        if objects:
            if not is_object(element):
                raise TensorJsonError(f"Expecting object but got list at item {index} of input list")
            for name, item in element.items():
                if name not in specs:
                    raise TensorJsonError(
                        f"Failed to process element: {index} key: {name} of 'instances' list. "
                        f"Error: INVALID_ARGUMENT: JSON object: does not have named input: {name}"
                    )
                columns[name].append(item)
            if set(element) != names:
                raise TensorJsonError(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{value_to_string(element)} keys must be equal to: {','.join(sorted(names))}"
                )
        else:
            if is_object(element):
                raise TensorJsonError(f"Expecting value/list but got object at item {index} of input list")
            columns[next(iter(specs))].append(element)

    arrays = {}
    for name, items in columns.items():
        spec = specs[name]
        first_shape = _dense_shape(items[0])
        flat: list = []  # every element is checked and collected in one pass
        for index, item in enumerate(items):
            shape = _dense_shape(item)
            if shape != first_shape:
                size = int(np.prod(shape)) if shape else 1
                expected = int(np.prod(first_shape)) if first_shape else 1
                detail = (
                    f"Expecting tensor size: {expected} but got: {size}" if size != expected
                    else f"Expecting shape [{','.join(map(str, first_shape))}] but got: "
                    f"[{','.join(map(str, shape))}]"
                )
                raise TensorJsonError(
                    f"Failed to process element: {index} of 'instances' list. Error: INVALID_ARGUMENT: {detail}"
                )
            try:
                _fill(item, 0, first_shape, spec, flat)
            except TensorJsonError as exc:
                raise TensorJsonError(
                    f"Failed to process element: {index} of 'instances' list. Error: INVALID_ARGUMENT: {exc}"
                ) from None
        arrays[name] = np.array(flat, dtype=spec.dtype).reshape([len(items), *first_shape])
    return arrays


def _from_inputs(value: object, specs: dict[str, TensorSpecInfo]) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or _is_b64(value):
        if len(specs) > 1:
            raise TensorJsonError(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        name, spec = next(iter(specs.items()))
        return {name: value_to_array(value, spec)}
    arrays = {}
    for name, spec in specs.items():
        if name not in value:
            raise TensorJsonError(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = value_to_array(value[name], spec)
    return arrays


def check_shapes(arrays: dict[str, np.ndarray], specs: dict[str, TensorSpecInfo]) -> None:
    """Shape and alias checks TF Serving makes before running the signature."""
    extra = sorted(set(arrays) - set(specs))
    missing = sorted(set(specs) - set(arrays))
    if extra or missing:
        raise TensorJsonError(
            "Request inputs do not match required inputs for model. "
            f"Send extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
        )
    for name, array in arrays.items():
        shape = specs[name].shape
        if shape is None:
            continue
        fits = array.ndim == len(shape) and all(d is None or d == a for d, a in zip(shape, array.shape))
        if not fits:
            want = ",".join("-1" if d is None else str(d) for d in shape)
            got = ",".join(str(d) for d in array.shape)
            raise TensorJsonError(
                f"input tensor alias {name} has shape [{got}], the signature expects [{want}]"
            )


def _render_slow(value: np.ndarray, name: str = "") -> bytes:
    """Arrays holding NaN or Infinity, written with TF Serving's tokens, and string tensors: JSON strings, or
    ``{"b64": ...}`` when the tensor's name ends in ``_bytes`` (json_tensor.cc, IsNamedTensorBytes)."""
    def render(a) -> str:
        if isinstance(a, (bytes, str)):  # an element of a string tensor (an object array: NULs kept)
            raw = a if isinstance(a, bytes) else a.encode()
            return orjson.dumps({"b64": base64.b64encode(raw).decode()} if name.endswith("_bytes")
                                else raw.decode("utf-8", "replace")).decode()
        a = np.asarray(a)
        if a.ndim == 0:
            if a.dtype.kind == "f":
                if np.isnan(a):
                    return "NaN"
                if np.isinf(a):
                    return "Infinity" if a > 0 else "-Infinity"
                text = str(a)
                return text if ("." in text or "e" in text) else text + ".0"
            return orjson.dumps(a.item()).decode()
        return "[" + ",".join(render(x) for x in a) + "]"

    return render(value).encode()


def _is_finite(a: np.ndarray) -> bool:
    return a.dtype.kind != "f" or bool(np.isfinite(a).all())


def render_predict_response(outputs: dict[str, np.ndarray], form: str) -> bytes:
    """``{"predictions": ...}`` for row requests, ``{"outputs": ...}`` for columnar ones."""
    # String tensors (item ids, in fused mode) take the slow path: rare, and small.
    fast = all(_is_finite(a) and a.dtype.kind not in "OSU" for a in outputs.values())
    dump = (lambda v: orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY)) if fast else None

    if form == "columnar":
        if len(outputs) == 1:
            (array,) = outputs.values()
            body = dump(array) if fast else _render_slow(array, next(iter(outputs)))
        elif fast:
            body = dump(outputs)
        else:
            body = b"{" + b",".join(orjson.dumps(k) + b":" + _render_slow(v, k) for k, v in outputs.items()) + b"}"
        return b'{"outputs":' + body + b"}"

    batch = None
    for name, array in outputs.items():
        if array.ndim == 0:
            raise TensorJsonError(f"Tensor name: {name} has no shape information ")
        if batch is None:
            batch = array.shape[0]
        elif array.shape[0] != batch:
            raise TensorJsonError(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}"
            )
    if len(outputs) == 1:
        (array,) = outputs.values()
        body = dump(array) if fast else _render_slow(array, next(iter(outputs)))
    elif fast:
        names = list(outputs)
        arrays = [np.ascontiguousarray(outputs[n]) for n in names]
        body = dump([dict(zip(names, row)) for row in zip(*arrays)])
    else:
        rows = []
        for i in range(batch):
            rows.append(b"{" + b",".join(
                orjson.dumps(n) + b":" + _render_slow(a[i], n) for n, a in outputs.items()
            ) + b"}")
        body = b"[" + b",".join(rows) + b"]"
    return b'{"predictions":' + body + b"}"

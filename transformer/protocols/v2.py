"""The Open Inference Protocol (v2): requests to a feature matrix, answers to tensors.

REST ``POST /v2/models/{name}/infer`` (JSON, or JSON followed by binary tensors: the binary
tensor extension) and gRPC ``inference.GRPCInferenceService/ModelInfer`` (KServe's servicer
hands over an ``InferRequest``) take the same inputs, in either form::

    features                FP64 or FP32                 [n, F]   in the manifest's feature order
    one tensor per feature  FP64, FP32, INT64 or INT32   [n]      named as in the manifest

and give the same tensors as fused mode, so both modes answer alike::

    segment            INT64  [n]      nearest centroid
    segment_distance   FP32   [n]      distance to it
    item_ids           INT64  [n, k]   best first; -1 pads slots the rules left empty
                                       (BYTES, padded with "", when the catalogue's ids are strings)
    item_scores        FP32   [n, k]   the matching scores; -1.0 in padded slots

Every problem is a :class:`RequestError` naming the tensor and what was expected; the
statuses and messages are those of v1 (``v1.py``).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from transformer.store.bundle import PAD_ID, PAD_SCORE, PAD_TEXT_ID
from transformer.protocols.v1 import FLOAT32_MAX, RequestError, decode_json

FEATURES = "features"
OUTPUTS = ("segment", "segment_distance", "item_ids", "item_scores")
#: The datatypes accepted, and their numpy types (little-endian, as the binary extension sends them).
MATRIX_TYPES = {"FP64": "<f8", "FP32": "<f4"}
COLUMN_TYPES = {**MATRIX_TYPES, "INT64": "<i8", "INT32": "<i4"}
HEADER_LENGTH = "inference-header-content-length"
_HINT = ('send {"inputs": [{"name": "features", "datatype": "FP64", "shape": [n, F], "data": [...]}]}')


@dataclass(frozen=True)
class Tensor:
    """One input tensor: its name, datatype and shape, and its values flattened (raw bytes already decoded)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray


@dataclass(frozen=True)
class V2Request:
    """An inference request of either transport, checked for shape and decoded to numbers."""

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None = None  # the outputs asked for; None: all of them
    binary_outputs: bool = False  # REST: answer with the binary extension; gRPC: raw_output_contents
    grpc: bool = False
    output_binary: dict[str, bool] = field(default_factory=dict)  # REST: per output "binary_data"


@dataclass(frozen=True)
class EncodedAnswer:
    """A REST answer the codec has written: the body, its media type and the headers that describe it."""

    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _where(index: int, name: Any) -> str:
    return f"inputs[{index}]" + (f" '{name}'" if isinstance(name, str) else "")


def _datatype(where: str, datatype: str) -> str:
    if datatype not in COLUMN_TYPES:
        raise RequestError(f"{where}: datatype {datatype} is not accepted; send FP64 or FP32 (one tensor per "
                           "feature may also be INT64 or INT32)", cause="invalid_tensor")
    return datatype


def _numbers(where: str, datatype: str, data: Any, count: int) -> np.ndarray:
    """A JSON (or protobuf contents) list of ``count`` numbers, flat or nested, as numpy values."""
    if isinstance(data, list) and data and isinstance(data[0], list):
        data = list(itertools.chain.from_iterable(data)) if all(isinstance(d, list) for d in data) else data
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} values" if isinstance(data, list) else f"'data' of type {type(data).__name__}"
        raise RequestError(f"{where}: its shape holds {count} values, got {got}", cause="invalid_tensor")
    kinds = set(map(type, data))  # one pass in C; the slow searches below run only for a bad request
    if not kinds <= {int, float}:  # bool, str, None, nested lists: not numbers
        index, bad = next((i, v) for i, v in enumerate(data) if type(v) not in (int, float))
        raise RequestError(f"{where}: value {index} must be a number, got {type(bad).__name__} {str(bad)[:40]!r}",
                           cause="invalid_value")
    if int in kinds and any(type(v) is int and abs(v) > FLOAT32_MAX for v in data):
        index, bad = next((i, v) for i, v in enumerate(data) if type(v) is int and abs(v) > FLOAT32_MAX)
        raise RequestError(f"{where}: value {index} must be within float32 range (|x| <= {FLOAT32_MAX:.4g}), "
                           f"got {str(bad)[:40]}", cause="invalid_value")
    # float64 whatever the datatype says: an INT64 tensor holding 1.5 is refused below, not truncated.
    values = np.array(data, dtype=np.float64)
    if not datatype.startswith("FP") and not np.array_equal(values, np.round(values)):
        index = int(np.flatnonzero(values != np.round(values))[0])
        raise RequestError(f"{where}: value {index} must be a whole number for datatype {datatype}, got "
                           f"{data[index]!r}", cause="invalid_value")
    return values


def _shape(where: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**31 for d in shape) or len(shape) > 8:
        raise RequestError(f"{where}: 'shape' must be a list of non-negative integers, got {str(shape)[:60]}",
                           cause="invalid_tensor")
    return tuple(shape)


def _raw(where: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Binary tensor data (REST's binary extension, gRPC's raw_input_contents) as numbers."""
    dtype = np.dtype(COLUMN_TYPES[datatype])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != count * dtype.itemsize:
        raise RequestError(f"{where}: {len(raw)} bytes of {datatype} data for shape {list(shape)} "
                           f"({count * dtype.itemsize} expected)", cause="invalid_tensor")
    return np.frombuffer(raw, dtype=dtype)


def from_rest(body: bytes, header_length: int | None = None) -> V2Request:
    """A REST v2 request body, with its binary tensors when ``header_length`` says where the JSON ends."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise RequestError(f"the {HEADER_LENGTH} header says {header_length} bytes of JSON, the body has "
                           f"{len(body)}", cause="invalid_tensor")
    doc = decode_json(body[:header_length] if header_length is not None else body, hint=_HINT)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        hint = " (this endpoint takes v2 'inputs', not v1 'instances')" if isinstance(doc, dict) and \
            "instances" in doc else ""
        raise RequestError(f"the body must be an object with a non-empty list 'inputs'{hint}; {_HINT}",
                           cause="invalid_tensor")
    offset = header_length if header_length is not None else len(body)
    inputs = []
    for index, item in enumerate(doc["inputs"]):
        name = item.get("name") if isinstance(item, dict) else None
        where = _where(index, name)
        if not isinstance(name, str) or not isinstance(item.get("datatype"), str):
            raise RequestError(f"{where}: each input needs a string 'name' and 'datatype'", cause="invalid_tensor")
        datatype, shape = _datatype(where, item["datatype"]), _shape(where, item.get("shape"))
        parameters = item.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if "data" in item:
            values = _numbers(where, datatype, item["data"], int(np.prod(shape, dtype=np.int64)))
        elif type(size) is int and header_length is not None and 0 <= size <= len(body) - offset:
            values = _raw(where, datatype, shape, body[offset:offset + size])
            offset += size
        else:
            raise RequestError(f"{where}: no 'data', and no binary data of the size its 'binary_data_size' says "
                               f"after the {HEADER_LENGTH} bytes of JSON", cause="invalid_tensor")
        inputs.append(Tensor(name, datatype, shape, values))
    if header_length is not None and offset != len(body):
        raise RequestError(f"{len(body) - offset} bytes after the last binary input: the inputs' binary_data_size "
                           "values do not add up to the body", cause="invalid_tensor")
    requested, per_output = None, {}
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                           for o in doc["outputs"]):
            raise RequestError("'outputs' must be a list of objects with a 'name'", cause="invalid_tensor")
        requested = tuple(o["name"] for o in doc["outputs"])
        per_output = {o["name"]: bool((o.get("parameters") or {}).get("binary_data")) for o in doc["outputs"]
                      if isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]}
    parameters = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    request_id = doc.get("id")
    return V2Request(request_id if isinstance(request_id, str) else None, tuple(inputs), requested,
                     bool(parameters.get("binary_data_output", False)), False, per_output)


def from_infer_request(request: Any) -> V2Request:
    """KServe's ``InferRequest`` (as its gRPC servicer builds it) as a checked :class:`V2Request`."""
    inputs = []
    for index, item in enumerate(request.inputs):
        where = _where(index, item.name)
        _datatype(where, item.datatype)
        shape = _shape(where, list(item.shape))
        raw = getattr(item, "_raw_data", None)
        values = (_raw(where, item.datatype, shape, raw) if raw is not None
                  else _numbers(where, item.datatype, list(item.data or []), int(np.prod(shape, dtype=np.int64))))
        inputs.append(Tensor(item.name, item.datatype, shape, values))
    if not inputs:
        raise RequestError(f"the request must have a non-empty list 'inputs'; {_HINT}", cause="invalid_tensor")
    requested = tuple(o.name for o in request.request_outputs) if request.request_outputs else None
    return V2Request(request.id or None, tuple(inputs), requested, bool(request.use_binary_outputs), True)


def parse_v2(request: V2Request, feature_names: tuple[str, ...], max_rows: int) -> np.ndarray:
    """Validated raw features, float64 (n_rows, n_features), from either input form.

    Raises:
        RequestError: naming the tensor and what was expected; 413 past ``max_rows``.
    """
    unknown = [n for n in request.outputs or () if n not in OUTPUTS]
    if unknown:  # before any work is done
        raise RequestError(f"outputs: unknown output(s) {', '.join(map(repr, unknown))}; this model answers "
                           f"{', '.join(OUTPUTS)}", cause="invalid_tensor")
    n_features = len(feature_names)
    names = [t.name for t in request.inputs]
    if names == [FEATURES]:
        (tensor,) = request.inputs
        where = _where(0, FEATURES)
        if tensor.datatype not in MATRIX_TYPES:
            raise RequestError(f"{where}: datatype {tensor.datatype} is not accepted for the matrix; send FP64 or "
                               "FP32", cause="invalid_tensor")
        if len(tensor.shape) != 2 or tensor.shape[1] != n_features:
            raise RequestError(f"{where}: shape {list(tensor.shape)}, expected [n, {n_features}] (features in this "
                               f"order: {', '.join(feature_names)})", cause="invalid_tensor")
        X = _rows(where, tensor.shape[0], max_rows, tensor.values.reshape(tensor.shape))
        columns = feature_names
    elif FEATURES in names and FEATURES not in feature_names:
        # The matrix form with something beside it: what is wrong is the rest, not the matrix.
        others, times = [n for n in names if n != FEATURES], names.count(FEATURES)
        wrong = ([f"'{FEATURES}' comes {times} times: send it once"] if times > 1 else []) + \
            ([f"remove {', '.join(map(repr, others))}"] if others else [])
        raise RequestError(f"inputs: '{FEATURES}' [n, {n_features}] is the only tensor of the matrix form; "
                           f"{'; '.join(wrong)} (or send one tensor [n] per feature instead of '{FEATURES}')",
                           cause="invalid_tensor")
    else:
        missing = [n for n in feature_names if n not in names]
        unknown = [n for n in names if n not in feature_names]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if missing or unknown or repeated:
            parts = [f"missing {', '.join(map(repr, missing))}" if missing else "",
                     f"unknown {', '.join(map(repr, unknown))}" if unknown else "",
                     f"repeated {', '.join(map(repr, repeated))}" if repeated else ""]
            raise RequestError(f"inputs: send one tensor '{FEATURES}' [n, {n_features}] or one tensor [n] per feature "
                               f"({'; '.join(p for p in parts if p)}); the features are: {', '.join(feature_names)}",
                               cause="invalid_tensor")
        by_name = {t.name: (i, t) for i, t in enumerate(request.inputs)}
        n = None
        for name in feature_names:
            index, tensor = by_name[name]
            where = _where(index, name)
            if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
                raise RequestError(f"{where}: shape {list(tensor.shape)}, expected [n] (or [n, 1])",
                                   cause="invalid_tensor")
            if n is not None and tensor.shape[0] != n:
                raise RequestError(f"{where}: {tensor.shape[0]} rows, the tensors before it have {n}",
                                   cause="invalid_tensor")
            n = tensor.shape[0]
        X = _rows("inputs", n, max_rows, np.column_stack([by_name[name][1].values for name in feature_names]))
        columns = feature_names
    bad = ~np.isfinite(X) | (np.abs(X) > FLOAT32_MAX)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise RequestError(f"row {row}: feature '{columns[col]}' must be a finite number within float32 range, "
                           f"got {float(X[row, col])!r}", cause="invalid_value")
    return X


def _rows(where: str, n: int, max_rows: int, values: np.ndarray) -> np.ndarray:
    if n == 0:
        raise RequestError(f"{where}: no rows; send at least one", cause="invalid_tensor")
    if n > max_rows:
        raise RequestError(f"{where}: {n} rows, at most {max_rows} are accepted per request; split the request",
                           status=413, cause="too_many_rows")
    return np.asarray(values, dtype=np.float64)


def output_tensors(labels: np.ndarray, distances: np.ndarray, item_ids: np.ndarray, item_scores: np.ndarray,
                   keep: np.ndarray) -> dict[str, np.ndarray]:
    """The answer as fused mode's tensors: slots the rules left empty padded."""
    text = item_ids.dtype.kind in "UOS"
    return {
        "segment": labels.astype(np.int64, copy=False),
        "segment_distance": distances.astype(np.float32),
        "item_ids": np.where(keep, item_ids, PAD_TEXT_ID if text else PAD_ID).astype(object if text else np.int64),
        "item_scores": np.where(keep, item_scores.astype(np.float32, copy=False), np.float32(PAD_SCORE)),
    }


def datatype_of(array: np.ndarray) -> str:
    return {"i": "INT64", "f": "FP32" if array.dtype == np.float32 else "FP64", "O": "BYTES"}[array.dtype.kind]


def _selected(tensors: dict[str, np.ndarray], request: V2Request) -> dict[str, np.ndarray]:
    """The outputs the request asked for (checked by :func:`parse_v2`), or all of them."""
    return tensors if request.outputs is None else {name: tensors[name] for name in request.outputs}


def _bytes_tensor(array: np.ndarray) -> bytes:
    """BYTES in the binary extension: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for value in array.ravel():
        raw = value.encode() if isinstance(value, str) else bytes(value)
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def encode_rest(tensors: dict[str, np.ndarray], request: V2Request, model_name: str,
                model_version: str) -> tuple[bytes, int | None]:
    """The REST answer: JSON (numbers as numpy writes them, float32 as its shortest text), or JSON followed by
    binary tensors when the request asked for them. Returns (body, JSON length or None)."""
    tensors = _selected(tensors, request)
    outputs, raw = [], []
    for name, array in tensors.items():
        entry = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.output_binary.get(name, request.binary_outputs):
            data = _bytes_tensor(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = array.ravel().tolist() if array.dtype == object else array.ravel()
        outputs.append(entry)
    doc = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + b"".join(raw), len(header)) if raw else (header, None)


def to_infer_response(tensors: dict[str, np.ndarray], request: V2Request, model_name: str, model_version: str):
    """The gRPC answer, as KServe's ``InferResponse`` (its servicer turns it into ``ModelInferResponse``)."""
    from kserve import InferOutput, InferResponse

    outputs = []
    for name, array in _selected(tensors, request).items():
        out = InferOutput(name=name, shape=list(array.shape), datatype=datatype_of(array))
        out.set_data_from_numpy(array if array.dtype != object else
                                np.array([v.encode() for v in array.ravel()], dtype=object).reshape(array.shape),
                                binary_data=request.binary_outputs)
        outputs.append(out)
    return InferResponse(response_id=request.id or "", model_name=model_name, infer_outputs=outputs,
                         model_version=model_version, from_grpc=True, use_binary_outputs=request.binary_outputs)


class V2Codec:
    """One v2 request (REST or gRPC) on its way: its rows in, its answer out in the same transport."""

    def __init__(self, payload: Any):
        self.request = payload if isinstance(payload, V2Request) else from_infer_request(payload)

    def rows(self, feature_names: tuple[str, ...], max_rows: int) -> np.ndarray:
        return parse_v2(self.request, feature_names, max_rows)

    def answer(self, ranked: Any, model_name: str, model_version: int) -> Any:
        tensors = output_tensors(ranked.labels, ranked.distances, ranked.item_ids, ranked.item_scores, ranked.keep)
        if self.request.grpc:
            return to_infer_response(tensors, self.request, model_name, str(model_version))
        body, json_length = encode_rest(tensors, self.request, model_name, str(model_version))
        if json_length is None:
            return EncodedAnswer(body)
        return EncodedAnswer(body, "application/octet-stream", {HEADER_LENGTH: str(json_length)})


def tensor_metadata(feature_names: tuple[str, ...], top_k: int, text_ids: bool) -> tuple[list[dict], list[dict]]:
    """v2 model metadata: the inputs (the matrix form) and outputs, with datatypes and shapes (-1: any size)."""
    inputs = [{"name": FEATURES, "datatype": "FP64", "shape": [-1, len(feature_names)]}]
    outputs = [
        {"name": "segment", "datatype": "INT64", "shape": [-1]},
        {"name": "segment_distance", "datatype": "FP32", "shape": [-1]},
        {"name": "item_ids", "datatype": "BYTES" if text_ids else "INT64", "shape": [-1, top_k]},
        {"name": "item_scores", "datatype": "FP32", "shape": [-1, top_k]},
    ]
    return inputs, outputs

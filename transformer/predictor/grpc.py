"""The transformer's client for TF Serving's gRPC API: tensors travel as bytes, not JSON.

``tensorflow.serving.PredictionService/Predict`` with the features as one DT_FLOAT tensor
in ``tensor_content`` (the row-major float32 bytes, no per-value encoding) and an
``output_filter`` naming only the outputs the transformer reads;
``ModelService/GetModelStatus`` and ``PredictionService/GetModelMetadata`` for readiness
and the start-up check. The messages come from our own ``protos/tfserving.proto`` (same
field numbers as TF Serving's; see there why), so this module needs no TensorFlow.

gRPC status codes map to the same PredictorErrors as the REST client's HTTP statuses:
UNAVAILABLE is retried (TF Serving down, restarting, or its batch queue full),
DEADLINE_EXCEEDED is not (the predictor is busy), INVALID_ARGUMENT and
FAILED_PRECONDITION are the caller's fault (400), NOT_FOUND for a pinned version means
TF Serving no longer serves it.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from transformer.predictor import Contract, PredictorClient, PredictorError, Retryable, VersionNotServed
from transformer.predictor.protos import tfserving_pb2 as pb

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"

# numpy type of each numeric DataType, and the repeated field TF writes it to when it does not
# use tensor_content (TF Serving's Predict answers with AsProtoField: float_val, int64_val...).
_NUMPY = {pb.DT_FLOAT: "<f4", pb.DT_DOUBLE: "<f8", pb.DT_INT32: "<i4", pb.DT_INT64: "<i8"}
_FIELD = {pb.DT_FLOAT: "float_val", pb.DT_DOUBLE: "double_val", pb.DT_INT32: "int_val", pb.DT_INT64: "int64_val"}

_CHANNEL_OPTIONS = [
    # A full-scores answer for 256 rows x 20,000 items is 20 MB, past gRPC's 4 MB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # After TF Serving restarts, reconnect within a second: gRPC's default backoff grows to
    # 120 s, during which every call would fail UNAVAILABLE at once.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def tensor_proto(array: np.ndarray, dtype: int = pb.DT_FLOAT) -> pb.TensorProto:
    """A numeric array as a TensorProto with its bytes in ``tensor_content`` (TF's AsProtoTensorContent)."""
    proto = pb.TensorProto(dtype=dtype, tensor_content=np.ascontiguousarray(array, _NUMPY[dtype]).tobytes())
    proto.tensor_shape.dim.extend(pb.TensorShapeProto.Dim(size=n) for n in array.shape)
    return proto


def type_name(dtype: int) -> str:
    """``DT_FLOAT`` for 1; types this proto does not list by their number (``DataType 19``)."""
    return pb.DataType.Name(dtype) if dtype in pb.DataType.values() else f"DataType {dtype}"


# float_val and double_val are packed fixed-width fields: their wire bytes are the array itself. TF Serving's
# Predict answers in them (AsProtoField), and reading 8,192 floats through the repeated field's Python
# sequence took 239 us against 14 us from the bytes (an embedding of 256 rows x 32).
_PACKED_FIXED = {pb.DT_FLOAT: 5, pb.DT_DOUBLE: 6}  # dtype -> field number in TensorProto


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _packed_fixed(proto: pb.TensorProto) -> np.ndarray:
    """The values of the tensor's packed float_val or double_val, read from its wire bytes (protobuf writes a
    proto3 repeated number field as one packed run; the other fields are stepped over)."""
    dtype, wanted = np.dtype(_NUMPY[proto.dtype]), _PACKED_FIXED[proto.dtype]
    data, at = proto.SerializeToString(), 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _varint(data, at)
            if number == wanted:
                return np.frombuffer(data, dtype, count=length // dtype.itemsize, offset=at)
            at += length
        else:
            raise ValueError(f"the tensor's bytes hold a field of wire type {wire}")
    return np.empty(0, dtype)


def tensor_array(proto: pb.TensorProto) -> np.ndarray:
    """A numeric TensorProto as a numpy array, read as TensorFlow's Tensor::FromProto reads it:
    ``tensor_content`` bytes, or the typed repeated field whose last value repeats to fill the shape."""
    if proto.tensor_shape.unknown_rank:
        raise ValueError("the tensor has an unknown rank")
    if proto.dtype not in _NUMPY:
        raise ValueError(f"the tensor is {type_name(proto.dtype)}, not one of {', '.join(map(type_name, _NUMPY))}")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    size = math.prod(shape)
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, _NUMPY[proto.dtype])
    else:
        values = (_packed_fixed(proto) if proto.dtype in _PACKED_FIXED
                  else np.asarray(getattr(proto, _FIELD[proto.dtype]), _NUMPY[proto.dtype]))
        if 0 < values.size < size:
            values = np.concatenate([values, np.full(size - values.size, values[-1], values.dtype)])
        elif values.size == 0:
            values = np.zeros(size, _NUMPY[proto.dtype])
    if values.size != size:
        raise ValueError(f"the tensor holds {values.size} values for shape {list(shape)}")
    return values.reshape(shape)


class GrpcPredictorClient(PredictorClient):
    """TF Serving's gRPC API over one HTTP/2 channel (requests multiplex on it; no pool needed)."""

    def __init__(self, address: str, model_name: str, *, use_ssl: bool = False, **options):
        super().__init__(address, model_name, **options)
        self.use_ssl = use_ssl
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict = {}

    def _method(self, path: str, response_type):
        if self._channel is None:  # made on first use, inside the running loop
            self._channel = (grpc.aio.secure_channel(self.address, grpc.ssl_channel_credentials(),
                                                     options=_CHANNEL_OPTIONS) if self.use_ssl
                             else grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS))
            self._methods = {}
        if path not in self._methods:
            self._methods[path] = self._channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString)
        return self._methods[path]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, path: str, request, response_type, retry: bool = True):
        """One call, retried on UNAVAILABLE within the retry budget; other failures raise
        grpc.aio.AioRpcError for the caller to map (NOT_FOUND means different things per call)."""

        async def attempt():
            try:
                return await self._method(path, response_type)(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    unreachable = "connect" in (exc.details() or "").lower()
                    raise Retryable(PredictorError(
                        503, f"the predictor at {self.address} is "
                        f"{'unreachable' if unreachable else 'unavailable'} ({exc.details()})",
                        "predictor_unreachable" if unreachable else "predictor_unavailable")) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise PredictorError(504, f"the predictor at {self.address} did not answer within "
                                         f"{self.timeout:g}s", "predictor_timeout") from None
                raise

        return await self._retrying(attempt, retry)

    def _spec(self, version: int | None, signature: str = "") -> pb.ModelSpec:
        spec = pb.ModelSpec(name=self.model_name, signature_name=signature)
        if version is not None:
            spec.version.value = version
        return spec

    async def predict(self, features: np.ndarray, contract: Contract) -> dict[str, np.ndarray]:
        request = pb.PredictRequest(model_spec=self._spec(contract.version, contract.signature),
                                    output_filter=list(contract.outputs))
        request.inputs[contract.input_name].CopyFrom(tensor_proto(features))
        try:
            response = await self._call(PREDICT, request, pb.PredictResponse)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise PredictorError(400, f"the predictor rejected the request: {details}",
                                     "predictor_rejected") from None
            if code == grpc.StatusCode.NOT_FOUND and contract.version is not None:
                raise VersionNotServed(contract.version, f"TF Serving does not serve version {contract.version} "
                                       f"of model {self.model_name!r} ({details})") from None
            raise PredictorError(502, f"the predictor answered {code.name}: {details}", "predictor_failed") from None
        arrays = {}
        for name, (dtype, _) in contract.outputs.items():
            if name not in response.outputs:
                raise PredictorError(502, f"the predictor's answer has no output {name!r} (it has: "
                                     f"{', '.join(sorted(response.outputs))})", "predictor_bad_answer")
            proto = response.outputs[name]
            try:
                if type_name(proto.dtype) != dtype:
                    raise ValueError(f"it is {type_name(proto.dtype)}, the bundle expects {dtype}")
                arrays[name] = tensor_array(proto)
            except ValueError as exc:
                raise PredictorError(502, f"the predictor's output {name!r} cannot be read: {exc}",
                                     "predictor_bad_answer") from None
        return self.checked_shapes(arrays, features.shape[0], contract)

    async def version_states(self) -> dict[int, str]:
        request = pb.GetModelStatusRequest(model_spec=self._spec(None))
        try:
            response = await self._call(GET_MODEL_STATUS, request, pb.GetModelStatusResponse, retry=False)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return {}  # TF Serving has no version of this model (yet)
            raise PredictorError(502, f"model status answered {exc.code().name}: {exc.details()}") from None
        return {s.version: pb.ModelVersionStatus.State.Name(s.state) if s.state in pb.ModelVersionStatus.State.values()
                else "UNKNOWN" for s in response.model_version_status}

    async def metadata(self, version: int | None = None) -> dict:
        request = pb.GetModelMetadataRequest(model_spec=self._spec(version), metadata_field=["signature_def"])
        try:
            response = await self._call(GET_MODEL_METADATA, request, pb.GetModelMetadataResponse)
        except grpc.aio.AioRpcError as exc:
            raise PredictorError(502, f"model metadata answered {exc.code().name}: {exc.details()}") from None
        packed = response.metadata.get("signature_def")
        if packed is None or packed.type_url != SIGNATURE_DEF_MAP_URL:
            raise PredictorError(502, f"model metadata has no {SIGNATURE_DEF_MAP_URL} under 'signature_def'")
        signatures = pb.SignatureDefMap.FromString(packed.value)
        # The REST API's JSON form, which metadata_problems reads for both transports.
        return {"model_spec": MessageToDict(response.model_spec, preserving_proto_field_name=True),
                "metadata": {"signature_def": MessageToDict(signatures, preserving_proto_field_name=True,
                                                            always_print_fields_with_no_presence=True)}}

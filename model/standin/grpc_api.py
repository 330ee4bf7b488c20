"""TF Serving's gRPC API for the local stand-in (``python -m model.standin --port``).

The three calls a client of this model makes, answered as ``tensorflow_model_server``
answers them (``tensorflow_serving/servables/tensorflow/predict_util.cc``,
``get_model_metadata_impl.cc``, ``model_servers/get_model_status_impl.cc``):

    /tensorflow.serving.PredictionService/Predict           outputs as typed fields (AsProtoField)
    /tensorflow.serving.PredictionService/GetModelMetadata  "signature_def" -> a packed SignatureDefMap
    /tensorflow.serving.ModelService/GetModelStatus         the versions and their states

It shares the model store and the executor with the REST API, so both answer from the
same loaded versions. Messages are the transformer's own (``transformer/predictor/protos``), which
tests check byte for byte against the official ``tensorflow-serving-api`` stubs.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from google.protobuf import json_format

from model.standin.serve import ServingError
from model.standin.tfjson import TensorJsonError, check_shapes
from transformer.predictor.grpc import (
    GET_MODEL_METADATA,
    GET_MODEL_STATUS,
    PREDICT,
    SIGNATURE_DEF_MAP_URL,
    tensor_array,
    type_name,
)
from transformer.predictor.protos import tfserving_pb2 as pb

log = logging.getLogger("model.standin")

# HTTP status of the REST handler's ServingError -> the gRPC code TF Serving returns for it.
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL}
# numpy dtype -> DataType and the repeated field AsProtoField fills.
_OUTPUT_TYPES = {np.dtype(np.float32): (pb.DT_FLOAT, "float_val"), np.dtype(np.float64): (pb.DT_DOUBLE, "double_val"),
                 np.dtype(np.int32): (pb.DT_INT32, "int_val"), np.dtype(np.int64): (pb.DT_INT64, "int64_val"),
                 np.dtype(np.bool_): (pb.DT_BOOL, "bool_val"), np.dtype(object): (pb.DT_STRING, "string_val")}


class _Status(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _input_array(proto: pb.TensorProto, alias: str) -> np.ndarray:
    if proto.dtype == pb.DT_STRING:
        shape = tuple(d.size for d in proto.tensor_shape.dim)
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    try:
        return tensor_array(proto)
    except ValueError as exc:
        raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"input '{alias}': {exc}") from None


def _output_proto(array: np.ndarray) -> pb.TensorProto:
    """TensorFlow's Tensor::AsProtoField: the values in the typed repeated field, not tensor_content."""
    dtype, field = _OUTPUT_TYPES[array.dtype]
    proto = pb.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.extend(pb.TensorShapeProto.Dim(size=n) for n in array.shape)
    values = array.ravel()
    getattr(proto, field).extend(list(values) if dtype == pb.DT_STRING else values.tolist())
    return proto


class GrpcApi:
    """The handlers, bound to the REST app's store and executor."""

    def __init__(self, app):
        self.store = app.store
        self.executor = app.executor

    def _servable(self, spec: pb.ModelSpec):
        version = str(spec.version.value) if spec.HasField("version") else None
        try:
            return self.store.servable(spec.name, version, spec.version_label or None)
        except ServingError as exc:
            raise _Status(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc)) from None

    async def predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or "serving_default"
        if signature_name not in servable.signatures:
            raise _Status(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
        signature = servable.signatures[signature_name]
        expected, sent = set(signature.inputs), set(request.inputs)
        if expected != sent:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input size does not match signature: {len(sent)}!={len(expected)} len({{"
                          f"{','.join(sorted(expected))}}}). Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                          f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
        arrays = {}
        for alias, proto in request.inputs.items():
            array = _input_array(proto, alias)
            want = signature.inputs[alias].dtype
            if array.dtype != want:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                              f"Expects arg[0] to be {signature.inputs[alias].tf_name} but {type_name(proto.dtype)} "
                              f"is provided")
            arrays[alias] = array
        try:
            check_shapes(arrays, signature.inputs)
        except TensorJsonError as exc:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        outputs = await asyncio.get_running_loop().run_in_executor(self.executor, servable.run, signature, arrays)
        wanted = list(request.output_filter) or list(outputs)
        for alias in wanted:
            if alias not in outputs:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                              f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                              f"set {{{','.join(sorted(outputs))}}}.")
        response = pb.PredictResponse(model_spec=pb.ModelSpec(name=servable.name, signature_name=signature_name))
        response.model_spec.version.value = servable.version
        for alias in wanted:
            response.outputs[alias].CopyFrom(_output_proto(outputs[alias]))
        return response

    async def get_model_metadata(self, request: pb.GetModelMetadataRequest, context) -> pb.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                          "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        servable = self._servable(request.model_spec)
        signatures = json_format.ParseDict({"signature_def": servable.signature_defs}, pb.SignatureDefMap(),
                                           ignore_unknown_fields=True)
        response = pb.GetModelMetadataResponse(model_spec=pb.ModelSpec(name=servable.name))
        response.model_spec.version.value = servable.version
        # Not Any.Pack: that would name our package; the URL names TF Serving's message, as TF Serving writes it.
        response.metadata["signature_def"].type_url = SIGNATURE_DEF_MAP_URL
        response.metadata["signature_def"].value = signatures.SerializeToString()
        return response

    async def get_model_status(self, request: pb.GetModelStatusRequest, context) -> pb.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        try:
            status = self.store.status(spec.name, str(spec.version.value) if spec.HasField("version") else None)
        except ServingError as exc:
            raise _Status(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc)) from None
        response = pb.GetModelStatusResponse()
        for entry in status["model_version_status"]:
            response.model_version_status.add(version=int(entry["version"]),
                                              state=pb.ModelVersionStatus.State.Value(entry["state"]))
        return response


def _handler(method, request_type, response_type):
    async def call(request, context):
        try:
            return await method(request, context)
        except _Status as exc:
            await context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a server answers, it does not crash
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL, f"Internal: {exc}")

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_type.FromString,
                                               response_serializer=lambda m: m.SerializeToString())


def grpc_server(app, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for the app's store on ``host:port`` (0: any free port); returns it and its port."""
    api = GrpcApi(app)
    handlers = {}
    for path, method, request_type, response_type in (
        (PREDICT, api.predict, pb.PredictRequest, pb.PredictResponse),
        (GET_MODEL_METADATA, api.get_model_metadata, pb.GetModelMetadataRequest, pb.GetModelMetadataResponse),
        (GET_MODEL_STATUS, api.get_model_status, pb.GetModelStatusRequest, pb.GetModelStatusResponse),
    ):
        service, name = path.strip("/").split("/")
        handlers.setdefault(service, {})[name] = _handler(method, request_type, response_type)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 256 * 1024 * 1024)])
    for service, methods in handlers.items():
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, methods)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server, bound

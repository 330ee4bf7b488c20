"""A local stand-in for TF Serving: ``python -m model.standin`` serves a model folder over
TF Serving's REST and gRPC APIs, with ``tensorflow_model_server``'s flags, model config file and
version policies, for machines that cannot run the ``tensorflow/serving`` image.

    serve.py           the model store (versions, policy, polling), the REST API, the command line
    grpc_api.py        the gRPC API (Predict, GetModelMetadata, GetModelStatus) over the same store
    tfjson.py          TF Serving's JSON mapping of tensors
    serving_config.py  TF Serving's text-format model config file
"""

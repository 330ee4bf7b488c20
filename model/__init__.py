"""Training, export and local serving of the user embedding model."""

import os

# Quiet TensorFlow's start-up chatter, and keep its float results independent of
# the batch size (oneDNN's fused kernels may round differently per shape).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

"""How requests travel: one codec per wire format, each parsing and validating a request into the float64
matrix the pipeline takes and writing the pipeline's answer back (``v1.py``: ``{"instances": ...}`` rows;
``v2.py``: Open Inference Protocol tensors over REST and gRPC). No arithmetic here."""

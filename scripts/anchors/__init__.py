"""What the benchmark measures the transformer against, besides TF Serving alone: the Python HTTP floor
(``floor.py``) and the transformer a KServe user would write from KServe's documentation
(``plain_transformer.py``)."""

"""The edge of the process: the REST endpoints and their fast path (``rest.py``), admission and pacing
(``admission.py``), the accounting every request goes through (``edge.py``), coalescing of predictor calls
(``coalesce.py``), metrics and drift gauges (``metrics.py``, ``drift.py``) and the server itself
(``server.py``)."""

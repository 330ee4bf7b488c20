"""What every measurement of the benchmark shares: the model names, the newest version, the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from scripts.loadgen import have_wrk
from transformer.store.bundle import model_versions

MODEL = "embedder"
FUSED = "embedder-fused"


def newest_version_dir(build: Path) -> Path:
    """The newest model version folder (SavedModel + bundle), the one the transformer serves."""
    return build / "models" / MODEL / str(model_versions(build / "models" / MODEL)[-1])


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    import sklearn
    import tensorflow as tf

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(), "kserve": version("kserve"),
        "tensorflow": tf.__version__, "scikit-learn": sklearn.__version__,
        "load_generator": "wrk " + (os.popen("wrk -v 2>&1").read().split()[1] if have_wrk() else "absent: python httpx"),
        "predictor": "python -m model.standin (TF Serving stand-in, REST and gRPC on one port; no container engine here)",
    }

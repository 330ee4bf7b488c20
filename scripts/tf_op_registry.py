"""Write the op registry of the TensorFlow this runs under: every op and the attributes it takes.

    python -m scripts.tf_op_registry model/tf-2.20-ops.json   # run with the TensorFlow TF Serving uses

TF Serving 2.20 is built on TensorFlow 2.20 and refuses a SavedModel whose graph names an op it
does not have, or an attribute that op does not take ("NodeDef mentions attr ... not in Op").
Training uses a newer TensorFlow; ``tests/test_tf_serving_ops.py`` checks every exported graph
against the registry written here by TensorFlow 2.20 itself (in a throwaway venv:
``python3.11 -m venv /tmp/tf220 && /tmp/tf220/bin/pip install tensorflow-cpu==2.20.0``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def op_registry() -> dict[str, list[str]]:
    import tensorflow as tf
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session as c_api

    buffer = c_api.TF_GetAllOpList()
    try:
        ops = op_def_pb2.OpList.FromString(c_api.TF_GetBuffer(buffer))
    finally:
        c_api.TF_DeleteBuffer(buffer)
    del tf
    return {op.name: sorted(attr.name for attr in op.attr) for op in ops.op}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m scripts.tf_op_registry", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSON file to write (model/tf-2.20-ops.json for TF Serving 2.20)")
    args = parser.parse_args(argv)
    import tensorflow as tf

    registry = {"tensorflow": tf.__version__, "ops": op_registry()}
    args.out.write_text(json.dumps(registry, indent=0, sort_keys=True) + "\n")
    print(f"wrote {len(registry['ops'])} ops of TensorFlow {tf.__version__} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

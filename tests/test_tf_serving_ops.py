"""Every exported graph runs on the pinned TF Serving: only ops, and op attributes, that its TensorFlow has.

Training uses TensorFlow 2.21 (``pyproject.toml``); the manifests run TF Serving 2.20.0
(``scripts/versions.env``), built on TensorFlow 2.20. ``model/tf-2.20-ops.json`` is TensorFlow
2.20's own op registry, written by ``scripts/tf_op_registry.py`` running under it.
"""

from __future__ import annotations

import json

import pytest
from conftest import MODEL_NAME, version_dir

from model.verify import REGISTRY, unknown_ops
from scripts.localstack import pinned



def registry() -> dict:
    return json.loads(REGISTRY.read_text())


def test_the_registry_is_the_tensorflow_of_the_pinned_tf_serving():
    serving = pinned("TF_SERVING_VERSION")
    assert registry()["tensorflow"].rsplit(".", 1)[0] == serving.rsplit(".", 1)[0] == "2.20"


@pytest.mark.parametrize("model", [MODEL_NAME, f"{MODEL_NAME}-fused"])
def test_exported_graphs_use_only_what_tf_serving_has(build_dir, model):
    folder = version_dir(build_dir).parent.parent / model / "1"
    assert unknown_ops(folder, registry()["ops"]) == []


def test_the_check_finds_an_op_or_attribute_tf_serving_lacks(build_dir):
    ops = registry()["ops"]
    assert "Ndtri" in unknown_ops(build_dir / "models" / f"{MODEL_NAME}-fused" / "1",
                                 {k: v for k, v in ops.items() if k != "Ndtri"})[0]
    # Attributes at their default value are not saved (transpose_b of a plain matmul); the dtype always is.
    fewer_attrs = {**ops, "MatMul": [a for a in ops["MatMul"] if a != "T"]}
    assert "attribute 'T' of op MatMul" in unknown_ops(version_dir(build_dir), fewer_attrs)

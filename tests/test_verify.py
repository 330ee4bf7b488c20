"""The checks a version passes before it is published (model/verify.py): each passes on a trained version and
names what is wrong when its own thing is wrong, and only that."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import MODEL_NAME, version_dir

tf = pytest.importorskip("tensorflow")

from model.verify import PARITY_ROWS, fused_differences, parity_rows, verify  # noqa: E402


@pytest.fixture(scope="module")
def fused_dir(build_dir):
    return build_dir / "models" / f"{MODEL_NAME}-fused" / "1"


@pytest.fixture(scope="module")
def rows_and_answer(build_dir, fused_dir):
    from transformer.store.bundle import load_bundle

    bundle = load_bundle(version_dir(build_dir))
    rows = parity_rows(bundle.feature_min, bundle.feature_max)
    answer = tf.saved_model.load(str(fused_dir)).signatures["serving_float64"](features=tf.constant(rows))
    return rows, {k: v.numpy() for k, v in answer.items()}


def answering(folder, outputs: dict):
    """A SavedModel whose ``serving_float64`` answers ``outputs`` whatever it is sent."""
    module = tf.Module()
    constants = {k: tf.constant(v) for k, v in outputs.items()}
    width = None

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float64, name="features")])
    def serve(features):
        return dict(constants)

    module.serve = serve
    tf.saved_model.save(module, str(folder), signatures={"serving_float64": serve})
    return folder


def test_a_trained_version_passes_every_check(build_dir, fused_dir):
    result = verify(version_dir(build_dir), fused_dir)
    assert result.version == 1 and result.problems == []
    assert [name for name, _ in result.checks] == [
        "the transformer's bundle checks", "embedder graph on TF Serving 2.20", "fused graph on TF Serving 2.20",
        f"fused parity on {PARITY_ROWS + 4} rows"]
    assert result.markdown().startswith("# Checks of version 1: all pass\n\n| check | result |\n| --- | --- |\n"
                                        "| the transformer's bundle checks | ok |\n")
    assert "Fails because" not in result.markdown() and result.markdown().endswith(" | ok |\n")
    assert len(verify(version_dir(build_dir)).checks) == 2  # no fused model: neither of its checks


def test_a_bundle_that_does_not_load_is_the_one_problem(build_dir, tmp_path):
    copy = tmp_path / "embedder" / "1"
    shutil.copytree(version_dir(build_dir), copy)
    manifest = copy / "assets.extra" / "transformer-bundle" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": {}}))
    result = verify(copy)
    assert result.version == -1 and len(result.checks) == 1
    assert result.problems[0].startswith("the transformer's bundle checks: ")
    text = result.markdown()
    assert text.startswith("# Checks of version -1: FAILED\n") and "\nFails because:\n- the transformer's bundle" in text
    assert text.endswith(result.problems[0] + "\n")


def test_parity_rows_cover_the_training_range_its_edges_and_beyond():
    rows = parity_rows([0.0, -5.0], [2.0, 5.0], n=100, seed=1)
    assert rows.shape == (104, 2)
    assert (rows[:100] >= [0.0, -5.0]).all() and (rows[:100] <= [2.0, 5.0]).all()
    np.testing.assert_array_equal(rows[100:], [[0.0, -5.0], [2.0, 5.0], [-2.0, -15.0], [4.0, 15.0]])
    narrow = parity_rows([1.0], [1.25], n=3)  # a span below 1 reaches 1 beyond each edge
    np.testing.assert_array_equal(narrow[3:, 0], [1.0, 1.25, 0.0, 2.25])
    assert not np.array_equal(parity_rows([0.0], [1.0], seed=1)[:10], parity_rows([0.0], [1.0], seed=2)[:10])


def changed(outputs, key, change):
    out = {k: v.copy() for k, v in outputs.items()}
    change(out[key])
    return out


@pytest.mark.parametrize("key, change, problem", [
    ("segment", lambda a: a.__setitem__(3, a[3] + 1), "segments differ on 1 of {n} rows"),
    ("segment_distance", lambda a: a.__setitem__(0, a[0] + 1e-3), "segment distances differ by more than 1e-5"),
    ("item_ids", lambda a: a.__setitem__((2, 0), a[2, 0] + 1000), "the items kept by the rules differ"),
    ("item_scores", lambda a: a.__setitem__((1, 0), a[1, 0] + 1e-3), "item scores differ by more than 1e-5"),
])
def test_each_fused_difference_is_named(build_dir, rows_and_answer, tmp_path, key, change, problem):
    rows, answer = rows_and_answer
    assert fused_differences(version_dir(build_dir), answering(tmp_path / "same", answer), rows) == []
    wrong = answering(tmp_path / "wrong", changed(answer, key, change))
    assert fused_differences(version_dir(build_dir), wrong, rows) == [problem.format(n=len(rows))]


def test_a_fused_model_that_differs_fails_verification(build_dir, rows_and_answer, tmp_path):
    _, answer = rows_and_answer
    wrong = answering(tmp_path / "wrong", changed(answer, "segment", lambda a: a.__iadd__(1)))
    result = verify(version_dir(build_dir), wrong)
    assert result.problems == [f"fused parity on {PARITY_ROWS + 4} rows: segments differ on {PARITY_ROWS + 4} of "
                               f"{PARITY_ROWS + 4} rows"]


@pytest.mark.parametrize("ids, pad", [(np.array([[7, 8], [9, 7]]), -1),
                                      (np.array([["x", "y"], ["z", "x"]]), b"")], ids=["numbers", "text"])
def test_slots_the_rules_drop_compare_as_the_fused_models_padding(monkeypatch, tmp_path, ids, pad):
    """Where the rules keep fewer than k items, the fused model pads (-1, or "" for text ids): a fused answer
    padded so is the same answer, one that keeps the dropped item is not."""
    import model.gate
    from transformer.pipeline import Ranked

    keep = np.array([[True, False], [True, True]])
    ranked = Ranked(labels=np.array([0, 1]), distances=np.array([0.5, 0.25]), item_ids=ids,
                    item_scores=np.array([[0.9, 0.1], [0.8, 0.7]], np.float32), keep=keep)
    monkeypatch.setattr(model.gate, "ranked_offline", lambda version_dir, raw: (1, ranked))
    fused_ids = np.where(keep, ids, pad) if ids.dtype.kind in "iu" else np.where(keep, ids.astype(bytes), pad)
    answer = {"segment": np.array([0, 1]), "segment_distance": np.array([0.5, 0.25], np.float32),
              "item_ids": fused_ids, "item_scores": np.where(keep, ranked.item_scores, np.float32(-1.0))}
    rows = np.zeros((2, 3))
    assert fused_differences(tmp_path, answering(tmp_path / "padded", answer), rows) == []
    unpadded = {**answer, "item_ids": ids if ids.dtype.kind in "iu" else ids.astype(bytes)}
    assert fused_differences(tmp_path, answering(tmp_path / "kept", unpadded), rows) == [
        "the items kept by the rules differ"]


def test_ops_tf_serving_lacks_are_named_with_the_graph(build_dir, fused_dir, monkeypatch):
    import model.verify

    real = model.verify.registry()
    fewer = {**real, "ops": {op: attrs for op, attrs in real["ops"].items() if op not in ("MatMul", "Ndtri")}}
    monkeypatch.setattr(model.verify, "registry", lambda: fewer)
    result = verify(version_dir(build_dir), fused_dir)
    assert result.problems[0] == "embedder graph on TF Serving 2.20: unknown to its TensorFlow: op MatMul"
    assert result.problems[1] == "fused graph on TF Serving 2.20: unknown to its TensorFlow: op MatMul, op Ndtri"


def test_every_fused_difference_is_named_in_one_line(build_dir, rows_and_answer, tmp_path):
    rows, answer = rows_and_answer
    wrong = changed(changed(answer, "segment", lambda a: a.__iadd__(1)), "segment_distance", lambda a: a.__iadd__(1))
    result = verify(version_dir(build_dir), answering(tmp_path / "wrong", wrong))
    n = PARITY_ROWS + 4
    assert result.problems == [f"fused parity on {n} rows: segments differ on {n} of {n} rows; "
                               "segment distances differ by more than 1e-5"]

"""The sampling and the mutations of ``python -m scripts.mutation_tf`` (what judges the TensorFlow half)."""

from __future__ import annotations

import ast
import textwrap
from collections import Counter

from scripts.mutation_tf import REACHING, ROOT, make_mutant, mutation_points_of, sample

SOURCE = textwrap.dedent('''
    """Docstring: never mutated."""
    LIMIT = 3  # module level: not a function's


    def scale(x, factor=2.0):
        """Neither is this."""
        if x > LIMIT and not factor:
            return x - 1
        return x * factor


    class Model:
        width = 4  # a class body

        def call(self, values):
            raise ValueError(f"bad {values}")


    def parse_args(argv):
        parser.add_argument("--n", default=1, help="the command line is left alone")
''')


def test_only_what_a_function_computes_is_mutated():
    points = mutation_points_of(ast.parse(SOURCE))
    described = sorted((function, ast.unparse(node)) for function, node in points)
    assert described == sorted([("scale", "2.0"), ("scale", "x > LIMIT"), ("scale", "x > LIMIT and (not factor)"),
                                ("scale", "not factor"), ("scale", "x - 1"), ("scale", "1"), ("scale", "x * factor")])


def test_each_mutant_changes_one_place_and_says_which(tmp_path):
    path = ROOT / "build" / "mutation-tf-probe.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SOURCE)
    try:
        seen = set()
        for index in range(len(mutation_points_of(ast.parse(SOURCE)))):
            mutated, mutant = make_mutant(path, index)
            compile(mutated, "probe", "exec")
            assert mutated != ast.unparse(ast.parse(SOURCE)) and mutant.function == "scale"
            assert mutant.before != mutant.after and mutant.line in (6, 8, 9, 10)
            seen.add((mutant.line, mutant.after))
        assert seen == {(6, "def scale(x, factor=4.0):"), (8, "if x >= LIMIT and not factor:"),
                        # where unparsing moves the text, the change is said beside the line
                        (8, "if x > LIMIT and not factor:  # x > LIMIT and (not factor) -> x > LIMIT or not factor"),
                        (8, "if x > LIMIT and factor:"), (9, "return x + 1"),
                        (9, "return x - 2"), (10, "return x / factor")}
    finally:
        path.unlink()


def test_the_sample_is_drawn_evenly_over_functions_and_repeatable():
    points = [(f"f{i % 3}", None) for i in range(30)] + [("rare", None)]
    first = sample(points, 10, seed=4)
    assert first == sample(points, 10, seed=4) and first != sample(points, 10, seed=5)
    assert len(first) == 10 and 30 in first  # the function with one point is in
    # Round robin over the functions in name order: f0, f1, f2, rare, f0, f1, f2, f0, f1, f2.
    assert Counter(points[i][0] for i in first) == {"f0": 3, "f1": 3, "f2": 3, "rare": 1}
    assert sample(points, 100, seed=0) == list(range(31))


def test_every_judged_module_has_tests_that_exist():
    for module, tests in REACHING.items():
        assert (ROOT / module).is_file()
        assert all((ROOT / t).is_file() for t in tests if t.startswith("tests/"))


def run_of(module, statuses, commit="abc1234"):
    results = [{"module": module, "function": "f", "line": i, "index": i, "before": "x = 1", "after": f"x = {i}",
                "status": status, "seconds": 1.0} for i, status in enumerate(statuses)]
    return {"module": module, "points": 40, "seed": 0, "tests": ["tests/t.py"], "results": results,
            "date": "2026-12-07", "commit": commit}


def test_the_main_report_shows_the_latest_sample_of_each_module_once(tmp_path, monkeypatch):
    import scripts.mutation_tf as mutation_tf

    report = tmp_path / "mutation-report.md"
    report.write_text("# Mutation testing\n\n| module |\n| --- |\n| `a.py` |\n\n## Survivors\n\nnone\n")
    monkeypatch.setattr(mutation_tf, "MAIN_REPORT", report)
    monkeypatch.setattr(mutation_tf, "EQUIVALENT", tmp_path / "none.json")
    first = mutation_tf.merged([], [run_of("model/a.py", ["killed"] * 3 + ["survived"]),
                                    run_of("model/b.py", ["killed"])])
    mutation_tf.update_main_report(first)
    again = mutation_tf.merged(first, [run_of("model/a.py", ["killed"] * 4, commit="def5678")])
    assert [r["module"] for r in again] == ["model/a.py", "model/b.py"] and again[0]["commit"] == "def5678"
    mutation_tf.update_main_report(again)
    text = report.read_text()
    assert text.count(mutation_tf.SECTION_START) == 1 and text.count("## Survivors") == 1
    assert text.index("| `a.py` |") < text.index(mutation_tf.SECTION_START) < text.index("## Survivors")
    assert "| `model/a.py` | 40 | 4 (0) | 4 | 0 | 0 | 0 | 100.0% | 2026-12-07 at def5678 |" in text
    assert "| `model/b.py` | 40 | 1 (0) | 1 | 0 | 0 | 0 | 100.0% | 2026-12-07 at abc1234 |" in text
    assert "75.0%" not in text  # the replaced run is gone


def test_survivors_are_judged_again_only_while_the_module_is_unchanged():
    import pytest

    from scripts.mutation_tf import judge_survivors_again

    path = ROOT / "build" / "mutation-tf-again.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SOURCE)
    try:
        _, mutant = make_mutant(path, 0)
        result = {**mutant.__dict__, "status": "survived", "seconds": 1.0}
        run = {"module": mutant.module, "seed": 0, "results": [result], "date": "2026-12-07", "commit": "abc1234"}
        all_killed = {**run, "results": [{**result, "status": "killed"}]}
        assert judge_survivors_again(all_killed, jobs=1) is all_killed  # nothing to judge
        path.write_text(SOURCE.replace("factor=2.0", "factor=3.0"))
        with pytest.raises(SystemExit, match="changed since its run of 2026-12-07 at abc1234"):
            judge_survivors_again(run, jobs=1)
    finally:
        path.unlink()

"""Mutation testing of the TensorFlow half: each mutant of a TF module judged in a fresh process.

    .venv/bin/python -m scripts.mutation_tf --module model/export.py --module model/fuse.py   # 60 mutants each

mutmut (``scripts/mutation.py``) judges each mutant in a child forked from a process that has run the tests:
TensorFlow does not survive that fork, so the modules only TensorFlow runs were left unmeasured. Here each
mutant is a fresh ``python -m pytest`` over the tests that reach its module (:data:`REACHING`), in a copy of
the tree where that one module is replaced by its mutant. That costs TensorFlow's import per mutant, so a module
is judged on a sample: mutants drawn evenly over its functions (each function in turn, a seeded random pick
within it), the seed in the report.

The mutations are mutmut's kinds, made on the module's syntax tree: an arithmetic or comparison operator
swapped, ``and``/``or`` swapped, a ``not`` dropped, a number changed by one (or a float doubled), a boolean
flipped, a string changed. Docstrings are left alone. A mutant is *killed* when a test fails, *timed out* when
the tests run three times longer than on the clean code (counted as caught), *survived* otherwise. Keeps the
latest run of each module in ``tests/mutation-runs-tf.json``, writes ``tests/mutation-report-tf.md`` with the
diff of every survivor, and puts the modules' table into ``tests/mutation-report.md`` beside mutmut's.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scripts.localstack import ROOT
from transformer.helpformat import HelpFormatter

REPORT = ROOT / "tests" / "mutation-report-tf.md"
# The latest run of each module (what both reports are written from); tests/mutation-report.md shows its table
# between these markers, so no module of the project is left out of the one report.
RUNS = ROOT / "tests" / "mutation-runs-tf.json"
MAIN_REPORT = ROOT / "tests" / "mutation-report.md"
SECTION_START, SECTION_END = "<!-- tensorflow-sample -->", "<!-- /tensorflow-sample -->"
# Survivors judged equivalent, with the reason: the same file as scripts/mutation.py's, entries naming a module, a
# piece of the changed line ("contains") and optionally the function.
EQUIVALENT = ROOT / "tests" / "mutation-equivalent.json"
COPIED = ("transformer", "model", "scripts", "tests", "pyproject.toml", "README.md")
# The tests that reach each TensorFlow module and run in seconds (small models, a few steps): what judges it.
REACHING = {
    "model/export.py": ["tests/test_export.py"],
    "model/fuse.py": ["tests/test_fused.py", "-k", "compiled or quantile_tables or mismatch or unsupported or width "
                      "or native_ops or signature_outputs or parity or overwrites"],
    "model/embedder.py": ["tests/test_embedder.py", "tests/test_export.py"],
    "model/input_pipeline.py": ["tests/test_input_pipeline.py", "tests/test_embedder.py"],
    "model/verify.py": ["tests/test_verify.py", "tests/test_tf_serving_ops.py"],
    "model/train.py": ["tests/test_train.py", "tests/test_training_data.py", "-k",
                       "layout or bad_csv or adds_a_version or two_files or held_out or split_is or batch_is "
                       "or workers_flag or writes_into or peak_memory or killed_runs or sigterm_ends or quiet_training"],
}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
         ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
         ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}


@dataclass(frozen=True)
class Mutant:
    module: str
    function: str
    line: int
    index: int  # which mutation point of the module
    before: str
    after: str


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _mutated(node: ast.AST) -> ast.AST | None:
    """The node with one mutation, or None when it has none."""
    if isinstance(node, (ast.BinOp, ast.BoolOp, ast.AugAssign)) and type(node.op) in SWAPS:
        new = copy.copy(node)
        new.op = SWAPS[type(node.op)]()
        return new
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
        new = copy.copy(node)
        new.ops = [SWAPS[type(node.ops[0])]()]
        return new
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return node.operand
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return ast.Constant(not value)
        if isinstance(value, int):
            return ast.Constant(value + 1)
        if isinstance(value, float):
            return ast.Constant(value * 2 if value else 1.0)
        if isinstance(value, str) and value:
            return ast.Constant("XX" + value + "XX")
    return None


def make_mutant(path: Path, index: int) -> tuple[str, Mutant]:
    """The module's source with mutation point ``index`` applied, and what it changed."""
    source = path.read_text()
    tree = ast.parse(source)
    function, node = mutation_points_of(tree)[index]
    replacement = _mutated(node)
    lines = source.splitlines()
    before = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""

    class Swap(ast.NodeTransformer):
        def generic_visit(self, current):
            if current is node:
                return ast.copy_location(replacement, current)
            return super().generic_visit(current)

    original, changed = ast.unparse(node), ast.unparse(replacement)
    mutated = ast.unparse(ast.fix_missing_locations(Swap().visit(tree)))
    after = before.replace(original, changed, 1) if original in before else f"{before}  # {original} -> {changed}"
    return mutated, Mutant(path.relative_to(ROOT).as_posix(), function, getattr(node, "lineno", 0), index, before,
                           after)


CLI_FUNCTIONS = {"main", "parse_args"}  # the command line, not what TensorFlow runs: judged by tests/test_help.py


def mutation_points_of(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(function, node) of every mutable node whose innermost scope is a function or method of the module, in
    source order. Left alone: docstrings, help texts and the parts of f-strings (messages), and the command line's
    own functions (:data:`CLI_FUNCTIONS`)."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            skip.update(id(n) for n in ast.walk(node.value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(n) for n in node.values if isinstance(n, ast.Constant))
    points = []

    def visit(node, function, in_def):
        for child in ast.iter_child_nodes(node):
            name, inside = function, in_def
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name, inside = (f"{function}.{child.name}" if function else child.name), True
            elif isinstance(child, ast.ClassDef):
                name, inside = (f"{function}.{child.name}" if function else child.name), False
            elif in_def and id(child) not in skip and _mutated(child) is not None \
                    and not set(function.split(".")) & CLI_FUNCTIONS:
                points.append((function, child))
            visit(child, name, inside)

    visit(tree, "", False)
    return points


def sample(points: list[tuple[str, ast.AST]], size: int, seed: int) -> list[int]:
    """``size`` point indices drawn evenly over the functions: each function in turn, a random one within it."""
    rng = random.Random(seed)
    by_function: dict[str, list[int]] = {}
    for index, (function, _) in enumerate(points):
        by_function.setdefault(function, []).append(index)
    pools = {f: rng.sample(indices, len(indices)) for f, indices in sorted(by_function.items())}
    chosen = []
    while len(chosen) < min(size, len(points)):
        for function in sorted(pools):
            if pools[function] and len(chosen) < size:
                chosen.append(pools[function].pop())
    return sorted(chosen)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """("passed" | "failed" | "timeout", seconds) of the reaching tests in ``workdir``."""
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-o", "addopts=", *tests], cwd=workdir, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started
    return ("passed" if done.returncode == 0 else "failed"), time.monotonic() - started


def judge(module: str, size: int, seed: int, jobs: int, say=print, indices: list[int] | None = None) -> dict:
    """Run a sample of the module's mutants (or the mutation points ``indices``); the outcome (JSON-able)."""
    source = ROOT / module
    points = mutation_points_of(ast.parse(source.read_text()))
    chosen = sample(points, size, seed) if indices is None else sorted(indices)
    tests = REACHING[module]
    workdirs = []
    for _ in range(jobs):
        workdir = Path(tempfile.mkdtemp(prefix="mutation-tf-"))
        for name in COPIED:
            src = ROOT / name
            (shutil.copytree(src, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "build"))
             if src.is_dir() else shutil.copy2(src, workdir / name))
        workdirs.append(workdir)
    try:
        clean, seconds = run_tests(workdirs[0], tests, timeout=900)
        if clean != "passed":
            raise SystemExit(f"error: the reaching tests of {module} fail without any mutant: "
                             f"python -m pytest {' '.join(tests)}")
        say(f"== {module}: {len(points)} mutation points in {len({f for f, _ in points})} functions; {len(chosen)} "
            f"sampled (seed {seed}); the clean tests take {seconds:.0f}s")
        free = list(workdirs)

        def one(index: int) -> dict:
            workdir = free.pop()
            try:
                mutated, mutant = make_mutant(source, index)
                (workdir / module).write_text(mutated)
                outcome, took = run_tests(workdir, tests, timeout=max(60.0, 3 * seconds))
                status = {"failed": "killed", "timeout": "timeout", "passed": "survived"}[outcome]
                return {**mutant.__dict__, "module": module, "status": status, "seconds": round(took, 1)}
            finally:
                shutil.copy2(source, workdir / module)
                free.append(workdir)

        results = []
        with ThreadPoolExecutor(jobs) as pool:
            for n, result in enumerate(pool.map(one, chosen), 1):
                results.append(result)
                say(f"  [{n}/{len(chosen)}] {result['status']:8} {result['function']} line {result['line']}: "
                    f"{result['after'][:90]}")
        return {"module": module, "points": len(points), "seed": seed, "tests": tests, "results": results,
                "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    finally:
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def equivalence(result: dict, explained: list[dict]) -> str | None:
    """The reason a survivor is equivalent, if one was given for it."""
    for entry in explained:
        if entry["module"] == result["module"] and entry.get("function", result["function"]) == result["function"] \
                and entry["contains"] in result["after"]:
            return entry["reason"]
    return None


def judged(runs: list[dict]) -> list[dict]:
    """The runs with each survivor that tests/mutation-equivalent.json explains marked equivalent, with its reason."""
    explained = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else []
    for run in runs:
        for result in run["results"]:
            if result["status"] in ("survived", "equivalent"):
                reason = equivalence(result, explained)
                result["status"] = "equivalent" if reason else "survived"
                result["reason"] = reason
    return runs


def table(runs: list[dict], with_tests: bool = True) -> list[str]:
    """The per-module table of judged runs (markdown lines)."""
    lines = ["| module | mutation points | sampled (seed) | killed | timed out | survived | equivalent | caught of the "
             "rest |" + (" tests | run |" if with_tests else " run |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" --- | --- |" if with_tests else " --- |")]
    for run in sorted(runs, key=lambda r: r["module"]):
        counts = {s: sum(r["status"] == s for r in run["results"])
                  for s in ("killed", "timeout", "survived", "equivalent")}
        caught, rest = counts["killed"] + counts["timeout"], len(run["results"]) - counts["equivalent"]
        tests = f" `{' '.join(run['tests'])}` |" if with_tests else ""
        lines.append(f"| `{run['module']}` | {run['points']} | {len(run['results'])} ({run['seed']}) | "
                     f"{counts['killed']} | {counts['timeout']} | {counts['survived']} | {counts['equivalent']} | "
                     f"{100 * caught / max(rest, 1):.1f}% |{tests} {run['date']} at {run['commit']}"
                     f"{'; ' + run['again'] if run.get('again') else ''} |")
    return lines


def tensorflow_section(runs: list[dict] | None = None) -> list[str]:
    """What tests/mutation-report.md shows of the TensorFlow modules: the sampled runs' table, between markers."""
    if runs is None:
        runs = json.loads(RUNS.read_text()) if RUNS.exists() else []
    if not runs:
        return []
    return [SECTION_START, "", "### The TensorFlow modules, judged by sample", "",
            "TensorFlow does not survive mutmut's fork, so mutmut's rows above count these modules' mutants as "
            "reached by no fast test. Each is judged instead by `python -m scripts.mutation_tf`: a sample of its "
            "mutants drawn evenly over its functions (the seed in the table), each in a fresh process against the "
            "tests that reach the module. Survivors and equivalences: tests/mutation-report-tf.md.", "",
            *table(judged(runs), with_tests=False), "", SECTION_END]


def update_main_report(runs: list[dict]) -> None:
    """Put the TensorFlow modules' table into tests/mutation-report.md (replacing the one there), after its
    own table."""
    if not MAIN_REPORT.exists():
        return
    text = MAIN_REPORT.read_text()
    section = "\n".join(tensorflow_section(runs))
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + section + rest.split(SECTION_END, 1)[1]
    else:
        head, sep, tail = text.partition("\n## Survivors")
        text = head.rstrip("\n") + "\n\n" + section + "\n" + sep + tail
    MAIN_REPORT.write_text(text)


def judge_survivors_again(run: dict, jobs: int, say=print) -> dict:
    """The run with its survivors judged again against today's tests (after tests were added for them); its
    killed mutants stay killed, as tests are only ever added. Refused when the module changed since the run."""
    source = ROOT / run["module"]
    survivors = [r for r in judged([run])[0]["results"] if r["status"] == "survived"]  # not the explained ones
    for result in survivors:
        _, now = make_mutant(source, result["index"])
        if (now.before, now.after) != (result["before"], result["after"]):
            raise SystemExit(f"error: {run['module']} changed since its run of {run['date']} at {run['commit']} "
                             f"(mutation point {result['index']} is now {now.after!r}): judge it whole again")
    if not survivors:
        return run
    again = judge(run["module"], 0, run["seed"], jobs, say, indices=[r["index"] for r in survivors])
    fresh = {r["index"]: r for r in again["results"]}
    results = [fresh.get(r["index"], r) for r in run["results"]]
    return {**run, "results": results, "tests": again["tests"],
            "again": f"{len(survivors)} survivor{'s' if len(survivors) != 1 else ''} judged again on {again['date']} "
                     f"at {again['commit']}"}


def merged(saved: list[dict], new: list[dict]) -> list[dict]:
    """The saved runs with each module judged anew replaced by its new run."""
    fresh = {run["module"] for run in new}
    return sorted([run for run in saved if run["module"] not in fresh] + new, key=lambda r: r["module"])


def write_report(runs: list[dict]) -> None:
    runs = judged(runs)
    lines = ["# Mutation testing of the TensorFlow half", "",
             "`python -m scripts.mutation_tf` (see its docstring): each sampled mutant of a module that only "
             "TensorFlow runs, judged in a fresh process by the tests that reach that module. *Caught* is killed "
             "plus timed out.", "", *table(runs)]
    lines += ["", "## Survivors", ""]
    for run in runs:
        survivors = [r for r in run["results"] if r["status"] == "survived"]
        if survivors:
            lines += [f"### `{run['module']}`", "", "```diff"]
            for r in survivors:
                lines += [f"# {r['function']}, line {r['line']}", f"- {r['before']}", f"+ {r['after']}"]
            lines += ["```", ""]
    equivalents = [r for run in runs for r in run["results"] if r["status"] == "equivalent"]
    if equivalents:
        lines += ["## Equivalent survivors", ""]
        lines += [f"* `{r['module']}`, `{r['function']}`, line {r['line']}: `{r['after']}`: {r['reason']}."
                  for r in equivalents]
        lines.append("")
    REPORT.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.mutation_tf", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--module", action="append", choices=sorted(REACHING), default=[],
                        help="a TensorFlow module to judge (repeatable; default: every one)")
    parser.add_argument("--sample", type=int, default=60, help="mutants per module, drawn evenly over its functions")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (in the report)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants judged at once")
    parser.add_argument("--save", type=Path, metavar="FILE", help="also save the runs (JSON), for --report-from")
    parser.add_argument("--survivors-again", action="store_true",
                        help="judge again only the survivors of each module's saved run, after tests were added "
                             "for them (the module itself unchanged)")
    parser.add_argument("--report-from", type=Path, nargs="+", metavar="FILE",
                        help="judge nothing: take the runs saved with --save (each replacing its module's run in "
                             "tests/mutation-runs-tf.json) and write the reports")
    args = parser.parse_args(argv)
    if args.sample < 1 or args.jobs < 1:
        parser.error("--sample and --jobs must be at least 1")
    saved = json.loads(RUNS.read_text()) if RUNS.exists() else []
    if args.report_from:
        new = [run for path in args.report_from for run in json.loads(path.read_text())]
    elif args.survivors_again:
        modules = args.module or sorted(REACHING)
        missing = sorted(set(modules) - {run["module"] for run in saved})
        if missing:
            parser.error(f"no saved run of {', '.join(missing)} in {RUNS.relative_to(ROOT)} to judge again")
        new = [judge_survivors_again(run, args.jobs) for run in saved if run["module"] in modules]
    else:
        new = [judge(module, args.sample, args.seed, args.jobs) for module in (args.module or sorted(REACHING))]
        if args.save:
            args.save.write_text(json.dumps(new))
    runs = merged(saved, new)
    RUNS.write_text(json.dumps(runs, indent=1) + "\n")
    write_report(runs)
    update_main_report(runs)
    print(f"wrote {REPORT.relative_to(ROOT)}, {RUNS.relative_to(ROOT)} and the TensorFlow table of "
          f"{MAIN_REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

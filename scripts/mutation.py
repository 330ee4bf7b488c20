"""Mutation testing: how many deliberate small bugs in transformer/ and model/ the fast tests catch.

    .venv/bin/python -m scripts.mutation                 # all of transformer/ and model/ (about an hour on 2 cores)
    .venv/bin/python -m scripts.mutation --only transformer/serving/admission.py --only transformer/serving/coalesce.py

mutmut (pinned in the dev extra) mutates a copy of the working tree, so this checkout never gets
a ``mutants/`` folder, and runs for each mutant the fast tests that reach the mutated function:
the test files named in ``[tool.mutmut]`` of pyproject.toml, without the tests marked ``heavy``
(servers, processes, training). Then this writes ``tests/mutation-report.md``: per module how
many mutants the tests killed, how many survived and how many no fast test reaches, and the diff
of every survivor, to be killed by a new test or explained. Not part of the suite: too slow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.localstack import ROOT
from transformer.helpformat import HelpFormatter

COPIED = ("transformer", "model", "scripts", "tests", "pyproject.toml", "README.md")
REPORT = ROOT / "tests" / "mutation-report.md"
# Survivors judged equivalent (no test can tell them apart), each with its reason: {"module", "contains"
# (a line of the mutant's diff), "reason"}.
EQUIVALENT = ROOT / "tests" / "mutation-equivalent.json"
# mutmut's statuses: a timeout means the mutant made the tests run far longer than without it, which
# on a busy machine can also be noise; counted as caught but shown apart.
CAUGHT = ("killed", "timeout")
# mutmut forks a child per mutant from a process that has already run the tests. OpenMP's thread pool (used
# by scikit-learn's KMeans) does not survive a fork: measured here, KMeans fitted in such a child hung, and
# so every mutant whose tests fit a KMeans in a fixture "timed out" (214 of them in the run of 863c735, all
# of drift.py and fitted.py among them), counted as caught without any test failing. One thread each: no
# pool to lose, and two mutants tested at once on two cores do not fight over threads anyway.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Not part of the score: reached by no fast test, judged equivalent, or not run (a run stopped early).
UNJUDGED = ("no tests", "equivalent", "not checked")


def copy_tree(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "mutants", "build")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=ignore)
        else:
            shutil.copy2(source, into / name)


def restrict(pyproject: Path, only: list[str]) -> None:
    """Mutate only these files (mutmut's only_mutate), in the copy's configuration."""
    text = pyproject.read_text()
    listed = ", ".join(f'"{path}"' for path in only)
    pyproject.write_text(text.replace("[tool.mutmut]\n", f"[tool.mutmut]\nonly_mutate = [{listed}]\n", 1))


def results(workdir: Path) -> dict[str, str]:
    """{mutant name: status} for every mutant."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True, check=True).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\S+): (.+?)\s*$", out, re.M)}


def diff(workdir: Path, name: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir,
                           capture_output=True, text=True).stdout
    return "\n".join(line for line in shown.splitlines()
                     if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))


def module_of(name: str) -> str:
    """``transformer.serving.admission.xǁAdmissionǁenter__mutmut_6`` -> ``transformer/serving/admission.py``."""
    dotted = name.split(".x")[0] if ".x" in name else name.rsplit(".", 1)[0]
    path = dotted.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"  # a package's own functions


def function_of(name: str) -> str:
    tail = name.rsplit(".", 1)[-1]
    return re.sub(r"__mutmut_\d+$", "", tail.removeprefix("x_").removeprefix("x")).replace("ǁ", ".").strip(".")


def equivalence(name: str, diff_text: str, explained: list[dict]) -> str | None:
    """The reason this survivor is equivalent, if one was given for it: an entry names the module, a piece of
    the mutant's changed line (``contains``; with ``"exact": true``, the whole line) and optionally the
    ``function``, for a piece too common to name one mutant alone."""
    for entry in explained:
        if entry["module"] != module_of(name) or entry.get("function", function_of(name)) != function_of(name):
            continue
        added = [line[1:].strip() for line in diff_text.splitlines() if line.startswith("+")]
        wanted = entry["contains"].strip()
        if any(line == wanted or (not entry.get("exact") and wanted in line) for line in added):
            return entry["reason"]
    return None


def save_run(path: Path, statuses: dict[str, str], diffs: dict[str, str], seconds: float, only: list[str]) -> None:
    """One run's outcome, to write a report later from several runs (``--report-from``)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    path.write_text(json.dumps({"commit": commit, "date": time.strftime("%Y-%m-%d"), "seconds": seconds,
                                "only": only, "statuses": statuses, "diffs": diffs}))


def combined(paths: list[Path]) -> tuple[dict[str, str], dict[str, str], float, list[dict]]:
    """The statuses and diffs of saved runs over different files (a mutant in two runs: the later one counts)."""
    statuses, diffs, seconds, runs = {}, {}, 0.0, []
    for path in paths:
        run = json.loads(path.read_text())
        statuses.update(run["statuses"])
        diffs = {name: text for name, text in diffs.items() if name not in run["statuses"]} | run["diffs"]
        seconds += run["seconds"]
        runs.append(run)
    return statuses, diffs, seconds, runs


def write_report(statuses: dict[str, str], diffs: dict[str, str], seconds: float, only: list[str],
                 runs: list[dict] | None = None) -> None:
    explained = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else []
    reasons = {name: equivalence(name, text, explained) for name, text in diffs.items()}
    statuses = {name: "equivalent" if reasons.get(name) else status for name, status in statuses.items()}
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in statuses.items():
        per_module[module_of(name)][status] += 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *COPIED], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    total = Counter(statuses.values())
    reached = sum(n for status, n in total.items() if status not in UNJUDGED)
    caught = sum(total[s] for s in CAUGHT)
    if runs:  # several saved runs, each over its own files
        ran = "; ".join(f"`python -m scripts.mutation{''.join(f' --only {p}' for p in run['only'])}` on {run['date']} "
                        f"at {run['commit']} ({len(run['statuses'])} mutants, {run['seconds'] / 60:.1f} min)"
                        for run in runs)
        ran = f"{ran}, combined: mutmut {_version()}, {len(statuses)} mutants"
    else:
        ran = (f"`python -m scripts.mutation{''.join(f' --only {p}' for p in only)}` on {time.strftime('%Y-%m-%d')} "
               f"at {commit}{' with uncommitted changes' if dirty else ''}: mutmut "
               f"{_version()}, {len(statuses)} mutants in {seconds / 60:.1f} min")
    lines = [
        "# Mutation testing of transformer/ and model/",
        "",
        f"{ran}. Each mutant is one small change "
        "(an operator, a constant, a condition, an argument) in `transformer/` or `model/` (less what "
        "`do_not_mutate` in pyproject.toml leaves out, with its reason); the fast tests (pyproject.toml, "
        "`[tool.mutmut]`, without the tests marked `heavy`) ran against it. *Caught* is killed (a test "
        "failed) plus timed out (the tests ran far longer than without the mutant). *No fast test* means only "
        "the heavy tests (servers, processes, training) reach that code; the modules only TensorFlow runs are "
        "judged apart, a sample of mutants each in a fresh process: tests/mutation-report-tf.md "
        "(`python -m scripts.mutation_tf`).",
        "",
        f"**{caught} of {reached} mutants that fast tests reach were caught ({100 * caught / max(reached, 1):.1f}%)**; "
        f"{total['survived']} survived; {total['equivalent']} survivors are equivalent (listed with the reason, "
        f"from tests/mutation-equivalent.json) and not counted; {total['no tests']} are reached by no fast test"
        + (f"; {total['not checked']} were not run (the run was stopped)." if total["not checked"] else "."),
        "",
        "| module | mutants | killed | timed out | survived | equivalent | no fast test | not run | caught of reached |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for module, counts in sorted(per_module.items()):
        reached_here = sum(n for status, n in counts.items() if status not in UNJUDGED)
        caught_here = sum(counts[s] for s in CAUGHT)
        share = f"{100 * caught_here / reached_here:.1f}%" if reached_here else "-"
        lines.append(f"| `{module}` | {sum(counts.values())} | {counts['killed']} | {counts['timeout']} | "
                     f"{counts['survived']} | {counts['equivalent']} | {counts['no tests']} | {counts['not checked']} | "
                     f"{share} |")
    other = {s: n for s, n in total.items() if s not in (*CAUGHT, "survived", *UNJUDGED)}
    if other:
        lines += ["", "Other outcomes: " + ", ".join(f"{n} {s}" for s, n in sorted(other.items())) + "."]
    from scripts.mutation_tf import tensorflow_section

    section = tensorflow_section()
    if section:
        lines += ["", *section]
    lines += ["", "## Survivors", "",
              "Each is a change no fast test noticed: a missing assertion, or a change that does not alter "
              "behaviour (an equivalent mutant).", ""]
    by_function: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in sorted(diffs):
        if not reasons[name]:
            by_function[(module_of(name), function_of(name))].append(name)
    for (module, function), names in sorted(by_function.items()):
        lines += [f"### `{module}`: `{function}`", "", "```diff"]
        for name in names:
            lines.append(diffs[name] or f"# {name}: no diff shown")
        lines += ["```", ""]
    equivalents = sorted(name for name, reason in reasons.items() if reason)
    if equivalents:
        lines += ["## Equivalent survivors", ""]
        for name in equivalents:
            changed = " ".join(line[1:].strip() for line in diffs[name].splitlines() if line.startswith("+"))
            lines.append(f"* `{module_of(name)}`, `{function_of(name)}`: `{changed}`: {reasons[name]}.")
        lines.append("")
    REPORT.write_text("\n".join(lines) + "\n")


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.mutation", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="FILE",
                        help="mutate only this file (repeatable), e.g. transformer/serving/admission.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--keep", action="store_true", help="keep the working copy (its path is printed)")
    parser.add_argument("--save", type=Path, metavar="FILE", help="also save the run's outcome to FILE (JSON)")
    parser.add_argument("--report-from", type=Path, nargs="+", metavar="FILE",
                        help="run nothing: write the report from runs saved with --save (over different files)")
    args = parser.parse_args(argv)
    if args.report_from:
        statuses, diffs, seconds, runs = combined(args.report_from)
        write_report(statuses, diffs, seconds, [], runs)
        print(f"wrote {REPORT.relative_to(ROOT)} from {len(runs)} runs")
        return 0
    missing = [path for path in args.only if not (ROOT / path).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)} (give paths like transformer/serving/admission.py)")
    if shutil.which("git") is None:
        parser.error("git is needed to name the commit in the report")

    workdir = Path(tempfile.mkdtemp(prefix="mutation-"))
    started = time.monotonic()
    try:
        copy_tree(workdir)
        if args.only:
            restrict(workdir / "pyproject.toml", args.only)
        print(f"== mutmut in {workdir} ({args.jobs} at once); its progress line follows", flush=True)
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)], cwd=workdir,
                             env={**os.environ, **ONE_THREAD})
        if run.returncode != 0:
            print(f"error: mutmut exited with {run.returncode}; the clean test run must pass first "
                  "(run the selected tests without mutants to see why)", file=sys.stderr)
            return 1
        statuses = results(workdir)
        survivors = [name for name, status in statuses.items() if status == "survived"]
        print(f"== {len(statuses)} mutants, {len(survivors)} survived; collecting their diffs", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:  # one `mutmut show` process each: about a second
            diffs = dict(zip(survivors, pool.map(lambda name: diff(workdir, name), survivors)))
        write_report(statuses, diffs, time.monotonic() - started, args.only)
        if args.save:
            save_run(args.save, statuses, diffs, time.monotonic() - started, args.only)
        print(f"wrote {REPORT.relative_to(ROOT)}")
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Every command explains itself: each script answers -h/--help with what it does and its environment variables,
and does nothing else; a script that takes no arguments refuses them instead of ignoring them."""

from __future__ import annotations

import os
import re
import sys
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.sh") if p.name != "lib.sh")
# Variables a script reads that are not its settings (bash's own, or set by lib.sh from versions.env).
NOT_SETTINGS = {"BASH_SOURCE", "KIND_CLUSTER_NAME", "TRANSFORMER_IMAGE", "TRAINING_IMAGE", "NAMESPACE"}


def settings_read_by(script: Path) -> set[str]:
    """The environment variables a script reads with a default (``${NAME:-...}``): its settings."""
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", script.read_text())) - NOT_SETTINGS


@pytest.fixture
def sandbox(tmp_path):
    """A copy of scripts/ in an empty project folder: whatever a script would set up or build would appear here."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_each_script_answers_help_with_what_it_does_and_its_settings_and_does_nothing(script, flag, sandbox):
    before = files_in(sandbox)
    done = subprocess.run(["bash", f"scripts/{script.name}", flag], cwd=sandbox, capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(sandbox)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    text = done.stdout
    assert text.startswith(f"Usage: scripts/{script.name}"), text[:200]
    assert len(text.splitlines()) >= 3 and "shellcheck" not in text and "#" not in text.splitlines()[0]
    for name in settings_read_by(script):
        assert re.search(rf"^\s+{name}\s", text, re.MULTILINE), f"{script.name} --help does not describe {name}"
    assert ("Environment:" in text) == bool(settings_read_by(script) or "PYTHON" in text)
    assert files_in(sandbox) == before  # nothing set up, built or started


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in ("demo.sh", "test.sh")], ids=lambda p: p.name)
def test_a_script_without_arguments_refuses_one_instead_of_ignoring_it(script, sandbox):
    done = subprocess.run(["bash", f"scripts/{script.name}", "--overlay", "fused"], cwd=sandbox, capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(sandbox)})
    assert done.returncode == 2
    assert done.stderr == (f"error: {script.name} takes no arguments (got: --overlay fused); its settings are "
                           f"environment variables: see {script.name} --help\n")


# -- every Python command ------------------------------------------------------------------------------------------

# python -m MODULE [SUBCOMMAND]: every command a user or a script runs.
COMMANDS = [("model.train", ()), ("model.pipeline", ("compile",)), ("model.pipeline", ("run-local",)),
            ("model.synthetic", ()), ("model.fuse", ()), ("model.standin", ()), ("transformer", ()),
            ("scripts.localstack", ()), ("scripts.cluster", ()), ("scripts.demo", ()), ("scripts.benchmark", ()),
            ("scripts.mutation", ()), ("scripts.mutation_tf", ()), ("scripts.training_scale", ()),
            ("scripts.tf_op_registry", ()),
            ("scripts.anchors.floor", ()), ("scripts.anchors.plain_transformer", ()),
            ("tests.controlplane.build", ()), ("tests.controlplane.record", ()), ("tests.objectstore", ())]

# Runs the module as `python -m` would with --help, and reports the parser that answered (the subcommand's when
# one is given) and whether TensorFlow had been imported by then, instead of printing the help.
PROBE = r"""
import argparse, json, runpy, sys
module, sub = sys.argv[1], sys.argv[2:]
seen = {}
original = argparse.ArgumentParser.parse_known_args
def capture(self, args=None, namespace=None):
    if not self.add_help:  # a parent parser read on its own (kserve parses sys.argv when imported): not the command's
        return original(self, args, namespace)
    parser = self
    for action in self._actions:
        if isinstance(action, argparse._SubParsersAction) and sub:
            parser = action.choices[sub[0]]
    seen["help"] = parser.format_help()
    def rendered(action):
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        return " ".join(formatter.format_help().split())
    seen["actions"] = [{"flags": a.option_strings, "help": a.help, "shown": rendered(a)}
                       for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                       and not isinstance(a, argparse._HelpAction)]
    seen["tensorflow"] = "tensorflow" in sys.modules
    print("PROBE" + json.dumps(seen))
    sys.exit(0)
argparse.ArgumentParser.parse_known_args = capture
sys.argv = [module, *sub, "--help"]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, sub", COMMANDS, ids=lambda c: " ".join(c) if isinstance(c, tuple) else c)
def test_each_python_commands_help_describes_every_option_once_without_importing_tensorflow(module, sub):
    import json

    done = subprocess.run([sys.executable, "-c", PROBE, module, *sub], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    reports = [line[5:] for line in done.stdout.splitlines() if line.startswith("PROBE")]
    assert reports, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(reports[0])
    assert report["tensorflow"] is False, f"{module} imports TensorFlow before reading its arguments"
    undescribed = [a["flags"][0] for a in report["actions"] if not (a["help"] or "").strip()]
    assert not undescribed, f"{module} {' '.join(sub)}: no help for {undescribed}"
    for action in report["actions"]:
        shown = action["shown"]
        assert "(default: None)" not in shown and "(default: )" not in shown and "(default: [])" not in shown, shown
        assert shown.count("(default:") <= 1, f"a default shown twice: {shown}"


# -- every command line the READMEs give ---------------------------------------------------------------------------

READMES = ["README.md", "model/README.md", "manifests/README.md", "transformer/README.md", "benchmarks/README.md",
           "tests/README.md"]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python -m MODULE ...` line in the READMEs' code blocks, continuation lines joined,
    comments, `&` and the interpreter's path left out."""
    import shlex

    found = []
    for readme in READMES:
        inside, pending = False, ""
        for number, line in enumerate((ROOT / readme).read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                inside = not inside
                continue
            if not inside:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            if "python -m " not in text:
                continue
            words = shlex.split(text, comments=True)
            while words and words[-1] == "&":
                words.pop()
            if len(words) >= 3 and words[0].endswith("python") and words[1] == "-m" and "|" not in words:
                found.append((f"{readme}:{number}", words[2:]))
    return found


# Runs MODULE with the documented arguments up to its parser: the parse is real (an unknown flag, a wrong type or
# choice fails as it would for a user), and the command stops once its parser accepted them.
PARSE_ONLY = r"""
import argparse, runpy, sys
original = argparse.ArgumentParser.parse_known_args
def accepted(self, args=None, namespace=None):
    result = original(self, args, namespace)
    if self.add_help and not result[1]:  # the command's own parser (kserve parses sys.argv with one without help),
        # and nothing left over (parse_args refuses what is)
        print("ACCEPTED")
        sys.exit(0)
    return result
argparse.ArgumentParser.parse_known_args = accepted
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_the_readmes_give_command_lines():
    commands = documented_commands()
    assert len(commands) >= 15
    assert {argv[0] for _, argv in commands} >= {"model.train", "model.pipeline", "model.synthetic", "scripts.benchmark",
                                                  "scripts.localstack", "scripts.mutation", "pytest"}


@pytest.mark.parametrize("where, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_line_is_accepted_by_its_command(where, argv):
    if argv[0] in ("pytest", "pip", "venv"):
        pytest.skip("not a command of this project")
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "ACCEPTED" in done.stdout, f"{where}: python -m {' '.join(argv)}\n{done.stderr[-1500:]}"

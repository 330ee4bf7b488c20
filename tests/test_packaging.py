"""What a newcomer's first command meets before anything runs: which Python ``scripts/setup.sh`` takes, and
the project's packaging metadata as a wheel build reads it.

setup.sh runs for real in a copy of its folder, against stand-in interpreters on PATH that say which version
they are and log what they are asked to do (nothing is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts.localstack import ROOT

# A stand-in for python3.X: answers setup.sh's range check and --version as that version, makes a venv whose
# python is itself, and logs everything else (pip installs) without doing it.
INTERPRETER = r'''#!/usr/bin/env bash
minor=%(minor)d
echo "$0 $*" >> "$STUB_LOG"
case "$1" in
  -c) [ "$minor" -ge 11 ] && [ "$minor" -le 13 ]; exit $? ;;
  --version) echo "Python 3.$minor.1"; exit 0 ;;
esac
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
exit 0
'''


@pytest.fixture
def project(tmp_path):
    """A copy of setup.sh (with the helpers and versions it sources) and pyproject.toml in a folder of its own, a
    PATH of stand-ins, and the log."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "lib.sh", "versions.env"):
        (root / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"

    def interpreters(*names_and_minors):
        for name, minor in names_and_minors:
            (bin_dir / name).write_text(INTERPRETER % {"minor": minor})
            (bin_dir / name).chmod(0o755)

    def run(**env):
        # Only the stand-ins and the system's tools: no real python3.x may be found on this PATH.
        tools = tmp_path / "tools"
        if not tools.exists():
            tools.mkdir()
            for tool in ("bash", "cat", "cut", "sha256sum", "shasum", "rm", "touch", "mkdir", "cp", "dirname",
                         "printf", "env"):
                found = next((Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()), None)
                if found:
                    (tools / tool).symlink_to(found)
        result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], cwd=root, capture_output=True,
                                text=True, timeout=60,
                                env={"PATH": f"{bin_dir}:{tools}", "STUB_LOG": str(log), "HOME": str(tmp_path),
                                     **env})
        calls = log.read_text().splitlines() if log.exists() else []
        return result, calls

    return root, bin_dir, interpreters, run


def made_venv_with(calls):
    return [Path(line.split()[0]).name for line in calls if " -m venv .venv" in line]


def test_python_3_10_alone_is_refused_with_the_supported_range(project):
    root, _, interpreters, run = project
    interpreters(("python3.10", 10), ("python3", 10))
    result, calls = run()
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: no Python 3.11, 3.12 or 3.13 on PATH (python3: Python 3.10.1); "
                                     "install one, or set PYTHON=/path/to/it")
    assert made_venv_with(calls) == [] and not (root / ".venv").exists()


def test_the_newest_supported_python_on_path_is_taken(project):
    _, _, interpreters, run = project
    interpreters(("python3.10", 10), ("python3.12", 12), ("python3.13", 13), ("python3", 10))
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert made_venv_with(calls) == ["python3.13"]
    assert "== setting up .venv (Python 3.13.1, TensorFlow, KServe, scikit-learn" in result.stdout
    assert any(line.endswith("-m pip install --quiet --progress-bar off -e .[dev]") for line in calls)


def test_python_3_12_is_taken_and_a_second_run_returns_at_once(project):
    _, _, interpreters, run = project
    interpreters(("python3.12", 12))
    first, calls = run()
    assert first.returncode == 0 and made_venv_with(calls) == ["python3.12"], first.stderr
    second, calls_after = run()
    # the second run only asks the interpreter its version: nothing is made or installed again
    assert second.returncode == 0 and second.stdout == "", second.stderr
    assert [line.split()[1] for line in calls_after[len(calls):]] == ["-c"]


def test_plain_python3_is_taken_when_it_is_in_range(project):
    _, _, interpreters, run = project
    interpreters(("python3", 11))
    result, calls = run()
    assert result.returncode == 0 and made_venv_with(calls) == ["python3"], result.stderr


def test_PYTHON_is_honoured_and_checked(project):
    _, bin_dir, interpreters, run = project
    interpreters(("python3.13", 13), ("python3.12", 12), ("old-python", 10))
    result, calls = run(PYTHON=str(bin_dir / "python3.12"))
    assert result.returncode == 0 and made_venv_with(calls) == ["python3.12"], result.stderr
    refused, _ = run(PYTHON=str(bin_dir / "old-python"))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: PYTHON={bin_dir / 'old-python'} is Python 3.10.1; the project needs "
                                      "Python 3.11, 3.12 or 3.13")
    missing, _ = run(PYTHON="python9")
    assert missing.returncode == 1 and "PYTHON=python9 is not a command" in missing.stderr


def test_a_venv_of_an_unsupported_python_is_made_again(project):
    root, _, interpreters, run = project
    interpreters(("python3.13", 13), ("python3.10", 10))
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").write_text((Path(project[1]) / "python3.10").read_text())
    (root / ".venv" / "bin" / "python").chmod(0o755)
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert "== .venv holds Python 3.10.1, outside 3.11-3.13: making it again with python3.13" in result.stdout
    assert made_venv_with(calls) == ["python3.13"]


def test_a_wheel_of_a_clean_clone_builds_without_a_deprecation_warning(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)], check=True,
                   capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                             str(tmp_path / "dist"), str(clone)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "deprecat" not in output.lower(), output[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kserve_embedder-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        names = archive.namelist()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Requires-Python: <3.14,>=3.11" in metadata or "Requires-Python: >=3.11,<3.14" in metadata
    for module in ("transformer/serving/rest.py", "transformer/predictor/protos/tfserving_pb2.py",
                   "transformer/store/bundle.py", "model/standin/serve.py"):
        assert module in names, module


def test_the_fast_tests_have_one_definition():
    """The READMEs' fast command, the ``fast`` marker and the mutation runs' selection name the same tests: the files
    listed once in pyproject.toml, less the heavy ones (tests/conftest.py marks the rest)."""
    import tomllib

    from conftest import fast_files

    selection = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"][
        "pytest_add_cli_args_test_selection"]
    assert selection == [*fast_files(), "-m", "fast"] and len(fast_files()) >= 15
    assert all((ROOT / name).exists() for name in fast_files())
    readme = (ROOT / "tests" / "README.md").read_text()
    assert "\n.venv/bin/python -m pytest -m fast     # " in readme
    assert "`.venv/bin/python -m pytest -m fast`" in (ROOT / "README.md").read_text()
    assert "-m \"not heavy\" tests/" not in readme
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "fast",
                                "-p", "no:cacheprovider", *fast_files()[:2], "tests/test_packaging.py"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert files == set(fast_files()[:2]), collected.stdout[-2000:]  # nothing outside the list is fast


def test_pyenvs_newest_supported_version_is_taken_when_path_has_none(project, tmp_path):
    """pyenv's shims on PATH refuse a version that is not selected: setup.sh looks in `pyenv root` itself."""
    _, bin_dir, interpreters, run = project
    interpreters(("python3", 10))  # the selected one: out of range
    versions = tmp_path / "pyenv" / "versions"
    for version, minor in (("3.10.13", 10), ("3.12.1", 12), ("3.13.0", 13)):
        (versions / version / "bin").mkdir(parents=True)
        binary = versions / version / "bin" / f"python3.{minor}"
        binary.write_text(INTERPRETER % {"minor": minor})
        binary.chmod(0o755)
    (bin_dir / "pyenv").write_text(f'#!/usr/bin/env bash\n[ "$1" = root ] && echo {tmp_path / "pyenv"}\n')
    (bin_dir / "pyenv").chmod(0o755)
    result, calls = run()
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in calls if " -m venv .venv" in line] == [str(versions / "3.13.0" / "bin" /
                                                                                  "python3.13")]

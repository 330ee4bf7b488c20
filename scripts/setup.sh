#!/usr/bin/env bash
# Usage: scripts/setup.sh
#
# Create .venv and install the project with everything the demo and the tests need (TensorFlow, KServe,
# scikit-learn, Kubeflow Pipelines' SDK: a few minutes the first time). Idempotent: a second run with unchanged
# pyproject.toml and setup.sh returns at once.
#
# Environment:
#   PYTHON   the Python to create .venv with: 3.11, 3.12 or 3.13 (default: the newest python3.x of those on PATH,
#            else pyenv's, else python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib.sh
answer_help "${BASH_SOURCE[0]}" "$@"
no_arguments "${BASH_SOURCE[0]}" "$@"

# The Pythons the pinned stack supports: kserve 0.21 takes 3.10-3.13, tensorflow-cpu 2.21 ships 3.10-3.13,
# scikit-learn 1.9 needs 3.11 or newer. $PYTHON when set, else the newest python3.x on PATH in that range.
SUPPORTED="3.13 3.12 3.11"
supported() { "$1" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: PYTHON=$PYTHON is not a command; set it to a Python 3.11, 3.12 or 3.13" >&2
    exit 1
  fi
  if ! supported "$PYTHON"; then
    echo "error: PYTHON=$PYTHON is $("$PYTHON" --version 2>&1); the project needs Python 3.11, 3.12 or 3.13" >&2
    exit 1
  fi
  python=$PYTHON
else
  python=
  for version in $SUPPORTED; do
    if command -v "python$version" >/dev/null 2>&1 && supported "python$version"; then
      python=python$version
      break
    fi
  done
  if [ -z "$python" ] && command -v python3 >/dev/null 2>&1 && supported python3; then
    python=python3
  fi
  # pyenv's versions, whose shims on PATH refuse to run a version that is not selected: the binaries themselves.
  if [ -z "$python" ] && command -v pyenv >/dev/null 2>&1; then
    for version in $SUPPORTED; do
      for candidate in "$(pyenv root)"/versions/"$version".*/bin/python"$version"; do
        if [ -x "$candidate" ] && supported "$candidate"; then
          python=$candidate
        fi
      done
      [ -n "$python" ] && break
    done
  fi
  if [ -z "$python" ]; then
    found=$(command -v python3 >/dev/null 2>&1 && python3 --version 2>&1 || echo "no python3")
    echo "error: no Python 3.11, 3.12 or 3.13 on PATH (python3: $found); install one, or set PYTHON=/path/to/it" >&2
    exit 1
  fi
fi

# sha256sum on Linux, shasum on macOS (BSD tools). A change to either file means a new install.
if command -v sha256sum >/dev/null 2>&1; then digest=$(cat pyproject.toml scripts/setup.sh | sha256sum); else digest=$(cat pyproject.toml scripts/setup.sh | shasum -a 256); fi
stamp=.venv/.installed-$(printf '%s' "$digest" | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
echo "== setting up .venv ($("$python" --version 2>&1), TensorFlow, KServe, scikit-learn; a few minutes the first time)"
if [ -x .venv/bin/python ] && ! supported .venv/bin/python; then
  echo "== .venv holds $(.venv/bin/python --version 2>&1), outside 3.11-3.13: making it again with $python"
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[dev]'
# TF Serving's official Python stubs, for the tests that check our own protos' bytes against them. Without
# its dependencies: it requires the `tensorflow` distribution, which would install a second copy of
# TensorFlow beside tensorflow-cpu (the same version, the same `tensorflow` module).
.venv/bin/python -m pip install --quiet --progress-bar off --no-deps 'tensorflow-serving-api==2.21.0'
# KServe's storage initializer (the code that downloads a storageUri into /mnt/models), for the tests that read a
# published bucket the way a pod does. Its S3 path needs only boto3 (the pipeline extra): without its other
# dependencies (the Google, Azure, Hugging Face and OCI clients, for storage kinds the project does not use).
.venv/bin/python -m pip install --quiet --progress-bar off --no-deps 'kserve-storage==0.21.0'
# Triton's client, for the test that reads the v2 metadata with it as a Triton user would: its gRPC half, without
# its dependencies, since it pins ml-dtypes<=0.5.4 where TensorFlow 2.21 needs 0.7 (its gRPC client uses neither).
.venv/bin/python -m pip install --quiet --progress-bar off --no-deps 'tritonclient==2.73.0' 'python-rapidjson==1.25'
rm -f .venv/.installed-*
touch "$stamp"

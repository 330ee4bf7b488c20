#!/usr/bin/env bash
# Create .venv and install the project with everything the demo and the tests need.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# sha256sum on Linux, shasum on macOS (BSD tools). A change to either file means a new install.
if command -v sha256sum >/dev/null 2>&1; then digest=$(cat pyproject.toml scripts/setup.sh | sha256sum); else digest=$(cat pyproject.toml scripts/setup.sh | shasum -a 256); fi
stamp=.venv/.installed-$(printf '%s' "$digest" | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
echo "== setting up .venv (Python 3.11, TensorFlow, KServe, scikit-learn; a few minutes the first time)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[dev]'
# TF Serving's official Python stubs, for the tests that check our own protos' bytes against them. Without
# its dependencies: it requires the `tensorflow` distribution, which would install a second copy of
# TensorFlow beside tensorflow-cpu (the same version, the same `tensorflow` module).
.venv/bin/python -m pip install --quiet --progress-bar off --no-deps 'tensorflow-serving-api==2.21.0'
rm -f .venv/.installed-*
touch "$stamp"

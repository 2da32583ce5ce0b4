#!/usr/bin/env bash
# Creates .venv at the repository root with Airlock and its test dependencies installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Airlock needs Python >= 3.11 as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || { echo "setup: could not create .venv (is python3-venv installed?)" >&2; exit 1; }
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
# torch is pinned to the CPU build that pip finds locally; see DESIGN §4.
.venv/bin/python -m pip install --quiet --editable '.[dev]' \
  || { echo "setup: installing Python dependencies failed (see pip's output above)" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python --version))"

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
# Every package, pip's own included, from host-requirements.txt: pinned, each file checked
# against its sha256 (scripts/lock-host-requirements.sh writes it from pyproject.toml). pip
# refuses a file whose hash differs and any dependency the lock does not name. torch is the CPU
# build that pip finds locally; see DESIGN §4.
.venv/bin/python -m pip install --quiet --require-hashes --requirement host-requirements.txt \
  || { echo "setup: installing the locked Python dependencies (host-requirements.txt) failed (see pip's output above)" >&2; exit 1; }
# The project itself, editable: nothing more is resolved or fetched.
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable . \
  || { echo "setup: installing Airlock itself (pip install -e .) failed (see pip's output above)" >&2; exit 1; }
.venv/bin/python -m pip check >/dev/null \
  || { .venv/bin/python -m pip check >&2; echo "setup: host-requirements.txt does not satisfy pyproject.toml: run scripts/lock-host-requirements.sh" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python --version))"

#!/usr/bin/env bash
# Creates .venv at the repository root with Airlock and its test dependencies installed: exactly
# the packages of host-requirements.txt, each file checked against its sha256
# (scripts/lock-host-requirements.sh writes it from pyproject.toml; docs/security.md).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=host-requirements.txt
MARK=.venv/.airlock-host-lock.sha256
die() { echo "setup: $*" >&2; exit 1; }

python="${PYTHON:-python3}"
[ -f "$LOCK" ] || die "$LOCK is missing (scripts/lock-host-requirements.sh writes it)"
locked_python=$(sed -n 's/^# python: //p' "$LOCK")
locked_machine=$(sed -n 's/^# machine: //p' "$LOCK")
[ -n "$locked_python" ] && [ -n "$locked_machine" ] \
  || die "$LOCK does not say which Python and machine it was locked for: rerun scripts/lock-host-requirements.sh"
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
  || die "no Python found as '$python' (set PYTHON=...)"
[ "$have" = "$locked_python" ] \
  || die "$LOCK is locked for Python $locked_python (its wheels are built for it), and '$python' is Python $have: set PYTHON=python$locked_python, or lock for $have with scripts/lock-host-requirements.sh"
[ "$(uname -m)" = "$locked_machine" ] \
  || die "$LOCK is locked for $locked_machine machines, this one is $(uname -m): lock for it with scripts/lock-host-requirements.sh"

# A .venv not installed from this very lock (an older one, or none) is made anew: pip checks the
# hash of what it downloads, not of a package already installed at the locked version, and it
# removes nothing the lock does not name.
want=$(sha256sum "$LOCK" | cut -d' ' -f1)
if [ -e .venv ] && [ "$(cat "$MARK" 2>/dev/null)" != "$want" ]; then
  echo "setup: .venv was not installed from this $LOCK: making it anew" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv || die "could not create .venv (is python3-venv installed?)"
fi
# Every package, pip's own included, as a wheel whose sha256 the lock names: pip refuses a file
# whose hash differs and any dependency the lock does not name, and builds nothing. torch is the
# CPU build that pip finds locally; see DESIGN §4.
.venv/bin/python -m pip install --quiet --require-hashes --only-binary :all: --requirement "$LOCK" \
  || die "installing the locked Python dependencies ($LOCK) failed (see pip's output above)"
# The project itself, editable, built by the locked setuptools: nothing more is fetched.
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable . \
  || die "installing Airlock itself (pip install -e .) failed (see pip's output above)"
if ! .venv/bin/python -m pip check >/dev/null; then
  .venv/bin/python -m pip check >&2 || true
  die "the locked packages do not satisfy pyproject.toml or each other: rerun scripts/lock-host-requirements.sh"
fi
echo "$want" > "$MARK"
echo "setup: .venv ready ($(.venv/bin/python --version), $(grep -c -- '--hash=' "$LOCK") locked packages)"

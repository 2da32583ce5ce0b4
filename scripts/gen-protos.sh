#!/usr/bin/env bash
# Generates the Python stubs for protos/airlock/v1/*.proto beside them. Never edit the output.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
export PATH="$(dirname "$py"):$PATH"
"$py" -m grpc_tools.protoc -I protos \
  --python_out=protos --mypy_out=protos --grpc_python_out=protos --mypy_grpc_out=protos \
  protos/airlock/v1/*.proto

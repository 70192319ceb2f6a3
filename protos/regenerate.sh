#!/usr/bin/env bash
# Regenerate the Python stubs from moe.proto (needs grpcio-tools: pip install grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/moe.proto

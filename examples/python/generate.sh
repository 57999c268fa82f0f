#!/usr/bin/env bash
# Generates the Python stubs of kongtie.v1 from ../../proto into ./gen.
set -euo pipefail
cd "$(dirname "$0")"
wkt=$(python3 -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -rf gen && mkdir -p gen
python3 -m grpc_tools.protoc -I ../../proto -I "$wkt" \
  --python_out=gen --grpc_python_out=gen \
  ../../proto/kongtie/v1/auth.proto ../../proto/kongtie/v1/ticket.proto ../../proto/kongtie/v1/payment.proto

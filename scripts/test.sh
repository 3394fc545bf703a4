#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict" && .venv/bin/mypy
echo "== benchmarks (smoke)" && .venv/bin/python benchmarks/crypto_bench.py --quick && .venv/bin/python benchmarks/attestation_bench.py --quick && .venv/bin/python benchmarks/sandbox_bench.py --quick && .venv/bin/python benchmarks/enclave_bench.py --quick
echo "== server benchmark (smoke)" && .venv/bin/python benchmarks/server_bench.py --quick
echo "== pytest" && .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,docs,examples  # docs: mkdocs; examples: numpy, pillow
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict" && .venv/bin/mypy
# The hook scripts/gen_reference.py generates the CLI and SDK reference pages during the build;
# --strict fails on any warning (broken links and anchors included; not with --quiet, which
# hides them). Output: site/ (ignored by git).
echo "== docs" && .venv/bin/mkdocs build --strict --site-dir site
echo "== benchmarks (smoke)" && .venv/bin/python benchmarks/crypto_bench.py --quick && .venv/bin/python benchmarks/attestation_bench.py --quick && .venv/bin/python benchmarks/sandbox_bench.py --quick && .venv/bin/python benchmarks/enclave_bench.py --quick
echo "== server benchmark (smoke)" && .venv/bin/python benchmarks/server_bench.py --quick
echo "== pytest" && .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,docs,examples,bench  # mkdocs; numpy, pillow; matplotlib
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict" && .venv/bin/mypy
# The hook scripts/gen_reference.py generates the CLI and SDK reference pages during the build;
# --strict fails on any warning (broken links and anchors included; not with --quiet, which
# hides them). Output: site/ (ignored by git).
echo "== docs" && .venv/bin/mkdocs build --strict --site-dir site
# Every benchmark in a smoke run, through the same runner that writes the full report (tables
# and plots), so neither the scripts nor the report can rot. Figures from here mean nothing.
bench_out="$(mktemp -d)"
echo "== benchmarks (smoke)" && .venv/bin/python benchmarks/run_all.py --quick --out "$bench_out"
rm -rf "$bench_out"
# The standard enclave root filesystem, which tests/integration/test_image_userland.py runs
# (scripts/enclave-rootfs.sh: about 1.5 min and 65 MB of downloads cold, about 30 s with the
# cache in ~/.cache/cape-rootfs). Newer Debian packages than the lock are named, not fatal.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    rootfs_dir="$(mktemp -d)"
    trap 'rm -rf "$rootfs_dir"' EXIT
    echo "== enclave root filesystem" && scripts/enclave-rootfs.sh -o "$rootfs_dir/rootfs" >/dev/null
    export CAPE_ENCLAVE_ROOTFS="$rootfs_dir/rootfs"
fi
# The JavaScript SDK: type check and its server-free Node tests; the live and hostile-server
# Node tests run from pytest (tests/e2e/test_js_sdk.py, tests/integration/test_js_hostile.py),
# which must not skip for want of the build.
echo "== js" && (cd js && npm run --silent typecheck && npm test --silent)
export CAPE_REQUIRE_JS=1
# The slowest tests, so that the CI budget (25 min) can be watched from any run's log.
echo "== pytest" && .venv/bin/python -m pytest -q --durations=25 "$@"

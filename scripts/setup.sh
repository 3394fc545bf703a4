#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv and install cape into it.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "test" for the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Error: cape needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1 || echo none))" >&2
    exit 1
fi

# User code only ever runs inside bubblewrap (cape.enclave.sandbox); without it the sandbox
# fails closed. libseccomp2, which pyseccomp loads, ships with Debian and Ubuntu.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "cape: installing bubblewrap with apt-get" >&2
        if ! { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }; then
            echo "cape: could not install bubblewrap; sandboxed functions will refuse to run" >&2
        fi
    else
        echo "cape: bubblewrap (bwrap) is not installed; sandboxed functions will refuse to run" >&2
    fi
fi

# The cluster tests (tests/services.py, tests/e2e/test_cluster.py) start a real PostgreSQL
# server and HAProxy themselves, from Debian's packages (no service is enabled or started).
case ",${1:-}," in *,test,*)
    need=()
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
    command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
    if [ "${#need[@]}" -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "cape: installing ${need[*]} with apt-get (for the cluster tests)" >&2
            if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
                echo "Error: could not install ${need[*]} (the cluster tests need them)" >&2
                exit 1
            fi
        else
            echo "cape: ${need[*]} not installed; the cluster tests will skip" >&2
        fi
    fi
    ;;
esac

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian's python3 ships venv separately.
        echo "cape: installing python3-venv with apt-get" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv
        "$PYTHON" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
fi

extras="${1:-}"
target="."
[ -n "$extras" ] && target=".[$extras]"
log="$(mktemp)"
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "Error: installing cape${extras:+[$extras]} failed" >&2
    exit 1
fi
rm -f "$log"
.venv/bin/python -c "import cape" # fail loudly if the install did not work

# The compatibility test (tests/e2e/test_pycape_compat.py) drives our server with the published
# client, pycape 3.1.1, unmodified. Its pins may clash with ours, so it lives in its own venv.
PYCAPE_PINS=(pycape==3.1.1 serdio==3.1.1)
case ",$extras," in *,test,*)
    if [ ! -x .venv-pycape/bin/python ]; then
        rm -rf .venv-pycape
        "$PYTHON" -m venv .venv-pycape
    fi
    log="$(mktemp)"  # pins already met: pip changes nothing and asks no index
    if ! .venv-pycape/bin/python -m pip install -q --disable-pip-version-check \
        "${PYCAPE_PINS[@]}" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "Error: installing ${PYCAPE_PINS[*]} into .venv-pycape failed" >&2
        exit 1
    fi
    rm -f "$log"
    .venv-pycape/bin/python -c "import pycape, serdio" # fail loudly if the install did not work
    ;;
esac

# The vendoring tests deploy functions whose requirements.txt pip installs from this local
# wheelhouse, since tests may not reach an index: msgpack for tests/e2e/test_sdk.py, and
# examples/image-classification's requirements (onnxruntime, numpy and what they pull in) for
# tests/e2e/test_example_images.py. Binary wheels for this interpreter, as `cape deploy` takes.
wheelhouse_get() {  # wheelhouse_get WHAT PIP-DOWNLOAD-ARGS...
    local what="$1" log
    shift
    log="$(mktemp)"
    if ! .venv/bin/python -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --dest .wheelhouse "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "Error: downloading $what into .wheelhouse failed" >&2
        exit 1
    fi
    rm -f "$log"
}
case ",$extras," in *,test,*)
    if ! ls .wheelhouse/msgpack-*.whl >/dev/null 2>&1; then
        wheelhouse_get "the msgpack wheel" --no-deps \
            "msgpack==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("msgpack"))')"
    fi
    # Fetched again only when the requirements (or the interpreter) change: a stamp records
    # what the wheelhouse was last completed for.
    requirements=examples/image-classification/requirements.txt
    stamp=".wheelhouse/.image-classification.stamp"
    want="$(sha256sum "$requirements" | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.implementation.cache_tag)')"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        wheelhouse_get "the wheels of $requirements" -r "$requirements"
        echo "$want" >"$stamp"
    fi
    ;;
esac

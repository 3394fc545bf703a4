#!/usr/bin/env bash
# The product doing its main job on this machine, in simulated mode: start the platform, sign
# up, deploy the imagenet example (a pretrained EfficientNet-Lite0, run by onnxruntime inside
# the enclave), classify a real photo in plain, then `cape encrypt` the photo on the client and
# classify the ciphertext, print the top-5 classes and what the client verified, shut down.
# The first run exports the model (setup.sh installs PyTorch into .venv-export, once).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh examples
cape=.venv/bin/cape
py=.venv/bin/python
example=examples/imagenet
photo="$example/images/chelsea.png"

work="$(mktemp -d "${TMPDIR:-/tmp}/cape-demo.XXXXXX")"
export CAPE_CONFIG_DIR="$work/config"
# Vendored wheels are cached per user; the demo's are throwaway like the rest of its data.
export CAPE_CACHE_DIR="$work/cache"
unset CAPE_ENCLAVE_HOST CAPE_URL CAPE_TOKEN CAPE_CA_FILE CAPE_ATTESTATION_ROOT
# Wheels already downloaded for the tests are used first; anything else comes from the index.
[ -d .wheelhouse ] && export PIP_FIND_LINKS="$PWD/.wheelhouse"

server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== 1. Start the platform: cape serve (throwaway data directory, free loopback port)"
$cape serve --data-dir "$work/data" --port 0 --enclaves 1 >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 240); do
    grep -q '^Ready: ' "$work/serve.log" && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
        cat "$work/serve.log" >&2
        echo "Error: cape serve exited before it was ready" >&2
        exit 1
    fi
    sleep 0.5
done
grep -q '^Ready: ' "$work/serve.log" || { cat "$work/serve.log" >&2; echo "Error: cape serve did not start" >&2; exit 1; }
grep -E -A1 'SIMULATED' "$work/serve.log" | sed 's/^ */  /'
grep -E '^Ready:' "$work/serve.log" | sed 's/^/  /'

echo "== 2. Sign up a demo user"
head -c 18 /dev/urandom | base64 | $cape signup -u demo --password-stdin

echo "== 3. Deploy $example (its requirements are vendored for the enclave)"
$cape deploy "$example" --name imagenet | sed 's/^/  /'

# The top-5 of a `cape run -o json` result, and what the client verified before sending.
show() {
    $py - "$1" "$2" <<'PY'
import json
import sys

result = json.load(open(sys.argv[1]))
print(f"  Top-5 classes ({sys.argv[2]}):")
for entry in json.loads(result["output"])["top5"]:
    print(f"    {entry['class']:<24} {100 * entry['probability']:6.2f}%")
facts = result["attestation"]
print("  Verified before the photo was sent (attestation document, simulated module):")
print(f"    root fingerprint   sha256:{facts['root_sha256']}")
print(f"    PCR0               {facts['pcrs']['0']}")
print(f"    function checksum  {facts['function_checksum']}")
print("    nonce, session key binding and result sealing: checked")
PY
}

echo "== 4. Classify a real photo in the enclave: $photo ($(wc -c <"$photo") bytes)"
$cape run demo/imagenet -f "$photo" -o json >"$work/plain.json"
show "$work/plain.json" "plain input, sealed to the attested enclave"

echo "== 5. Encrypt the photo on the client for your Cape key"
$cape encrypt -f "$photo" >"$work/photo.cape"
echo "  $(head -c 64 "$work/photo.cape")… ($(wc -c <"$work/photo.cape") bytes of cape: ciphertext)"

echo "== 6. Run the function in the enclave on the ciphertext"
$cape run demo/imagenet -f "$work/photo.cape" -o json >"$work/result.json"
show "$work/result.json" "decrypted and classified in the enclave only"

echo "== 7. Shut down"
kill -TERM "$server_pid"
wait "$server_pid"
server_pid=""
echo "  cape serve stopped cleanly"
echo "== Done in $((SECONDS - started)) s"

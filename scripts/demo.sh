#!/usr/bin/env bash
# The main job, end to end: set up, encrypt for a fresh key, decrypt on the enclave side,
# verify a real AWS Nitro attestation document and a live simulated one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cape=.venv/bin/cape
py=.venv/bin/python
out=demo-output
samples="${CAPE_NITRO_SAMPLES:-../shared/nitro-samples}"
rm -rf "$out" && mkdir -p "$out"

echo "== 1. A fresh RSA-4096 Cape key"
$py scripts/demo_enclave.py keygen "$out"

echo "== 2. Encrypt on the client (no private key needed)"
printf 'canary-%s: the enclave is the only reader\n' "$(date +%s)" > "$out/secret.txt"
$cape encrypt -f "$out/secret.txt" --key "$out/capekey.pub.der" -o "$out/secret.cape"
echo "  $(head -c 60 "$out/secret.cape")…"
$cape encrypt "hello from an argument" --key "$out/capekey.pub.der" > "$out/arg.cape"
head -c 3000000 /dev/urandom > "$out/blob.bin"
$cape encrypt -f - --stream --key "$out/capekey.pub.der" -o "$out/blob.cape-stream" < "$out/blob.bin"

echo "== 3. Decrypt with the enclave-side library (both forms)"
$py scripts/demo_enclave.py decrypt "$out" "$out/secret.cape"
$py scripts/demo_enclave.py decrypt "$out" "$out/arg.cape"
$py scripts/demo_enclave.py decrypt "$out" "$out/blob.cape-stream"
echo "  original blob.bin sha256 $(sha256sum "$out/blob.bin" | cut -c1-16)…"

echo "== 4. Verify a real AWS-signed Nitro attestation document"
if [ -f "$samples/AWS_NitroEnclaves_Root-G1.pem" ]; then
    $cape attestation verify "$samples/blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64" \
        --root "$samples/AWS_NitroEnclaves_Root-G1.pem" --at 2024-09-07T15:00:00Z | head -8
    echo "  …and the same document checked now (its 3-hour leaf expired long ago):"
    $cape attestation verify "$samples/blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64" \
        --root "$samples/AWS_NitroEnclaves_Root-G1.pem" >/dev/null || echo "  (refused, as it must be)"
else
    echo "  skipped: $samples not found"
fi

echo "== 5. Verify a live document from the simulated secure module"
$py scripts/demo_enclave.py attest "$out"
$cape attestation verify "$out/simulated-attestation.cbor" --root "$out/simulated-root.pem" \
    --nonce "$(cat "$out/nonce.hex")" | head -6
echo "== Done. Files are in $out/"

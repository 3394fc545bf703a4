// Server-free checks of the SDK: refusals before any request, strict parsing, the stream
// format's layout, and the Node bundle builder's refusals.
import assert from "node:assert/strict";
import { generateKeyPairSync, privateDecrypt, createDecipheriv, constants, hkdfSync } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { Cape, CapeKey, FormatError, KeyFormatError, UntrustedRootError, encryptStream, encryptText, parseAttestation } from "../dist/index.js";
import { buildBundle } from "../dist/node/index.js";

const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
const der = new Uint8Array(rsa.publicKey.export({ type: "spki", format: "der" }));

test("no root, or an http:// URL, is refused before any request", () => {
  assert.throws(() => new Cape({ url: "https://127.0.0.1:1", token: "t" }), UntrustedRootError);
  assert.throws(() => new Cape({ url: "http://127.0.0.1:1", token: "t", root: "00".repeat(32) }), FormatError);
  assert.throws(() => new Cape({ url: "https://x", root: "00".repeat(32), pcrs: { 40: "00".repeat(48) } }), FormatError);
  assert.throws(() => new Cape({ url: "https://x", root: "00".repeat(32), pcrs: { 0: "abcd" } }), FormatError);
});

test("a bad root is a FormatError; a bad fingerprint too", async () => {
  const cape = new Cape({ url: "https://127.0.0.1:1", token: "t", root: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----" });
  await assert.rejects(cape.root(), FormatError);
  const short = new Cape({ url: "https://127.0.0.1:1", token: "t", root: "abcd" });
  await assert.rejects(short.root(), FormatError);
});

test("cape: envelopes open with the RSA private key (OAEP-SHA256, AES-256-GCM)", async () => {
  const key = await CapeKey.fromDer(der);
  const text = await encryptText(new TextEncoder().encode("hello"), key);
  const raw = Buffer.from(text.slice(5), "base64");
  assert.equal(raw.length, 256 + 12 + 5 + 16);
  const dek = privateDecrypt({ key: rsa.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha256" }, raw.subarray(0, 256));
  const decipher = createDecipheriv("aes-256-gcm", dek, raw.subarray(256, 268));
  decipher.setAuthTag(raw.subarray(raw.length - 16));
  assert.equal(Buffer.concat([decipher.update(raw.subarray(268, raw.length - 16)), decipher.final()]).toString(), "hello");
});

test("keys that are not RSA >= 2048 are KeyFormatErrors", async () => {
  const ec = generateKeyPairSync("ec", { namedCurve: "P-384" }).publicKey.export({ type: "spki", format: "der" });
  await assert.rejects(CapeKey.fromDer(new Uint8Array(ec)), (e) => e instanceof KeyFormatError && /expected an RSA public key/.test(e.message));
  await assert.rejects(CapeKey.fromDer(new Uint8Array(40)), (e) => e instanceof KeyFormatError && /not a valid DER/.test(e.message));
  const small = generateKeyPairSync("rsa", { modulusLength: 1024 }).publicKey.export({ type: "spki", format: "der" });
  await assert.rejects(CapeKey.fromDer(new Uint8Array(small)), /at least 2048 bits/);
});

test("cape-stream-v1: header layout, chunking and the final flag, opened with node:crypto", async () => {
  const key = await CapeKey.fromDer(der);
  for (const size of [0, 1, 1024, 1025, 5000]) {
    const plaintext = new Uint8Array(size).map((_, i) => i % 251);
    const pieces = [];
    for await (const piece of encryptStream(plaintext, key, 1024)) pieces.push(Buffer.from(piece));
    const stream = Buffer.concat(pieces);
    assert.equal(stream.subarray(0, 15).toString(), "cape-stream-v1:");
    const wrappedLength = stream.readUInt16BE(15);
    const headerEnd = 17 + wrappedLength + 16 + 4;
    const header = stream.subarray(0, headerEnd);
    assert.equal(stream.readUInt32BE(headerEnd - 4), 1024);
    const dek = privateDecrypt({ key: rsa.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha256" }, stream.subarray(17, 17 + wrappedLength));
    const salt = stream.subarray(17 + wrappedLength, 17 + wrappedLength + 16);
    const payloadKey = Buffer.from(hkdfSync("sha256", dek, salt, Buffer.concat([Buffer.from("cape-stream-v1 payload"), header]), 32));
    const chunks = Math.max(1, Math.ceil(size / 1024));
    let offset = headerEnd;
    const out = [];
    for (let i = 0; i < chunks; i++) {
      const length = Math.min(1024, size - i * 1024) + 16;
      const nonce = Buffer.alloc(12);
      nonce.writeUIntBE(i, 5, 6);
      nonce[11] = i === chunks - 1 ? 1 : 0;
      const decipher = createDecipheriv("aes-256-gcm", payloadKey, nonce);
      const sealed = stream.subarray(offset, offset + length);
      decipher.setAuthTag(sealed.subarray(sealed.length - 16));
      out.push(decipher.update(sealed.subarray(0, sealed.length - 16)), decipher.final());
      offset += length;
    }
    assert.equal(offset, stream.length);
    assert.deepEqual(new Uint8Array(Buffer.concat(out)), plaintext);
  }
  await assert.rejects(async () => { for await (const _ of encryptStream(new Uint8Array(1), key, 100)); }, RangeError);
});

test("cape-stream-v1: bounded memory, the source is read at most two chunks ahead of the output", async () => {
  const key = await CapeKey.fromDer(der);
  const chunk = 1024;
  const piece = 300; // pieces that straddle chunk boundaries
  let read = 0;
  async function* source() {
    for (let i = 0; i < 2000; i++) { // ~600 KiB, about 600 chunks
      read += piece;
      yield new Uint8Array(piece);
    }
  }
  let pieces = 0;
  let ahead = 0;
  for await (const out of encryptStream(source(), key, chunk)) {
    if (pieces++ === 0) continue; // the header
    const sealedSoFar = (pieces - 1) * chunk;
    ahead = Math.max(ahead, read - sealedSoFar);
    assert.equal(out.length, Math.min(chunk, 2000 * piece - (pieces - 2) * chunk) + 16);
  }
  assert.equal(pieces, 1 + Math.ceil((2000 * piece) / chunk));
  assert.ok(ahead <= 2 * chunk + piece, `read ${ahead} bytes ahead of the output`);
});

test("attestation parsing is strict: garbage and wrong shapes are FormatErrors", () => {
  for (const bad of [new Uint8Array(0), new Uint8Array([0x84]), new Uint8Array([0x80]), new Uint8Array(20000)]) {
    assert.throws(() => parseAttestation(bad), FormatError);
  }
});

test("buildBundle refuses a folder without app.py, symlinks and empty folders", async () => {
  const base = mkdtempSync(join(tmpdir(), "cape-js-"));
  mkdirSync(join(base, "empty"));
  await assert.rejects(buildBundle(join(base, "empty")), /has no files/);
  mkdirSync(join(base, "noapp"));
  writeFileSync(join(base, "noapp", "main.py"), "x = 1\n");
  await assert.rejects(buildBundle(join(base, "noapp")), (e) => e instanceof FormatError && /no app.py/.test(e.message));
  mkdirSync(join(base, "link"));
  writeFileSync(join(base, "link", "app.py"), "def cape_handler(x):\n    return x\n");
  symlinkSync("/etc/passwd", join(base, "link", "secret"));
  await assert.rejects(buildBundle(join(base, "link")), /symbolic link/);
  mkdirSync(join(base, "ok", "__pycache__"), { recursive: true });
  writeFileSync(join(base, "ok", "app.py"), "def cape_handler(x):\n    return x\n");
  writeFileSync(join(base, "ok", "__pycache__", "app.cpython-311.pyc"), "junk");
  const a = await buildBundle(join(base, "ok"));
  const b = await buildBundle(join(base, "ok"));
  assert.equal(a.files, 1);
  assert.equal(a.checksum, b.checksum);
  assert.ok(readFileSync(join(base, "ok", "app.py")));
});

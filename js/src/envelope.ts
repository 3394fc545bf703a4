/**
 * Client-side encryption to a user's Cape key, byte-compatible with Python's
 * `cape.crypto.envelope` and `cape.crypto.stream` (and Cape's Go CLI, pycape, cape-js):
 *
 * - `cape:` envelope: RSA-OAEP-SHA256(DEK) ‖ nonce(12) ‖ AES-256-GCM(DEK, nonce, plaintext);
 *   text form `cape:` + base64, binary form `cape:` + raw bytes.
 * - `cape-stream-v1:`: chunked AES-256-GCM under an HKDF-derived payload key, in bounded
 *   memory (about two chunks), for large Blobs and streams.
 *
 * All primitives are WebCrypto's.
 */

import "reflect-metadata";
import { PublicKey } from "@peculiar/x509";

import { b64encode, buf, concat, fromUtf8, randomBytes, subtle, utf8 } from "./bytes.js";
import { KeyFormatError } from "./errors.js";

export const PREFIX = "cape:";
export const STREAM_PREFIX = "cape-stream-v1:";
export const MIN_RSA_BITS = 2048;
export const DEFAULT_CHUNK_SIZE = 1 << 20;
export const MIN_CHUNK_SIZE = 1 << 10;
export const MAX_CHUNK_SIZE = 16 << 20;
const PAYLOAD_INFO = "cape-stream-v1 payload";

/** A user's Cape key: the DER SubjectPublicKeyInfo of an RSA key, imported for RSA-OAEP. */
export class CapeKey {
  private constructor(
    readonly der: Uint8Array,
    readonly key: CryptoKey,
  ) {}

  /** From DER (or PEM) SubjectPublicKeyInfo; KeyFormatError unless RSA of >= 2048 bits. */
  static async fromDer(data: Uint8Array): Promise<CapeKey> {
    const text = fromUtf8(data.subarray(0, 64)).trimStart();
    const isPem = text.startsWith("-----BEGIN");
    let spki: PublicKey;
    try {
      spki = new PublicKey(isPem ? fromUtf8(data) : buf(data));
    } catch {
      throw new KeyFormatError(
        `not a valid ${isPem ? "PEM" : "DER"} public key (expected SubjectPublicKeyInfo)`,
      );
    }
    const kind = spki.algorithm.name;
    if (!kind.startsWith("RSA")) throw new KeyFormatError(`expected an RSA public key, got ${kind}`);
    const der = new Uint8Array(spki.rawData);
    let key: CryptoKey;
    try {
      key = await subtle().importKey("spki", buf(der), { name: "RSA-OAEP", hash: "SHA-256" }, true, [
        "encrypt",
      ]);
    } catch {
      throw new KeyFormatError("not a valid DER public key (expected SubjectPublicKeyInfo)");
    }
    const bits = (key.algorithm as RsaHashedKeyAlgorithm).modulusLength;
    if (bits < MIN_RSA_BITS) {
      throw new KeyFormatError(`RSA key is ${bits} bits; at least ${MIN_RSA_BITS} bits are required`);
    }
    return new CapeKey(der, key);
  }

  async wrap(dek: Uint8Array): Promise<Uint8Array> {
    return new Uint8Array(await subtle().encrypt({ name: "RSA-OAEP" }, this.key, buf(dek)));
  }
}

async function aesKey(raw: Uint8Array): Promise<CryptoKey> {
  return subtle().importKey("raw", buf(raw), { name: "AES-GCM" }, false, ["encrypt"]);
}

/** The raw envelope (no prefix): wrapped DEK ‖ nonce ‖ AES-256-GCM ciphertext and tag. */
export async function seal(plaintext: Uint8Array, key: CapeKey): Promise<Uint8Array> {
  const dek = randomBytes(32);
  const nonce = randomBytes(12);
  const [wrapped, ciphertext] = await Promise.all([
    key.wrap(dek),
    aesKey(dek).then((k) => subtle().encrypt({ name: "AES-GCM", iv: buf(nonce) }, k, buf(plaintext))),
  ]);
  return concat(wrapped, nonce, new Uint8Array(ciphertext));
}

/** Binary form: ASCII `cape:` + the raw envelope (what a deploy bundle travels as). */
export async function encryptBinary(plaintext: Uint8Array, key: CapeKey): Promise<Uint8Array> {
  return concat(utf8(PREFIX), await seal(plaintext, key));
}

/** Text form: `cape:` + base64 of the raw envelope. */
export async function encryptText(plaintext: Uint8Array, key: CapeKey): Promise<string> {
  return PREFIX + b64encode(await seal(plaintext, key));
}

function u16(value: number): Uint8Array {
  return new Uint8Array([(value >>> 8) & 0xff, value & 0xff]);
}

function u32(value: number): Uint8Array {
  return new Uint8Array([(value >>> 24) & 0xff, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff]);
}

function streamNonce(index: number, last: boolean): Uint8Array {
  const nonce = new Uint8Array(12);
  let rest = index;
  for (let i = 10; i >= 0 && rest > 0; i--) {
    nonce[i] = rest % 256;
    rest = Math.floor(rest / 256);
  }
  nonce[11] = last ? 1 : 0;
  return nonce;
}

/** Anything the stream encryptor reads: bytes, a Blob/File, a web ReadableStream or chunks. */
export type StreamSource =
  | Uint8Array
  | Blob
  | ReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>
  | Iterable<Uint8Array>;

async function* chunksOf(source: StreamSource): AsyncGenerator<Uint8Array> {
  if (source instanceof Uint8Array) {
    yield source;
  } else if (typeof Blob !== "undefined" && source instanceof Blob) {
    const step = 4 << 20;
    for (let offset = 0; offset < source.size; offset += step) {
      yield new Uint8Array(await source.slice(offset, offset + step).arrayBuffer());
    }
  } else if (typeof (source as ReadableStream).getReader === "function") {
    const reader = (source as ReadableStream<Uint8Array>).getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        yield value;
      }
    } finally {
      reader.releaseLock();
    }
  } else {
    yield* source as AsyncIterable<Uint8Array>;
  }
}

/** Re-cut a byte source into pieces of exactly `size` bytes (the last one shorter). */
async function* rechunk(source: StreamSource, size: number): AsyncGenerator<Uint8Array> {
  let pending = new Uint8Array(size);
  let filled = 0;
  for await (const piece of chunksOf(source)) {
    let offset = 0;
    while (offset < piece.length) {
      const take = Math.min(size - filled, piece.length - offset);
      pending.set(piece.subarray(offset, offset + take), filled);
      filled += take;
      offset += take;
      if (filled === size) {
        yield pending;
        pending = new Uint8Array(size);
        filled = 0;
      }
    }
  }
  yield pending.subarray(0, filled);
}

/**
 * `cape-stream-v1:` encryption as an async sequence of output pieces (the header, then one
 * sealed chunk at a time), holding about two plaintext chunks at once whatever the input size.
 */
export async function* encryptStream(
  source: StreamSource,
  key: CapeKey,
  chunkSize: number = DEFAULT_CHUNK_SIZE,
): AsyncGenerator<Uint8Array> {
  if (!Number.isInteger(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) {
    throw new RangeError(`chunkSize must be in [${MIN_CHUNK_SIZE}, ${MAX_CHUNK_SIZE}]`);
  }
  const dek = randomBytes(32);
  const salt = randomBytes(16);
  const wrapped = await key.wrap(dek);
  const header = concat(utf8(STREAM_PREFIX), u16(wrapped.length), wrapped, salt, u32(chunkSize));
  const ikm = await subtle().importKey("raw", buf(dek), "HKDF", false, ["deriveKey"]);
  const payloadKey = await subtle().deriveKey(
    { name: "HKDF", hash: "SHA-256", salt: buf(salt), info: buf(concat(utf8(PAYLOAD_INFO), header)) },
    ikm,
    { name: "AES-GCM", length: 256 },
    false,
    ["encrypt"],
  );
  yield header;
  let index = 0;
  let previous: Uint8Array | null = null;
  for await (const piece of rechunk(source, chunkSize)) {
    // A chunk is sealed once the next one is known, so the last one carries the final flag.
    // rechunk always ends with a (possibly empty) remainder; an empty remainder after full
    // chunks is dropped, so only an empty plaintext gives an empty final chunk.
    if (previous !== null) {
      const last = piece.length === 0;
      yield new Uint8Array(
        await subtle().encrypt(
          { name: "AES-GCM", iv: buf(streamNonce(index, last)) },
          payloadKey,
          buf(previous),
        ),
      );
      index++;
      if (last) return;
    }
    previous = piece;
  }
  yield new Uint8Array(
    await subtle().encrypt(
      { name: "AES-GCM", iv: buf(streamNonce(index, true)) },
      payloadKey,
      buf(previous ?? new Uint8Array(0)),
    ),
  );
}

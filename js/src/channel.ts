/**
 * X25519 is WebCrypto's (Node >= 20, current browsers); ChaCha20-Poly1305 and HKDF for the
 * result channel are @noble's, as WebCrypto has no ChaCha20-Poly1305.
 *
 * Session cryptography: HPKE base mode (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
 * ChaCha20-Poly1305) for inputs sealed to the attested enclave, and the sealed-results channel
 * of Python's `cape.crypto.results` (docs/protocol.md "Sealed results"):
 *
 *     shared = X25519(response private key, session public key)
 *     key    = HKDF-SHA256(shared, salt = none, info = "cape-results-v1" ‖ session pub ‖ response pub)
 *     reply n = ChaCha20-Poly1305(key, nonce = n as 12 bytes big-endian, aad = "result" | "error")
 */

import { Chacha20Poly1305 } from "@hpke/chacha20poly1305";
import { CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { hkdf } from "@noble/hashes/hkdf.js";
import { sha256 } from "@noble/hashes/sha2.js";

import { buf, concat, subtle, utf8 } from "./bytes.js";
import { DecryptionError, KeyFormatError, MalformedEnvelopeError } from "./errors.js";

export const DECRYPTION_FAILED = "decryption failed: wrong key or corrupted ciphertext";
const INFO = utf8("cape-results-v1");
export const RESULT = utf8("result");
export const ERROR = utf8("error");
const TAG = 16;

const suite = new CipherSuite({
  kem: new DhkemX25519HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Chacha20Poly1305(),
});

/** `enc(32) ‖ ciphertext`: `data` HPKE-sealed to the attested session key. */
export async function hpkeSeal(sessionPublic: Uint8Array, data: Uint8Array): Promise<Uint8Array> {
  let recipientPublicKey: CryptoKey;
  try {
    recipientPublicKey = await suite.kem.deserializePublicKey(sessionPublic);
  } catch {
    throw new KeyFormatError("the attested session key is not an X25519 public key");
  }
  const { ct, enc } = await suite.seal({ recipientPublicKey }, data);
  return concat(new Uint8Array(enc), new Uint8Array(ct));
}

export interface ResponseKey {
  privateKey: CryptoKey;
  publicKey: Uint8Array;
}

export async function generateResponseKey(): Promise<ResponseKey> {
  const pair = (await subtle().generateKey({ name: "X25519" }, false, ["deriveBits"])) as CryptoKeyPair;
  const publicKey = new Uint8Array(await subtle().exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, publicKey };
}

/** The client's side of one session's result channel. */
export class ResultChannel {
  private constructor(private readonly key: Uint8Array) {}

  static async forClient(response: ResponseKey, sessionPublic: Uint8Array): Promise<ResultChannel> {
    let peer: CryptoKey;
    try {
      if (sessionPublic.length !== 32) throw new Error();
      peer = await subtle().importKey("raw", buf(sessionPublic), { name: "X25519" }, false, []);
    } catch {
      throw new KeyFormatError("the session or response key is not an X25519 public key");
    }
    let shared: Uint8Array;
    try {
      // WebCrypto refuses a low-order point (an all-zero shared secret)
      shared = new Uint8Array(await subtle().deriveBits({ name: "X25519", public: peer }, response.privateKey, 256));
    } catch {
      throw new KeyFormatError("unusable X25519 key for sealed results");
    }
    if (shared.every((b) => b === 0)) throw new KeyFormatError("unusable X25519 key for sealed results");
    const info = concat(INFO, sessionPublic, response.publicKey);
    return new ResultChannel(hkdf(sha256, shared, undefined, info, 32));
  }

  private static nonce(sequence: number): Uint8Array {
    if (!Number.isSafeInteger(sequence) || sequence < 0) throw new RangeError("sequence out of range");
    const nonce = new Uint8Array(12);
    let rest = sequence;
    for (let i = 11; i >= 0 && rest > 0; i--) {
      nonce[i] = rest % 256;
      rest = Math.floor(rest / 256);
    }
    return nonce;
  }

  open(sequence: number, data: Uint8Array, kind: Uint8Array = RESULT): Uint8Array {
    if (data.length < TAG) throw new MalformedEnvelopeError("a sealed reply is shorter than its tag");
    try {
      return chacha20poly1305(this.key, ResultChannel.nonce(sequence), kind).decrypt(data);
    } catch {
      throw new DecryptionError(DECRYPTION_FAILED);
    }
  }
}

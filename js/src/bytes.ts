/** Byte helpers shared by every module (no Node-only APIs: these run in browsers too). */

import { FormatError } from "./errors.js";

const encoder = new TextEncoder();

export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

export function fromUtf8(data: Uint8Array): string {
  return new TextDecoder("utf-8").decode(data);
}

/** UTF-8 that must be valid (Python's `bytes.decode()`); throws TypeError otherwise. */
export function fromUtf8Strict(data: Uint8Array): string {
  return new TextDecoder("utf-8", { fatal: true }).decode(data);
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  let length = 0;
  for (const part of parts) length += part.length;
  const out = new Uint8Array(length);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function toHex(data: Uint8Array): string {
  let out = "";
  for (const byte of data) out += byte.toString(16).padStart(2, "0");
  return out;
}

export function fromHex(text: string): Uint8Array | null {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) return null;
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Native base64 where the runtime has it: Node's Buffer, or Uint8Array.toBase64/fromBase64. */
interface NativeBase64 {
  Buffer?: {
    from(data: string, encoding: string): Uint8Array;
    from(data: ArrayBuffer, offset: number, length: number): Uint8Array & { toString(encoding: string): string };
  };
}
const native = globalThis as unknown as NativeBase64;
const uint8 = Uint8Array as unknown as {
  fromBase64?: (text: string) => Uint8Array;
  prototype: { toBase64?: () => string };
};

/** Standard base64 with padding. */
export function b64encode(data: Uint8Array): string {
  if (native.Buffer !== undefined) {
    return native.Buffer.from(data.buffer as ArrayBuffer, data.byteOffset, data.length).toString("base64");
  }
  const withNative = data as Uint8Array & { toBase64?: () => string };
  if (typeof withNative.toBase64 === "function") return withNative.toBase64();
  const step = 0x8000;
  const parts: string[] = [];
  for (let i = 0; i < data.length; i += step) {
    parts.push(String.fromCharCode.apply(null, data.subarray(i, i + step) as unknown as number[]));
  }
  return btoa(parts.join(""));
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Strict standard base64 (Python's `b64decode(validate=True)`); `null` when invalid. */
export function b64decodeStrict(text: string): Uint8Array | null {
  if (!BASE64.test(text)) return null;
  if (native.Buffer !== undefined) return new Uint8Array(native.Buffer.from(text, "base64"));
  if (typeof uint8.fromBase64 === "function") return uint8.fromBase64(text);
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

/** A base64 field of a server message, or a FormatError naming `what`. */
export function decodeB64Field(value: unknown, what: string): Uint8Array {
  if (typeof value !== "string") throw new FormatError(`the ${what} is missing`);
  const decoded = b64decodeStrict(value);
  if (decoded === null) throw new FormatError(`the ${what} is not valid base64`);
  return decoded;
}

/** Constant-time equality of two byte strings (length is not secret). */
export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

/** The WebCrypto `subtle` of this runtime (Node >= 20 and browsers both have it). */
export function subtle(): SubtleCrypto {
  const c = globalThis.crypto;
  if (c?.subtle === undefined) {
    throw new Error("WebCrypto is not available (a secure context or Node >= 20 is needed)");
  }
  return c.subtle;
}

export function randomBytes(length: number): Uint8Array {
  const out = new Uint8Array(length);
  globalThis.crypto.getRandomValues(out);
  return out;
}

/** A view WebCrypto accepts (an ArrayBuffer-backed Uint8Array). */
export function buf(data: Uint8Array): Uint8Array<ArrayBuffer> {
  return data as Uint8Array<ArrayBuffer>;
}

export async function sha256(data: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(await subtle().digest("SHA-256", buf(data)));
}

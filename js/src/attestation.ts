/**
 * The AWS Nitro attestation document (COSE_Sign1, ES384, CBOR payload): a strict parser that
 * applies the same rules as Python's `cape.formats.attestation`, including "one document, one
 * encoding": a payload that is not in the NSM's canonical encoding is refused.
 */

import { decode, encode } from "cborg";
import type { TagDecoder } from "cborg";

import { equalBytes } from "./bytes.js";
import { FormatError } from "./errors.js";

export const MAX_PAYLOAD_BYTES = 16384;
export const MAX_DOCUMENT_BYTES = MAX_PAYLOAD_BYTES + 1024;
const MAX_CERT_BYTES = 1024;
const MAX_PUBLIC_KEY_BYTES = 1024;
const MAX_USER_DATA_BYTES = 1024;
const MAX_NONCE_BYTES = 1024;
const MAX_PCRS = 32;
const PCR_LENGTHS = new Set([32, 48, 64]);
const COSE_SIGN1_TAG = 18;
const ALG_ES384 = -35;
const ES384_SIGNATURE_BYTES = 96;
const FIELDS = [
  "module_id",
  "digest",
  "timestamp",
  "pcrs",
  "certificate",
  "cabundle",
  "public_key",
  "user_data",
  "nonce",
] as const;

export interface AttestationDocument {
  moduleId: string;
  /** Milliseconds since the Unix epoch (UTC). */
  timestamp: number;
  pcrs: Map<number, Uint8Array>;
  certificate: Uint8Array;
  /** Root first, then each intermediate down to the leaf's issuer. */
  cabundle: Uint8Array[];
  publicKey: Uint8Array | null;
  userData: Uint8Array | null;
  nonce: Uint8Array | null;
}

export interface SignedAttestation {
  protectedHeader: Uint8Array;
  payload: Uint8Array;
  signature: Uint8Array;
  document: AttestationDocument;
}

class Tagged {
  constructor(
    readonly tag: number,
    readonly value: unknown,
  ) {}
}

function loadsCbor(data: Uint8Array, what: string): unknown {
  const tags: TagDecoder[] = [];
  tags[COSE_SIGN1_TAG] = (inner) => new Tagged(COSE_SIGN1_TAG, inner());
  try {
    return decode(data, {
      useMaps: true,
      strict: true,
      rejectDuplicateMapKeys: true,
      allowIndefinite: false,
      allowUndefined: false,
      allowBigInt: false,
      tags,
    });
  } catch (error) {
    throw new FormatError(`${what} is not valid CBOR: ${(error as Error).message}`);
  }
}

function isBytes(value: unknown): value is Uint8Array {
  return value instanceof Uint8Array;
}

function checkBstr(value: unknown, name: string, low: number, high: number): Uint8Array {
  if (!isBytes(value)) throw new FormatError(`attestation field '${name}' must be a byte string`);
  if (value.length < low || value.length > high) {
    throw new FormatError(
      `attestation field '${name}' is ${value.length} bytes; allowed ${low}..${high}`,
    );
  }
  return value;
}

function optionalBstr(value: unknown, name: string, low: number, high: number): Uint8Array | null {
  return value === null ? null : checkBstr(value, name, low, high);
}

function isUint(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

/** The payload exactly as the NSM encodes it (keys in NSM order, PCRs ascending, nulls kept). */
export function encodePayload(document: AttestationDocument): Uint8Array {
  const pcrs = new Map([...document.pcrs.entries()].sort((a, b) => a[0] - b[0]));
  const body = new Map<string, unknown>([
    ["module_id", document.moduleId],
    ["digest", "SHA384"],
    ["timestamp", document.timestamp],
    ["pcrs", pcrs],
    ["certificate", document.certificate],
    ["cabundle", document.cabundle],
    ["public_key", document.publicKey],
    ["user_data", document.userData],
    ["nonce", document.nonce],
  ]);
  // A stable sort with a constant comparator keeps insertion order: the NSM's order.
  return encode(body, { mapSorter: () => 0 });
}

export function parsePayload(payload: Uint8Array): AttestationDocument {
  if (payload.length < 1 || payload.length > MAX_PAYLOAD_BYTES) {
    throw new FormatError(
      `attestation payload is ${payload.length} bytes; allowed 1..${MAX_PAYLOAD_BYTES}`,
    );
  }
  const item = loadsCbor(payload, "attestation payload");
  if (!(item instanceof Map)) throw new FormatError("attestation payload must be a CBOR map");
  const missing = FIELDS.filter((name) => !item.has(name));
  if (missing.length > 0) {
    throw new FormatError(`attestation payload lacks field(s): ${missing.join(", ")}`);
  }
  const unknown = [...item.keys()].filter((key) => !(FIELDS as readonly unknown[]).includes(key));
  if (unknown.length > 0) {
    throw new FormatError(
      `attestation payload has unknown field(s): ${unknown.map((k) => JSON.stringify(String(k))).join(", ")}`,
    );
  }
  const moduleId = item.get("module_id");
  if (typeof moduleId !== "string" || moduleId === "") {
    throw new FormatError("attestation field 'module_id' must be a non-empty text string");
  }
  if (item.get("digest") !== "SHA384") {
    throw new FormatError("attestation field 'digest' must be 'SHA384'");
  }
  const timestamp = item.get("timestamp");
  if (!isUint(timestamp) || timestamp === 0) {
    throw new FormatError("attestation field 'timestamp' must be a positive integer (ms)");
  }
  const rawPcrs = item.get("pcrs");
  if (!(rawPcrs instanceof Map) || rawPcrs.size < 1 || rawPcrs.size > MAX_PCRS) {
    throw new FormatError(`attestation field 'pcrs' must be a map of 1..${MAX_PCRS} entries`);
  }
  const pcrs = new Map<number, Uint8Array>();
  for (const [index, value] of rawPcrs) {
    if (!isUint(index) || index >= MAX_PCRS) {
      throw new FormatError(`PCR index ${String(index)} is outside 0..${MAX_PCRS - 1}`);
    }
    if (!isBytes(value) || !PCR_LENGTHS.has(value.length)) {
      throw new FormatError(`PCR${index} must be a byte string of 32, 48 or 64 bytes`);
    }
    pcrs.set(index, value);
  }
  const certificate = checkBstr(item.get("certificate"), "certificate", 1, MAX_CERT_BYTES);
  const rawBundle = item.get("cabundle");
  if (!Array.isArray(rawBundle) || rawBundle.length === 0) {
    throw new FormatError("attestation field 'cabundle' must be a non-empty array");
  }
  const cabundle = rawBundle.map((cert: unknown, i: number) =>
    checkBstr(cert, `cabundle[${i}]`, 1, MAX_CERT_BYTES),
  );
  const document: AttestationDocument = {
    moduleId,
    timestamp,
    pcrs,
    certificate,
    cabundle,
    publicKey: optionalBstr(item.get("public_key"), "public_key", 1, MAX_PUBLIC_KEY_BYTES),
    userData: optionalBstr(item.get("user_data"), "user_data", 0, MAX_USER_DATA_BYTES),
    nonce: optionalBstr(item.get("nonce"), "nonce", 0, MAX_NONCE_BYTES),
  };
  if (!equalBytes(encodePayload(document), payload)) {
    throw new FormatError("attestation payload is not in the canonical NSM encoding");
  }
  return document;
}

/** Split and check a COSE_Sign1 document (tagged or not) without trusting it. */
export function parseAttestation(data: Uint8Array): SignedAttestation {
  if (data.length > MAX_DOCUMENT_BYTES) {
    throw new FormatError(
      `attestation document is ${data.length} bytes; at most ${MAX_DOCUMENT_BYTES} allowed`,
    );
  }
  let item = loadsCbor(data, "COSE_Sign1 document");
  if (item instanceof Tagged) item = item.value;
  if (!Array.isArray(item) || item.length !== 4) {
    throw new FormatError("COSE_Sign1 must be an array of 4 items");
  }
  const [protectedHeader, unprotected, payload, signature] = item as unknown[];
  if (!isBytes(protectedHeader)) {
    throw new FormatError("COSE_Sign1 protected header must be a byte string");
  }
  if (!(unprotected instanceof Map)) {
    throw new FormatError("COSE_Sign1 unprotected header must be a map");
  }
  if (!isBytes(payload)) {
    throw new FormatError("COSE_Sign1 payload must be a byte string (detached payloads are refused)");
  }
  if (!isBytes(signature)) throw new FormatError("COSE_Sign1 signature must be a byte string");
  const header = protectedHeader.length > 0 ? loadsCbor(protectedHeader, "COSE protected header") : new Map();
  if (!(header instanceof Map)) throw new FormatError("COSE protected header is not a map");
  if (header.get(1) !== ALG_ES384) {
    throw new FormatError("attestation document must be signed with ES384 (COSE alg -35)");
  }
  if (signature.length !== ES384_SIGNATURE_BYTES) {
    throw new FormatError(
      `ES384 signature must be ${ES384_SIGNATURE_BYTES} bytes, got ${signature.length}`,
    );
  }
  return { protectedHeader, payload, signature, document: parsePayload(payload) };
}

/** `["Signature1", protected, b"", payload]` as CBOR: what the signature covers. */
export function sigStructure(signed: SignedAttestation): Uint8Array {
  return encode(["Signature1", signed.protectedHeader, new Uint8Array(0), signed.payload]);
}

/**
 * Verify an attestation document against a pinned root, in the Python SDK's order
 * (`cape.verify.verifier`); each step throws its own error class:
 *
 * 0. parse (FormatError)  1. ES384 signature (SignatureError)
 * 2. chain leaf → cabundle (reversed) → the pinned root, every certificate valid at the check
 *    time (CertificateExpiredError for the leaf's window, ChainError otherwise; the leaf must be
 *    CA=false with digitalSignature)
 * 3. time: not after now + 60 s (DocumentTimestampError), not older than 5 min
 *    (DocumentExpiredError; not applied to archived key documents)
 * 4. debug enclave (PCR0 zero) refused  5. nonce  6. PCR allow-lists.
 */

// @peculiar/x509 resolves its ASN.1 schemas through tsyringe, which needs this polyfill.
import "reflect-metadata";
import * as x509 from "@peculiar/x509";

import { type AttestationDocument, parseAttestation, sigStructure } from "./attestation.js";
import { buf, equalBytes, fromHex, sha256, subtle, toHex } from "./bytes.js";
import {
  CertificateExpiredError,
  ChainError,
  DebugEnclaveError,
  DocumentExpiredError,
  DocumentTimestampError,
  FormatError,
  NonceMismatchError,
  PCRMismatchError,
  SignatureError,
  UntrustedRootError,
} from "./errors.js";

export const DEFAULT_MAX_AGE_MS = 5 * 60 * 1000;
export const DEFAULT_CLOCK_SKEW_MS = 60 * 1000;
const MAX_CHAIN_DEPTH = 8;

/** PCR allow-lists: index → allowed values (hex strings or bytes). */
export type PcrPins = Record<number, string | Uint8Array | Array<string | Uint8Array>>;

export interface Policy {
  nonce?: Uint8Array;
  pcrs?: Map<number, Uint8Array[]>;
  /** `null` disables the age check (archived documents). */
  maxAgeMs?: number | null;
  allowDebug?: boolean;
}

/** A pinned attestation root. */
export class Root {
  private constructor(
    readonly certificate: x509.X509Certificate,
    readonly fingerprint: string,
  ) {}

  static async load(pemOrDer: string | Uint8Array): Promise<Root> {
    let certificate: x509.X509Certificate;
    try {
      certificate =
        typeof pemOrDer === "string"
          ? new x509.X509Certificate(pemOrDer.trim())
          : new x509.X509Certificate(buf(pemOrDer));
    } catch {
      throw new FormatError("attestation root is not a PEM or DER X.509 certificate");
    }
    const fingerprint = toHex(await sha256(new Uint8Array(certificate.rawData)));
    return new Root(certificate, fingerprint);
  }

  /** Require `fingerprint` (hex SHA-256 of the DER, colons allowed) of a fetched root. */
  static async pinned(pemOrDer: string | Uint8Array, fingerprint: string): Promise<Root> {
    const want = normalizeFingerprint(fingerprint);
    const root = await Root.load(pemOrDer);
    if (root.fingerprint !== want) {
      throw new UntrustedRootError(
        `the server's attestation root has fingerprint ${root.fingerprint}, not ${want}; not pinned`,
      );
    }
    return root;
  }
}

export function normalizeFingerprint(text: string): string {
  const want = text.replaceAll(":", "").trim().toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(want)) {
    throw new FormatError("a root fingerprint is 64 hex digits (SHA-256 of the DER)");
  }
  return want;
}

export function pcrAllowList(pins: PcrPins | undefined): Map<number, Uint8Array[]> {
  const out = new Map<number, Uint8Array[]>();
  for (const [key, values] of Object.entries(pins ?? {})) {
    const index = Number(key);
    if (!Number.isInteger(index) || index < 0 || index > 31) {
      throw new FormatError(`PCR index ${key} is outside 0..31`);
    }
    const list = Array.isArray(values) ? values : [values];
    if (list.length === 0) throw new FormatError(`PCR${index} allow-list is empty`);
    out.set(
      index,
      list.map((value) => {
        const raw = typeof value === "string" ? fromHex(value) : value;
        if (raw === null) throw new FormatError(`PCR${index} value is not hex`);
        if (![32, 48, 64].includes(raw.length)) {
          throw new FormatError(`PCR${index} value must be 32, 48 or 64 bytes, got ${raw.length}`);
        }
        return raw;
      }),
    );
  }
  return out;
}

function loadDer(der: Uint8Array, what: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(buf(der));
  } catch {
    throw new FormatError(`${what} is not a valid DER X.509 certificate`);
  }
}

async function verifySignature(
  signed: ReturnType<typeof parseAttestation>,
  leaf: x509.X509Certificate,
): Promise<void> {
  let key: CryptoKey;
  try {
    const algorithm = leaf.publicKey.algorithm as EcKeyAlgorithm;
    if (algorithm.name !== "ECDSA" || algorithm.namedCurve !== "P-384") throw new Error();
    key = await leaf.publicKey.export({ name: "ECDSA", namedCurve: "P-384" }, ["verify"]);
  } catch {
    throw new SignatureError("document certificate does not hold a P-384 ECDSA key");
  }
  const ok = await subtle().verify(
    { name: "ECDSA", hash: "SHA-384" },
    key,
    buf(signed.signature),
    buf(sigStructure(signed)),
  );
  if (!ok) throw new SignatureError("COSE signature does not verify with the document certificate");
}

function within(cert: x509.X509Certificate, at: Date): boolean {
  return cert.notBefore.getTime() <= at.getTime() && at.getTime() <= cert.notAfter.getTime();
}

async function issuedBy(
  child: x509.X509Certificate,
  issuer: x509.X509Certificate,
  at: Date,
): Promise<boolean> {
  if (child.issuerName.toString() !== issuer.subjectName.toString()) return false;
  if (!within(issuer, at)) return false;
  const constraints = issuer.getExtension(x509.BasicConstraintsExtension);
  if (constraints === null || !constraints.ca) return false;
  const usage = issuer.getExtension(x509.KeyUsagesExtension);
  if (usage !== null && (usage.usages & x509.KeyUsageFlags.keyCertSign) === 0) return false;
  try {
    return await child.verify({ publicKey: issuer, signatureOnly: true });
  } catch {
    return false;
  }
}

async function verifyChain(
  document: AttestationDocument,
  leaf: x509.X509Certificate,
  root: Root,
  at: Date,
): Promise<void> {
  if (!within(leaf, at)) {
    throw new CertificateExpiredError(
      `document certificate is valid from ${leaf.notBefore.toISOString()} to ` +
        `${leaf.notAfter.toISOString()}, not at ${at.toISOString()}`,
    );
  }
  const intermediates = document.cabundle.map((der, i) => loadDer(der, `cabundle[${i}]`)).reverse();
  const fail = (why: string) =>
    new ChainError(
      `certificate chain does not lead to the pinned root at ${at.toISOString()}: ${why}`,
    );
  let current = leaf;
  let depth = 0;
  let next = 0;
  for (;;) {
    if (await issuedBy(current, root.certificate, at)) break;
    const candidate = intermediates[next++];
    if (candidate === undefined) throw fail("no certificate issued by the pinned root");
    if (++depth > MAX_CHAIN_DEPTH) throw fail("the chain is too long");
    if (!(await issuedBy(current, candidate, at))) {
      throw fail(`${current.subject} is not issued by a valid CA in the bundle`);
    }
    current = candidate;
  }
  const constraints = leaf.getExtension(x509.BasicConstraintsExtension);
  const usage = leaf.getExtension(x509.KeyUsagesExtension);
  if (constraints === null || usage === null) {
    throw new ChainError("document certificate lacks a required extension");
  }
  if (constraints.ca) {
    throw new ChainError("document certificate is a CA certificate (basicConstraints CA=true)");
  }
  if ((usage.usages & x509.KeyUsageFlags.digitalSignature) === 0) {
    throw new ChainError("document certificate keyUsage lacks digitalSignature");
  }
}

function verifyTime(document: AttestationDocument, at: Date, policy: Policy): void {
  const issued = new Date(document.timestamp);
  if (document.timestamp > at.getTime() + DEFAULT_CLOCK_SKEW_MS) {
    throw new DocumentTimestampError(
      `document timestamp ${issued.toISOString()} is after the check time ${at.toISOString()}`,
    );
  }
  const maxAge = policy.maxAgeMs === undefined ? DEFAULT_MAX_AGE_MS : policy.maxAgeMs;
  if (maxAge !== null && at.getTime() - document.timestamp > maxAge) {
    throw new DocumentExpiredError(
      `document was issued at ${issued.toISOString()}, more than ${maxAge / 1000} s before ` +
        `the check time ${at.toISOString()}`,
    );
  }
}

function verifyClaims(document: AttestationDocument, policy: Policy): void {
  const pcr0 = document.pcrs.get(0);
  if ((pcr0 === undefined || pcr0.every((b) => b === 0)) && !policy.allowDebug) {
    throw new DebugEnclaveError("document comes from a debug-mode enclave (PCR0 is zero)");
  }
  if (
    policy.nonce !== undefined &&
    (document.nonce === null || !equalBytes(document.nonce, policy.nonce))
  ) {
    throw new NonceMismatchError("document does not carry the expected nonce");
  }
  for (const [index, allowed] of [...(policy.pcrs ?? new Map()).entries()].sort((a, b) => a[0] - b[0])) {
    const actual = document.pcrs.get(index);
    if (actual === undefined || !allowed.some((value: Uint8Array) => equalBytes(value, actual))) {
      throw new PCRMismatchError(
        index,
        allowed.map((value: Uint8Array) => toHex(value)).sort(),
        actual === undefined ? null : toHex(actual),
      );
    }
  }
}

/** Verify raw COSE bytes as of `at`; returns the verified payload. */
export async function verifyAttestation(
  data: Uint8Array,
  root: Root,
  at: Date,
  policy: Policy = {},
): Promise<AttestationDocument> {
  const signed = parseAttestation(data); // step 0
  const leaf = loadDer(signed.document.certificate, "document certificate");
  await verifySignature(signed, leaf); // step 1
  await verifyChain(signed.document, leaf, root, at); // step 2
  verifyTime(signed.document, at, policy); // step 3
  verifyClaims(signed.document, policy); // steps 4-6
  return signed.document;
}

/** Verify a stored document (a user's key document) at its own signed timestamp. */
export async function verifyArchivedAttestation(
  data: Uint8Array,
  root: Root,
  policy: Policy = {},
): Promise<AttestationDocument> {
  const signed = parseAttestation(data);
  return verifyAttestation(data, root, new Date(signed.document.timestamp), {
    ...policy,
    maxAgeMs: null,
  });
}

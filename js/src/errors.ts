/**
 * One error tree, mirroring Python's `cape.errors`: every failure a user, a peer or a hostile
 * server can cause is a {@link CapeError}. Messages never contain keys, tokens or plaintext.
 */

export class CapeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** Malformed bytes: a frame, envelope, key, document or bundle that does not parse. */
export class FormatError extends CapeError {}

/** Key bytes that are not a usable key of the expected kind. */
export class KeyFormatError extends FormatError {}

/** An input larger than a configured limit. */
export class LimitExceededError extends CapeError {}

/** A ciphertext (or a sealed reply) that does not open. One message for every crypto failure. */
export class DecryptionError extends CapeError {}

/** A ciphertext or sealed reply that is structurally wrong (too short, bad prefix) before any crypto. */
export class MalformedEnvelopeError extends DecryptionError {}

/** An attestation document, signature, binding or checksum failed a check. */
export class VerificationError extends CapeError {}

/** The COSE signature does not verify with the document's certificate. */
export class SignatureError extends VerificationError {}

/** The certificate chain does not lead to the pinned root at the check time. */
export class ChainError extends VerificationError {}

/** The leaf certificate is not valid at the check time. */
export class CertificateExpiredError extends ChainError {}

/** The document's timestamp is older than the allowed maximum age. */
export class DocumentExpiredError extends VerificationError {}

/** The document's timestamp lies after the check time (beyond the allowed clock skew). */
export class DocumentTimestampError extends VerificationError {}

/** The document comes from an enclave in debug mode (PCR0 is all zeros). */
export class DebugEnclaveError extends VerificationError {}

/** The document does not carry the nonce this client sent. */
export class NonceMismatchError extends VerificationError {}

/** A function checksum differs from the one the caller pinned. */
export class ChecksumMismatchError extends VerificationError {}

/** No usable attestation root is pinned, or the server's root has another fingerprint. */
export class UntrustedRootError extends VerificationError {}

/** A PCR is absent or holds a value outside the caller's allow-list. */
export class PCRMismatchError extends VerificationError {
  readonly index: number;
  readonly expected: string[];
  readonly actual: string | null;
  constructor(index: number, expected: string[], actual: string | null) {
    super(`PCR${index} is ${actual ?? "absent"}; allowed: ${expected.join(", ") || "nothing"}`);
    this.index = index;
    this.expected = expected;
    this.actual = actual;
  }
}

/** The function raised (its message, opened from the sealed error when sealed); the session goes on. */
export class FunctionError extends CapeError {}

/** A connection, TLS or framing failure (`closeCode` when the server closed the session). */
export class TransportError extends CapeError {
  readonly closeCode: number | undefined;
  constructor(message: string, closeCode?: number) {
    super(message);
    this.closeCode = closeCode;
  }
}

/** The server answered a request or a session upgrade with an error `status`. */
export class RequestRefusedError extends CapeError {
  readonly status: number;
  constructor(message: string, status: number) {
    super(message);
    this.status = status;
  }
}

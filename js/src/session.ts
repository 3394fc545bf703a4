/**
 * Attested websocket sessions (docs/protocol.md "Sessions"), verified exactly as Python's
 * `cape.sdk.session`: a fresh nonce and response key go out; the document must verify against
 * the pinned root (signature, chain, time, debug, nonce, PCRs), bind the response key
 * (`user_data.response_key_sha256`), carry a session key, and match a pinned checksum. Nothing
 * secret is sent before that. Every reply is opened on the result channel with the next
 * sequence number, so dropped, replayed, reordered or forged replies fail.
 */

import type { AttestationDocument } from "./attestation.js";
import { b64encode, decodeB64Field, equalBytes, fromUtf8, fromUtf8Strict, randomBytes, sha256, toHex } from "./bytes.js";
import { ERROR, type ResponseKey, ResultChannel, generateResponseKey, hpkeSeal } from "./channel.js";
import {
  ChecksumMismatchError,
  FormatError,
  FunctionError,
  TransportError,
  VerificationError,
} from "./errors.js";
import { parseJson, pyRepr, pyStr, pyTruthy } from "./pyjson.js";
import { Connection, type Opener } from "./transport/socket.js";
import { type Root, verifyAttestation } from "./verify.js";

export const NONCE_BYTES = 16;

export interface SessionOptions {
  root: Root;
  pcrs?: Map<number, Uint8Array[]>;
  /** Expected SHA-256 (hex) of the function's plaintext bundle (run sessions). */
  checksum?: string;
  /** Bind a response key and require sealed results (default true). */
  sealResults?: boolean;
  /** The time documents are checked at (default: now). */
  clock?: () => Date;
  opener: Opener;
}

export function wsUrl(url: string, path: string): string {
  if (url.startsWith("https://")) return "wss://" + url.slice("https://".length).replace(/\/+$/, "") + path;
  if (url.startsWith("wss://")) return url.replace(/\/+$/, "") + path;
  throw new FormatError(`the server URL must use https://, not ${url.split(":", 1)[0]}://`);
}

type Json = Record<string, unknown>;

function parseFrame(frame: string | Uint8Array): Json {
  if (typeof frame !== "string") throw new FormatError("expected a text frame from the server");
  let parsed: unknown;
  try {
    parsed = parseJson(frame);
  } catch {
    throw new FormatError("the server sent a frame that is not JSON");
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new FormatError("the server sent a frame that is not a JSON object");
  }
  return parsed as Json;
}

function messageOf(parsed: Json): Json {
  if (pyTruthy(parsed.error)) throw new FunctionError(pyStr(parsed.error));
  const message = parsed.message;
  if (message === null || typeof message !== "object" || Array.isArray(message)) {
    throw new FormatError('expected {"message": {...}} from the server');
  }
  return message as Json;
}

function userDataOf(document: AttestationDocument): Json {
  if (document.userData === null) return {};
  let parsed: unknown;
  try {
    parsed = parseJson(fromUtf8Strict(document.userData));
  } catch {
    throw new FormatError("the document's user_data is not JSON");
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new FormatError("the document's user_data is not a JSON object");
  }
  return parsed as Json;
}

export class Session {
  private replies = 0;
  /** Sends, and reads of replies, in call order: concurrent invoke() calls pipeline safely. */
  private sendChain: Promise<unknown> = Promise.resolve();
  private replyChain: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly connection: Connection,
    readonly document: AttestationDocument,
    readonly userData: Json,
    private readonly channel: ResultChannel | null,
  ) {}

  static async open(url: string, path: string, token: string, options: SessionOptions): Promise<Session> {
    const target = wsUrl(url, path);
    if (!token) throw new FormatError("the token is empty");
    const connection = await Connection.open(options.opener, target, token);
    try {
      return await Session.attest(connection, options);
    } catch (error) {
      connection.close();
      throw error;
    }
  }

  private static async attest(connection: Connection, options: SessionOptions): Promise<Session> {
    const nonce = randomBytes(NONCE_BYTES);
    const responseKey: ResponseKey | null = options.sealResults === false ? null : await generateResponseKey();
    const start: Json = { nonce: b64encode(nonce) };
    if (responseKey !== null) start.response_key = b64encode(responseKey.publicKey);
    try {
      await connection.send(JSON.stringify({ message: start }));
    } catch (error) {
      // A server that refuses at once sends {"error"} and closes: report its reason.
      if (!connection.hasPending()) throw error;
    }
    const message = messageOf(parseFrame(await connection.recv()));
    if (message.type !== undefined && message.type !== null && message.type !== "attestation_doc") {
      throw new FormatError(`expected an attestation document, got ${pyRepr(message.type)}`);
    }
    const raw = decodeB64Field(message.message, "attestation document");
    const now = options.clock ? options.clock() : new Date();
    const document = await verifyAttestation(raw, options.root, now, {
      nonce,
      pcrs: options.pcrs ?? new Map(),
    });
    const userData = userDataOf(document);
    let channel: ResultChannel | null = null;
    if (responseKey !== null) {
      const notBound = "the enclave did not bind this session's response key; refusing to continue";
      if (!("response_key_sha256" in userData)) throw new VerificationError(notBound);
      const bound = decodeB64Field(userData.response_key_sha256, "response key binding");
      if (!equalBytes(bound, await sha256(responseKey.publicKey))) throw new VerificationError(notBound);
      if (document.publicKey === null) {
        throw new VerificationError("the attestation document carries no session key");
      }
      channel = await ResultChannel.forClient(responseKey, document.publicKey);
    }
    if (options.checksum !== undefined) {
      if (!("func_checksum" in userData)) {
        throw new ChecksumMismatchError("the enclave attests no function checksum, but one was pinned");
      }
      const got = toHex(decodeB64Field(userData.func_checksum, "function checksum"));
      const want = options.checksum.toLowerCase();
      if (!equalBytes(new TextEncoder().encode(got), new TextEncoder().encode(want))) {
        throw new ChecksumMismatchError(`function checksum does not match: got ${got}, want ${want}`);
      }
    }
    return new Session(connection, document, userData, channel);
  }

  /** Send one input sealed to the attested key; the function's output (opened if sealed). */
  invoke(data: Uint8Array): Promise<Uint8Array> {
    const sent = this.sendChain.then(() => this.sendSealed(data));
    this.sendChain = sent.catch(() => undefined);
    const reply = Promise.all([sent, this.replyChain]).then(() => this.receiveResult());
    this.replyChain = reply.catch(() => undefined);
    return reply;
  }

  async receiveResult(): Promise<Uint8Array> {
    const parsed = parseFrame(await this.connection.recv());
    const sequence = this.replies++;
    if (pyTruthy(parsed.error)) {
      const sealed = parsed.sealed;
      if (this.channel !== null && typeof sealed === "string") {
        const details = this.channel.open(sequence, decodeB64Field(sealed, "sealed error"), ERROR);
        throw new FunctionError(fromUtf8(details));
      }
      throw new FunctionError(pyStr(parsed.error));
    }
    const message = messageOf(parsed);
    if (message.type !== "function_result") {
      throw new FormatError(`expected a function result, got ${pyRepr(message.type)}`);
    }
    const output = decodeB64Field(message.message, "function result");
    if (this.channel === null) return output;
    if (message.encrypted !== true) {
      throw new VerificationError("the result came back unsealed although sealing was bound");
    }
    return this.channel.open(sequence, output);
  }

  async sendSealed(data: Uint8Array): Promise<void> {
    if (this.document.publicKey === null) {
      throw new VerificationError("the attestation document carries no session key");
    }
    await this.connection.send(await hpkeSeal(this.document.publicKey, data));
  }

  async sendJson(message: Json): Promise<void> {
    await this.connection.send(JSON.stringify({ message }));
  }

  async sendBytes(data: Uint8Array): Promise<void> {
    await this.connection.send(data);
  }

  /** The next `{"message": …}` (an `{"error"}` frame throws FunctionError). */
  async receive(): Promise<Json> {
    return messageOf(parseFrame(await this.connection.recv()));
  }

  close(): void {
    this.connection.close();
  }

  waitClosed(timeoutMs?: number): Promise<void> {
    return this.connection.waitClosed(timeoutMs);
  }
}

export { TransportError };

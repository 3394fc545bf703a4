/**
 * `Cape`: the client of one Cape server (names from Cape's JavaScript SDK, plus our tokens,
 * functions and deploy). Every session is verified before anything secret is sent; see
 * session.ts. The attestation root is pinned by the caller (PEM/DER, or a SHA-256 fingerprint
 * that the server's `/v1/attestation/root` must match); without one, nothing is attempted.
 */

import { b64decodeStrict, fromUtf8Strict, sha256, toHex, utf8 } from "./bytes.js";
import { parseJson, pyRepr } from "./pyjson.js";
import {
  CapeKey,
  type StreamSource,
  encryptBinary,
  encryptStream as encryptStreamWith,
  encryptText,
} from "./envelope.js";
import { CapeError, FormatError, UntrustedRootError, VerificationError } from "./errors.js";
import { Rest } from "./rest.js";
import { Session, type SessionOptions } from "./session.js";
import { openSocket } from "./transport/index.js";
import type { Opener } from "./transport/socket.js";
import { type PcrPins, Root, normalizeFingerprint, pcrAllowList, verifyArchivedAttestation } from "./verify.js";

export const DEPLOY_CHUNK_BYTES = 1 << 20;
const ID = /^[A-Za-z0-9]{22}$/;
const USERNAME = /^[a-z0-9][a-z0-9_-]{0,38}$/;
const FUNCTION_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const CHECKSUM = /^[0-9a-fA-F]{64}$/;

export interface CapeOptions {
  /** The server, `https://…`. */
  url: string;
  /** An access token (from `cape login`, `signup()`/`login()` or `createToken()`). */
  token?: string;
  /** The pinned attestation root: PEM text, DER bytes, or the hex SHA-256 of its DER. */
  root: string | Uint8Array;
  /** PCR allow-lists applied to every session: `{0: "hex…", 8: ["hex…", "hex…"]}`. */
  pcrs?: PcrPins;
  /** Your username, so your own key document must name you (set by signup/login). */
  username?: string;
  /** The time documents are checked at (default: now). */
  clock?: () => Date;
  /** Override the websocket opener (tests). */
  opener?: Opener;
}

export interface FunctionRef {
  id?: string;
  /** `user/name`, or `name` for one of your own functions. */
  name?: string;
  /** Pin the function's checksum (hex SHA-256 of its zip). */
  checksum?: string;
  pcrs?: PcrPins;
  /** Another token for this call (e.g. one scoped to the function). */
  token?: string;
}

export interface Attested {
  rootSha256: string;
  moduleId: string;
  issuedAt: string;
  pcrs: Record<number, string>;
  functionChecksum: string | null;
}

export interface Deployed {
  id: string;
  checksum: string;
  name: string;
}

export interface FunctionInfo {
  id: string;
  name: string;
  created_at: string;
  checksum: string;
  public: boolean;
}

export interface TokenInfo {
  id: string;
  name: string;
  description: string;
  created_at: string;
  expiry?: string | null;
  last_used?: string | null;
  function_id?: string | null;
}

export interface Account {
  access_token: string;
  token_type: string;
  expires_at: string;
  user_id: string;
  username: string;
}

function checkUsername(username: string): string {
  const canonical = username.toLowerCase();
  if (!USERNAME.test(canonical)) {
    throw new FormatError(
      `invalid username ${JSON.stringify(username.slice(0, 60))}: use 1-39 characters of a-z, 0-9, '_' and '-', starting with a letter or digit`,
    );
  }
  return canonical;
}

function checkId(id: string, what = "function"): string {
  if (!ID.test(id)) throw new FormatError(`${JSON.stringify(id.slice(0, 60))} is not a ${what} id (22 letters and digits)`);
  return id;
}

function asBytes(data: Uint8Array | string): Uint8Array {
  return typeof data === "string" ? utf8(data) : data;
}

function list<T>(value: unknown, what: string): T[] {
  if (!Array.isArray(value)) throw new FormatError(`the server's ${what} answer is not a list`);
  return value as T[];
}

export class Cape {
  readonly url: string;
  token: string | null;
  username: string | null;
  /** What the last run/connect session attested (for display: the console shows it). */
  lastAttestation: Attested | null = null;
  private readonly rest: Rest;
  private readonly rootSpec: string | Uint8Array;
  private rootPromise: Promise<Root> | null = null;
  private readonly pcrs: Map<number, Uint8Array[]>;
  private readonly opener: Opener;
  private readonly clock: (() => Date) | undefined;
  private session: Session | null = null;

  constructor(options: CapeOptions) {
    if (options === null || typeof options !== "object") throw new FormatError("new Cape({url, root, token})");
    this.rest = new Rest(options.url);
    this.url = this.rest.url;
    if (options.root === undefined || options.root === null || options.root === "" ) {
      throw new UntrustedRootError(
        "no attestation root is pinned: pass root (the PEM, or the SHA-256 fingerprint of the server's root)",
      );
    }
    this.rootSpec = options.root;
    this.token = options.token ?? null;
    this.username = options.username ? checkUsername(options.username) : null;
    this.pcrs = pcrAllowList(options.pcrs);
    this.opener = options.opener ?? openSocket;
    this.clock = options.clock;
  }

  /** The pinned root (fetched once and checked when pinned by fingerprint). */
  root(): Promise<Root> {
    if (this.rootPromise === null) {
      const spec = this.rootSpec;
      const promise =
        typeof spec === "string" && /^[0-9a-fA-F:\s]+$/.test(spec)
          ? (async () => {
              const want = normalizeFingerprint(spec);
              const pem = await this.rest.request("GET", "/v1/attestation/root", null);
              if (typeof pem !== "string") throw new FormatError("the server's attestation root is not PEM text");
              return Root.pinned(pem, want);
            })()
          : Root.load(spec);
      this.rootPromise = promise;
      promise.catch(() => {
        if (this.rootPromise === promise) this.rootPromise = null;
      });
    }
    return this.rootPromise;
  }

  private requireToken(token?: string): string {
    const chosen = token ?? this.token;
    if (!chosen) throw new CapeError("no token: log in, sign up, or pass token");
    return chosen;
  }

  private async options(pcrs?: PcrPins, checksum?: string): Promise<SessionOptions> {
    if (checksum !== undefined && !CHECKSUM.test(checksum)) {
      throw new FormatError("a checksum is 64 hex digits (SHA-256 of the function's zip)");
    }
    const merged = new Map(this.pcrs);
    for (const [index, values] of pcrAllowList(pcrs)) merged.set(index, values);
    const options: SessionOptions = { root: await this.root(), pcrs: merged, opener: this.opener };
    if (checksum !== undefined) options.checksum = checksum;
    if (this.clock !== undefined) options.clock = this.clock;
    return options;
  }

  // -- accounts -------------------------------------------------------------------------------

  async signup(username: string, password: string): Promise<Account> {
    return this.account("/v1/signup", username, password);
  }

  async login(username: string, password: string): Promise<Account> {
    return this.account("/v1/login", username, password);
  }

  private async account(path: string, username: string, password: string): Promise<Account> {
    const name = checkUsername(username);
    const answer = (await this.rest.request("POST", path, null, { username: name, password })) as Account;
    if (typeof answer?.access_token !== "string") throw new FormatError("the server's answer carries no token");
    this.token = answer.access_token;
    this.username = typeof answer.username === "string" ? answer.username : name;
    return answer;
  }

  /** Forget the token (the console's log out). */
  logout(): void {
    this.disconnect();
    this.token = null;
    this.username = null;
  }

  // -- keys and encryption --------------------------------------------------------------------

  /** A Cape key (DER SubjectPublicKeyInfo): yours (attested key session) or `username`'s. */
  async key(options: { username?: string; pcrs?: PcrPins } = {}): Promise<Uint8Array> {
    if (options.username !== undefined) return this.userKey(checkUsername(options.username), options.pcrs);
    const session = await Session.open(this.url, "/v1/key", this.requireToken(), await this.options(options.pcrs));
    try {
      return await keyFromUserData(session.userData, this.username);
    } finally {
      await session.waitClosed();
    }
  }

  private async userKey(username: string, pcrs?: PcrPins): Promise<Uint8Array> {
    const root = await this.root(); // before any other request: no pinned root, no request
    const answer = await this.rest.request("GET", `/v1/user/${username}/key`, null);
    const encoded = (answer as Record<string, unknown> | null)?.attestation_document;
    if (typeof encoded !== "string") throw new FormatError("the server's key answer carries no attestation document");
    const raw = b64decodeStrict(encoded);
    if (raw === null) throw new FormatError("the key document is not valid base64");
    const merged = new Map(this.pcrs);
    for (const [index, values] of pcrAllowList(pcrs)) merged.set(index, values);
    const document = await verifyArchivedAttestation(raw, root, { pcrs: merged });
    let userData: unknown;
    try {
      userData = parseJson(document.userData?.length ? fromUtf8Strict(document.userData) : "{}");
    } catch {
      throw new FormatError("the key document's user_data is not JSON");
    }
    if (userData === null || typeof userData !== "object" || Array.isArray(userData)) {
      throw new FormatError("the key document's user_data is not a JSON object");
    }
    return keyFromUserData(userData as Record<string, unknown>, username);
  }

  private async capeKey(options: { username?: string; key?: Uint8Array }): Promise<CapeKey> {
    const der = options.key ?? (await this.key(options.username !== undefined ? { username: options.username } : {}));
    return CapeKey.fromDer(der);
  }

  /** `cape:` + base64 envelope of `data`, for your own key, `username`'s, or `key` (DER). */
  async encrypt(data: Uint8Array | string, options: { username?: string; key?: Uint8Array } = {}): Promise<string> {
    return encryptText(asBytes(data), await this.capeKey(options));
  }

  /** `cape:` + the raw envelope (binary form). */
  async encryptBinary(data: Uint8Array | string, options: { username?: string; key?: Uint8Array } = {}): Promise<Uint8Array> {
    return encryptBinary(asBytes(data), await this.capeKey(options));
  }

  /** `cape-stream-v1:` pieces for a large Blob/File/stream, in bounded memory. */
  async *encryptStream(
    source: StreamSource,
    options: { username?: string; key?: Uint8Array; chunkSize?: number } = {},
  ): AsyncGenerator<Uint8Array> {
    yield* encryptStreamWith(source, await this.capeKey(options), options.chunkSize);
  }

  // -- running functions ----------------------------------------------------------------------

  private runPath(ref: FunctionRef): string {
    if ((ref.id === undefined) === (ref.name === undefined)) throw new FormatError("give a function id or a name");
    if (ref.id !== undefined) return `/v1/run/${checkId(ref.id)}`;
    const name = ref.name as string;
    const parts = name.split("/");
    let user: string;
    let fn: string;
    if (parts.length === 2) [user, fn] = [checkUsername(parts[0]!), parts[1]!];
    else if (parts.length === 1 && this.username !== null) [user, fn] = [this.username, name];
    else throw new FormatError("a function name is 'user/name' (or 'name' once logged in)");
    if (!FUNCTION_NAME.test(fn)) throw new FormatError(`invalid function name ${JSON.stringify(fn.slice(0, 60))}`);
    return `/v1/run/${user}/${fn}`;
  }

  /** Open a verified session with a function's enclave (one at a time). */
  async connect(ref: FunctionRef): Promise<void> {
    const path = this.runPath(ref);
    const options = await this.options(ref.pcrs, ref.checksum);
    this.disconnect();
    const session = await Session.open(this.url, path, this.requireToken(ref.token), options);
    this.session = session;
    const checksum = session.userData.func_checksum;
    const checksumBytes = typeof checksum === "string" ? b64decodeStrict(checksum) : null;
    const pcrs: Record<number, string> = {};
    for (const index of [0, 1, 2, 8]) {
      const value = session.document.pcrs.get(index);
      if (value !== undefined) pcrs[index] = toHex(value);
    }
    this.lastAttestation = {
      rootSha256: options.root.fingerprint,
      moduleId: session.document.moduleId,
      issuedAt: new Date(session.document.timestamp).toISOString(),
      pcrs,
      functionChecksum: checksumBytes === null ? null : toHex(checksumBytes),
    };
  }

  /** Call the connected function on `data` (bytes, text, or a `cape:` ciphertext). */
  async invoke(data: Uint8Array | string): Promise<Uint8Array> {
    if (this.session === null) throw new CapeError("not connected: call connect() first");
    return this.session.invoke(asBytes(data));
  }

  disconnect(): void {
    const session = this.session;
    this.session = null;
    session?.close();
  }

  /** connect + invoke + disconnect. */
  async run(ref: FunctionRef & { data: Uint8Array | string }): Promise<Uint8Array> {
    await this.connect(ref);
    try {
      return await this.invoke(ref.data);
    } finally {
      this.disconnect();
    }
  }

  /** Deploy a zip (see `buildBundle` in `@cape/sdk/node` for folders): sent as chunks. */
  async deploy(options: { zip: Uint8Array; name: string; public?: boolean; key?: Uint8Array }): Promise<Deployed> {
    if (!FUNCTION_NAME.test(options.name)) throw new FormatError(`invalid function name ${JSON.stringify(options.name.slice(0, 60))}`);
    const checksum = toHex(await sha256(options.zip));
    const key = await this.capeKey(options.key !== undefined ? { key: options.key } : {});
    const ciphertext = await encryptBinary(options.zip, key);
    const session = await Session.open(this.url, "/v1/deploy", this.requireToken(), await this.options());
    let reply: Record<string, unknown>;
    try {
      await session.sendJson({ function_name: options.name, public: options.public ?? false, bundle_size: ciphertext.length });
      for (let start = 0; start < ciphertext.length; start += DEPLOY_CHUNK_BYTES) {
        await session.sendBytes(ciphertext.subarray(start, start + DEPLOY_CHUNK_BYTES));
      }
      reply = await session.receive();
    } finally {
      await session.waitClosed();
    }
    if (reply.checksum !== checksum) {
      const reported = reply.checksum === undefined || reply.checksum === null ? "None" : String(reply.checksum);
      throw new FormatError(`the enclave reports checksum ${reported}, but the bundle's is ${checksum}`);
    }
    if (typeof reply.id !== "string") throw new FormatError("the deploy reply carries no function id");
    return { id: reply.id, checksum, name: String(reply.name ?? options.name) };
  }

  // -- REST: functions and tokens --------------------------------------------------------------

  async functions(options: { limit?: number; offset?: number } = {}): Promise<FunctionInfo[]> {
    const query = `?limit=${options.limit ?? 100}&offset=${options.offset ?? 0}`;
    return list<FunctionInfo>(await this.rest.request("GET", `/v1/functions${query}`, this.requireToken()), "functions");
  }

  async deleteFunction(id: string): Promise<void> {
    await this.rest.request("DELETE", `/v1/functions/${checkId(id)}`, this.requireToken());
  }

  /** A new token; `functionId` scopes it to one function, `expiry` is seconds or RFC 3339. */
  async createToken(options: { name: string; description?: string; functionId?: string; expiry?: number | string }): Promise<{ token: string; id: string }> {
    const body: Record<string, unknown> = { name: options.name, description: options.description ?? "" };
    if (options.functionId !== undefined) body.function_id = checkId(options.functionId);
    if (options.expiry !== undefined) body.expiry = options.expiry;
    const answer = (await this.rest.request("POST", "/v1/token", this.requireToken(), body)) as { token?: unknown; id?: unknown };
    if (typeof answer?.token !== "string" || typeof answer.id !== "string") throw new FormatError("the server's token answer is malformed");
    return { token: answer.token, id: answer.id };
  }

  async tokens(): Promise<TokenInfo[]> {
    return list<TokenInfo>(await this.rest.request("GET", "/v1/tokens", this.requireToken()), "tokens");
  }

  async deleteToken(id: string): Promise<void> {
    await this.rest.request("DELETE", `/v1/token/${checkId(id, "token")}`, this.requireToken());
  }
}

/** The RSA key a key document carries, checked to belong to `owner` (when known). */
export async function keyFromUserData(userData: Record<string, unknown>, owner: string | null): Promise<Uint8Array> {
  const encoded = userData.key;
  if (typeof encoded !== "string") throw new FormatError("the key document carries no key");
  if (owner !== null && userData.owner !== owner) {
    throw new VerificationError(
      `the key document is for ${pyRepr(userData.owner)}, not ${pyRepr(owner)}; refusing it`,
    );
  }
  const der = b64decodeStrict(encoded);
  if (der === null) throw new FormatError("the key in the key document is not valid base64");
  await CapeKey.fromDer(der); // a usable RSA key of at least 2048 bits, or KeyFormatError
  return der;
}

/**
 * One websocket connection as a queue of frames, over either the `ws` package (Node: it can
 * read a refused upgrade's `{"error"}` body) or the browser's WebSocket. The token travels as
 * the second offered subprotocol beside `cape.runtime` (browsers cannot set headers); the
 * server selects `cape.runtime` and never echoes the token.
 */

import { CapeError, RequestRefusedError, TransportError } from "../errors.js";
import { parseJson, pyStr, pyTruthy } from "../pyjson.js";

export const SUBPROTOCOL = "cape.runtime";
export const OPEN_TIMEOUT_MS = 30_000;

export type Frame = string | Uint8Array;

/** The minimal surface both implementations provide. */
export interface RawSocket {
  send(frame: string | Uint8Array): void;
  close(code?: number): void;
  readonly protocol: string;
  readonly bufferedAmount: number;
}

export interface SocketEvents {
  onFrame(frame: Frame): void;
  onClose(code: number, reason: string): void;
}

export type Opener = (url: string, protocols: string[], events: SocketEvents) => Promise<RawSocket>;

/** Refusal text of an upgrade's body, as Python's `rest.refusal_text` (≤ 300 characters). */
export function refusalText(body: string): string | null {
  let parsed: unknown;
  try {
    parsed = parseJson(body || "{}");
  } catch {
    return null;
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return null;
  const object = parsed as Record<string, unknown>;
  const text = [object.error, object.message].find(pyTruthy) ?? "";
  return pyStr(text).slice(0, 300);
}

export function refused(message: string, text: string, status: number): RequestRefusedError {
  return new RequestRefusedError(
    text.includes("token is expired") ? `${message}; log in again` : message,
    status,
  );
}

export function closeError(code: number | undefined, reason: string): TransportError {
  if (code === 1000 && reason === "idle timeout") {
    return new TransportError("the session was closed after being idle; connect again", 1000);
  }
  if (reason) return new TransportError(`the server closed the session: ${reason}`, code);
  return new TransportError("the server closed the session", code);
}

export class Connection {
  private readonly frames: Frame[] = [];
  private readonly waiters: Array<{ resolve: (f: Frame) => void; reject: (e: Error) => void }> = [];
  private closed: TransportError | null = null;
  private readonly closedPromise: Promise<void>;
  private markClosed!: () => void;
  private socket: RawSocket | null = null;

  private constructor() {
    this.closedPromise = new Promise((resolve) => (this.markClosed = resolve));
  }

  static async open(opener: Opener, url: string, token: string): Promise<Connection> {
    const connection = new Connection();
    const events: SocketEvents = {
      onFrame: (frame) => {
        const waiter = connection.waiters.shift();
        if (waiter) waiter.resolve(frame);
        else connection.frames.push(frame);
      },
      onClose: (code, reason) => {
        connection.closed = closeError(code, reason);
        for (const waiter of connection.waiters.splice(0)) waiter.reject(connection.closed);
        connection.markClosed();
      },
    };
    const socket = await opener(url, [SUBPROTOCOL, token], events);
    connection.socket = socket;
    if (socket.protocol !== SUBPROTOCOL) {
      socket.close();
      throw new TransportError(
        `the server selected the subprotocol ${JSON.stringify(socket.protocol)}, not ${SUBPROTOCOL}`,
      );
    }
    return connection;
  }

  /** Whether frames the server sent are waiting to be read (e.g. an error before its close). */
  hasPending(): boolean {
    return this.frames.length > 0;
  }

  recv(): Promise<Frame> {
    const frame = this.frames.shift();
    if (frame !== undefined) return Promise.resolve(frame);
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  async send(frame: string | Uint8Array): Promise<void> {
    if (this.closed || this.socket === null) throw this.closed ?? new CapeError("not connected");
    this.socket.send(frame);
    // Back-pressure: do not queue unbounded bundle chunks in the socket's buffer.
    while (this.socket.bufferedAmount > 8 << 20 && !this.closed) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  close(): void {
    this.socket?.close(1000);
  }

  /** Wait for the server to end the session (after a key or deploy session). */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)));
    await Promise.race([this.closedPromise, timeout]);
    clearTimeout(timer);
    this.close();
  }
}

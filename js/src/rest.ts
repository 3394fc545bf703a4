/** The REST half of the protocol (docs/protocol.md "REST"): bearer-authenticated JSON calls. */

import { FormatError, TransportError } from "./errors.js";
import { parseJson } from "./pyjson.js";
import { refusalText, refused } from "./transport/socket.js";

export const TIMEOUT_MS = 30_000;

export class Rest {
  readonly url: string;

  constructor(url: string) {
    if (!url.startsWith("https://")) {
      throw new FormatError(`the server URL must use https://, not ${url.split(":", 1)[0]}://`);
    }
    this.url = url.replace(/\/+$/, "");
  }

  async request(method: string, path: string, token: string | null, body?: unknown): Promise<unknown> {
    const headers: Record<string, string> = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response: Response;
    try {
      response = await fetch(this.url + path, {
        method,
        headers,
        body: body === undefined ? null : JSON.stringify(body),
        signal: AbortSignal.timeout(TIMEOUT_MS),
        credentials: "omit",
        cache: "no-store",
      });
    } catch (error) {
      throw new TransportError(`cannot reach the Cape server at ${this.url}: ${(error as Error).message}`);
    }
    const content = await response.text();
    if (response.ok) {
      if ((response.headers.get("content-type") ?? "").startsWith("application/json")) {
        try {
          return parseJson(content);
        } catch {
          throw new FormatError("the server sent a response that is not JSON");
        }
      }
      return content;
    }
    const text = refusalText(content) ?? content.slice(0, 200);
    throw refused(`${text || "request failed"} (HTTP ${response.status})`, text, response.status);
  }
}

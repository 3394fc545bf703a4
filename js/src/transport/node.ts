/** The Node.js opener: the `ws` package, which can read a refused upgrade's body. */

import WebSocket from "ws";

import { TransportError } from "../errors.js";
import { OPEN_TIMEOUT_MS, type Opener, refusalText, refused } from "./socket.js";

export const openSocket: Opener = (url, protocols, events) =>
  new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols, {
      perMessageDeflate: false,
      handshakeTimeout: OPEN_TIMEOUT_MS,
      maxPayload: 0,
    });
    let opened = false;
    ws.binaryType = "nodebuffer";
    ws.on("unexpected-response", (_request, response) => {
      const chunks: Buffer[] = [];
      let size = 0;
      response.on("data", (chunk: Buffer) => {
        if (size < 65536) chunks.push(chunk);
        size += chunk.length;
      });
      response.on("end", () => {
        const status = response.statusCode ?? 0;
        const text = refusalText(Buffer.concat(chunks).toString("utf8")) ?? "";
        reject(
          refused(
            `the server refused the session (${status}): ${text || "no reason given"}`,
            text,
            status,
          ),
        );
        ws.terminate();
      });
      response.on("error", () => reject(new TransportError(`the server refused the session`)));
    });
    ws.on("open", () => {
      opened = true;
      resolve({
        send: (frame) => ws.send(frame),
        close: (code) => ws.close(code),
        get protocol() {
          return ws.protocol;
        },
        get bufferedAmount() {
          return ws.bufferedAmount;
        },
      });
    });
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      events.onFrame(isBinary ? new Uint8Array(data.buffer, data.byteOffset, data.length) : data.toString("utf8"));
    });
    ws.on("close", (code: number, reason: Buffer) => events.onClose(code, reason.toString("utf8")));
    ws.on("error", (error: Error) => {
      if (!opened) reject(new TransportError(`cannot reach the Cape server at ${url}: ${error.message}`));
    });
  });

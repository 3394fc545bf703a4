/** The browser opener: the page's WebSocket (a refused upgrade's body is not visible here). */

import { TransportError } from "../errors.js";
import type { Opener } from "./socket.js";

export const openSocket: Opener = (url, protocols, events) =>
  new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols);
    ws.binaryType = "arraybuffer";
    let opened = false;
    ws.onopen = () => {
      opened = true;
      resolve({
        send: (frame) => ws.send(frame as string | Uint8Array<ArrayBuffer>),
        close: (code) => ws.close(code),
        get protocol() {
          return ws.protocol;
        },
        get bufferedAmount() {
          return ws.bufferedAmount;
        },
      });
    };
    ws.onmessage = (event: MessageEvent) => {
      const data: unknown = event.data;
      events.onFrame(typeof data === "string" ? data : new Uint8Array(data as ArrayBuffer));
    };
    ws.onclose = (event: CloseEvent) => {
      if (!opened) {
        reject(
          new TransportError(
            `cannot open a session with the Cape server at ${url} (refused or unreachable; ` +
              "the browser does not show why)",
          ),
        );
      }
      events.onClose(event.code, event.reason);
    };
  });

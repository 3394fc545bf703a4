// The JavaScript SDK's figures, driven by benchmarks/js_bench.py (which starts the server for
// the invoke mode and writes the report). Prints one JSON object on stdout.
//
//   node benchmarks/js_bench.mjs encrypt SIZE...   cape: seal, cape-stream-v1, raw AES-256-GCM
//   node benchmarks/js_bench.mjs invoke            warm invokes (CAPE_URL, CAPE_TOKEN, ...)
import { readFileSync } from "node:fs";
import { generateKeyPairSync, webcrypto } from "node:crypto";

import { Cape, CapeKey, encryptStream, seal } from "../js/dist/index.js";

const subtle = webcrypto.subtle;
const [mode, ...args] = process.argv.slice(2);

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

async function time(action, repeats) {
  const samples = [];
  for (let i = 0; i < repeats; i++) {
    const start = process.hrtime.bigint();
    await action();
    samples.push(Number(process.hrtime.bigint() - start) / 1e9);
  }
  return samples;
}

async function encryptFigures(sizes) {
  const der = generateKeyPairSync("rsa", { modulusLength: 4096 }).publicKey.export({ type: "spki", format: "der" });
  const key = await CapeKey.fromDer(new Uint8Array(der));
  const aes = await subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt"]);
  const rows = [];
  for (const size of sizes) {
    const data = new Uint8Array(size);
    for (let offset = 0; offset < size; offset += 65536) webcrypto.getRandomValues(data.subarray(offset, Math.min(size, offset + 65536)));
    const repeats = Math.max(3, Math.min(200, Math.floor((64 << 20) / size)));
    const iv = new Uint8Array(12);
    // Alternate the three in rounds so that background load hits them alike.
    const raw = [];
    const sdk = [];
    const stream = [];
    for (let round = 0; round < repeats; round++) {
      raw.push(...(await time(() => subtle.encrypt({ name: "AES-GCM", iv }, aes, data), 1)));
      sdk.push(...(await time(() => seal(data, key), 1)));
      stream.push(...(await time(async () => {
        let total = 0;
        for await (const piece of encryptStream(data, key)) total += piece.length;
        return total;
      }, 1)));
    }
    rows.push({ size, repeats, raw: median(raw), seal: median(sdk), stream: median(stream) });
  }
  return rows;
}

async function invokeFigures() {
  const env = process.env;
  const cape = new Cape({ url: env.CAPE_URL, token: env.CAPE_TOKEN, root: readFileSync(env.CAPE_ROOT_PEM_FILE, "utf8") });
  const repeats = Number(env.CAPE_REPEATS ?? "50");
  const out = {};
  await cape.connect({ id: env.CAPE_FUNCTION_ID });
  try {
    for (const size of [1024, 65536]) {
      const data = new Uint8Array(size).fill(7);
      for (let i = 0; i < 5; i++) await cape.invoke(data); // warm-up
      out[size] = await time(() => cape.invoke(data), repeats);
    }
  } finally {
    cape.disconnect();
  }
  return out;
}

if (mode === "encrypt") {
  console.log(JSON.stringify(await encryptFigures(args.map(Number))));
} else if (mode === "invoke") {
  console.log(JSON.stringify(await invokeFigures()));
} else {
  console.error("usage: js_bench.mjs encrypt SIZE... | invoke");
  process.exit(2);
}

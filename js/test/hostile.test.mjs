// The hostile-server corpus of tests/integration/test_hostile_server.py replayed against the
// JS client. tests/integration/test_js_hostile.py runs one dispatching HostileServer (the case
// travels as the token) and writes the cases, with what each must give, to CAPE_HOSTILE_CASES.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as sdk from "../dist/index.js";

const env = process.env;
const cases = env.CAPE_HOSTILE_CASES ? JSON.parse(readFileSync(env.CAPE_HOSTILE_CASES, "utf8")) : [];
const rootPem = env.CAPE_HOSTILE_ROOT_PEM_FILE ? readFileSync(env.CAPE_HOSTILE_ROOT_PEM_FILE, "utf8") : "";
const bytes = (b64) => new Uint8Array(Buffer.from(b64, "base64"));
const shown = (value) => (value instanceof Uint8Array ? { out: Buffer.from(value).toString("base64") } : { error: value });

function client(spec) {
  const options = { url: env.CAPE_HOSTILE_URL, token: spec.id, root: rootPem };
  if (spec.pcrs) options.pcrs = spec.pcrs;
  if (spec.username) options.username = spec.username;
  if (spec.clockShiftMs) options.clock = () => new Date(Date.now() + spec.clockShiftMs);
  return new sdk.Cape(options);
}

async function record(cape, spec, got) {
  await cape.connect({ id: "A".repeat(22), ...(spec.checksum ? { checksum: spec.checksum } : {}) });
  try {
    const inputs = spec.inputs.map(bytes);
    const replies = spec.pipelined ? inputs.map((data) => cape.invoke(data)) : null;
    for (let i = 0; i < inputs.length; i++) {
      try {
        got.push(await (replies ? replies[i] : cape.invoke(inputs[i])));
      } catch (error) {
        if (!(error instanceof sdk.FunctionError)) {
          replies?.forEach((p) => p.catch(() => undefined));
          throw error;
        }
        got.push(`FunctionError: ${error.message}`);
      }
    }
    return got;
  } finally {
    cape.disconnect();
  }
}

async function drive(spec, got) {
  const cape = client(spec);
  switch (spec.client) {
    case "run":
    case "record":
      return record(cape, spec, got);
    case "run-twice": {
      const first = await record(client(spec), { ...spec, checksum: null }, []);
      assert.deepEqual(first.map(shown), spec.firstValue);
      return record(cape, spec, got);
    }
    case "key":
      return cape.key();
    case "deploy":
      return cape.deploy({ zip: bytes(spec.bundle), name: "echo", key: bytes(spec.key) });
    default:
      throw new Error(`unknown client ${spec.client}`);
  }
}

for (const spec of cases) {
  test(spec.id, { timeout: 30_000 }, async () => {
    const got = [];
    let value;
    let error;
    try {
      value = await drive(spec, got);
    } catch (caught) {
      if (!(caught instanceof sdk.CapeError)) throw caught; // a bare error or a bug: fails the case
      error = caught;
    }
    if (spec.expectError === null) {
      assert.equal(error, undefined, `unexpected ${error?.name}: ${error?.message}`);
    } else {
      assert.ok(error, `the client accepted a hostile server: ${JSON.stringify(value)}`);
      const kind = sdk[spec.expectError];
      assert.ok(kind, `no ${spec.expectError} in the SDK's error tree`);
      assert.ok(error instanceof kind, `expected ${spec.expectError}, got ${error.name}: ${error.message}`);
      assert.match(error.message, new RegExp(spec.match));
      if (spec.secret) assert.ok(!error.message.includes(spec.secret));
    }
    if (spec.accepted !== null) assert.deepEqual(got.map(shown), spec.accepted);
  });
}

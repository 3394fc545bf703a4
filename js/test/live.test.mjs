// The SDK against a live `cape serve` (started by tests/e2e/test_js_sdk.py, which passes the
// URL, root, users and a Python-deployed function through the environment).
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import {
  Cape,
  ChecksumMismatchError,
  FormatError,
  FunctionError,
  PCRMismatchError,
  RequestRefusedError,
  UntrustedRootError,
  VerificationError,
} from "../dist/index.js";
import { buildBundle } from "../dist/node/index.js";

const env = process.env;
const live = { skip: env.CAPE_URL === undefined ? "needs a live server (tests/e2e/test_js_sdk.py)" : false };
const rootPem = env.CAPE_ROOT_PEM_FILE ? readFileSync(env.CAPE_ROOT_PEM_FILE, "utf8") : "";
const text = (bytes) => new TextDecoder().decode(bytes);
const canary = env.CAPE_CANARY;

function client(extra = {}) {
  return new Cape({ url: env.CAPE_URL, token: env.CAPE_TOKEN, root: rootPem, username: env.CAPE_USERNAME, ...extra });
}

test("no pinned root: refused before any request", live, () => {
  assert.throws(() => new Cape({ url: env.CAPE_URL, token: env.CAPE_TOKEN }), UntrustedRootError);
  assert.throws(() => new Cape({ url: "http://127.0.0.1:1", token: "t", root: rootPem }), FormatError);
});

test("run by id, plain bytes and text, with the checksum pinned", live, async () => {
  const cape = client();
  const out = await cape.run({ id: env.CAPE_FUNCTION_ID, data: new Uint8Array([1, 2, 3]), checksum: env.CAPE_FUNCTION_CHECKSUM });
  assert.deepEqual([...out], [...new TextEncoder().encode("echo:"), 1, 2, 3]);
  assert.equal(text(await cape.run({ id: env.CAPE_FUNCTION_ID, data: "hello" })), "echo:hello");
  assert.equal(cape.lastAttestation.functionChecksum, env.CAPE_FUNCTION_CHECKSUM);
  assert.equal(cape.lastAttestation.rootSha256, env.CAPE_ROOT_SHA256);
  assert.match(cape.lastAttestation.pcrs[0], /^[0-9a-f]{96}$/);
});

test("root pinned by fingerprint; a wrong fingerprint is refused", live, async () => {
  const good = client({ root: env.CAPE_ROOT_SHA256.toUpperCase() });
  assert.equal(text(await good.run({ name: `${env.CAPE_USERNAME}/echo`, data: "fp" })), "echo:fp");
  const bad = client({ root: "00".repeat(32) });
  await assert.rejects(bad.run({ id: env.CAPE_FUNCTION_ID, data: "x" }), UntrustedRootError);
});

test("run by name (own and user/name); connect + invoke many times + disconnect", live, async () => {
  const cape = client();
  assert.equal(text(await cape.run({ name: "echo", data: "n" })), "echo:n");
  await cape.connect({ name: `${env.CAPE_USERNAME}/echo` });
  for (let i = 0; i < 5; i++) assert.equal(text(await cape.invoke(`call ${i}`)), `echo:call ${i}`);
  // a function error is the function's own message (opened from the sealed error) and the session goes on
  await assert.rejects(cape.invoke("please fail"), (e) => e instanceof FunctionError && /secret detail 7f3a/.test(e.message));
  assert.equal(text(await cape.invoke("after")), "echo:after");
  cape.disconnect();
  await assert.rejects(cape.invoke("x"), /not connected/);
});

test("wrong pins are refused: checksum and PCRs", live, async () => {
  const cape = client();
  await assert.rejects(cape.run({ id: env.CAPE_FUNCTION_ID, data: "x", checksum: "ab".repeat(32) }), ChecksumMismatchError);
  await assert.rejects(cape.run({ id: env.CAPE_FUNCTION_ID, data: "x", pcrs: { 0: "cd".repeat(48) } }), PCRMismatchError);
  await assert.rejects(cape.run({ id: env.CAPE_FUNCTION_ID, data: "x", checksum: "nothex" }), FormatError);
});

test("cape: inputs: own key, JS encrypt → Python-deployed function; Python ciphertext runs too", live, async () => {
  const cape = client();
  const key = await cape.key();
  assert.ok(key.length > 500);
  const ciphertext = await cape.encrypt(`from node ${canary}`);
  assert.match(ciphertext, /^cape:[A-Za-z0-9+/]+=*$/);
  assert.ok(!ciphertext.includes(canary));
  assert.equal(text(await cape.run({ id: env.CAPE_FUNCTION_ID, data: ciphertext })), `echo:from node ${canary}`);
  const binary = await cape.encryptBinary(`binary ${canary}`, { key });
  assert.equal(text(await cape.run({ id: env.CAPE_FUNCTION_ID, data: binary })), `echo:binary ${canary}`);
  assert.equal(text(await cape.run({ id: env.CAPE_FUNCTION_ID, data: env.CAPE_PY_CIPHERTEXT })), `echo:from python ${canary}`);
  writeFileSync(join(env.CAPE_OUT_DIR, "js-ciphertext.txt"), await cape.encrypt(`from node ${canary}`));
});

test("another user's key by username names its owner; their ciphertext is not ours to open", live, async () => {
  const cape = client();
  const theirs = await cape.key({ username: env.CAPE_OTHER_USERNAME.toUpperCase() });
  const mine = await cape.key({ username: env.CAPE_USERNAME });
  assert.notDeepEqual(theirs, mine);
  const forThem = await cape.encrypt("for the other user", { username: env.CAPE_OTHER_USERNAME });
  // Our function runs under our key: their ciphertext does not open in it.
  await assert.rejects(cape.run({ id: env.CAPE_FUNCTION_ID, data: forThem }), FunctionError);
  await assert.rejects(cape.key({ username: "no-such-user-js" }), (e) => e instanceof RequestRefusedError && e.status === 404);
  await assert.rejects(cape.key({ username: "bad name!" }), FormatError);
});

test("cape-stream-v1: streaming encryption of a Blob and a web stream opens in the enclave", live, async () => {
  const cape = client();
  const payload = new TextEncoder().encode(`stream ${canary} `.repeat(300)); // several 1 KiB chunks
  for (const source of [new Blob([payload]), new Blob([payload]).stream(), payload.subarray(0, 2048)]) {
    const pieces = [];
    for await (const piece of cape.encryptStream(source, { chunkSize: 1024 })) pieces.push(piece);
    const whole = Buffer.concat(pieces);
    assert.ok(whole.subarray(0, 15).toString() === "cape-stream-v1:");
    assert.ok(!whole.includes(Buffer.from(canary)));
    const expected = source instanceof Uint8Array ? source : payload;
    const out = await cape.run({ id: env.CAPE_FUNCTION_ID, data: whole });
    assert.equal(text(out), "echo:" + text(expected));
  }
});

test("deploy from Node: same checksum as Python's build of the folder; runs by name", live, async () => {
  const cape = client();
  const bundle = await buildBundle(env.CAPE_APP_DIR);
  assert.equal(bundle.checksum, env.CAPE_APP_CHECKSUM);
  const deployed = await cape.deploy({ zip: bundle.data, name: "jsdeployed" });
  assert.equal(deployed.checksum, bundle.checksum);
  assert.match(deployed.id, /^[A-Za-z0-9]{22}$/);
  assert.equal(text(await cape.run({ name: "jsdeployed", data: env.CAPE_PY_CIPHERTEXT, checksum: bundle.checksum })), `echo:from python ${canary}`);
  writeFileSync(join(env.CAPE_OUT_DIR, "js-deployed.txt"), `${deployed.id} ${deployed.checksum}`);
  await assert.rejects(cape.deploy({ zip: bundle.data, name: "bad name" }), FormatError);
});

test("functions list and delete; another user cannot delete mine", live, async () => {
  const cape = client();
  const listed = await cape.functions();
  assert.ok(listed.some((f) => f.id === env.CAPE_FUNCTION_ID && f.checksum === env.CAPE_FUNCTION_CHECKSUM));
  const other = client({ token: env.CAPE_OTHER_TOKEN, username: env.CAPE_OTHER_USERNAME });
  await assert.rejects(other.deleteFunction(env.CAPE_FUNCTION_ID), (e) => e instanceof RequestRefusedError && [403, 404].includes(e.status));
  const bundle = await buildBundle(env.CAPE_APP_DIR);
  const doomed = await cape.deploy({ zip: bundle.data, name: "doomed" });
  await cape.deleteFunction(doomed.id);
  assert.ok(!(await cape.functions()).some((f) => f.id === doomed.id));
  await assert.rejects(cape.run({ id: doomed.id, data: "x" }), RequestRefusedError);
});

test("tokens: create (scoped, expiring), list, use, delete revokes at once", live, async () => {
  const cape = client();
  const created = await cape.createToken({ name: "js-scoped", description: "from node", functionId: env.CAPE_FUNCTION_ID, expiry: 3600 });
  const listed = await cape.tokens();
  const info = listed.find((t) => t.id === created.id);
  assert.equal(info.function_id, env.CAPE_FUNCTION_ID);
  assert.ok(info.expiry);
  assert.ok(!JSON.stringify(listed).includes(created.token));
  const scoped = client({ token: created.token });
  assert.equal(text(await scoped.run({ id: env.CAPE_FUNCTION_ID, data: "scoped" })), "echo:scoped");
  // a function-scoped token cannot open a key session (refused before the upgrade) or list functions
  await assert.rejects(scoped.key(), (e) => e instanceof RequestRefusedError && e.status === 403 && /function-scoped token/.test(e.message));
  await assert.rejects(scoped.functions(), (e) => e instanceof RequestRefusedError && e.status === 403);
  await cape.deleteToken(created.id);
  await assert.rejects(scoped.run({ id: env.CAPE_FUNCTION_ID, data: "x" }), (e) => e instanceof RequestRefusedError && e.status === 401 && /\(401\)/.test(e.message));
  await assert.rejects(cape.deleteToken(created.id), (e) => e instanceof RequestRefusedError && e.status === 404);
});

test("signup and login from JS; bad credentials and a bad token are typed refusals", live, async () => {
  const anonymous = new Cape({ url: env.CAPE_URL, root: rootPem });
  const name = `js${Date.now().toString(36)}`;
  const account = await anonymous.signup(name, "a long enough password 1");
  assert.equal(account.username, name);
  assert.equal(anonymous.username, name);
  assert.ok((await anonymous.functions()).length === 0);
  const again = new Cape({ url: env.CAPE_URL, root: rootPem });
  await again.login(name, "a long enough password 1");
  assert.ok(again.token);
  await assert.rejects(again.login(name, "wrong password"), (e) => e instanceof RequestRefusedError && e.status === 401);
  const forged = client({ token: "not.a.token" });
  await assert.rejects(forged.functions(), (e) => e instanceof RequestRefusedError && e.status === 401);
  await assert.rejects(forged.run({ id: env.CAPE_FUNCTION_ID, data: "x" }), (e) => e instanceof RequestRefusedError && e.status === 401 && e.message.includes("refused the session"));
  // the own-key document must name the account we think we are
  const confused = client({ username: env.CAPE_OTHER_USERNAME });
  await assert.rejects(confused.key(), (e) => e instanceof VerificationError && /refusing it/.test(e.message));
});

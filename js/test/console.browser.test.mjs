// The console in headless Chromium (Debian's, driven by playwright-core) against a live
// `cape serve` (tests/e2e/test_console.py passes the URL, root fingerprint and a user with a
// deployed function). The whole flow, and what the page sends: no request body and no
// websocket frame may contain the plaintext canary.
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const env = process.env;
const live = { skip: env.CAPE_URL === undefined ? "needs a live server (tests/e2e/test_console.py)" : false };
const canary = env.CAPE_CANARY ?? "";
const shots = env.CAPE_SCREENSHOT_DIR;
let browser;
let context;
let page;
const sent = []; // {what, bytes} for every request body and websocket frame the page sent
const problems = []; // console errors, page errors, CSP violations

before(async () => {
  if (env.CAPE_URL === undefined) return;
  browser = await chromium.launch({
    executablePath: env.CAPE_CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ], // playwright gives every launch a new, empty profile directory
  });
  // The server's TLS certificate comes from the test's own CA; what the console verifies is
  // the attestation root, pinned by fingerprint in the login form.
  context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1100, height: 900 } });
  page = await context.newPage();
  page.on("request", (request) => {
    const body = request.postDataBuffer();
    if (body) sent.push({ what: `${request.method()} ${request.url()}`, bytes: body });
  });
  page.on("websocket", (ws) => {
    ws.on("framesent", (frame) => sent.push({ what: `frame to ${ws.url()}`, bytes: Buffer.from(frame.payload) }));
  });
  page.on("console", (message) => { if (message.type() === "error") problems.push(message.text()); });
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("dialog", (dialog) => dialog.accept());
  if (shots) mkdirSync(shots, { recursive: true });
});

after(async () => {
  await browser?.close();
});

async function shot(name) {
  if (shots) await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

async function settled(what) {
  await page.waitForFunction((w) => document.getElementById("status").textContent === `${w}: done` || document.getElementById("error").textContent !== "", what, { timeout: 60_000 });
  return (await page.textContent("#error")) ?? "";
}

test("the console is served with strict headers and no inline script", live, async () => {
  const response = await page.goto(`${env.CAPE_URL}/console/`);
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.match(headers["content-security-policy"], /script-src 'self';/);
  assert.doesNotMatch(headers["content-security-policy"], /unsafe-inline|unsafe-eval/);
  assert.equal(headers["x-frame-options"], "DENY");
  assert.equal(await page.locator("script:not([src])").count(), 0);
  assert.equal(await page.locator("[style]").count(), 0);
  await page.waitForSelector("#login-form");
  await shot("login");
});

test("a wrong root fingerprint is refused before the password is sent", live, async () => {
  await page.fill("#login-username", env.CAPE_USERNAME);
  await page.fill("#login-password", env.CAPE_PASSWORD);
  await page.fill("#login-root", "ab".repeat(32));
  const before = sent.length;
  await page.click("button[value=login]");
  assert.match(await settled("Logging in"), /UntrustedRootError: .*not pinned/);
  assert.ok(sent.slice(before).every((s) => !s.bytes.includes(Buffer.from(env.CAPE_PASSWORD))));
});

test("log in; the functions and tokens load", live, async () => {
  await page.fill("#login-password", env.CAPE_PASSWORD);
  await page.fill("#login-root", env.CAPE_ROOT_SHA256);
  await page.click("button[value=login]");
  assert.equal(await settled("Logging in"), "");
  await settled("Loading your functions and tokens");
  await page.waitForSelector(`#functions td:text-is("${env.CAPE_FUNCTION_ID}")`);
  assert.equal(await page.textContent("#who-name"), env.CAPE_USERNAME);
  assert.deepEqual(await context.cookies(), []);
  await shot("functions");
});

test("encrypt a file in the page", live, async () => {
  await page.setInputFiles("#encrypt-file", { name: "secret.txt", mimeType: "text/plain", buffer: Buffer.from(`file ${canary}`) });
  await page.click("#encrypt-form button[type=submit]");
  assert.equal(await settled("Encrypting"), "");
  const ciphertext = await page.inputValue("#encrypt-output");
  assert.match(ciphertext, /^cape:[A-Za-z0-9+/]+=*$/);
  assert.ok(!ciphertext.includes(canary));
  await shot("encrypt");
});

test("run the function on a file, encrypted in the page; the result and attestation show", live, async () => {
  await page.fill("#run-function", env.CAPE_FUNCTION_ID);
  await page.check("input[name=source][value=file]");
  await page.setInputFiles("#run-file", { name: "input.txt", mimeType: "text/plain", buffer: Buffer.from(`run ${canary}`) });
  await page.fill("#run-checksum", env.CAPE_FUNCTION_CHECKSUM);
  await page.click("#run-form button[type=submit]");
  assert.equal(await settled("Running"), "");
  assert.equal(await page.textContent("#run-result"), `echo:run ${canary}`);
  const facts = await page.textContent("#attestation");
  assert.ok(facts.includes(env.CAPE_ROOT_SHA256));
  assert.ok(facts.includes(env.CAPE_FUNCTION_CHECKSUM));
  await shot("run");
});

test("typed text runs too: encrypted in the page, only sealed to the enclave, or as pasted ciphertext", live, async () => {
  await page.check("input[name=source][value=text]");
  await page.fill("#run-checksum", "");
  await page.uncheck("#run-encrypt"); // the input is then protected by the HPKE seal alone
  await page.fill("#run-text", `sealed only ${canary}`);
  await page.click("#run-form button[type=submit]");
  assert.equal(await settled("Running"), "");
  assert.equal(await page.textContent("#run-result"), `echo:sealed only ${canary}`);
  await page.check("#run-encrypt");
  await page.fill("#run-text", `typed ${canary}`);
  await page.click("#run-form button[type=submit]");
  assert.equal(await settled("Running"), "");
  assert.equal(await page.textContent("#run-result"), `echo:typed ${canary}`);
  await page.fill("#run-text", await page.inputValue("#encrypt-output"));
  await page.click("#run-form button[type=submit]");
  assert.equal(await settled("Running"), "");
  assert.equal(await page.textContent("#run-result"), `echo:file ${canary}`);
});

test("encrypt text for another user (their verified key); an unknown user is an error", live, async () => {
  await page.setInputFiles("#encrypt-file", []);
  await page.fill("#encrypt-user", env.CAPE_OTHER_USERNAME);
  await page.fill("#encrypt-text", `for another ${canary}`);
  await page.click("#encrypt-form button[type=submit]");
  assert.equal(await settled("Encrypting"), "");
  const ciphertext = await page.inputValue("#encrypt-output");
  assert.match(ciphertext, /^cape:[A-Za-z0-9+/]+=*$/);
  // tests/e2e/test_console.py runs it through the other user's function, with their token
  writeFileSync(join(env.CAPE_OUT_DIR, "for-other.txt"), ciphertext);
  await page.fill("#encrypt-user", "nobody-by-this-name");
  await page.click("#encrypt-form button[type=submit]");
  assert.match(await settled("Encrypting"), /\S/);
  await page.fill("#encrypt-user", "");
  await page.fill("#encrypt-text", "");
});

test("a scoped token runs the function; once revoked, the next call is refused", live, async () => {
  await page.fill("#token-name", "console-scoped");
  await page.fill("#token-function", env.CAPE_FUNCTION_ID);
  await page.fill("#token-expiry", "3600");
  await page.click("#token-form button[type=submit]");
  assert.equal(await settled("Creating a token"), "");
  const token = await page.inputValue("#token-new");
  assert.ok(token.length > 20);
  await page.waitForSelector('#tokens td:text-is("console-scoped")');
  await shot("tokens");
  await page.fill("#run-token", token);
  await page.fill("#run-text", "with the scoped token");
  await page.click("#run-form button[type=submit]");
  assert.equal(await settled("Running"), "");
  assert.equal(await page.textContent("#run-result"), "echo:with the scoped token");
  await page.click('button[aria-label="Revoke console-scoped"]');
  assert.equal(await settled("Revoking console-scoped"), "");
  await page.click("#run-form button[type=submit]");
  assert.match(await settled("Running"), /RequestRefusedError|refused/);
  await page.fill("#run-token", "");
});

test("delete a function from the list", live, async () => {
  await page.click(`button[aria-label="Delete doomed"]`);
  assert.equal(await settled("Deleting doomed"), "");
  assert.equal(await page.locator('#functions td:text-is("doomed")').count(), 0);
});

test("log out forgets the token", live, async () => {
  await page.click("#logout");
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  assert.ok(await page.isVisible("#login-form"));
  await page.reload();
  assert.ok(await page.isVisible("#login-form"));
});

test("the page never sent the canary in the clear, and nothing broke", live, async () => {
  assert.ok(sent.length > 5, "no traffic recorded");
  assert.ok(sent.some((s) => s.what.startsWith("frame")), "no websocket frames recorded");
  const leaks = sent.filter((s) => s.bytes.includes(Buffer.from(canary)));
  assert.deepEqual(leaks.map((s) => s.what), []);
  assert.deepEqual(problems.filter((p) => !/status of 40[13]|Failed to load resource|WebSocket connection to .* failed/.test(p)), []);
});

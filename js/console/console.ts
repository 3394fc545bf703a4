/**
 * The Cape console: the CLI's everyday tasks in a page, on the SDK's browser build. Inputs and
 * results are encrypted and opened here, in the browser: the server gets what the CLI would
 * send (ciphertext, HPKE-sealed frames) and nothing else. The token lives in this tab's
 * sessionStorage and is removed on log out; no cookie is ever used.
 */

import { Cape, CapeError } from "../src/index.js";

const STORAGE = "cape-console";
/** Files larger than this are encrypted in the stream form (as `cape encrypt` does). */
const STREAM_ABOVE = 64 << 20;

interface Saved {
  token: string;
  username: string;
  root: string;
}

let cape: Cape | null = null;

function $(id: string): HTMLElement {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`missing #${id}`);
  return element;
}

function input(id: string): HTMLInputElement {
  return $(id) as HTMLInputElement;
}

function status(text: string): void {
  $("status").textContent = text;
}

function showError(error: unknown): void {
  const text =
    error instanceof CapeError ? `${error.name}: ${error.message}` : `Error: ${(error as Error)?.message ?? String(error)}`;
  $("error").textContent = text;
  status("");
}

/** Run `task`, showing progress and any error; buttons of `form` are disabled meanwhile. */
async function guarded(what: string, task: () => Promise<void>, form?: HTMLFormElement): Promise<void> {
  $("error").textContent = "";
  status(`${what}…`);
  const buttons = form ? [...form.querySelectorAll("button")] : [];
  buttons.forEach((b) => (b.disabled = true));
  try {
    await task();
    status(`${what}: done`);
  } catch (error) {
    showError(error);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

function cell(row: HTMLTableRowElement, text: string): void {
  const td = row.insertCell();
  td.textContent = text;
}

function button(row: HTMLTableRowElement, label: string, name: string, onClick: () => void): void {
  const td = row.insertCell();
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.setAttribute("aria-label", `${label} ${name}`);
  b.addEventListener("click", onClick);
  td.append(b);
}

function client(): Cape {
  if (cape === null) throw new CapeError("log in first");
  return cape;
}

async function refreshFunctions(): Promise<void> {
  const functions = await client().functions();
  const body = $("functions") as HTMLTableSectionElement;
  const list = $("function-ids");
  body.replaceChildren();
  list.replaceChildren();
  for (const fn of functions) {
    const row = body.insertRow();
    cell(row, fn.name);
    cell(row, fn.id);
    cell(row, fn.checksum);
    cell(row, fn.created_at);
    cell(row, fn.public ? "yes" : "no");
    button(row, "Delete", fn.name, () => {
      if (!confirm(`Delete ${fn.name} (${fn.id})?`)) return;
      void guarded(`Deleting ${fn.name}`, async () => {
        await client().deleteFunction(fn.id);
        await refreshFunctions();
      });
    });
    const option = document.createElement("option");
    option.value = fn.id;
    option.label = fn.name;
    list.append(option);
  }
}

async function refreshTokens(): Promise<void> {
  const tokens = await client().tokens();
  const body = $("tokens") as HTMLTableSectionElement;
  body.replaceChildren();
  for (const token of tokens) {
    const row = body.insertRow();
    cell(row, token.name);
    cell(row, token.id);
    cell(row, token.function_id ?? "any");
    cell(row, token.expiry ?? "never");
    cell(row, token.last_used ?? "never");
    button(row, "Revoke", token.name, () => {
      void guarded(`Revoking ${token.name}`, async () => {
        await client().deleteToken(token.id);
        await refreshTokens();
      });
    });
  }
}

function signedIn(saved: Saved): void {
  cape = new Cape({ url: location.origin, token: saved.token, root: saved.root, username: saved.username });
  sessionStorage.setItem(STORAGE, JSON.stringify(saved));
  $("who-name").textContent = saved.username;
  $("who").hidden = false;
  $("login").hidden = true;
  $("app").hidden = false;
  void guarded("Loading your functions and tokens", async () => {
    await Promise.all([refreshFunctions(), refreshTokens()]);
  });
}

function logout(): void {
  cape?.logout();
  cape = null;
  sessionStorage.removeItem(STORAGE);
  for (const id of ["run-text", "run-token", "encrypt-text", "encrypt-output", "token-new"]) {
    (input(id) as HTMLInputElement | HTMLTextAreaElement).value = "";
  }
  $("run-result").textContent = "";
  $("functions").replaceChildren();
  $("tokens").replaceChildren();
  $("who").hidden = true;
  $("app").hidden = true;
  $("login").hidden = false;
  status("Logged out");
}

async function readInput(textId: string, fileId: string, useFile: boolean): Promise<Uint8Array | string> {
  const file = input(fileId).files?.[0];
  if (useFile) {
    if (file === undefined) throw new CapeError("choose a file");
    return new Uint8Array(await file.arrayBuffer());
  }
  return (input(textId) as unknown as HTMLTextAreaElement).value;
}

function showAttestation(): void {
  const facts = client().lastAttestation;
  if (facts === null) return;
  const list = $("attestation");
  list.replaceChildren();
  const add = (term: string, value: string) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  };
  add("Root (SHA-256)", facts.rootSha256);
  add("Enclave module", facts.moduleId);
  add("Issued at", facts.issuedAt);
  add("Function checksum", facts.functionChecksum ?? "none attested");
  for (const [index, value] of Object.entries(facts.pcrs)) add(`PCR${index}`, value);
}

function start(): void {
  const form = $("login-form") as HTMLFormElement;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const action = ((event as SubmitEvent).submitter as HTMLButtonElement | null)?.value ?? "login";
    const username = input("login-username").value.trim();
    const password = input("login-password").value;
    const root = input("login-root").value.trim();
    void guarded(action === "signup" ? "Signing up" : "Logging in", async () => {
      const fresh = new Cape({ url: location.origin, root });
      await fresh.root(); // the root must match before the password goes anywhere
      const account = action === "signup" ? await fresh.signup(username, password) : await fresh.login(username, password);
      input("login-password").value = "";
      signedIn({ token: account.access_token, username: account.username, root });
    }, form);
  });
  $("logout").addEventListener("click", logout);
  $("functions-refresh").addEventListener("click", () => void guarded("Refreshing", refreshFunctions));

  const runForm = $("run-form") as HTMLFormElement;
  runForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void guarded("Running", async () => {
      $("run-result").textContent = "";
      const target = input("run-function").value.trim();
      const useFile = (runForm.elements.namedItem("source") as RadioNodeList).value === "file";
      let data = await readInput("run-text", "run-file", useFile);
      const isCiphertext = typeof data === "string" && /^cape(-stream-v1)?:/.test(data);
      const ref = target.includes("/") ? { name: target } : { id: target };
      if (input("run-encrypt").checked && !isCiphertext) {
        // cape: inputs are opened in the enclave with the function owner's key
        const owner = target.includes("/") ? target.split("/")[0]! : client().username ?? undefined;
        data = await client().encrypt(data, owner === undefined ? {} : { username: owner });
      }
      const checksum = input("run-checksum").value.trim();
      const token = input("run-token").value.trim();
      const output = await client().run({
        ...ref,
        data,
        ...(checksum ? { checksum } : {}),
        ...(token ? { token } : {}),
      });
      $("run-result").textContent = new TextDecoder("utf-8", { fatal: false }).decode(output);
      showAttestation();
    }, runForm);
  });

  const encryptForm = $("encrypt-form") as HTMLFormElement;
  encryptForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void guarded("Encrypting", async () => {
      const file = input("encrypt-file").files?.[0];
      const username = input("encrypt-user").value.trim();
      const options = username ? { username } : {};
      const link = $("encrypt-download") as HTMLAnchorElement;
      const output = input("encrypt-output") as unknown as HTMLTextAreaElement;
      let blob: Blob;
      if (file !== undefined && file.size > STREAM_ABOVE) {
        // Large files: cape-stream-v1, read and sealed a chunk at a time (binary form only)
        const pieces: Uint8Array<ArrayBuffer>[] = [];
        for await (const piece of client().encryptStream(file, options)) pieces.push(piece as Uint8Array<ArrayBuffer>);
        blob = new Blob(pieces, { type: "application/octet-stream" });
        output.value = `(${blob.size} bytes of binary cape-stream-v1: use the download link)`;
      } else {
        const data = await readInput("encrypt-text", "encrypt-file", file !== undefined);
        const ciphertext = await client().encrypt(data, options);
        output.value = ciphertext;
        blob = new Blob([ciphertext], { type: "text/plain" });
      }
      if (link.href) URL.revokeObjectURL(link.href);
      link.href = URL.createObjectURL(blob);
      link.hidden = false;
    }, encryptForm);
  });

  const tokenForm = $("token-form") as HTMLFormElement;
  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void guarded("Creating a token", async () => {
      const functionId = input("token-function").value.trim();
      const expiry = input("token-expiry").value.trim();
      const created = await client().createToken({
        name: input("token-name").value.trim(),
        description: input("token-description").value,
        ...(functionId ? { functionId } : {}),
        ...(expiry ? { expiry: Number(expiry) } : {}),
      });
      input("token-new").value = created.token;
      await refreshTokens();
    }, tokenForm);
  });

  const saved = sessionStorage.getItem(STORAGE);
  if (saved !== null) {
    try {
      signedIn(JSON.parse(saved) as Saved);
    } catch {
      sessionStorage.removeItem(STORAGE);
    }
  }
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();

/**
 * Server JSON read and shown as the Python SDK reads and shows it, so both SDKs fail alike on
 * the same bytes: nesting deeper than Python's `json.loads` can read is not JSON, truthiness
 * is Python's (`{}` and `[]` are false) and values in messages appear as Python's `repr`.
 */

/** Deeper than this, Python's `json.loads` raises RecursionError (its limit is 1000 frames). */
export const MAX_JSON_DEPTH = 900;

/** `JSON.parse`, throwing SyntaxError also for nesting Python could not read. */
export function parseJson(text: string): unknown {
  const value: unknown = JSON.parse(text);
  if (tooDeep(value)) throw new SyntaxError(`JSON nested deeper than ${MAX_JSON_DEPTH} levels`);
  return value;
}

function tooDeep(root: unknown): boolean {
  const stack: Array<[unknown, number]> = [[root, 0]];
  for (let top = stack.pop(); top !== undefined; top = stack.pop()) {
    const [value, depth] = top;
    if (value === null || typeof value !== "object") continue;
    if (depth >= MAX_JSON_DEPTH) return true;
    for (const child of Object.values(value)) stack.push([child, depth + 1]);
  }
  return false;
}

/** Python's `bool()` of a JSON value. */
export function pyTruthy(value: unknown): boolean {
  if (Array.isArray(value)) return value.length > 0;
  if (value !== null && typeof value === "object") return Object.keys(value).length > 0;
  return Boolean(value);
}

/** Python's `repr()` of a JSON value (a float with no fraction shows as an int: JSON.parse cannot tell). */
export function pyRepr(value: unknown): string {
  if (value === undefined || value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "string") return stringRepr(value);
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${stringRepr(k)}: ${pyRepr(v)}`).join(", ")}}`;
  }
  return String(value);
}

/** Python's `str()` of a JSON value (an `{"error"}` text). */
export function pyStr(value: unknown): string {
  return typeof value === "string" ? value : pyRepr(value);
}

const ESCAPES: Record<string, string> = { "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t" };

function stringRepr(text: string): string {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  let out = "";
  for (const char of text) {
    const code = char.codePointAt(0) ?? 0;
    if (char === quote) out += `\\${quote}`;
    else if (ESCAPES[char] !== undefined) out += ESCAPES[char];
    else if (code < 0x20 || (code >= 0x7f && code <= 0xa0) || code === 0xad) out += `\\x${code.toString(16).padStart(2, "0")}`;
    else if ((code >= 0xd800 && code <= 0xdfff) || code === 0x2028 || code === 0x2029) out += `\\u${code.toString(16).padStart(4, "0")}`;
    else out += char;
  }
  return quote + out + quote;
}

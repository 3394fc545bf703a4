/**
 * Node only: build a function bundle from a folder exactly as Python's `cape.sdk.bundle`
 * does, so `deploy` from Node and `cape deploy` give the same checksum:
 *
 * - regular files at the zip's root, sorted by POSIX relative path, no directory entries;
 * - every entry dated 1980-01-01 00:00, Unix mode 0o100644, deflate level 6 (stored when the
 *   ratio would exceed the enclave's limit of 200), no extra fields or comments;
 * - `__pycache__/`, VCS folders, tool caches, `*.pyc` and `.DS_Store` left out; symlinks and
 *   special files refused. `requirements.txt` is not vendored here: use `cape deploy` for that.
 *
 * Deflate is pako's, a port of zlib whose output equals stock zlib's (Python links stock zlib;
 * Node's own zlib is Chromium's fork, whose different match finder gives other bytes).
 */

import { createHash } from "node:crypto";
import { lstat, readFile, readdir } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";

import { deflateRaw } from "pako";

import { CapeError, FormatError, LimitExceededError } from "../errors.js";

export const COMPRESS_LEVEL = 6;
export const MAX_FILES = 10_000;
export const MAX_RATIO = 200;
const SKIP_DIRS = new Set(["__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".ruff_cache", ".pytest_cache"]);
const SKIP_FILES = new Set([".DS_Store"]);
const FILE_MODE = 0o100644;
const DOS_DATE_1980 = (0 << 9) | (1 << 5) | 1;

export interface Bundle {
  data: Uint8Array;
  /** SHA-256 of `data`, lower-case hex. */
  checksum: string;
  files: number;
}

async function walk(root: string): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  const pending: Array<[string, string]> = [[root, ""]];
  while (pending.length > 0) {
    const [directory, prefix] = pending.pop()!;
    let entries: string[];
    try {
      entries = await readdir(directory);
    } catch (error) {
      throw new CapeError(`cannot read ${directory}: ${(error as Error).message}`);
    }
    for (const name of entries) {
      const full = join(directory, name);
      const info = await lstat(full);
      if (info.isSymbolicLink()) {
        throw new CapeError(
          `${full} is a symbolic link; a bundle holds only regular files (replace the link with a copy of its target)`,
        );
      }
      if (info.isDirectory()) {
        if (!SKIP_DIRS.has(name)) pending.push([full, `${prefix}${name}/`]);
      } else if (info.isFile()) {
        if (!SKIP_FILES.has(name) && !name.endsWith(".pyc")) found.set(prefix + name, full);
      } else {
        throw new CapeError(`${full} is a special file (not a regular file or folder)`);
      }
    }
  }
  return found;
}

/** Python's str ordering (by code point), not UTF-16 code units. */
function byCodePoint(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i]!.codePointAt(0)! - y[i]!.codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

interface Entry {
  name: Uint8Array;
  utf8: boolean;
  method: number;
  crc: number;
  size: number;
  compressed: Uint8Array;
  offset: number;
}

function zip(files: Array<[string, Uint8Array]>, stored: Set<string>): { data: Uint8Array; tooCompressible: Set<string> } {
  const tooCompressible = new Set<string>();
  const parts: Uint8Array[] = [];
  const entries: Entry[] = [];
  let offset = 0;
  for (const [name, content] of files) {
    const encodedName = Buffer.from(name, "utf8");
    const method = stored.has(name) ? 0 : 8;
    const compressed = method === 8 ? deflateRaw(content, { level: COMPRESS_LEVEL, memLevel: 8, windowBits: 15 }) : content;
    if (content.length > MAX_RATIO * Math.max(compressed.length, 1)) tooCompressible.add(name);
    const entry: Entry = {
      name: encodedName,
      utf8: /[^\x00-\x7f]/.test(name),
      method,
      crc: crc32(content),
      size: content.length,
      compressed,
      offset,
    };
    const header = Buffer.alloc(30);
    header.writeUInt32LE(0x04034b50, 0);
    header.writeUInt8(20, 4); // extract version
    header.writeUInt8(0, 5);
    header.writeUInt16LE(entry.utf8 ? 0x800 : 0, 6);
    header.writeUInt16LE(method, 8);
    header.writeUInt16LE(0, 10); // time 00:00:00
    header.writeUInt16LE(DOS_DATE_1980, 12);
    header.writeUInt32LE(entry.crc, 14);
    header.writeUInt32LE(compressed.length, 18);
    header.writeUInt32LE(content.length, 22);
    header.writeUInt16LE(encodedName.length, 26);
    header.writeUInt16LE(0, 28);
    parts.push(header, encodedName, compressed);
    offset += header.length + encodedName.length + compressed.length;
    entries.push(entry);
  }
  const centralStart = offset;
  for (const entry of entries) {
    const header = Buffer.alloc(46);
    header.writeUInt32LE(0x02014b50, 0);
    header.writeUInt8(20, 4); // create version
    header.writeUInt8(3, 5); // create system: Unix
    header.writeUInt8(20, 6); // extract version
    header.writeUInt8(0, 7);
    header.writeUInt16LE(entry.utf8 ? 0x800 : 0, 8);
    header.writeUInt16LE(entry.method, 10);
    header.writeUInt16LE(0, 12);
    header.writeUInt16LE(DOS_DATE_1980, 14);
    header.writeUInt32LE(entry.crc, 16);
    header.writeUInt32LE(entry.compressed.length, 20);
    header.writeUInt32LE(entry.size, 24);
    header.writeUInt16LE(entry.name.length, 28);
    header.writeUInt16LE(0, 30); // extra
    header.writeUInt16LE(0, 32); // comment
    header.writeUInt16LE(0, 34); // disk
    header.writeUInt16LE(0, 36); // internal attributes
    header.writeUInt32LE((FILE_MODE << 16) >>> 0, 38);
    header.writeUInt32LE(entry.offset, 42);
    parts.push(header, entry.name);
    offset += header.length + entry.name.length;
  }
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(offset - centralStart, 12);
  end.writeUInt32LE(centralStart, 16);
  parts.push(end);
  return { data: Buffer.concat(parts), tooCompressible };
}

/** The deterministic zip of `folder` (which must hold `app.py` at its top). */
export async function buildBundle(folder: string): Promise<Bundle> {
  const found = await walk(folder);
  if (found.size === 0) throw new CapeError(`${folder} has no files`);
  if (!found.has("app.py")) throw new FormatError(`${folder} has no app.py at its top level`);
  if (found.size > MAX_FILES) throw new LimitExceededError(`bundle file count exceeds the limit of ${MAX_FILES} (got ${found.size})`);
  const names = [...found.keys()].sort(byCodePoint);
  const files: Array<[string, Uint8Array]> = [];
  for (const name of names) files.push([name, await readFile(found.get(name)!)]);
  let { data, tooCompressible } = zip(files, new Set());
  if (tooCompressible.size > 0) data = zip(files, tooCompressible).data;
  if (data.length >= 2 ** 32 - 1) throw new LimitExceededError("bundle size exceeds the zip32 limit");
  return { data, checksum: createHash("sha256").update(data).digest("hex"), files: files.length };
}

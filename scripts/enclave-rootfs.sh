#!/usr/bin/env bash
# The standard enclave runtime root filesystem: a minimal Debian userland (bookworm, from
# Debian's archive with debootstrap), CPython, bubblewrap, libseccomp, and this package with
# its dependencies from wheels. `cape enclave build --rootfs DIR` turns it into the customer
# ramdisk; the image's cmd starts the runtime, which reaches the host on vsock.
#
#   scripts/enclave-rootfs.sh -o DIR [--cache DIR] [--offline] [--update-lock]
#
# Inputs are pinned in scripts/enclave-rootfs.lock: the version and SHA-256 of every .deb
# and wheel. Downloads are kept in the cache directory (default ~/.cache/cape-rootfs, or
# $CAPE_ROOTFS_CACHE), and the same cached inputs always give the same tree (the build
# only unpacks: no maintainer scripts, no byte-compiled files, no logs).
#
# Debian's archive serves only current versions, so the lock cannot always be re-fetched.
# - Online (default): debootstrap resolves the current versions. Packages newer than the
#   lock are used, named on stderr ("newer than the lock: ..."), and the build still
#   succeeds: CI never fails because Debian published an update. --update-lock rewrites
#   the lock with what was used.
# - --offline: only the cached files the lock names, each checked against its SHA-256;
#   a missing or different file is an error. This is the byte-for-byte rebuild.
#
# Needs root (debootstrap), dpkg-deb, tar and pip. Cost: about 40 MB of .debs and 25 MB of
# wheels on the first run, under a minute afterwards with a warm cache.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCK="$ROOT/scripts/enclave-rootfs.lock"
CACHE="${CAPE_ROOTFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cape-rootfs}"
OUT=""
OFFLINE=0
UPDATE=0
SUITE=bookworm
MIRROR="${CAPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ARCH=amd64
PYVER=3.11
DEBS=python3-minimal,libpython3.11-stdlib,bubblewrap,libseccomp2
PLATFORMS=(manylinux_2_36_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64)
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

die() { echo "Error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        -o|--output) OUT="$2"; shift 2 ;;
        --cache) CACHE="$2"; shift 2 ;;
        --offline) OFFLINE=1; shift ;;
        --update-lock) UPDATE=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$OUT" ] || die "give -o DIR, the root filesystem to create"
[ ! -e "$OUT" ] || [ -z "$(ls -A "$OUT")" ] || die "$OUT exists and is not empty"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
[ "$OFFLINE" = 0 ] || [ "$UPDATE" = 0 ] || die "--offline uses the lock; it cannot update it"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"
[ "$OFFLINE" = 1 ] || command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"

mkdir -p "$CACHE/debs" "$CACHE/wheels" "$CACHE/self" "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export SOURCE_DATE_EPOCH=0 PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The .deb files: "name path" lines in $WORK/debs.txt.
if [ "$OFFLINE" = 1 ]; then
    [ -f "$LOCK" ] || die "no lock file $LOCK to rebuild from"
    awk '$1 == "deb" { print $2, $5, $6 }' "$LOCK" | while read -r name file sum; do
        [ -f "$CACHE/debs/$file" ] || die "offline: $file is not in $CACHE/debs"
        echo "$sum  $CACHE/debs/$file" | sha256sum -c --quiet - >/dev/null 2>&1 \
            || die "offline: $CACHE/debs/$file does not match its SHA-256 in the lock"
        echo "$name $CACHE/debs/$file"
    done > "$WORK/debs.txt"
else
    debootstrap --variant=minbase --include="$DEBS" --arch="$ARCH" --download-only \
        --cache-dir="$CACHE/debs" "$SUITE" "$WORK/dl" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap could not fetch the packages"; }
    awk -v c="$CACHE/debs" '{ n = split($2, p, "/"); print $1, c "/" p[n] }' \
        "$WORK/dl/debootstrap/debpaths" > "$WORK/debs.txt"
fi

# 2. Unpack them, sorted, into a merged-/usr tree (as Debian 12 installs it).
for dir in bin sbin lib lib64; do mkdir -p "$OUT/usr/$dir"; ln -sfn "usr/$dir" "$OUT/$dir"; done
sort "$WORK/debs.txt" | while read -r _ deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$OUT" --keep-directory-symlink --no-same-owner
done

# 3. This package and its dependencies, as wheels for the image's CPython; with the aws extra
#    (botocore), which the runtime needs to call AWS KMS itself (`cape serve --enclave nitro`).
"$PYTHON" -m pip wheel --quiet --no-deps -w "$WORK/self" "$ROOT" >/dev/null
SELF=$(ls "$WORK/self"/cape-*.whl)
TARGET_ARGS=(--only-binary=:all: --python-version "$PYVER" --implementation cp)
for platform in "${PLATFORMS[@]}"; do TARGET_ARGS+=(--platform "$platform"); done
if [ "$OFFLINE" = 1 ]; then
    awk '$1 == "wheel" { print $2, $3 }' "$LOCK" | while read -r file sum; do
        echo "$sum  $CACHE/wheels/$file" | sha256sum -c --quiet - >/dev/null 2>&1 \
            || die "offline: $CACHE/wheels/$file is missing or does not match the lock"
    done
else
    # A cape wheel left in the cache by an earlier build has this one's name but maybe not its
    # dependencies, and pip download would resolve from the stale one's metadata.
    rm -f "$CACHE/wheels"/cape-*.whl
    "$PYTHON" -m pip download --quiet "${TARGET_ARGS[@]}" -d "$CACHE/wheels" "$SELF[aws]" >/dev/null
fi
SITE="$OUT/usr/local/lib/python$PYVER/dist-packages"
"$PYTHON" -m pip install --quiet --no-index --find-links "$CACHE/wheels" --no-compile \
    "${TARGET_ARGS[@]}" --target "$SITE" --report "$WORK/report.json" "$SELF[aws]" >/dev/null

# 4. The dynamic linker's cache (ctypes.util.find_library, which pyseccomp uses, reads it);
#    then nothing that differs from one build to the next.
ldconfig -r "$OUT"
rm -rf "$OUT/var/cache/ldconfig"
rm -rf "$OUT/var/cache/apt/archives/"*.deb "$OUT/var/lib/apt/lists/"* "$OUT/var/log/"*
# Nothing in the enclave reads manuals or translations (about 40 MB); the packages'
# copyright files stay, as their licences ask.
rm -rf "$OUT/usr/share/man" "$OUT/usr/share/info" "$OUT/usr/share/locale"
find "$OUT/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$OUT/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
find "$SITE" -name direct_url.json -delete  # the wheel's temporary path
find "$SITE" -path '*.dist-info/RECORD' -exec sed -i '/direct_url\.json/d' {} +
mkdir -p "$OUT/run/cape"

# 5. Compare with the lock; name what is newer; rewrite it with --update-lock.
"$PYTHON" - "$WORK/debs.txt" "$WORK/report.json" "$LOCK" "$UPDATE" "$CACHE/wheels" <<'PY'
import hashlib, json, subprocess, sys
from pathlib import Path

debs_file, report_file, lock_file, update, wheel_dir = sys.argv[1:]
lines = []
for line in sorted(Path(debs_file).read_text().split("\n")):
    if not line:
        continue
    _, path = line.split(" ", 1)
    fields = subprocess.run(
        ["dpkg-deb", "-f", path, "Package", "Version", "Architecture"],
        capture_output=True, text=True, check=True,
    ).stdout
    info = dict(f.split(": ", 1) for f in fields.strip().split("\n"))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    lines.append(f"deb {info['Package']} {info['Version']} {info['Architecture']} "
                 f"{Path(path).name} {digest}")
report = json.loads(Path(report_file).read_text())
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    name = Path(item["download_info"]["url"]).name
    if name.startswith("cape-"):
        continue  # this tree, built now
    digest = hashlib.sha256((Path(wheel_dir) / name).read_bytes()).hexdigest()
    lines.append(f"wheel {name} {digest}")
header = ["# Inputs of scripts/enclave-rootfs.sh (Debian bookworm amd64, CPython 3.11 wheels).",
          "# Regenerate with: scripts/enclave-rootfs.sh -o DIR --update-lock"]
lock = Path(lock_file)
old = [l for l in lock.read_text().splitlines() if l and not l.startswith("#")] if lock.exists() else []
def versions(entries):
    out = {}
    for e in entries:
        parts = e.split()
        out[(parts[0], parts[1])] = parts[2] if parts[0] == "deb" else parts[2]
    return out
before, after = versions(old), versions(lines)
changed = sorted(f"{k[1]} {before.get(k, '(new)')} -> {v}" for k, v in after.items() if before.get(k) != v)
gone = sorted(k[1] for k in before if k not in after)
if old and (changed or gone):
    print("newer than the lock (or changed): " + "; ".join(changed + [f"{g} (gone)" for g in gone]),
          file=sys.stderr)
if update == "1" or not lock.exists():
    lock.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {lock}", file=sys.stderr)
PY
du -sh "$OUT" | awk '{ print "root filesystem: " $1 }' >&2

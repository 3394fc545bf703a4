"""The EIF writer and builder, checked by the independent reader in ``spec_reader`` (written
from AWS's EIF specification, importing nothing from cape), and cape's own reader
(``describe_eif``) checked against the same expectations, including hostile files."""

from __future__ import annotations

import hashlib
import io
import json
import stat
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cape.crypto.eif_signature import ImageSigner
from cape.errors import FormatError, SignatureError
from cape.formats.eif import encode_metadata, write_eif
from cape.image.build import DEFAULT_CMD, build_image
from cape.verify.eif import describe_eif
from tests.unit.image import spec_reader
from tests.unit.image.conftest import CMDLINE

EMPTY_PCR = bytes.fromhex(
    "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c"
    "10edb30948c90ba67310f7b964fc500a"
)


def _build(blobs: Path, rootfs: Path, out: Path, signer: ImageSigner | None = None) -> bytes:
    build_image(
        blobs=blobs,
        rootfs=rootfs,
        output=out,
        signer=signer,
        name="cape-runtime",
        version="1.2.3",
        build_time="2026-02-03T04:05:06Z",
    )
    return out.read_bytes()


def test_header_fields_section_order_and_crc(blobs: Path, rootfs: Path, tmp_path: Path) -> None:
    data = _build(blobs, rootfs, tmp_path / "a.eif")
    image = spec_reader.read(data)
    assert image.magic == b".eif"
    assert image.version == 4
    assert image.flags == 0  # x86_64 (bzImage)
    assert image.reserved == 0 and image.unused == 0
    assert image.num_sections == 5
    assert [s.type for s in image.sections] == [
        "kernel",
        "cmdline",
        "metadata",
        "ramdisk",
        "ramdisk",
    ]
    assert all(s.flags == 0 for s in image.sections)
    # Back to back from byte 548, unused slots zero, nothing after the last section.
    position = 548
    for offset, size in zip(image.offsets[:5], image.sizes[:5], strict=True):
        assert offset == position
        position += 12 + size
    assert position == len(data)
    assert image.offsets[5:] == [0] * 27 and image.sizes[5:] == [0] * 27
    assert image.crc == spec_reader.crc_of(data)
    assert image.sections[0].data == (blobs / "bzImage").read_bytes()


def test_aarch64_kernel_sets_the_arch_flag(blobs: Path, rootfs: Path, tmp_path: Path) -> None:
    (blobs / "bzImage").rename(blobs / "Image")
    image = spec_reader.read(_build(blobs, rootfs, tmp_path / "a.eif"))
    assert image.flags == 1
    assert describe_eif(tmp_path / "a.eif").arm64


def test_cmdline_is_the_blob_line_without_newline_or_nul(
    blobs: Path, rootfs: Path, tmp_path: Path
) -> None:
    image = spec_reader.read(_build(blobs, rootfs, tmp_path / "a.eif"))
    cmdline = image.sections[1].data
    assert cmdline == CMDLINE.rstrip(b"\n")
    assert b"\0" not in cmdline


def test_metadata_is_the_crates_json(blobs: Path, rootfs: Path, tmp_path: Path) -> None:
    image = spec_reader.read(_build(blobs, rootfs, tmp_path / "a.eif"))
    metadata = json.loads(image.sections[2].data)
    assert list(metadata) == [
        "ImageName",
        "ImageVersion",
        "BuildMetadata",
        "DockerInfo",
        "CustomMetadata",
    ]
    assert metadata["ImageName"] == "cape-runtime"
    assert metadata["ImageVersion"] == "1.2.3"
    assert list(metadata["BuildMetadata"]) == [
        "BuildTime",
        "BuildTool",
        "BuildToolVersion",
        "OperatingSystem",
        "KernelVersion",
    ]
    assert metadata["BuildMetadata"]["BuildTime"] == "2026-02-03T04:05:06+00:00"
    assert describe_eif(tmp_path / "a.eif").metadata == metadata


def test_ramdisks_follow_nitro_cli_layout(blobs: Path, rootfs: Path, tmp_path: Path) -> None:
    image = spec_reader.read(_build(blobs, rootfs, tmp_path / "a.eif"))
    bootstrap = spec_reader.read_newc(image.sections[3].data)
    customer = spec_reader.read_newc(image.sections[4].data)
    assert [m.name for m in bootstrap] == ["dev", "init", "nsm.ko"]
    assert bootstrap[1].data == (blobs / "init").read_bytes()
    assert stat.S_ISDIR(bootstrap[0].mode)
    names = [m.name for m in customer]
    assert names == sorted(names, key=str.encode)
    assert {"cmd", "env", "rootfs", "rootfs/usr/bin/tool", "rootfs/bin"} <= set(names)
    by_name = {m.name: m for m in customer}
    assert by_name["cmd"].data.decode().splitlines() == list(DEFAULT_CMD)
    assert "CAPE_CHANNEL=vsock:3:5000" in by_name["env"].data.decode().splitlines()
    assert by_name["rootfs/bin"].data == b"usr/bin" and stat.S_ISLNK(by_name["rootfs/bin"].mode)
    assert stat.S_IMODE(by_name["rootfs/usr/bin/tool"].mode) == 0o755
    assert stat.S_IMODE(by_name["rootfs/etc/hostname"].mode) == 0o644
    for archive in (bootstrap, customer):
        # No build-machine facts: root-owned, time zero, inodes counted in order.
        assert [m.ino for m in archive] == list(range(1, len(archive) + 1))
        assert {(m.uid, m.gid, m.mtime) for m in archive} == {(0, 0, 0)}


def test_pcrs_recomputed_from_section_bytes(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner
) -> None:
    data = _build(blobs, rootfs, tmp_path / "a.eif", signer)
    expected = spec_reader.pcrs(spec_reader.read(data))
    description = describe_eif(tmp_path / "a.eif")
    assert {i: description.pcrs[i] for i in (0, 1, 2)} == expected
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    assert description.pcrs[8] == spec_reader.pcr(der)


def test_signature_section_has_the_serde_cbor_shape(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner
) -> None:
    data = _build(blobs, rootfs, tmp_path / "a.eif", signer)
    image = spec_reader.read(data)
    assert image.sections[-1].type == "signature"
    raw = image.sections[-1].data
    entries = spec_reader.signature_entries(raw)
    assert len(entries) == 1 and list(entries[0]) == ["signing_certificate", "signature"]
    cert_ints, cose_ints = entries[0]["signing_certificate"], entries[0]["signature"]
    # The quirk: byte vectors are CBOR arrays of integers, not byte strings.
    assert isinstance(cert_ints, list) and all(isinstance(i, int) for i in cert_ints)
    assert raw[1] == 0xA2  # a map of two entries inside a one-element array (0x81)
    certificate = x509.load_pem_x509_certificate(bytes(cert_ints))
    assert certificate == signer.certificate
    protected, unprotected, payload, signature = cbor2.loads(bytes(cose_ints))
    assert cbor2.loads(protected) == {1: -35} and unprotected == {}
    info = cbor2.loads(payload)
    assert list(info) == ["register_index", "register_value"]
    assert info["register_index"] == 0
    assert isinstance(info["register_value"], list)
    assert bytes(info["register_value"]) == spec_reader.pcrs(image)[0]
    assert len(signature) == 96
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    public = certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        encode_dss_signature(
            int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
        ),
        to_sign,
        ec.ECDSA(hashes.SHA384()),
    )


def test_single_ramdisk_known_answer(tmp_path: Path) -> None:
    path = tmp_path / "one.eif"
    metadata = encode_metadata(
        name="n", version="v", build_time="t", build_tool="b", build_tool_version="1"
    )
    with path.open("wb") as out:
        write_eif(
            out,
            kernel=b"kernel",
            cmdline=b"console=ttyS0",
            metadata=metadata,
            ramdisks=[(b"ramdisk", None)],
        )
    image = spec_reader.read(path.read_bytes())
    assert spec_reader.pcrs(image)[2] == EMPTY_PCR
    description = describe_eif(path)
    assert description.pcrs[0] == description.pcrs[1]
    assert description.pcrs[2] == EMPTY_PCR
    assert not description.signed and 8 not in description.pcrs


def test_describe_json_shape(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner
) -> None:
    _build(blobs, rootfs, tmp_path / "a.eif", signer)
    document = describe_eif(tmp_path / "a.eif").to_json()
    assert set(document) == {"pcrs", "sections", "metadata", "signed", "signer"}
    assert set(document["pcrs"]) == {"0", "1", "2", "8"}
    assert document["signed"] is True
    assert document["sections"][0] == {"type": "kernel", "size": 680}
    assert document["signer"]["subject"] == "CN=Cape release signer"


def _small_image(tmp_path: Path, signer: ImageSigner) -> bytes:
    path = tmp_path / "small.eif"
    metadata = encode_metadata(
        name="n", version="v", build_time="t", build_tool="b", build_tool_version="1"
    )
    buffer = io.BytesIO()
    write_eif(
        buffer,
        kernel=b"K" * 8,
        cmdline=b"c=1",
        metadata=metadata,
        ramdisks=[(b"boot", None), (b"app!", None)],
    )
    pcr0 = spec_reader.pcrs(spec_reader.read(buffer.getvalue()))[0]
    with path.open("wb") as out:
        write_eif(
            out,
            kernel=b"K" * 8,
            cmdline=b"c=1",
            metadata=metadata,
            ramdisks=[(b"boot", None), (b"app!", None)],
            signature=signer.sign_pcr0(pcr0),
        )
    return path.read_bytes()


def test_every_single_byte_corruption_is_refused(tmp_path: Path, signer: ImageSigner) -> None:
    data = _small_image(tmp_path, signer)
    assert describe_eif(tmp_path / "small.eif").signed
    target = tmp_path / "corrupt.eif"
    for position in range(len(data)):
        for mask in (0x01, 0xFF):
            corrupt = bytearray(data)
            corrupt[position] ^= mask
            target.write_bytes(corrupt)
            with pytest.raises((FormatError, SignatureError)) as info:
                describe_eif(target)
            assert "\n" not in info.value.diagnostics()


def test_truncated_extended_and_oversized_files_are_refused(
    tmp_path: Path, signer: ImageSigner
) -> None:
    data = _small_image(tmp_path, signer)
    target = tmp_path / "bad.eif"
    for length in range(len(data)):
        target.write_bytes(data[:length])
        with pytest.raises(FormatError):
            describe_eif(target)
    target.write_bytes(data + b"\0")
    with pytest.raises(FormatError, match="after its last section"):
        describe_eif(target)
    target.write_bytes(data)
    with pytest.raises(FormatError, match="limit"):
        describe_eif(target, max_bytes=len(data) - 1)
    with pytest.raises(FormatError, match="cannot read"):
        describe_eif(tmp_path / "missing.eif")


def test_a_valid_crc_does_not_save_a_signature_over_another_image(
    tmp_path: Path, signer: ImageSigner
) -> None:
    """Change a ramdisk byte and fix the CRC: the signature no longer signs this PCR0."""
    data = bytearray(_small_image(tmp_path, signer))
    image = spec_reader.read(bytes(data))
    app = image.sections[4]
    data[app.offset + 12] ^= 1
    data[544:548] = spec_reader.crc_of(bytes(data)).to_bytes(4, "big")
    target = tmp_path / "resigned.eif"
    target.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="another image"):
        describe_eif(target)


def test_signature_by_a_key_not_matching_its_certificate_is_refused(
    tmp_path: Path, signer: ImageSigner, other_signer: ImageSigner
) -> None:
    data = bytearray(_small_image(tmp_path, signer))
    image = spec_reader.read(bytes(data))
    section = image.sections[-1]
    entries = spec_reader.signature_entries(section.data)
    entries[0]["signing_certificate"] = list(other_signer.certificate_pem)
    forged = cbor2.dumps(entries)
    rebuilt = bytearray(data[: section.offset + 4] + len(forged).to_bytes(8, "big") + forged)
    sizes_at = 284 + 8 * (image.num_sections - 1)
    rebuilt[sizes_at : sizes_at + 8] = len(forged).to_bytes(8, "big")
    rebuilt[544:548] = spec_reader.crc_of(bytes(rebuilt)).to_bytes(4, "big")
    target = tmp_path / "forged.eif"
    target.write_bytes(bytes(rebuilt))
    with pytest.raises(SignatureError, match="does not verify"):
        describe_eif(target)


def test_build_refuses_missing_blobs_and_bad_inputs(
    blobs: Path, rootfs: Path, tmp_path: Path
) -> None:
    (blobs / "nsm.ko").unlink()
    with pytest.raises(FormatError, match=r"no nsm\.ko"):
        _build(blobs, rootfs, tmp_path / "a.eif")
    assert not (tmp_path / "a.eif").exists()
    (blobs / "nsm.ko").write_bytes(b"nsm")
    with pytest.raises(FormatError, match="neither a directory nor an image archive"):
        _build(blobs, tmp_path / "nothing", tmp_path / "a.eif")
    with pytest.raises(FormatError, match="RFC 3339"):
        build_image(blobs=blobs, rootfs=rootfs, output=tmp_path / "b.eif", build_time="yesterday")


def test_sha256_of_the_fixture_is_stable_across_builds(
    blobs: Path, rootfs: Path, tmp_path: Path, signer: ImageSigner
) -> None:
    first = hashlib.sha256(_build(blobs, rootfs, tmp_path / "a.eif", signer)).hexdigest()
    second = hashlib.sha256(_build(blobs, rootfs, tmp_path / "b.eif", signer)).hexdigest()
    assert first == second

"""NitroSecureModule against a fake /dev/nsm: the ioctl sees the exact NSM bytes.

There is no Nitro Secure Module here, so the ``ioctl`` is replaced by a fake device that
checks the request code, reads the request out of the request iovec's memory, writes a
recorded response into the response iovec and sets its length, as the kernel driver does.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from cape.enclave.secure_module.nitro import (
    NSM_DEVICE,
    NSM_IOCTL_REQUEST,
    NitroSecureModule,
    NSMMessage,
)
from cape.errors import NSMError, SecureModuleError
from cape.formats.attestation import parse_attestation
from cape.formats.nsm import MAX_REQUEST_BYTES, RESPONSE_BUFFER_BYTES, DescribePCRResponse
from cape.verify.policy import AttestationPolicy
from cape.verify.roots import load_root_certificate_file
from cape.verify.verifier import verify_attestation
from tests.samples import ROOT_PEM, SAMPLES, read_sample, requires_samples

BLOCKY_PROD = SAMPLES[0]


class FakeDevice:
    """Plays the kernel side of ``ioctl(fd, NSM_IOCTL_REQUEST, &nsm_message)``."""

    def __init__(
        self,
        *responses: bytes,
        reported_length: int | None = None,
        error: OSError | None = None,
    ) -> None:
        self.responses = list(responses)
        self.reported_length = reported_length
        self.error = error
        self.requests: list[bytes] = []
        self.fds: list[int] = []

    def __call__(self, fd: int, request: int, arg: NSMMessage, /) -> int:
        assert request == 0xC0200A00
        assert isinstance(arg, NSMMessage)
        self.fds.append(fd)
        self.requests.append(ctypes.string_at(arg.request.iov_base, arg.request.iov_len))
        if self.error is not None:
            raise self.error
        assert arg.response.iov_len == RESPONSE_BUFFER_BYTES
        response = self.responses.pop(0)
        ctypes.memmove(arg.response.iov_base, response, min(len(response), RESPONSE_BUFFER_BYTES))
        length = len(response) if self.reported_length is None else self.reported_length
        arg.response.iov_len = length
        return 0


@pytest.fixture
def device_path(tmp_path: Path) -> Path:
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return path


def _cbor(item: object) -> bytes:
    return bytes(cbor2.dumps(item))


# --- the driver interface -------------------------------------------------------------------


@pytest.mark.skipif(struct.calcsize("P") != 8, reason="the 0xC0200A00 code is for 64-bit")
def test_ioctl_code_is_iowr_0x0a_0_of_a_32_byte_message() -> None:
    assert ctypes.sizeof(NSMMessage) == 32
    assert NSM_IOCTL_REQUEST == 0xC0200A00


def test_absent_device_gives_a_clear_error(tmp_path: Path) -> None:
    module = NitroSecureModule(tmp_path / "missing", ioctl=FakeDevice())
    with pytest.raises(SecureModuleError, match=r"no Nitro Secure Module at .*missing"):
        module.get_random()


@pytest.mark.skipif(NSM_DEVICE.exists(), reason="running inside a Nitro Enclave")
def test_default_device_names_dev_nsm_and_the_likely_cause() -> None:
    module = NitroSecureModule()  # constructing never touches the device
    with pytest.raises(SecureModuleError) as caught:
        module.describe_nsm()
    assert caught.value.diagnostics() == (
        "no Nitro Secure Module at /dev/nsm (not running inside a Nitro Enclave?)"
    )


def test_unopenable_device_is_a_secure_module_error(tmp_path: Path) -> None:
    module = NitroSecureModule(tmp_path, ioctl=FakeDevice())  # a directory
    with pytest.raises(SecureModuleError, match="cannot open the Nitro Secure Module"):
        module.get_random()


def test_device_is_opened_once_and_reopened_after_close(device_path: Path) -> None:
    random = _cbor({"GetRandom": {"random": b"\x01" * 8}})
    fake = FakeDevice(random, random, random)
    module = NitroSecureModule(device_path, ioctl=fake)
    module.get_random()
    module.get_random()
    assert fake.fds[0] == fake.fds[1]
    module.close()
    module.close()  # idempotent
    with module:
        module.get_random()
    assert len(fake.requests) == 3


def test_real_fcntl_ioctl_accepts_the_message_struct(device_path: Path) -> None:
    # A regular file is not the NSM: the kernel answers ENOTTY, which proves fcntl.ioctl took
    # the ctypes message as its buffer argument and reached the system call.
    module = NitroSecureModule(device_path)
    with pytest.raises(SecureModuleError, match="ioctl failed") as caught:
        module.get_random()
    assert not isinstance(caught.value, NSMError)


# --- requests reach the device as the exact NSM bytes ----------------------------------------


def test_attestation_request_bytes_reach_the_device(device_path: Path) -> None:
    fake = FakeDevice(_cbor({"Attestation": {"document": b"\x84"}}))
    module = NitroSecureModule(device_path, ioctl=fake)
    assert module.attestation(nonce=b"\x01") == b"\x84"
    assert fake.requests == [
        bytes.fromhex(
            "a1 6b 4174746573746174696f6e a3 69 757365725f64617461 f6 65 6e6f6e6365 41 01"
            " 6a 7075626c69635f6b6579 f6"
        )
    ]


@pytest.mark.parametrize(
    ("call", "response", "request_hex", "expected"),
    [
        (
            lambda m: m.describe_pcr(3),
            {"DescribePCR": {"lock": True, "data": b"\x03" * 48}},
            "a1 6b 4465736372696265504352 a1 65 696e646578 03",
            DescribePCRResponse(lock=True, data=b"\x03" * 48),
        ),
        (
            lambda m: m.extend_pcr(16, b"\xab"),
            {"ExtendPCR": {"data": b"\x10" * 48}},
            "a1 69 457874656e64504352 a2 65 696e646578 10 64 64617461 41 ab",
            b"\x10" * 48,
        ),
        (
            lambda m: m.lock_pcr(16),
            "LockPCR",
            "a1 67 4c6f636b504352 a1 65 696e646578 10",
            None,
        ),
        (
            lambda m: m.lock_pcrs(32),
            "LockPCRs",
            "a1 68 4c6f636b50435273 a1 65 72616e6765 18 20",
            None,
        ),
        (
            lambda m: m.get_random(),
            {"GetRandom": {"random": b"\x5a" * 256}},
            "69 47657452616e646f6d",
            b"\x5a" * 256,
        ),
    ],
    ids=["describe_pcr", "extend_pcr", "lock_pcr", "lock_pcrs", "get_random"],
)
def test_each_operation_sends_its_request_and_decodes_its_response(
    device_path: Path,
    call: Callable[[NitroSecureModule], object],
    response: object,
    request_hex: str,
    expected: object,
) -> None:
    fake = FakeDevice(_cbor(response))
    module = NitroSecureModule(device_path, ioctl=fake)
    assert call(module) == expected
    assert fake.requests == [bytes.fromhex(request_hex)]


def test_describe_nsm_round_trip(device_path: Path) -> None:
    response = {
        "DescribeNSM": {
            "version_major": 1,
            "version_minor": 0,
            "version_patch": 0,
            "module_id": "i-0a22e5c5f24d22174-enc0191cceb4289903f",
            "max_pcrs": 32,
            "locked_pcrs": list(range(16)),
            "digest": "SHA384",
        }
    }
    fake = FakeDevice(_cbor(response))
    description = NitroSecureModule(device_path, ioctl=fake).describe_nsm()
    assert fake.requests == [bytes.fromhex("6b 44657363726962654e534d")]
    assert description.module_id == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert description.locked_pcrs == tuple(range(16))


@requires_samples
def test_recorded_aws_attestation_response_returns_the_document(device_path: Path) -> None:
    document = read_sample(BLOCKY_PROD)
    assert hashlib.sha256(document).hexdigest() == (
        "72ffd835a669cad29f11314fb4185bd89eaed2762e30dc25282c663606ee30ee"
    )
    recorded = _cbor({"Attestation": {"document": document}})
    fake = FakeDevice(recorded)
    module = NitroSecureModule(device_path, ioctl=fake)

    returned = module.attestation(user_data=b"\x01" * 1024, nonce=b"\x01" * 1024)

    assert returned == document
    signed = parse_attestation(returned)
    assert signed.document.module_id == BLOCKY_PROD.module_id
    verified = verify_attestation(
        returned,
        root=load_root_certificate_file(ROOT_PEM),
        now=BLOCKY_PROD.check_time,
        policy=AttestationPolicy(nonce=b"\x01" * 1024, max_age=None),
    )
    assert verified.timestamp == BLOCKY_PROD.timestamp_ms


# --- refusals and failures ------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["InvalidArgument", "InvalidIndex", "ReadOnlyIndex", "InputTooLarge", "Success"]
)
def test_error_response_raises_nsm_error_with_the_code(device_path: Path, code: str) -> None:
    fake = FakeDevice(_cbor({"Error": code}))
    with pytest.raises(NSMError) as caught:
        NitroSecureModule(device_path, ioctl=fake).describe_pcr(40)
    assert caught.value.code == code


def test_response_of_the_wrong_variant_is_a_secure_module_error(device_path: Path) -> None:
    fake = FakeDevice(_cbor({"GetRandom": {"random": b"x"}}))
    with pytest.raises(SecureModuleError, match="answered DescribePCR with GetRandom") as caught:
        NitroSecureModule(device_path, ioctl=fake).describe_pcr(0)
    assert not isinstance(caught.value, NSMError)


def test_malformed_response_is_a_secure_module_error(device_path: Path) -> None:
    fake = FakeDevice(b"\xa1\x65Error")  # truncated
    with pytest.raises(SecureModuleError, match="malformed response"):
        NitroSecureModule(device_path, ioctl=fake).get_random()


def test_request_over_4096_bytes_is_refused_before_the_ioctl(device_path: Path) -> None:
    fake = FakeDevice()
    module = NitroSecureModule(device_path, ioctl=fake)
    with pytest.raises(NSMError) as caught:
        module.extend_pcr(16, bytes(MAX_REQUEST_BYTES))
    assert caught.value.code == "InputTooLarge"
    with pytest.raises(NSMError):
        module.process(bytes(MAX_REQUEST_BYTES + 1))
    assert fake.requests == []


def test_request_of_exactly_4096_bytes_is_sent(device_path: Path) -> None:
    fake = FakeDevice(_cbor({"Error": "InvalidArgument"}))
    module = NitroSecureModule(device_path, ioctl=fake)
    request = b"\x5a" * MAX_REQUEST_BYTES
    assert module.process(request) == _cbor({"Error": "InvalidArgument"})
    assert fake.requests == [request]


def test_emsgsize_from_the_driver_is_input_too_large(device_path: Path) -> None:
    fake = FakeDevice(error=OSError(errno.EMSGSIZE, "Message too long"))
    with pytest.raises(NSMError) as caught:
        NitroSecureModule(device_path, ioctl=fake).get_random()
    assert caught.value.code == "InputTooLarge"


def test_other_ioctl_failures_are_secure_module_errors(device_path: Path) -> None:
    fake = FakeDevice(error=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(SecureModuleError, match="Input/output error") as caught:
        NitroSecureModule(device_path, ioctl=fake).get_random()
    assert not isinstance(caught.value, NSMError)


def test_response_longer_than_the_buffer_is_refused(device_path: Path) -> None:
    fake = FakeDevice(b"\xf6", reported_length=RESPONSE_BUFFER_BYTES + 1)
    with pytest.raises(SecureModuleError, match="12289-byte response"):
        NitroSecureModule(device_path, ioctl=fake).get_random()


def test_empty_response_is_refused(device_path: Path) -> None:
    fake = FakeDevice(b"", reported_length=0)
    with pytest.raises(SecureModuleError, match="empty response"):
        NitroSecureModule(device_path, ioctl=fake).get_random()


def test_response_length_comes_from_iov_len(device_path: Path) -> None:
    # The driver writes the response and sets iov_len; bytes past it are not part of it.
    response = _cbor({"GetRandom": {"random": b"\x07" * 4}})
    fake = FakeDevice(response + b"\xff\xff", reported_length=len(response))
    assert NitroSecureModule(device_path, ioctl=fake).get_random() == b"\x07" * 4

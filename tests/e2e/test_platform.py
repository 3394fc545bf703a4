"""End to end over real TLS on loopback: a `cape serve` process and the SDK's verifying client,
on SQLite + a blob directory and on PostgreSQL + S3 (tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from cape.errors import ChecksumMismatchError, FunctionError, RequestRefusedError, VerificationError
from tests.e2e.server import ServeProcess, User, run

# Every test here runs on the embedded node and on one storing into PostgreSQL + S3.
pytestmark = pytest.mark.all_backends

ECHO = "def cape_handler(data):\n    return data\n"
FAILING = (
    "def cape_handler(data):\n"
    "    if data == b'boom':\n"
    "        raise ValueError('boom')\n"
    "    return b'ok:' + data\n"
)


def test_signup_login_key_deploy_list_run_delete(server: ServeProcess) -> None:
    user = User.signup(server)
    with server.rest() as rest:
        login = rest.login(user.username, "correct horse battery")
    assert login["username"] == user.username and login["access_token"]
    deployed = run(user.deploy(ECHO, name="echo"))
    assert len(deployed.id) == 22 and len(deployed.checksum) == 64
    listed = user.api("GET", "/v1/functions")
    assert [(f["id"], f["name"], f["checksum"]) for f in listed] == [
        (deployed.id, "echo", deployed.checksum)
    ]
    assert run(user.run(deployed.id, b"hello", function_checksum=deployed.checksum)) == b"hello"
    assert run(user.run(f"{user.username}/echo", b"by name")) == b"by name"
    user.api("DELETE", f"/v1/functions/{deployed.id}")
    assert user.api("GET", "/v1/functions") == []
    with pytest.raises(RequestRefusedError) as refused:
        run(user.run(deployed.id, b"gone"))
    assert refused.value.status == 404


def test_many_invokes_and_function_errors_keep_the_session(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(FAILING))

    async def flow() -> list[bytes | str]:
        session = await user.session(deployed.id)
        results: list[bytes | str] = []
        try:
            for data in (b"a", b"boom", b"b"):
                try:
                    results.append(await session.invoke(data))
                except FunctionError as exc:
                    results.append(str(exc))
        finally:
            await session.close()
        return results

    assert run(flow()) == [b"ok:a", "function raised ValueError: boom", b"ok:b"]


def test_checksum_mismatch_is_refused(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))
    with pytest.raises(ChecksumMismatchError):
        run(user.run(deployed.id, b"x", function_checksum="00" * 32))


def test_pcr_pin_mismatch_is_refused(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))
    with pytest.raises(VerificationError):
        run(user.run(deployed.id, b"x", pcrs={0: {b"\x01" * 48}}))


def test_scoped_token_runs_only_its_function(server: ServeProcess) -> None:
    user = User.signup(server)
    first, second = run(user.deploy(ECHO, "one")), run(user.deploy(ECHO, "two"))
    scoped = user.api(
        "POST", "/v1/token", {"name": "ci", "description": "", "function_id": first.id}
    )["token"]
    assert run(user.run(first.id, b"ok", token=scoped)) == b"ok"
    with pytest.raises(RequestRefusedError) as refused:
        run(user.run(second.id, b"no", token=scoped))
    assert refused.value.status == 403
    with pytest.raises(RequestRefusedError):  # nor may it deploy or list
        user.api("GET", "/v1/functions", token=scoped)


def test_deleted_token_is_refused_at_once(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))
    created = user.api("POST", "/v1/token", {"name": "pat", "description": ""})
    assert run(user.run(deployed.id, b"before", token=created["token"])) == b"before"
    user.api("DELETE", f"/v1/token/{created['id']}")
    with pytest.raises(RequestRefusedError) as refused:
        run(user.run(deployed.id, b"after", token=created["token"]))
    assert refused.value.status == 401 and "revoked" in str(refused.value)


def test_private_and_public_functions_of_another_user(server: ServeProcess) -> None:
    owner, other = User.signup(server, "owner"), User.signup(server, "other")
    private = run(owner.deploy(ECHO, "private"))
    public = run(owner.deploy(ECHO, "public", public=True))
    with pytest.raises(RequestRefusedError) as refused:
        run(other.run(private.id, b"x"))
    assert refused.value.status == 404  # as if missing (tests/e2e/test_tenant_accounts.py)
    assert run(other.run(public.id, b"shared")) == b"shared"
    assert run(other.run(f"{owner.username}/public", b"by name")) == b"by name"
    with pytest.raises(RequestRefusedError) as refused:
        other.api("DELETE", f"/v1/functions/{public.id}")
    assert refused.value.status == 403


def test_bad_tokens_are_refused_at_the_upgrade(server: ServeProcess) -> None:
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))
    for token, status in (("not-a-jwt", 401), (user.token + "x", 401)):
        with pytest.raises(RequestRefusedError) as refused:
            run(user.run(deployed.id, b"x", token=token))
        assert refused.value.status == status
    with pytest.raises(RequestRefusedError) as refused:
        run(user.run("A" * 22, b"x"))
    assert refused.value.status == 404


def test_pipelined_inputs_get_one_reply_each_in_order(server: ServeProcess) -> None:
    """A client may send many inputs before reading: the server reads one, relays, replies."""
    user = User.signup(server)
    deployed = run(user.deploy(ECHO))

    async def flow() -> list[bytes]:
        session = await user.session(deployed.id)
        try:
            for i in range(40):
                await session.send_sealed(f"input {i}".encode())
            return [await session.receive_result() for _ in range(40)]
        finally:
            await session.close()

    assert run(flow()) == [f"input {i}".encode() for i in range(40)]

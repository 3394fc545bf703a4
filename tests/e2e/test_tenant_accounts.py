"""Hostile tenants against accounts, over a real ``cape serve`` (issue 18, findings 6 and 9).

Clients come from distinct loopback addresses (127.0.0.2, 127.0.0.3, …: Linux routes all of
127/8 to lo), so "an attacker elsewhere" is a real TCP peer with another address, not a
header. Each test states the attack, then what the victim can still do.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from cape.sdk.session import SUBPROTOCOL, ws_url
from tests.e2e.cli import ECHO_APP, PASSWORD, cape, error, new_config, ok
from tests.e2e.conftest import requires_enclaves
from tests.e2e.server import ServeProcess, User, run

pytestmark = requires_enclaves

VICTIM_ADDRESS = "127.0.0.2"
ATTACKER_ADDRESS = "127.0.0.3"


def _start(base: Path, *args: str) -> ServeProcess:
    return ServeProcess(
        base / "data", base / "config", base / "logs", enclaves=1, extra_args=list(args)
    ).start()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """Default modes (open signup, no trusted proxy), with a small signup rate to flood."""
    server = _start(tmp_path_factory.mktemp("open"), "--signup-rate", "3")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def invite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """Invite-only signup behind a proxy at 127.0.0.1 (the only one it trusts)."""
    server = _start(
        tmp_path_factory.mktemp("invite"),
        "--signup",
        "invite",
        "--forwarded-allow-ips",
        "127.0.0.1",
    )
    try:
        yield server
    finally:
        assert server.stop() == 0, server.stderr()[-3000:]


def client(server: ServeProcess, address: str, forwarded_for: str | None = None) -> httpx.Client:
    """An HTTPS client whose TCP source address is ``address``."""
    context = server.ssl_context()
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    return httpx.Client(
        base_url=server.url,
        transport=httpx.HTTPTransport(verify=context, local_address=address),
        headers=headers,
        timeout=60.0,
    )


def post(
    server: ServeProcess,
    path: str,
    body: dict[str, Any],
    *,
    address: str = "127.0.0.1",
    forwarded_for: str | None = None,
) -> httpx.Response:
    with client(server, address, forwarded_for) as http:
        return http.post(path, json=body)


def name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def sign_up(server: ServeProcess, address: str, prefix: str = "user", **extra: str) -> User:
    username = name(prefix)
    response = post(
        server,
        "/v1/signup",
        {"username": username, "password": PASSWORD, **extra},
        address=address,
    )
    assert response.status_code == 201, response.text
    return User(server, username, response.json()["access_token"])


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert "try again" in response.json()["error"]


# --------------------------------------------------------------------------- logins


def until_throttled(send: Callable[[], httpx.Response], limit: int = 40) -> list[int]:
    """Send until the answer is 429 (at most ``limit`` times); the statuses seen."""
    statuses = []
    for _ in range(limit):
        response = send()
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_throttled(response)
            break
        assert response.status_code == 401, response.text
    return statuses


def test_an_attacker_elsewhere_cannot_lock_the_victim_out(open_server: ServeProcess) -> None:
    victim = sign_up(open_server, VICTIM_ADDRESS, "victim")
    wrong = {"username": victim.username, "password": "not the password"}
    right = {"username": victim.username, "password": PASSWORD}
    with (
        client(open_server, ATTACKER_ADDRESS) as attacker,
        client(open_server, VICTIM_ADDRESS) as own,
    ):
        # The attacker keeps guessing, waiting out each lockout, until it lasts 8 s or more;
        # the victim logs in from their own address after every round.
        retry_after = 0
        rounds = 0
        while retry_after < 8:
            statuses = until_throttled(lambda: attacker.post("/v1/login", json=wrong))
            assert statuses[-1] == 429, statuses
            if rounds == 0:
                assert statuses == [401] * 5 + [429], statuses
            assert own.post("/v1/login", json=right).status_code == 200
            refused = attacker.post("/v1/login", json=right)  # even with the password
            if refused.status_code == 429:
                retry_after = int(refused.headers["retry-after"])
                if retry_after < 8:
                    time.sleep(retry_after + 0.1)
            rounds += 1
            assert rounds < 10, "the attacker's lockout never grew"
        assert_throttled(attacker.post("/v1/login", json=right))
        assert own.post("/v1/login", json=right).status_code == 200  # and after it


def test_rotating_forwarded_for_does_not_bypass_the_limiter_by_default(
    open_server: ServeProcess,
) -> None:
    # Password spraying from loopback, claiming a new client address on every request: the
    # server trusts no proxy by default, so every guess counts against the real peer.
    addresses = iter(range(1, 1000))
    statuses = until_throttled(
        lambda: post(
            open_server,
            "/v1/login",
            {"username": name("nobody"), "password": "guess-guess"},
            forwarded_for=f"198.51.100.{next(addresses) % 250 + 1}",
        )
    )
    assert statuses[-1] == 429 and statuses.count(401) >= 20, statuses


def test_forwarded_for_is_honoured_only_from_listed_proxies(
    invite_server: ServeProcess,
) -> None:
    code = _invite(invite_server)
    victim = sign_up(invite_server, VICTIM_ADDRESS, "victim", invite=code)
    wrong = {"username": victim.username, "password": "not the password"}
    right = {"username": victim.username, "password": PASSWORD}
    # Through the listed proxy (127.0.0.1), the forwarded address is the client: an attacker
    # behind the proxy locks out only themselves, the victim behind it logs in.
    statuses = until_throttled(
        lambda: post(invite_server, "/v1/login", wrong, forwarded_for="203.0.113.66")
    )
    assert statuses[-1] == 429, statuses
    assert post(invite_server, "/v1/login", right, forwarded_for="203.0.113.7").status_code == 200
    # From an unlisted peer the header is ignored: spoofing the victim's forwarded address
    # from 127.0.0.3 throttles 127.0.0.3, and the victim (via the proxy) still logs in.
    statuses = until_throttled(
        lambda: post(
            invite_server,
            "/v1/login",
            wrong,
            address=ATTACKER_ADDRESS,
            forwarded_for="203.0.113.7",
        )
    )
    assert statuses[-1] == 429, statuses
    assert post(invite_server, "/v1/login", right, forwarded_for="203.0.113.7").status_code == 200


# --------------------------------------------------------------------------- signups


def test_a_signup_flood_from_one_client_is_rate_limited(open_server: ServeProcess) -> None:
    flood = "127.0.0.4"
    statuses = [
        post(
            open_server,
            "/v1/signup",
            {"username": name("flood"), "password": PASSWORD},
            address=flood,
        ).status_code
        for _ in range(5)
    ]
    assert statuses[:3] == [201, 201, 201], statuses
    assert statuses[3:] == [429, 429], statuses
    refused = post(
        open_server,
        "/v1/signup",
        {"username": name("flood"), "password": PASSWORD},
        address=flood,
    )
    assert_throttled(refused)
    sign_up(open_server, "127.0.0.5", "other")  # another client signs up fine


def _invite(server: ServeProcess, *extra: str) -> str:
    """A new invite code, made by ``cape admin invite create`` (plain output: the code)."""
    return _invites(server, *extra)[0]


def _invites(server: ServeProcess, *extra: str) -> tuple[str, str]:
    """(code, id) of a new invite, from ``cape admin invite create -o json``."""
    result = ok(
        cape(
            server.config_dir,
            "admin",
            "invite",
            "create",
            "--data-dir",
            str(server.data_dir),
            "-o",
            "json",
            *extra,
        )
    )
    created = result.json()
    ((code,), (invite,)) = created["codes"], created["invites"]
    return code, invite["id"]


def test_invite_signup_accepts_valid_unused_unexpired_codes_once(
    invite_server: ServeProcess, tmp_path: Path
) -> None:
    data = ["--data-dir", str(invite_server.data_dir)]
    config = new_config(invite_server, tmp_path / "cli")
    body = {"username": name("nocode"), "password": PASSWORD}
    refused = post(invite_server, "/v1/signup", body, address="127.0.0.6")
    assert refused.status_code == 403 and "invitation only" in refused.json()["error"]
    bad = post(invite_server, "/v1/signup", {**body, "invite": "guessed"}, address="127.0.0.6")
    assert (bad.status_code, bad.json()) == (
        403,
        {"error": "invalid invite code: it is unknown, used, expired or revoked"},
    )

    # A code works through the real CLI, once.
    made = ok(cape(config, "admin", "invite", "create", *data, "--note", "for the e2e test"))
    (code,) = made.stdout.split()
    assert "works once" in made.stderr
    first = name("invited")
    ok(
        cape(
            config,
            "signup",
            "-u",
            first,
            "--password-stdin",
            "--invite",
            code,
            stdin=PASSWORD + "\n",
        )
    )
    again = cape(
        config,
        "signup",
        "-u",
        name("again"),
        "--password-stdin",
        "--invite",
        code,
        stdin=PASSWORD + "\n",
    )
    error(again, "invalid invite code", "403")

    # A revoked code and an expired one are refused the same way.
    revoked, revoked_id = _invites(invite_server)
    expiring = _invite(invite_server, "--expires-in", "1s")
    expired_by = time.monotonic() + 1.5  # past the 1 s invite's expiry, counted from here
    listed = ok(cape(config, "admin", "invite", "list", *data, "-o", "json")).json()["invites"]
    states = {item["id"]: item["state"] for item in listed}
    assert states[revoked_id] == "unused"
    assert [item["state"] for item in listed if item["used_by"] == first] == ["used"]
    assert all("code" not in item for item in listed)
    assert first in ok(cape(config, "admin", "invite", "list", *data)).stdout
    ok(cape(config, "admin", "invite", "revoke", revoked_id, *data))
    error(cape(config, "admin", "invite", "revoke", revoked_id, *data), "no invite")
    time.sleep(max(0.0, expired_by - time.monotonic()))  # the CLI calls above took most of it
    for stale in (revoked, expiring):
        response = post(invite_server, "/v1/signup", {**body, "invite": stale}, address="127.0.0.6")
        assert response.status_code == 403, response.text
    logs = invite_server.stderr() + invite_server.stdout()
    assert not any(secret in logs for secret in (code, revoked, expiring))


def test_admin_invite_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    error(
        cape(config, "admin", "invite", "list", "--data-dir", str(tmp_path / "none")),
        "not a Cape data directory",
    )
    error(
        cape(
            config, "admin", "invite", "create", "--data-dir", str(tmp_path), "--expires-in", "soon"
        ),
        "--expires-in",
        code=2,
    )


def test_closed_signup_refuses_and_existing_accounts_still_log_in(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("closed")
    server = _start(base)
    try:
        user = sign_up(server, VICTIM_ADDRESS, "early")
    finally:
        assert server.stop() == 0
    server = _start(base, "--signup", "closed")
    try:
        refused = post(server, "/v1/signup", {"username": name("late"), "password": PASSWORD})
        assert refused.status_code == 403
        assert refused.json() == {
            "error": "signups are closed on this server: ask its operator for an account"
        }
        response = post(server, "/v1/login", {"username": user.username, "password": PASSWORD})
        assert response.status_code == 200
        assert "Signup:            closed" in server.stdout()
    finally:
        assert server.stop() == 0


# --------------------------------------------------------------------------- existence


async def _upgrade_refusal(server: ServeProcess, path: str, token: str) -> tuple[int, bytes]:
    context: ssl.SSLContext = server.ssl_context()
    try:
        connection = await websockets.connect(
            ws_url(server.url, path),
            subprotocols=[SUBPROTOCOL, token],  # type: ignore[list-item]
            ssl=context,
            open_timeout=60,
        )
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, bytes(exc.response.body or b"")
    await connection.close()
    raise AssertionError(f"{path} was not refused")


def test_other_users_private_functions_look_missing_on_every_route(
    open_server: ServeProcess,
) -> None:
    owner = sign_up(open_server, "127.0.0.7", "owner")
    other = sign_up(open_server, "127.0.0.8", "other")
    private = run(owner.deploy(ECHO_APP, "secret"))
    missing_id = "A" * 22

    def rest(method: str, function_id: str) -> tuple[int, Any, dict[str, str]]:
        with client(open_server, "127.0.0.8") as http:
            response = http.request(
                method,
                f"/v1/functions/{function_id}",
                headers={"Authorization": f"Bearer {other.token}"},
            )
        headers = {k: v for k, v in response.headers.items() if k.lower() != "date"}
        return response.status_code, response.json(), headers

    for method in ("GET", "DELETE"):
        hidden, absent = rest(method, private.id), rest(method, missing_id)
        assert hidden == absent, method
        assert hidden[0] == 404
    for hidden_path, absent_path in (
        (f"/v1/run/{private.id}", f"/v1/run/{missing_id}"),
        (f"/v1/run/{owner.username}/secret", f"/v1/run/{owner.username}/nothing"),
        (f"/v1/run/{owner.username}/secret", f"/v1/run/{name('ghost')}/secret"),
    ):
        hidden_answer = run(_upgrade_refusal(open_server, hidden_path, other.token))
        absent_answer = run(_upgrade_refusal(open_server, absent_path, other.token))
        assert hidden_answer == absent_answer, hidden_path
        assert hidden_answer[0] == 404
    # The owner still sees and runs it; the function was never touched.
    assert run(owner.run(private.id, b"still mine")) == b"still mine"


# --------------------------------------------------------------------------- password hashing

FLOOD_THREADS = 12
HASH_NICE = 10


def _nice_values(pid: int) -> set[int]:
    """The nice values of every thread of process ``pid`` (``/proc/PID/task/*/stat``)."""
    values = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        values.add(int(fields[16]))  # field 19, "nice"
    return values


def test_a_login_flood_is_refused_beyond_the_hash_gate_and_runs_go_on(
    tmp_path: Path,
) -> None:
    """A tenant floods logins to its own account with the right password (nothing throttles
    those: each costs a full argon2 hash). With one hash at a time and one waiting, the
    rest are refused at once with 503 and Retry-After; the hashing threads run at a lower
    priority; and the victim's token-authenticated run succeeds during the flood."""
    server = _start(
        tmp_path, *("--limit", "password_hashes=1"), *("--limit", "password_hash_queue=1")
    )
    try:
        victim = sign_up(server, VICTIM_ADDRESS, "victim")
        function = run(victim.deploy(ECHO_APP, name="echo")).id
        attacker = sign_up(server, ATTACKER_ADDRESS, "flood")
        statuses: list[int] = []
        refusals: list[httpx.Response] = []
        lock = threading.Lock()
        stop = threading.Event()
        refused = threading.Event()
        barrier = threading.Barrier(FLOOD_THREADS)

        def flood() -> None:
            with client(server, ATTACKER_ADDRESS) as http:
                barrier.wait(timeout=60)
                while not stop.is_set():
                    body = {"username": attacker.username, "password": PASSWORD}
                    response = http.post("/v1/login", json=body)
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 503:
                            refusals.append(response)
                            refused.set()

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(FLOOD_THREADS)]
        for thread in threads:
            thread.start()
        try:
            # Event-driven: the gate has refused someone, so the flood is at its bound.
            assert refused.wait(timeout=120), f"no refusal among {len(statuses)}: {statuses}"
            assert server.process is not None
            niced = _nice_values(server.process.pid)
            assert run(victim.run(function, b"still served")) == b"still served"
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        counts = {status: statuses.count(status) for status in set(statuses)}
        assert set(counts) <= {200, 503}, counts
        assert counts.get(200, 0) >= 1, counts  # hashing goes on, within the bound
        for response in refusals:
            assert int(response.headers["retry-after"]) >= 1
            assert "try again later" in response.json()["error"]
        assert HASH_NICE in niced, niced  # the hashing threads yield the CPU
        # The victim (and the attacker) can log in once the flood is over.
        again = post(
            server,
            "/v1/login",
            {"username": victim.username, "password": PASSWORD},
            address=VICTIM_ADDRESS,
        )
        assert again.status_code == 200, again.text
    finally:
        assert server.stop() == 0, server.stderr()[-3000:]

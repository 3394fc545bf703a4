"""The folders under examples/ deploy and run against a live `cape serve`, as their READMEs say.

Every example is deployed as it is in the repository (through the SDK, `Cape.deploy`) and run
with a plain input and with a `cape:` input (decrypted by the enclave before the handler runs).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from cape import serdio
from cape.errors import FunctionError
from cape.sdk.client import Cape, Deployed
from tests.e2e.server import ServeProcess, User, use_wheelhouse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NAMES = ("echo", "isprime", "mean", "encrypt-helper", "sentiment")

Deploy = Callable[[str], Deployed]

# (input, expected): squares of primes, Carmichael numbers, strong pseudoprimes to many bases,
# the edges of the deterministic range, Mersenne primes and their products.
PRIMALITY = [
    ("-7", "false"),
    ("0", "false"),
    ("1", "false"),
    ("2", "true"),
    ("3", "true"),
    ("4", "false"),
    ("9", "false"),
    ("25", "false"),
    ("49", "false"),
    ("97", "true"),
    ("121", "false"),
    ("561", "false"),  # Carmichael
    ("1009", "true"),
    ("1018081", "false"),  # 1009**2
    ("10403", "false"),  # 101 * 103
    ("7919", "true"),
    ("3215031751", "false"),  # strong pseudoprime to bases 2, 3, 5, 7
    ("3825123056546413051", "false"),  # strong pseudoprime to bases 2 to 23
    ("318665857834031151167461", "false"),  # strong pseudoprime to bases 2 to 37
    ("3317044064679887385961981", "false"),  # ... to bases 2 to 41: the deterministic bound
    (str(2**61 - 1), "true"),
    (str((2**61 - 1) ** 2), "false"),  # a square above the bound (Baillie-PSW path)
    (str((2**61 - 1) * (2**89 - 1)), "false"),
    (str(2**127 - 1), "true"),
    (str(2**521 - 1), "true"),
    (" +1009\n", "true"),
]

POSITIVE = [
    "What a wonderful day, I loved every minute of it!",
    "The staff were friendly and the room was beautiful.",
    "An excellent, delightful film that I would happily recommend.",
    "This is a great phone with an amazing camera.",
]
NEGATIVE = [
    "Absolutely terrible service, the worst meal I have ever had.",
    "The hotel was dirty, noisy and the staff were rude.",
    "A boring, awful film; I hated it.",
    "The product broke after a day and support was useless.",
]
SENTIMENT = re.compile(r"(\d{1,3}\.\d{2})% (positive|negative)")


def _client(server: ServeProcess, **kwargs: object) -> Cape:
    return Cape(
        server.url,
        ca_file=server.ca_file,
        attestation_root=server.data_dir / "attestation" / "root.pem",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def client(server: ServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cape]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPE_CONFIG_DIR", str(tmp_path_factory.mktemp("examples") / "config"))
        for name in ("CAPE_ENCLAVE_HOST", "CAPE_URL", "CAPE_CA_FILE", "CAPE_TOKEN"):
            patch.delenv(name, raising=False)
        patch.delenv("CAPE_ATTESTATION_ROOT", raising=False)
        cape = _client(server)
        cape.signup(f"examples{os.urandom(4).hex()}", "correct horse battery")
        with cape:
            yield cape


@pytest.fixture(scope="module")
def deploy(client: Cape) -> Deploy:
    """Deploys an example folder once per module (echo serves two tests)."""
    done: dict[str, Deployed] = {}

    def deploy(name: str) -> Deployed:
        if name not in done:
            done[name] = client.deploy(EXAMPLES / name)
        return done[name]

    return deploy


def _load(example: str) -> ModuleType:
    """An example's app.py imported here (its folder first on sys.path, no bytecode written)."""
    folder = str(EXAMPLES / example)
    spec = importlib.util.spec_from_file_location(f"example_{example}", f"{folder}/app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "dont_write_bytecode", True)
        patch.syspath_prepend(folder)
        spec.loader.exec_module(module)
    return module


def test_every_example_has_a_readme_showing_deploy_and_run() -> None:
    for name in NAMES:
        readme = (EXAMPLES / name / "README.md").read_text()
        assert f"cape deploy examples/{name}" in readme, name
        assert "cape run" in readme or "cape.run" in readme, name
        assert (EXAMPLES / name / "app.py").is_file(), name


def test_echo(client: Cape, deploy: Deploy) -> None:
    fn = deploy("echo")
    assert fn.name is not None and fn.name.endswith("/echo")
    every_byte = bytes(range(256))
    with client:
        client.connect(fn.id)
        assert client.invoke(b"hello, enclave") == b"hello, enclave"
        assert client.invoke(every_byte) == every_byte
        assert client.invoke(b"") == b""
        assert client.invoke(client.encrypt(b"only the enclave")) == b"only the enclave"
        assert client.invoke(client.encrypt(every_byte)) == every_byte


def test_isprime_locally_agrees_with_trial_division() -> None:
    app = _load("isprime")

    def trial(n: int) -> bool:
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert [n for n in range(-20, 20_000) if app.is_prime(n) != trial(n)] == []
    for text, expected in PRIMALITY:
        assert app.cape_handler(text.encode()) == expected, text


def test_isprime(client: Cape, deploy: Deploy) -> None:
    fn = deploy("isprime")
    with client:
        client.connect(fn.id)
        got = {text: client.invoke(text.encode()).decode() for text, _ in PRIMALITY}
        assert got == dict(PRIMALITY)
        assert client.invoke(client.encrypt(b"7919")) == b"true"
        assert client.invoke(client.encrypt(b"1018081")) == b"false"
        for bad, reason in [
            (b"twelve", "not 'twelve'"),
            (b"12.5", "not '12.5'"),
            (b"", "not ''"),
            (b"\xff\xfe", "not binary data"),
            (b"9" * 1001, "at most 1000 digits, not 1001"),
        ]:
            expected = rf"ValueError: isprime takes .*{re.escape(reason)}"
            with pytest.raises(FunctionError, match=expected):
                client.invoke(bad)
        # A function error keeps the session: the next call still works.
        assert client.invoke(b"2") == b"true"


def test_mean_ships_an_up_to_date_serdio() -> None:
    copy = (EXAMPLES / "mean" / "cape_serdio.py").read_bytes()
    assert copy == Path(serdio.__file__).read_bytes(), (
        "examples/mean/cape_serdio.py is stale: cp src/cape/serdio.py examples/mean/cape_serdio.py"
    )
    assert (EXAMPLES / "mean" / "requirements.txt").read_text().split() == ["msgpack>=1.0"]


def test_mean(client: Cape, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_wheelhouse(monkeypatch, tmp_path / "cache", "msgpack")
    fn = client.deploy(EXAMPLES / "mean")
    assert any(name.lower().startswith("msgpack") for name in fn.vendored)

    assert client.run(fn.id, None, [1.0, 2.0, 4.5], use_serdio=True) == 2.5
    with client:
        client.connect(fn.id)
        assert client.invoke([7], use_serdio=True) == 7.0
        assert client.invoke([0.1] * 10, use_serdio=True) == 0.1  # fsum: exact, then divided
        # Encrypted: the serdio bytes sealed with `cape encrypt`, sent as raw bytes.
        sealed = client.encrypt(serdio.serialize([10.0, 20.0]))
        assert sealed.startswith(b"cape:")
        assert serdio.deserialize(client.invoke(sealed)) == 15.0
        with pytest.raises(FunctionError, match="ValueError: mean of an empty list"):
            client.invoke([], use_serdio=True)
        with pytest.raises(FunctionError, match=r"TypeError: .*'a' is not a number"):
            client.invoke([1.0, "a"], use_serdio=True)
        with pytest.raises(FunctionError, match="declares 1 parameter"):
            client.invoke(1.0, 2.0, use_serdio=True)


def test_encrypt_helper_seals_for_the_owner(
    server: ServeProcess,
    client: Cape,
    deploy: Deploy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    helper, echo = deploy("encrypt-helper"), deploy("echo")
    value = b"meet at noon"
    sealed = client.run(helper.id, None, value)
    assert sealed.startswith(b"cape:") and value not in sealed
    assert client.run(echo.id, None, sealed) == value  # the owner's echo opens it
    assert client.run(echo.id, None, sealed + b"\n") == value  # as `cape run -f file` sends it

    # A `cape:` input reaches the handler decrypted: sealing it again gives a fresh ciphertext.
    resealed = client.run(helper.id, None, client.encrypt(value))
    assert resealed.startswith(b"cape:") and resealed != sealed
    assert client.run(echo.id, None, resealed) == value
    binary = bytes(range(256)) * 4
    assert client.run(echo.id, None, client.run(helper.id, None, binary)) == binary

    # Another user's function cannot open it (its enclave decrypts with that user's key).
    monkeypatch.setenv("CAPE_CONFIG_DIR", str(tmp_path / "other"))
    other = _client(server, token=User.signup(server, "other").token)
    their_echo = other.deploy(EXAMPLES / "echo")
    assert other.run(their_echo.id, None, b"theirs") == b"theirs"
    with pytest.raises(FunctionError, match="decryption failed: wrong key"):
        other.run(their_echo.id, None, sealed)


def test_sentiment_training_reproduces_the_committed_model(tmp_path: Path) -> None:
    folder = EXAMPLES / "sentiment"
    output = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, "-B", str(folder / "train.py"), "--output", str(output)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert output.read_bytes() == (folder / "model.json").read_bytes()
    found = re.search(r"held-out accuracy: (\d+)/(\d+) = ([\d.]+%)", result.stdout)
    assert found is not None, result.stdout
    right, total, percent = found.groups()
    readme = (folder / "README.md").read_text()
    assert f"{right}/{total} = {percent}" in readme  # the README quotes the current figure
    assert f"**{percent} of the {total} held-out sentences**" in readme
    corpus = (folder / "corpus.tsv").read_text().splitlines()[1:]
    labels = [line.split("\t")[0] for line in corpus]
    assert len(corpus) >= 300 and labels.count("positive") == labels.count("negative")


def test_sentiment(client: Cape, deploy: Deploy) -> None:
    corpus = (EXAMPLES / "sentiment" / "corpus.tsv").read_text()
    for sentence in POSITIVE + NEGATIVE:
        assert sentence not in corpus
    fn = deploy("sentiment")
    with client:
        client.connect(fn.id)
        for sentences, label in ((POSITIVE, "positive"), (NEGATIVE, "negative")):
            for sentence in sentences:
                output = client.invoke(sentence.encode()).decode()
                found = SENTIMENT.fullmatch(output)
                assert found is not None, output
                assert found[2] == label, (sentence, output)
                assert 50.0 <= float(found[1]) <= 100.0
                sealed = client.encrypt(sentence.encode())
                assert client.invoke(sealed).decode() == output, sentence
        with pytest.raises(FunctionError, match="ValueError: sentiment takes some English text"):
            client.invoke(b"   ")
        with pytest.raises(FunctionError, match=r"ValueError: .*not binary data"):
            client.invoke(b"\xff\xfe")

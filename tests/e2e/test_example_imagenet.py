"""examples/imagenet against a live `cape serve`: a pretrained ImageNet model on real photos.

The function is deployed as a user would, once through the SDK and once through the CLI
(`cape deploy examples/imagenet`, a path relative to the checkout), its requirements (onnxruntime,
numpy, Pillow) vendored from the local `.wheelhouse` and its `model.onnx` exported by
`bash scripts/setup.sh test` (in `.venv-export`, with PyTorch). Every sample photo goes through
plain and `cape encrypt`ed; the photo's bytes are the input, decoded in the enclave.

The model itself is checked against PyTorch by running the export environment: onnxruntime's
top-5 on each photo equals the PyTorch model's, and so does the enclave's.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cape.errors import FunctionError
from cape.sdk.client import Cape, Deployed
from tests.e2e.cli import cape, error, new_config, ok
from tests.e2e.server import ServeProcess, use_wheelhouse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "imagenet"
MODEL = EXAMPLE / "model.onnx"
EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
PROVENANCE = json.loads((EXAMPLE / "provenance.json").read_text())
PHOTOS: dict[str, list[str]] = {
    name: facts["expected"] for name, facts in PROVENANCE["photos"]["files"].items()
}
NOT_A_PICTURE = b"GIF89a? no, just some bytes that no decoder takes"


def _built(what: str, present: bool) -> None:
    """Skip without the exported model (fail under CI, where its absence is a setup bug)."""
    if present:
        return
    message = f"no {what} (bash scripts/setup.sh test exports it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"imagenet_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _top5(output: bytes | str) -> list[dict[str, Any]]:
    result = json.loads(output)
    assert list(result) == ["top5"], result
    top: list[dict[str, Any]] = result["top5"]
    assert len(top) == 5 and len({entry["index"] for entry in top}) == 5, top
    for entry in top:
        assert set(entry) == {"class", "index", "probability"}, entry
        assert isinstance(entry["class"], str) and entry["class"], entry
        assert isinstance(entry["index"], int) and 0 <= entry["index"] < 1000, entry
        assert isinstance(entry["probability"], float) and 0.0 <= entry["probability"] <= 1.0
        assert round(entry["probability"], 4) == entry["probability"]
    probabilities = [entry["probability"] for entry in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0001
    return top


def _expected(photo: str, top: list[dict[str, Any]]) -> None:
    assert top[0]["class"] in PHOTOS[photo], (photo, top)


# --------------------------------------------------------------------------- provenance


def test_photos_match_their_provenance() -> None:
    import hashlib

    assert set(PHOTOS) == {p.name for p in (EXAMPLE / "images").iterdir()}
    for name, facts in PROVENANCE["photos"]["files"].items():
        data = (EXAMPLE / "images" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == facts["sha256"], name
        assert facts["licence"] and facts["expected"], name
    weights = PROVENANCE["model"]["weights"]
    assert weights["licence"].startswith("Apache-2.0")
    # torch.hub names a weights file after the first 8 hex digits of its SHA-256.
    assert weights["file"].endswith(f"-{weights['sha256'][:8]}.pth")


# --------------------------------------------------------------------------- preprocessing


needs_numpy_pillow = pytest.mark.skipif(
    importlib.util.find_spec("numpy") is None or importlib.util.find_spec("PIL") is None,
    reason="numpy and Pillow: pip install -e '.[examples]'",
)


def _png(image: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@needs_numpy_pillow
def test_preprocess_gives_the_model_input_for_any_picture() -> None:
    import numpy as np  # type: ignore[import-not-found,unused-ignore]
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    preprocess = _module("preprocess")
    for photo in PHOTOS:  # RGB PNG, RGB JPEG and grayscale PNG
        batch = preprocess.prepare((EXAMPLE / "images" / photo).read_bytes())
        assert batch.shape == (1, 3, 224, 224) and batch.dtype == np.float32, photo
        assert batch.flags["C_CONTIGUOUS"] and -1.0 <= batch.min() < batch.max() <= 1.0
    # Gray is the same picture in all three channels; pure white is (255 - 127) / 128 = 1.0.
    gray = preprocess.prepare((EXAMPLE / "images" / "camera.png").read_bytes())
    assert np.array_equal(gray[0, 0], gray[0, 1]) and np.array_equal(gray[0, 1], gray[0, 2])
    white = preprocess.prepare(_png(Image.new("RGB", (10, 30), "white")))
    assert white.shape == (1, 3, 224, 224) and np.all(white == 1.0)  # tiny pictures are upscaled
    # Transparency is flattened onto white; the centre crop keeps the middle of a wide picture.
    clear = preprocess.prepare(_png(Image.new("RGBA", (300, 300), (0, 0, 0, 0))))
    assert np.all(clear == 1.0)
    wide = Image.new("RGB", (1024, 256), "black")
    wide.paste(Image.new("RGB", (256, 256), "white"), (384, 0))
    assert np.all(preprocess.prepare(_png(wide)) == 1.0)
    # A picture stored sideways (EXIF orientation 6) is turned upright first.
    tall = Image.new("RGB", (256, 512), "black")
    tall.paste(Image.new("RGB", (256, 256), "white"), (0, 0))
    upright = preprocess.prepare(_png(tall))
    sideways = tall.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    sideways.save(buffer, format="PNG", exif=exif)
    assert np.array_equal(preprocess.prepare(buffer.getvalue()), upright)


@needs_numpy_pillow
def test_preprocess_refuses_what_is_not_a_picture() -> None:
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    preprocess = _module("preprocess")
    chelsea = (EXAMPLE / "images" / "chelsea.png").read_bytes()
    cases = {
        b"": "empty",
        NOT_A_PICTURE: "not a picture Pillow can read",
        chelsea[: len(chelsea) // 3]: "could not be decoded",
        # 81 megapixels that compress to a few kB: refused before decoding.
        _png(Image.new("1", (9000, 9000))): "at most 64,000,000 pixels",
    }
    for data, message in cases.items():
        with pytest.raises(ValueError, match=message):
            preprocess.prepare(data)


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def pytorch_check() -> dict[str, Any]:
    """``export_model.py --check --json`` in the export environment (PyTorch + onnxruntime)."""
    _built("export environment .venv-export", EXPORT_PYTHON.exists())
    _built(str(MODEL.relative_to(ROOT)), MODEL.exists())
    done = subprocess.run(
        [str(EXPORT_PYTHON), "-W", "ignore", str(EXAMPLE / "export_model.py"), "--check", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    start = done.stdout.index("{")  # efficientnet-lite-pytorch prints a line of its own first
    result: dict[str, Any] = json.loads(done.stdout[start:])
    return result


def test_onnx_top5_equals_pytorch_top5(pytorch_check: dict[str, Any]) -> None:
    assert pytorch_check["classes_match"]
    assert set(pytorch_check["photos"]) == set(PHOTOS)
    for photo, row in pytorch_check["photos"].items():
        assert row["onnx"] == row["torch"], photo
        assert row["largest_difference"] < 1e-4, photo
    # The committed photos are scikit-image's own files, byte for byte.
    for photo, check in pytorch_check["photo_checks"].items():
        assert check == {"sha256_matches": True, "equals_package_file": True}, photo


# --------------------------------------------------------------------------- live enclave


@pytest.fixture(scope="module")
def setup(
    server: ServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cape, Deployed, Path]]:
    """One user; the example deployed through the SDK. Yields the client, the function and the
    user's config directory (shared with the CLI)."""
    _built(str(MODEL.relative_to(ROOT)), MODEL.exists())
    base = tmp_path_factory.mktemp("imagenet")
    config = new_config(server, base / "config")
    with pytest.MonkeyPatch.context() as patch:
        use_wheelhouse(patch, base / "cache", "pillow")
        use_wheelhouse(patch, base / "cache", "onnxruntime")
        patch.setenv("CAPE_CONFIG_DIR", str(config))
        for name in ("CAPE_ENCLAVE_HOST", "CAPE_URL", "CAPE_CA_FILE", "CAPE_TOKEN"):
            patch.delenv(name, raising=False)
        patch.chdir(ROOT)  # as in the README: a path relative to the checkout
        client = Cape(
            server.url,
            ca_file=server.ca_file,
            attestation_root=server.data_dir / "attestation" / "root.pem",
        )
        client.signup(f"imagenet{os.urandom(4).hex()}", "correct horse battery")
        started = time.monotonic()
        function = client.deploy("examples/imagenet", name="imagenet")
        print(f"deployed in {time.monotonic() - started:.1f} s: {function.vendored}")
        yield client, function, config


def test_photos_classified_through_the_sdk(
    setup: tuple[Cape, Deployed, Path], pytorch_check: dict[str, Any]
) -> None:
    client, function, _ = setup
    assert {v.split("==")[0].lower() for v in function.vendored} >= {
        "onnxruntime",
        "numpy",
        "pillow",
    }
    plain: dict[str, list[dict[str, Any]]] = {}
    # Plain: one session for every photo (the model loaded once).
    with client:
        client.connect(function.function_ref)
        for photo in PHOTOS:
            plain[photo] = _top5(client.invoke((EXAMPLE / "images" / photo).read_bytes()))
    # Encrypted for the user's key: one session (a fresh sandbox) per photo.
    for photo in PHOTOS:
        ciphertext = client.encrypt((EXAMPLE / "images" / photo).read_bytes())
        assert ciphertext.startswith(b"cape:")
        top = _top5(client.run(function.id, None, ciphertext))
        assert top == plain[photo], photo
        _expected(photo, top)
        # The enclave (Pillow and onnxruntime vendored) ranks as PyTorch does in its own process.
        assert [entry["index"] for entry in top] == pytorch_check["photos"][photo]["torch"], photo
        assert client.aio.last_attestation is not None
        assert client.aio.last_attestation.function_checksum == function.checksum


def test_photos_classified_through_the_cli(setup: tuple[Cape, Deployed, Path]) -> None:
    """`cape run` and `cape encrypt`, as the user whose token the SDK saved in ``config``. (The
    same folder deployed through `cape deploy` is tests/e2e/test_demo.py's job: a second
    68 MB bundle here would add half a minute.)"""
    _, function, config = setup
    name = function.name
    assert name.endswith("/imagenet")
    for photo in PHOTOS:
        path = f"examples/imagenet/images/{photo}"
        plain = _top5(ok(cape(config, "run", name, "-f", path)).stdout)
        _expected(photo, plain)
        ciphertext = ok(cape(config, "encrypt", "-f", path)).stdout_bytes
        assert ciphertext.startswith(b"cape:")
        result = ok(cape(config, "run", name, "-f", "-", "-o", "json", stdin=ciphertext)).json()
        assert _top5(result["output"]) == plain, photo
        assert result["attestation"]["function_checksum"] == function.checksum


def test_undecodable_image_is_the_functions_error(setup: tuple[Cape, Deployed, Path]) -> None:
    client, function, config = setup
    with pytest.raises(FunctionError, match="ValueError: the input is not a picture Pillow can"):
        client.run(function.id, None, client.encrypt(NOT_A_PICTURE))
    chelsea = (EXAMPLE / "images" / "chelsea.png").read_bytes()
    with pytest.raises(FunctionError, match="ValueError: the picture could not be decoded"):
        client.run(function.id, None, chelsea[:5000])
    (config.parent / "notes.txt").write_bytes(NOT_A_PICTURE)
    error(
        cape(config, "run", function.id, "-f", str(config.parent / "notes.txt")),
        "not a picture Pillow can read",
    )


def test_run_prediction_script(setup: tuple[Cape, Deployed, Path]) -> None:
    """The README's SDK version of the demo, as a user runs it (the CLI's settings)."""
    _, function, config = setup
    script = str(EXAMPLE / "run_prediction.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPE_")}
    env["CAPE_CONFIG_DIR"] = str(config)
    done = subprocess.run(
        [sys.executable, script, function.name, str(EXAMPLE / "images" / "coffee.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and lines[0].split(": ")[0] in PHOTOS["coffee.png"], done.stdout
    assert re.fullmatch(r"verified: root sha256:[0-9a-f]{64}", lines[5]), done.stdout
    assert lines[7].endswith(f"function checksum {function.checksum}"), done.stdout
    missing = subprocess.run(
        [sys.executable, script, function.name, str(config / "no-such-photo.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert missing.returncode == 1 and missing.stdout == "", missing.stderr
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1

"""examples/image-classification against a live `cape serve`: onnxruntime inside the sandbox.

The function is deployed as a user would (`cape deploy examples/image-classification`, a path
relative to the checkout), its requirements vendored from the local `.wheelhouse` that
`bash scripts/setup.sh test` fills. Every sample picture goes through plain and through `cape:`
encrypted input. The pictures are turned into the model's input here with the standard library
alone, so that the end-to-end test needs neither numpy nor Pillow on the client; prepare.py (which
does need them) is checked against that, and unit-tested, when they are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cape.errors import FunctionError
from cape.sdk.client import Cape, Deployed
from tests.e2e.server import ServeProcess, use_wheelhouse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "image-classification"
SAMPLES = sorted(EXAMPLE.glob("images/digit-*.png"))
INPUT_BYTES = 256


def _label(picture: Path) -> str:
    match = re.fullmatch(r"digit-(\d)\.png", picture.name)
    assert match, picture
    return match.group(1)


def _module(name: str) -> ModuleType:
    """One of the example's scripts, imported from its file (the folder name has a dash)."""
    spec = importlib.util.spec_from_file_location(f"image_classification_{name}", EXAMPLE / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# --------------------------------------------------------------------------- stdlib pictures


def _read_png(path: Path) -> list[list[int]]:
    """The gray levels of an 8-bit grayscale, non-interlaced PNG (what build_model.py writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    offset, idat, header = 8, b"", b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, color, interlace) == (8, 0, 0), f"{path}: not 8-bit gray, non-interlaced"
    raw = zlib.decompress(idat)
    rows: list[list[int]] = []
    previous = [0] * width
    for y in range(height):
        line = raw[y * (width + 1) : (y + 1) * (width + 1)]
        method, row = line[0], list(line[1:])
        for x in range(width):
            left = row[x - 1] if x else 0
            up, up_left = previous[x], previous[x - 1] if x else 0
            if method == 1:
                row[x] = (row[x] + left) & 0xFF
            elif method == 2:
                row[x] = (row[x] + up) & 0xFF
            elif method == 3:
                row[x] = (row[x] + (left + up) // 2) & 0xFF
            elif method == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                row[x] = (row[x] + guess) & 0xFF
            else:
                assert method == 0, f"{path}: PNG filter {method}"
        rows.append(row)
        previous = row
    return rows


def _model_input(path: Path) -> bytes:
    """prepare.py's result for a square picture of dark ink on white, without numpy/Pillow."""
    gray = _read_png(path)
    side = len(gray)
    assert side % 8 == 0 and all(len(row) == side for row in gray)
    block = side // 8
    values = []
    for by in range(8):
        for bx in range(8):
            cells = [
                gray[y][x]
                for y in range(by * block, (by + 1) * block)
                for x in range(bx * block, (bx + 1) * block)
            ]
            values.append((255 - sum(cells) / len(cells)) * 16 / 255)
    return struct.pack("<64f", *values)


# --------------------------------------------------------------------------- live enclave


@pytest.fixture(scope="module")
def deployed(
    server: ServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cape, Deployed]]:
    base = tmp_path_factory.mktemp("image-classification")
    with pytest.MonkeyPatch.context() as patch:
        use_wheelhouse(patch, base / "cache", "onnxruntime")
        patch.setenv("CAPE_CONFIG_DIR", str(base / "config"))
        for name in ("CAPE_ENCLAVE_HOST", "CAPE_URL", "CAPE_CA_FILE", "CAPE_TOKEN"):
            patch.delenv(name, raising=False)
        patch.chdir(ROOT)  # as in the README: a path relative to the checkout
        client = Cape(
            server.url,
            ca_file=server.ca_file,
            attestation_root=server.data_dir / "attestation" / "root.pem",
        )
        client.signup(f"images{os.urandom(4).hex()}", "correct horse battery")
        started = time.monotonic()
        function = client.deploy("examples/image-classification", name="image-classification")
        print(f"deployed in {time.monotonic() - started:.1f} s: {function.vendored}")
        yield client, function


def _top3(output: bytes) -> list[dict[str, Any]]:
    result = json.loads(output.decode("utf-8"))
    assert list(result) == ["top3"]
    top: list[dict[str, Any]] = result["top3"]
    return top


def test_samples_are_the_ten_digits() -> None:
    assert [_label(p) for p in SAMPLES] == [str(d) for d in range(10)]
    assert (EXAMPLE / "model.onnx").stat().st_size < 100_000


def test_samples_classified_in_the_enclave(deployed: tuple[Cape, Deployed]) -> None:
    client, function = deployed
    assert {v.split("==")[0].lower() for v in function.vendored} >= {"onnxruntime", "numpy"}
    show = _module("show.py")
    started = time.monotonic()
    # Encrypted: one session (and sandbox, importing onnxruntime cold) per input.
    for picture in SAMPLES:
        ciphertext = client.encrypt(_model_input(picture))
        assert ciphertext.startswith(b"cape:")
        top = _top3(client.run(function.id, None, ciphertext))
        assert top[0]["class"] == _label(picture), (picture.name, top)
    cold = (time.monotonic() - started) / len(SAMPLES)
    # Plain: one session for every input (the model loaded once).
    with client:
        client.connect(function.function_ref)
        for picture in SAMPLES:
            top = _top3(client.invoke(_model_input(picture)))
            assert len(top) == 3 and top[0]["class"] == _label(picture), (picture.name, top)
            probabilities = [entry["probability"] for entry in top]
            assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probabilities)
            assert probabilities == sorted(probabilities, reverse=True)
            assert all(round(p, 4) == p for p in probabilities)
            assert sum(probabilities) <= 1.0001
            assert len({entry["class"] for entry in top}) == 3
            assert show.lines({"top3": top})[0].startswith(f"{_label(picture)}  ")
    print(f"{cold:.2f} s per run in a fresh session")


def test_bad_input_is_a_function_error(deployed: tuple[Cape, Deployed]) -> None:
    client, function = deployed
    with pytest.raises(FunctionError, match=r"ValueError: expected 256 bytes .* got 12"):
        client.run(function.id, None, b"not a digit!")
    nan = struct.pack("<64f", *([float("nan")] * 64))
    with pytest.raises(FunctionError, match="NaN or infinite"):
        client.run(function.id, None, client.encrypt(nan))


# --------------------------------------------------------------------------- client scripts


def test_show_prints_one_line_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    show = _module("show.py")
    result = {"top3": [{"class": "7", "probability": 0.9312}, {"class": "1", "probability": 0.05}]}
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert show.main([str(tmp_path / "result.json")]) == 0
    assert capsys.readouterr().out == "7  93.12%\n1  5.00%\n"
    (tmp_path / "error.txt").write_text("Error: the function failed")
    assert show.main([str(tmp_path / "error.txt")]) == 1
    assert capsys.readouterr().err.startswith("show.py: ")


needs_numpy_pillow = pytest.mark.skipif(
    not _have("numpy", "PIL"), reason="numpy and Pillow: pip install -e '.[examples]'"
)


@needs_numpy_pillow
def test_prepare_round_trips_sklearn_digits(tmp_path: Path) -> None:
    import numpy as np  # type: ignore[import-not-found,unused-ignore]
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    prepare = _module("prepare.py")
    rng = np.random.default_rng(7)
    # Like sklearn's digits: 0..16, with little ink at the border (at most 4.5 on average).
    digit = rng.integers(0, 17, size=(8, 8)).astype(np.float64)
    ring = np.ones((8, 8), dtype=bool)
    ring[1:-1, 1:-1] = False
    digit[ring] = rng.integers(0, 5, size=int(ring.sum()))
    # Dark ink on white, upscaled 8x like the samples: the round trip is exact to a gray level.
    gray = np.rint(255.0 * (1.0 - digit / 16.0)).astype(np.uint8)
    picture = Image.fromarray(gray).resize((64, 64), Image.Resampling.NEAREST)
    path = tmp_path / "digit.png"
    picture.save(path)
    data = prepare.prepare(path)
    assert len(data) == INPUT_BYTES
    back = np.frombuffer(data, dtype="<f4").reshape(8, 8)
    assert np.abs(back - digit).max() <= 8 / 255 + 1e-6
    # Light ink on black is recognised by its border, and gives the same input.
    Image.fromarray(255 - np.asarray(picture)).save(tmp_path / "inverted.png")
    inverted = np.frombuffer(prepare.prepare(tmp_path / "inverted.png"), "<f4").reshape(8, 8)
    assert np.allclose(inverted, back)
    # A transparent background counts as paper; padding keeps a wide picture's proportions.
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ink = Image.fromarray(255 - np.asarray(picture))
    rgba.paste(Image.new("RGBA", (64, 64), (0, 0, 0, 255)), mask=ink)
    rgba.save(tmp_path / "alpha.png")
    alpha = np.frombuffer(prepare.prepare(tmp_path / "alpha.png"), "<f4").reshape(8, 8)
    assert np.abs(alpha - digit).max() <= 8 / 255 + 1e-6
    wide = Image.new("L", (128, 64), 255)
    wide.paste(picture, (32, 0))
    wide.save(tmp_path / "wide.png")
    squeezed = np.frombuffer(prepare.prepare(tmp_path / "wide.png"), "<f4").reshape(8, 8).copy()
    halved = back.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # padded to 128x128: half the size
    assert np.allclose(squeezed[2:6, 2:6], halved, atol=1e-4)
    squeezed[2:6, 2:6] = 0.0
    assert not squeezed.any()  # the padding is paper


@needs_numpy_pillow
def test_prepare_matches_the_stdlib_reading_of_the_samples() -> None:
    import numpy as np  # type: ignore[import-not-found,unused-ignore]

    prepare = _module("prepare.py")
    for picture in SAMPLES:
        ours = np.frombuffer(prepare.prepare(picture), "<f4")
        assert np.allclose(ours, np.frombuffer(_model_input(picture), "<f4"), atol=1e-4)


@needs_numpy_pillow
def test_prepare_cli() -> None:
    script = str(EXAMPLE / "prepare.py")
    out = subprocess.run(
        [sys.executable, script, str(SAMPLES[7])], capture_output=True, check=True
    ).stdout
    assert out == _module("prepare.py").prepare(SAMPLES[7])
    bad = subprocess.run(
        [sys.executable, script, str(EXAMPLE / "app.py")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("prepare.py: ")


@pytest.mark.slow
@pytest.mark.skipif(
    not _have("sklearn", "skl2onnx", "onnx", "numpy", "PIL"),
    reason="rebuilding needs: pip install scikit-learn skl2onnx pillow",
)
def test_build_model_reproduces_the_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build = _module("build_model.py")
    assert build.main(["--out", str(tmp_path)]) == 0
    accuracy = re.search(r"held-out accuracy: (\d\.\d+)", capsys.readouterr().out)
    assert accuracy and float(accuracy.group(1)) >= 0.95
    for picture in SAMPLES:
        assert _read_png(tmp_path / "images" / picture.name) == _read_png(picture)
    assert 0 < (tmp_path / "model.onnx").stat().st_size < 100_000

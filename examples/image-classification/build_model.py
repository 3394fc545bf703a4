"""Train the digit classifier and export ``model.onnx`` plus the sample images.

No model can be downloaded where Cape is built, so the model is made here from data that ships
inside a PyPI package: scikit-learn's handwritten digits (1,797 images of 8x8 pixels, each
pixel the number of ink dots, 0..16, in a 4x4 block of a 32x32 scan). Everything is seeded,
so running this again gives the same split, the same weights and the same samples.

Build-time dependencies (not needed to deploy or run the example)::

    pip install scikit-learn skl2onnx

Usage: ``python build_model.py [--out DIR]`` (default: this folder). Writes ``DIR/model.onnx``
and ``DIR/images/digit-<label>.png``: for every class, the first held-out digit that the model
classifies correctly, upscaled to 64x64 grayscale, dark ink on a light background, as a
scanned or drawn digit looks. ``prepare.py`` turns such a picture back into the model's input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SEED = 20240611
TEST_SIZE = 0.25
HIDDEN_UNITS = 32
FEATURES = 64  # 8x8 pixels
MAX_INK = 16.0  # pixel values in the dataset run from 0 (paper) to 16 (all ink)
SAMPLE_SIZE = 64  # the sample pictures' width and height in pixels
INPUT_NAME = "input"
OPSET = {"": 17, "ai.onnx.ml": 3}  # onnxruntime has supported both for years


def train() -> tuple[Any, np.ndarray, np.ndarray, float]:
    """The fitted pipeline, the held-out images and labels, and its held-out accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target,
        test_size=TEST_SIZE,
        random_state=SEED,
        stratify=digits.target,
    )
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=1000, random_state=SEED),
    )
    model.fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    return model, x_test, y_test, accuracy


def export(model: Any) -> bytes:
    """The pipeline as ONNX: input ``float[N, 64]``, outputs ``label`` and ``probabilities``.

    ZipMap is disabled, so the probabilities are a plain ``float[N, 10]`` tensor whose columns
    follow the ``classes`` entry of the model's metadata.
    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onnx_model = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, FEATURES]))],
        options={"zipmap": False},
        target_opset=OPSET,
    )
    onnx_model.doc_string = "sklearn digits MLP, built by examples/image-classification"
    entry = onnx_model.metadata_props.add()
    entry.key = "classes"
    entry.value = ",".join(str(c) for c in model.classes_)
    data: bytes = onnx_model.SerializeToString()
    return data


def check_with_onnxruntime(data: bytes, model: Any, x_test: np.ndarray) -> None:
    """Compare onnxruntime's probabilities with scikit-learn's, when onnxruntime is here."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the export was not checked", file=sys.stderr)
        return
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    _, probabilities = session.run(None, {INPUT_NAME: x_test})
    difference = float(np.abs(probabilities - model.predict_proba(x_test)).max())
    if difference > 1e-4:
        raise SystemExit(f"onnxruntime disagrees with scikit-learn by {difference}")
    print(f"onnxruntime agrees with scikit-learn (largest difference {difference:.1e})")


def to_picture(features: np.ndarray) -> Image.Image:
    """A 64-value digit (0..16 ink) as a 64x64 grayscale picture, dark ink on white."""
    ink = features.reshape(8, 8).astype(np.float64) / MAX_INK
    gray = np.rint(255.0 * (1.0 - ink)).astype(np.uint8)
    return Image.fromarray(gray).resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.NEAREST)


def samples(model: Any, x_test: np.ndarray, y_test: np.ndarray) -> dict[int, np.ndarray]:
    """Per class, the first held-out digit the model gets right."""
    predicted = model.predict(x_test)
    chosen: dict[int, np.ndarray] = {}
    for features, label, guess in zip(x_test, y_test, predicted, strict=True):
        if label == guess and int(label) not in chosen:
            chosen[int(label)] = features
    return dict(sorted(chosen.items()))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder"
    )
    args = parser.parse_args(argv)
    out: Path = args.out

    model, x_test, y_test, accuracy = train()
    print(f"held-out accuracy: {accuracy:.4f} ({len(y_test)} digits, seed {SEED})")
    data = export(model)
    check_with_onnxruntime(data, model, x_test)

    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(data)
    print(f"wrote {_shown(out / 'model.onnx')} ({len(data)} bytes)")
    images = out / "images"
    images.mkdir(exist_ok=True)
    for label, features in samples(model, x_test, y_test).items():
        path = images / f"digit-{label}.png"
        to_picture(features).save(path, optimize=True)
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

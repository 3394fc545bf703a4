"""Turn a picture of a digit into the model's input: 64 little-endian float32 values (256 bytes).

Usage: ``python prepare.py IMAGE [-o FILE] [--ink auto|dark|light]`` writes the input to
stdout (or FILE), ready for ``cape encrypt -f -`` or ``cape run NAME -f -``.

The model learnt from scikit-learn's digits, made from 32x32 black-and-white scans by counting
the ink dots in each 4x4 block: 8x8 pixels from 0 (paper) to 16 (all ink). A picture is made
to look the same way: flattened onto white if it has transparency, made grayscale, padded to a
square with its background, shrunk to 8x8 by averaging (Pillow's box filter, the counterpart of
counting dots), and its ink scaled to 0..16. Dark ink on light paper, as in the sample images,
is the usual case; ``--ink auto`` (the default) looks at the picture's border to tell which it
is. Needs numpy and Pillow only (``pip install 'cape[examples]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

SIDE = 8  # the model sees 8x8 pixels
MAX_INK = 16.0
FEATURES = SIDE * SIDE
Ink = Literal["auto", "dark", "light"]


def grayscale(image: Image.Image) -> np.ndarray:
    """The picture as a float array of gray levels, 0 (black) to 255 (white)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float64)


def dark_ink(gray: np.ndarray) -> bool:
    """Whether the ink is darker than the paper, judged by the picture's border."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return bool(border.mean() >= 128.0)


def to_features(gray: np.ndarray, ink: Ink = "auto") -> np.ndarray:
    """Gray levels (0..255, any size) → the 64 float32 model inputs, 0 (paper) to 16 (ink)."""
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale picture, got shape {gray.shape}")
    dark = dark_ink(gray) if ink == "auto" else ink == "dark"
    amount = (255.0 - gray) if dark else gray  # 0 = paper, 255 = ink
    height, width = amount.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.float64)  # padding is paper
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = amount
    picture = Image.fromarray(square.astype(np.float32))  # mode "F"
    small = np.asarray(picture.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64)
    features = np.clip(small * (MAX_INK / 255.0), 0.0, MAX_INK)
    return features.reshape(FEATURES).astype(np.float32)


def encode(features: np.ndarray) -> bytes:
    """The model input's wire form: 64 little-endian float32 values."""
    if features.size != FEATURES:
        raise ValueError(f"expected {FEATURES} values, got {features.size}")
    data: bytes = features.astype("<f4").reshape(FEATURES).tobytes()
    return data


def prepare(path: Path, ink: Ink = "auto") -> bytes:
    with Image.open(path) as image:
        return encode(to_features(grayscale(image), ink))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a digit picture's model input (256 bytes) to stdout."
    )
    parser.add_argument("image", type=Path, help="a picture of one digit (PNG, JPEG, ...)")
    parser.add_argument("-o", "--output", type=Path, help="write to this file, not stdout")
    parser.add_argument(
        "--ink",
        choices=["auto", "dark", "light"],
        default="auto",
        help="dark ink on light paper, light on dark, or auto: judged by the border",
    )
    args = parser.parse_args(argv)
    try:
        data = prepare(args.image, args.ink)
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        print(f"prepare.py: {args.image}: {exc}", file=sys.stderr)
        return 1
    if args.output is not None:
        args.output.write_bytes(data)
    elif sys.stdout.isatty():
        print("prepare.py: the output is binary: pipe it or use -o FILE", file=sys.stderr)
        return 2
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A photo's bytes → EfficientNet-Lite0's input tensor (Pillow and numpy only).

Used inside the enclave by ``app.py``, and by ``export_model.py`` to feed the PyTorch model the
very same tensors when it checks the exported ONNX model, so there is one definition of it.

The steps are those of EfficientNet-Lite's own evaluation (TensorFlow's
``efficientnet/lite`` preprocessing): decode, turn upright (EXIF orientation), flatten any
transparency onto white, RGB, shorter side to 256 (bilinear, antialiased), centre crop
224x224, then ``(pixel - 127) / 128`` per channel, channels first: float32 ``[1, 3, 224, 224]``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 224
RESIZE = 256  # 224 / 0.875: the centre crop keeps 87.5% of the shorter side
MEAN = 127.0
STD = 128.0
#: Larger pictures are refused before decoding (a 40-megapixel RGB image is 120 MB decoded;
#: the sandbox allows 2 GiB of address space, and a phone photo is 12 to 50 megapixels).
MAX_PIXELS = 64_000_000


def decode(data: bytes) -> Image.Image:
    """The picture in ``data`` (any format Pillow reads: PNG, JPEG, GIF, WebP…), upright RGB."""
    if not data:
        raise ValueError("the input is empty; send the bytes of a PNG or JPEG photo")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"the picture is {width}x{height} pixels; at most {MAX_PIXELS:,} pixels"
                )
            image.load()
    except UnidentifiedImageError:
        raise ValueError(
            "the input is not a picture Pillow can read; send the bytes of a PNG or JPEG photo"
        ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError(f"the picture is too large: {exc}") from None
    except (OSError, SyntaxError, EOFError) as exc:  # truncated or corrupt image data
        raise ValueError(f"the picture could not be decoded: {exc}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def tensor(image: Image.Image) -> np.ndarray:
    """An RGB picture → float32 ``[1, 3, 224, 224]``, as EfficientNet-Lite was evaluated."""
    width, height = image.size
    scale = RESIZE / min(width, height)
    resized = image.resize(
        (max(SIZE, round(width * scale)), max(SIZE, round(height * scale))),
        Image.Resampling.BILINEAR,
    )
    left = (resized.width - SIZE) // 2
    top = (resized.height - SIZE) // 2
    crop = resized.crop((left, top, left + SIZE, top + SIZE))
    pixels = np.asarray(crop, dtype=np.float32)
    normalised = (pixels - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[np.newaxis])


def prepare(data: bytes) -> np.ndarray:
    """Photo bytes → the model's input."""
    return tensor(decode(data))

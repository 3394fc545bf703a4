"""Classify a photo with a pretrained ImageNet model (EfficientNet-Lite0), inside the enclave.

Input: the bytes of a photo (PNG, JPEG, or anything else Pillow reads), plain or ``cape encrypt``ed.
The picture is decoded, resized and normalised here, in the enclave (``preprocess.py``), so the
client sends the photo itself and nothing but the enclave ever sees it.

Output: UTF-8 JSON with the five likeliest of the 1,000 ImageNet classes and their softmax
probabilities, likeliest first::

    {"top5": [{"class": "tiger cat", "index": 282, "probability": 0.3831}, ...]}

``model.onnx`` (written by ``export_model.py``, which also stores the class names in it) is
loaded once, when the enclave imports this module at the start of a session; every call of the
session reuses it. Anything that is not a decodable picture raises ``ValueError`` with the
reason (a ``FunctionError`` for the caller).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from preprocess import prepare

# The function's folder (also the working directory the enclave gives the handler).
MODEL_PATH = Path(__file__).resolve().with_name("model.onnx")
TOP = 5


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread, no spinning: the sandbox allows 64 processes and threads in all, and
    # onnxruntime's default pool has a thread per CPU core (on a large host it would not fit,
    # and onnxruntime then hangs while loading). A session classifies one photo at a time.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


SESSION = _session(MODEL_PATH)
INPUT_NAME: str = SESSION.get_inputs()[0].name
OUTPUT_NAME: str = SESSION.get_outputs()[0].name
CLASSES: list[str] = json.loads(SESSION.get_modelmeta().custom_metadata_map["classes"])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = np.exp(shifted - shifted.max())
    return shifted / shifted.sum()


def classify(photo: bytes) -> list[dict[str, object]]:
    """The five likeliest classes of ``photo``, likeliest first."""
    (logits,) = SESSION.run([OUTPUT_NAME], {INPUT_NAME: prepare(photo)})
    probabilities = softmax(logits)
    order = np.argsort(-probabilities, kind="stable")[:TOP]
    return [
        {"class": CLASSES[i], "index": int(i), "probability": round(float(probabilities[i]), 4)}
        for i in order
    ]


def cape_handler(input: bytes) -> bytes:
    return json.dumps({"top5": classify(bytes(input))}).encode("utf-8")

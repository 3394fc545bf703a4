"""Classify a handwritten digit with an ONNX model, run by onnxruntime inside the enclave.

Input: the model's input, 64 little-endian float32 values (256 bytes): an 8x8 digit, row by
row, each pixel the amount of ink from 0 (paper) to 16 (all ink), as in scikit-learn's digits.
``prepare.py`` makes it from a picture. Output: UTF-8 JSON with the three likeliest classes,
``{"top3": [{"class": "7", "probability": 0.9312}, ...]}``, likeliest first.

``model.onnx`` (made by ``build_model.py``) is loaded once, when the enclave imports this
module at the start of a session; every call of the session reuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

# The function's folder (also the working directory the enclave gives the handler).
MODEL_PATH = Path(__file__).resolve().with_name("model.onnx")
FEATURES = 64
INPUT_BYTES = FEATURES * 4
TOP = 3


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread, no spinning: a session runs one small model on one input at a time, and the
    # sandbox bounds processes and threads (onnxruntime's default is a pool per CPU core).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


SESSION = _session(MODEL_PATH)
INPUT_NAME: str = SESSION.get_inputs()[0].name
_OUTPUTS = [output.name for output in SESSION.get_outputs()]
PROBABILITIES: str = "probabilities" if "probabilities" in _OUTPUTS else _OUTPUTS[-1]
_CLASSES = SESSION.get_modelmeta().custom_metadata_map.get("classes")
CLASSES: list[str] = _CLASSES.split(",") if _CLASSES else [str(i) for i in range(10)]


def cape_handler(input: bytes) -> bytes:
    if len(input) != INPUT_BYTES:
        raise ValueError(
            f"expected {INPUT_BYTES} bytes ({FEATURES} little-endian float32 pixel values "
            f"of an 8x8 digit, 0..16), got {len(input)}; make the input with prepare.py"
        )
    pixels = np.frombuffer(input, dtype="<f4").reshape(1, FEATURES)
    if not np.isfinite(pixels).all():
        raise ValueError("the input holds NaN or infinite pixel values")
    (probabilities,) = SESSION.run([PROBABILITIES], {INPUT_NAME: pixels.astype(np.float32)})
    row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    order = np.argsort(-row, kind="stable")[:TOP]
    top = [{"class": CLASSES[i], "probability": round(float(row[i]), 4)} for i in order]
    return json.dumps({"top3": top}).encode("utf-8")

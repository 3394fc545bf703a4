"""sentiment: is an English text positive or negative? Answers e.g. ``97.31% positive``.

A multinomial naive Bayes model (``naive_bayes.py``) trained by ``train.py`` on the sentences
in ``corpus.tsv``; the trained model is ``model.json``, loaded once per session. Standard
library only: nothing to vendor.
"""

import json
from pathlib import Path

from naive_bayes import NaiveBayes

MAX_CHARS = 100_000
MODEL = NaiveBayes(json.loads((Path(__file__).parent / "model.json").read_text("utf-8")))


def cape_handler(input: bytes) -> str:
    try:
        text = input.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("sentiment takes UTF-8 English text, not binary data") from None
    if not text.strip():
        raise ValueError("sentiment takes some English text, and the input is empty")
    if len(text) > MAX_CHARS:
        raise ValueError(f"sentiment takes at most {MAX_CHARS} characters, not {len(text)}")
    label, probability = MODEL.classify(text)
    return f"{probability * 100:.2f}% {label}"

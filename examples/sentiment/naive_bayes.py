"""The sentiment model: text features and a multinomial naive Bayes classifier (stdlib only).

Shared by ``app.py`` (which loads ``model.json`` and classifies) and ``train.py`` (which counts
words in ``corpus.tsv`` and writes ``model.json``), so both see exactly the same features.

Features: lower-cased words (letters, digits, apostrophes), crudely stemmed so that "bored",
"boring" and "bore" count as one feature (see :func:`stem`). A negation word (``not``, ``no``,
``never``, ``nothing``, ``nobody``, ``none``, ``nor``, ``cannot``, anything ending in ``n't``)
marks the words after it, up to the next punctuation mark, with a ``not_`` prefix, so that
"not good" counts as ``not_good`` and not as ``good`` (Das and Chen, 2001; Pang et al., 2002).

Model: class priors and per-class word counts; a word's likelihood uses Laplace (add-one)
smoothing over the training vocabulary, and words never seen in training are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

FORMAT: Final = "cape-example-sentiment/naive-bayes-1"
NEGATIONS: Final = frozenset({"not", "no", "never", "nothing", "nobody", "none", "nor", "cannot"})
_TOKEN: Final = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[.,;:!?()\"]")


def tokens(text: str) -> list[str]:
    """The features of ``text``: words, with ``not_`` on those in a negated stretch."""
    out: list[str] = []
    negated = False
    normalised = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    for token in _TOKEN.findall(normalised):
        if not token[0].isalnum():  # punctuation ends a negated stretch
            negated = False
            continue
        feature = stem(token)
        out.append("not_" + feature if negated else feature)
        if token in NEGATIONS or token.endswith("n't"):
            negated = True
    return out


def stem(word: str) -> str:
    """A crude suffix stripper: a final -s, then one of -ing/-ed/-ly, then a final -e.

    "loves", "loved", "loving" and "love" all become "lov"; "badly" becomes "bad". Words with
    an apostrophe, and short words ("was", "bed", "only"), are left alone.
    """
    if "'" in word:
        return word
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    for suffix in ("ing", "ed", "ly"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


class NaiveBayes:
    """A trained model (the parsed ``model.json``), ready to classify."""

    def __init__(self, model: Mapping[str, Any]) -> None:
        if model.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model")
        self.classes: tuple[str, ...] = tuple(model["classes"])
        alpha = float(model["alpha"])
        documents: list[int] = model["documents"]
        words: list[int] = model["words"]
        vocabulary: dict[str, list[int]] = model["vocabulary"]
        total = sum(documents)
        self.log_prior = [math.log(n / total) for n in documents]
        denominators = [n + alpha * len(vocabulary) for n in words]
        self.log_likelihood = {
            word: [math.log((c + alpha) / d) for c, d in zip(counts, denominators, strict=True)]
            for word, counts in vocabulary.items()
        }

    def classify(self, text: str) -> tuple[str, float]:
        """The most likely class of ``text`` and its posterior probability (ties: the last)."""
        return self.classify_tokens(tokens(text))

    def classify_tokens(self, features: Iterable[str]) -> tuple[str, float]:
        scores = list(self.log_prior)
        for feature in features:
            row = self.log_likelihood.get(feature)
            if row is not None:
                scores = [s + r for s, r in zip(scores, row, strict=True)]
        best = max(range(len(scores)), key=lambda i: (scores[i], i))
        top = scores[best]
        total = math.fsum(math.exp(s - top) for s in scores)
        return self.classes[best], 1.0 / total

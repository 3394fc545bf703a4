"""Train the sentiment model: ``python train.py [--corpus corpus.tsv] [--output model.json]``.

Reads ``label<TAB>sentence`` lines (after a header line), holds out 20% of each class (a
shuffle with a fixed seed), counts words in the rest, prints the accuracy on the held-out
sentences and writes the model trained on the rest. Deterministic: the same corpus gives the
same ``model.json`` byte for byte (the repository's tests check the committed one).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from naive_bayes import FORMAT, NaiveBayes, tokens

HERE = Path(__file__).resolve().parent
SEED = 20240611
HELD_OUT = 0.2
ALPHA = 1
HEADER = "label\tsentence"

Example = tuple[str, str]  # (label, sentence)


def read_corpus(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{path}: the first line must be {HEADER!r}")
    examples: list[Example] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        label, tab, sentence = line.partition("\t")
        if not tab or not sentence.strip() or "\t" in sentence:
            raise ValueError(f"{path}:{number}: expected label<TAB>sentence")
        if sentence in seen:
            raise ValueError(f"{path}:{number}: duplicate sentence {sentence!r}")
        seen.add(sentence)
        examples.append((label, sentence))
    return examples


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out): the same share of every class held out, chosen with SEED."""
    rng = random.Random(SEED)  # noqa: S311 (a reproducible split, not a secret)
    train: list[Example] = []
    held_out: list[Example] = []
    for label in sorted({label for label, _ in examples}):
        of_label = [example for example in examples if example[0] == label]
        rng.shuffle(of_label)
        cut = round(len(of_label) * HELD_OUT)
        held_out += of_label[:cut]
        train += of_label[cut:]
    return train, held_out


def fit(examples: list[Example]) -> dict[str, Any]:
    classes = sorted({label for label, _ in examples})
    documents = Counter(label for label, _ in examples)
    counts: dict[str, list[int]] = {}
    for label, sentence in examples:
        index = classes.index(label)
        for feature in tokens(sentence):
            counts.setdefault(feature, [0] * len(classes))[index] += 1
    return {
        "format": FORMAT,
        "alpha": ALPHA,
        "classes": classes,
        "documents": [documents[label] for label in classes],
        "words": [sum(row[i] for row in counts.values()) for i in range(len(classes))],
        "vocabulary": dict(sorted(counts.items())),
    }


def dump(model: dict[str, Any]) -> str:
    """JSON with one vocabulary entry per line (readable diffs), keys sorted."""
    head = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(model.items())]
    head = [line for line in head if not line.startswith('  "vocabulary"')]
    vocabulary: dict[str, list[int]] = model["vocabulary"]
    words = ",\n".join(f"    {json.dumps(w)}: {json.dumps(c)}" for w, c in vocabulary.items())
    return "{\n" + ",\n".join([*head, f'  "vocabulary": {{\n{words}\n  }}']) + "\n}\n"


def accuracy(model: NaiveBayes, examples: list[Example]) -> int:
    """How many of ``examples`` the model labels correctly."""
    return sum(model.classify(sentence)[0] == label for label, sentence in examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus.tsv")
    parser.add_argument("--output", type=Path, default=HERE / "model.json")
    args = parser.parse_args(argv)
    train, held_out = split(read_corpus(args.corpus))
    model = fit(train)
    trained = NaiveBayes(model)
    right = accuracy(trained, held_out)
    print(
        f"{len(train)} training sentences, {len(model['vocabulary'])} features; "
        f"training accuracy {accuracy(trained, train) / len(train):.2%}"
    )
    print(f"held-out accuracy: {right}/{len(held_out)} = {right / len(held_out):.2%}")
    args.output.write_text(dump(model), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

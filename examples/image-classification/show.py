"""Print the classifier's answer as one line per class: ``7  93.12%``.

Usage: ``cape run NAME -f - | python show.py`` or ``python show.py RESULT.json``. Reads the
JSON that ``app.py`` returns, ``{"top3": [{"class": "7", "probability": 0.9312}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def lines(result: Any) -> list[str]:
    """``class  percent%`` for every entry of ``result["top3"]``, in order."""
    if not isinstance(result, dict) or not isinstance(result.get("top3"), list):
        raise ValueError('expected a JSON object with a "top3" list')
    shown = []
    for entry in result["top3"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("probability"), int | float):
            raise ValueError('expected "top3" entries like {"class": "7", "probability": 0.93}')
        shown.append(f"{entry.get('class')}  {100.0 * entry['probability']:.2f}%")
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print image-classification's top 3.")
    parser.add_argument("result", nargs="?", type=Path, help="the JSON result (default: stdin)")
    args = parser.parse_args(argv)
    try:
        text = args.result.read_text(encoding="utf-8") if args.result else sys.stdin.read()
        shown = lines(json.loads(text))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"show.py: {exc}", file=sys.stderr)
        return 1
    print("\n".join(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Classify a photo in the enclave from Python (Cape's ``run_prediction.py``, with this SDK).

Usage, once signed up (``cape signup``/``cape login``) and deployed
(``cape deploy examples/imagenet``)::

    python examples/imagenet/run_prediction.py alice/imagenet examples/imagenet/images/chelsea.png

The photo is encrypted here for your own Cape key (only an attested enclave can open it), sent
to the function, decoded and classified in the enclave; the five likeliest ImageNet classes
come back, with what the client verified about the enclave before sending anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cape import Cape
from cape.errors import CapeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify a photo with examples/imagenet.")
    parser.add_argument("function", help="the deployed function: user/name or its id")
    parser.add_argument("photo", type=Path, help="a PNG or JPEG photo")
    args = parser.parse_args(argv)
    try:
        photo = args.photo.read_bytes()
        with Cape() as cape:  # the CLI's settings: server, token, pinned root
            encrypted = cape.encrypt(photo)  # b"cape:…"
            result = json.loads(cape.run(args.function, None, encrypted))
            attested = cape.aio.last_attestation
    except (OSError, CapeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for entry in result["top5"]:
        print(f"{entry['class']}: {100 * entry['probability']:.1f}%")
    if attested is not None:
        print(f"verified: root sha256:{attested.root_sha256}")
        print(f"          PCR0 {attested.pcrs[0]}")
        print(f"          function checksum {attested.function_checksum}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

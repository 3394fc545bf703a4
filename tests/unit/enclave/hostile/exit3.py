"""Ends the worker process with os._exit(3)."""

import os


def cape_handler(data: bytes) -> bytes:
    os._exit(3)

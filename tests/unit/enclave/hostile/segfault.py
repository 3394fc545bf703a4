"""Dereferences NULL through ctypes."""

import ctypes


def cape_handler(data: bytes) -> bytes:
    return ctypes.string_at(0)

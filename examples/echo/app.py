"""Echo: the smallest Cape function. Its output is its input, byte for byte.

A ``cape:`` input (from ``cape encrypt``) is decrypted by the enclave before the handler runs,
so this function also shows what a ciphertext sealed to you contains.
"""


def cape_handler(input: bytes) -> bytes:
    return input

"""isprime: is the decimal integer in the input a prime number? Answers ``true`` or ``false``.

Numbers below 3,317,044,064,679,887,385,961,981 (about 3.3e24) get a *deterministic* answer:
the strong probable-prime (Miller-Rabin) test to the 13 prime bases 2 to 41 has no false
positives below that bound (Sorenson and Webster, 2015). Larger numbers get the Baillie-PSW
test (Miller-Rabin to base 2 plus a strong Lucas test), which has no known counterexample and
is proven correct below 2**64; perfect squares, which the Lucas test cannot handle, are
recognised first. Zero, one and negative numbers are not prime.

Bad input (not UTF-8, not a decimal integer, or more than MAX_DIGITS digits) raises
``ValueError`` with a message saying what is expected.
"""

import math
import re

MAX_DIGITS = 1000
DETERMINISTIC_BOUND = 3_317_044_064_679_887_385_961_981
BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
SMALL_PRIMES = (*BASES, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)
_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse(input: bytes) -> int:
    """The integer written in ``input`` (ASCII digits, optional sign and surrounding spaces)."""
    try:
        text = input.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("isprime takes a decimal integer such as 97, not binary data") from None
    if not _INTEGER.fullmatch(text):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"isprime takes a decimal integer such as 97, not {shown!r}")
    digits = len(text.lstrip("+-"))
    if digits > MAX_DIGITS:
        raise ValueError(f"isprime takes at most {MAX_DIGITS} digits, not {digits}")
    return int(text)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in SMALL_PRIMES:
        if n % p == 0:
            return n == p
    if n < DETERMINISTIC_BOUND:
        return all(_strong_probable_prime(n, base) for base in BASES)
    if math.isqrt(n) ** 2 == n:
        return False
    return _strong_probable_prime(n, 2) and _strong_lucas_probable_prime(n)


def _strong_probable_prime(n: int, base: int) -> bool:
    """Miller-Rabin to one base, for odd n > base."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    x = pow(base, d, n)
    if x in (1, n - 1):
        return True
    for _ in range(s - 1):
        x = x * x % n
        if x == n - 1:
            return True
    return False


def _jacobi(a: int, n: int) -> int:
    """The Jacobi symbol (a/n) for odd n > 0."""
    a %= n
    result = 1
    while a:
        while a % 2 == 0:
            a //= 2
            if n % 8 in (3, 5):
                result = -result
        a, n = n, a
        if a % 4 == 3 and n % 4 == 3:
            result = -result
        a %= n
    return result if n == 1 else 0


def _half(x: int, n: int) -> int:
    """x / 2 modulo odd n."""
    x %= n
    return (x + n if x % 2 else x) // 2


def _strong_lucas_probable_prime(n: int) -> bool:
    """Strong Lucas test with Selfridge's parameters, for odd n that is not a perfect square."""
    d = 5  # the first of 5, -7, 9, -11, ... with (d/n) = -1
    while (j := _jacobi(d, n)) != -1:
        if j == 0 and abs(d) != n:
            return False  # d shares a factor with n
        d = -d - 2 if d > 0 else -d + 2
    p, q = 1, (1 - d) // 4
    k, s = n + 1, 0
    while k % 2 == 0:
        k, s = k // 2, s + 1
    u, v, qk = 1, p, q % n  # U_1, V_1, Q^1
    for bit in bin(k)[3:]:
        u, v, qk = u * v % n, (v * v - 2 * qk) % n, qk * qk % n
        if bit == "1":
            u, v, qk = _half(p * u + v, n), _half(d * u + p * v, n), qk * q % n
    if u == 0 or v == 0:
        return True
    for _ in range(s - 1):
        v, qk = (v * v - 2 * qk) % n, qk * qk % n
        if v == 0:
            return True
    return False


def cape_handler(input: bytes) -> str:
    return "true" if is_prime(parse(input)) else "false"

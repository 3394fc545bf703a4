"""Ids: 22 characters of [A-Za-z0-9], uniform, from the secrets module."""

from __future__ import annotations

import collections

import pytest

from cape.host.ids import ID_ALPHABET, ID_LENGTH, is_id, new_id


def test_new_id_has_the_protocol_shape() -> None:
    for _ in range(100):
        value = new_id()
        assert len(value) == ID_LENGTH == 22
        assert set(value) <= set(ID_ALPHABET)
        assert is_id(value)


def test_alphabet_is_the_62_ascii_letters_and_digits() -> None:
    assert len(ID_ALPHABET) == len(set(ID_ALPHABET)) == 62
    assert all(c.isascii() and c.isalnum() for c in ID_ALPHABET)


def test_ids_do_not_repeat() -> None:
    ids = {new_id() for _ in range(20_000)}
    assert len(ids) == 20_000


def test_characters_are_roughly_uniform() -> None:
    counts = collections.Counter("".join(new_id() for _ in range(5_000)))
    expected = 5_000 * ID_LENGTH / 62  # ~1774 per character
    assert set(counts) == set(ID_ALPHABET)
    # Each count is binomial with sd ~42: 6 sd either way never fails by chance in practice.
    assert all(abs(n - expected) < 260 for n in counts.values()), counts


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 21,
        "a" * 23,
        "a" * 21 + "-",
        "a" * 21 + "\n",
        "a" * 22 + "\n",
        "a" * 21 + "\u0661",  # an Arabic-Indic digit: alphanumeric, but not ASCII
        "a" * 21 + "é",
        "../" + "a" * 19,
        None,
        b"a" * 22,
        22,
    ],
)
def test_is_id_rejects_anything_else(value: object) -> None:
    assert not is_id(value)

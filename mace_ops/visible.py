"""What a reader sees of a text: no whitespace, format or control characters.

A concept line or a file name made only of invisible characters (zero-width space U+200B, word
joiner U+2060, BOM U+FEFF, control characters) looks empty but is not ``str.strip()``-empty, so
it would be accepted as a concept or written as a blank-looking file name. ``visible`` is the
one test for "has something a person can read".
"""
from __future__ import annotations

import unicodedata

_INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}


def visible(text: str) -> str:
    """``text`` without whitespace, format (Cf) and control (Cc) characters."""
    return "".join(ch for ch in str(text) if unicodedata.category(ch) not in _INVISIBLE and not ch.isspace())

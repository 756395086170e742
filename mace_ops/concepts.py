r"""Parse the user's concept lists into ``Concept`` records, with errors that name the line.

Format, one concept per line::

    # comments and blank lines are ignored
    van gogh, vincent van gogh        <- synonyms of one concept, comma separated
    ship -> ground                    <- optional per-concept anchor after '->'
    c# programming  # a comment       <- '#' starts a comment only at the line's start or after a space
    ac\-dc, r\#b                       <- '\,' '\#' '\-' write a literal comma, hash, hyphen

The first phrase is the concept's name; the others are synonyms erased with it. Every phrase
and anchor (erase, preserve, probe, the anchor input) goes through ``normalise_phrase``: lower
case, hyphens and underscores become spaces (unless escaped), runs of whitespace become one
space. ``check_disjoint`` refuses a phrase that is both erased and preserved. A line of only
invisible characters (zero-width spaces, ...) is refused, not taken as a concept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .visible import visible
from .work import check_concept_count


@dataclass(frozen=True)
class Concept:
    phrases: tuple[str, ...]
    anchor: str | None = None
    line: int = 0
    concept_tokens: bool | None = None
    """Pair the concept's own tokens in CFR: None = the CFR setting; False = never (set by
    ``scope.scoped_concepts`` when the concept's tokens precede its ``erase_from`` context)."""

    @property
    def name(self) -> str:
        return self.phrases[0]


_ESCAPES = {"\\,": "\x00c", "\\#": "\x00h", "\\-": "\x00d"}
_UNESCAPE = {"\x00c": ",", "\x00h": "#", "\x00d": "-"}


def _protect(text: str) -> str:
    for k, v in _ESCAPES.items():
        text = text.replace(k, v)
    return text


def _restore(text: str) -> str:
    for k, v in _UNESCAPE.items():
        text = text.replace(k, v)
    return text


_COMMENT = re.compile(r"(^|\s)#")


def strip_comment(line: str) -> str:
    """``line`` without its comment: '#' at the start or after whitespace starts one ('c# code' keeps its '#')."""
    m = _COMMENT.search(line)
    return line if m is None else line[: m.start()]


def normalise_phrase(text: str) -> str:
    r"""Lower-case, hyphens/underscores to spaces, single spaces (how MACE names concepts).

    Escaped characters (``\,`` ``\#`` ``\-``) come out literally."""
    text = _protect(text)
    return _restore(" ".join(text.replace("-", " ").replace("_", " ").lower().split()))


def parse_concepts(text: str, field: str = "concepts", allow_anchor: bool = True) -> list[Concept]:
    """Parse a multi-line concept list; raise ValueError naming ``field`` and the line."""
    concepts: list[Concept] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = strip_comment(_protect(raw)).strip()
        if not line:
            continue
        if not visible(line):
            raise ValueError(f"{field}, line {number}: only invisible characters (e.g. zero-width spaces); "
                             "delete the line or write the concept")
        anchor = None
        if "->" in line:
            if not allow_anchor:
                raise ValueError(f"{field}, line {number}: '->' (anchor) is not allowed here: {raw.strip()!r}")
            line, anchor_text = line.split("->", 1)
            if "->" in anchor_text:
                raise ValueError(f"{field}, line {number}: more than one '->' in {raw.strip()!r}")
            anchor = _restore(normalise_phrase(anchor_text))
        parts = [_restore(normalise_phrase(p)) for p in line.split(",")]
        if any(not visible(p) for p in parts):
            raise ValueError(
                f"{field}, line {number}: empty phrase in {raw.strip()!r}; write 'a, b, c' with a word between commas"
            )
        for p in parts:
            if p in seen:
                raise ValueError(
                    f"{field}, line {number}: {p!r} is already listed on line {seen[p]}; list each phrase once"
                )
            seen[p] = number
        concepts.append(Concept(tuple(parts), anchor, number))
    return concepts


def require_concepts(concepts: list[Concept], field: str = "concepts") -> list[Concept]:
    """``concepts`` unless empty or longer than the server's ``max_concepts`` (``work``); ValueError naming ``field``."""
    if not concepts:
        raise ValueError(f"{field}: no concept given; write one concept per line (synonyms comma separated)")
    check_concept_count(len(concepts), field)
    return concepts


def check_disjoint(erase: list[Concept], preserve: list[Concept], erase_field: str = "concepts",
                   preserve_field: str = "preserve") -> None:
    """ValueError when a phrase is both erased and preserved (the two goals contradict)."""
    erased = {p: c.line for c in erase for p in c.phrases}
    for c in preserve:
        for p in c.phrases:
            if p in erased:
                raise ValueError(f"{preserve_field}, line {c.line}: {p!r} is also erased ({erase_field}, line "
                                 f"{erased[p]}); a phrase cannot be erased and preserved: remove it from one list")

"""Parse the user's concept lists into ``Concept`` records, with errors that name the line.

Format, one concept per line::

    # comments and blank lines are ignored
    van gogh, vincent van gogh        <- synonyms of one concept, comma separated
    ship -> ground                    <- optional per-concept anchor after '->'

The first phrase is the concept's name; the others are synonyms erased with it.
"""
from __future__ import annotations

from dataclasses import dataclass


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


def normalise_phrase(text: str) -> str:
    """Lower-case, hyphens to spaces, single spaces (how MACE names concepts)."""
    return " ".join(text.replace("-", " ").replace("_", " ").lower().split())


def parse_concepts(text: str, field: str = "concepts", allow_anchor: bool = True) -> list[Concept]:
    """Parse a multi-line concept list; raise ValueError naming ``field`` and the line."""
    concepts: list[Concept] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        anchor = None
        if "->" in line:
            if not allow_anchor:
                raise ValueError(f"{field}, line {number}: '->' (anchor) is not allowed here: {raw.strip()!r}")
            line, anchor_text = line.split("->", 1)
            if "->" in anchor_text:
                raise ValueError(f"{field}, line {number}: more than one '->' in {raw.strip()!r}")
            anchor = normalise_phrase(anchor_text)
        parts = [normalise_phrase(p) for p in line.split(",")]
        if any(not p for p in parts):
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
    if not concepts:
        raise ValueError(f"{field}: no concept given; write one concept per line (synonyms comma separated)")
    return concepts

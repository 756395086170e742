"""Prompt templates an erasure method should use in the toy world.

``ERASE_TEMPLATES`` are the caption templates x shapes x styles with ``{}`` where the colour
word goes (e.g. ``"a {} circle in dotted style"``); ``erase_prompts("red")`` fills them.
``ANCHOR_WORD`` (``any``) is the neutral colour word to map an erased colour onto.
``GENERIC_PRESERVE_PROMPTS`` are colour-neutral prompts; ``preserve_prompts`` builds the
prompts of the colours that should be kept.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from . import vocab

ANCHOR_WORD = vocab.NEUTRAL_COLOR


def _fill(template: str, shape: str, style: str) -> str:
    return template.format(c="{}", s=shape, st=style)


# 3 templates x 4 shapes x 4 styles = 48 templates, "{}" = colour word.
ERASE_TEMPLATES: tuple[str, ...] = tuple(
    _fill(t, s, st) for t in vocab.CAPTION_TEMPLATES for s in vocab.SHAPES for st in vocab.STYLES
)
# The short caption form, one per shape ("a {} circle").
SHORT_TEMPLATES: tuple[str, ...] = tuple(_fill(vocab.SHORT_TEMPLATE, s, "") for s in vocab.SHAPES)

# Colour-neutral prompts (the anchor word in every template), for generic preservation.
GENERIC_PRESERVE_PROMPTS: tuple[str, ...] = tuple(t.format(ANCHOR_WORD) for t in ERASE_TEMPLATES + SHORT_TEMPLATES)


def colour_of(word: str) -> str:
    """The colour a colour word names (``"crimson" -> "red"``); ValueError if not a colour word."""
    if word not in vocab.COLOR_WORD_INDEX:
        raise ValueError(f"toy world: {word!r} is not a colour word")
    return vocab.COLORS[vocab.COLOR_WORD_INDEX[word]]


def colour_words(colour: str) -> tuple[str, ...]:
    """Main word and synonyms of a colour (``"red" -> ("red", "crimson", "scarlet")``)."""
    colour = colour_of(colour)
    return (colour,) + vocab.SYNONYMS[colour]


def synonyms_of(word: str) -> tuple[str, ...]:
    """The other words for the same colour as ``word``."""
    return tuple(w for w in colour_words(colour_of(word)) if w != word)


def erase_prompts(word: str, templates: Sequence[str] = ERASE_TEMPLATES) -> list[str]:
    """All erase prompts for one word (48 by default)."""
    vocab.tokenize(word)
    return [t.format(word) for t in templates]


def preserve_words(erased: Iterable[str], include_synonyms: bool = True, include_anchor: bool = True) -> list[str]:
    """Colour words of every colour not named by ``erased`` (plus the anchor word)."""
    gone = {colour_of(w) for w in erased}
    words = []
    for c in vocab.COLORS:
        if c not in gone:
            words += list(colour_words(c)) if include_synonyms else [c]
    if include_anchor:
        words.append(ANCHOR_WORD)
    return words


def preserve_prompts(erased: Iterable[str], include_synonyms: bool = True, include_anchor: bool = True,
                     templates: Sequence[str] = ERASE_TEMPLATES) -> list[str]:
    """Prompts of the colours to keep: preserve_words x templates."""
    return [t.format(w) for w in preserve_words(erased, include_synonyms, include_anchor) for t in templates]

"""``erase_from``: erase a concept only where it appears in the context of a broader concept.

"Erase *red* from *car*": red cars lose their red; red apples and blue cars stay. The scope is a
rewrite of the erasure problem, so every MACE stage (CFR, LoRA training, fusion) runs unchanged
on the rewritten concepts and an enlarged preserve set:

* **contexts.** ``erase_from`` is one or more contexts (``"car"``, ``"car, automobile"``). A
  context is either a plain phrase, joined after the concept (``"red" + "car" -> "red car"``),
  or a pattern with ``{}`` where the concept goes (``"car painted {}"``, ``"{} car"``).
* **erase pairs.** For each concept and each context, a scoped concept is made whose phrases are
  the concept's phrases placed in the context (``"red car"``, ``"crimson car"``) and whose anchor
  is the concept's anchor placed in the same context (empty anchor -> ``"car"``; ``"any"`` ->
  ``"any car"``). So CFR's pairs are "template(red car)" -> "template(car)": the positions the
  two prompts share (the context tokens after the concept, the end token, padding) are mapped.
* **concept tokens.** With a causal text encoder a concept token that comes *before* the context
  cannot know the context ("red" reads the same in "red car" and "red apple"), so remapping it
  would erase the concept everywhere. Its pairs are therefore dropped (``Concept.concept_tokens``
  = False) when the pattern puts the concept first; they are kept (per the CFR setting) when the
  context comes first (``"car painted {}"``), because then the concept's tokens do carry it.
* **automatic preservation.** The preserve prompts gain, over the same templates: the context
  with the anchor (``"car"``: the broader concept itself), the bare concept phrases (``"red"``:
  the concept outside any context), and for every preserve phrase q both the concept in q's
  context (``"red apple"``) and q in the erase context (``"blue car"``). The rule behind it:
  everything that is not "concept in its erase context" is kept; a cross such as ``"red blue"``
  is harmless for the same reason.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

from .concepts import Concept, normalise_phrase
from .templates import fill

SLOT = "{}"


def parse_erase_from(value) -> tuple[str, ...]:
    """Contexts from a str (commas/newlines separate contexts), a list of str, or None/"" (no scope)."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [p for line in value.splitlines() for p in line.split(",")]
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError(f"erase_from: every item must be a string, got {type(v).__name__} {v!r}")
            items += v.split(",")
    else:
        raise ValueError(f"erase_from: expected a string or a list of strings, got {type(value).__name__}")
    out: list[str] = []
    for raw in items:
        if not raw.strip():
            continue
        ctx = normalise_phrase(raw)
        if ctx.count(SLOT) > 1:
            raise ValueError(f"erase_from: {raw.strip()!r} has more than one '{{}}'")
        if ctx.replace(SLOT, "").strip() == "":
            raise ValueError(f"erase_from: {raw.strip()!r} names no context; write e.g. 'car' or 'car painted {{}}'")
        if ctx not in out:
            out.append(ctx)
    return tuple(out)


def compose(phrase: str, context: str) -> str:
    """The phrase placed in the context: ``compose("red", "car") == "red car"``;
    ``compose("red", "car painted {}") == "car painted red"``; an empty phrase leaves the context."""
    pattern = context if SLOT in context else SLOT + " " + context
    return " ".join(pattern.replace(SLOT, phrase).split())


def concept_first(context: str) -> bool:
    """True when the concept comes before the context words (its tokens cannot see the context)."""
    pattern = context if SLOT in context else SLOT + " " + context
    return pattern.strip().startswith(SLOT)


def scoped_concepts(concepts: Sequence[Concept], contexts: Sequence[str], default_anchor: str = "") -> list[Concept]:
    """One scoped concept per (concept, context); no contexts: the concepts unchanged."""
    if not contexts:
        return list(concepts)
    out = []
    for concept in concepts:
        anchor = default_anchor if concept.anchor is None else concept.anchor
        for ctx in contexts:
            phrases = tuple(compose(p, ctx) for p in concept.phrases)
            out.append(replace(concept, phrases=phrases, anchor=compose(anchor, ctx),
                               concept_tokens=False if concept_first(ctx) else None))
    return out


def _unique(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def scope_preserve_phrases(concepts: Sequence[Concept], contexts: Sequence[str], default_anchor: str = "",
                           preserve_phrases: Sequence[str] = ()) -> list[str]:
    """The phrases the scope adds to the preserve set (see the module docstring). A preserve phrase
    may itself be a context pattern ("apple that is {}"); it is then used as a context only."""
    if not contexts:
        return []
    erased = {compose(p, ctx) for c in concepts for p in c.phrases for ctx in contexts}
    phrases: list[str] = []
    for concept in concepts:
        anchor = default_anchor if concept.anchor is None else concept.anchor
        phrases += [compose(anchor, ctx) for ctx in contexts]          # "car"
        phrases += list(concept.phrases)                                 # "red"
        for q in preserve_phrases:
            phrases += [compose(p, q) for p in concept.phrases]        # "red apple"
            if SLOT not in q:                                            # a context pattern is no variant
                phrases += [compose(q, ctx) for ctx in contexts]       # "blue car"
    return [p for p in _unique(phrases) if p not in erased]


def scope_preserve_prompts(concepts: Sequence[Concept], contexts: Sequence[str], templates: Sequence[str],
                           default_anchor: str = "", preserve_phrases: Sequence[str] = ()) -> list[str]:
    """``scope_preserve_phrases`` filled into every template."""
    return [fill(t, p) for p in scope_preserve_phrases(concepts, contexts, default_anchor, preserve_phrases)
            for t in templates]


def apply_scope(concepts: Sequence[Concept], erase_from, templates: Sequence[str], default_anchor: str = "",
                preserve_phrases: Sequence[str] = ()) -> tuple[list[Concept], list[str]]:
    """(scoped concepts, extra preserve prompts) for ``erase_from`` (str, list or None)."""
    contexts = parse_erase_from(erase_from)
    preserve_phrases = [normalise_phrase(q) for q in preserve_phrases]
    return (scoped_concepts(concepts, contexts, default_anchor),
            scope_preserve_prompts(concepts, contexts, templates, default_anchor, preserve_phrases))

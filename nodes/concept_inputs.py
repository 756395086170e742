"""The concept / anchor / preserve inputs the erasing nodes share (CFR, ACE, Text Gate, Mass Erase).

``concept_inputs(...)`` returns the ``io`` input declarations by name, so each node lists them in
its own order (saved workflows hold widget values by position: names, defaults and order stay
as they were). Tooltips and defaults are parameters; ``None`` = no tooltip.
"""
from __future__ import annotations

from typing import Sequence

from .comfy_compat import io

from ..mace_ops.templates import TEMPLATES

CONCEPTS_TOOLTIP = ("What to erase: one concept per line; synonyms on one line separated by commas (all erased "
                    "together); optional per-line anchor after '->' (e.g. 'ship -> ground'). 1 to 1,000 lines "
                    "(the server's MACE_MAX_CONCEPTS may allow more).")
TYPE_TOOLTIP = ("Chooses the prompt templates the erasure is built from: style (art styles, artists), person "
                "(names), object (things).")
ANCHOR_TOOLTIP = ("What the concept becomes (e.g. 'art' for styles, 'a person' for names, 'sky' behind an "
                  "object); empty = neutral. Pick something generic the model draws well.")


def concept_inputs(*, concepts_default: str = "van gogh, vincent van gogh", concepts_tooltip: str | None = CONCEPTS_TOOLTIP,
                   type_options: Sequence[str] | None = None, type_default: str = "style",
                   type_tooltip: str | None = TYPE_TOOLTIP, anchor_default: str = "",
                   anchor_tooltip: str | None = ANCHOR_TOOLTIP, preserve_tooltip: str | None = None,
                   builtin_tooltip: str | None = None) -> dict[str, io.Input]:
    """{"concepts", "concept_type", "anchor", "preserve", "builtin_preserve"} -> input declaration."""
    return {
        "concepts": io.String.Input("concepts", multiline=True, default=concepts_default, tooltip=concepts_tooltip),
        "concept_type": io.Combo.Input("concept_type", options=list(type_options or sorted(TEMPLATES)),
                                       default=type_default, tooltip=type_tooltip),
        "anchor": io.String.Input("anchor", default=anchor_default, tooltip=anchor_tooltip),
        "preserve": io.String.Input("preserve", multiline=True, default="", tooltip=preserve_tooltip),
        "builtin_preserve": io.Boolean.Input("builtin_preserve", default=True, tooltip=builtin_tooltip),
    }


GATE_PRESERVE_TOOLTIP = "Concepts to keep unchanged, one per line; they also calibrate the gate."
GATE_BUILTIN_TOOLTIP = "Also calibrate the gate on a built-in set of 20 everyday prompts."


def gate_concept_inputs(**kwargs) -> dict[str, io.Input]:
    """``concept_inputs`` of the gate nodes (ACE, Text Gate): preserve and built-ins calibrate the gate."""
    return concept_inputs(preserve_tooltip=GATE_PRESERVE_TOOLTIP, builtin_tooltip=GATE_BUILTIN_TOOLTIP, **kwargs)


def quantile_input(default: float, where: str = "") -> io.Input:
    """The gate threshold's ``quantile`` input; ``where``: where the similarity is read (tooltip)."""
    return io.Float.Input("quantile", default=default, min=0.5, max=1.0, step=0.0005,
                          tooltip="Gate threshold: this quantile, over ordinary prompts, of each prompt's largest "
                          f"similarity to the concept{where} (higher = opens less often on other prompts).")

"""The concept / anchor / preserve inputs the erasing nodes share (CFR, ACE, Mass Erase).

``concept_inputs(...)`` returns the ``io`` input declarations by name, so each node lists them in
its own order (saved workflows hold widget values by position: names, defaults and order stay
as they were). Tooltips and defaults are parameters; ``None`` = no tooltip.
"""
from __future__ import annotations

from typing import Sequence

from .comfy_compat import io

from ..mace_ops.templates import TEMPLATES

CONCEPTS_TOOLTIP = ("One concept per line; synonyms on one line separated by commas; optional per-line anchor "
                    "after '->' (e.g. 'ship -> ground').")
TYPE_TOOLTIP = "Chooses the prompt templates the erasure is built from."
ANCHOR_TOOLTIP = "What the concept becomes (e.g. 'art', 'a person'); empty = neutral."


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

"""How much work one request asks for: said before a long run starts, and refused when too large.

A shared server runs prompts from anyone who can reach it, and one CFR / ACE / Mass Erase request
with 10,000 concepts keeps it busy for hours (encoding alone: ~7 s per concept for CLIP-L on a
CPU). ``require_concepts`` (every erasing node) refuses more than ``max_concepts()`` concepts in
one list -- 1,000 unless the server's operator sets ``MACE_MAX_CONCEPTS`` (a prompt cannot raise
it) -- and the nodes log a ``WorkEstimate`` (prompt encodes, closed-form solves, images, training
steps) before they start.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

MAX_CONCEPTS_ENV = "MACE_MAX_CONCEPTS"
DEFAULT_MAX_CONCEPTS = 1000


def max_concepts() -> int:
    """The server's limit on concepts per request: ``$MACE_MAX_CONCEPTS`` (a positive integer), else 1,000."""
    raw = os.environ.get(MAX_CONCEPTS_ENV, "").strip()
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_MAX_CONCEPTS
    return value if value > 0 else DEFAULT_MAX_CONCEPTS


def check_concept_count(n: int, field: str) -> None:
    """ValueError naming ``field`` when one list holds more concepts than ``max_concepts()``."""
    limit = max_concepts()
    if n > limit:
        raise ValueError(f"{field}: {n:,} concepts in one request; this server takes at most {limit:,} "
                         f"(max_concepts; its operator can change it with {MAX_CONCEPTS_ENV}). Split the list over "
                         "several runs (Mass Erase: the shard input), each well under the limit")


@dataclass(frozen=True)
class WorkEstimate:
    concepts: int
    encodes: int              # prompts through the text encoder
    solves: int = 1           # closed-form solves (CFR, fusion, gates)
    images: int = 0           # images sampled
    denoise_steps: int = 0    # sampler steps over all images
    train_steps: int = 0      # LoRA training steps

    def describe(self) -> str:
        parts = [f"{self.encodes:,} prompt encodes", f"{self.solves:,} closed-form solve(s)"]
        if self.images:
            parts.append(f"{self.images:,} images ({self.denoise_steps:,} sampler steps)")
        if self.train_steps:
            parts.append(f"{self.train_steps:,} LoRA training steps")
        return f"work estimate: {self.concepts:,} concept(s) -> " + ", ".join(parts)


def encodes_for(concepts, n_templates: int, n_preserve_prompts: int, default_anchor: str = "") -> int:
    """Prompt encodes of an erasure: every phrase and every distinct anchor in every template, plus
    the preserve prompts."""
    phrases = sum(len(c.phrases) for c in concepts)
    anchors = len({default_anchor if c.anchor is None else c.anchor for c in concepts})
    return (phrases + anchors) * n_templates + n_preserve_prompts


def announce(node: str, estimate: WorkEstimate) -> WorkEstimate:
    """Log the estimate (ComfyUI's console) before the work starts; returns it."""
    logging.info("%s: %s", node, estimate.describe())
    return estimate

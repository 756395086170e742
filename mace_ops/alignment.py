"""Token alignment between a concept prompt and its anchor prompt, and concept token positions.

A concept prompt ("a photo of ship") and its anchor prompt ("a photo of ground") share a prefix
(start token and the words before the concept) and a suffix (words after it and the end token).
CFR maps the K/V of those shared positions in the concept prompt onto the K/V of the same
positions in the anchor prompt; padding positions pair up in order, and the surplus pads of the
shorter prompt are dropped. The concept tokens themselves are never CFR targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Alignment:
    old: tuple[int, ...]  # positions in the concept prompt
    new: tuple[int, ...]  # paired positions in the anchor prompt


def align(
    old_ids: Sequence[int], old_len: int, new_ids: Sequence[int], new_len: int, include_concept: bool = False
) -> Alignment:
    """Pair positions of two prompts of equal window length (ids include padding).

    ``old_len``/``new_len`` count the real tokens (start and end included). The result has
    length ``L - max(n_concept, n_anchor)`` where n_* are the differing middle token counts.

    ``include_concept`` also pairs the concept's own tokens (MACE leaves them to the LoRA stage;
    a CFR-only erasure needs them): concept token i of n_c goes to anchor token
    floor(i * n_a / n_c), or, for an empty anchor, to the first position after the anchor slot
    (what the model reads when the concept is simply left out).
    """
    window = len(old_ids)
    if len(new_ids) != window:
        raise ValueError(f"align: windows differ in length ({window} vs {len(new_ids)})")
    a, b = list(old_ids[:old_len]), list(new_ids[:new_len])
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
        suffix += 1
    old = list(range(prefix)) + list(range(len(a) - suffix, len(a)))
    new = list(range(prefix)) + list(range(len(b) - suffix, len(b)))
    pads = window - max(len(a), len(b))
    old += range(len(a), len(a) + pads)
    new += range(len(b), len(b) + pads)
    if include_concept:
        n_c, n_a = len(a) - suffix - prefix, len(b) - suffix - prefix
        for i in range(n_c):
            old.append(prefix + i)
            new.append(prefix + (i * n_a) // n_c if n_a else prefix)
    return Alignment(tuple(old), tuple(new))


def align_encoded(old, new, include_concept: bool = False) -> Alignment:
    """:func:`align` of two ``EncodedPrompt``s, window by window when they are segmented (SD3:
    CLIP's window, then T5's); positions are into the whole prompt."""
    a, b = old.windows(), new.windows()
    if [w for _, w, _ in a] != [w for _, w, _ in b]:
        raise ValueError(f"align: the prompts' windows differ ({[w for _, w, _ in a]} vs {[w for _, w, _ in b]}); "
                         "shorten the prompts")
    pos_old: list[int] = []
    pos_new: list[int] = []
    for (off, w, n_old), (_, _, n_new) in zip(a, b):
        part = align(old.ids[off:off + w], n_old, new.ids[off:off + w], n_new, include_concept)
        pos_old += [off + i for i in part.old]
        pos_new += [off + i for i in part.new]
    return Alignment(tuple(pos_old), tuple(pos_new))


def find_subsequence(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Start indices of every occurrence of ``pattern`` in ``ids``."""
    n = len(pattern)
    if n == 0:
        return []
    return [i for i in range(len(ids) - n + 1) if list(ids[i : i + n]) == list(pattern)]


def concept_positions(
    ids: Sequence[int], length: int, phrase_ids: Sequence[int], end_id: int, include_end_tokens: bool
) -> list[int]:
    """Positions carrying the concept: its tokens, plus (optionally) end/padding tokens.

    With ``include_end_tokens`` every position whose id is the end token is added (on SD1 that is
    the end token and all padding, as in the reference; on SD2/SDXL-G only the end token).
    The start token (position 0) is never included.
    """
    starts = find_subsequence(list(ids[:length]), phrase_ids)
    positions = {s + k for s in starts for k in range(len(phrase_ids))}
    if include_end_tokens:
        positions |= {i for i, t in enumerate(ids) if t == end_id and i > 0}
    positions.discard(0)
    return sorted(positions)

"""The general caption prior for the nodes: one moment per connected CLIP, cached on disk.

``prior_for(encoder, weight)`` returns the ``(moment, weight)`` pair mace_ops takes, or None when
the weight is 0. The moment is computed with the user's own CLIP (its clip-skip setting included)
over ``mace_ops.prior.general_captions`` once, then read from ``<user>/mace_cache``.
``caption_encodings(encoder)``: the same captions' encodings (float16-rounded features), cached the
same way: the ACE node calibrates its gate on them, the Text Gate node on its residuals' ones.
"""
from __future__ import annotations

import comfy.model_management

from ..mace_ops.prior import PriorCache, general_captions
from .paths import prior_cache_folder

PRIOR_CAPTIONS = 1000
DEFAULT_PRIOR_WEIGHT = 1.0
TOOLTIP = ("Weight of the pack's general caption prior (1,000 everyday captions, encoded once per CLIP and "
           "cached) relative to the preserve list, in CFR, the LoRAs' preservation and fusion. 0 = off.")
_CACHE: PriorCache | None = None


def _cache() -> PriorCache:
    global _CACHE
    if _CACHE is None:
        _CACHE = PriorCache(prior_cache_folder())
    return _CACHE


def caption_encodings(encoder, keep_moment: bool = True):
    """``(captions, encodings)`` of the ``PRIOR_CAPTIONS`` general captions with this encoder (any
    ``TextEncoder``: the cache is keyed by its features, so a text gate's residual reader gets its
    own entry; ``keep_moment`` False there, its moment is no CFR prior)."""
    captions = general_captions(PRIOR_CAPTIONS)
    return captions, _cache().encode(encoder, captions, keep_moment=keep_moment,
                                     on_batch=comfy.model_management.throw_exception_if_processing_interrupted)


def prior_for(encoder, weight: float):
    if weight <= 0:
        return None
    moment = _cache().moment(encoder, general_captions(PRIOR_CAPTIONS),
                           on_batch=comfy.model_management.throw_exception_if_processing_interrupted)
    return moment, float(weight)

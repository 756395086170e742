"""CFR: closed-form cross-attention refinement (MACE stage 1).

For every erased phrase and template, the concept prompt and the anchor prompt are encoded and
aligned (``alignment.align``). With contexts c (concept prompt, shared positions) and anchor-side
inputs e, and preserve vectors p, each K/V weight W0 becomes

    W' = argmin  sum ||W'c - W0 e||^2 + s sum ||W'p - W0 p||^2 + lamb ||W' - W0||_F^2
       = W0 (lamb I + G + s P) (lamb I + B + s P)^-1  =  W0 M

so one d x d matrix M, from one Cholesky factorisation, serves every weight of input width d
(all 32 attn2 K/V weights of SD1.x). ``s = preserve_scale * n_pairs / n_preserve``: a
preserve_scale of 1 gives the preserve set the same total weight as the erase pairs.

``erase_from`` (scope restriction; design in ``scope.py``): erase the concept only in the
context of a broader concept -- "erase red from car". Then the erase pairs are built only from
prompts where the concept appears together with the context: template("red car") ->
template("car") (the anchor placed in the same context), so the context tokens, the end token
and the padding that follow the concept are remapped, while the concept's own tokens -- which
under a causal text encoder cannot see a context that comes after them -- are not. The preserve
set automatically gains, over the same templates, the context itself ("car"), the bare concept
("red"), the concept in the other contexts and the other variants of the context, both built
from the preserve phrases ("apple" -> "red apple"; "blue" -> "blue car"). Without preserve
phrases only the ridge and the first two keep red apples and blue cars.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .alignment import align_encoded
from .concepts import Concept
from .covariance import PairStats
from .interfaces import KVWeights, TextEncoder
from .ridge import solve_right
from .scope import apply_scope
from .templates import check_templates, fill
from .encoding_cache import cached
from .prior import add_prior
from .validation import check_number, require_finite

Progress = Callable[[int, int], None]
PRESERVE_BATCH = 64
# The nodes' ridge (presets' "recommended"): lambda 0.1 in units of the mean token energy, chosen by the
# worse of toy worlds v2 and v3 (docs/decisions.md, "Defaults in two worlds"; docs/results/cfr_ridge.json).
PACK_LAMBDA, PACK_RELATIVE_LAMBDA = 0.1, True


@dataclass(frozen=True)
class CFRConfig:
    lamb: float = 1.0
    """Ridge toward the original weights, in the reference's raw units (sum over token vectors)."""
    preserve_scale: float = 1.0
    """Weight of the preserve prompts relative to the erase pairs (scale free)."""
    concept_tokens: bool = False
    """Also map the concept's own tokens onto the anchor's (needed when CFR runs without the
    LoRA stage; MACE proper leaves the concept tokens to the LoRAs)."""
    relative_lambda: bool = False
    """Count ``lamb`` in units of the erase side's mean token energy, trace(B) / n_pairs, so that
    one value means the same on text encoders of different scales (toy v2's token vectors carry
    ~1.4, toy v3's ~380): the ridge then weighs like ``lamb`` average token vectors per direction."""

    def validate(self) -> None:
        check_number(self.lamb, "lambda", 0.0, 1e12)
        check_number(self.preserve_scale, "preserve_scale", 0.0, 1e12)


@dataclass
class CFRResult:
    weights: KVWeights
    deltas: KVWeights
    stats: PairStats
    transforms: dict[int, torch.Tensor] = field(default_factory=dict)  # input width -> M
    condition: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


def _encode_checked(encoder: TextEncoder, prompts: Sequence[str], what: str):
    try:
        return encoder.encode(list(prompts))
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def check_concepts(encoder: TextEncoder, concepts: Iterable[Concept], default_anchor: str, field_name: str) -> None:
    """Every phrase must tokenize to at least one token and differ from its anchor."""
    for concept in concepts:
        anchor = default_anchor if concept.anchor is None else concept.anchor
        for phrase in concept.phrases:
            try:
                ids = encoder.tokenize(phrase)
            except ValueError as err:
                raise ValueError(f"{field_name}, line {concept.line}: {err}") from None
            if not ids:
                raise ValueError(f"{field_name}, line {concept.line}: {phrase!r} gives no tokens; use words")
            if phrase == anchor:
                raise ValueError(
                    f"{field_name}, line {concept.line}: {phrase!r} equals its anchor; choose another anchor"
                )


def add_concept_pairs(
    stats: PairStats, encoder: TextEncoder, concept: Concept, templates: Sequence[str], anchor: str,
    concept_tokens: bool = False,
) -> None:
    """Accumulate the aligned (context, anchor-input) pairs of one concept over all templates."""
    own_tokens = concept_tokens if concept.concept_tokens is None else (concept_tokens and concept.concept_tokens)
    anchor_prompts = [fill(t, anchor) for t in templates]
    new = _encode_checked(encoder, anchor_prompts, f"anchor {anchor!r} (shorten the anchor to a few words)")
    for phrase in concept.phrases:
        old = _encode_checked(encoder, [fill(t, phrase) for t in templates], f"concept line {concept.line}")
        for o, n in zip(old, new):
            a = align_encoded(o, n, own_tokens)
            stats.add_pairs(o.features[list(a.old)], n.features[list(a.new)])


def add_preserve_prompts(stats: PairStats, encoder: TextEncoder, prompts: Sequence[str], batch: int = 64,
                         on_batch: Callable[[], None] | None = None) -> None:
    """Every position of every preserve prompt (padding included) is a preserve vector.

    ``on_batch()`` runs after every batch of ``batch`` prompts (a progress / interrupt point)."""
    for i in range(0, len(prompts), batch):
        for enc in _encode_checked(encoder, prompts[i : i + batch], "preserve"):
            stats.add_preserve(enc.features)
        if on_batch is not None:
            on_batch()


def build_stats(
    encoder: TextEncoder,
    concepts: Sequence[Concept],
    templates: Sequence[str],
    default_anchor: str = "",
    preserve_prompts: Sequence[str] = (),
    progress: Progress | None = None,
    field_name: str = "concepts",
    concept_tokens: bool = False,
) -> PairStats:
    check_templates(templates)
    check_concepts(encoder, concepts, default_anchor, field_name)
    dim = _encode_checked(encoder, [fill(templates[0], default_anchor)],
                          f"anchor {default_anchor!r} (shorten the anchor to a few words)")[0].features.shape[1]
    stats = PairStats(dim)
    batches = -(-len(preserve_prompts) // PRESERVE_BATCH)
    total = len(concepts) + batches + 1
    for k, concept in enumerate(concepts):  # progress (an interrupt point for callers) after every concept
        anchor = default_anchor if concept.anchor is None else concept.anchor
        add_concept_pairs(stats, encoder, concept, templates, anchor, concept_tokens)
        if progress:
            progress(k + 1, total)
    done = [len(concepts)]

    def preserve_batch() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    add_preserve_prompts(stats, encoder, list(preserve_prompts), PRESERVE_BATCH, preserve_batch)
    if progress:
        progress(total, total)
    return stats


def preserve_weight(stats: PairStats, preserve_scale: float) -> float:
    if preserve_scale < 0:
        raise ValueError(f"preserve_scale must be >= 0, got {preserve_scale}")
    return preserve_scale * stats.n_pairs / stats.n_preserve if stats.n_preserve else 0.0


def token_energy(stats: PairStats) -> float:
    """The erase side's mean squared token norm, trace(B) / n_pairs: the unit of a relative lambda."""
    if not stats.n_pairs:
        raise ValueError("relative lambda: no erase pairs to measure the token scale on; give concepts")
    return float(stats.B.trace()) / stats.n_pairs


def cfr_transform(stats: PairStats, config: CFRConfig) -> tuple[torch.Tensor, float]:
    """M = (lamb I + G + sP)(lamb I + B + sP)^-1, the right factor every weight is multiplied by
    (lamb times ``token_energy`` under ``relative_lambda``)."""
    if config.lamb < 0:
        raise ValueError(f"lambda must be >= 0, got {config.lamb}")
    s = preserve_weight(stats, config.preserve_scale)
    eye = torch.eye(stats.dim, dtype=torch.float64)
    lamb = config.lamb * (token_energy(stats) if config.relative_lambda else 1.0)
    A = lamb * eye + stats.B + s * stats.P
    R = lamb * eye + stats.G + s * stats.P
    return solve_right(R, A, hint="raise lambda or add preserve prompts")


def apply_transform(weights: KVWeights, transforms: dict[int, torch.Tensor]) -> tuple[KVWeights, KVWeights]:
    """W' = W M per weight; returns (new weights, deltas), both float32.

    The delta is W (M - I) with M - I formed in float64 and the product taken in float32: the
    delta is small next to W, so this keeps its relative error at float32 level at a quarter
    of the cost of a float64 product.
    """
    new, deltas = {}, {}
    steps: dict[tuple, torch.Tensor] = {}
    for name, w in weights.items():
        key = (w.shape[1], w.device)
        if key not in steps:
            M = transforms[w.shape[1]]
            steps[key] = (M - torch.eye(M.shape[0], dtype=M.dtype)).to(device=w.device, dtype=torch.float32)
        w32 = w.detach().to(torch.float32)
        delta = w32 @ steps[key]
        deltas[name] = delta
        new[name] = w32 + delta
    return new, deltas


def refine_cross_attention(
    encoder: TextEncoder,
    weights: KVWeights,
    concepts: Sequence[Concept],
    templates: Sequence[str],
    default_anchor: str = "",
    preserve_prompts: Sequence[str] = (),
    config: CFRConfig = CFRConfig(),
    progress: Progress | None = None,
    field_name: str = "concepts",
    erase_from=None,
    preserve_phrases: Sequence[str] = (),
    prior: tuple[torch.Tensor, float] | None = None,
    extra_pairs: PairStats | None = None,
) -> CFRResult:
    """Run CFR for all concepts at once; the input weights are never modified.

    ``prior`` = (moment, weight): the general caption prior (``prior.add_prior``) joins the preserve set.
    ``extra_pairs``: more erase pairs (e.g. ``adversarial.embedding_pairs``, adversarially found
    embeddings mapped onto the anchor); only their pair sums (G, B) join.

    ``erase_from`` (str, list of str or None) restricts the erasure to those contexts; the
    ``preserve_phrases`` (e.g. the user's preserve list) are then crossed with the concepts and
    the contexts into extra preserve prompts (see the module docstring)."""
    if not weights:
        raise ValueError("model: no cross-attention to_k/to_v weights found")
    config.validate()
    require_finite(weights, "CFR: the model's K/V weights", "load a model without NaN/inf weights")
    start = time.perf_counter()
    encoder = cached(encoder)  # every concept's pairs re-encode the same anchor prompts
    if erase_from:
        check_concepts(encoder, concepts, default_anchor, field_name)
        concepts, extra = apply_scope(concepts, erase_from, templates, default_anchor, preserve_phrases)
        preserve_prompts = list(preserve_prompts) + extra
    stats = build_stats(encoder, concepts, templates, default_anchor, preserve_prompts, progress, field_name,
                        config.concept_tokens)
    if extra_pairs is not None:
        if extra_pairs.dim != stats.dim:
            raise ValueError(f"extra_pairs: width {extra_pairs.dim}, the text encoder gives {stats.dim}")
        stats.G, stats.B = stats.G + extra_pairs.G, stats.B + extra_pairs.B
        stats.n_pairs += extra_pairs.n_pairs
    if prior is not None:
        add_prior(stats, *prior)
    widths = sorted({w.shape[1] for w in weights.values()})
    if widths != [stats.dim]:
        raise ValueError(
            f"model/clip mismatch: K/V weights read width(s) {widths} but the text encoder gives {stats.dim}; "
            "connect the CLIP that belongs to this model"
        )
    require_finite({"G": stats.G, "B": stats.B, "P": stats.P}, "CFR: the text encoder's features",
                   "the CLIP gives NaN/inf features; use the CLIP that belongs to the model")
    M, cond = cfr_transform(stats, config)
    new, deltas = apply_transform(weights, {stats.dim: M})
    require_finite(deltas, "CFR", "raise lambda or add preserve prompts")
    return CFRResult(new, deltas, stats, {stats.dim: M}, {stats.dim: cond}, time.perf_counter() - start)

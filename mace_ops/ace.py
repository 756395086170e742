"""ACE-style gated erasure: each concept's K/V-input directions nulled out only where a gate detects
the concept (designed from the abstract of arXiv 2504.11850, "Attentional Concept Erasure"; no code
of theirs used). Every template is filled with each phrase of concept i and with its anchor and
aligned (``alignment.align``); U_i (d x r) are the top-r right singular vectors of the aligned K/V
input differences c − e and m_i = mean U_iᵀ e. The edit (every attn2 K and V at once):

    c' = c + Σ_i g_i(c) U_i (m_i − U_iᵀ c)

    g_i at position j = max over l ≤ j of  tanh(max(0, s_l − τ_i) / T),   s_l = max_q cos(c_l, q)

q over concept i's prototypes (its features at the concept tokens of every template); the max over
earlier positions follows the causal encoder. The ramp is closed exactly at and below τ_i, so a
prompt below every threshold is left bit-identical (``gate`` "sigmoid", sigmoid((s − τ_i) / T), is
the first gate, read from older files). τ_i = max(quantile_i, floor) + ``margin``: quantile_i is the
``quantile`` over the calibration prompts (preserve list, captions; those naming concept i left
out) of each prompt's peak similarity; the floor, shared, is the split-conformal quantile of the
preserve list's identities (``open_rate`` α; groups by phrase, each scored by its peak over its
prompts and every concept):  floor = s_(k),  k = ⌈(1 − α)(G + 1)⌉ of the G group scores, so a new
identity exchangeable with the list opens any gate with probability ≤ α.
``fit_gated_erasure(adversarial=...)`` adds soft prompts an attack found to the prototypes and
directions and refits the same closed form, dropping any as close to an ordinary calibration
prompt as the threshold. Not a weight patch: in ComfyUI an ``attn2_patch`` on a clone (node ``MACE
Gated Erasure (ACE)``, and the Load node for files ``save_gated_erasure`` writes; a stock loader
reads their ``.diff`` fallback, e.g. ``linear_part``, the ungated −W U_i U_iᵀ). What was tried and
the toy-world numbers behind each choice: docs/code-notes.md#mace_opsacepy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import torch

from .alignment import align
from .concepts import Concept, normalise_phrase
from .interfaces import KVWeights, TextEncoder
from .templates import check_templates, fill
from .validation import check_number

STATE_KEYS = ("prototypes", "owner", "thresholds", "bases", "targets")
GATE_FORMAT = "gate-1"
GATE_PREFIX = "mace_gate."
GATE_SHAPES = ("ramp", "sigmoid")   # "sigmoid": the first gate, centred on the threshold
LEGACY_SHAPE = "sigmoid"            # what a gate file without ``mace.gate_shape`` holds


def check_shape(shape: str, field: str = "gate") -> str:
    if shape not in GATE_SHAPES:
        raise ValueError(f"{field}: {shape!r} is not a gate shape; choose one of {', '.join(GATE_SHAPES)}")
    return shape


TEMPERATURE = 0.005   # the ramp's scale (cosine units)


@dataclass(frozen=True)
class ACEConfig:
    rank: int = 8
    quantile: float = 0.999
    margin: float = 0.0
    temperature: float = TEMPERATURE
    open_rate: float = 0.05    # alpha of the shared floor; 1 = no floor
    gate: str = "ramp"         # GATE_SHAPES

    def validate(self) -> None:
        check_number(self.rank, "rank", 1, 4096, integer=True)
        check_number(self.quantile, "quantile", 0.0, 1.0)
        check_number(self.margin, "margin", -2.0, 2.0)
        check_number(self.temperature, "temperature", 1e-6, 10.0)
        check_number(self.open_rate, "open_rate", 0.0, 1.0)
        check_shape(self.gate)


@dataclass
class GatedErasure:
    prototypes: torch.Tensor   # (m, d) unit rows
    owner: torch.Tensor        # (m,) long: the concept each prototype belongs to
    thresholds: torch.Tensor   # (n,)
    bases: torch.Tensor        # (n, d, r) U_i
    targets: torch.Tensor      # (n, r) m_i
    temperature: float = TEMPERATURE
    shape: str = "ramp"        # GATE_SHAPES

    @property
    def n_concepts(self) -> int:
        return int(self.thresholds.shape[0])

    def similarity(self, ctx: torch.Tensor) -> torch.Tensor:
        """(..., L, d) -> (..., L, n): max cosine to each concept's prototypes."""
        c = torch.nn.functional.normalize(ctx.float(), dim=-1)
        sims = c @ self.prototypes.T.to(c)
        out = torch.full((*sims.shape[:-1], self.n_concepts), -2.0, dtype=sims.dtype, device=sims.device)
        idx = self.owner.to(sims.device).expand(*sims.shape[:-1], -1)
        return out.scatter_reduce(-1, idx, sims, reduce="amax")

    def gates(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, n) gates in [0, 1], carried forward along the positions."""
        x = (self.similarity(ctx) - self.thresholds.to(ctx.device)) / self.temperature
        g = torch.tanh(x.clamp(min=0)) if self.shape == "ramp" else torch.sigmoid(x)
        return torch.cummax(g, dim=-2).values

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        g = self.gates(ctx)                                   # (B, L, n)
        U = self.bases.to(ctx.device, torch.float32)          # (n, d, r)
        coords = torch.einsum("bld,ndr->blnr", ctx.float(), U) - self.targets.to(ctx.device).float()
        delta = torch.einsum("bln,blnr,ndr->bld", g, coords, U)
        return (ctx.float() - delta).to(ctx.dtype)

    def linear_part(self, weights: KVWeights) -> KVWeights:
        """The ungated K/V deltas: W -> -W sum_i U_i U_i^T (no offset): what a stock LoRA can hold."""
        U = self.bases.double()
        P = torch.einsum("ndr,ner->de", U, U)
        return {k: -(w.double() @ P).to(w.dtype) for k, w in weights.items()}

    def to(self, device) -> "GatedErasure":
        return GatedErasure(*(getattr(self, k).to(device) for k in STATE_KEYS), temperature=self.temperature,
                            shape=self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().contiguous() for k in STATE_KEYS}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], temperature: float, shape: str = "ramp") -> "GatedErasure":
        missing = [k for k in STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"gated erasure: missing tensors {missing}")
        return cls(*(sd[k] for k in STATE_KEYS), temperature=float(temperature), shape=check_shape(shape, "gate shape"))


def concept_slot(o, n) -> tuple[int, int]:
    """[start, stop) of the concept's (or soft) tokens in prompt o against its anchor prompt n."""
    a, b = o.ids[: o.length], n.ids[: n.length]
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    return pre, max(pre + 1, len(a) - suf)


def _pairs(encoded, anchors):
    """(concept-side rows, anchor rows, concept-token rows) of aligned prompts, from the concept on."""
    cs, es, protos = [], [], []
    for o, n in zip(encoded, anchors):
        a = align(o.ids, o.length, n.ids, n.length, True)
        old, new = torch.tensor(a.old), torch.tensor(a.new)
        start, stop = concept_slot(o, n)
        keep = old >= start                                   # the positions that carry the concept
        cs.append(o.features[old[keep]].detach().float())
        es.append(n.features[new[keep]].detach().float())
        protos.append(o.features[start:stop].detach().float())
    return torch.cat(cs), torch.cat(es), torch.cat(protos)


@torch.no_grad()
def fit_gated_erasure(
    encoder: TextEncoder,
    concepts: Sequence[Concept],
    templates: Sequence[str],
    anchor: str,
    calibration_prompts: Sequence[str],
    config: ACEConfig = ACEConfig(),
    adversarial: Mapping[int, Sequence[torch.Tensor]] | None = None,
    calibration_groups: Sequence[Hashable | None] | None = None,
) -> GatedErasure:
    """Fit the gated erasure of ``concepts`` (``adversarial``: concept index -> soft prompts found).
    ``calibration_groups``: one label per calibration prompt, the identity it belongs to (e.g. the
    preserve phrase it was filled with); None = in no group. Only labelled prompts set the shared
    floor; without labels there is no floor."""
    config.validate()
    check_templates(templates)
    if not concepts:
        raise ValueError("concepts: nothing to erase")
    if not calibration_prompts:
        raise ValueError("calibration prompts: need the preserve list (and captions) to set the gate")
    if calibration_groups is not None and len(calibration_groups) != len(calibration_prompts):
        raise ValueError(f"calibration_groups: {len(calibration_groups)} labels for {len(calibration_prompts)} "
                         "calibration prompts; give one label (or None) per prompt")
    anchor_enc = encoder.encode([fill(t, anchor) for t in templates])
    protos, owner, found, bases, targets = [], [], [], [], []
    for i, concept in enumerate(concepts):
        a = concept.anchor if concept.anchor is not None else anchor
        anchors = anchor_enc if a == anchor else encoder.encode([fill(t, a) for t in templates])
        cs, es, ps = [], [], []
        sets = [encoder.encode([fill(t, ph) for t in templates]) for ph in concept.phrases]
        sets += [encoder.encode_embeddings(list(templates), v) for v in (adversarial or {}).get(i, ())]
        for k, enc in enumerate(sets):
            c, e, p = _pairs(enc, anchors)
            cs.append(c), es.append(e), ps.append(p)
            found.append(torch.full((p.shape[0],), k >= len(concept.phrases)))
        C, E = torch.cat(cs).double(), torch.cat(es).double()
        r = min(config.rank, C.shape[1])
        U = torch.linalg.svd(C - E, full_matrices=False).Vh[:r].T   # (d, r)
        bases.append(U.float())
        targets.append((E @ U).mean(0).float())
        P = torch.nn.functional.normalize(torch.cat(ps), dim=-1)
        protos.append(P)
        owner.append(torch.full((P.shape[0],), i, dtype=torch.long))
    prototypes, owners, is_found = torch.cat(protos), torch.cat(owner), torch.cat(found)
    calibration = encoder.encode(list(calibration_prompts))
    names = mentions(calibration_prompts, concepts)                          # (P, n)
    if bool(names.all(dim=0).any()):
        i = int(names.all(dim=0).nonzero()[0])
        raise ValueError(f"calibration prompts: every one names '{concepts[i].name}'; the gate needs ordinary "
                         "prompts (the preserve list or captions without the concept) to set its threshold")

    # Every prompt's peak similarity to every prototype, once (P, m); a gate's per-concept peaks
    # are its kept prototypes' maxima per owner, so both calibrations and the found-row check share it.
    row_peaks = prototype_peaks(prototypes, calibration)

    def calibrated(keep: torch.Tensor) -> GatedErasure:
        erasure = GatedErasure(prototypes[keep], owners[keep], torch.zeros(len(concepts)), torch.stack(bases),
                               torch.stack(targets), config.temperature, config.gate)
        peaks = _owner_max(row_peaks[:, keep], owners[keep], len(concepts))   # (P, n)
        erasure.thresholds = calibrated_thresholds(peaks, names, calibration_groups, config.quantile,
                                                   config.open_rate) + config.margin
        return erasure

    named = calibrated(~is_found)
    if not bool(is_found.any()):
        return named
    # A found prototype that an ordinary calibration prompt comes as close to as the named gate's
    # threshold marks a kept concept, not a way around the erasure: the preserve list wins, it is
    # dropped (left in, one such row lifts the shared floor, so every concept's threshold, to ~1).
    own = owners[is_found]
    closest = row_peaks[:, is_found].masked_fill(names[:, own], -2.0).amax(0)   # (rows,)
    keep = ~is_found
    keep[is_found] = closest <= named.thresholds[own]
    return calibrated(keep)


def _owner_max(row_peaks: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(P, m) peaks per prototype -> (P, n) per concept (max over its rows; -2 for a concept with none),
    exactly what ``GatedErasure.similarity`` reduces."""
    out = torch.full((row_peaks.shape[0], n), -2.0, dtype=row_peaks.dtype, device=row_peaks.device)
    return out.scatter_reduce(1, owner.to(row_peaks.device).expand(row_peaks.shape[0], -1), row_peaks, reduce="amax")


def calibrated_thresholds(peaks: torch.Tensor, names: torch.Tensor, groups: Sequence[Hashable | None] | None,
                          quantile: float, open_rate: float) -> torch.Tensor:
    """(n,) each concept's threshold from the calibration prompts' peaks (P, n): the ``quantile`` over
    the prompts that do not name it (``names``, (P, n) bool), at least the shared floor."""
    per_concept = torch.nanquantile(peaks.masked_fill(names, float("nan")), quantile, dim=0)
    return per_concept.clamp(min=shared_floor(peaks.masked_fill(names, -2.0), groups, open_rate))


def shared_floor(peaks: torch.Tensor, groups: Sequence[Hashable | None] | None, open_rate: float) -> float:
    """The split-conformal (1 - open_rate) quantile over labelled groups of each group's largest peak
    (``peaks``: (P, n), prompts that name a concept already set low); -inf without groups or at 1."""
    if groups is None or open_rate >= 1.0:
        return float("-inf")
    scores: dict = {}
    for label, s in zip(groups, peaks.amax(dim=1).tolist()):
        if label is not None:
            scores[label] = max(s, scores.get(label, -2.0))
    if not scores:
        return float("-inf")
    ranked = sorted(scores.values())
    k = min(math.ceil((1.0 - open_rate) * (len(ranked) + 1)), len(ranked))   # >= 1: open_rate < 1 here
    return ranked[k - 1]


def mentions(prompts: Sequence[str], concepts: Sequence[Concept]) -> torch.Tensor:
    """(P, n) bool: prompt p names concept i (one of its phrases, whole words, case-insensitive)."""
    pats = [re.compile("|".join(rf"(?<!\w){re.escape(ph)}(?!\w)" for ph in c.phrases)) for c in concepts]
    texts = [normalise_phrase(p) for p in prompts]
    return torch.tensor([[bool(pat.search(t)) for pat in pats] for t in texts], dtype=torch.bool).reshape(len(texts), len(pats))


def prompt_peaks(erasure: GatedErasure, encoded, chunk: int = 256) -> torch.Tensor:
    """(P, n): each prompt's largest similarity to each concept, over all its positions (pads too:
    the gate sees them)."""
    return _owner_max(prototype_peaks(erasure.prototypes, encoded, chunk), erasure.owner, erasure.n_concepts)


def prototype_peaks(prototypes: torch.Tensor, encoded, chunk: int = 256) -> torch.Tensor:
    """(P, m): each prompt's largest cosine to each prototype row, over all its positions. Prompts
    of one length are stacked ``chunk`` at a time, so thousands of 77-token prompts fit in memory."""
    peaks = [None] * len(encoded)
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(int(e.features.shape[0]), []).append(i)
    for idx in by_length.values():
        for k in range(0, len(idx), chunk):
            part = idx[k:k + chunk]
            feats = torch.nn.functional.normalize(torch.stack([encoded[i].features.float() for i in part]), dim=-1)
            for i, row in zip(part, (feats @ prototypes.T.to(feats)).amax(dim=1)):
                peaks[i] = row
    return torch.stack(peaks)


def attn2_patch(erasure: GatedErasure):
    """A ComfyUI ``attn2_patch`` (``ModelPatcher.set_model_attn2_patch``): the gated null-out applied
    to the context the keys read and to the one the values read (plain torch, no ComfyUI import).
    The gate's tensors are copied to the context's device once, not on every call."""
    on_device: dict = {}

    def patch(n, context, value, extra_options):
        e = on_device.get(context.device)
        if e is None:
            e = on_device.setdefault(context.device, erasure.to(context.device))
        return n, e(context), e(value)
    return patch


def save_gated_erasure(path: str, erasure: GatedErasure, base_fingerprint: str, info: Mapping,
                       fallback_deltas: KVWeights | None = None, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """One safetensors file: the gate (``mace_gate.*``, float32) and, as ``<module>.diff``, the K/V
    deltas a stock LoRA loader applies instead (``fallback_deltas``; e.g. the CFR erasure of the same
    concepts). The gate's own ungated ``linear_part`` is *not* a good fallback: on toy world v2 it
    keeps H 0.85 at 1 name but draws no name at all at 10 (README, "How robust is it")."""
    from .erasure_file import atomic_save, diff_key, mace_metadata  # local: erasure_file imports torch I/O
    from . import __version__
    tensors = {GATE_PREFIX + k: v.float() if v.is_floating_point() else v for k, v in erasure.state_dict().items()}
    tensors.update({diff_key(k): v.detach().cpu().to(dtype) for k, v in (fallback_deltas or {}).items()})
    metadata = mace_metadata({"mace.format": GATE_FORMAT, "mace.pack_version": __version__,
                              "mace.base_model": base_fingerprint, "mace.gate_temperature": str(erasure.temperature),
                              "mace.gate_shape": erasure.shape},
                             info)
    atomic_save(tensors, path, metadata)
    return metadata


def load_gated_erasure(path: str) -> tuple[GatedErasure, dict[str, str]]:
    """(gate, metadata) of a file ``save_gated_erasure`` wrote; ValueError naming the file otherwise."""
    gate, _fallback, metadata = load_gated_file(path)
    return gate, metadata


def load_gated_file(path: str) -> tuple[GatedErasure, KVWeights, dict[str, str]]:
    """(gate, fallback deltas keyed by weight name, metadata) of a ``save_gated_erasure`` file."""
    import os
    from .erasure_file import read_mace_file, weight_name
    from .validation import require_file_values
    metadata, tensors = read_mace_file(path, GATE_FORMAT, "gated erasure")
    require_file_values(tensors, os.path.basename(path), "the file is damaged or was saved from a broken run; save it again")
    state = {k[len(GATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(GATE_PREFIX)}
    fallback = {weight_name(k): v for k, v in tensors.items() if k.endswith(".diff")}
    shape = metadata.get("mace.gate_shape", LEGACY_SHAPE)
    if shape not in GATE_SHAPES:
        raise ValueError(f"{os.path.basename(path)}: gate shape {shape!r} is not one this version of the pack knows "
                         f"({', '.join(GATE_SHAPES)}); update comfyui-mace to load it")
    try:
        temperature = float(metadata["mace.gate_temperature"])
        return GatedErasure.from_state_dict(state, temperature, shape), fallback, metadata
    except (KeyError, ValueError) as err:
        raise ValueError(f"{os.path.basename(path)}: not a complete gated erasure ({err})") from None

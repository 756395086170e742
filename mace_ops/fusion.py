"""MACE stage 3: fuse many concept LoRAs into one K/V weight per matrix, in closed form.

With W' the current (CFR-refined) weight, W0 the original weight, ΔW_i concept i's LoRA delta,
C_i = sum c c^T over every window position of concept i's template prompts (all phrases), and P
the covariance of the preserve prompts, fusion solves

    min_W  sum_i sum_{c in E_i} ||W c - (W' + ΔW_i) c||^2 + s sum_p ||W p - R p||^2 + lamb ||W - W'||^2
    W* = [W'(lamb I + sum C_i) + sum ΔW_i C_i + s R P] [lamb I + sum C_i + s P]^-1
       = W' + [sum ΔW_i C_i + s (R - W') P] [lamb I + sum C_i + s P]^-1

R, what the preserve prompts are kept at (``preserve_to``): "original" — R = W0, the paper's form, in
which the preserve term also pulls back whatever CFR moved on directions the preserve set shares
with the concepts (fusion redoes stage 1's trade-off with its own weights); "current" — R = W', so
W* = W' + [sum ΔW_i C_i][lamb I + sum C_i + s P]^-1: with no LoRA (ΔW = 0) fusion returns W'
exactly, and the LoRAs are only added where the preserve set does not hold them back.

The concepts are streamed one at a time into a ``FusionAccumulator``: a shared d x d sum of C_i
and, per weight, the (out, d) sum of ΔW_i C_i (computed in low-rank form as up (down C_i)). Its
size does not depend on the number of concepts. The right-hand sides of all weights are stacked
into one (sum of out, d) matrix and solved with one factorisation (``ridge.solve_right``).
``s = preserve_scale * n_vectors / n_preserve``, the convention of ``cfr.preserve_weight``: a
preserve_scale of 1 gives the preserve prompts the same total weight as all concept vectors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch

from .alignment import find_subsequence
from .cfr import add_preserve_prompts, preserve_weight
from .concepts import Concept
from .covariance import PairStats
from .interfaces import KVWeights, TextEncoder
from .lora import KVLora, LoraFactors
from .prior import add_prior
from .ridge import solve_right
from .templates import check_templates, fill
from .validation import check_number, require_finite

LoraLike = Union[KVLora, Mapping[str, LoraFactors], Mapping[str, torch.Tensor]]
Templates = Union[Sequence[str], Callable[[Concept], Sequence[str]]]
Progress = Callable[[int, int], None]
HINT = "raise lambda, add templates or add preserve prompts"


@dataclass
class FusionResult:
    weights: KVWeights  # fused weights, float32
    deltas: KVWeights  # fused - current, float32
    condition: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    n_concepts: int = 0
    n_vectors: int = 0


POSITIONS = ("all", "concept")
PRESERVE_TO = ("current", "original")
DEFAULT_PRESERVE_TO = "original"  # the paper's form
# "auto" (the nodes' default), from bench.mass_quality (toy world v2). Without the LoRA null space, by
# concept type: styles gained 0.04-0.14 H at 1-10 erased with "current"; names gained 0.03-0.04 at 1-10
# but lost 0.15 at 100 (the retained names fell 0.42 -> 0.18), so every other type keeps the paper's form.
# With null-space LoRAs (``LoraTrainConfig.null_space`` > 0) always "current": such a LoRA cannot act on
# the preserve set's directions, so fusing at W0 would only pull back CFR's edit there (1 name: H 0.69
# vs 0.96, 10 names 0.70 vs 0.75, bench.mace_variants null_space_99 vs null_space_99_current).
PRESERVE_TO_BY_TYPE = {"style": "current"}


def check_preserve_to(value: str, allow_auto: bool = False) -> str:
    choices = list(PRESERVE_TO) + (["auto"] if allow_auto else [])
    if value not in choices:
        raise ValueError(f"fusion preserve_to: unknown {value!r}; choose one of {choices}")
    return value


def preserve_to_for(concept_type: str, choice: str = "auto", null_space: bool = False) -> str:
    """``choice``, or for "auto": "current" when the LoRAs were trained in the preserve set's null space
    (``null_space``), else the measured default of ``concept_type`` (``PRESERVE_TO_BY_TYPE``)."""
    check_preserve_to(choice, allow_auto=True)
    if choice != "auto":
        return choice
    return "current" if null_space else PRESERVE_TO_BY_TYPE.get(concept_type, DEFAULT_PRESERVE_TO)


def concept_covariance(
    encoder: TextEncoder, concept: Concept, templates: Sequence[str], batch: int = 64, positions: str = "all"
) -> tuple[torch.Tensor, int]:
    """C = sum c c^T over the positions of every template filled with every phrase (float64).

    ``positions``: "all" — every window position (the reference); "concept" — from the concept's
    first token to the end of the window (the positions whose features carry the concept in a causal
    encoder; the start token and the words before it equal those of preserved prompts)."""
    check_templates(templates)
    if positions not in POSITIONS:
        raise ValueError(f"fusion positions: unknown {positions!r}; choose one of {list(POSITIONS)}")
    filled = [(fill(t, phrase), phrase) for phrase in concept.phrases for t in templates]
    prompts = [p for p, _ in filled]
    phrase_ids = {ph: encoder.tokenize(ph) for ph in concept.phrases} if positions == "concept" else {}
    C, n = None, 0
    for i in range(0, len(prompts), batch):
        try:
            encoded = encoder.encode(prompts[i : i + batch])
        except ValueError as err:
            raise ValueError(f"concept line {concept.line}: {err}") from None
        for enc, (_, phrase) in zip(encoded, filled[i : i + batch]):
            f = enc.features.detach().to(device="cpu", dtype=torch.float64)
            if positions == "concept":
                starts = find_subsequence(list(enc.ids[: enc.length]), phrase_ids[phrase])
                f = f[starts[0]:] if starts else f
            C = f.T @ f if C is None else C + f.T @ f
            n += f.shape[0]
    return C, n


def _as_deltas_times(lora: LoraLike, C: torch.Tensor) -> dict[str, torch.Tensor]:
    """ΔW C per weight name (float64), using the low-rank form when factors are given."""
    items = lora.factors() if isinstance(lora, KVLora) else lora
    out = {}
    for name, item in items.items():
        if isinstance(item, LoraFactors):
            width = item.down.shape[1]
        elif isinstance(item, torch.Tensor) and item.ndim == 2:
            width = item.shape[1]
        else:
            raise TypeError(f"LoRA {name}: expected LoraFactors or a 2-D delta tensor, got {type(item).__name__}")
        if width != C.shape[0]:
            raise ValueError(
                f"model/clip mismatch: LoRA {name} reads width {width}, the text encoder gives {C.shape[0]}; "
                "connect the CLIP that belongs to this model (clip input), or LoRAs made for this model"
            )
        if isinstance(item, LoraFactors):
            up = item.up.detach().to(device="cpu", dtype=torch.float64)
            down = item.down.detach().to(device="cpu", dtype=torch.float64)
            out[name] = item.scale * (up @ (down @ C))
        else:
            out[name] = item.detach().to(device="cpu", dtype=torch.float64) @ C
    return out


def _lora_tensors(lora: LoraLike) -> dict[str, torch.Tensor]:
    items = lora.factors() if isinstance(lora, KVLora) else lora
    out = {}
    for name, item in items.items():
        if isinstance(item, LoraFactors):
            out[name + ":up"], out[name + ":down"] = item.up, item.down
        elif isinstance(item, torch.Tensor):
            out[name] = item
    return out


class FusionAccumulator:
    """Running sums for fusion: sum C_i (d x d) and, per weight, sum ΔW_i C_i (out x d)."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.C_sum = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.targets: dict[str, torch.Tensor] = {}
        self.n_concepts = 0
        self.n_vectors = 0

    def add_concept(self, lora: LoraLike, C: torch.Tensor, n_vectors: int = 0) -> None:
        """Add one concept: its LoRA (factors, KVLora or full deltas) and its covariance C_i."""
        C = C.detach().to(device="cpu", dtype=torch.float64)
        require_finite(C, "fusion: the text encoder's features", "use the CLIP that belongs to the model")
        require_finite(_lora_tensors(lora), "fusion: a LoRA",
                       "retrain that LoRA with a lower learning rate; nothing was fused")
        if C.shape != (self.dim, self.dim):
            raise ValueError(f"fusion: covariance must be {self.dim}x{self.dim}, got {tuple(C.shape)}")
        products = _as_deltas_times(lora, C)
        for name, dc in products.items():
            if name in self.targets:
                if self.targets[name].shape != dc.shape:
                    raise ValueError(
                        f"fusion: LoRA {name} has shape {tuple(dc.shape)}, earlier {tuple(self.targets[name].shape)}"
                    )
                self.targets[name] += dc
            else:
                self.targets[name] = dc
        self.C_sum += C
        self.n_concepts += 1
        self.n_vectors += int(n_vectors)

    def state_numel(self) -> int:
        return self.C_sum.numel() + sum(t.numel() for t in self.targets.values())

    def deltas64(
        self,
        current: KVWeights,
        original: KVWeights | None = None,
        lamb: float = 1.0,
        preserve: PairStats | None = None,
        preserve_scale: float = 0.0,
        preserve_to: str = DEFAULT_PRESERVE_TO,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """W* - W' per weight in float64, and the condition number of the system matrix."""
        check_preserve_to(preserve_to)
        if lamb < 0:
            raise ValueError(f"lambda must be >= 0, got {lamb}")
        unknown = sorted(set(self.targets) - set(current))
        if unknown:
            raise ValueError(f"fusion: the model lacks {len(unknown)} LoRA weight(s), e.g. {unknown[0]}")
        widths = sorted({w.shape[1] for w in current.values()})
        if widths != [self.dim]:
            raise ValueError(
                f"model/clip mismatch: K/V weights read width(s) {widths} but the text encoder gives {self.dim}; "
                "connect the CLIP that belongs to this model (clip input)"
            )
        s = 0.0
        if preserve is not None and preserve.n_preserve:
            counts = PairStats(self.dim)
            counts.n_pairs, counts.n_preserve = self.n_vectors, preserve.n_preserve
            s = preserve_weight(counts, preserve_scale)
        if s > 0 and original is None and preserve_to == "original":
            raise ValueError("fusion: preservation needs the original weights")
        eye = torch.eye(self.dim, dtype=torch.float64)
        A = lamb * eye + self.C_sum
        if s > 0:
            A = A + s * preserve.P
        names = list(current)
        R = torch.empty(sum(current[k].shape[0] for k in names), self.dim, dtype=torch.float64)
        row = 0
        for name in names:  # stack every weight's right-hand side: one solve for this width
            w = current[name]
            block = R[row : row + w.shape[0]]
            if name in self.targets:
                block.copy_(self.targets[name])
            else:
                block.zero_()
            if s > 0 and preserve_to == "original":
                w0 = original[name].detach().to(device="cpu", dtype=torch.float64)
                block += s * ((w0 - w.detach().to(device="cpu", dtype=torch.float64)) @ preserve.P)
            row += w.shape[0]
        X, cond = solve_right(R, A, hint=HINT)
        deltas, row = {}, 0
        for name in names:
            n = current[name].shape[0]
            deltas[name] = X[row : row + n]
            row += n
        return deltas, cond

    def solve(
        self,
        current: KVWeights,
        original: KVWeights | None = None,
        lamb: float = 1.0,
        preserve: PairStats | None = None,
        preserve_scale: float = 0.0,
        preserve_to: str = DEFAULT_PRESERVE_TO,
    ) -> tuple[KVWeights, KVWeights, float]:
        """(fused weights, deltas vs current, condition number), float32 on the weights' devices."""
        deltas64, cond = self.deltas64(current, original, lamb, preserve, preserve_scale, preserve_to)
        weights, deltas = {}, {}
        for name, w in current.items():
            w64 = w.detach().to(device="cpu", dtype=torch.float64)
            deltas[name] = deltas64[name].to(device=w.device, dtype=torch.float32)
            weights[name] = (w64 + deltas64[name]).to(device=w.device, dtype=torch.float32)
        return weights, deltas, cond


def fuse_loras(
    encoder: TextEncoder,
    current_weights: KVWeights,
    original_weights: KVWeights | None,
    concept_loras: Iterable[tuple[Concept, LoraLike]],
    templates: Templates,
    preserve_prompts: Sequence[str] = (),
    lamb: float = 1.0,
    preserve_scale: float = 1.0,
    progress: Progress | None = None,
    total: int | None = None,
    positions: str = "all",
    prior: tuple[torch.Tensor, float] | None = None,
    preserve_stats: PairStats | None = None,
    preserve_to: str = DEFAULT_PRESERVE_TO,
) -> FusionResult:
    """Fuse the LoRAs (streamed one concept at a time); the input weights are never modified.

    ``templates`` is one list for every concept or a function concept -> templates.
    ``total`` (defaults to len(concept_loras) when it has one) is what ``progress`` counts to.
    ``prior`` = (moment, weight): the general caption prior joins the preserve set (``prior.add_prior``).
    ``preserve_stats``: the preserve set already accumulated (e.g. by CFR, prior included); then
    ``preserve_prompts`` and ``prior`` are not encoded again.
    ``preserve_to``: keep the preserve prompts at the original weights (the paper) or at the current ones.
    """
    if not current_weights:
        raise ValueError("model: no cross-attention to_k/to_v weights found")
    check_number(lamb, "lambda", 0.0, 1e12)
    check_number(preserve_scale, "preserve_scale", 0.0, 1e12)
    check_preserve_to(preserve_to)
    require_finite(current_weights, "fusion: the model's K/V weights", "load a model without NaN/inf weights")
    start = time.perf_counter()
    if total is None:
        total = len(concept_loras) if hasattr(concept_loras, "__len__") else 0
    acc: FusionAccumulator | None = None
    done = 0
    for concept, lora in concept_loras:
        tpl = templates(concept) if callable(templates) else templates
        C, n = concept_covariance(encoder, concept, tpl, positions=positions)
        if acc is None:
            acc = FusionAccumulator(C.shape[0])
        acc.add_concept(lora, C, n)
        done += 1
        if progress:
            progress(done, max(total, done) + 1)
    if acc is None:
        raise ValueError("fusion: no concept LoRA given")
    if preserve_stats is not None:
        if prior is not None:
            raise ValueError("fusion: the prior goes into preserve_stats or comes as prior, not both")
        if preserve_stats.dim != acc.dim:
            raise ValueError(f"fusion: preserve statistics of width {preserve_stats.dim}, the text encoder gives {acc.dim}")
        preserve = preserve_stats
    else:
        preserve = PairStats(acc.dim)
        add_preserve_prompts(preserve, encoder, list(preserve_prompts),
                             on_batch=(lambda: progress(done, max(total, done) + 1)) if progress else None)
        if prior is not None:
            add_prior(preserve, *prior)
    weights, deltas, cond = acc.solve(current_weights, original_weights, lamb, preserve, preserve_scale,
                                      preserve_to)
    require_finite(deltas, "fusion", "raise lambda or add preserve prompts")
    if progress:
        progress(max(total, done) + 1, max(total, done) + 1)
    return FusionResult(weights, deltas, {acc.dim: cond}, time.perf_counter() - start, acc.n_concepts, acc.n_vectors)

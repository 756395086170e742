"""The ACE gate compiled into a text encoder's MLP: a weight edit a stock LoRA loader can carry.

A pre-norm text layer adds m(ln(r)) to its residual r, with ln(r) = gamma * x + beta and
x = (r - mean r) / std r, whose norm is sqrt(d). A hidden unit of m with

    w = s p / (sqrt(d) gamma),      b = -w . beta - s tau - z0                 (|p| = 1)

has pre-activation z = s (cos(x, p) - tau) - z0: the gate's cosine to a prototype p, read at the
MLP's input, exactly. Two such units (biases b and b - z0) and the MLP's own activation phi give

    g = (phi(z) - phi(z - z0)) / z0                    ~0 at and below tau, ~1 from tau + width on

(s = 3 z0 / width), and output columns +-Delta / z0 write g Delta, with

    Delta_i = mean over templates of  R(anchor prompt)[its slot] - R(concept prompt)[its slot]

(R the residual after the MLP, a slot the last token of the concept or of the anchor), so a
detected concept token leaves the layer as the anchor's would. p_i is the concept's mean centred
input at its slot; tau_i = max(the ``quantile`` of the calibration prompts' peaks, the shared
split-conformal floor), as ``mace_ops.ace`` calibrates its gate. The 2n units replace the MLP's 2n
least important ones (mean |phi| x output-column norm over the calibration prompts), whose mean
output is folded into the output bias: every shape stays, and the edit is four tensors' changes.

Unlike the runtime gate, a unit acts on one position (nothing carries a detection to the words
after the concept) and one prototype per concept (unit outputs add; a max over prototypes
cannot be compiled). ``bench.gate_compile`` measures it on toy world v2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, Sequence

import torch

from .ace import TEMPERATURE, GatedErasure, calibrated_thresholds, concept_slot, mentions, prompt_peaks
from .concepts import Concept
from .interfaces import EncodedPrompt, TextEncoder
from .templates import check_templates, fill
from .validation import check_number

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.nn.functional.gelu,
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),       # CLIP-L's (SD1.x)
}
# z0 per activation: phi(-z0) small enough that a closed ramp writes < 1e-4 of Delta
CLOSED_OFFSET = {"gelu": 4.0, "quick_gelu": 8.0}


class MlpSite(Protocol):
    """The MLP of the text layer whose output cross-attention reads (pre-norm: r + m(ln(r)))."""

    activation: str                       # an ``ACTIVATIONS`` key
    inputs: TextEncoder                   # encode -> the residual entering the MLP's norm, per token
    outputs: TextEncoder                  # encode -> the residual after the MLP, per token

    def norm(self) -> tuple[torch.Tensor, torch.Tensor]: ...             # (gamma, beta), (d,)
    def mlp(self) -> dict[str, torch.Tensor]: ...                        # fc1.weight (h, d), fc1.bias, fc2.weight (d, h), fc2.bias


IMPORTANCE_ROWS = 8192   # token rows per matmul in unit_importance (bounds its memory)


@dataclass(frozen=True)
class TextGateConfig:
    quantile: float = 0.999
    open_rate: float = 0.05
    width: float = 2 * TEMPERATURE       # cosine above tau at which the ramp is open

    def validate(self) -> None:
        check_number(self.quantile, "quantile", 0.0, 1.0)
        check_number(self.open_rate, "open_rate", 0.0, 1.0)
        check_number(self.width, "width", 1e-6, 1.0)


@dataclass
class TextGate:
    prototypes: torch.Tensor   # (n, d) unit rows, in the centred input space
    thresholds: torch.Tensor   # (n,)
    deltas: torch.Tensor       # (n, d)


def centred(encoded: list[EncodedPrompt]) -> list[EncodedPrompt]:
    """``encoded`` with every token's features centred over the width (where a unit reads cosines)."""
    return [EncodedPrompt(e.ids, e.length, e.features - e.features.mean(-1, keepdim=True)) for e in encoded]


@torch.no_grad()
def calibrate_text_gate(site: MlpSite, concepts: Sequence[Concept], templates: Sequence[str], anchor: str,
                        calibration_prompts: Sequence[str], calibration_groups: Sequence[Hashable | None] | None = None,
                        config: TextGateConfig = TextGateConfig()) -> TextGate:
    """Prototypes, thresholds and Deltas of ``concepts`` (every phrase of a concept pooled; a
    concept's own ``anchor`` in place of ``anchor`` where it has one)."""
    config.validate()
    check_templates(templates)
    if not concepts or not calibration_prompts:
        raise ValueError("concepts and calibration prompts: the text gate needs both (the preserve list, captions)")
    anchored: dict[str, tuple] = {}
    for name in dict.fromkeys(anchor if c.anchor is None else c.anchor for c in concepts):
        anchor_prompts = [fill(t, name) for t in templates]
        anchored[name] = site.inputs.encode(anchor_prompts), site.outputs.encode(anchor_prompts)
    protos, deltas = [], []
    for concept in concepts:
        a_in, a_out = anchored[anchor if concept.anchor is None else concept.anchor]
        xs, ds = [], []
        for phrase in concept.phrases:
            prompts = [fill(t, phrase) for t in templates]
            for o, o_out, n, n_out in zip(site.inputs.encode(prompts), site.outputs.encode(prompts), a_in, a_out):
                j, k = concept_slot(o, n)[1] - 1, concept_slot(n, o)[1] - 1                # last concept / anchor token
                x = o.features[j].float()
                xs.append(torch.nn.functional.normalize(x - x.mean(), dim=0))
                ds.append(n_out.features[k].float() - o_out.features[j].float())
        protos.append(torch.nn.functional.normalize(torch.stack(xs).mean(0), dim=0))
        deltas.append(torch.stack(ds).mean(0))
    n = len(concepts)
    probe = GatedErasure(torch.stack(protos), torch.arange(n), torch.zeros(n), torch.zeros(n, 1, 1), torch.zeros(n, 1))
    peaks = prompt_peaks(probe, centred(site.inputs.encode(list(calibration_prompts))))
    thresholds = calibrated_thresholds(peaks, mentions(calibration_prompts, concepts), calibration_groups,
                                       config.quantile, config.open_rate)
    return TextGate(probe.prototypes, thresholds, torch.stack(deltas))


def ramp_units(gamma: torch.Tensor, beta: torch.Tensor, gate: TextGate, activation: str,
               width: float = 2 * TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fc1 rows (2n, d), fc1 biases (2n,), fc2 columns (d, 2n)) of the ramp units (module docstring)."""
    z0 = CLOSED_OFFSET[activation]
    d, s = gate.prototypes.shape[1], 3 * z0 / width
    w = s * gate.prototypes / (math.sqrt(d) * gamma)
    b = -(w @ beta) - s * gate.thresholds - z0
    return torch.cat([w, w]), torch.cat([b, b - z0]), torch.cat([gate.deltas, -gate.deltas]).T / z0


def check_capacity(site: MlpSite, n_concepts: int) -> None:
    """ValueError naming ``concepts`` when the layer has fewer than the 2 units per concept the gate needs."""
    h = site.mlp()["fc1.weight"].shape[0]
    if 2 * n_concepts > h:
        raise ValueError(f"concepts: {n_concepts} need {2 * n_concepts} MLP units, the layer has {h}; erase fewer "
                         "concepts at once")


@torch.no_grad()
def unit_importance(site: MlpSite, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance (h,), mean activation (h,)) of the MLP's hidden units over every position of
    ``prompts`` (pads too: cross-attention reads them), summed in float64 over chunks of at most
    ``IMPORTANCE_ROWS`` token rows (1,030 prompts x 77 tokens x bigG's 5,120 units at once would be
    1.6 GB per activation tensor)."""
    gamma, beta = site.norm()
    mlp, phi = site.mlp(), ACTIVATIONS[site.activation]
    w1, b1 = mlp["fc1.weight"].T.float(), mlp["fc1.bias"].float()
    encoded = site.inputs.encode(list(prompts))
    total_abs, total = torch.zeros(len(b1), dtype=torch.float64), torch.zeros(len(b1), dtype=torch.float64)
    n, step = 0, max(1, IMPORTANCE_ROWS // max(1, encoded[0].features.shape[0]))
    for i in range(0, len(encoded), step):
        rows = torch.cat([e.features.float() for e in encoded[i: i + step]])
        act = phi(torch.nn.functional.layer_norm(rows, rows.shape[-1:], gamma, beta) @ w1 + b1)
        total_abs += act.abs().sum(0, dtype=torch.float64)
        total += act.sum(0, dtype=torch.float64)
        n += rows.shape[0]
    return (total_abs / n).float() * mlp["fc2.weight"].float().norm(dim=0), (total / n).float()


def compile_text_gate(site: MlpSite, gate: TextGate, importance_prompts: Sequence[str],
                      width: float = 2 * TEMPERATURE) -> dict[str, torch.Tensor]:
    """The MLP's four tensors with the ramp units in place of its least important units, ranked over
    ``importance_prompts`` (usually the calibration prompts: wrap ``site.inputs`` in
    ``encoding_cache.cached`` so they are encoded once for both)."""
    gamma, beta = (v.float() for v in site.norm())
    mlp = {k: v.detach().float().clone() for k, v in site.mlp().items()}
    rows, bias, cols = ramp_units(gamma, beta, gate, site.activation, width)
    check_capacity(site, len(gate.thresholds))
    score, mean = unit_importance(site, importance_prompts)
    drop = score.argsort()[: len(rows)]
    mlp["fc2.bias"] += mlp["fc2.weight"][:, drop] @ mean[drop]
    mlp["fc1.weight"][drop], mlp["fc1.bias"][drop], mlp["fc2.weight"][:, drop] = rows, bias, cols
    return mlp

"""The nodes' presets: the one table of the tuning values behind each node's ``preset`` input.

A node with a preset (CFR, Mass Erase, ACE, Erasure Check) takes its tuning inputs (the *governed*
inputs: every key of its ``recommended`` row) from the row the preset names, and from its own
widgets only under ``custom``. The governed inputs are marked advanced (``comfy_compat.advanced``):
newer frontends hide them; ComfyUI 0.3.64's frontend (1.27) shows them, and the preset says they
do not apply. The node's summary lists every value that ran (``settings_text``), and any widget
value a preset overrode, so a shared workflow documents what ran.

* ``recommended``: the pack's measured defaults; the nodes' schema defaults are read from this
  row (``default``), so changing a default is a one-line change here (tests check the schemas).
* other rows (``paper``, ``robust``) list only what differs from ``recommended``.
* ``custom``: the node's widget values. An API prompt without ``preset`` (made before the input
  existed) runs as ``custom``: the node's ``execute`` default, so old prompts keep their values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..mace_ops.ace import ACEConfig
from ..mace_ops.cfr import PACK_LAMBDA, PACK_RELATIVE_LAMBDA
from ..mace_ops.lora_train import DEFAULT_LORA_PRESERVE, DEFAULT_NULL_SPACE, DEFAULT_QUERY_SAMPLES
from .comfy_compat import io
from .prior_input import DEFAULT_PRIOR_WEIGHT

CUSTOM = "custom"
RECOMMENDED = "recommended"
_ACE = ACEConfig()

# node id -> preset -> {input id: value}; rows other than "recommended" hold only their differences.
_ROWS: dict[str, dict[str, dict]] = {
    "MaceRefineCrossAttention": {
        RECOMMENDED: {"lambda_": PACK_LAMBDA, "relative_lambda": PACK_RELATIVE_LAMBDA, "preserve_scale": 1.0,
                      "erase_concept_tokens": True,
                      "prior_weight": DEFAULT_PRIOR_WEIGHT,
                      # bench.pooled: held out, it removes 21 % of the concept's effect at 4x the preserve drift
                      "edit_pooled": False},
        # MACE's stage 1 as in the paper: the concept's own tokens are left to the LoRA stage (use it
        # before MACE Train Concept LoRA + MACE Fuse LoRAs)
        "paper": {"erase_concept_tokens": False},
    },
    "MaceMassErase": {
        RECOMMENDED: {"cfr_lambda": PACK_LAMBDA, "relative_lambda": PACK_RELATIVE_LAMBDA, "preserve_scale": 1.0,
                      "lora_steps": 0, "lora_lr": 0.0,
                      "images_per_concept": 8, "sampling_steps": 20, "fusion_lambda": 1e-3,
                      "objective": "attention", "lora_preserve": DEFAULT_LORA_PRESERVE,
                      "erase_concept_tokens": True, "prior_weight": DEFAULT_PRIOR_WEIGHT,
                      # the LoRA stage off: it bought nothing in toy world v2 and cost H in v3 (decisions.md)
                      "lora_training": "off", "query_samples": DEFAULT_QUERY_SAMPLES,
                      "fusion_preserve_to": "auto", "lora_null_space": DEFAULT_NULL_SPACE},
        # the paper's pipeline: CFR leaves the concept tokens to the LoRAs, LoRAs by full backprop with
        # no preservation term or null space, fusion keeps the preserve set at the original weights
        "paper": {"erase_concept_tokens": False, "lora_preserve": 0.0, "lora_training": "full",
                  "fusion_preserve_to": "original", "lora_null_space": 0.0},
    },
    "MaceGatedErasure": {
        RECOMMENDED: {"rank": _ACE.rank, "quantile": _ACE.quantile, "margin": _ACE.margin,
                      "temperature": _ACE.temperature, "adversarial_rounds": 0, "attack_steps": 40,
                      "attack_images": 8, "sampling_steps": 20, "open_rate": _ACE.open_rate, "gate": _ACE.gate},
        # the setting that resisted optimised (soft) prompts on toy world v2 (bench.attack, ace_adv):
        # sigmoid gate, temperature 0.02, no shared floor, 2 adversarial rounds (minutes to hours: it
        # samples attack_images per concept and runs attacks through the model)
        "robust": {"gate": "sigmoid", "temperature": 0.02, "open_rate": 1.0, "adversarial_rounds": 2},
    },
    "MaceErasureCheck": {
        RECOMMENDED: {"images_per_set": 12, "steps": 20, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                      "scheduler": "karras", "draws": 8},
    },
}

NOTES = {  # one line per preset for the preset input's tooltip and the help pages
    ("MaceRefineCrossAttention", RECOMMENDED): "the pack's measured defaults (CFR alone)",
    ("MaceRefineCrossAttention", "paper"): "MACE's stage 1 as in the paper (concept tokens left to the LoRA "
                                          "stage; use before MACE Train Concept LoRA)",
    ("MaceMassErase", RECOMMENDED): "the pack's measured defaults: the LoRA stage off (CFR + caption prior only, "
                                    "seconds, no images), because it bought no quality in either toy world",
    ("MaceMassErase", "paper"): "the paper's pipeline (full-backprop LoRAs, no LoRA preservation, fusion at the "
                               "original weights)",
    ("MaceGatedErasure", RECOMMENDED): "the measured defaults (ramp gate; seconds, no images)",
    ("MaceGatedErasure", "robust"): "sigmoid gate, temperature 0.02, open_rate 1, 2 adversarial rounds: resisted "
                                   "optimised prompts on the toy world (slow: samples images, runs attacks)",
    ("MaceErasureCheck", RECOMMENDED): "12 images per set, 20 dpmpp_2m karras steps at cfg 7, 8 judge draws",
}


def _full(rows: dict[str, dict]) -> dict[str, dict]:
    base = rows[RECOMMENDED]
    out = {}
    for name, row in rows.items():
        unknown = set(row) - set(base)
        if unknown:
            raise KeyError(f"preset {name!r} sets {sorted(unknown)}, which 'recommended' does not govern")
        out[name] = {**base, **row}
    return out


PRESETS: dict[str, dict[str, dict]] = {node: _full(rows) for node, rows in _ROWS.items()}


def governed(node_id: str) -> tuple[str, ...]:
    """The inputs a preset sets (and ``custom`` leaves to the widgets), in table order."""
    return tuple(PRESETS[node_id][RECOMMENDED])


def default(node_id: str, name: str):
    """The schema default of a governed input: its ``recommended`` value."""
    return PRESETS[node_id][RECOMMENDED][name]


def choices(node_id: str) -> list[str]:
    return [*PRESETS[node_id], CUSTOM]


def tooltip(node_id: str) -> str:
    rows = "; ".join(f"{name} = {NOTES.get((node_id, name), name)}" for name in PRESETS[node_id])
    return (f"Which values the tuning inputs take. {rows}; custom = the values of the advanced inputs "
            f"({', '.join(display(n) for n in governed(node_id))}), which every other preset ignores. "
            "The summary lists every value used.")


def display(name: str) -> str:
    return name[:-1] if name.endswith("_") else name


@dataclass(frozen=True)
class Resolved:
    preset: str
    values: dict       # governed input -> the value that runs
    ignored: dict      # governed input -> widget value the preset overrode (differs from what runs)

    def __getitem__(self, name: str):
        return self.values[name]


def resolve(node_id: str, preset: str, given: dict) -> Resolved:
    """The governed values that run under ``preset`` (``given``: the node's widget values)."""
    rows = PRESETS[node_id]
    if preset == CUSTOM:
        return Resolved(CUSTOM, {k: given[k] for k in governed(node_id)}, {})
    if preset not in rows:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {choices(node_id)}")
    values = dict(rows[preset])
    ignored = {k: given[k] for k in values if k in given and given[k] != values[k]}
    if ignored:   # e.g. a workflow saved before the preset input existed: say so, not only in the summary
        logging.getLogger("comfyui-mace").warning(
            "%s: preset %r overrides %s; choose preset 'custom' to apply them", node_id, preset,
            ", ".join(f"{k}={v!r}" for k, v in ignored.items()))
    return Resolved(preset, values, ignored)


def _fmt(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_text(resolved: Resolved | None, other: dict) -> str:
    """Every value that ran, one line: ``preset=...; <governed>; <other inputs>``; a second line
    names the widget values the preset overrode."""
    parts = [f"preset={resolved.preset}"] if resolved is not None else []
    if resolved is not None:
        parts.append(", ".join(f"{display(k)}={_fmt(v)}" for k, v in resolved.values.items()))
    if other:
        parts.append(", ".join(f"{display(k)}={_fmt(v)}" for k, v in other.items()))
    text = "settings: " + "; ".join(p for p in parts if p)
    if resolved is not None and resolved.ignored:
        text += (f"\nignored under preset {resolved.preset!r} (choose preset 'custom' to apply): "
                 + ", ".join(f"{display(k)}={_fmt(v)}" for k, v in resolved.ignored.items()))
    return text


def preset_input(node_id: str):
    """The node's ``preset`` combo: last in the node's inputs (saved workflows hold widget values by
    position, so a workflow saved before it existed loads unchanged and gets the default)."""
    return io.Combo.Input("preset", options=choices(node_id), default=RECOMMENDED, optional=True,
                          tooltip=tooltip(node_id))

"""Adapter: the MLP a ComfyUI CLIP's conditioning reads, as a ``mace_ops.text_gate`` MlpSite, and
the compiled text gate on a CLIP clone.

**Which layer.** The one whose output the conditioning is read from (clip skip). On every encode
ComfyUI sets each text encoder's ``layer`` / ``layer_idx`` from ``clip.layer_idx`` (CLIPSetLastLayer),
else from the encoder's defaults: the last layer for SD1.x's CLIP-L, the penultimate for SD2.x's
OpenCLIP-H and both SDXL encoders. ``read_layer`` encodes one prompt and reads what was set. A gate
compiled for one clip skip does nothing useful at another: set clip skip before the gate node.

**The residuals around its MLP** are read with hooks during an ordinary encode (the pack's
``ComfyTextEncoder``, batched and interruptible): a pre-hook on ``layer_norm2`` copies the residual
entering the MLP's norm (ComfyUI then adds the MLP's output to that tensor in place), a forward hook
on the layer copies the residual after it. Norm and MLP tensors are read as the CLIP computes them
(original + any patches already on it, e.g. a LoRA), float32, without touching the shared module.

**SDXL**: CLIP-L and bigG each get their own gate, fitted on their own residuals (the UNet reads
their features concatenated). The edit is the four MLP tensors' diffs per encoder, as ``diff``
patches on ``clip.clone()``; a ``TextGateRecord`` attachment (attachments follow ``clone()``)
carries them, so ``MACE Save Erasure`` writes them under the generic ``text_encoders.<key>`` LoRA
keys the stock LoraLoader maps onto the CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.clip_model

from ..mace_ops.erasure_file import weights_fingerprint
from ..mace_ops.interfaces import EncodedPrompt, KVWeights
from ..mace_ops.text_gate import ACTIVATIONS
from ..mace_ops.validation import require_file_values
from .comfy_model import effective_weights
from .comfy_text_encoder import ComfyTextEncoder
from .comfy_text_entry import dit_text_encoder

TEXT_GATE_ATTACHMENT = "mace_text_gate"
FILE_PREFIX = "text_encoders."          # ComfyUI's generic LoRA key prefix for CLIP weights
MLP_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@dataclass(frozen=True)
class TextGateRecord:
    deltas: KVWeights              # float32, CPU, keyed by the CLIP's state-dict key
    base_fingerprint: str          # of the base values of those tensors
    info: dict = field(default_factory=dict)


def get_text_gate(clip) -> TextGateRecord | None:
    patcher = getattr(clip, "patcher", None)
    return None if patcher is None else patcher.get_attachment(TEXT_GATE_ATTACHMENT)


def read_layer(clip, sub) -> int:
    """Index of the encoder layer whose output ``sub``'s conditioning is (after one encode)."""
    clip.encode_from_tokens(clip.tokenize("a", disable_weights=True))
    n = len(sub.transformer.text_model.encoder.layers)
    if sub.layer == "last":
        return n - 1
    if sub.layer == "hidden" and sub.layer_idx is not None:
        return int(sub.layer_idx) % n
    raise ValueError(f"clip: the text encoder reads layer {sub.layer!r}; the text gate needs one layer "
                     "(the last, or one set with CLIPSetLastLayer)")


def _activation(layer) -> str:
    act = layer.mlp.activation
    name = next((k for k, f in comfy.clip_model.ACTIVATIONS.items() if f is act), None)
    if name not in ACTIVATIONS:
        raise ValueError(f"clip: its MLP activation {name or act!r} cannot hold a compiled gate; supported: "
                         f"{', '.join(sorted(ACTIVATIONS))} (SD1.x, SD2.x, SDXL)")
    return name


class _Residuals(ComfyTextEncoder):
    """A TextEncoder whose features are the residual entering (``where`` = "input") or leaving
    ("output") one layer's MLP, per token, float32."""

    def __init__(self, clip, key: str, layer, where: str, **kw):
        super().__init__(clip, **kw)
        self.layer, self.where = layer, where
        if key in clip.tokenize("a", disable_weights=True):  # the encoder's own token ids (SDXL: g pads with 0)
            self.key = key

    def encode(self, prompts):
        rows: list[torch.Tensor] = []

        def keep(t):
            rows.append(t.detach().to("cpu", torch.float32, copy=True))

        if self.where == "input":
            hook = self.layer.layer_norm2.register_forward_pre_hook(lambda _m, args: keep(args[0]))
        else:
            hook = self.layer.register_forward_hook(lambda _m, _args, out: keep(out))
        try:
            encoded = super().encode(prompts)
        finally:
            hook.remove()
        feats = torch.cat(rows) if rows else torch.zeros(0)
        if feats.shape[0] != len(encoded):
            raise RuntimeError(f"text gate: read {feats.shape[0]} residual rows for {len(encoded)} prompts")
        return [EncodedPrompt(e.ids, e.length, f) for e, f in zip(encoded, feats)]


class ComfyMlpSite:
    """``mace_ops.text_gate.MlpSite`` of one text encoder (``key``, ``sub``) of a ComfyUI CLIP."""

    def __init__(self, clip, key: str, sub, prefix: str, **encoder_kw):
        self.clip, self.key = clip, key
        self.index = read_layer(clip, sub)
        layer = sub.transformer.text_model.encoder.layers[self.index]
        self.activation = _activation(layer)
        self.name = f"{prefix}.transformer.text_model.encoder.layers.{self.index}"
        self.inputs = _Residuals(clip, key, layer, "input", **encoder_kw)
        self.outputs = _Residuals(clip, key, layer, "output", **encoder_kw)
        self._base = text_base(clip, self.keys() + [f"{self.name}.layer_norm2.{p}" for p in ("weight", "bias")])

    def keys(self) -> list[str]:
        return [f"{self.name}.mlp.{t}" for t in MLP_TENSORS]

    def norm(self):
        return self._base[f"{self.name}.layer_norm2.weight"], self._base[f"{self.name}.layer_norm2.bias"]

    def mlp(self):
        return {t: self._base[f"{self.name}.mlp.{t}"] for t in MLP_TENSORS}

    def base(self) -> KVWeights:
        """CLIP key -> the MLP tensor as the CLIP computes it now (what ``deltas`` are relative to)."""
        return {k: self._base[k] for k in self.keys()}

    def deltas(self, compiled: dict[str, torch.Tensor]) -> KVWeights:
        """CLIP key -> compiled tensor - the tensor as the CLIP computes it now."""
        return {f"{self.name}.mlp.{t}": compiled[t].float() - self._base[f"{self.name}.mlp.{t}"] for t in MLP_TENSORS}


def mlp_sites(clip, **encoder_kw) -> list[ComfyMlpSite]:
    """One site per text encoder whose features the conditioning holds (SDXL: CLIP-L, then bigG)."""
    family = dit_text_encoder(clip)
    if family is not None:
        raise ValueError(f"clip: this is {family}'s text encoder; the text gate compiles into CLIP MLPs, but {family} "
                         "reads the prompt through T5-XXL too, whose gated MLP (wi_0, wi_1, wo) has no biases to hold "
                         "the gate's thresholds. Erase with MACE Refine Cross-Attention (CFR) on the model instead")
    try:
        parts = ComfyTextEncoder(clip)._parts()
    except ValueError:
        raise ValueError("clip: the text gate compiles into CLIP text encoders' MLPs; supported: SD1.x (CLIP-L), "
                         "SD2.x (OpenCLIP-H), SDXL (CLIP-L + bigG)") from None
    names = {id(m): n for n, m in clip.cond_stage_model.named_children()}
    return [ComfyMlpSite(clip, key, sub, names[id(sub)], **encoder_kw) for key, sub in parts]


def text_base(clip, keys) -> KVWeights:
    """The CLIP's current values (original + patches) of ``keys`` it has, float32, CPU."""
    return effective_weights(clip.patcher, keys, prefix=None)


def apply_text_gate(clip, deltas: KVWeights, base: KVWeights, info: dict):
    """A clone of ``clip`` with ``deltas`` as diff patches (strength 1: a scaled gate is another gate)
    and the record attached (``clip`` untouched); ``base``: the values the deltas were computed from
    (their fingerprint)."""
    if get_text_gate(clip) is not None:
        raise ValueError("clip: already carries a compiled text gate; erase every concept in one MACE Text Gate "
                         "node (or start from the CLIP without it)")
    require_file_values(deltas, "text gate", "nothing was applied (a compiled gate this steep cannot be saved "
                        "and loaded back either)")
    deltas = {k: d.to(torch.float32) for k, d in deltas.items()}
    out = clip.clone()
    accepted = set(out.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0))
    missing = sorted(set(deltas) - accepted)
    if missing:
        raise ValueError(f"clip: {len(missing)} weight(s) to patch are missing, e.g. {missing[0]}")
    out.patcher.set_attachments(TEXT_GATE_ATTACHMENT, TextGateRecord(deltas, weights_fingerprint(
        {k: base[k] for k in deltas}), info))
    return out


def file_deltas(record: TextGateRecord) -> KVWeights:
    """The record's deltas under the keys an erasure file stores them by (``text_encoders.<key>``)."""
    return {FILE_PREFIX + k: d for k, d in record.deltas.items()}


def check_text_editable(keys, where: str) -> None:
    """ValueError when a file's CLIP part changes anything but text-layer MLP tensors (a compiled gate's)."""
    other = sorted(k for k in keys if not k.endswith(tuple(f".mlp.{t}" for t in MLP_TENSORS)))
    if other:
        raise ValueError(f"{where}: its text encoder part changes {len(other)} weight(s) a compiled text gate never "
                         f"edits (e.g. {other[0]}); only text-layer MLP tensors are applied. Load other LoRAs with "
                         "the stock LoraLoader")


def split_file_deltas(deltas: KVWeights) -> tuple[KVWeights, KVWeights]:
    """(model deltas, CLIP deltas keyed by the CLIP's state-dict key) of a loaded erasure file."""
    model = {k: v for k, v in deltas.items() if not k.startswith(FILE_PREFIX)}
    return model, {k[len(FILE_PREFIX):]: v for k, v in deltas.items() if k.startswith(FILE_PREFIX)}

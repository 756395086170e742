"""Save and load one concept's LoRA as a safetensors file that ComfyUI's stock LoRA loaders read.

For a K/V weight ``X.weight`` (e.g. ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``)
the file holds ``X.lora_up.weight`` (out, r), ``X.lora_down.weight`` (r, in) and ``X.alpha`` (a
scalar); LoraLoaderModelOnly adds ``strength * alpha / r * up @ down`` to the weight, which is the
same delta ``KVLora`` trains. Metadata under ``mace.*`` records the format, the concept phrases,
steps, rank, learning rate, seed, the fingerprint of the K/V weights the LoRA was trained on, the
pack version and the full settings as JSON. Writes are atomic (``erasure_file.atomic_save``);
loading is safetensors only, never pickle.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from . import __version__
from .concepts import normalise_phrase
from .erasure_file import DTYPES, atomic_save, base_fingerprint_of, check_fits, mace_info, mace_metadata, read_mace_file
from .fingerprint import mismatch
from .interfaces import KVWeights
from .lora import KVLora, LoraFactors
from .validation import require_file_values, require_finite
from .visible import visible

LORA_FORMAT = "concept-lora/1"
REQUIRED_INFO = ("concept", "steps", "lr", "seed", "settings")
_SUFFIXES = {"up": ".lora_up.weight", "down": ".lora_down.weight", "alpha": ".alpha"}


@dataclass
class LoraFile:
    factors: dict[str, LoraFactors]  # by weight name ("...to_k.weight")
    metadata: dict[str, str]

    @property
    def info(self) -> dict:
        return mace_info(self.metadata)

    def deltas(self) -> KVWeights:
        return {name: f.delta() for name, f in self.factors.items()}

    def deltas_shapes(self) -> dict[str, torch.Tensor]:
        """Zero-size stand-ins with each delta's shape (for key and shape checks without the product)."""
        return {name: torch.empty(f.up.shape[0], f.down.shape[1], device="meta") for name, f in self.factors.items()}

    def to_lora(self) -> KVLora:
        return KVLora.from_factors(self.factors)

    def phrases(self, name: str) -> tuple[str, ...]:
        """The concept's phrases from ``mace.concept``: a list of phrases, or one phrase as a plain string
        (never its letters); ValueError naming the file when there is none usable."""
        value = self.info.get("concept")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            items = []
        phrases = tuple(dict.fromkeys(p for p in (normalise_phrase(i) for i in items) if visible(p)))
        if not phrases:
            raise ValueError(f"{name}: records no concept (mace.concept must be a phrase or a list of phrases); "
                             "train it with MACE Train Concept LoRA")
        return phrases


def lora_keys(weight_name: str) -> dict[str, str]:
    """File keys of one weight: {"up": ..., "down": ..., "alpha": ...}."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"weight name must end with '.weight': {weight_name!r}")
    stem = weight_name[: -len(".weight")]
    return {part: stem + suffix for part, suffix in _SUFFIXES.items()}


def _split_key(key: str) -> tuple[str, str]:
    for part, suffix in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight", part
    raise ValueError(f"unexpected key {key!r} (expected .lora_up.weight, .lora_down.weight or .alpha)")


def save_concept_lora(
    path: str,
    lora: KVLora | Mapping[str, LoraFactors],
    base_fingerprint: str,
    info: Mapping,
    dtype: str = "fp32",
) -> dict[str, str]:
    """Write the LoRA; ``info`` needs concept (phrases), steps, lr, seed, settings. Returns the metadata."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)}")
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"LoRA metadata lacks {missing}")
    factors = lora.factors() if isinstance(lora, KVLora) else dict(lora)
    if not factors:
        raise ValueError("nothing to save: the LoRA has no weight")
    require_finite({f"{n}:{part}": getattr(f, part) for n, f in factors.items() for part in ("up", "down")},
                   "save concept LoRA", "training diverged; lower the learning rate. Nothing was saved")
    ranks = sorted({f.rank for f in factors.values()})
    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        keys = lora_keys(name)
        tensors[keys["up"]] = f.up.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous()
        tensors[keys["down"]] = f.down.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous()
        tensors[keys["alpha"]] = torch.tensor(float(f.alpha), dtype=torch.float32)
    metadata = mace_metadata({
        "mace.format": LORA_FORMAT,
        "mace.pack_version": __version__,
        "mace.dtype": dtype,
        "mace.base_model": base_fingerprint,
        "mace.rank": json.dumps(ranks[0] if len(ranks) == 1 else ranks),
    }, info)
    atomic_save(tensors, path, metadata)
    return metadata


def read_lora_info(path: str) -> dict:
    """A concept LoRA file's ``info`` from its header alone (no tensor is read); ValueError as
    ``load_concept_lora`` when the file is not one."""
    return mace_info(read_mace_file(path, LORA_FORMAT, "concept LoRA", with_tensors=False)[0])


def load_concept_lora(path: str) -> LoraFile:
    """Load a MACE concept LoRA; ValueError naming the file when it is not one."""
    metadata, tensors = read_mace_file(path, LORA_FORMAT, "concept LoRA")
    fname = os.path.basename(path)  # messages name the file, never the server path
    require_file_values(tensors, fname, "the file is damaged or was saved from a broken run; "
                        "delete it and train the LoRA again")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        try:
            name, part = _split_key(key)
        except ValueError as err:
            raise ValueError(f"{fname}: {err}") from None
        parts.setdefault(name, {})[part] = tensor
    factors = {}
    for name, p in parts.items():
        if set(p) != set(_SUFFIXES):
            raise ValueError(f"{fname}: {name} lacks {sorted(set(_SUFFIXES) - set(p))}")
        if p["alpha"].numel() != 1:
            raise ValueError(f"{fname}: {name} alpha must be a scalar")
        try:
            factors[name] = LoraFactors(p["up"], p["down"], float(p["alpha"]))
        except ValueError as err:
            raise ValueError(f"{fname}: {name}: {err}") from None
    if not factors:
        raise ValueError(f"{fname}: the file holds no LoRA weight")
    return LoraFile(factors, metadata)


def check_lora_fits(lora: LoraFile, weights: KVWeights, name: str, base_weights: KVWeights | None = None) -> None:
    """The LoRA's keys and shapes fit ``weights`` (always); with ``base_weights`` (the model before any
    MACE edit) also the base-model fingerprint recorded in the file (dtype independent)."""
    check_fits(lora.deltas_shapes(), weights, name)
    if base_weights is not None and "mace.base_model" not in lora.metadata:
        # files from before the dtype-independent fingerprint recorded the weights they were trained
        # on (for pipeline LoRAs: the CFR-refined ones), which cannot be checked against the base
        logging.warning("%s: made by an older MACE version; its base model is not checked", name)
    elif base_weights is not None:
        reason = mismatch(base_fingerprint_of(lora.metadata), {k: base_weights[k] for k in lora.factors
                                                               if k in base_weights})
        if reason is not None:
            raise ValueError(f"{name}: trained for a different base model ({reason}); use LoRAs made from "
                             "this checkpoint (any dtype), or retrain them on it")

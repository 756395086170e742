"""Save and load an erasure as a small safetensors patch that stock LoRA loaders read.

Each changed weight ``<module>.weight`` is stored as ``<module>.diff`` (the full delta, which
ComfyUI's LoraLoader / LoraLoaderModelOnly add to the model with the chosen strength), a changed
bias as ``<module>.diff_b``. K/V keys are the model's (``diffusion_model.…``); a compiled text gate's
are ``text_encoders.<CLIP key>``, ComfyUI's generic key for CLIP weights (LoraLoader, strength_clip). Metadata
under ``mace.*`` records what was erased, the settings, the pack version and a fingerprint of the
base model's original K/V weights, so a loader can refuse a mismatched base model.
Files are written to a temporary file and renamed, so an interrupted save leaves nothing behind.
Loading never unpickles: safetensors only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch
from safetensors import safe_open

from . import __version__
from .atomic_write import write_bytes_atomic
from .fingerprint import mismatch, weights_fingerprint  # noqa: F401  (re-exported)
from .interfaces import KVWeights
from .validation import require_file_values, require_finite

FORMAT_VERSION = "1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ErasureFile:
    deltas: KVWeights  # keyed by weight name ("...to_k.weight")
    metadata: dict[str, str]

    @property
    def info(self) -> dict:
        return mace_info(self.metadata)


def mace_info(metadata: Mapping[str, str]) -> dict:
    """The ``mace.*`` entries of a file's metadata, without the prefix, JSON values decoded."""
    return {k[len("mace."):]: _maybe_json(v) for k, v in metadata.items() if k.startswith("mace.")}


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def diff_key(weight_name: str) -> str:
    """``<module>.weight`` -> ``<module>.diff``, ``<module>.bias`` -> ``<module>.diff_b`` (ComfyUI's LoRA keys)."""
    for leaf, key in ((".weight", ".diff"), (".bias", ".diff_b")):
        if weight_name.endswith(leaf):
            return weight_name[: -len(leaf)] + key
    raise ValueError(f"weight name must end with '.weight' or '.bias': {weight_name!r}")


def weight_name(file_key: str) -> str:
    for key, leaf in ((".diff", ".weight"), (".diff_b", ".bias")):
        if file_key.endswith(key):
            return file_key[: -len(key)] + leaf
    raise ValueError(f"not a MACE diff key: {file_key!r}")


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes that depend only on the inputs: metadata keys and tensors in sorted order.

    (safetensors' own writer keeps metadata in a hash map, so its key order, and the file's
    bytes, change from run to run.) Readable by any safetensors reader."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be saved")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary file in the same folder, then rename.

    The bytes are ``serialize``'s (identical inputs, identical file); the file gets the normal
    permissions of a new file (0666 minus the umask), not mkstemp's 0600."""
    write_bytes_atomic(path, serialize(tensors, metadata))


def mace_metadata(fixed: dict[str, str], info: Mapping) -> dict[str, str]:
    """``fixed`` plus every ``info`` item as ``mace.<key>`` (strings as they are, the rest as JSON)."""
    metadata = dict(fixed)
    for key, value in info.items():
        metadata[f"mace.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return metadata


def save_erasure(
    path: str,
    deltas: KVWeights,
    base_fingerprint: str,
    info: dict,
    dtype: str = "fp16",
) -> dict[str, str]:
    """Save ``deltas`` (weight name -> delta) with metadata; returns the metadata written.

    ``base_fingerprint`` is ``weights_fingerprint`` of the weights the deltas were computed from.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)}")
    if not deltas:
        raise ValueError("nothing to save: the erasure changed no weight")
    require_finite(deltas, "save erasure", "the erasure holds NaN/inf; nothing was saved. Rerun the MACE "
                   "stages with a larger lambda or lower learning rate")
    tensors = {diff_key(k): v.detach().to(device="cpu", dtype=DTYPES[dtype]).contiguous() for k, v in deltas.items()}
    require_finite(tensors, f"dtype: in {dtype}", "the erasure's values exceed its range (e.g. a compiled text "
                   "gate's steep units); nothing was saved. Save with fp32 or bf16")
    metadata = mace_metadata({"mace.format": FORMAT_VERSION, "mace.pack_version": __version__, "mace.dtype": dtype,
                              "mace.base_model": base_fingerprint}, info)
    atomic_save(tensors, path, metadata)
    return metadata


class DamagedFileError(ValueError):
    """A MACE file that safetensors cannot read (truncated, corrupt)."""


def read_mace_file(path: str, expected_format: str, what: str, hint: str = "",
                   with_tensors: bool = True) -> tuple[dict[str, str], dict]:
    """(metadata, tensors) of a MACE safetensors file of ``expected_format``; ValueError naming the
    file otherwise. ``what`` names the kind of file in messages ("erasure", "concept LoRA").
    ``with_tensors=False``: the header only (the tensors come back empty, none is read)."""
    name = os.path.basename(path)  # messages name the file, never the server path
    if not os.path.isfile(path):
        raise ValueError(f"{what} file not found: {name}")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{name}: MACE {what} files must be .safetensors (no pickle is ever loaded)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            fmt = metadata.get("mace.format")
            if fmt is None:
                raise ValueError(f"{name}: not a MACE {what} (no mace.format metadata){hint}")
            if fmt != expected_format:
                raise ValueError(f"{name}: MACE format {fmt!r} is not a {what} this version reads ({expected_format})")
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except ValueError:
        raise
    except Exception as err:  # safetensors' SafetensorError, OSError, ...: a damaged or truncated file
        raise DamagedFileError(f"{name}: damaged or truncated {what} file ({type(err).__name__}: "
                               f"{str(err)[:120]}); delete it or make it again") from None
    return metadata, tensors


def load_erasure(path: str) -> ErasureFile:
    """Load a MACE erasure file; raise ValueError naming the file when it is not one."""
    metadata, tensors = read_mace_file(path, FORMAT_VERSION, "erasure", "; load it with a LoRA loader")
    name = os.path.basename(path)
    if not tensors:
        raise ValueError(f"{name}: holds no tensor, so it erases nothing; save the erasure again")
    require_file_values(tensors, name, "the file is damaged or was saved from a broken run; delete it and save "
                        "the erasure again")
    return ErasureFile({weight_name(k): t for k, t in tensors.items()}, metadata)


def check_fits(deltas: KVWeights, base_weights: KVWeights, path: str = "erasure") -> None:
    """Keys and shapes: every delta names a weight of the model, with the same shape (always checked)."""
    missing = sorted(set(deltas) - set(base_weights))
    if missing:
        raise ValueError(
            f"{path}: the model lacks {len(missing)} weight(s) this file changes (e.g. {missing[0]}); "
            "it was made for another architecture"
        )
    for name, delta in deltas.items():
        if tuple(delta.shape) != tuple(base_weights[name].shape):
            raise ValueError(f"{path}: shape of {name} is {tuple(delta.shape)}, model has "
                             f"{tuple(base_weights[name].shape)}; it was made for another architecture")


def base_fingerprint_of(metadata: dict) -> str | None:
    return metadata.get("mace.base_model") or metadata.get("mace.base_model_hash")


def check_base(erasure: ErasureFile, base_weights: KVWeights, path: str = "erasure",
               allow_other_base: bool = False) -> None:
    """Raise ValueError when the file does not fit the model (keys/shapes, always) or was made for
    another base model (fingerprint, unless ``allow_other_base``)."""
    check_fits(erasure.deltas, base_weights, path)
    if allow_other_base:
        return
    reason = mismatch(base_fingerprint_of(erasure.metadata), {k: base_weights[k] for k in erasure.deltas})
    if reason is not None:
        raise ValueError(
            f"{path}: made for a different base model ({reason}); load it onto the checkpoint it was made "
            "from (any dtype), or set allow_other_base to apply it anyway"
        )

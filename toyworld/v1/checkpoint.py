"""Saving and loading the shipped toy-world weights (safetensors, atomic writes).

Weights are stored in fp16 to keep the shipped files small and cast back to fp32 on load.
Missing files raise ``FileNotFoundError`` naming the file and how to create it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_FILE = "toyworld.safetensors"
PROBE_FILE = "probe.safetensors"
TRAIN_HINT = "train it with `python scripts/train_toyworld.py --minutes 40`"


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Optional[Mapping[str, object]] = None, fp16: bool = True) -> None:
    """Write a state dict to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if fp16 and v.is_floating_point():
            v = v.half()
        tensors[k] = v.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped files should be world-readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state_dict(path: str | os.PathLike, what: str = "toy-world weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors (floats cast to fp32) and metadata; clear error if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path} ({TRAIN_HINT})")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            t = f.get_tensor(k)
            tensors[k] = t.float() if t.is_floating_point() else t
    return tensors, meta


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temp file, then rename (used for the resumable training state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)

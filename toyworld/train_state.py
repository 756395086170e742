"""A resumable training state (nested dicts / lists of tensors and plain values, e.g. model,
optimizer and scheduler ``state_dict()``s, RNG states) as ONE safetensors file, never pickle.

Tensors are stored under generated names; the structure around them (dicts, including the
optimizer's integer keys, lists, tuples, numbers, strings, None) is JSON in the file's metadata.
The write is atomic (temporary file, then rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "mace-train-state-v1"


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"train state: cannot store a {type(obj).__name__} (only tensors, dicts, lists, "
                    f"tuples, numbers, strings and None)")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def save_state(state: Any, path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(state, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "structure": json.dumps(structure)})
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> Any:
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a training state is a .safetensors file (no pickle is loaded)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a training state ({FORMAT}); format={meta.get('format')!r}")
    return _unpack(json.loads(meta["structure"]), load_file(str(path)))

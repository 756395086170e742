"""One validation layer for every MACE entry point: numbers, tensors and seeds.

* ``check_number`` refuses NaN, inf, booleans and values outside a range, naming the field;
  every numeric setting of CFR, LoRA training and fusion goes through it before any work starts
  (a NaN lambda used to fail 40 s later inside ``linalg.eigh``, naming nothing).
* ``require_finite`` refuses non-finite tensors, naming the stage and the fix: nothing
  non-finite is ever saved, loaded, fused or applied.
* ``require_file_values`` is the one check for every tensor read from a file (erasure, LoRA,
  .pt K/V, gate) before it is applied: finite, and no |value| above ``FILE_VALUE_LIMIT``.
* ``derive_seed`` adds an offset to a user seed modulo 2**64, so the largest seed a node offers
  (0xFFFFFFFFFFFFFFFF) still works where a run uses ``seed + i`` (torch generators take seeds
  in [0, 2**64)).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Mapping, Union

import torch

SEED_MODULUS = 2**64
FILE_VALUE_LIMIT = 1e6
"""The largest |value| a tensor read from a file may hold. SD's K/V weights and MACE's deltas and
LoRA factors are O(1); a compiled text gate's steep units reach ~1e2-1e5 (beyond fp16's 65,504,
for a layer norm gain of ~1e-3). A value above 1e6 is a damaged or hostile file, never an erasure."""


def check_number(value, name: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
                 lo_open: bool = False):
    """``value`` if it is a finite number in [lo, hi] (lo excluded when ``lo_open``); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    if integer and not isinstance(value, Integral):
        if not (math.isfinite(float(value)) and float(value).is_integer()):
            raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: {value!r} is not a finite number; enter a finite value"
                         + (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else ""))
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name}: {value!r} is outside {'(' if lo_open else '['}{lo_s}, {hi_s}]; "
                         "choose a value in that range")
    return int(value) if integer else value


def derive_seed(seed: int, offset: int = 0) -> int:
    """(seed + offset) mod 2**64: a valid torch seed for every seed a node accepts."""
    return (int(seed) + int(offset)) % SEED_MODULUS


TensorsLike = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def first_non_finite(tensors: TensorsLike) -> str | None:
    """Name of the first tensor holding NaN or inf (``""`` for a bare tensor), else None."""
    items = tensors.items() if isinstance(tensors, Mapping) else [("", tensors)]
    for name, t in items:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            if not bool(torch.isfinite(t.detach()).all()):
                return name
    return None


def require_finite(tensors: TensorsLike, stage: str, fix: str) -> None:
    """ValueError "<stage>: <what> holds NaN/inf; <fix>" when any tensor is not finite."""
    bad = first_non_finite(tensors)
    if bad is not None:
        what = f"{bad} " if bad else ""
        raise ValueError(f"{stage}: {what}holds NaN or inf values; {fix}")


def require_file_values(tensors: TensorsLike, where: str, fix: str = "the file is damaged or was saved from a "
                        "broken run; delete it and make it again") -> None:
    """ValueError naming ``where``, the tensor and the bound when a tensor read from a file holds NaN/inf
    or a |value| above ``FILE_VALUE_LIMIT`` (checked before anything is applied)."""
    require_finite(tensors, where, fix)
    items = tensors.items() if isinstance(tensors, Mapping) else [("", tensors)]
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            peak = float(t.detach().abs().max())
            if peak > FILE_VALUE_LIMIT:
                what = f"{name} " if name else ""
                raise ValueError(f"{where}: {what}holds values up to {peak:.3g} in magnitude, above the limit "
                                 f"{FILE_VALUE_LIMIT:g} (FILE_VALUE_LIMIT) for values read from a file; {fix}")

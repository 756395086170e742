"""Which base model a MACE file belongs to: a fingerprint that the weights' dtype does not change.

The same checkpoint can be loaded in fp32, fp16 or bf16; each rounds the weights differently,
so no exact hash of the values can be dtype independent. The fingerprint is therefore a small
*sketch* compared with a tolerance: for every K/V weight W (sorted by name) it stores ||W||_F
and four random sign projections z_j = q_j^T W r_j / ||W||_F (q_j, r_j in {-1, +1}, drawn from a
fixed seed per shape, so the sketch is a pure function of the values). Over W's entries, z_j is
a sum of +-w_ij: for another model it is an unrelated N(0, 1) draw, while rounding W to bf16
(relative error <= 2^-9 per entry) moves it by ~0.001. Two sketches match when every z differs by
at most ``Z_TOLERANCE`` (0.02) and every norm by at most ``NORM_TOLERANCE`` (1 %): fp32/fp16/bf16
loads of one checkpoint match, different checkpoints (even fine-tunes that move the K/V weights
by more than ~1 %) do not. fp8 weights (relative error ~6 %) do not match their source.

The fingerprint is stored as compact JSON (``mace.base_model``, 6 significant digits). Files
from earlier versions carry ``mace.base_model_hash`` (sha256 of the fp16 bytes); those are
compared exactly with ``legacy_hash``.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping

import torch

N_PROJECTIONS = 4
Z_TOLERANCE = 0.02
NORM_TOLERANCE = 0.01
_SEED = 20240611


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1


def sketch(weights: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """{name: [||W||_F, z_1..z_4]} in float64, rounded to 6 significant digits."""
    out = {}
    for name in sorted(weights):
        w = weights[name].detach().to(device="cpu", dtype=torch.float64)
        w2 = w.reshape(w.shape[0], -1) if w.ndim != 2 else w
        norm = float(torch.linalg.norm(w2))
        gen = torch.Generator().manual_seed(_SEED + 7919 * w2.shape[0] + w2.shape[1])
        zs = []
        for _ in range(N_PROJECTIONS):
            q, r = _signs(w2.shape[0], gen), _signs(w2.shape[1], gen)
            zs.append(float(q @ (w2 @ r)) / norm if norm > 0 else 0.0)
        out[name] = [float(f"{v:.6g}") for v in [norm] + zs]
    return out


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """The base-model fingerprint stored in MACE files (compact, key-sorted JSON of ``sketch``)."""
    return json.dumps(sketch(weights), sort_keys=True, separators=(",", ":"))


def legacy_hash(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp16 bytes (the fingerprint of files before issue 11)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to(device="cpu", dtype=torch.float16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def mismatch(expected: str | None, weights: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``weights`` match the fingerprint ``expected``; else a short reason.

    Only the names in ``expected`` are compared (a file may cover some of the model's weights);
    a name the model lacks is a mismatch.
    """
    if not expected:
        return "the file records no base model"
    try:
        stored = json.loads(expected)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):  # a legacy sha256
        names = list(weights)
        return None if legacy_hash({k: weights[k] for k in names}) == expected else "legacy fingerprint differs"
    missing = sorted(set(stored) - set(weights))
    if missing:
        return f"the model lacks {missing[0]}"
    actual = sketch({k: weights[k] for k in stored})
    for name, (norm, *zs) in stored.items():
        a_norm, *a_zs = actual[name]
        if not (math.isclose(norm, a_norm, rel_tol=NORM_TOLERANCE, abs_tol=1e-12)
                and all(abs(x - y) <= Z_TOLERANCE for x, y in zip(zs, a_zs))):
            return f"{name} differs"
    return None

"""A LoRA that cannot read preserved text: its input factor kept in the preserve set's null space.

The idea behind SPEED's and the double-projection closed forms, applied to the LoRA stage. With
M = mean p p^T the second moment of the preserve prompts' features (preserve list + prior, every
position, as ``covariance.PairStats`` collects it) and M = U diag(s) U^T (s descending), the
preserved subspace is the span of the first k eigenvectors, k the least count with

    sum_{j<=k} s_j >= energy * sum_j s_j,

and Q = I - U_k U_k^T projects onto its orthogonal complement. A LoRA delta ΔW = B A whose input
factor satisfies A = A Q gives ΔW p = B A Q p, which is zero for every p in span(U_k) and, for a
preserve prompt's feature, at most ||B A|| * ||(I - U_k U_k^T) p|| — the energy left outside. The
training loop enforces A = A Q by projection after every optimiser step (and at the start), so
the optimiser looks for an erasure in the free directions instead of fusion cutting one back
afterwards. energy = 0 turns it off (Q = I, not computed).
"""
from __future__ import annotations

import hashlib

import torch

from .validation import check_number, require_finite


def check_energy(energy: float) -> None:
    check_number(energy, "LoRA null-space energy", 0.0, 1.0)
    if energy == 1.0:
        raise ValueError("LoRA null-space energy: 1 would leave the LoRA no direction to change; choose a value "
                         "below 1 (e.g. 0.99) or 0 for off")


_LAST: dict = {}  # the last projector, by (moment bytes, energy, device): every concept of a run shares it


def null_space_projector(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """(Q, k): the (d, d) projector off the top-k preserved directions holding ``energy`` of the trace."""
    check_energy(energy)
    if moment.ndim == 2 and energy > 0:
        m = moment.detach().to(device="cpu", dtype=torch.float64).contiguous()
        key = (hashlib.sha256(m.numpy().tobytes()).hexdigest(), float(energy), str(moment.device))
        if key not in _LAST:
            _LAST.clear()
            _LAST[key] = _projector(moment, energy)
        q, k = _LAST[key]
        return q.clone(), k
    return _projector(moment, energy)


def _projector(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"LoRA null space: the preserve moment must be square (d, d), got {tuple(moment.shape)}")
    m = moment.detach().to(torch.float64)
    require_finite(m, "LoRA null space: the preserve prompts' features", "use the CLIP of this model")
    d = m.shape[0]
    if energy == 0:
        return torch.eye(d, dtype=moment.dtype, device=moment.device), 0
    s, u = torch.linalg.eigh((m + m.T) / 2)
    s, u = s.flip(0).clamp_min(0.0), u.flip(1)
    total = float(s.sum())
    if total <= 0:
        raise ValueError("LoRA null space: the preserve prompts' features are all zero; give preserve prompts "
                         "or set the null-space energy to 0")
    k = int(torch.searchsorted(torch.cumsum(s, 0) / total, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    k = min(k, d)
    q = torch.eye(d, dtype=torch.float64, device=m.device) - u[:, :k] @ u[:, :k].T
    return q.to(dtype=torch.float32), k


@torch.no_grad()
def project_down(down: torch.Tensor, q: torch.Tensor) -> None:
    """In place: every input factor (..., r, d) times Q, so it reads nothing of the preserved subspace."""
    down.copy_(down @ q.to(device=down.device, dtype=down.dtype))

"""The MACE celebrity protocol's numbers: accuracies with binomial SEs, H and its delta-method SE.

Acc_e (erased concepts, the words the erasure was fitted on: lower is better), Acc_g (held-out
words for the same concepts: lower is better), Acc_s (kept concepts: higher is better) and
H = HM(1 - Acc_e, 1 - Acc_g, Acc_s); without held-out words H = HM(1 - Acc_e, Acc_s).
``mass_row`` writes them in the row schema of ``bench/mass_quality.py`` (``docs/results/
mass_quality.json``), so a check's rows sit beside the toy world's.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 and p == p else float("nan")


def harmonic(*xs: float) -> float:
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def harmonic_se(xs: Sequence[float], ses: Sequence[float]) -> float:
    """Delta-method SE of ``harmonic(*xs)`` from independent SEs of its terms:
    dH/dx_i = n / (S x_i)^2 with S = sum 1/x_j, so se_H^2 = sum (n se_i / (S x_i)^2)^2.
    A term at 0 makes H 0 with a one-sided error; the SE is then reported as nan."""
    if any(x <= 0 for x in xs):
        return float("nan")
    S = sum(1 / x for x in xs)
    return math.sqrt(sum((len(xs) * se / (S * x) ** 2) ** 2 for x, se in zip(xs, ses)))


def rate(hits: Sequence[bool]) -> tuple[float, float, int]:
    """(fraction, binomial SE, n) of a list of outcomes; (nan, nan, 0) when empty."""
    n = len(hits)
    p = sum(1 for h in hits if h) / n if n else float("nan")
    return p, binomial_se(p, n), n


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None or x != x else round(float(x), 4)


def mass_row(kind: str, concepts: int, e: tuple[float, float, int], s: tuple[float, float, int],
             g: Optional[tuple[float, float, int]] = None, **extra) -> dict:
    """One row in ``mass_quality``'s schema from (acc, se, n) of the erased, kept and held-out sets.
    No held-out set (``g`` None or n = 0): acc_g/se_g are None and H leaves that term out.
    ``integrity`` and ``fd`` (toy-world probe features) are None unless given in ``extra``."""
    has_g = g is not None and g[2] > 0
    terms = [(1 - e[0], e[1])] + ([(1 - g[0], g[1])] if has_g else []) + [(s[0], s[1])]
    xs, ses = [x for x, _ in terms], [v for _, v in terms]
    valid = all(x == x for x in xs)
    row = {"kind": kind, "concepts": int(concepts), "H": _r(harmonic(*xs)) if valid else None,
           "se_H": _r(harmonic_se(xs, ses)) if valid else None,
           "acc_e": _r(e[0]), "se_e": _r(e[1]), "acc_g": _r(g[0]) if has_g else None,
           "se_g": _r(g[1]) if has_g else None, "acc_s": _r(s[0]), "se_s": _r(s[1]),
           "n_e": int(e[2]), "n_g": int(g[2]) if has_g else 0, "n_s": int(s[2]), "integrity": None, "fd": None}
    row.update(extra)
    return row

"""The command-line options both toy worlds' training scripts share (budget, seed, optimiser, EMA)."""
from __future__ import annotations

import argparse


def add_training_args(p: argparse.ArgumentParser, minutes: float) -> None:
    p.add_argument("--minutes", type=float, default=minutes, help="wall-time budget for generator training")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)

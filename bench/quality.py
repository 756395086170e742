"""Erasure quality in the toy world: efficacy, generality, specificity and H per method.

Methods: no edit; CFR on the main word only; CFR with one synonym added to the erase list (the
other synonym stays held out for generality); CFR + per-concept LoRA (deltas added); the full
MACE pipeline (CFR -> LoRA -> closed-form fusion, fusion keeping the preserve prompts at the
original weights as the paper does; full_current: at the CFR weights, ``fusion.PRESERVE_TO``). For
1, 3 and 7 erased colours (erasing all 8 leaves no colour to measure specificity on). Fixed seeds;
sample sizes and binomial standard
errors are printed and written to JSON.

    python -m bench.quality [--counts 1 3 7] [--methods none cfr cfr_syn cfr_lora full full_current] [--n 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import environment, print_table, write_json
from toyworld.v1 import vocab
from toyworld.v1.erase import cfr_erase, mace_erase
from toyworld.v1.evaluate import load_toyworld, mace_metrics

ORDER = ("red", "green", "blue", "yellow", "cyan", "purple", "orange", "pink")
METHODS = ("none", "cfr", "cfr_syn", "cfr_lora", "full", "full_current")


def concept_text(colours, with_synonym: bool) -> str:
    return "\n".join(f"{c}, {vocab.SYNONYMS[c][0]}" if with_synonym else c for c in colours)


def held_out(colours, with_synonym: bool) -> list[str]:
    return [s for c in colours for s in (vocab.SYNONYMS[c][1:] if with_synonym else vocab.SYNONYMS[c])]


def run(world, method: str, colours, n: int, mask_mode: str) -> dict:
    syn = method in ("cfr_syn", "cfr_lora", "full", "full_current")
    text = concept_text(colours, syn)
    start = time.perf_counter()
    if method == "none":
        weights = None
    elif method in ("cfr", "cfr_syn"):
        weights = cfr_erase(world, text).weights
    else:
        weights = mace_erase(world, text, mask_mode=mask_mode, fuse=method != "cfr_lora",
                             fusion_preserve_to="current" if method == "full_current" else "original").weights
    edit_s = time.perf_counter() - start
    m = mace_metrics(world, list(colours), kv_weights=weights, synonyms=held_out(colours, syn),
                     n_erased=n, n_synonym=n // 2, n_other=max(4, n // 4))
    return {"method": method, "concepts": len(colours), "efficacy": round(m.efficacy, 3),
            "se_e": round(m.se_efficacy, 3), "generality": round(m.generality, 3), "se_g": round(m.se_generality, 3),
            "specificity": round(m.specificity, 3), "se_s": round(m.se_specificity, 3), "H": round(m.H, 3),
            "n_e/n_g/n_s": f"{m.n_efficacy}/{m.n_generality}/{m.n_specificity}",
            "style_erased": round(m.style_erased, 3), "edit_s": round(edit_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 3, 7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n", type=int, default=32, help="prompts per erased word (others scale with it)")
    ap.add_argument("--mask-mode", default="none", choices=["none", "attention"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = load_toyworld()
    rows = []
    for count in args.counts:
        colours = ORDER[:count]
        for method in args.methods:
            rows.append(run(world, method, colours, args.n, args.mask_mode))
            print(rows[-1], flush=True)
    cols = ["method", "concepts", "efficacy", "se_e", "generality", "se_g", "specificity", "se_s", "H",
            "n_e/n_g/n_s", "style_erased", "edit_s"]
    print()
    print_table(rows, cols)
    write_json(args.out, {"bench": "quality", "env": environment(), "world": world.metadata, "rows": rows,
                          "settings": {"ddim_steps": 10, "cfg": 7.0, "mask_mode": args.mask_mode}})


if __name__ == "__main__":
    main()

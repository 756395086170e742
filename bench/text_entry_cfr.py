"""CFR on a FLUX-sized text-entry projection (``txt_in``: 4096 -> 3072) on random weights: seconds
and peak memory for 1/10/100 concepts.

FLUX.1 reads its prompt through one projection, so CFR there is one d x d fit with d = 4096 (T5-XXL's
width) over T5's 256-token windows, and one product W M for the 3072 x 4096 weight. The text
encoder is the benchmarks' hash encoder (``bench.common.HashTextEncoder``) at that width and window:
the cost is in the float64 sums (n tokens x d^2 per prompt), the condition check and the Cholesky
solve, all on the CPU (``mace_ops.covariance`` keeps the sums there), so a GPU machine's number is
its CPU's. ``--small`` (the CPU run a test checks) keeps the window and the 30 templates but narrows
the projection to 1024 -> 768; ``--dim``/``--out-dim``/``--counts`` pick another size.

    python -m bench.text_entry_cfr [--small] [--counts 1 10 100] [--out bench/results/text_entry_cfr.json]
    bash bench/gpu_suite.sh --sections closed --text-entry   # the same rows inside the GPU suite
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

KEY = "diffusion_model.txt_in.weight"


@dataclasses.dataclass(frozen=True)
class EntryScale:
    dim: int = 4096       # T5-XXL's width: what txt_in reads
    out_dim: int = 3072   # FLUX.1's hidden width
    window: int = 256     # ComfyUI's FLUX T5 window (min_length 256)
    counts: tuple[int, ...] = (1, 10, 100)
    templates: int = 0    # style templates per concept (0: all 30)


FULL = EntryScale()
SMALL = EntryScale(dim=1024, out_dim=768)


def text_entry_rows(scale: EntryScale = FULL) -> list[dict]:
    from bench.common import HashTextEncoder, Peak, concepts
    from mace_ops.cfr import CFRConfig, refine_cross_attention
    from mace_ops.templates import STYLE_TEMPLATES

    templates = STYLE_TEMPLATES[: scale.templates] if scale.templates else STYLE_TEMPLATES
    enc = HashTextEncoder(scale.dim, scale.window)
    weight = {KEY: torch.randn(scale.out_dim, scale.dim, generator=torch.Generator().manual_seed(0)) * 0.02}
    rows = []
    for n in scale.counts:
        with Peak("cpu") as p:
            result = refine_cross_attention(enc, weight, concepts(n), templates, config=CFRConfig(lamb=1.0))
        rows.append({"section": "text_entry", "case": f"{n} concepts", "method": "ours",
                     "projection": f"{scale.dim} -> {scale.out_dim}", "seconds": round(p.seconds, 2),
                     "peak_mb": round(p.mb, 1), "token_pairs": result.stats.n_pairs,
                     "condition": float(f"{max(result.condition.values()):.3g}")})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="1024 -> 768 (the CPU run)")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--out-dim", type=int, default=None)
    ap.add_argument("--counts", type=int, nargs="+", default=None)
    ap.add_argument("--templates", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/text_entry_cfr[_small].json)")
    args = ap.parse_args(argv)
    scale = SMALL if args.small else FULL
    overrides = {k: v for k, v in (("dim", args.dim), ("out_dim", args.out_dim), ("templates", args.templates),
                                   ("counts", tuple(args.counts) if args.counts else None)) if v is not None}
    scale = dataclasses.replace(scale, **overrides)
    from bench.common import environment, write_json

    t0 = time.perf_counter()
    rows = text_entry_rows(scale)
    out = args.out or f"bench/results/text_entry_cfr{'_small' if args.small else ''}.json"
    write_json(out, {"bench": "text_entry_cfr", "env": environment(), "device": "cpu",
                     "scale": dataclasses.asdict(scale), "minutes": round((time.perf_counter() - t0) / 60, 2),
                     "rows": rows, "notes": "random weights, hash text encoder at T5's width and FLUX's 256-token "
                                            "window; every step on the CPU (float64 sums and solve)"})


if __name__ == "__main__":
    main()

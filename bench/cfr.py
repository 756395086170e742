"""Benchmark CFR: our shared d x d factorisation vs a straightforward per-layer solve.

Both methods get the same encoded prompts (30 object templates, anchor 'ground', full 77 x 768
windows) and the same 32 SD1.5-shaped K/V weights. The per-layer baseline (``mace_ops.per_layer``) does what
the reference code does: it keeps every layer's target values W0 e and contexts c for all concepts, sums
W0 e c^T and c c^T per layer and inverts each layer's 768 x 768 matrix in float32. Each case runs
in its own subprocess so peak memory is measured cleanly. Encoding with a real random-weight
CLIP-L is timed separately (same cost for both methods) when ComfyUI is importable.

``--shape sdxl``: the same with SDXL's shape -- 140 K/V weights (70 attn2 layers, 640/1280 out)
reading 2048-wide features (CLIP-L + bigG), the encoder 77 x 2048; the per-layer baseline then
inverts 140 matrices of 2048 x 2048 and holds ~1.5 GB of value tensors per concept, so it runs
for 1 and 2 concepts only.

    python -m bench.cfr [--concepts 1 10 100] [--shape sd15|sdxl] [--out bench/results/cfr.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import (HashTextEncoder, concepts, context_dim, environment, kv_weights, peak_rss_mb, print_table,
                          rss_mb, write_json)
from mace_ops.cfr import CFRConfig, refine_cross_attention
from mace_ops.per_layer import per_layer_cfr
from mace_ops.templates import OBJECT_TEMPLATES, fill

BASELINE_MAX_CONCEPTS = {"sd15": 10, "sdxl": 2}  # the per-layer baseline holds ~225 MB (SDXL: ~1.5 GB) per concept


def run_case(method: str, n: int, shape: str = "sd15") -> dict:
    torch.manual_seed(0)
    encoder, weights, cs = HashTextEncoder(dim=context_dim(shape)), kv_weights(shape), concepts(n)
    before = rss_mb()
    start = time.perf_counter()
    if method == "shared":
        res = refine_cross_attention(encoder, weights, cs, OBJECT_TEMPLATES, config=CFRConfig(lamb=1.0))
        new = res.weights
    else:
        new = per_layer_cfr(encoder, weights, cs, OBJECT_TEMPLATES, 1.0)
    seconds = time.perf_counter() - start
    checksum = float(sum(v.double().sum() for v in new.values()))
    return {"method": method, "shape": shape, "weights": len(weights), "concepts": n, "seconds": round(seconds, 3),
            "peak_mb": round(peak_rss_mb() - before, 1), "checksum": checksum}


def clip_encode_rate(n_prompts: int = 30) -> dict:
    """Prompts/s of a full-size (12-layer) random-weight CLIP-L through ComfyUI and our adapter."""
    import tempfile

    sys.path.insert(0, "tests")
    try:
        from comfy_harness import find_comfyui, init_comfyui, load_tiny_checkpoint, make_tiny_sd15_checkpoint
    except ImportError as err:
        return {"skipped": f"test harness not importable: {err}"}
    if find_comfyui() is None:
        return {"skipped": "no ComfyUI checkout ($COMFYUI_PATH or ~/ComfyUI)"}
    tmp = tempfile.mkdtemp(prefix="mace-bench-")
    harness = init_comfyui(tmp)
    path = make_tiny_sd15_checkpoint(os.path.join(tmp, "clip12.safetensors"), clip_layers=12)
    _model, clip, _vae = load_tiny_checkpoint(path, clip_layers=12)
    enc = harness.pack_module.nodes.comfy_text_encoder.ComfyTextEncoder(clip)
    prompts = [fill(t, "ship") for t in OBJECT_TEMPLATES][:n_prompts]
    enc.encode(prompts[:2])
    start = time.perf_counter()
    enc.encode(prompts)
    dt = time.perf_counter() - start
    return {"prompts": len(prompts), "seconds": round(dt, 3), "prompts_per_s": round(len(prompts) / dt, 2),
            "seconds_per_concept_30_templates_plus_anchor": round(2 * dt * 30 / len(prompts), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--out", default=None, help="default bench/results/cfr.json (sdxl: cfr_sdxl.json)")
    ap.add_argument("--shape", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--case", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--no-clip", action="store_true", help="skip timing the CLIP-L encoder")
    ap.add_argument("--clip-only", action="store_true", help="only time the CLIP-L encoder")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.shape)))
        return
    if args.clip_only:
        print("CLIP-L encoding:", clip_encode_rate())
        return
    rows = []
    for n in args.concepts:
        for method in ("shared", "per_layer"):
            if method == "per_layer" and n > BASELINE_MAX_CONCEPTS[args.shape]:
                per = 225 if args.shape == "sd15" else 1530
                rows.append({"method": method, "concepts": n, "seconds": "skipped",
                             "peak_mb": f"~{n * per} (projected)"})
                continue
            out = subprocess.run([sys.executable, "-m", "bench.cfr", "--case", method, str(n), "--shape", args.shape],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    measured = {r["concepts"]: r["peak_mb"] for r in rows if r["method"] == "per_layer"
                and isinstance(r["peak_mb"], float)}
    if len(measured) >= 2:  # project the skipped baseline runs from the measured slope per concept
        lo, hi = min(measured), max(measured)
        slope = (measured[hi] - measured[lo]) / (hi - lo)
        for r in rows:
            if r["method"] == "per_layer" and r["seconds"] == "skipped":
                r["peak_mb"] = f"~{measured[lo] + slope * (r['concepts'] - lo):.0f} (projected)"
    for n in args.concepts:
        a = next(r for r in rows if r["method"] == "shared" and r["concepts"] == n)
        b = next(r for r in rows if r["method"] == "per_layer" and r["concepts"] == n)
        if isinstance(b["seconds"], float):
            a["speedup_vs_per_layer"] = round(b["seconds"] / a["seconds"], 2)
            a["memory_ratio"] = round(b["peak_mb"] / max(a["peak_mb"], 1.0), 1)
            a["max_rel_diff"] = abs(a["checksum"] - b["checksum"]) / abs(b["checksum"])
    print_table(rows, ["method", "concepts", "seconds", "peak_mb", "speedup_vs_per_layer", "memory_ratio"])
    out_path = args.out or ("bench/results/cfr.json" if args.shape == "sd15" else "bench/results/cfr_sdxl.json")
    clip = None if (args.no_clip or args.shape != "sd15") else clip_encode_rate()
    if clip:
        print("CLIP-L encoding (same for both methods; 30 templates x (phrases + anchor) per concept):", clip)
    write_json(out_path, {"bench": "cfr", "shape": args.shape, "env": environment(), "rows": rows,
                          "clip_encoding": clip,
                          "notes": f"algebra measured with a 77x{context_dim(args.shape)} hash encoder on "
                                   f"{len(kv_weights(args.shape))} K/V weights; encoding timed separately"})


if __name__ == "__main__":
    main()

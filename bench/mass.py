"""Benchmark mass erasure: wall time and peak memory of CFR + LoRA fusion for 1, 10 and 100 concepts.

Setup (same as ``bench.cfr``): 32 SD1.5-shaped random K/V weights (768 wide), the 77 x 768 hash
encoder, the 30 object templates, one phrase per concept. Each concept gets a synthetic rank-1
LoRA on all 32 weights (random factors, up ~ N(0, 1e-3^2), down ~ N(0, 1), alpha 1: about the size
of a trained MACE LoRA), generated on the fly and streamed into ``fuse_loras`` from a generator,
so no more than one concept's LoRA exists at a time. Fusion runs on the CFR output (W') with the
random weights as W0 and no preserve prompts (the reference's object setting).

``ours`` measures ``refine_cross_attention`` and ``fuse_loras`` (seconds, and each stage's peak
resident memory above what the process held before it) and reports the ``FusionAccumulator``
state size, which does not depend on N. The ``per_layer`` baseline (``mace_ops.per_layer``) fuses like the reference's
``fuse_lora_close_form.py``: for every concept it keeps the targets (W' + dW_i) c of all 32
weights for all 77 positions of its 30 prompts (2,310 vectors, ~230 MB per concept) plus the
contexts, then per weight sums targets^T c and c c^T and takes one float32 inverse per weight.
It runs for N <= 10 only; for 100 its memory is projected (slope of the measured N's). Each case
runs in its own subprocess with ``MALLOC_MMAP_THRESHOLD_=131072`` (freed tensors go back to the
OS, so the resident high-water mark follows live tensors). ``delta_rel_err_vs_ours`` is
||dW_baseline - dW_ours||_F / ||dW_ours||_F over the fused deltas W* - W': the float32 inverse of a
system with condition number ~1e6 (lambda = 1) loses most of the small LoRA delta, while ours
(float64 factorisation) matches a float64 per-layer solve to ~1e-7.
LoRA training time per concept is taken from ``bench/results/train.json`` (``bench.train``) and
multiplied by N; it is an extrapolation, not a measurement.

``--shape sdxl``: SDXL's shape -- 140 K/V weights (640/1280 out) reading 77 x 2048 features; the
per-layer baseline holds ~1.5 GB per concept there and runs for N <= 2 (its 100-concept memory is
projected from those two).

    python -m bench.mass [--concepts 1 10 100] [--shape sd15|sdxl] [--out bench/results/mass.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from bench.common import (HashTextEncoder, concepts, context_dim, environment, hwm_mb, kv_weights, print_table,
                          reset_peak, rss_mb, stream, synthetic_lora, trim, write_json)
from mace_ops.cfr import CFRConfig, refine_cross_attention
from mace_ops.fusion import FusionAccumulator, concept_covariance, fuse_loras
from mace_ops.per_layer import per_layer_fusion
from mace_ops.templates import OBJECT_TEMPLATES

BASELINE_MAX_CONCEPTS = {"sd15": 10, "sdxl": 2}
TRAIN_JSON = "bench/results/train.json"
LAMB = 1.0


def _checksums(new, current) -> dict:
    d = [(new[k].double() - current[k].double()) for k in current]
    return {"delta_sum": float(sum(x.sum() for x in d)), "delta_abs": float(sum(x.abs().sum() for x in d))}


def _stage(fn):
    """(result, seconds, peak MB above the resident size at the start)."""
    trim()
    before = rss_mb()
    ok = reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = hwm_mb() - before if ok else float("nan")
    return out, seconds, peak


def run_case(method: str, n: int, dump: str | None = None, shape: str = "sd15") -> dict:
    torch.manual_seed(0)
    encoder, original, cs = HashTextEncoder(dim=context_dim(shape)), kv_weights(shape), concepts(n)
    cfr, cfr_s, cfr_mb = _stage(
        lambda: refine_cross_attention(encoder, original, cs, OBJECT_TEMPLATES, config=CFRConfig(lamb=LAMB)))
    current = cfr.weights
    del cfr
    row = {"method": method, "shape": shape, "concepts": n, "cfr_s": round(cfr_s, 2), "cfr_peak_mb": round(cfr_mb, 1)}
    if method == "ours":
        res, fuse_s, fuse_mb = _stage(
            lambda: fuse_loras(encoder, current, original, stream(cs, current), OBJECT_TEMPLATES, lamb=LAMB,
                               total=n))
        new = res.weights
        acc = FusionAccumulator(context_dim(shape))  # the state fuse_loras keeps, once every weight has been seen
        C, nv = concept_covariance(encoder, cs[0], OBJECT_TEMPLATES)
        acc.add_concept(synthetic_lora(0, current), C, nv)
        row["accumulator_mb"] = round(acc.state_numel() * 8 / 2**20, 1)
        row["vectors"] = res.n_vectors
    else:
        new, fuse_s, fuse_mb = _stage(
            lambda: per_layer_fusion(encoder, current, stream(cs, current), OBJECT_TEMPLATES, LAMB))
    row.update({"fusion_s": round(fuse_s, 2), "fusion_peak_mb": round(fuse_mb, 1), **_checksums(new, current)})
    if dump:  # the fused deltas, for the parent to compare the two methods
        save_file({k: (new[k] - current[k]).contiguous() for k in current}, dump)
    return row


def delta_rel_err(path_a: str, path_ref: str) -> float:
    """||dW_a - dW_ref||_F / ||dW_ref||_F over all 32 weights."""
    a, ref = load_file(path_a), load_file(path_ref)
    num = sum(float((a[k].double() - ref[k].double()).norm() ** 2) for k in ref)
    return (num / sum(float(ref[k].double().norm() ** 2) for k in ref)) ** 0.5


def training_estimate(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data.get("lora_per_concept")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--out", default=None, help="default bench/results/mass.json (sdxl: mass_sdxl.json)")
    ap.add_argument("--shape", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--train-json", default=TRAIN_JSON)
    ap.add_argument("--case", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.dump, args.shape)))
        return
    # every allocation >= 128 KiB is its own mapping, returned to the OS when freed: resident size
    # then follows live tensors instead of what glibc's heap happens to keep
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    tmp = tempfile.mkdtemp(prefix="mace-bench-mass-")
    rows = []
    for n in args.concepts:
        for method in ("ours", "per_layer"):
            if method == "per_layer" and n > BASELINE_MAX_CONCEPTS[args.shape]:
                rows.append({"method": method, "concepts": n, "fusion_s": "skipped"})
                continue
            dump = os.path.join(tmp, f"{method}_{n}.safetensors") if n <= BASELINE_MAX_CONCEPTS[args.shape] else None
            cmd = [sys.executable, "-m", "bench.mass", "--case", method, str(n), "--shape", args.shape] + \
                (["--dump", dump] if dump else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                rows.append({"method": method, "concepts": n, "error": f"exit {out.returncode}"})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    measured = {r["concepts"]: r for r in rows if r["method"] == "per_layer" and "fusion_peak_mb" in r}
    if len(measured) >= 2:  # slope of the measured baseline memory, per concept
        lo, hi = min(measured), max(measured)
        per_concept_mb = (measured[hi]["fusion_peak_mb"] - measured[lo]["fusion_peak_mb"]) / (hi - lo)
    else:
        per_concept_mb = 2310 * sum(w.shape[0] for w in kv_weights(args.shape).values()) * 4 / 2**20
    for r in rows:
        if r["method"] == "per_layer" and r.get("fusion_s") == "skipped":
            base = measured.get(min(measured)) if measured else None
            offset = base["fusion_peak_mb"] - per_concept_mb * base["concepts"] if base else 0.0
            r["fusion_peak_mb"] = f"~{offset + per_concept_mb * r['concepts']:.0f} (projected)"
    train = training_estimate(args.train_json)
    for r in rows:
        ours = next((o for o in rows if o["method"] == "ours" and o["concepts"] == r["concepts"]), None)
        if r["method"] == "per_layer" and ours and isinstance(r.get("fusion_s"), float):
            r["fusion_time_ratio"] = round(r["fusion_s"] / max(ours["fusion_s"], 1e-3), 1)
            r["fusion_memory_ratio"] = round(r["fusion_peak_mb"] / max(ours["fusion_peak_mb"], 1.0), 1)
            r["delta_rel_err_vs_ours"] = round(delta_rel_err(os.path.join(tmp, f"per_layer_{r['concepts']}.safetensors"),
                                                             os.path.join(tmp, f"ours_{r['concepts']}.safetensors")), 4)
        if r["method"] == "ours" and train:
            r["train_s_extrap"] = round(train["seconds"] * r["concepts"], 0)
            r["total_s_extrap"] = round(r["train_s_extrap"] + r["cfr_s"] + r["fusion_s"], 0)
    print_table(rows, ["method", "concepts", "cfr_s", "cfr_peak_mb", "fusion_s", "fusion_peak_mb",
                       "accumulator_mb", "fusion_time_ratio", "fusion_memory_ratio", "delta_rel_err_vs_ours",
                       "train_s_extrap", "total_s_extrap"])
    print(f"per_layer baseline memory: ~{per_concept_mb:.0f} MB per concept "
          f"({'measured slope' if len(measured) >= 2 else 'analytic'}); "
          f"~{per_concept_mb * 100 / 1024:.1f} GB for 100 concepts")
    if train:
        print(f"LoRA training (extrapolated from {args.train_json}): ~{train['seconds']} s per concept "
              f"({train['steps']} steps at {train['at']}); reference GPU at 512x512: "
              f"~{train['reference_gpu_seconds']} s per concept")
        train_note = f"train_s_extrap = N x {train['seconds']} s ({train['steps']} steps at {train['at']})"
    else:
        train_note = f"no {args.train_json}: run `python -m bench.train` first for the training estimate"
        print(train_note)
    shutil.rmtree(tmp, ignore_errors=True)
    n_w, dim = len(kv_weights(args.shape)), context_dim(args.shape)
    write_json(args.out or ("bench/results/mass.json" if args.shape == "sd15" else "bench/results/mass_sdxl.json"), {
        "bench": "mass", "shape": args.shape, "env": environment(), "rows": rows,
        "baseline_mb_per_concept": round(per_concept_mb, 1), "lora_per_concept": train,
        "notes": (f"CFR and fusion measured on {n_w} {args.shape}-shaped random K/V weights with a 77x{dim} hash "
                  "encoder and "
                  "synthetic rank-1 LoRAs streamed from a generator; peaks are resident high-water marks above "
                  "the start of each stage; " + train_note),
    })


if __name__ == "__main__":
    main()

"""Mass erasure in toy world v2: every method side by side at 1-100 names and 1-10 styles.

The MACE celebrity protocol on the toy world's 200 invented identities: Acc_e (erased names,
main words), Acc_g (their nicknames, never given to any method), Acc_s (50 retained names no
method ever sees — the preserve list the methods get is another 50), H = HM(1-Acc_e, 1-Acc_g,
Acc_s); the same for styles (erase up to 10, preserve list 5 others, retained 5 more). Also
integrity (retained images that show an object at all) and FD (Fréchet distance of retained-set
probe features, base vs edited). Wall time and peak memory (RSS above the level at start) of
each edit. Fixed seeds; binomial SEs.

Methods: none | cfr (MACE stage 1 alone) | cfr_prior (the same + the toy caption prior, weight 1,
as the CFR node does by default) | uce (UCE-style closed form, bare phrases) |
cfr_lora (MACE CFR + LoRA deltas added) | full_ref (CFR -> LoRA -> fusion, the paper's stage 2/3) |
full (the pack's recommended settings, ``erase.RECOMMENDED``: null-space LoRAs, fusion at the CFR
weights) | full_current, full_original (the same *without* the LoRA null space, fusion keeping the
preserve prompts at the CFR weights / at the original weights as the paper does; until 2026-12-01
``full`` was full_current for styles and full_original for names) | ace (the ACE-style
gated null-out, ``mace_ops.ace`` with its default config: not a weight edit, a transform of every
text context) |
ace_sigmoid (the same with the first gate: centred on its threshold, temperature 0.02) |
cfr_prior_ace, full_ace (that gate on top of the cfr_prior / full weights: what chaining the CFR or
Mass Erase node with the ACE node gives; the gate's time is added to the weights').
cfr_lora and full_ref share one run (the same LoRAs); cfr_lora's time is CFR + LoRA, full_ref's
adds fusion.

    python -m bench.mass_quality                                   # the README table (~30 min, 2 cores)
    python -m bench.mass_quality --counts 1 10 --style-counts 1 --methods none cfr uce
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import (PeakRSS, check_count, environment, markdown_table, print_table, toy_v2_args, toy_v2_parser,
                          toy_v2_setup, write_json)
from bench.grid import save_grid
from bench.plot import save_panels
from mace_ops.ace import ACEConfig
from mace_ops.fusion import preserve_to_for
from mace_ops.lora_train import DEFAULT_NULL_SPACE
from toyworld.v2 import erase, evaluate, vocab

METHODS = ("none", "cfr", "cfr_prior", "uce", "cfr_lora", "full_ref", "full", "full_current", "full_original", "ace",
           "ace_sigmoid", "cfr_prior_ace", "full_ace")
# The first gate (centred on its threshold, temperature 0.02): the default before the ramp.
SIGMOID_GATE = ACEConfig(temperature=0.02, gate="sigmoid")
COLUMNS = ["method", "kind", "concepts", "H", "se_H", "acc_e", "se_e", "acc_g", "se_g", "acc_s", "se_s", "n_e", "n_g",
           "n_s", "integrity", "fd", "seconds", "peak_mb"]


def edits(world, task: erase.Task, methods, log):
    """Yield (method, kv_weights or None, context transform or None, seconds, peak MB) per method."""
    if "none" in methods:
        yield "none", None, None, 0.0, 0.0
    for name, fn in (("cfr", erase.cfr_erase), ("cfr_prior", lambda w, t: erase.cfr_erase(w, t, prior_weight=1.0)),
                     ("uce", erase.uce_erase)):
        if name in methods:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                w = fn(world, task).weights
            yield name, w, None, time.perf_counter() - t0, mem.peak_mb
    if "full_ref" in methods or "cfr_lora" in methods:
        with PeakRSS() as mem:
            run = erase.mace_erase(world, task, log=log, **erase.mace_setting("reference"))
        s = run.seconds
        if "cfr_lora" in methods:
            yield "cfr_lora", run.summed, None, s.get("cfr", 0) + s.get("lora", 0), mem.peak_mb
        if "full_ref" in methods:
            yield "full_ref", run.fused, None, edit_seconds(run), mem.peak_mb
    gate = None
    if {"ace", "cfr_prior_ace", "full_ace"} & set(methods):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            gate = erase.ace_erase(world, task)
        gate_s, gate_mb = time.perf_counter() - t0, mem.peak_mb
        if "ace" in methods:
            yield "ace", None, gate, gate_s, gate_mb
    if "ace_sigmoid" in methods:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            old = erase.ace_erase(world, task, config=SIGMOID_GATE)
        yield "ace_sigmoid", None, old, time.perf_counter() - t0, mem.peak_mb
    if "cfr_prior_ace" in methods:
        t0 = time.perf_counter()
        w = erase.cfr_erase(world, task, prior_weight=1.0).weights
        yield "cfr_prior_ace", w, gate, time.perf_counter() - t0 + gate_s, gate_mb
    runs: dict[str, tuple] = {}

    def pack_run(form: str = "auto", null_space: float = DEFAULT_NULL_SPACE):
        """(fused weights, edit seconds, peak MB) of the pack's settings with fusion form ``form`` and the
        LoRA null space ``null_space``; one run per resolved setting."""
        key = (preserve_to_for(task.kind, form, null_space > 0), null_space)
        if key not in runs:
            setting = erase.mace_setting("recommended", fusion_preserve_to=key[0], lora_null_space=null_space)
            with PeakRSS() as mem:
                run = erase.mace_erase(world, task, log=log, **setting)
            runs[key] = run.fused, edit_seconds(run), mem.peak_mb
        return runs[key]

    if "full" in methods or "full_ace" in methods:
        fused, full_s, peak = pack_run()
        if "full" in methods:
            yield "full", fused, None, full_s, peak
        if "full_ace" in methods:
            yield "full_ace", fused, gate, full_s + gate_s, max(peak, gate_mb)
    for name, form in (("full_current", "current"), ("full_original", "original")):
        if name in methods:  # the pack's settings without the null space, fusion keeping the preserve prompts
            fused, seconds, peak = pack_run(form, 0.0)  # at W' or at W0 (the pack's default before 2026-12-01)
            yield name, fused, None, seconds, peak


def edit_seconds(run) -> float:
    """A MACE run's edit time: CFR + LoRA stage + fusion."""
    s = run.seconds
    return s.get("cfr", 0) + s.get("lora", 0) + s.get("fusion", 0)


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 10, 50, 100], help="numbers of erased names")
    ap.add_argument("--style-counts", type=int, nargs="*", default=[1, 5, 10], help="numbers of erased styles")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n-erased", type=int, default=200, help="prompts over the erased set (and its held-out words)")
    ap.add_argument("--n-retained", type=int, default=200, help="prompts over the retained set")
    ap.add_argument("--plot", default="bench/results/mass_quality.png")
    ap.add_argument("--grid", default="bench/results/mass_quality_grid.png",
                    help="labelled image grid of every method at --grid-count erased names")
    ap.add_argument("--grid-count", type=int, default=10)
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="only merge the rows of earlier runs (e.g. names and styles run in parallel) into --out")
    args = toy_v2_args(ap, argv, out="bench/results/mass_quality.json", threads=2)
    world = toy_v2_setup(args).world
    t_start = time.time()
    rows = []
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        rows = [r for part in parts for r in part["rows"]]
        write_outputs(rows, args, world, 60 * max(part["minutes"] for part in parts))
        return
    for kind, counts in (("name", args.counts), ("style", args.style_counts)):
        pool = vocab.NAMES if kind == "name" else vocab.STYLES
        preserve, retained, most = erase.preserve_and_retained(kind)
        base_retained = None
        for count in counts:
            check_count(count, most, "--counts" if kind == "name" else "--style-counts")
            task = erase.Task(kind, tuple(pool[:count]), tuple(preserve))
            keep = {} if kind == "name" and count == args.grid_count and args.grid else None
            for method, weights, transform, seconds, peak in edits(world, task, args.methods, log=lambda s: None):
                if keep is not None:
                    keep[method] = (weights, transform)
                m, ret = evaluate.mass_metrics(world, kind, task.erase, retained, kv_weights=weights,
                                               base_retained=base_retained, n_erased=args.n_erased,
                                               n_retained=args.n_retained, context_transform=transform)
                if weights is None and transform is None:
                    base_retained = ret
                rows.append({"method": method, **m.row(), "seconds": round(seconds, 2), "peak_mb": round(peak, 1)})
                print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
            if keep:
                save_grid(world, args.grid, task, retained, keep)
    write_outputs(rows, args, world, time.time() - t_start)


def write_outputs(rows, args, world, seconds: float) -> None:
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, {"bench": "mass_quality", "env": environment(), "world": world.metadata,
                          "probe": world.probe_metadata, "minutes": round(seconds / 60, 1),
                          "settings": {"ddim_steps": evaluate.DEFAULT_STEPS, "cfg": evaluate.DEFAULT_CFG,
                                       "cfr_lambda": erase.DEFAULT_LAMBDA, "preserve_scale": erase.DEFAULT_PRESERVE_SCALE,
                                       "lora": erase.DEFAULT_LORA.settings(), "fusion_lambda": erase.DEFAULT_FUSION_LAMBDA,
                                       "recommended": erase.RECOMMENDED, "reference": erase.REFERENCE,
                                       "n_erased": args.n_erased, "n_retained": args.n_retained},
                          "rows": rows})
    panels = []
    for kind, label in (("name", "erased names"), ("style", "erased styles")):
        series = {}
        for r in rows:
            if r["kind"] == kind and r["method"] != "none":
                se = max(r["se_e"], r["se_g"], r["se_s"])  # a rough bar: the largest component SE
                series.setdefault(r["method"], []).append((r["concepts"], r["H"], se))
        if series:
            panels.append({"title": f"toy world v2: H vs number of {label}", "x_label": f"number of {label}",
                           "y_label": "H (higher is better)", "series": series})
    if panels and args.plot:
        save_panels(args.plot, panels)
        print(f"wrote {args.plot}")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

"""Issue 16's variant table: every change to MACE's stage 2/3 tried on toy world v2, side by side.

Each variant is measured with the celebrity protocol of ``bench.mass_quality`` (same prompt sets
and seeds): Acc_e / Acc_g / Acc_s / H with binomial SEs, integrity and the retained-set Fréchet
distance. The rows that lost stay in the table. ``oracle`` is not a method: CFR that preserves the
*retained* names themselves (the evaluation set no method may see), an upper reference for what a
linear K/V edit can keep in this world; ``oracle_preserve_S`` traces its trade-off (preserve scale S).

    python -m bench.mace_variants                      # 1 and 10 names (~25 min on one core)
    python -m bench.mace_variants --counts 100 --variants cfr full_ref lora_preserve_10
    python -m bench.mace_variants --counts 10 50 100 --variants oracle oracle_preserve_0.5 oracle_preserve_2 \
        oracle_preserve_4 --out docs/results/mace_variants_oracle.json   # the K/V ceiling (~6 min)
    python -m bench.mace_variants --plot-only --out docs/results/mace_variants_oracle.json \
        --plot docs/results/mace_variants_oracle.png                           # redraw its plot
"""
from __future__ import annotations

import time

from bench.common import (check_count, environment, markdown_table, print_table, reference_rows, saved_rows,
                          toy_v2_args, toy_v2_parser, toy_v2_setup, write_json)
from bench.plot import save_h_and_acc_s
from toyworld.v2 import erase, evaluate

# cfr_tokens_prior_1's overrides of the reference: the pack's CFR stage (concept tokens mapped, prior on);
# the rows built on it add one change each
PACK = {"cfr_concept_tokens": True, "prior_weight": 1.0}
VARIANTS = {
    # name: (what it is, how it is made)
    "cfr": ("CFR alone (concept tokens mapped)", None),
    "uce": ("UCE-style closed form", None),
    "cfr_prior_1": ("CFR alone + toy caption prior (weight 1)", None),
    "oracle": ("CFR preserving the retained set itself (upper reference, not a method)", {"oracle": {}}),
    # the oracle's trade-off curve: how much a linear K/V edit can keep at all (not methods)
    **{f"oracle_preserve_{s:g}": (f"oracle, preserve scale x{s:g} (upper reference, not a method)",
                                  {"oracle": {"preserve_scale": s}}) for s in (0.5, 2.0, 4.0)},
    "cfr_prior_1_preserve_2": ("CFR alone + toy caption prior, preserve scale x2",
                               {"cfr": {"prior_weight": 1.0, "preserve_scale": 2.0}}),
    "cfr_prior_1_preserve_4": ("CFR alone + toy caption prior, preserve scale x4",
                               {"cfr": {"prior_weight": 1.0, "preserve_scale": 4.0}}),
    "full_ref": ("full MACE, the paper's stage 2/3", {}),
    "fusion_concept_positions": ("full_ref, fusion fits only the concept's positions",
                                 {"fusion_positions": "concept"}),
    "fusion_preserve_x10": ("full_ref, fusion preserve scale x10", {"fusion_preserve_scale": 10.0}),
    "lora_preserve_3": ("full_ref + LoRA preservation term, weight 3", {"lora_preserve": 3.0}),
    "lora_preserve_10": ("full_ref + LoRA preservation term, weight 10", {"lora_preserve": 10.0}),
    "lora_preserve_10_concept_positions": ("lora_preserve_10 + fusion on the concept's positions",
                                           {"lora_preserve": 10.0, "fusion_positions": "concept"}),
    "lora_preserve_10_prior_1": ("lora_preserve_10 + toy caption prior (weight 1)",
                                 {"lora_preserve": 10.0, "prior_weight": 1.0}),
    "prior_1": ("full_ref + toy caption prior (weight 1) in CFR and fusion",
                {"prior_weight": 1.0}),
    "lora_preserve_1_prior_1": ("full_ref + LoRA preservation 1 + toy caption prior 1",
                                {"lora_preserve": 1.0, "prior_weight": 1.0}),
    "cfr_tokens_prior_1": ("full_ref, CFR stage also maps the concept tokens, + toy caption prior 1", PACK),
    "null_space_90": ("cfr_tokens_prior_1 + LoRA input factor off the preserve set's top directions (90% energy)",
                      {**PACK, "lora": {"null_space": 0.9}}),
    "null_space_99": ("cfr_tokens_prior_1 + LoRA input factor off the preserve set's top directions (99% energy)",
                      {**PACK, "lora": {"null_space": 0.99}}),
    "null_space_999": ("cfr_tokens_prior_1 + LoRA input factor off the preserve set's top directions (99.9% energy)",
                       {**PACK, "lora": {"null_space": 0.999}}),
    "null_space_99_current": ("null_space_99, fusion keeps the preserve prompts at the CFR weights (current)",
                              {**PACK, "lora": {"null_space": 0.99}, "fusion_preserve_to": "current"}),
    "null_space_999_current": ("null_space_999, fusion keeps the preserve prompts at the CFR weights (current)",
                               {**PACK, "lora": {"null_space": 0.999}, "fusion_preserve_to": "current"}),
    "cfr_tokens_prior_1_current": ("cfr_tokens_prior_1, fusion keeps the preserve prompts at the CFR weights",
                                   {**PACK, "fusion_preserve_to": "current"}),
    "rank_4": ("cfr_tokens_prior_1 with rank-4 LoRAs", {**PACK, "lora": {"rank": 4}}),
    "k_only": ("cfr_tokens_prior_1, only K trained (the nodes' cached-query path, 8 recorded samples)",
               {**PACK, "lora": {"path": "cached_queries", "query_samples": 8}}),
    "trajectory": ("ANT-style trajectory objective (lr 3e-3, 50 steps)",
                   {"lora": {"objective": "trajectory"}}),
    "trajectory_long": ("ANT-style trajectory objective (lr 1e-2, 150 steps)",
                        {"lora": {"objective": "trajectory", "lr": 1e-2, "steps": 150}}),
}
COLUMNS = ["variant", "concepts", "H", "acc_e", "acc_g", "acc_s", "se_s", "integrity", "fd", "seconds"]


def weights_for(world, task: erase.Task, variant: str, retained):
    if variant == "cfr":
        return erase.cfr_erase(world, task).weights
    if variant == "uce":
        return erase.uce_erase(world, task).weights
    if variant == "cfr_prior_1":
        return erase.cfr_erase(world, task, prior_weight=1.0).weights
    how = VARIANTS[variant][1]
    if "oracle" in how:
        return erase.cfr_erase(world, erase.Task(task.kind, task.erase, tuple(retained)), **how["oracle"]).weights
    if "cfr" in how:
        return erase.cfr_erase(world, task, **how["cfr"]).weights
    return erase.mace_erase(world, task, **erase.mace_setting("reference", **how)).fused


def save_plot(path: str, rows: list[dict]) -> None:
    """H and Acc_s against the number of erased names: each variant of ``rows`` (not the unedited
    model), then ``bench.mass_quality``'s rows of the pack's methods at the same counts."""
    labelled = ([(r["variant"], r) for r in rows if r["variant"] != "none"]
                + [(f"{r['method']} (mass_quality)", r) for r in reference_rows("name", {r["concepts"] for r in rows})])
    save_h_and_acc_s(path, labelled, "toy v2: K/V variants vs the pack, H", "name")


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10], help="numbers of erased names")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out words, retained)")
    ap.add_argument("--plot", default=None, help="also write a PNG of H and Acc_s against the count")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out's JSON, no fitting")
    args = toy_v2_args(ap, argv, out="bench/results/mace_variants.json")
    if args.plot_only:
        save_plot(args.plot, saved_rows(args.plot, [args.out]))
        return
    toy = toy_v2_setup(args)
    world, preserve, retained = toy.world, toy.preserve, toy.retained
    rows, t_start = [], time.time()
    for count in args.counts:
        check_count(count, toy.most, "--counts")
        task = erase.Task("name", tuple(erase.vocab.NAMES[:count]), tuple(preserve))
        base, base_ret = evaluate.mass_metrics(world, "name", task.erase, retained, n_erased=args.n,
                                               n_retained=args.n)
        rows.append({"variant": "none", **base.row(), "seconds": 0.0, "what": "the unedited model"})
        for variant in args.variants:
            t0 = time.perf_counter()
            weights = weights_for(world, task, variant, retained)
            seconds = time.perf_counter() - t0
            m, _ = evaluate.mass_metrics(world, "name", task.erase, retained, kv_weights=weights,
                                         base_retained=base_ret, n_erased=args.n, n_retained=args.n)
            rows.append({"variant": variant, **m.row(), "seconds": round(seconds, 2), "what": VARIANTS[variant][0]})
            print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, {"bench": "mace_variants", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t_start) / 60, 1), "n_per_set": args.n,
                          "recommended": erase.RECOMMENDED, "reference": erase.REFERENCE,
                          "variants": {k: v[0] for k, v in VARIANTS.items()}, "rows": rows})
    if args.plot:
        save_plot(args.plot, rows)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

"""LoRA stage: full backprop against cached queries, time and quality side by side in one run.

Toy world v2, names, the MACE pipeline (CFR -> one LoRA per concept -> fusion) with the paper's
stage 2/3 settings (``erase.mace_setting("reference")``, where the LoRA stage does the erasing)
and the pack's (``"recommended"``). Per LoRA path, at 1 and 10 erased names, with the same seeds:

* ``full``: backprop through the denoiser every step, K and V LoRAs (the reference's path);
* ``full_k``: the same with the V LoRAs frozen at zero (does training V matter?);
* ``cached_<n>``: the K LoRAs against the queries of n recorded samples (``cached_queries``);
  ``cached_50`` records exactly the 50 draws the full path trains on.

Reported: per-concept LoRA training time (``train_concept_lora``, wall, mean over concepts, after
a warm-up run of every path) and the speed-up over ``full`` (``ratio``); the per-concept LoRA stage
(training images + own CFR + training);
H and Acc_e/Acc_g/Acc_s with binomial SEs (``evaluate.mass_metrics``, n stated). Because the
machine is shared, the time table also comes from ``--reps`` interleaved 1-name runs per path
(path A, B, C, ..., A, B, C, ...): median and min of the training time, ratio of medians.

    python -m bench.lora_speed            # docs/results/lora_speed.json (~25 min on 2 cores)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

from bench.common import environment, markdown_table, print_table, toy_v2_args, toy_v2_parser, toy_v2_setup, write_json
from toyworld.v2 import erase, evaluate, vocab

COLUMNS = ["setting", "path", "concepts", "H", "acc_e", "se_e", "acc_g", "se_g", "acc_s", "se_s", "n_e", "n_s",
           "lora_s", "ratio", "stage_s"]


TIME_COLUMNS = ["path", "runs", "median_s", "min_s", "ratio"]


class _KOnlyDenoiser:
    """The world's denoiser with the LoRA's V factors ignored (they get no gradient and stay zero)."""

    def __init__(self, inner):
        self.inner, self.num_train_timesteps = inner, inner.num_train_timesteps

    def kv_weights(self):
        return self.inner.kv_weights()

    def add_noise(self, x0, noise, t):
        return self.inner.add_noise(x0, noise, t)

    def forward_with_attention(self, x_t, t, context, on_attention, weight_transform=None):
        wt = None if weight_transform is None else (
            lambda name, w: weight_transform(name, w) if ".to_k." in name else w)
        return self.inner.forward_with_attention(x_t, t, context, on_attention, wt)


class _World:
    def __init__(self, world, k_only: bool):
        self.world, self.k_only = world, k_only
        self.model, self.text_encoder = world.model, world.text_encoder

    @property
    def denoiser(self):
        return _KOnlyDenoiser(self.world.denoiser) if self.k_only else self.world.denoiser

    def kv_weights(self):
        return self.world.kv_weights()


def paths(pools):
    yield "full", {"path": "full"}, False
    yield "full_k", {"path": "full"}, True
    for n in pools:
        yield f"cached_{n}", {"path": "cached_queries", "query_samples": n}, False


def interleaved_timing(world, preserve, pools, reps: int) -> list[dict]:
    """Per path: LoRA training seconds of one concept (reference setting), ``reps`` interleaved runs."""
    task = erase.Task("name", (vocab.NAMES[0],), tuple(preserve))
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        for label, lora_over, k_only in paths(pools):
            kw = erase.mace_setting("reference")
            kw["lora"] = replace(kw["lora"], **lora_over)
            run = erase.mace_erase(_World(world, k_only), task, **kw)
            times.setdefault(label, []).append(run.seconds["lora_train"])
    full = statistics.median(times["full"])
    return [{"path": label, "runs": len(ts), "median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3),
             "ratio": round(full / statistics.median(ts), 2)} for label, ts in times.items()]


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--pools", type=int, nargs="+", default=[50, 16, 8], help="cached-query pool sizes")
    ap.add_argument("--settings", nargs="+", default=["reference", "recommended"])
    ap.add_argument("--n-erased", type=int, default=200)
    ap.add_argument("--n-retained", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing runs per path")
    args = toy_v2_args(ap, argv, out="bench/results/lora_speed.json", threads=2)
    toy = toy_v2_setup(args)
    world, preserve, retained = toy.world, toy.preserve, toy.retained
    rows, t_start = [], time.time()
    warm = erase.Task("name", (vocab.NAMES[199],), tuple(preserve))
    for _, lora_over, k_only in paths(args.pools):  # first-call costs stay out of the timings
        kw = erase.mace_setting("reference")
        erase.mace_erase(_World(world, k_only), warm, **{**kw, "lora": replace(kw["lora"], steps=2, **lora_over)})
    base_retained = {}
    for count in args.counts:
        task = erase.Task("name", tuple(vocab.NAMES[:count]), tuple(preserve))
        _, base_retained[count] = evaluate.mass_metrics(world, "name", task.erase, retained, n_erased=args.n_erased,
                                                        n_retained=args.n_retained)
        for setting in args.settings:
            full_s = None
            for label, lora_over, k_only in paths(args.pools):
                kw = erase.mace_setting(setting)
                kw["lora"] = replace(kw["lora"], **lora_over)
                run = erase.mace_erase(_World(world, k_only), task, **kw)
                m, _ = evaluate.mass_metrics(world, "name", task.erase, retained, kv_weights=run.fused,
                                             base_retained=base_retained[count], n_erased=args.n_erased,
                                             n_retained=args.n_retained)
                lora_s = run.seconds["lora_train"] / count
                full_s = lora_s if label == "full" else full_s
                r = m.row()
                rows.append({"setting": setting, "path": label, **r, "lora_s": round(lora_s, 3),
                             "ratio": round(full_s / lora_s, 2), "stage_s": round(run.lora_seconds_per_concept, 3)})
                print({k: rows[-1].get(k) for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
    timing = interleaved_timing(world, preserve, args.pools, args.reps)
    print()
    print_table(timing, TIME_COLUMNS)
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, {"bench": "lora_speed", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t_start) / 60, 1),
                          "settings": {"lora": erase.DEFAULT_LORA.settings(), "reference": erase.REFERENCE,
                                       "recommended": erase.RECOMMENDED, "n_erased": args.n_erased,
                                       "n_retained": args.n_retained, "threads": args.threads},
                          "timing": timing, "rows": rows})
    print(markdown_table(timing, TIME_COLUMNS))
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

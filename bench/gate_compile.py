"""Can the ACE gate become a weight edit? The gate compiled into the last text MLP (issue 16, toy v2).

The gate (``mace_ops.ace``) reaches H 0.99 at 100 names, but it is a runtime patch, not weights a
stock loader reads. ``mace_ops.text_gate`` compiles it into the last text layer's MLP: two ramp
units per concept whose pre-activation is the gate's cosine to the concept's mean prototype at
the MLP's input, exactly (``bench.gate_separation --site last_mlp_input`` bounds what such units
can decide), closed at the gate's threshold and writing R(anchor) - R(concept) when open.

* ``--units replace``: the 2n units replace the MLP's 2n least important ones
  (``compile_text_gate``): the MLP keeps its width, so the edit is a plain weight change (the
  ``.diff`` of two matrices and two biases);
* ``--units add``: the same units widen the MLP instead (SD1's CLIP-L last MLP has 3,072 units, so
  100 concepts would take 6.5% of them): what replacing costs.

``--half`` also scores each compiled encoder with its weights and arithmetic in float16 (what a GPU
running CLIP in fp16 does; the units' weights are large, s = 1,200 here): the UNet and the retained
set's reference stay float32.

Unlike the gate, a unit acts on one position: nothing carries the detection forward to the words
after the concept, which the last layer's attention has already mixed the concept into.
Not a node of the pack: a measurement of whether the gate's boundary survives as weights.

    python -m bench.gate_compile --plot docs/results/gate_compile.png --grid docs/results/gate_compile_grid.png \
        --out docs/results/gate_compile.json     # ~4 min on 2 threads
"""
from __future__ import annotations

import copy
import time

import torch

from bench.common import (check_count, environment, markdown_table, plotted_kind, print_table, reference_rows,
                          saved_rows, toy_v2_args, toy_v2_parser, toy_v2_setup, write_json)
from bench.grid import save_grid
from bench.plot import save_h_and_acc_s
from toyworld.v2 import erase, evaluate
from toyworld.v2.erase import KV_STAGES, kv_stage
from toyworld.v2.text_edit import compile_gate, with_text_encoder

COLUMNS = ["kind", "concepts", "units", "kv", "dtype", "added", "H", "acc_e", "acc_g", "acc_s", "se_s", "integrity", "fd", "mean_tau", "seconds"]
UNITS = ("add", "replace")


class Float16Text(torch.nn.Module):
    """``text`` run in float16 (weights and arithmetic), its features handed on as float32."""

    def __init__(self, text: torch.nn.Module):
        super().__init__()
        self.text = copy.deepcopy(text).half()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids).float()


def save_plot(path: str, rows: list[dict], reference: list[dict]) -> None:
    """H and Acc_s against the count: each (units, K/V stage) setting, then the pack's reference rows."""
    kind = plotted_kind(rows)
    def label(r):
        name = "no edit" if r["units"] == "none" else f"compiled gate ({r['units']})"
        return (name + ("" if r.get("kv", "none") == "none" else f" + {r['kv']}")
                + (" fp16" if r.get("dtype") == "float16" else ""))
    labelled = [(label(r), r) for r in rows]
    save_h_and_acc_s(path, labelled + [(r["method"], r) for r in reference],
                     "toy v2: the ACE gate as a weight edit vs the pack, H", kind)


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--kind", choices=("name", "style"), default="name", help="what is erased")
    ap.add_argument("--counts", type=int, nargs="+", default=None,
                    help="numbers of erased concepts (default: 10 50 100 names, 5 10 styles)")
    ap.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS),
                    help="add: the units widen the MLP; replace: they replace its least important units")
    ap.add_argument("--kv", nargs="+", default=["none"], choices=list(KV_STAGES),
                    help="the pack's K/V stages fitted on top of each compiled encoder: " +
                         "; ".join(f"{k}: {v}" for k, v in KV_STAGES.items()))
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out words, retained)")
    ap.add_argument("--half", action="store_true",
                    help="also score each compiled encoder in float16 (Float16Text; with --kv none only)")
    ap.add_argument("--plot", default=None, help="also write a PNG of H and Acc_s against the count")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out's JSON, no fitting")
    ap.add_argument("--grid", default=None,
                    help="also write a labelled image grid at the largest count of names: no edit, the ACE "
                         "gate, each --units")
    args = toy_v2_args(ap, argv, out="bench/results/gate_compile.json")
    if args.plot_only:
        rows = saved_rows(args.plot, [args.out])
        save_plot(args.plot, rows, reference_rows(plotted_kind(rows), {r["concepts"] for r in rows}))
        return
    if args.half and args.kv != ["none"]:
        raise SystemExit("--half: scores the compiled encoder alone; drop --kv or --half")
    if args.grid and args.kind != "name":
        raise SystemExit("--grid: draws names (erased, nicknames, retained); with --kind style drop it")
    kind = args.kind
    counts = args.counts or ([10, 50, 100] if kind == "name" else [5, 10])
    toy = toy_v2_setup(args, kind)
    pool = erase.vocab.NAMES if kind == "name" else erase.vocab.STYLES
    world, rows, t_start = toy.world, [], time.time()
    for count in counts:
        check_count(count, toy.most, "--counts")
        task = erase.Task(kind, tuple(pool[:count]), toy.preserve)
        _, base_ret = evaluate.mass_metrics(world, kind, task.erase, toy.retained, n_erased=args.n, n_retained=args.n)
        models = {}
        if args.half:   # the unedited encoder in float16: what fp16 alone costs
            m, _ = evaluate.mass_metrics(with_text_encoder(world, Float16Text(world.model.text)), kind, task.erase,
                                         toy.retained, base_retained=base_ret, n_erased=args.n, n_retained=args.n)
            rows.append({"units": "none", "kv": "none", "dtype": "float16", "added": 0, **m.row(), "mean_tau": None,
                         "seconds": 0.0})
        for units in args.units:
            t0 = time.perf_counter()
            try:
                text, gate = compile_gate(world, task, units)
            except ValueError as e:
                if units != "replace":
                    raise
                raise SystemExit(f"--units replace: {e}") from None     # the MLP has too few units to replace
            seconds = time.perf_counter() - t0
            edited = with_text_encoder(world, text)
            models[f"compiled ({units})"] = edited.model
            for stage in args.kv:
                t1 = time.perf_counter()
                weights = kv_stage(edited, task, stage)
                kv_seconds = time.perf_counter() - t1
                m, _ = evaluate.mass_metrics(edited, kind, task.erase, toy.retained, kv_weights=weights,
                                             base_retained=base_ret, n_erased=args.n, n_retained=args.n)
                rows.append({"units": units, "kv": stage, "dtype": "float32", "added": 2 * count if units == "add" else 0,
                             **m.row(), "mean_tau": round(float(gate.thresholds.mean()), 4),
                             "seconds": round(seconds + kv_seconds, 1)})
                print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
            if args.half:
                m, _ = evaluate.mass_metrics(with_text_encoder(world, Float16Text(text)), kind, task.erase, toy.retained,
                                             base_retained=base_ret, n_erased=args.n, n_retained=args.n)
                rows.append({**rows[-1], **m.row(), "dtype": "float16"})
                print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
        if args.grid and count == max(counts):
            edits = {"no edit": (None, None), "ACE gate": (None, erase.ace_erase(world, task)),
                     **{m: (None, None) for m in models}}
            save_grid(world, args.grid, task, toy.retained, edits, models)
    print()
    print_table(rows, COLUMNS)
    reference = reference_rows(kind, set(counts))
    write_json(args.out, {"bench": "gate_compile", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t_start) / 60, 1), "n_per_set": args.n,
                          "reference": reference, "rows": rows})
    if args.plot:
        save_plot(args.plot, rows, reference)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

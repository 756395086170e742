"""Can the ACE gate become a weight edit? The gate compiled into the last text MLP (issue 16, toy v2).

The gate (``mace_ops.ace``) reaches H 0.99 at 100 names, but it is a runtime patch, not weights a
stock loader reads. A hidden unit of the last text layer's MLP reads ``ln2``'s output; with

    w = s p / (sqrt(d) gamma),   b = -w . beta - s tau - 4        (gamma, beta: ``ln2``'s affine part)

its pre-activation is s (cos(x, p) - tau) - 4, x the standardised residual (fixed norm sqrt(d)), so
it computes the gate's cosine to a prototype p exactly (``bench.gate_separation --site
last_mlp_input`` bounds what such units can decide). Two GELU units per concept make a ramp,

    g = (GELU(z) - GELU(z - 4)) / 4,    z = s (cos - tau) - 4,   s = 12 / (2 T)

closed (|g| < 1e-4) at and below tau and open (g ~ 1) from tau + 2T on (T the pack's gate temperature),
and their output column writes g Delta_i, Delta_i = R(anchor) - R(concept i): the post-MLP residual
of the anchor's prompts minus the concept's at the concept's slot, averaged over the templates. p_i
is the concept's mean prototype at that site (the gate keeps one per template; units add, a max
cannot be compiled, so one row per concept), tau_i calibrated as the gate's are: the per-concept
quantile over the calibration prompts, floored by the shared split-conformal floor (``open_rate``).

* ``--units add``: the 2n units join the MLP (a wider MLP: SD1's CLIP-L last MLP has 3,072 units,
  so 100 concepts would take 6.5% of them if they could be replaced at no cost);
* ``--units replace``: they replace the 2n units of least importance (mean |GELU| x output column
  norm over the calibration prompts), whose mean output is folded into the bias: the MLP keeps its
  width, so the edit is a plain weight change (``.diff`` of two matrices and two biases).

Unlike the gate, a unit acts on one position: nothing carries the detection forward to the words
after the concept, which the last layer's attention has already mixed the concept into.
Not a method of the pack: a measurement of whether the gate's boundary survives as weights.

    python -m bench.gate_compile --plot docs/results/gate_compile.png --grid docs/results/gate_compile_grid.png \
        --out docs/results/gate_compile.json     # ~4 min on 2 threads
"""
from __future__ import annotations

import copy
import math
import time

import torch

from bench.common import (check_count, environment, markdown_table, print_table, reference_rows, saved_rows,
                          toy_v2_args, toy_v2_parser, toy_v2_setup, write_json)
from bench.gate_separation import at_site
from bench.mass_quality import save_grid
from bench.plot import save_h_and_acc_s
from bench.text_encoder_edit import with_text_encoder
from mace_ops.ace import TEMPERATURE, GatedErasure, mentions, prompt_peaks, shared_floor
from mace_ops.templates import fill
from toyworld.v1 import diffusion
from toyworld.v2 import erase, evaluate

COLUMNS = ["concepts", "units", "added", "H", "acc_e", "acc_g", "acc_s", "se_s", "integrity", "fd", "mean_tau", "seconds"]
UNITS = ("add", "replace")
OPEN_Z = 4.0     # the ramp's pre-activation offset: GELU(-4) ~ -1.3e-4, closed at tau


def slot_positions(world, prompts: list[str], word: str) -> torch.Tensor:
    ids = diffusion.ids_tensor(prompts, world.model.vocab)
    return ids, (ids == world.model.vocab.TOKEN_ID[word]).int().argmax(1)


def residuals(text, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual entering the last MLP's ``ln2``, the residual after the MLP), (B, L, d) each."""
    caught = []
    hook = text.layers[-1].ln2.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        with torch.no_grad():
            text(ids)
    finally:
        hook.remove()
    r = caught[0]
    with torch.no_grad():
        return r, r + text.layers[-1].ff(text.layers[-1].ln2(r))


def mean_prototype_gate(world, task: erase.Task, open_rate: float = 0.05, quantile: float = 0.999):
    """(the gate read at the last MLP's input with one mean prototype per concept, Delta (n, d)): tau
    calibrated as ``fit_gated_erasure`` does, on the preserve prompts (grouped by name) and captions."""
    site = at_site(world, "last_mlp_input").text_encoder
    text, tpls = world.model.text, task.templates
    a_ids, a_pos = slot_positions(world, [fill(t, task.anchor) for t in tpls], task.anchor)
    _, r_a = residuals(text, a_ids)
    protos, deltas = [], []
    for name in task.erase:
        ids, pos = slot_positions(world, [fill(t, name) for t in tpls], name)
        r, post = residuals(text, ids)
        x = r[torch.arange(len(ids)), pos]
        x = torch.nn.functional.normalize(x - x.mean(-1, keepdim=True), dim=-1)     # the site's cosine space
        protos.append(torch.nn.functional.normalize(x.mean(0), dim=0))
        deltas.append((r_a[torch.arange(len(ids)), a_pos] - post[torch.arange(len(ids)), pos]).mean(0))
    n = len(task.erase)
    gate = GatedErasure(torch.stack(protos), torch.arange(n), torch.zeros(n), torch.zeros(n, protos[0].numel(), 1),
                        torch.zeros(n, 1))
    prompts, groups = task.preserve_groups()
    prompts, groups = prompts + erase.prior_captions(), groups + [None] * len(erase.prior_captions())
    peaks = prompt_peaks(gate, site.encode(prompts))
    names = mentions(prompts, task.concepts())
    per_concept = torch.nanquantile(peaks.masked_fill(names, float("nan")), quantile, dim=0)
    gate.thresholds = per_concept.clamp(min=shared_floor(peaks.masked_fill(names, -2.0), groups, open_rate))
    return gate, torch.stack(deltas)


def importance(text, prompts: list[str], vocab) -> torch.Tensor:
    """(units,) mean |GELU activation| x output-column norm of the last MLP over ``prompts``, and the
    mean activation (for folding a removed unit into the bias)."""
    ff = text.layers[-1].ff
    r, _ = residuals(text, diffusion.ids_tensor(prompts, vocab))
    with torch.no_grad():
        act = ff[1](ff[0](text.layers[-1].ln2(r))).flatten(0, 1)
    return act.abs().mean(0) * ff[2].weight.norm(dim=0), act.mean(0)


def compiled_units(text, gate: GatedErasure, deltas: torch.Tensor, width: float):
    """(fc1 rows (2n, d), fc1 bias (2n,), fc2 columns (d, 2n)) of the ramp units (module docstring)."""
    ln2 = text.layers[-1].ln2
    d, s = gate.prototypes.shape[1], 12.0 / width
    w = s * gate.prototypes / (math.sqrt(d) * ln2.weight)                          # (n, d)
    b = -(w @ ln2.bias) - s * gate.thresholds - OPEN_Z
    rows, bias = torch.cat([w, w]), torch.cat([b, b - OPEN_Z])                      # z and z - 4
    cols = torch.cat([deltas, -deltas]).T / OPEN_Z                                  # (GELU(z) - GELU(z-4)) / 4
    return rows, bias, cols


def compile_gate(world, task: erase.Task, units: str, width: float = 2 * TEMPERATURE, open_rate: float = 0.05):
    """A copy of the text encoder whose last MLP carries the compiled gate (``units`` add or replace)."""
    gate, deltas = mean_prototype_gate(world, task, open_rate)
    text = copy.deepcopy(world.model.text)
    ff = text.layers[-1].ff
    rows, bias, cols = compiled_units(text, gate, deltas, width)
    k = rows.shape[0]
    with torch.no_grad():
        w1, b1, w2, b2 = ff[0].weight, ff[0].bias, ff[2].weight, ff[2].bias.clone()
        if units == "add":
            w1, b1, w2 = torch.cat([w1, rows]), torch.cat([b1, bias]), torch.cat([w2, cols], 1)
        else:
            if k > w1.shape[0]:
                raise SystemExit(f"--units replace: {k} units needed, the MLP has {w1.shape[0]}")
            prompts, _ = task.preserve_groups()
            score, mean = importance(world.model.text, prompts + erase.prior_captions(), world.model.vocab)
            drop = score.argsort()[:k]
            b2 += w2[:, drop] @ mean[drop]
            w1, b1, w2 = w1.clone(), b1.clone(), w2.clone()
            w1[drop], b1[drop], w2[:, drop] = rows, bias, cols
        new0, new2 = torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.Linear(w2.shape[1], w2.shape[0])
        new0.weight.copy_(w1), new0.bias.copy_(b1), new2.weight.copy_(w2), new2.bias.copy_(b2)
    ff[0], ff[2] = new0, new2
    return text.eval().requires_grad_(False), gate


def save_plot(path: str, rows: list[dict], reference: list[dict]) -> None:
    """H and Acc_s against the count: each ``units`` setting, then the pack's reference rows."""
    labelled = [(f"compiled gate ({r['units']})", r) for r in rows]
    save_h_and_acc_s(path, labelled + [(r["method"], r) for r in reference],
                     "toy v2: the ACE gate as a weight edit vs the pack, H", "name")


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 50, 100], help="numbers of erased names")
    ap.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS),
                    help="add: the units widen the MLP; replace: they replace its least important units")
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, nicknames, retained)")
    ap.add_argument("--plot", default=None, help="also write a PNG of H and Acc_s against the count")
    ap.add_argument("--plot-only", action="store_true", help="redraw --plot from --out's JSON, no fitting")
    ap.add_argument("--grid", default=None,
                    help="also write a labelled image grid at the largest count: no edit, the ACE gate, each --units")
    args = toy_v2_args(ap, argv, out="bench/results/gate_compile.json")
    if args.plot_only:
        rows = saved_rows(args.plot, [args.out])
        save_plot(args.plot, rows, reference_rows("name", {r["concepts"] for r in rows}))
        return
    toy = toy_v2_setup(args)
    world, rows, t_start = toy.world, [], time.time()
    for count in args.counts:
        check_count(count, toy.most, "--counts")
        task = erase.Task("name", tuple(erase.vocab.NAMES[:count]), toy.preserve)
        _, base_ret = evaluate.mass_metrics(world, "name", task.erase, toy.retained, n_erased=args.n, n_retained=args.n)
        models = {}
        for units in args.units:
            t0 = time.perf_counter()
            text, gate = compile_gate(world, task, units)
            seconds = time.perf_counter() - t0
            edited = with_text_encoder(world, text)
            models[f"compiled ({units})"] = edited.model
            m, _ = evaluate.mass_metrics(edited, "name", task.erase, toy.retained,
                                         base_retained=base_ret, n_erased=args.n, n_retained=args.n)
            rows.append({"units": units, "added": 2 * count if units == "add" else 0, **m.row(),
                         "mean_tau": round(float(gate.thresholds.mean()), 4), "seconds": round(seconds, 1)})
            print({k: rows[-1][k] for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
        if args.grid and count == max(args.counts):
            edits = {"no edit": (None, None), "ACE gate": (None, erase.ace_erase(world, task)),
                     **{m: (None, None) for m in models}}
            save_grid(world, args.grid, task, toy.retained, edits, models)
    print()
    print_table(rows, COLUMNS)
    reference = reference_rows("name", set(args.counts))
    write_json(args.out, {"bench": "gate_compile", "env": environment(), "world": world.metadata,
                          "minutes": round((time.time() - t_start) / 60, 1), "n_per_set": args.n,
                          "reference": reference, "rows": rows})
    if args.plot:
        save_plot(args.plot, rows, reference)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

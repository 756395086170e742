"""Every erasure method in toy worlds v2 and v3, over seeded splits: the table defaults are chosen by.

The celebrity protocol of ``bench.mass_quality`` (Acc_e on the erased main words, Acc_g on their
nicknames / style synonyms, Acc_s on a retained set no method sees; H, binomial SEs, integrity, FD,
wall time) in both worlds. Which names are erased, given as the preserve list and kept for Acc_s is
drawn from a permutation seeded by ``--splits`` (split 0 = the vocabulary's order, v2's committed
split): the rows come per split, and ``summary`` gives per (world, kind, count, method) the mean
H, the between-split standard deviation and the mean binomial SE.

Splits. v2 names: erased = perm[:n] (n <= 100), preserve = perm[100:150], retained = perm[150:200].
v3 names: retained = perm[1000:1200] (200 never erased), erased = perm[:n] (n <= 1000), preserve =
the next 100 after the erased ones, inside perm[:1000] (none at 1,000). Styles, both worlds:
erased = perm[:n] (n <= 10), preserve perm[10:15], retained perm[15:20].

Methods: none | cfr | cfr_prior | uce | full_ref (the paper's stages 2/3) | full (the pack's
defaults, ``erase.RECOMMENDED``) | full_ant (full_ref with ANT's trajectory objective) |
full_ref_salient (full_ref whose LoRAs may change only the 10% most salient K/V rows, ANT's weight
saliency: ``mace_ops.saliency``) | ace (the
run-time gate) | gate (the gate compiled into the last text MLP: ``replace`` units where the MLP has
2n of them, else ``add``) | gate_full (the compiled gate, then full MACE fitted on the gated encoder).

    python -m bench.two_worlds --worlds v3 --counts 10 100 --methods none cfr cfr_prior --splits 0 1 2
    python -m bench.two_worlds --combine a.json b.json --out docs/results/two_worlds.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

from bench.common import environment, markdown_table, print_table, write_json
from bench.grid import save_grid
from bench.plot import save_panels
from toyworld.v2 import erase
from toyworld.v2.text_edit import compile_gate, with_text_encoder

METHODS = ("none", "cfr", "cfr_prior", "uce", "full_ref", "full", "full_ant", "full_ref_salient", "ace", "gate",
           "gate_full")
NO_CFR_STAGE = ("none", "ace", "gate")
SALIENT_SHARE = 0.1   # ANT's weight saliency: the LoRA may change 10% of the K/V rows (fixed before measuring)
COLUMNS = ["world", "split", "method", "cfr_lambda", "kind", "concepts", "H", "se_H", "acc_e", "acc_g", "acc_s", "n_e", "n_s",
           "integrity", "fd", "seconds"]
SUMMARY_COLUMNS = ["world", "kind", "concepts", "method", "cfr_lambda", "splits", "H_mean", "H_split_sd", "se_H_mean",
                   "acc_e", "acc_g", "acc_s", "seconds"]


# ----------------------------------------------------------------------------- worlds and splits
def load(world_name: str):
    """(world, vocab module, evaluate module) of toy world ``v2`` or ``v3``."""
    if world_name == "v2":
        from toyworld.v2 import evaluate, vocab
    else:
        from toyworld.v3 import evaluate, vocab
    return evaluate.load_world(), vocab, evaluate


def most(world_name: str, kind: str) -> int:
    return 10 if kind == "style" else (100 if world_name == "v2" else 1000)


def split(world_name: str, vocab, kind: str, count: int, seed: int) -> tuple[tuple, tuple, tuple]:
    """(erased, preserve, retained) for ``count`` concepts under split ``seed`` (module docstring)."""
    pool = list(vocab.NAMES if kind == "name" else vocab.STYLES)
    if count < 1 or count > most(world_name, kind):
        raise SystemExit(f"--counts: {count} {kind}s cannot be erased in toy world {world_name} "
                         f"(1 to {most(world_name, kind)})")
    order = list(range(len(pool))) if seed == 0 else torch.randperm(
        len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    perm = [pool[i] for i in order]
    if kind == "style":
        return tuple(perm[:count]), tuple(perm[10:15]), tuple(perm[15:20])
    if world_name == "v2":
        return tuple(perm[:count]), tuple(perm[100:150]), tuple(perm[150:200])
    return tuple(perm[:count]), tuple(perm[count:min(count + 100, 1000)]), tuple(perm[1000:1200])


# ----------------------------------------------------------------------------- methods
def edits(world, task: erase.Task, methods, lamb: float = erase.DEFAULT_LAMBDA, relative: bool = False):
    """Yield (method, world to sample, kv weights or None, context transform or None, seconds); ``lamb``
    is the CFR ridge of every method with a CFR stage (cfr, cfr_prior, uce, full*, gate_full), in
    units of the mean token energy when ``relative`` (``mace_ops.cfr.CFRConfig.relative_lambda``)."""
    ridge_kw = {"lamb": lamb, "relative_lambda": relative}
    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def mace(setting, **lora):
        return erase.mace_erase(world, task, **ridge_kw, **erase.mace_setting(setting, **(
            {"lora": lora} if lora else {}))).fused

    for name, fn in (("cfr", lambda: erase.cfr_erase(world, task, **ridge_kw).weights),
                     ("cfr_prior", lambda: erase.cfr_erase(world, task, prior_weight=1.0, **ridge_kw).weights),
                     ("uce", lambda: erase.uce_erase(world, task, **ridge_kw).weights),
                     ("full_ref", lambda: mace("reference")),
                     ("full", lambda: mace("recommended")),
                     ("full_ant", lambda: mace("reference", objective="trajectory")),
                     ("full_ref_salient", lambda: mace("reference", saliency=SALIENT_SHARE))):
        if name in methods:
            w, s = timed(fn)
            yield name, world, w, None, s
    if "ace" in methods:
        gate, s = timed(lambda: erase.ace_erase(world, task))
        yield "ace", world, None, gate, s
    if {"gate", "gate_full"} & set(methods):
        width = world.model.text.layers[-1].ff[0].out_features
        units = "replace" if 2 * len(task.erase) <= width // 2 else "add"
        (text, _), s = timed(lambda: compile_gate(world, task, units))
        gated = with_text_encoder(world, text)
        if "gate" in methods:
            yield "gate", gated, None, None, s
        if "gate_full" in methods:
            w, s2 = timed(lambda: erase.mace_erase(gated, task, **ridge_kw, **erase.mace_setting("recommended")).fused)
            yield "gate_full", gated, w, None, s + s2


# ----------------------------------------------------------------------------- summary
def _ridge_order(label: str | None) -> tuple:
    if label is None:
        return (0, 0.0)
    return (1 + label.endswith("/token"), float(label.split("/")[0]))


def ridge(row: dict) -> str | None:
    """The CFR ridge a row ran with, e.g. "0.1" (raw) or "10/token" (relative; rows written before it
    was recorded ran at 0.1 raw); None for the methods without a CFR stage."""
    if row["method"] in NO_CFR_STAGE:
        return None
    return f"{row.get('cfr_lambda', erase.DEFAULT_LAMBDA):g}" + ("/token" if row.get("cfr_lambda_relative") else "")


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["world"], r["kind"], r["concepts"], r["method"], ridge(r)), []).append(r)
    out = []
    for (world, kind, count, method, lamb), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], METHODS.index(kv[0][3]), _ridge_order(kv[0][4]))):
        hs = [r["H"] for r in rs]
        mean = sum(hs) / len(hs)
        sd = math.sqrt(sum((h - mean) ** 2 for h in hs) / (len(hs) - 1)) if len(hs) > 1 else None
        ses = [r["se_H"] for r in rs if r["se_H"] is not None]
        avg = lambda k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
        out.append({"world": world, "kind": kind, "concepts": count, "method": method, "cfr_lambda": lamb,
                    "splits": len(rs),
                    "H_mean": round(mean, 4), "H_split_sd": None if sd is None else round(sd, 4),
                    "se_H_mean": round(sum(ses) / len(ses), 4) if ses else None,
                    "acc_e": avg("acc_e"), "acc_g": avg("acc_g"), "acc_s": avg("acc_s"), "seconds": avg("seconds")})
    return out


def save_plot(path: str, summary: list[dict]) -> None:
    panels = []
    lambdas = {s["cfr_lambda"] for s in summary if s["cfr_lambda"] is not None}
    for world in sorted({s["world"] for s in summary}):
        for kind, label in (("name", "erased names"), ("style", "erased styles")):
            series = {}
            for s in summary:
                if s["world"] == world and s["kind"] == kind and s["method"] != "none":
                    bar = max(s["H_split_sd"] or 0.0, s["se_H_mean"] or 0.0)
                    name = s["method"] if len(lambdas) < 2 or s["cfr_lambda"] is None else \
                        f"{s['method']} (ridge {s['cfr_lambda'].replace('/token', ' rel')})"
                    series.setdefault(name, []).append((s["concepts"], s["H_mean"], bar))
            if series:
                panels.append({"title": f"toy world {world}: H vs {label} (mean over splits; bar: max(split SD, SE))",
                               "x_label": f"number of {label}", "y_label": "H (higher is better)", "series": series})
    if panels:
        save_panels(path, panels)
        print(f"wrote {path}")


def write(out: str, rows: list[dict], plot: str | None, minutes: float, args: dict) -> None:
    summary = summarise(rows)
    print()
    print_table(summary, SUMMARY_COLUMNS)
    write_json(out, {"bench": "two_worlds", "env": environment(), "minutes": round(minutes, 1), "args": args,
                     "settings": {"recommended": erase.RECOMMENDED, "reference": erase.REFERENCE,
                                  "lora": erase.DEFAULT_LORA.settings()},
                     "summary": summary, "rows": rows})
    if plot:
        save_plot(plot, summary)
    print(markdown_table(summary, SUMMARY_COLUMNS))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", choices=("v2", "v3"), default=["v2", "v3"])
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 10, 100], help="numbers of erased names")
    ap.add_argument("--style-counts", type=int, nargs="*", default=[1, 5, 10], help="numbers of erased styles")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2], help="split seeds (0 = vocabulary order)")
    ap.add_argument("--cfr-lambda", type=float, default=erase.DEFAULT_LAMBDA,
                    help="the CFR ridge (raw units: a sum over token vectors) of every method with a CFR stage")
    ap.add_argument("--relative-lambda", action="store_true",
                    help="count --cfr-lambda in units of the mean token energy (CFRConfig.relative_lambda)")
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out words, retained)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/two_worlds.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--grid", default=None, help="a labelled grid per world, '{world}' in the path: every method "
                                                 "at --grid-count names, the first split")
    ap.add_argument("--grid-count", type=int, default=10)
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="only merge the rows of earlier runs into --out (and --plot)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        write(args.out, [r for p in parts for r in p["rows"]], args.plot, sum(p["minutes"] for p in parts),
              {"combined": args.combine, "parts": [p["args"] for p in parts]})
        return
    t_start, rows = time.time(), []
    for world_name in args.worlds:
        world, vocab, evaluate = load(world_name)
        for kind, counts in (("name", args.counts), ("style", args.style_counts)):
            for count in counts:
                for seed in args.splits:
                    erased, preserve, retained = split(world_name, vocab, kind, count, seed)
                    task = erase.Task(kind, erased, preserve)
                    none, base = evaluate.mass_metrics(world, kind, erased, retained, n_erased=args.n,
                                                       n_retained=args.n)
                    results = edits(world, task, [m for m in args.methods if m != "none"], args.cfr_lambda,
                                    args.relative_lambda)
                    keep = ({} if args.grid and kind == "name" and count == args.grid_count
                            and seed == args.splits[0] else None)
                    if "none" in args.methods:
                        results = itertools.chain([("none", world, None, None, 0.0, none)], results)
                    for method, model_world, w, transform, seconds, *given in results:
                        m = given[0] if given else evaluate.mass_metrics(
                            model_world, kind, erased, retained, kv_weights=w, context_transform=transform,
                            base_retained=base, n_erased=args.n, n_retained=args.n)[0]
                        if keep is not None:
                            keep[method] = (model_world.model, w, transform)
                        rows.append({"world": world_name, "split": seed, "method": method,
                                     "cfr_lambda": None if method in NO_CFR_STAGE else args.cfr_lambda,
                                     "cfr_lambda_relative": args.relative_lambda and method not in NO_CFR_STAGE,
                                     **m.row(),
                                     "seconds": round(seconds, 2), "preserve": len(preserve),
                                     "retained": len(retained)})
                        print({k: rows[-1].get(k) for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]",
                              flush=True)
                        write_json(args.out + ".partial", {"bench": "two_worlds", "args": vars(args),
                                                           "minutes": round((time.time() - t_start) / 60, 1),
                                                           "rows": rows})   # nothing lost if a long run stops
                    if keep:
                        save_grid(world, args.grid.format(world=world_name), task, retained,
                                  {m: (w, ct) for m, (_, w, ct) in keep.items()},
                                  {m: model for m, (model, _, _) in keep.items()})
    write(args.out, rows, args.plot, (time.time() - t_start) / 60, vars(args))
    Path(args.out + ".partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()

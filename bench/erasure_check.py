"""Does the erasure check see what the ground truth sees? Toy world v2, the base model as the judge.

``MACE Erasure Check`` judges every sampled image with the *base* model as a zero-shot diffusion
classifier (``mace_ops.diffusion_classifier``). Here the same judge runs on toy world v2's prompt
sets (``evaluate.prompt_sets``: erased names / their nicknames / the 50 retained names, or erased
styles / synonyms / 5 retained styles), sampled from the base model and from each erased model,
and its Acc_e / Acc_g / Acc_s are set against the world's ground-truth scorer on *the same
images*. The candidates are what a user would list: the anchor, the erased and the retained
concepts (``toyworld.v2.check``); each image keeps its own prompt as the template.

Per method and task: a ``scorer`` and a ``check`` row in ``mass_quality``'s schema; a comparison
(difference per component, the tolerance max(0.05, 2 combined SEs), within or not, and the paired
SE of the difference); a confusion table per set (check x scorer); the judge's seconds and
forwards per image; the close calls (bootstrap p_label in (0.1, 0.9)) and how often they agree.

Methods: none | cfr_prior (CFR + caption prior) | full (the pack's recommended MACE) |
text_gate (the ACE gate compiled into the last text MLP, units replace, ``toyworld.v2.text_edit.compile_gate``).

    python -m bench.erasure_check --counts 10 --style-counts --n 200 --out bench/results/ec_10.json
    python -m bench.erasure_check --combine bench/results/ec_*.json --out docs/results/erasure_check.json
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import check_count, environment, markdown_table, print_table, toy_v2_args, toy_v2_parser, write_json
from mace_ops.diffusion_classifier import JudgeConfig
from mace_ops.erasure_metrics import mass_row, rate
from toyworld.v2 import check, erase, evaluate, vocab
from toyworld.v2.text_edit import compile_gate, with_text_encoder

METHODS = ("none", "cfr_prior", "full", "text_gate")
SETS = ("e", "g", "s")
COLUMNS = ["method", "kind", "concepts", "judge", "H", "acc_e", "se_e", "acc_g", "se_g", "acc_s", "se_s", "n_e",
           "n_g", "n_s"]
CMP_COLUMNS = ["method", "kind", "concepts", "pool", "d_e", "d_g", "d_s", "tol_e", "tol_g", "tol_s", "within",
               "agree", "close_calls", "s_per_image", "forwards_per_image"]


def erased_models(world, task: erase.Task, methods):
    """Yield (method, keyword arguments of ``check.check_set`` that sample the erased model, fit seconds)."""
    for method in methods:
        t0 = time.perf_counter()
        if method == "none":
            kw = {}
        elif method == "cfr_prior":
            kw = {"kv_weights": erase.cfr_erase(world, task, prior_weight=1.0).weights}
        elif method == "full":
            kw = {"kv_weights": erase.mace_erase(world, task, **erase.mace_setting("recommended")).fused}
        elif method == "text_gate":
            kw = {"model": with_text_encoder(world, compile_gate(world, task, "replace")[0]).model}
        else:
            raise ValueError(f"method: unknown {method!r}")
        yield method, kw, time.perf_counter() - t0


def compare(scorer_row: dict, check_row: dict, sets: dict) -> dict:
    """Differences check - scorer per component, tolerance max(0.05, 2 combined SEs), the paired SE."""
    out, within = {}, True
    for c in SETS:
        a, b = check_row[f"acc_{c}"], scorer_row[f"acc_{c}"]
        if a is None or b is None:
            out[f"d_{c}"] = out[f"tol_{c}"] = out[f"paired_se_{c}"] = None
            continue
        tol = max(0.05, 2 * math.hypot(check_row[f"se_{c}"], scorer_row[f"se_{c}"]))
        d = (sets[c].judgement.recognised.double() - sets[c].truth.double())
        out[f"d_{c}"], out[f"tol_{c}"] = round(a - b, 4), round(tol, 4)
        out[f"paired_se_{c}"] = round(float(d.std() / math.sqrt(len(d))), 4) if len(d) > 1 else None
        within = within and abs(a - b) <= tol
    out["within"] = within
    return out


def confusion(sc: check.SetCheck) -> dict:
    r, t = sc.judgement.recognised, sc.truth
    return {"both": int((r & t).sum()), "check_only": int((r & ~t).sum()), "scorer_only": int((~r & t).sum()),
            "neither": int((~r & ~t).sum())}


def close_calls(sets: dict) -> tuple[float, float]:
    """(fraction of images whose bootstrap p_label is in (0.1, 0.9), agreement among the others)."""
    p = torch.cat([s.judgement.p_label for s in sets.values()])
    agree = torch.cat([s.judgement.recognised == s.truth for s in sets.values()])
    close = (p > 0.1) & (p < 0.9)
    sure = agree[~close]
    return round(close.double().mean().item(), 4), round(sure.double().mean().item(), 4) if len(sure) else None


def pool_words(kind: str) -> tuple[str, ...]:
    return vocab.NAMES if kind == "name" else vocab.STYLES


def run_task(world, kind: str, count: int, methods, n: int, config: JudgeConfig, log=print, pool: str = "listed"):
    preserve, retained, _ = erase.preserve_and_retained(kind)
    task = erase.Task(kind, tuple(pool_words(kind)[:count]), tuple(preserve))
    psets = dict(zip(SETS, evaluate.prompt_sets(kind, task.erase, retained, n, n)))
    cands = check.candidates(kind, task.erase, retained)
    if pool == "all":  # a user who also lists every other concept of the domain as look-alikes
        cands = check.candidates(kind, task.erase, list(retained) + [c for c in pool_words(kind) if c not in cands])
    rows, comparisons, confusions = [], [], []
    for method, kw, fit_s in erased_models(world, task, methods):
        sets = {c: check.check_set(world, psets[c], kind, cands, config, **kw) for c in SETS}
        images = sum(len(s.truth) for s in sets.values())
        judge = {"s_per_image": round(sum(s.seconds for s in sets.values()) / images, 4),
                 "forwards_per_image": round(sum(s.judgement.forwards for s in sets.values()) / images, 1)}
        per = {j: {c: rate((s.judgement.recognised if j == "check" else s.truth).tolist()) for c, s in sets.items()}
               for j in ("scorer", "check")}
        pair = {j: mass_row(kind, count, v["e"], v["s"], v["g"], method=method, judge=j, candidates=len(cands),
                            pool=pool, seconds=round(fit_s, 2)) for j, v in per.items()}
        rows += [pair["scorer"], pair["check"]]
        close, sure = close_calls(sets)
        agree = torch.cat([s.judgement.recognised == s.truth for s in sets.values()]).double().mean().item()
        comparisons.append({"method": method, "kind": kind, "concepts": count, "pool": pool,
                            **compare(pair["scorer"], pair["check"], sets),
                            "agree": round(agree, 4), "close_calls": close, "agree_when_sure": sure, **judge})
        confusions += [{"method": method, "kind": kind, "concepts": count, "pool": pool, "set": c, **confusion(s)}
                       for c, s in sets.items()]
        log({k: comparisons[-1].get(k) for k in CMP_COLUMNS})
    return rows, comparisons, confusions


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 10], help="numbers of erased names")
    ap.add_argument("--style-counts", type=int, nargs="*", default=[5], help="numbers of erased styles")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--n", type=int, default=200, help="prompts per set (erased, held-out, retained)")
    ap.add_argument("--pool", choices=("listed", "all"), default="listed",
                    help="the judge's candidates: the anchor + erased + retained concepts (what a user lists), or "
                         "also every other name/style of the world (a user who lists the whole domain)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON", help="only merge earlier runs into --out")
    args = toy_v2_args(ap, argv, out="bench/results/erasure_check.json", threads=1)
    config = JudgeConfig()
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        merged = {key: [{"pool": "listed", **r} for part in parts for r in part[key]]
                  for key in ("rows", "comparisons", "confusion")}
        write(args.out, merged, parts[0]["world"], config, sum(p["minutes"] for p in parts),
              sorted({p["n_per_set"] for p in parts}))
        return
    torch.set_num_threads(args.threads)
    world = evaluate.load_world()
    t0 = time.time()
    merged = {"rows": [], "comparisons": [], "confusion": []}
    for kind, counts in (("name", args.counts), ("style", args.style_counts)):
        most = erase.preserve_and_retained(kind)[2]
        for count in counts:
            check_count(count, most, "--counts" if kind == "name" else "--style-counts")
            rows, cmp, conf = run_task(world, kind, count, args.methods, args.n, config,
                                       log=lambda r: print(r, f"[{(time.time() - t0) / 60:.1f} min]", flush=True),
                                       pool=args.pool)
            merged["rows"] += rows
            merged["comparisons"] += cmp
            merged["confusion"] += conf
    write(args.out, merged, world.metadata, config, (time.time() - t0) / 60, [args.n])


def write(out: str, merged: dict, world_meta: dict, config: JudgeConfig, minutes: float, n) -> None:
    print_table(merged["rows"], COLUMNS)
    print_table(merged["comparisons"], CMP_COLUMNS)
    write_json(out, {"bench": "erasure_check", "env": environment(), "world": world_meta,
                     "minutes": round(minutes, 1), "n_per_set": n[0] if len(n) == 1 else n,
                     "judge": {**asdict(config), "candidates": "anchor + erased + retained concepts",
                               "template": "each image's own prompt, the concept's word replaced"},
                     **merged})
    print(markdown_table(merged["comparisons"], CMP_COLUMNS))


if __name__ == "__main__":
    main()

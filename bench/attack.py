"""How robust is each erasure? Attack success rates in toy world v2 (or v3), every method side by side.

``--kind name`` (default): for 1 and 10 erased names (the first names of the vocabulary;
preserve list and retained set as in ``bench.mass_quality``), each method's edit is attacked:

* ``soft``: the soft-prompt attack (``mace_ops.attacks``; 2 tokens started at the anchor word,
  ``--steps`` Adam steps on the textual-inversion loss against 8 images the original model drew
  for the name), white-box against the edit (weights and gate). ``--runs`` attacks per cell: the
  erased names in turn, attack seeds of their own (900 + run).
* ``soft_lookalike``: the same attack started at the erased name's nearest look-alike that is not
  erased (same shape and place, nearest hue; ``robust.lookalike``), constant step 0.05, 60 steps.
  ASR = identity accuracy on 24 images per attack (every name template twice, fresh noise); SE over
  attacks (an attack succeeds or fails as a whole, so the attacks, not the images, are the sample).
* a gated edit whose gate is the ramp (closed, with no gradient, below its threshold) is attacked a
  second time through a smooth surrogate (the centred gate at ``--surrogate-temperature``, 0.02),
  the found prompt scored on the real gate; each attack counts the better of the two.
* ``paraphrase``: every nickname and the main word in 12 name templates + 11 name+style templates
  x 4 styles; the 8 best prompts per name on a search seed are scored on fresh noise (twice each);
  ``--para-names`` names per cell. SE over names' prompts (binomial over images, a lower bound).

``--kind style``: the same for 1 and 5 erased styles (anchor ``art``; the soft prompt takes the style
word's place in the 11 style templates; its loss is Min-SNR-1 weighted, ``robust.STYLE_ATTACK_CONFIG``;
the look-alike is the nearest style not erased: same background pattern, nearest grey tone;
ASR = the probe's style accuracy, chance 1/20, on 22 images per attack; paraphrase = the style
word and its synonym in every style template, 22 prompts, the best 8 redrawn twice).

Clean H (the celebrity protocol, ``--n-clean`` prompts per set) is measured in the same run.

``--world v3``: the same attacks in toy world v3 (``robust`` takes the world's vocabulary and
scorer: identity hits are v3's scorer's, glyph and colour). Split as ``bench.two_worlds.split``
with seed 0: erased = the first names, preserve list = the next 100, retained =
``vocab.NAMES[1000:1200]`` (styles: as v2). A name's look-alike is the nearest name not erased of
the same colour (``vocab.COLOR_OF``) by glyph Hamming distance (``vocab.code_bits``), ties by
index; paraphrases and styles as v2 (v3 shares v2's templates and style table). Every method runs
there (the text-encoder edits take the world's vocabulary and caption prior from its model).

``--cfr-lambda``: the CFR ridge of every method with a CFR stage (cfr_prior, cfr_prior_adv, uce,
full; default ``erase.DEFAULT_LAMBDA``), recorded in each row (None for the others).

Methods: none | cfr_prior (CFR + toy caption prior: the CFR node's defaults) | full (MACE with the
pack's defaults) | uce (UCE-style) | ace (ACE-style gated null-out, ``mace_ops.ace``) |
te_edit (``bench.text_encoder_edit``'s default: the last text MLP fitted with 512 synthetic stand-ins
per step, 400 steps per concept count up to 10, 800 above; attacked white-box through the edited
encoder, its attacker images still drawn by the original model) | gate_compiled (``bench.gate_compile``'s
``replace`` edit: the ACE gate compiled into the last text MLP's weights, same shapes; attacked the
same way) | cfr_prior_adv / ace_adv (the same + ``--rounds`` rounds of adversarial augmentation: the attack's
embeddings join the erase set; the defence's attacks use other init words and seeds than the
evaluation's) | ace_adv_both (ace_adv whose rounds also attack each name from its nearest word of
the preserve list by text-feature cosine, ``robust.nearest_kept``: the defender's own look-alike,
found without the world's attribute table; the evaluation's look-alike is another, unseen name).

    nice -n 10 env OMP_NUM_THREADS=1 python -m bench.attack       # docs/results/attack.json (~20 min)
    nice -n 10 env OMP_NUM_THREADS=1 python -m bench.attack --kind style --out docs/results/attack_styles.json
    nice -n 10 env OMP_NUM_THREADS=1 python -m bench.attack --world v3 --methods cfr_prior ace gate_compiled
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import torch

from bench.common import (check_count, environment, markdown_table, print_table, toy_v2_args, toy_v2_parser,
                          toy_v2_setup, write_json)
from mace_ops.ace import GATE_SHAPES, ACEConfig, GatedErasure
from mace_ops.adversarial import embedding_pairs
from toyworld.v2 import erase, evaluate, robust, vocab
from toyworld.v2.text_edit import compile_gate, edit_text_encoder, with_text_encoder

METHODS = ("none", "cfr_prior", "full", "uce", "ace", "cfr_prior_adv", "ace_adv", "ace_adv_both", "te_edit",
           "gate_compiled")
CFR_STAGE = ("cfr_prior", "cfr_prior_adv", "uce", "full")   # the methods --cfr-lambda reaches
WORLDS = ("v2", "v3")
SOFT_ATTACKS = ("soft", "soft_lookalike")
COLUMNS = ["method", "kind", "attack", "concepts", "asr", "se", "n", "n_attacks", "H", "acc_e", "acc_g", "acc_s", "seconds"]


def text_encoder_edited(world, task: erase.Task):
    """The world with ``bench.text_encoder_edit``'s default edit of its text encoder for ``task``
    (``toyworld.v2.text_edit.edit_text_encoder``)."""
    steps = 400 if len(task.erase) <= 10 else 800
    return with_text_encoder(world, edit_text_encoder(world, task, "ff_last", steps=steps, synthetic=512))


def gate_compiled(world, task: erase.Task):
    """The world with ``bench.gate_compile``'s ``replace`` edit of its text encoder for ``task``
    (``toyworld.v2.text_edit.compile_gate``)."""
    return with_text_encoder(world, compile_gate(world, task, "replace")[0])


# Methods whose edit lives in the text encoder: the world they return is the edited one.
EDITED_ENCODERS = {"te_edit": text_encoder_edited, "gate_compiled": gate_compiled}


def build(world, method: str, task: erase.Task, rounds: int, defence: robust.SoftPromptConfig,
          ace: ACEConfig = ACEConfig(), lamb: float = erase.DEFAULT_LAMBDA, relative: bool = False) -> robust.Edit:
    """The edit of ``method`` for ``task`` on ``world``; ``lamb``: the CFR ridge of the methods with a
    CFR stage (``CFR_STAGE``), in mean token energies when ``relative``."""
    ridge = {"lamb": lamb, "relative_lambda": relative}
    if method == "none" or method in EDITED_ENCODERS:     # the edit lives in the world
        return robust.Edit()
    if method == "cfr_prior":
        return robust.Edit(erase.cfr_erase(world, task, prior_weight=1.0, **ridge).weights)
    if method == "uce":
        return robust.Edit(erase.uce_erase(world, task, **ridge).weights)
    if method == "full":
        return robust.Edit(erase.mace_erase(world, task, **ridge, **erase.mace_setting("recommended")).fused)
    if method in ("ace", "ace_adv", "ace_adv_both"):
        fit = lambda found: robust.Edit(None, erase.ace_erase(world, task, config=ace, adversarial=found))  # noqa: E731
    elif method == "cfr_prior_adv":
        def fit(found):
            embs = [v for vs in found.values() for v in vs]
            extra = embedding_pairs(world.text_encoder, embs, task.templates, task.anchor) if embs else None
            return robust.Edit(erase.cfr_erase(world, task, prior_weight=1.0, extra_pairs=extra, **ridge).weights)
    else:
        raise ValueError(f"method: unknown {method!r}")
    if not method.endswith(("_adv", "_adv_both")):
        return fit({})
    both = method.endswith("_both")
    return robust.adversarial_rounds(world, task.erase, fit, rounds, defence, kept=task.preserve,
                                     lookalike_config=robust.targets(world.model.vocab)[task.kind].lookalike_attack
                                     if both else None)[0]


def surrogate(edit: robust.Edit, temperature: float) -> robust.Edit | None:
    """The edit with its ramp gate swapped for the smooth centred one at ``temperature`` (None: no
    ramp gate, or ``temperature`` 0). The ramp has no gradient below its threshold, so an attack
    through it alone would be blind there; the surrogate is what an adaptive attacker differentiates."""
    gate = edit.context_transform
    if temperature <= 0 or not isinstance(gate, GatedErasure) or gate.shape != "ramp":
        return None
    return robust.Edit(edit.kv_weights, replace(gate, temperature=temperature, shape="sigmoid"))


def cluster_se(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


LABELS = {"none": "no edit", "cfr_prior": "CFR + prior (CFR node defaults)", "full": "full MACE (pack defaults)",
          "uce": "UCE-style", "ace": "ACE-style (gated)", "cfr_prior_adv": "CFR + prior + adversarial pairs",
          "ace_adv": "ACE-style + adversarial refit", "ace_adv_both": "ACE-style + refit from both starts",
          "te_edit": "text-encoder edit (last MLP + stand-ins; bench only)",
          "gate_compiled": "ACE gate compiled into the last text MLP (bench only)"}


def readme_table(rows: list[dict]) -> str:
    """The README's table: one line per (concepts, method), the attacks side by side, clean H beside."""
    def cell(r):
        if r is None:
            return "—"
        if r["attack"] == "paraphrase":
            return f"{r['asr']:.2f} (n {r['n']})"
        se = "—" if r["se"] != r["se"] else f"{r['se']:.2f}"
        return f"{r['asr']:.2f} ± {se} ({r['n_attacks']})"
    lines = ["| erased | method | soft ASR (from anchor) | soft ASR (from look-alike) | paraphrase ASR | clean H ± SE "
             "| Acc_e | Acc_g | Acc_s ± SE | edit s |", "|" + "---|" * 10]
    keys = list(dict.fromkeys((r["concepts"], r["method"]) for r in rows))
    for count, method in keys:
        by = {r["attack"]: r for r in rows if (r["concepts"], r["method"]) == (count, method)}
        r = next(iter(by.values()))
        se_h = "—" if r.get("se_H") is None else f"{r['se_H']:.3f}"
        lines.append(f"| {count} | {LABELS.get(method, method)} | {cell(by.get('soft'))} | "
                     f"{cell(by.get('soft_lookalike'))} | {cell(by.get('paraphrase'))} | {r['H']:.3f} ± {se_h} | "
                     f"{r['acc_e']:.2f} | {r['acc_g']:.2f} | {r['acc_s']:.2f} ± {r['se_s']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def combine(paths: list[str], out: str) -> None:
    """Merge the rows of earlier runs (the same --kind, methods run apart) into ``out``, methods in
    METHODS order; each part's settings and minutes are kept."""
    parts = [json.load(open(p)) for p in paths]
    kinds = {p["settings"]["kind"] for p in parts}
    if len(kinds) != 1:
        raise SystemExit(f"--combine: the parts attack different kinds {sorted(kinds)}; combine one kind at a time")
    worlds = {p["settings"].get("world", "v2") for p in parts}
    if len(worlds) != 1:
        raise SystemExit(f"--combine: the parts come from different worlds {sorted(worlds)}; combine one at a time")
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: (r["concepts"], order.get(r["method"], 99)))
    write_json(out, {"bench": "attack", "env": parts[0]["env"], "world": parts[0]["world"],
                     "minutes": round(sum(p["minutes"] for p in parts), 1), "settings": parts[0]["settings"],
                     "parts": [{"file": path, "methods": list(dict.fromkeys(r["method"] for r in p["rows"])),
                                "minutes": p["minutes"], "env": p["env"], "settings": p["settings"]}
                               for path, p in zip(paths, parts)],
                     "rows": rows})
    print(markdown_table(rows, COLUMNS))
    print()
    print(readme_table(rows))


class Setup:
    """The world a run attacks: (world, its vocab and evaluate modules) and its split per count."""

    def __init__(self, args, kind: str):
        self.name, self.kind = args.world, kind
        if args.world == "v2":             # today's path: bench.common's v2 split
            self.toy = toy_v2_setup(args, kind)
            self.world, self.vocab, self.evaluate = self.toy.world, vocab, evaluate
        else:
            from toyworld.v3 import evaluate as evaluate_v3
            from toyworld.v3 import vocab as vocab_v3
            torch.set_num_threads(args.threads)
            self.world, self.vocab, self.evaluate = evaluate_v3.load_world(), vocab_v3, evaluate_v3

    def split(self, count: int) -> tuple[tuple, tuple, tuple]:
        """(erased, preserve list, retained set) for ``count`` concepts."""
        if self.name == "v2":
            check_count(count, self.toy.most, "--counts")
            pool = vocab.NAMES if self.kind == "name" else vocab.STYLES
            return tuple(pool[:count]), self.toy.preserve, self.toy.retained
        from bench.two_worlds import split
        return split(self.name, self.vocab, self.kind, count, 0)


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--world", choices=WORLDS, default="v2",
                    help="the toy world attacked (v3: the split of bench.two_worlds, seed 0)")
    ap.add_argument("--kind", choices=("name", "style"), default="name", help="what is erased and attacked")
    ap.add_argument("--counts", type=int, nargs="*", default=None,
                    help="numbers of erased concepts (default 1 10 for names, 1 5 for styles)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--runs", type=int, default=3, help="soft-prompt attacks per cell")
    ap.add_argument("--steps", type=int, default=100, help="Adam steps of each evaluation attack")
    ap.add_argument("--rounds", type=int, default=2, help="adversarial augmentation rounds (_adv methods)")
    ap.add_argument("--defence-steps", type=int, default=40, help="Adam steps of the defence's attacks")
    ap.add_argument("--attacks", nargs="+", choices=SOFT_ATTACKS, default=list(SOFT_ATTACKS),
                    help="the soft-prompt attacks run (default both; the paraphrase attack: --para-names)")
    ap.add_argument("--para-names", type=int, default=1, help="concepts per cell under the paraphrase attack")
    ap.add_argument("--n-clean", type=int, default=100, help="prompts per clean set (erased, nicknames, retained)")
    ap.add_argument("--ace-open-rate", type=float, default=ACEConfig().open_rate,
                    help="the ACE methods' open_rate (1 = no shared floor)")
    ap.add_argument("--ace-gate", choices=GATE_SHAPES, default=ACEConfig().gate, help="the ACE methods' gate shape")
    ap.add_argument("--ace-temperature", type=float, default=ACEConfig().temperature,
                    help="the ACE methods' gate temperature")
    ap.add_argument("--cfr-lambda", type=float, default=erase.DEFAULT_LAMBDA,
                    help="the CFR ridge (raw units) of every method with a CFR stage: " + ", ".join(CFR_STAGE))
    ap.add_argument("--relative-lambda", action="store_true",
                    help="count --cfr-lambda in mean token energies (mace_ops.cfr.CFRConfig.relative_lambda)")
    ap.add_argument("--surrogate-temperature", type=float, default=0.02,
                    help="a ramp gate is also attacked through the smooth centred gate at this temperature "
                    "(scored on the real one; each attack counts the better of the two); 0 = off")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="only merge the rows of earlier runs of one --kind (e.g. methods run apart) into --out")
    args = toy_v2_args(ap, argv, out=None)
    kind = args.kind
    counts = args.counts if args.counts is not None else ([1, 10] if kind == "name" else [1, 5])
    suffix = "" if args.world == "v2" else f"_{args.world}"
    out = args.out or (f"bench/results/attack{suffix}.json" if kind == "name"
                       else f"bench/results/attack_styles{suffix}.json")
    if args.combine:
        return combine(args.combine, out)
    setup = Setup(args, kind)
    world, wv, ev = setup.world, setup.vocab, setup.evaluate
    tgt = robust.targets(wv)[kind]
    attack_cfg = replace(tgt.attack, steps=args.steps)
    defence_cfg = replace(tgt.attack, steps=args.defence_steps)
    ace_cfg = ACEConfig(temperature=args.ace_temperature, open_rate=args.ace_open_rate, gate=args.ace_gate)
    t_start, rows = time.time(), []
    for count in counts:
        erased, preserve, retained = setup.split(count)
        task = erase.Task(kind, tuple(erased), tuple(preserve))
        for method in args.methods:
            t0 = time.perf_counter()
            w = EDITED_ENCODERS[method](world, task) if method in EDITED_ENCODERS else world   # where the edit lives
            edit = build(w, method, task, args.rounds, defence_cfg, ace_cfg, lamb=args.cfr_lambda,
                         relative=args.relative_lambda)
            seconds = time.perf_counter() - t0
            base_ret = None if w is world else ev.mass_metrics(   # retained set as the original draws it
                world, kind, task.erase, retained, n_erased=args.n_clean, n_retained=args.n_clean)[1]
            clean, _ = ev.mass_metrics(w, kind, task.erase, retained, kv_weights=edit.kv_weights,
                                       context_transform=edit.context_transform, base_retained=base_ret,
                                       n_erased=args.n_clean, n_retained=args.n_clean)
            base = {"method": method, "world": args.world, "kind": kind, "concepts": count,
                    "cfr_lambda": args.cfr_lambda if method in CFR_STAGE else None,
                    "cfr_lambda_relative": args.relative_lambda and method in CFR_STAGE, "H": round(clean.H, 4),
                    "se_H": clean.row()["se_H"], "acc_e": round(clean.acc_e, 4),
                    "acc_g": round(clean.acc_g, 4), "acc_s": round(clean.acc_s, 4), "se_e": round(clean.se_e, 4),
                    "se_g": round(clean.se_g, 4), "se_s": round(clean.se_s, 4), "n_clean": clean.n_e,
                    "seconds": round(seconds, 1)}
            proxy = surrogate(edit, args.surrogate_temperature)
            for attack, inits, cfg in (("soft", (tgt.anchor,), attack_cfg),
                                       ("soft_lookalike", (None,), tgt.lookalike_attack)):
                if attack not in args.attacks:
                    continue
                def scored(through):
                    """Attacks through ``through``, each scored (ASR) on the real edit."""
                    found = robust.soft_attack_runs(w, through, task.erase, args.runs, inits, seed=900, config=cfg,
                                                    image_world=world if w is not world else None)
                    return found, [float(robust.soft_asr(w, edit, name, sp.embeddings).mean()) for name, sp in found]
                runs, per = scored(edit)
                extra = {}
                if proxy is not None:   # the same attacks through the smooth surrogate, scored on the real gate
                    per_s = scored(proxy)[1]
                    extra = {"per_attack_direct": [round(p, 3) for p in per],
                             "per_attack_surrogate": [round(p, 3) for p in per_s]}
                    per = [max(a, b) for a, b in zip(per, per_s)]
                n_img = len(per) * 2 * len(tgt.templates)
                rows.append({**base, "attack": attack, "asr": round(sum(per) / len(per), 4),
                             "se": round(cluster_se(per), 4), "n": n_img, "n_attacks": len(per), **extra,
                             "per_attack": [round(p, 3) for p in per], "attack_names": [n for n, _ in runs],
                             "init_words": [inits[j % len(inits)] or robust.lookalike(n, exclude=task.erase,
                                                                                      world_vocab=wv)
                                            for j, (n, _) in enumerate(runs)]})
                print({k: rows[-1].get(k) for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
            if args.para_names <= 0:
                continue
            hits, means = [], []
            for name in task.erase[: args.para_names]:
                h, m = robust.paraphrase_asr(w, edit, name)
                hits.append(h)
                means.append(m)
            h = torch.cat(hits)
            asr = float(h.mean())
            rows.append({**base, "attack": "paraphrase", "asr": round(asr, 4),
                         "se": round(evaluate.binomial_se(asr, h.numel()), 4), "n": h.numel(),
                         "n_attacks": len(hits), "mean_over_candidates": round(sum(means) / len(means), 4),
                         "n_candidates": len(robust.paraphrase_prompts(task.erase[0], world_vocab=wv))})
            print({k: rows[-1].get(k) for k in COLUMNS}, f"[{(time.time() - t_start) / 60:.1f} min]", flush=True)
    minutes = (time.time() - t_start) / 60
    print()
    print_table(rows, COLUMNS)
    write_json(out, {"bench": "attack", "env": environment(), "world": world.metadata, "minutes": round(minutes, 1),
                     "settings": {"world": args.world, "kind": kind, "cfr_lambda": args.cfr_lambda,
                                  "split": ("bench.common (v2)" if args.world == "v2"
                                            else "bench.two_worlds.split, seed 0"),
                                  "attack": attack_cfg.__dict__, "defence_attack": defence_cfg.__dict__,
                                  "lookalike_attack": tgt.lookalike_attack.__dict__,
                                  "attacks": args.attacks, "runs": args.runs, "rounds": args.rounds,
                                  "para_names": args.para_names,
                                  "n_clean": args.n_clean, "ace": ace_cfg.__dict__,
                                  "surrogate_temperature": args.surrogate_temperature,
                                  "paraphrase_styles": list(robust.PARAPHRASE_STYLES) if kind == "name" else []},
                     "rows": rows})
    print(markdown_table(rows, COLUMNS))
    print()
    print(readme_table(rows))


if __name__ == "__main__":
    main()

"""Where the text-encoder edit's stand-in names lie, against the names they stand for (issue 16).

``bench.text_encoder_edit`` keeps "names nobody listed" by preserving stand-ins. This measures,
in the base encoder's features (each prompt against the erased names' prompts of its own
template, ``nearest_erased``), how far from the nearest erased name lie:

* the erased names themselves (the nearest *other* erased name: the names' spacing);
* the split's preserve list (named, kept) and its scored names (unnamed: what stand-ins stand for);
* each kind of stand-in, before and after ``--exclude`` (with the share it keeps).

Stand-ins that lie farther out than the unnamed names teach the edit nothing about them. Named
words only set the radii; the scored names are measured, never used. ``--split validation``
(default) scores names 125-149; ``evaluation`` the benchmark's retained set.

    python -m bench.stand_in_geometry     # seconds; writes docs/results/stand_in_geometry.json
"""
from __future__ import annotations

import torch

from bench.common import toy_v2_args, toy_v2_parser, toy_v2_setup, write_json
from toyworld.v2 import erase
from toyworld.v2.erase import SPLITS, split_names
from toyworld.v2.text_edit import (jittered_words, named_spacing, nearest_erased, slot_stand_ins, synthetic_words,
                                   template_features)

QUANTILES = (0.1, 0.5, 0.9)


def word_distances(world, task: erase.Task, words, f_e: torch.Tensor) -> torch.Tensor:
    """Each of ``words`` in each template: its distance to the nearest erased prompt (same template)."""
    f = template_features(world, task, words)                           # (T, words, L·D)
    return nearest_erased(f.flatten(0, 1), torch.arange(len(f)).repeat_interleave(len(words)), f_e)


def summary(d: torch.Tensor, radii: dict[str, float]) -> dict:
    out = {f"q{round(100 * q)}": round(torch.quantile(d, q).item(), 4) for q in QUANTILES}
    out.update({f"kept_by_exclude_{k}": round((d >= r).float().mean().item(), 4) for k, r in radii.items()})
    return {"n": len(d), **out}


def main(argv=None) -> None:
    ap = toy_v2_parser(__doc__)
    ap.add_argument("--counts", type=int, default=100, help="erased names (the first COUNT)")
    ap.add_argument("--split", choices=SPLITS, default="validation")
    ap.add_argument("--draws", type=int, default=4096, help="stand-ins drawn per kind")
    ap.add_argument("--excludes", type=float, nargs="+", default=[0.1, 0.5], help="--exclude quantiles to report")
    args = toy_v2_args(ap, argv, out="bench/results/stand_in_geometry.json")
    if any(not 0 < q < 1 for q in args.excludes):
        raise SystemExit("--excludes: each a quantile in (0, 1)")
    toy = toy_v2_setup(args, "name")
    if not 1 <= args.counts <= toy.most:
        raise SystemExit(f"--counts: {args.counts} outside 1..{toy.most}")
    world, (preserve, scored) = toy.world, split_names(args.split, toy.preserve, toy.retained)
    task = erase.Task("name", tuple(erase.vocab.NAMES[:args.counts]), tuple(preserve))
    f_e, spacing = named_spacing(world, task)                           # encoded once; each radius a quantile
    radii = {f"{q:g}": torch.quantile(spacing, q).item() for q in args.excludes}
    d = torch.cdist(f_e, f_e)                                           # (T, erased, erased)
    d[:, torch.arange(len(task.erase)), torch.arange(len(task.erase))] = float("inf")
    rows = {"erased (to the nearest other erased)": summary(d.min(2).values.flatten(), radii),
            "preserve list (named, kept)": summary(word_distances(world, task, preserve, f_e), radii),
            f"{args.split} scored names (unnamed)": summary(word_distances(world, task, scored, f_e), radii)}
    samplers = {"gaussian (synthetic_words)": synthetic_words(world, task, 0),
                **{f"jitter {s:g} (jittered_words)": jittered_words(world, task, 0, s) for s in (1.0, 0.5)}}
    for name, words in samplers.items():
        x, t = slot_stand_ins(world, task, words, torch.Generator().manual_seed(0))(args.draws)
        with torch.no_grad():
            rows[f"stand-ins: {name}"] = summary(nearest_erased(world.model.text.forward_embeddings(x).flatten(1), t, f_e),
                                                 radii)
    width = max(map(len, rows))
    print(f"distance to the nearest erased name ({args.counts} erased, {args.split} split); exclude radii "
          + ", ".join(f"{k}: {r:.3f}" for k, r in radii.items()))
    for name, r in rows.items():
        print(name.ljust(width), "  ".join(f"{k} {v}" for k, v in r.items()))
    write_json(args.out, {"bench": "stand_in_geometry", "world": world.metadata, "split": args.split,
                          "erased": args.counts, "exclude_radii": {k: round(r, 4) for k, r in radii.items()},
                          "rows": rows})


if __name__ == "__main__":
    main()

"""``erase_from`` in the toy world: erase a colour from one shape only.

Prompt sets (all three caption forms, random styles, fixed seeds):
  target       the colour on the scoped shape ("red circle")           -> accuracy should drop
  colour_other the colour on the other shapes ("red square", ...)     -> should hold
  shape_other  the other colours on the scoped shape ("blue circle")   -> should hold
  synonym      a synonym on the scoped shape ("crimson circle")        -> reported (not erased)
Methods: no edit; CFR scoped with erase_from = the shape, at several preserve_scale values (the
scope's automatic preserve set against the erase pairs); CFR unscoped (the colour everywhere),
for contrast. Colour accuracy by the hue rule, n and one binomial SE per cell.

    python -m bench.scope [--colour red] [--shape circle] [--n 64] [--out docs/results/scope.json]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import environment, print_table, write_json
from toyworld.v1 import vocab
from toyworld.v1.erase import cfr_erase, scoped_cfr_erase
from toyworld.v1.evaluate import PromptSet, load_toyworld, score_prompt_set


def fixed_set(words, shapes, per_cell: int, seed: int) -> PromptSet:
    """``per_cell`` prompts per (colour word, shape): random caption form and style, seeded."""
    gen = torch.Generator().manual_seed(seed)
    prompts, colors, shp, sty = [], [], [], []
    for word in words:
        ci = vocab.COLOR_WORD_INDEX[word]
        for shape in shapes:
            si = vocab.SHAPES.index(shape)
            for _ in range(per_cell):
                st = int(torch.randint(0, len(vocab.STYLES), (1,), generator=gen))
                tpl = vocab.CAPTION_TEMPLATES[int(torch.randint(0, len(vocab.CAPTION_TEMPLATES), (1,), generator=gen))]
                prompts.append(vocab.caption(tpl, word, shape, vocab.STYLES[st]))
                colors.append(ci), shp.append(si), sty.append(st)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PromptSet(prompts, t(colors), t(shp), t(sty), seed)


def prompt_sets(colour: str, shape: str, n: int) -> dict[str, PromptSet]:
    others = [s for s in vocab.SHAPES if s != shape]
    other_colours = [c for c in vocab.COLORS if c != colour]
    return {
        "target": fixed_set([colour], [shape], n, 11),
        "colour_other": fixed_set([colour], others, max(1, n // len(others)), 12),
        "shape_other": fixed_set(other_colours, [shape], max(1, n // len(other_colours)), 13),
        "synonym": fixed_set([vocab.SYNONYMS[colour][0]], [shape], max(1, n // 2), 14),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--colour", default="red")
    ap.add_argument("--shape", default="circle")
    ap.add_argument("--n", type=int, default=64, help="prompts in the target set (the others scale with it)")
    ap.add_argument("--preserve-scales", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/scope.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = load_toyworld()
    sets = prompt_sets(args.colour, args.shape, args.n)
    rows = []
    methods = [("none", None)] + [("cfr_scoped", s) for s in args.preserve_scales] + [("cfr_unscoped", 1.0)]
    for method, scale in methods:
        t0 = time.perf_counter()
        if method == "none":
            weights = None
        elif method == "cfr_scoped":
            weights = scoped_cfr_erase(world, args.colour, args.shape, preserve_scale=scale).weights
        else:
            weights = cfr_erase(world, args.colour, preserve_scale=scale).weights
        edit_s = time.perf_counter() - t0
        row = {"method": method, "preserve_scale": scale, "edit_s": round(edit_s, 2)}
        for name, ps in sets.items():
            sc = score_prompt_set(world.model, ps, world.probe, kv_weights=weights)
            row[name] = round(sc.color_acc, 3)
            row[f"se_{name}"] = round(sc.color_se, 3)
            row[f"n_{name}"] = sc.n
            row[f"shape_{name}"] = round(sc.shape_acc, 3)
        rows.append(row)
        print(row, flush=True)
    cols = ["method", "preserve_scale", "target", "se_target", "colour_other", "se_colour_other", "shape_other", "se_shape_other",
            "synonym", "se_synonym", "edit_s"]
    print()
    print_table(rows, cols)
    print("n: " + ", ".join(f"{k} {rows[0]['n_' + k]}" for k in sets))
    write_json(args.out, {"bench": "scope", "env": environment(), "world": world.metadata, "rows": rows,
                          "settings": {"colour": args.colour, "shape": args.shape, "ddim_steps": 10, "cfg": 7.0,
                                       "lambda": 0.1, "concept_tokens": True,
                                       "n": args.n}})


if __name__ == "__main__":
    main()

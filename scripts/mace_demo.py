"""The main job: erase many concepts at once and show what changed.

Without a checkpoint it runs in toy world v2 (``toyworld/v2``, 200 invented people and 20 styles,
the shipped weights): it erases the first ``--names`` names (10) and ``--styles`` styles (2) the way
the README advises for many concepts — the ACE gate (``MACE Gated Erasure (ACE)``), one per kind,
chained, each with the benchmark's preserve list (``--method text_gate``: the gate compiled into the
CLIP, a file to share; ``--method cfr``: CFR + the caption prior) — and prints the before/after
table: Acc_e (the erased words), Acc_g (their nicknames and synonyms, never given to the edit),
Acc_s (each erased concept's nearest look-alike that is neither erased nor listed to keep, which
must stay) and H = HM(1 − Acc_e, 1 − Acc_g, Acc_s), each with n and its standard error; then a
labelled grid (``out/demo_grid.png``: original | erased, one row per prompt).

``--world v1`` is the first demo: the colour world (``toyworld/v1``), CFR on the ``--concepts``
colour words, a before/after table and ``out/before_after.png``. With ``--checkpoint`` it erases
the concepts from a real SD checkpoint through ComfyUI and writes the erasure file that stock LoRA
loaders read.

    .venv/bin/python -m scripts.mace_demo                       # toy world v2: 10 names + 2 styles
    .venv/bin/python -m scripts.mace_demo --names 20 --styles 5 --method text_gate
    .venv/bin/python -m scripts.mace_demo --world v1 --concepts "red, crimson; blue" --out out/
    .venv/bin/python -m scripts.mace_demo --checkpoint path/to/sd15.safetensors \\
        --concepts "van gogh; picasso" --type style [--comfyui path/to/ComfyUI]

Concepts (v1, checkpoint): ``;`` separates concepts, ``,`` separates synonyms of one concept.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

SHAPES = ("circle", "square", "triangle", "cross")


def concept_text(concepts: str) -> str:
    """``"red, crimson; blue"`` -> one concept per line (what ``parse_concepts`` reads)."""
    return "\n".join(p.strip() for p in str(concepts).replace(";", "\n").splitlines() if p.strip())


def toy_vocabulary() -> str:
    from toyworld.v1 import vocab

    return "; ".join(f"{c} ({', '.join(vocab.SYNONYMS[c])})" for c in vocab.COLORS)


def check_toy_words(words) -> None:
    """SystemExit(2) with the valid words when a word is not a toy colour word."""
    from toyworld.v1 import vocab

    unknown = [w for w in words if w not in vocab.COLOR_WORD_INDEX]
    if not words or unknown:
        what = (f"{', '.join(repr(w) for w in unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                f"a colour word of the toy world" if unknown else "no concept given")
        print(f"mace_demo: {what}.\nValid words (colour, then its synonyms): "
              f"{toy_vocabulary()}.\nExample: --concepts \"red, crimson; blue\"", file=sys.stderr)
        raise SystemExit(2)


@contextlib.contextmanager
def sampling_progress(total_sets: int):
    """Print one line per sampled prompt set while ``mace_metrics`` runs (it samples through
    ``toyworld.v1.evaluate.score_prompt_set``)."""
    from toyworld.v1 import evaluate

    real = evaluate.score_prompt_set
    count = [0]

    def wrapped(model, ps, *a, **kw):
        count[0] += 1
        edited = "erased" if kw.get("kv_weights") is not None else "original"
        print(f"  [{count[0]}/{total_sets}] sampling {len(ps.prompts)} images with the {edited} "
              f"model ...", end="", flush=True)
        t0 = time.perf_counter()
        out = real(model, ps, *a, **kw)
        print(f" {time.perf_counter() - t0:.1f} s", flush=True)
        return out

    evaluate.score_prompt_set = wrapped
    try:
        yield
    finally:
        evaluate.score_prompt_set = real


def toy_demo(args) -> None:
    from toyworld.v1 import vocab
    from toyworld.v1.erase import cfr_erase, erased_words
    from toyworld.v1.evaluate import load_toyworld, mace_metrics
    from toyworld.v1.templates import colour_of

    text = concept_text(args.concepts)
    words = erased_words(text) if text else []
    check_toy_words(words)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    world = load_toyworld()
    start = time.perf_counter()
    result = cfr_erase(world, text, lamb=args.lamb, preserve_scale=args.preserve_scale)
    print(f"CFR erased {words} from {len(result.deltas)} K/V weights in {time.perf_counter() - start:.2f}s")
    n_syn, n_other = max(1, args.n // 2), max(1, args.n // 4)
    gone = {colour_of(w) for w in words}
    has_syn = any(s not in words for c in gone for s in (c,) + vocab.SYNONYMS[c])
    sets = 1 + int(has_syn) + int(len(gone) < len(vocab.COLORS))
    print("sampling the prompt sets (DDIM 10 steps each), before and after the erasure:")
    t0 = time.perf_counter()
    with sampling_progress(2 * sets):
        before = mace_metrics(world, words, n_erased=args.n, n_synonym=n_syn, n_other=n_other)
        after = mace_metrics(world, words, kv_weights=result.weights, n_erased=args.n,
                             n_synonym=n_syn, n_other=n_other)
    print(f"sampled in {time.perf_counter() - t0:.0f} s")
    print(f"\nerased {before.erased_words}; held-out synonyms {before.synonym_words}; "
          f"DDIM 10 steps, CFG 7, fixed seeds")
    print(f"{'model':8} | {'efficacy (acc on erased, lower better)':38} | {'generality (synonyms, lower)':28} | "
          f"{'specificity (others, higher)':28} | H")
    for name, m in (("before", before), ("after", after)):
        print(f"{name:8} | {m.efficacy:.3f} ± {m.se_efficacy:.3f} (n={m.n_efficacy})".ljust(50)
              + f"| {m.generality:.3f} ± {m.se_generality:.3f} (n={m.n_generality})".ljust(31)
              + f"| {m.specificity:.3f} ± {m.se_specificity:.3f} (n={m.n_specificity})".ljust(31)
              + f"| {m.H:.3f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "before_after.png")
    rows = [("erased word", w) for w in dict.fromkeys(words)]
    rows += [("held-out synonym", w) for w in dict.fromkeys(before.synonym_words)]
    rows += [("kept colour", c) for c in [c for c in vocab.COLORS if c not in gone][:3]]
    print(f"\nsampling the before/after grid ({len(rows)} rows x {len(SHAPES)} shapes, 2 models) ...",
          flush=True)
    write_grid(world, rows, result.weights, path, title=f"CFR erased: {', '.join(words)}")
    print(f"wrote {path}: columns original | erased, one row per word "
          f"(erased words, held-out synonyms, kept colours)")


def toy_v2_demo(args) -> None:
    """Erase ``args.names`` names and ``args.styles`` styles in toy world v2 on the recommended path,
    print the before/after table and write the labelled grid (see the module docstring)."""
    from mace_ops.cfr import CFRConfig, refine_cross_attention
    from toyworld.v2 import erase, evaluate, robust, vocab
    from toyworld.v2.text_edit import compile_gate, with_text_encoder

    # One thread: the toy model's small matrices gain little from a second, and where the second core
    # is busy two threads run ~4x slower (measured: 11 s vs 44 s for a small run on a loaded 2-core box).
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    world = evaluate.load_world()
    tasks = {kind: erase.Task(kind, tuple(pool[:count]), tuple(erase.preserve_and_retained(kind)[0]))
             for kind, pool, count in (("name", vocab.NAMES, args.names), ("style", vocab.STYLES, args.styles))
             if count}
    # Look-alikes that must stay: each erased concept's nearest one that is neither erased nor on the
    # preserve list (the edit never sees them).
    kept = {kind: tuple(dict.fromkeys(robust.lookalike(c, exclude=t.erase + t.preserve) for c in t.erase))
            for kind, t in tasks.items()}
    edited, kv, gates, t0 = world, None, [], time.perf_counter()
    for task in tasks.values():
        if args.method == "ace":      # MACE Gated Erasure (ACE), one gate per kind, chained at run time
            gates.append(erase.ace_erase(world, task))
        elif args.method == "text_gate":    # MACE Text Gate (compiled), chained: a weight edit of the CLIP
            edited = with_text_encoder(edited, compile_gate(edited, task, "replace")[0])
        else:                         # MACE Refine Cross-Attention (CFR) + caption prior, chained: each fit
            kv = refine_cross_attention(    # starts from the K/V weights the previous one left (erase.cfr_erase)
                edited.text_encoder, kv or edited.kv_weights(), task.concepts(), task.templates, task.anchor,
                task.preserve_prompts(), CFRConfig(erase.DEFAULT_LAMBDA, erase.DEFAULT_PRESERVE_SCALE, True),
                prior=erase.prior_for(edited, 1.0)).weights
    gate = None if not gates else gates[0] if len(gates) == 1 else chain(gates)
    steps = ", then ".join(f"{len(t.erase)} {k}s" for k, t in tasks.items())
    print(f"erased {steps} with {METHODS[args.method]} in {time.perf_counter() - t0:.1f} s; "
          f"preserve lists: {len(tasks.get('name', erase.Task('name', ())).preserve)} names, "
          f"{len(tasks.get('style', erase.Task('style', ())).preserve)} styles")
    print(f"scoring ({args.n} prompts per set, DDIM {evaluate.DEFAULT_STEPS} steps, CFG {evaluate.DEFAULT_CFG:g}, "
          "fixed seeds; the world's probe judges every image) ...", flush=True)
    rows = []
    for kind, task in tasks.items():
        base, base_kept = evaluate.mass_metrics(world, kind, task.erase, kept[kind], n_erased=args.n,
                                                n_retained=args.n)
        after, _ = evaluate.mass_metrics(edited, kind, task.erase, kept[kind], kv_weights=kv, context_transform=gate,
                                         base_retained=base_kept, n_erased=args.n, n_retained=args.n)
        rows += [(kind, "original", base), (kind, "erased", after)]
    print()
    print_v2_table(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo_grid.png")
    save_v2_grid(world, (edited.model, kv, gate), tasks, kept, path)
    print(f"wrote {path}: columns original | erased, one row per prompt (same seed per row)")
    print(f"total {time.perf_counter() - t_start:.0f} s")


METHODS = {"ace": "the ACE gate (MACE Gated Erasure)", "text_gate": "the compiled text gate (MACE Text Gate)",
           "cfr": "CFR + prior (MACE Refine Cross-Attention)"}


def chain(transforms):
    """The context transforms applied one after another (two gated-erasure nodes in a row)."""
    def apply(ctx):
        for t in transforms:
            ctx = t(ctx)
        return ctx
    return apply


def print_v2_table(rows) -> None:
    """One line per (kind, model): Acc_e, Acc_g, Acc_s, H, each ± SE with its n."""
    def cell(acc, se, n):
        return f"{acc:.3f} ± {se:.3f} (n={n})"

    head = (f"{'concepts':8} | {'model':8} | {'Acc_e erased, lower better':26} | {'Acc_g nicknames/synonyms':26} | "
            f"{'Acc_s look-alikes kept':26} | H")
    print(head)
    print("-" * len(head))
    for kind, model, m in rows:
        h = f"{m.H:.3f}" + ("" if m.se_H != m.se_H else f" ± {m.se_H:.3f}")
        print(f"{kind + 's':8} | {model:8} | {cell(m.acc_e, m.se_e, m.n_e):26} | {cell(m.acc_g, m.se_g, m.n_g):26} | "
              f"{cell(m.acc_s, m.se_s, m.n_s):26} | {h}")
    print("Acc_* = the probe's accuracy on the concept each prompt asks for; H = HM(1 - Acc_e, 1 - Acc_g, Acc_s) "
          "(higher is better); SE binomial (H: delta method)")


def save_v2_grid(world, erased, tasks, kept, path: str) -> None:
    """Rows: up to 4 erased names, their first nicknames, their look-alikes, then the erased styles,
    their synonyms and look-alikes (one prompt each); columns: original | erased (``erased``: the
    model, its K/V weights and context transform)."""
    from bench.grid import save_sampled_grid
    from toyworld.v2 import vocab

    def look(word: str) -> str:
        if word in vocab.NAME_INDEX:
            return vocab.describe(word).split(": ")[1]
        pattern, tone = vocab.STYLE_LOOK[vocab.STYLE_INDEX[word]]
        return f"{vocab.PATTERNS[pattern]} background, grey {vocab.TONES[tone]:g}"

    rows = []
    if "name" in tasks:
        names = list(tasks["name"].erase[:4])
        for label, words in (("erased", names), ("nickname", [vocab.NICKNAMES[n][0] for n in names]),
                             ("look-alike kept", list(kept["name"][:4]))):
            rows += [(f"{label}: a photo of {w}  [{look(w)}]", f"a photo of {w}") for w in words]
    if "style" in tasks:
        styles = list(tasks["style"].erase[:4])
        for label, words in (("erased", styles), ("synonym", [vocab.STYLE_SYNONYMS[st][0] for st in styles]),
                             ("look-alike kept", list(kept["style"][:4]))):
            rows += [(f"{label}: an artwork in {w} style  [{look(w)}]", f"an artwork in {w} style") for w in words]
    counts = ", ".join(f"{len(t.erase)} {k}s" for k, t in tasks.items())
    save_sampled_grid(path, rows, {"original": (world.model, None, None), "erased": erased},
                      f"toy world v2: {counts} erased, same seed per row")


def write_grid(world, rows, kv_weights, path, per_row: int = len(SHAPES), title: str = "") -> None:
    """A labelled PNG: header ``original | erased`` over the two halves, one labelled row per
    ``(kind, word)`` in ``rows``, each row ``per_row`` shapes of "a <word> <shape> in plain
    style", both models sampled from the same seed."""
    from PIL import Image, ImageDraw

    from toyworld.v1 import diffusion

    prompts = [f"a {w} {s} in plain style" for _, w in rows for s in SHAPES[:per_row]]
    before = diffusion.sample(world.model, prompts, seed=7)
    after = diffusion.sample(world.model, prompts, seed=7, kv_weights=kv_weights)
    font = _font(16)
    small = _font(13)
    scale, gap = 3, 6
    cell = 32 * scale
    label_w = 190
    title_h = 28 if title else 0
    header_h = 28
    half = per_row * (cell + gap)
    width = label_w + 2 * half + 3 * gap
    height = title_h + header_h + len(rows) * (cell + gap) + gap
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((gap, 6), title, fill=(0, 0, 0), font=font)
    for i, head in enumerate(("original", "erased")):
        x0 = label_w + gap + i * (half + gap)
        _centred(draw, head, x0, x0 + half - gap, title_h + 4, font)
    for i, batch in enumerate((before, after)):
        for j, x in enumerate(batch):
            r, c = divmod(j, per_row)
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            xoff = label_w + gap + i * (half + gap) + c * (cell + gap)
            img.paste(tile, (xoff, title_h + header_h + r * (cell + gap)))
    for r, (kind, word) in enumerate(rows):
        y = title_h + header_h + r * (cell + gap) + cell // 2 - 18
        draw.text((gap, y), kind, fill=(90, 90, 90), font=small)
        draw.text((gap, y + 18), f'"{word}"', fill=(0, 0, 0), font=font)
    x_sep = label_w + half + gap + gap // 2
    draw.line([(x_sep, title_h), (x_sep, height)], fill=(160, 160, 160), width=2)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable default font
    except TypeError:
        return ImageFont.load_default()


def _centred(draw, text, x0, x1, y, font) -> None:
    w = draw.textlength(text, font=font)
    draw.text((x0 + (x1 - x0 - w) / 2, y), text, fill=(0, 0, 0), font=font)


def checkpoint_demo(args) -> None:
    from headless.erase_checkpoint import erase_checkpoint

    erase_checkpoint(args)


def whole_number(lo: int, hi: int | None = None, why: str = ""):
    """An argparse type: a whole number in ``lo``..``hi`` (no upper bound when None); ``why`` follows
    the refusal."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < lo or hi is not None and n > hi:
            bound = f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise argparse.ArgumentTypeError(f"must be {bound} (got {n}){why}")
        return n
    return parse


positive_int = whole_number(1, why=": it is the number of prompts sampled per set (v2) or per erased word (v1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.mace_demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=("v2", "v1"), default="v2",
                    help="toy world without --checkpoint: v2 (default) erases --names names and --styles "
                         "styles on the recommended path; v1 erases --concepts colour words with CFR")
    ap.add_argument("--names", type=whole_number(0, 100), default=10,
                    help="v2: erase the first NAMES names (0-100; default 10)")
    ap.add_argument("--styles", type=whole_number(0, 10), default=2,
                    help="v2: erase the first STYLES styles (0-10; default 2)")
    ap.add_argument("--method", choices=("ace", "text_gate", "cfr"), default="ace",
                    help="v2: how the names and styles are erased: ace (MACE Gated Erasure, one gate per kind: "
                         "the README's path for many concepts; default), text_gate (MACE Text Gate (compiled): "
                         "a weight edit of the CLIP to share) or cfr (CFR + caption prior, the README's path for "
                         "one style; chained: the styles' fit starts from the names' K/V weights)")
    ap.add_argument("--concepts", default=None,
                    help="v1 / checkpoint: concepts to erase: ';' between concepts, ',' between synonyms of one "
                         "(v1: colour words, default \"red\"; e.g. \"red, crimson; blue\")")
    ap.add_argument("--lamb", type=float, default=None, help="CFR ridge lambda (default: per model)")
    ap.add_argument("--preserve-scale", type=float, default=None, help="weight of preserve prompts")
    ap.add_argument("--n", type=positive_int, default=None,
                    help="toy v2: prompts per set (default 100); v1: prompts per erased word (synonyms get "
                         "n/2, other colours n/4; default 32); >= 1")
    ap.add_argument("--out", default="out", help="folder for the image grid / erasure file")
    ap.add_argument("--checkpoint", help="a real SD1.x checkpoint (.safetensors file, or a name in "
                                         "ComfyUI's checkpoints folders); needs ComfyUI")
    ap.add_argument("--type", default="style", choices=["object", "person", "style"],
                    help="checkpoint: concept type")
    ap.add_argument("--comfyui", metavar="PATH",
                    help="checkpoint: the ComfyUI checkout to use (default: $COMFYUI_PATH, "
                         "~/ComfyUI)")
    ap.add_argument("--verbose", action="store_true", help="checkpoint: show ComfyUI's start-up log")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.checkpoint:
        args.concepts = concept_text("red" if args.concepts is None else args.concepts)
        checkpoint_demo(args)
        return
    if args.world == "v2":
        given = [flag for flag, value in (("--concepts", args.concepts), ("--lamb", args.lamb),
                                          ("--preserve-scale", args.preserve_scale)) if value is not None]
        if given:
            ap.error(f"{', '.join(given)}: options of --world v1 or --checkpoint; toy world v2 erases its first "
                     "--names names and --styles styles")
        if not args.names and not args.styles:
            ap.error("--names 0 --styles 0: nothing to erase")
        args.n = 100 if args.n is None else args.n
        toy_v2_demo(args)
        return
    from toyworld.v1.erase import DEFAULT_LAMBDA, DEFAULT_PRESERVE_SCALE

    args.concepts = "red" if args.concepts is None else args.concepts
    args.n = 32 if args.n is None else args.n

    args.lamb = DEFAULT_LAMBDA if args.lamb is None else args.lamb
    args.preserve_scale = DEFAULT_PRESERVE_SCALE if args.preserve_scale is None else args.preserve_scale
    toy_demo(args)


if __name__ == "__main__":
    main()

"""The main job: erase a concept and show what changed.

Without a checkpoint it uses the built-in toy world (toyworld/v1): erases the given colour
concept(s) with CFR, prints the MACE before/after table (efficacy, generality, specificity, H)
and writes a before/after image grid PNG. With ``--checkpoint`` it erases the concepts from a
real SD checkpoint through ComfyUI (needs a ComfyUI checkout: $COMFYUI_PATH or ~/ComfyUI) and
writes the erasure file that stock LoRA loaders read.

    python -m scripts.mace_demo                         # toy world, erase "red"
    python -m scripts.mace_demo --concepts "red, crimson" --out out/
    python -m scripts.mace_demo --checkpoint path/to/sd15.safetensors --concepts "van gogh" --type style
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def toy_demo(args) -> None:
    from toyworld.v1 import vocab
    from toyworld.v1.erase import cfr_erase, erased_words
    from toyworld.v1.evaluate import load_toyworld, mace_metrics
    from toyworld.v1.templates import colour_of

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    world = load_toyworld()
    words = erased_words(args.concepts)
    for w in words:
        colour_of(w)  # clear error for a word that is not a toy colour
    start = time.perf_counter()
    result = cfr_erase(world, args.concepts, lamb=args.lamb, preserve_scale=args.preserve_scale)
    print(f"CFR erased {words} from {len(result.deltas)} K/V weights in {time.perf_counter() - start:.2f}s")
    before = mace_metrics(world, words, n_erased=args.n, n_synonym=args.n // 2, n_other=args.n // 4)
    after = mace_metrics(world, words, kv_weights=result.weights, n_erased=args.n, n_synonym=args.n // 2,
                         n_other=args.n // 4)
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
    rows = list(dict.fromkeys(words + before.synonym_words + [c for c in vocab.COLORS if c not in
                                                               {colour_of(w) for w in words}][:3]))
    write_grid(world, rows, result.weights, path)
    print(f"\nwrote {path} (left: original, right: erased; one row per colour word)")


def write_grid(world, words, kv_weights, path, per_row: int = 4) -> None:
    from PIL import Image

    from toyworld.v1 import diffusion

    prompts = [f"a {w} {s} in plain style" for w in words for s in ("circle", "square", "triangle", "cross")[:per_row]]
    before = diffusion.sample(world.model, prompts, seed=7)
    after = diffusion.sample(world.model, prompts, seed=7, kv_weights=kv_weights)
    scale, gap = 3, 6
    cell = 32 * scale
    width = 2 * per_row * cell + gap * (2 * per_row + 2)
    img = Image.new("RGB", (width, len(words) * (cell + gap) + gap), (255, 255, 255))
    for i, batch in enumerate((before, after)):
        for j, x in enumerate(batch):
            r, c = divmod(j, per_row)
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            xoff = gap + i * (per_row * (cell + gap) + gap) + c * (cell + gap)
            img.paste(tile, (xoff, gap + r * (cell + gap)))
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def checkpoint_demo(args) -> None:
    from headless.erase_checkpoint import erase_checkpoint

    erase_checkpoint(args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="red", help="concepts to erase, synonyms comma separated (toy: colours)")
    ap.add_argument("--lamb", type=float, default=None, help="CFR ridge lambda (default: per model)")
    ap.add_argument("--preserve-scale", type=float, default=None, help="weight of preserve prompts")
    ap.add_argument("--n", type=int, default=32, help="toy: erased-word prompts per word (others scale with it)")
    ap.add_argument("--out", default="out", help="folder for the image grid / erasure file")
    ap.add_argument("--checkpoint", help="a real SD checkpoint (.safetensors); needs ComfyUI")
    ap.add_argument("--type", default="style", choices=["object", "person", "style"], help="checkpoint: concept type")
    args = ap.parse_args(argv)
    if args.checkpoint:
        checkpoint_demo(args)
        return
    from toyworld.v1.erase import DEFAULT_LAMBDA, DEFAULT_PRESERVE_SCALE

    args.lamb = DEFAULT_LAMBDA if args.lamb is None else args.lamb
    args.preserve_scale = DEFAULT_PRESERVE_SCALE if args.preserve_scale is None else args.preserve_scale
    toy_demo(args)


if __name__ == "__main__":
    main()

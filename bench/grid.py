"""Labelled image grids with Pillow: rows = prompts (grouped), columns = models.

``labelled_grid`` lays out any images; ``save_grid`` draws toy world v2's rows (erased names, their
nicknames, retained names) under each method's edit.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from toyworld.v1 import diffusion
from toyworld.v2 import erase


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an upscaled PIL image."""
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def labelled_grid(columns: Sequence[str], rows: Sequence[str], images: Sequence[Sequence[torch.Tensor]],
                  title: str = "", scale: int = 3, label_width: int = 300) -> Image.Image:
    """``images[r][c]`` is the image of row r (prompt label) under column c (model label)."""
    cell = images[0][0].shape[-1] * scale + 6
    top = 44 if title else 24
    img = Image.new("RGB", (label_width + cell * len(columns), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0))
    for c, name in enumerate(columns):
        draw.text((label_width + c * cell + 4, top - 16), name, fill=(0, 0, 0))
    for r, label in enumerate(rows):
        draw.text((6, top + r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c in range(len(columns)):
            img.paste(to_pil(images[r][c], scale), (label_width + c * cell + 3, top + r * cell + 3))
    return img


def save_sampled_grid(path: str, rows, columns: dict, title: str, label_width: int = 420, seed: int = 5) -> None:
    """A labelled grid sampled in the toy world: ``rows`` (label, prompt), ``columns`` name -> (model,
    K/V weights or None, context transform or None); every cell from the same ``seed``."""
    prompts = [p for _, p in rows]
    cols = {m: diffusion.sample(model, prompts, seed=seed, kv_weights=w, context_transform=ct)
            for m, (model, w, ct) in columns.items()}
    grid = labelled_grid(list(cols), [label for label, _ in rows], [[cols[m][r] for m in cols] for r in range(len(rows))],
                         title=title, label_width=label_width)
    grid.save(path)
    print(f"wrote {path}")


def save_grid(world, path: str, task: erase.Task, retained, edits_by_method: dict, models: dict | None = None) -> None:
    """Rows: 4 erased names, their nicknames, 4 retained names (one prompt each); columns: methods
    (``edits_by_method``: method -> (K/V weights, context transform); ``models``: method -> the
    model it samples from, e.g. one with an edited text encoder; default the world's). Any toy
    world with v2's vocabulary interface (v2, v3): its vocabulary comes with the world's model."""
    vocab = world.model.vocab
    erased = list(task.erase[:4])
    rows = ([(f"erased: a photo of {n}", f"a photo of {n}") for n in erased]
            + [(f"nickname: a photo of {vocab.NICKNAMES[n][0]}", f"a photo of {vocab.NICKNAMES[n][0]}") for n in erased]
            + [(f"retained: a photo of {n}", f"a photo of {n}") for n in list(retained)[:4]])
    rows = [(f"{label}  [{vocab.describe(label.split()[-1]).split(': ')[1]}]", p) for label, p in rows]
    columns = {m: ((models or {}).get(m, world.model), w, ct) for m, (w, ct) in edits_by_method.items()}
    label = vocab.__name__.split(".")[-2]
    save_sampled_grid(path, rows, columns, f"toy world {label}: {len(task.erase)} names erased, same seed per row")

"""Labelled image grids with Pillow: rows = prompts (grouped), columns = models."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw


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

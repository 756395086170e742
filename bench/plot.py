"""Line charts as PNG with Pillow alone (no plotting library needed on a fresh machine)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, x_label: str, y_label: str,
               series: Mapping[str, Sequence[tuple[float, float, float]]], x_log: bool = True,
               y_range: tuple[float, float] = (0.0, 1.0)) -> None:
    """One panel: ``series`` name -> [(x, y, y_se)], error bars of +-1 SE, log x axis by default."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 50, y1 - 40, y0 + 44, x1 - 12
    xs = sorted({p[0] for pts in series.values() for p in pts}) or [1.0]
    fx = (lambda v: math.log10(v)) if x_log else (lambda v: v)
    lo, hi = fx(xs[0]), fx(xs[-1])
    hi = hi if hi > lo else lo + 1

    def px(v):
        return left + (fx(v) - lo) / (hi - lo) * (right - left)

    def py(v):
        return bottom - (v - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)

    draw.text((x0 + 8, y0 + 6), title, fill=(0, 0, 0))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0))
    for k in range(6):
        v = y_range[0] + k * (y_range[1] - y_range[0]) / 5
        draw.line([(left - 4, py(v)), (right, py(v))], fill=(225, 225, 225))
        draw.text((left - 34, py(v) - 6), f"{v:.1f}", fill=(0, 0, 0))
    for v in xs:
        draw.line([(px(v), bottom), (px(v), bottom + 4)], fill=(0, 0, 0))
        draw.text((px(v) - 8, bottom + 8), f"{v:g}", fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 40, bottom + 24), x_label, fill=(0, 0, 0))
    draw.text((x0 + 4, top - 16), y_label, fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        dx = (i - len(series) / 2) * 2  # small offset so error bars do not hide each other
        coords = [(px(x) + dx, py(y)) for x, y, _ in pts]
        if len(coords) > 1:
            draw.line(coords, fill=c, width=2)
        for (x, y, se), (cx, cy) in zip(pts, coords):
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=c)
            if se == se and se > 0:
                draw.line([(cx, py(y - se)), (cx, py(y + se))], fill=c)
        ly = top + 4 + 14 * i
        draw.line([(right - 120, ly + 6), (right - 100, ly + 6)], fill=c, width=3)
        draw.text((right - 95, ly), name, fill=(0, 0, 0))


def save_panels(path: str, panels: Sequence[dict], size: tuple[int, int] = (520, 360)) -> None:
    """Panels side by side; each dict holds line_panel's keyword arguments except ``draw``/``box``."""
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(panels):
        line_panel(draw, (i * w, 0, (i + 1) * w, h), **p)
    img.save(path)


def save_h_and_acc_s(path: str, labelled_rows, title: str, unit: str) -> None:
    """Two panels against the number of erased ``unit``s, one series per label: H, titled ``title``,
    and the retained set's accuracy Acc_s. ``labelled_rows``: (label, bench row with ``concepts``,
    ``H``, ``se_H``, ``acc_s``, ``se_s``) pairs."""
    series_h, series_s = {}, {}
    for label, r in labelled_rows:
        series_h.setdefault(label, []).append((r["concepts"], r["H"], r["se_H"] or 0.0))
        series_s.setdefault(label, []).append((r["concepts"], r["acc_s"], r["se_s"]))
    save_panels(path, [
        {"title": title, "x_label": f"number of erased {unit}s", "y_label": "H (higher is better)",
         "series": series_h},
        {"title": f"retained-{unit} accuracy Acc_s", "x_label": f"number of erased {unit}s",
         "y_label": "Acc_s (higher is better)", "series": series_s}], size=(600, 380))
    print(f"wrote {path}")

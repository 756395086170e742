"""The erasure check's prompts, candidates and report (no model here: ``diffusion_classifier`` judges).

* ``check_prompts``: the three prompt sets — erased (the words the erasure was fitted on), held-out
  (nicknames / paraphrases it was not fitted on, each naming its erased concept) and kept — from
  the concept type's templates: image i of a set uses template (i + set offset) and the concept
  i mod C, its phrases in turn, so every concept and many templates are covered.
* ``judge_table``: the judge's candidates are the anchor (position 0), then every erased, kept
  and extra concept by its first phrase; image i fills *its own* template with each candidate
  (``table[i, k]`` indexes the unique prompt texts), so only the concept differs between them.
* ``parse_held_out``: ``nickname, paraphrase -> concept`` lines (the concept may be left out when
  one concept is erased).
* ``check_rows`` / ``report``: Acc_e, Acc_g, Acc_s and H with binomial SEs and n, before and after
  (``erasure_metrics.mass_row``), and the table the node prints (with a second judge's lines when
  there is one: ``clip_judge``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .concepts import Concept, normalise_phrase, parse_concepts
from .erasure_metrics import mass_row, rate
from .templates import fill

SETS = ("erased", "held_out", "kept")
COMPONENT = {"erased": "e", "held_out": "g", "kept": "s"}


@dataclass(frozen=True)
class CheckPrompt:
    set: str         # "erased" | "held_out" | "kept"
    prompt: str      # what is sampled
    template: str    # the template ('{}' = the concept's slot)
    label: str       # the candidate the image should show (a concept's first phrase)


def parse_held_out(text: str, erased: Sequence[Concept], field: str = "held_out") -> list[tuple[str, str]]:
    """[(held-out phrase, the erased concept's name)] from lines ``word, word -> concept``."""
    names = {p: c.name for c in erased for p in c.phrases}
    out = []
    for c in parse_concepts(text or "", field):
        if c.anchor is None:
            if len(erased) != 1:
                raise ValueError(f"{field}, line {c.line}: say which erased concept these words stand for: "
                                 f"'{', '.join(c.phrases)} -> <concept>' (one of {sorted({e.name for e in erased})})")
            target = erased[0].name
        elif c.anchor in names:
            target = names[c.anchor]
        else:
            raise ValueError(f"{field}, line {c.line}: {c.anchor!r} is not an erased concept; "
                             f"use one of {sorted({e.name for e in erased})}")
        for p in c.phrases:
            if p in names:
                raise ValueError(f"{field}, line {c.line}: {p!r} is an erased phrase, not a held-out one; "
                                 "list words the erasure was not fitted on")
            out.append((p, target))
    return out


def _set(kind: str, items: Sequence[tuple[str, str]], templates: Sequence[str], n: int, offset: int) -> list[CheckPrompt]:
    """n prompts over ``items`` (phrase, label), cycling; template (i + offset) mod T."""
    if not items:
        return []
    return [CheckPrompt(kind, fill(templates[(i + offset) % len(templates)], items[i % len(items)][0]),
                        templates[(i + offset) % len(templates)], items[i % len(items)][1]) for i in range(n)]


def _phrases(concepts: Sequence[Concept]) -> list[tuple[str, str]]:
    """(phrase, concept name): every concept's first phrase, then its second ones, ..."""
    depth = max((len(c.phrases) for c in concepts), default=0)
    return [(c.phrases[d], c.name) for d in range(depth) for c in concepts if d < len(c.phrases)]


def check_prompts(erased: Sequence[Concept], held_out: Sequence[tuple[str, str]], kept: Sequence[Concept],
                  templates: Sequence[str], n: int) -> list[CheckPrompt]:
    """``n`` prompts per set (erased, held-out when any, kept); the sets start at different templates."""
    if n < 1:
        raise ValueError(f"images_per_set: {n} < 1")
    return (_set("erased", _phrases(erased), templates, n, 0) + _set("held_out", list(held_out), templates, n, 1)
            + _set("kept", _phrases(kept), templates, n, 2))


def candidates(anchor: str, erased: Sequence[Concept], kept: Sequence[Concept],
               extra: Sequence[Concept] = ()) -> list[str]:
    """The judge's candidates: the anchor, then each concept's first phrase (erased, kept, extra), once."""
    return [normalise_phrase(anchor)] + list(dict.fromkeys(c.name for c in list(erased) + list(kept) + list(extra)))


def judge_table(templates: Sequence[str], labels: Sequence[str], cands: Sequence[str]):
    """(unique prompt texts, table (N, K) into them, label positions (N,)): image i's template with every candidate."""
    position = {c: k for k, c in enumerate(cands)}
    missing = sorted({lab for lab in labels if lab not in position})
    if missing:
        raise ValueError(f"not candidates: {missing}")
    rows: dict[str, int] = {}
    table = [[rows.setdefault(fill(t, c), len(rows)) for c in cands] for t in templates]
    return (list(rows), torch.tensor(table, dtype=torch.long).reshape(len(templates), len(cands)),
            torch.tensor([position[lab] for lab in labels], dtype=torch.long))


def check_rows(kind: str, concepts: int, prompts: Sequence[CheckPrompt], recognised: dict[str, torch.Tensor],
               **extra) -> list[dict]:
    """One ``mass_row`` per model ("none" = the base model, "erased"): ``recognised[model]`` (N,) bool."""
    rows = []
    for model, hits in recognised.items():
        acc = {s: rate([bool(h) for p, h in zip(prompts, hits.tolist()) if p.set == s]) for s in SETS}
        rows.append(mass_row(kind, concepts, acc["erased"], acc["kept"], acc["held_out"], method=model, **extra))
    return rows


def _fmt(acc: Optional[float], se: Optional[float], n: int) -> str:
    return "-" if acc is None else f"{acc:.3f} ± {se:.3f} (n={n})"


def _judge_lines(before: dict, after: dict) -> list[str]:
    lines = []
    for key, label in (("e", "Acc_e erased (lower)"), ("g", "Acc_g held-out (lower)"), ("s", "Acc_s kept (higher)")):
        lines.append(f"{label:24}{_fmt(before[f'acc_{key}'], before[f'se_{key}'], before[f'n_{key}']):28}"
                     f"{_fmt(after[f'acc_{key}'], after[f'se_{key}'], after[f'n_{key}'])}")
    h = [("-" if r["H"] is None else f"{r['H']:.3f}" + ("" if r["se_H"] is None else f" ± {r['se_H']:.3f}"))
         for r in (before, after)]
    lines.append(f"{'H':24}{h[0]:28}{h[1]}")
    return lines


HEADER = f"{'':24}{'before (base model)':28}after (erased model)"


def report(rows: Sequence[dict], close: dict[str, float], seconds: dict[str, float],
           second: Optional[dict] = None) -> str:
    """The table: one line per component, before and after; close calls and time below.

    ``second``: another judge's ``{"title": str, "rows": [before, after], "notes": [str, ...]}``,
    printed the same way after the first judge's lines."""
    before, after = rows[0], rows[1]
    lines = ["MACE erasure check (judge: the base model, diffusion classifier)", HEADER] + _judge_lines(before, after)
    lines.append("close calls (bootstrap p between 0.1 and 0.9): "
                 + ", ".join(f"{k} {v:.0%}" for k, v in close.items()))
    if second is not None:
        lines += [second["title"], HEADER] + _judge_lines(*second["rows"][:2]) + list(second.get("notes", ()))
    lines.append("seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return "\n".join(lines)

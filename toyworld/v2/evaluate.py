"""Measuring toy world v2: loading the shipped world, fixed prompt sets, accuracies, metrics.

* ``load_world()``: the shipped generator and probe (``toyworld/v2/weights``), as a v1-style
  ``ToyWorld`` (``text_encoder``, ``denoiser``, ``kv_weights()`` for the mace_ops interfaces).
* ``name_prompts`` / ``style_prompts``: seeded prompt sets; a name set uses the main name or a
  nickname in the name and name+style templates; a style set uses a style word (or synonym) in
  the style templates with ``someone`` or a retained name.
* ``score_set``: samples every prompt (DDIM, CFG, noise fixed per set and index) and scores
  identity, style and integrity; ``kv_weights`` substitutes an erased model's K/V for the call.
* ``mass_metrics``: the MACE celebrity protocol — Acc_e (erased, main words), Acc_g (erased,
  nicknames / style synonyms), Acc_s (retained set) and H = HM(1-Acc_e, 1-Acc_g, Acc_s), with
  sample sizes and binomial standard errors, plus integrity and the retained-set Fréchet distance
  between the base and the edited model's probe features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from mace_ops.erasure_metrics import binomial_se, harmonic, harmonic_se

from ..v1 import checkpoint, diffusion
from ..v1.evaluate import ToyWorld
from . import scorer, vocab
from .model import build_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_FILE, PROBE_FILE = "toyworld_v2.safetensors", "probe_v2.safetensors"
DEFAULT_STEPS, DEFAULT_CFG = 10, 7.0
TRAIN_HINT = "train it with `python -m toyworld.v2.train --minutes 80`"


def load_probe(path: str | Path) -> scorer.Probe:
    sd, _ = checkpoint.load_state_dict(path, f"toy world v2 probe ({TRAIN_HINT})")
    probe = scorer.Probe()
    probe.load_state_dict(sd)
    return probe.eval().requires_grad_(False)


def load_world(weights_dir: str | Path | None = None) -> ToyWorld:
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    sd, meta = checkpoint.load_state_dict(wdir / GENERATOR_FILE, f"toy world v2 generator ({TRAIN_HINT})")
    model = build_model()
    model.load_state_dict(sd)
    model.eval().requires_grad_(False)
    probe_path = wdir / PROBE_FILE
    _, pmeta = checkpoint.load_state_dict(probe_path, "toy world v2 probe")
    return ToyWorld(model, load_probe(probe_path), meta, pmeta)


# ----------------------------------------------------------------------------- prompt sets
@dataclass
class PromptSet:
    prompts: list[str]
    identities: torch.Tensor   # (N,) the identity each prompt asks for, -1 = any
    styles: torch.Tensor       # (N,) the style each prompt asks for, -1 = any
    seed: int


def _randint(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, n, (1,), generator=gen))


def name_prompts(names: Sequence[str], per_name: int, seed: int, *, nicknames: bool = False,
                 p_style: float = 0.5, vocab=vocab) -> PromptSet:
    """``per_name`` prompts per name (main word, or its nicknames in turn); half with a random style.
    ``vocab``: the world's vocabulary module (v2's by default; v3 shares the templates and styles)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, ids, sts = [], [], []
    for name in names:
        i = vocab.NAME_INDEX[name]
        main = vocab.NAMES[i]
        for j in range(per_name):
            word = vocab.NICKNAMES[main][j % len(vocab.NICKNAMES[main])] if nicknames else name
            if float(torch.rand(1, generator=gen)) < p_style:
                st = _randint(vocab.N_STYLES, gen)
                tpl = vocab.NAME_STYLE_TEMPLATES[_randint(len(vocab.NAME_STYLE_TEMPLATES), gen)]
                prompts.append(tpl.format(n=word, st=vocab.STYLES[st]))
            else:
                st = -1
                prompts.append(vocab.NAME_TEMPLATES[_randint(len(vocab.NAME_TEMPLATES), gen)].format(n=word))
            ids.append(i), sts.append(st)
    return PromptSet(prompts, torch.tensor(ids, dtype=torch.long), torch.tensor(sts, dtype=torch.long), seed)


def style_prompts(styles: Sequence[str], per_style: int, seed: int, *, synonyms: bool = False,
                  names: Sequence[str] = (), vocab=vocab) -> PromptSet:
    """``per_style`` prompts per style word (or its synonym); with ``names``, half name a person."""
    gen = torch.Generator().manual_seed(seed)
    prompts, ids, sts = [], [], []
    for style in styles:
        j = vocab.STYLE_INDEX[style]
        word = vocab.STYLE_SYNONYMS[vocab.STYLES[j]][0] if synonyms else style
        for k in range(per_style):
            if names and k % 2 == 1:
                name = names[_randint(len(names), gen)]
                tpl = vocab.NAME_STYLE_TEMPLATES[_randint(len(vocab.NAME_STYLE_TEMPLATES), gen)]
                prompts.append(tpl.format(n=name, st=word))
                ids.append(vocab.NAME_INDEX[name])
            else:
                prompts.append(vocab.STYLE_TEMPLATES[_randint(len(vocab.STYLE_TEMPLATES), gen)].format(st=word))
                ids.append(-1)
            sts.append(j)
    return PromptSet(prompts, torch.tensor(ids, dtype=torch.long), torch.tensor(sts, dtype=torch.long), seed)


# ----------------------------------------------------------------------------- scoring
@dataclass
class SetScore:
    n: int
    identity_acc: float     # over prompts that ask for an identity
    style_acc: float        # over prompts that ask for a style
    integrity: float
    features: torch.Tensor  # (N, 38) probe logits, for Fréchet distances
    predicted: torch.Tensor  # (N,) predicted identity


@torch.no_grad()
def score_set(world: ToyWorld, pset: PromptSet, *, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
              kv_weights: Optional[Mapping[str, torch.Tensor]] = None, context_transform=None,
              score=scorer.score) -> SetScore:
    """``score(probe, images)``: the world's scorer (v2's by default)."""
    images = diffusion.sample(world.model, pset.prompts, steps=steps, cfg=cfg, seed=pset.seed,
                              kv_weights=kv_weights, context_transform=context_transform)
    s = score(world.probe, images)
    has_id, has_st = pset.identities >= 0, pset.styles >= 0
    id_acc = (s["identity"] == pset.identities)[has_id].float().mean().item() if has_id.any() else float("nan")
    st_acc = (s["style"] == pset.styles)[has_st].float().mean().item() if has_st.any() else float("nan")
    return SetScore(len(pset.prompts), id_acc, st_acc, s["integrity"].float().mean().item(), s["features"],
                    s["identity"])


# ----------------------------------------------------------------------------- the celebrity protocol
@dataclass
class MassMetrics:
    kind: str
    concepts: int
    acc_e: float
    acc_g: float
    acc_s: float
    se_e: float
    se_g: float
    se_s: float
    n_e: int
    n_g: int
    n_s: int
    H: float
    integrity: float   # fraction of retained-set images that show an object at all
    fd: float          # Fréchet distance of retained-set probe features, base vs this model
    se_H: float = float("nan")   # delta-method SE of H from se_e, se_g, se_s (``harmonic_se``)

    def row(self) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        if out["se_H"] != out["se_H"]:
            out["se_H"] = None        # H = 0 (a term at 0): no symmetric SE; None keeps the JSON strict
        return out


def prompt_sets(kind: str, erased: Sequence[str], retained: Sequence[str], n_erased: int = 200,
                n_retained: int = 200, vocab=vocab) -> tuple[PromptSet, PromptSet, PromptSet]:
    """(erased main words, erased held-out words, retained) prompt sets, fixed seeds."""
    per = max(2, round(n_erased / max(1, len(erased))))
    per_r = max(1, round(n_retained / max(1, len(retained))))
    if kind == "name":
        return (name_prompts(erased, per, seed=101, vocab=vocab),
                name_prompts(erased, per, seed=102, nicknames=True, vocab=vocab),
                name_prompts(retained, per_r, seed=103, vocab=vocab))
    if kind == "style":
        return (style_prompts(erased, per, seed=201, vocab=vocab),
                style_prompts(erased, per, seed=202, synonyms=True, vocab=vocab),
                style_prompts(retained, per_r, seed=203, vocab=vocab))
    raise ValueError(f"kind: {kind!r}; choose 'name' or 'style'")


def mass_metrics(world: ToyWorld, kind: str, erased: Sequence[str], retained: Sequence[str], *,
                 kv_weights: Optional[Mapping[str, torch.Tensor]] = None, base_retained: Optional[SetScore] = None,
                 n_erased: int = 200, n_retained: int = 200, context_transform=None, vocab=vocab,
                 score=scorer.score) -> tuple[MassMetrics, SetScore]:
    """Acc_e / Acc_g / Acc_s / H (+ SEs, integrity, FD against ``base_retained``); also the retained score.

    ``context_transform``: a gated erasure applied to every text context (``diffusion.sample``).
    ``vocab`` / ``score``: another world's vocabulary and scorer (v3's ``evaluate`` passes them)."""
    e_set, g_set, s_set = prompt_sets(kind, erased, retained, n_erased, n_retained, vocab)
    acc = (lambda s: s.identity_acc) if kind == "name" else (lambda s: s.style_acc)
    e, g, s = (score_set(world, p, kv_weights=kv_weights, context_transform=context_transform, score=score)
               for p in (e_set, g_set, s_set))
    if base_retained is None:
        base_retained = (s if kv_weights is None and context_transform is None
                         else score_set(world, s_set, score=score))
    fd = scorer.frechet_distance(base_retained.features, s.features)
    m = MassMetrics(kind, len(erased), acc(e), acc(g), acc(s), binomial_se(acc(e), e.n), binomial_se(acc(g), g.n),
                    binomial_se(acc(s), s.n), e.n, g.n, s.n, harmonic(1 - acc(e), 1 - acc(g), acc(s)),
                    s.integrity, fd)
    m.se_H = harmonic_se((1 - m.acc_e, 1 - m.acc_g, m.acc_s), (m.se_e, m.se_g, m.se_s))
    return m, s


def prompt_following(world: ToyWorld, per_name: int = 2, per_style: int = 10) -> dict:
    """The base model's prompt following: identity on all 200 names and on their nicknames, style on
    all 20 styles (and their synonyms), each with n and binomial SE; attribute-level accuracies too."""
    out = {}
    sets = {"name": name_prompts(list(vocab.NAMES), per_name, seed=21),
            "nickname": name_prompts(list(vocab.NAMES), per_name, seed=22, nicknames=True),
            "style": style_prompts(list(vocab.STYLES), per_style, seed=23),
            "style_synonym": style_prompts(list(vocab.STYLES), per_style, seed=24, synonyms=True)}
    for key, pset in sets.items():
        images = diffusion.sample(world.model, pset.prompts, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, seed=pset.seed)
        s = scorer.score(world.probe, images)
        if key.startswith("style"):
            acc = (s["style"] == pset.styles).float().mean().item()
        else:
            acc = (s["identity"] == pset.identities).float().mean().item()
            look = torch.tensor(vocab.APPEARANCE)[pset.identities]
            for j, attr in enumerate(("color", "shape", "position")):
                a = (s[attr] == look[:, j]).float().mean().item()
                out[f"{key}_{attr}"] = round(a, 4)
        out[key] = round(acc, 4)
        out[f"{key}_se"] = round(binomial_se(acc, len(pset.prompts)), 4)
        out[f"{key}_n"] = len(pset.prompts)
        out[f"{key}_integrity"] = round(s["integrity"].float().mean().item(), 4)
    return out

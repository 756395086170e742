"""Measuring toy world v3: loading the shipped world, prompt sets, the celebrity protocol.

The prompt sets, the sampling and the metrics are v2's (``toyworld.v2.evaluate``), called with
v3's vocabulary and scorer: names and nicknames in v2's templates, half with a random style;
Acc_e / Acc_g / Acc_s / H with binomial SEs, integrity and the retained-set Fréchet distance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mace_ops.erasure_metrics import binomial_se

from ..v1 import checkpoint, diffusion
from ..v1.evaluate import ToyWorld
from ..v2 import evaluate as v2
from ..v2.evaluate import DEFAULT_CFG, DEFAULT_STEPS, MassMetrics, PromptSet, SetScore  # noqa: F401
from . import scorer, vocab
from .model import build_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GENERATOR_FILE, PROBE_FILE = "toyworld_v3.safetensors", "probe_v3.safetensors"
TRAIN_HINT = "train it with `python -m toyworld.v3.train`"


def load_probe(path: str | Path) -> scorer.Probe:
    sd, _ = checkpoint.load_state_dict(path, f"toy world v3 probe ({TRAIN_HINT})")
    probe = scorer.Probe()
    probe.load_state_dict(sd)
    return probe.eval().requires_grad_(False)


def load_world(weights_dir: str | Path | None = None) -> ToyWorld:
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    sd, meta = checkpoint.load_state_dict(wdir / GENERATOR_FILE, f"toy world v3 generator ({TRAIN_HINT})")
    model = build_model()
    model.load_state_dict(sd)
    model.eval().requires_grad_(False)
    probe_path = wdir / PROBE_FILE
    _, pmeta = checkpoint.load_state_dict(probe_path, "toy world v3 probe")
    return ToyWorld(model, load_probe(probe_path), meta, pmeta)


def name_prompts(names: Sequence[str], per_name: int, seed: int, **kw) -> PromptSet:
    return v2.name_prompts(names, per_name, seed, vocab=vocab, **kw)


def style_prompts(styles: Sequence[str], per_style: int, seed: int, **kw) -> PromptSet:
    return v2.style_prompts(styles, per_style, seed, vocab=vocab, **kw)


def score_set(world: ToyWorld, pset: PromptSet, **kw) -> SetScore:
    return v2.score_set(world, pset, score=scorer.score, **kw)


def mass_metrics(world: ToyWorld, kind: str, erased: Sequence[str], retained: Sequence[str], **kw):
    return v2.mass_metrics(world, kind, erased, retained, vocab=vocab, score=scorer.score, **kw)


def prompt_following(world: ToyWorld, names: Sequence[str] | None = None, per_name: int = 1,
                     per_style: int = 10) -> dict:
    """The base model's prompt following: identity on names and on their nicknames (all 1,200 by
    default), style on all 20 styles and their synonyms; each with n and binomial SE, and the colour
    and glyph (all 16 cells) accuracies of the name sets."""
    names = list(vocab.NAMES) if names is None else list(names)
    out = {}
    sets = {"name": name_prompts(names, per_name, seed=21),
            "nickname": name_prompts(names, per_name, seed=22, nicknames=True),
            "style": style_prompts(list(vocab.STYLES), per_style, seed=23),
            "style_synonym": style_prompts(list(vocab.STYLES), per_style, seed=24, synonyms=True)}
    for key, pset in sets.items():
        images = diffusion.sample(world.model, pset.prompts, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, seed=pset.seed)
        s = scorer.score(world.probe, images)
        if key.startswith("style"):
            acc = (s["style"] == pset.styles).float().mean().item()
        else:
            acc = (s["identity"] == pset.identities).float().mean().item()
            out[f"{key}_color"] = round((s["color"] == scorer.data.COLOR_OF[pset.identities]).float().mean().item(), 4)
            out[f"{key}_glyph"] = round((s["cells"] == scorer.data.CODE_BITS[pset.identities]).all(1)
                                        .float().mean().item(), 4)
        out[key] = round(acc, 4)
        out[f"{key}_se"] = round(binomial_se(acc, len(pset.prompts)), 4)
        out[f"{key}_n"] = len(pset.prompts)
        out[f"{key}_integrity"] = round(s["integrity"].float().mean().item(), 4)
    return out

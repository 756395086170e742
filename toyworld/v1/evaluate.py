"""MACE-style measurement of concept erasure in the toy world, and loading the shipped world.

* ``load_toyworld()`` loads the shipped generator and probe from ``toyworld/v1/weights/``.
* ``prompt_set`` builds fixed, seeded evaluation prompts for some colour words.
* ``score_prompt_set`` samples (DDIM, CFG, fixed noise per set) and scores colour by the hue
  rule, shape/style by the probe; K/V weights can be overridden (``kv_weights``) so an erased
  model is scored without mutating the base model.
* ``mace_metrics`` returns efficacy (colour accuracy on the erased words, lower is better),
  generality (accuracy on held-out synonyms, lower is better), specificity (accuracy on the
  other colours, higher is better) and H = 3 / (1/(1-efficacy) + 1/specificity + 1/(1-generality)),
  with sample sizes and binomial standard errors.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from . import checkpoint, diffusion, scorer, vocab
from .adapters import ToyDenoiser, ToyTextEncoder, toy_kv_weights
from .model import T2I
from .templates import colour_of

DEFAULT_STEPS = 10
DEFAULT_CFG = 7.0


# ----------------------------------------------------------------------------- loading
@dataclass
class ToyWorld:
    """The shipped toy world: generator (eval mode, frozen), probe, and their metadata."""

    model: T2I
    probe: scorer.Probe
    metadata: dict = field(default_factory=dict)
    probe_metadata: dict = field(default_factory=dict)

    @property
    def text_encoder(self) -> ToyTextEncoder:
        return ToyTextEncoder(self.model)

    @property
    def denoiser(self) -> ToyDenoiser:
        return ToyDenoiser(self.model)

    def kv_weights(self):
        return toy_kv_weights(self.model)


def load_toyworld(weights_dir: str | Path | None = None) -> ToyWorld:
    """Load ``toyworld.safetensors`` and ``probe.safetensors`` (fp16 on disk, fp32 in memory).

    Raises ``FileNotFoundError`` naming the missing file.
    """
    wdir = Path(weights_dir) if weights_dir is not None else checkpoint.WEIGHTS_DIR
    gen_sd, meta = checkpoint.load_state_dict(wdir / checkpoint.GENERATOR_FILE, "toy-world generator")
    probe_sd, pmeta = checkpoint.load_state_dict(wdir / checkpoint.PROBE_FILE, "toy-world probe")
    model = T2I()
    model.load_state_dict(gen_sd)
    model.eval().requires_grad_(False)
    probe = scorer.Probe()
    probe.load_state_dict(probe_sd)
    probe.eval().requires_grad_(False)
    return ToyWorld(model, probe, meta, pmeta)


# ----------------------------------------------------------------------------- prompt sets
@dataclass
class PromptSet:
    prompts: list[str]
    colors: torch.Tensor   # (N,) colour index each prompt asks for
    shapes: torch.Tensor
    styles: torch.Tensor
    seed: int              # sampling seed (noise of prompt i depends on seed and i only)


def prompt_set(words: Sequence[str], per_word: int, seed: int) -> PromptSet:
    """``per_word`` prompts for each colour word: seeded random template, shape and style."""
    gen = torch.Generator().manual_seed(seed)
    prompts, colors, shapes, styles = [], [], [], []
    for word in words:
        ci = vocab.COLOR_WORD_INDEX[colour_of(word)]
        for _ in range(per_word):
            s = int(torch.randint(0, len(vocab.SHAPES), (1,), generator=gen))
            st = int(torch.randint(0, len(vocab.STYLES), (1,), generator=gen))
            tpl = vocab.CAPTION_TEMPLATES[int(torch.randint(0, len(vocab.CAPTION_TEMPLATES), (1,), generator=gen))]
            prompts.append(vocab.caption(tpl, word, vocab.SHAPES[s], vocab.STYLES[st]))
            colors.append(ci), shapes.append(s), styles.append(st)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PromptSet(prompts, t(colors), t(shapes), t(styles), seed)


# ----------------------------------------------------------------------------- scoring
def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


@dataclass
class SetScore:
    n: int
    color_acc: float         # hue rule
    color_se: float
    probe_color_acc: float   # probe, cross-check
    shape_acc: float
    style_acc: float
    color_hist: list[int]    # counts for [none, red, orange, ..., pink]
    seconds: float


def score_images(images: torch.Tensor, ps: PromptSet, probe: Optional[scorer.Probe]) -> SetScore:
    n = images.shape[0]
    hue = scorer.hue_colors(images)
    acc = (hue == ps.colors).float().mean().item() if n else float("nan")
    hist = torch.bincount(hue + 1, minlength=len(vocab.COLORS) + 1).tolist()
    if probe is not None and n:
        pred = probe.predict(images)
        pc = (pred["color"] == ps.colors).float().mean().item()
        sh = (pred["shape"] == ps.shapes).float().mean().item()
        st = (pred["style"] == ps.styles).float().mean().item()
    else:
        pc = sh = st = float("nan")
    return SetScore(n, acc, binomial_se(acc, n), pc, sh, st, hist, 0.0)


def score_prompt_set(model: T2I, ps: PromptSet, probe: Optional[scorer.Probe] = None, *,
                     kv_weights: Optional[Mapping[str, torch.Tensor]] = None,
                     steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, batch_size: int = 64) -> SetScore:
    """Sample the prompt set (with optional K/V override) and score it."""
    t0 = time.perf_counter()
    images = diffusion.sample(model, ps.prompts, steps=steps, cfg=cfg, seed=ps.seed,
                              batch_size=batch_size, kv_weights=kv_weights)
    sc = score_images(images, ps, probe)
    sc.seconds = time.perf_counter() - t0
    return sc


def harmonic_h(efficacy: float, generality: float, specificity: float) -> float:
    """H = 3 / (1/(1-efficacy) + 1/specificity + 1/(1-generality)); 0 if any term is 0."""
    terms = (1 - efficacy, specificity, 1 - generality)
    if any(x <= 0 for x in terms):
        return 0.0
    return 3.0 / sum(1.0 / x for x in terms)


@dataclass
class MaceScores:
    efficacy: float          # colour accuracy on erased-word prompts (lower is better)
    generality: float        # colour accuracy on held-out synonym prompts (lower is better)
    specificity: float       # colour accuracy on other colours' prompts (higher is better)
    H: float
    n_efficacy: int
    n_generality: int
    n_specificity: int
    se_efficacy: float
    se_generality: float
    se_specificity: float
    style_erased: float      # probe style accuracy on erased-word prompts
    shape_erased: float      # probe shape accuracy on erased-word prompts
    erased_words: list[str]
    synonym_words: list[str]
    other_colours: list[str]
    color_hist_erased: list[int]
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def mace_metrics(world: ToyWorld, erased: Sequence[str], *,
                 kv_weights: Optional[Mapping[str, torch.Tensor]] = None,
                 synonyms: Optional[Sequence[str]] = None,
                 n_erased: int = 32, n_synonym: int = 16, n_other: int = 8,
                 steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = 0) -> MaceScores:
    """MACE metrics for erasing the colour words ``erased`` (e.g. ``["red"]``).

    * efficacy: ``n_erased`` prompts per erased word;
    * generality: ``n_synonym`` prompts per held-out synonym (default: the synonyms of the erased
      colours that are not themselves in ``erased``);
    * specificity: ``n_other`` prompts per other colour (main words).
    Seeds are fixed per set (derived from ``seed``), so before/after share their noise.
    ``kv_weights`` overrides K/V weights by name (the erased model); the base model is unchanged.
    """
    t0 = time.perf_counter()
    erased = list(erased)
    gone = []
    for w in erased:
        c = colour_of(w)
        if c not in gone:
            gone.append(c)
    if synonyms is None:
        synonyms = [s for c in gone for s in (c,) + vocab.SYNONYMS[c] if s not in erased]
    synonyms = list(synonyms)
    others = [c for c in vocab.COLORS if c not in gone]
    kw = dict(kv_weights=kv_weights, steps=steps, cfg=cfg)
    e = score_prompt_set(world.model, prompt_set(erased, n_erased, seed + 1), world.probe, **kw)
    g = score_prompt_set(world.model, prompt_set(synonyms, n_synonym, seed + 2), world.probe, **kw) \
        if synonyms else SetScore(0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), [], 0.0)
    s = score_prompt_set(world.model, prompt_set(others, n_other, seed + 3), world.probe, **kw) \
        if others else SetScore(0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), [], 0.0)
    gen_acc = g.color_acc if g.n else 0.0
    spec_acc = s.color_acc if s.n else 1.0
    return MaceScores(
        efficacy=e.color_acc, generality=g.color_acc, specificity=s.color_acc,
        H=harmonic_h(e.color_acc, gen_acc, spec_acc),
        n_efficacy=e.n, n_generality=g.n, n_specificity=s.n,
        se_efficacy=e.color_se, se_generality=g.color_se, se_specificity=s.color_se,
        style_erased=e.style_acc, shape_erased=e.shape_acc,
        erased_words=erased, synonym_words=synonyms, other_colours=others,
        color_hist_erased=e.color_hist, seconds=time.perf_counter() - t0)


def prompt_following(world: ToyWorld, *, per_color: int = 8, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
                     seed: int = 100, kv_weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """Sanity check of a (possibly edited) world: accuracies on main-word and synonym prompts."""
    main = score_prompt_set(world.model, prompt_set(list(vocab.COLORS), per_color, seed), world.probe,
                            kv_weights=kv_weights, steps=steps, cfg=cfg)
    syn_words = [vocab.SYNONYMS[c][i] for c in vocab.COLORS for i in range(2)]
    syn = score_prompt_set(world.model, prompt_set(syn_words, max(1, per_color // 2), seed + 1), world.probe,
                           kv_weights=kv_weights, steps=steps, cfg=cfg)
    return {
        "color_main": main.color_acc, "color_main_se": main.color_se, "n_main": main.n,
        "probe_color_main": main.probe_color_acc, "shape_main": main.shape_acc, "style_main": main.style_acc,
        "color_syn": syn.color_acc, "color_syn_se": syn.color_se, "n_syn": syn.n,
        "probe_color_syn": syn.probe_color_acc, "shape_syn": syn.shape_acc, "style_syn": syn.style_acc,
        "seconds_per_image": (main.seconds + syn.seconds) / max(1, main.n + syn.n),
    }

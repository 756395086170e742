"""Robustness of erasures in toy worlds v2 and v3: the attacks of ``mace_ops.attacks``, run and scored.

World-parametric: every function that takes a ``world`` uses that world's vocabulary
(``world.model.vocab``) and scorer (the ``scorer`` module beside it); those without one
(``target``, ``lookalike``, ``paraphrase_prompts``) take ``world_vocab`` (default v2's). Toy world
v3 shares v2's templates, styles and anchors, so the targets differ only in their word tables.

Names and styles alike: a concept word (a name or a style; the vocabulary is closed, so the word
says which) has a ``Target`` (``target``): the templates its word sits in ("{}" = the word), the
anchor, the probe head that scores it, and its other words (nicknames / the style's synonym).

An ``Edit`` is what a method returns: K/V weights (None = the base model's) and optionally a
context transform (a gated erasure such as ACE, applied to every cross-attention context,
the unconditional one included, as the ComfyUI patch does).

* ``attacker_images``: what the *original* model draws for a concept (the attacker's data): main
  word in the concept's templates, seeded (a seed of its own, never the evaluation's).
* ``soft_attack``: the soft-prompt attack against an edit, white-box (weights and gate).
* ``soft_attack_runs``: several attacks (concepts, init words and seeds in turn). Two protocols:
  "soft" starts at the anchor word (``someone`` / ``art``: a blanked concept; step 0.3
  cosine-decayed, 100 steps, as textual inversion from a neutral word); "soft_lookalike" at the
  nearest look-alike that is not erased (``lookalike``; constant step 0.05, 60 steps): it
  starts where no gate opens and drifts to the erased look. Style attacks weight their loss by
  Min-SNR-1 (``STYLE_ATTACK_CONFIG``: why, there). A name's look-alike has the same
  shape and place and the nearest hue (v3: the same colour, the nearest glyph by Hamming
  distance, ties by index); a style's has the same background pattern and the nearest grey tone
  (when every same-pattern style is erased: the nearest tone of any pattern).
* ``soft_asr``: the probe's accuracy for the concept (identity, or style) on images sampled from
  the soft prompt in the target's templates with fresh noise (ASR; chance is 1/200 for a name in
  v2, 1/1200 in v3, 1/20 for a style).
* ``adversarial_rounds``: adversarial augmentation, the defence's loop (anchor-start attacks with
  seeds of their own; optionally also from the nearest preserve-list word, ``nearest_kept``).
* ``paraphrase_asr``: every other word for the concept in its templates is searched on one seed
  (a name: its nicknames and main word in every name and name+style template, 4 of the 20
  styles; a style: the style word and its synonym in every style template); the best ``keep``
  prompts are scored on fresh seeds (ASR), and the mean success over all candidates is reported too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Callable, Mapping, Optional, Sequence

import torch

from mace_ops.attacks import SoftPrompt, SoftPromptConfig, paraphrase_attack, paraphrase_candidates, soft_prompt_attack
from mace_ops.attacks import adversarial_rounds as defence_rounds

from ..v1 import diffusion
from . import scorer, vocab

ASR_TEMPLATES = tuple(t.replace("{n}", "{}") for t in vocab.NAME_TEMPLATES)
STYLE_ASR_TEMPLATES = tuple(t.replace("{st}", "{}") for t in vocab.STYLE_TEMPLATES)
ATTACK_CONFIG = SoftPromptConfig(tokens=2, steps=100, lr=0.3, batch_size=8, seed=0)   # from the anchor
LOOKALIKE_CONFIG = SoftPromptConfig(tokens=2, steps=60, lr=0.05, batch_size=8, seed=0, schedule="constant")
# Styles: the same budgets with the Min-SNR-1 loss weighting. A style is the background (pattern x
# tone), settled in the first, noisiest sampling steps; the plain eps loss barely sees it (on the
# unedited model the true style word beats the anchor by 2.5 % of the loss), and the unweighted
# attack recovered 1 of 5 styles tried, the weighted one 4 of 5 (ad-hoc runs, STYLES[1, 2, 3, 7, 12]).
STYLE_ATTACK_CONFIG = replace(ATTACK_CONFIG, min_snr=1.0)
STYLE_LOOKALIKE_CONFIG = replace(LOOKALIKE_CONFIG, min_snr=1.0)
ATTACKER_IMAGE_SEED = 7001
EVAL_SEED = 7101
PARAPHRASE_STYLES = vocab.STYLES[::5]


@dataclass(frozen=True)
class Target:
    """What an attack on one kind of concept aims at and how it is scored."""
    kind: str                          # "name" | "style"
    templates: tuple[str, ...]         # where the concept's word sits ('{}')
    anchor: str                        # the blanked concept: the anchor-start attack's init word
    head: str                          # the probe head that scores it
    index: Mapping[str, int]           # word (main or other) -> class
    seed_offset: int                   # keeps the attacker's image seeds apart across kinds
    attack: SoftPromptConfig           # the anchor-start attack's budget
    lookalike_attack: SoftPromptConfig  # the look-alike-start attack's budget
    vocab: ModuleType = vocab          # the world's vocabulary module (v2's, or v3's)

    def words(self, concept: str) -> tuple[str, ...]:
        """The concept's main word and its other words (nicknames / the style's synonym)."""
        if self.kind == "name":
            main = self.vocab.NAMES[self.index[concept]]
            return (main,) + self.vocab.NICKNAMES[main]
        main = self.vocab.STYLES[self.index[concept]]
        return (main,) + self.vocab.STYLE_SYNONYMS[main]


def _targets(world_vocab: ModuleType) -> dict[str, Target]:
    return {
        "name": Target("name", ASR_TEMPLATES, world_vocab.NEUTRAL_NAME, "identity", world_vocab.NAME_INDEX, 0,
                       ATTACK_CONFIG, LOOKALIKE_CONFIG, world_vocab),
        "style": Target("style", STYLE_ASR_TEMPLATES, world_vocab.NEUTRAL_STYLE, "style", world_vocab.STYLE_INDEX,
                        world_vocab.N_NAMES, STYLE_ATTACK_CONFIG, STYLE_LOOKALIKE_CONFIG, world_vocab),
    }


TARGETS = _targets(vocab)                # toy world v2's
_WORLD_TARGETS: dict[str, dict[str, Target]] = {vocab.__name__: TARGETS}


def world_name(world_vocab: ModuleType) -> str:
    """"v2" / "v3": the world a vocabulary module belongs to (its package's last part)."""
    return world_vocab.__name__.rsplit(".", 2)[-2]


def targets(world_vocab: ModuleType = vocab) -> dict[str, Target]:
    """kind -> ``Target`` in the world of ``world_vocab`` (v2's ``TARGETS`` by default). The templates,
    anchors and budgets are v2's in every world (v3 reuses them); the word tables are the world's."""
    key = world_vocab.__name__
    if key not in _WORLD_TARGETS:
        if tuple(world_vocab.NAME_TEMPLATES) != tuple(vocab.NAME_TEMPLATES) or \
                tuple(world_vocab.STYLE_TEMPLATES) != tuple(vocab.STYLE_TEMPLATES):
            raise ValueError(f"world_vocab: {key} has templates of its own; robust's targets assume v2's")
        _WORLD_TARGETS[key] = _targets(world_vocab)
    return _WORLD_TARGETS[key]


def vocab_of(world) -> ModuleType:
    """The vocabulary module of a loaded world (its model's)."""
    return world.model.vocab


def scorer_of(world) -> ModuleType:
    """The scorer module of a loaded world: the ``scorer`` beside its vocabulary (v2's, v3's)."""
    v = vocab_of(world)
    return scorer if v is vocab else importlib.import_module(v.__package__ + ".scorer")


def target(concept: str, world_vocab: ModuleType = vocab) -> Target:
    """The target of a name or a style word (or a nickname / synonym) of the world of ``world_vocab``."""
    for t in targets(world_vocab).values():
        if concept in t.index:
            return t
    raise ValueError(f"concept: {concept!r} is neither a name nor a style of toy world {world_name(world_vocab)}")


def target_of(world, concept: str) -> Target:
    """``target`` in the world ``world``."""
    return target(concept, vocab_of(world))


@dataclass
class Edit:
    kv_weights: Optional[Mapping[str, torch.Tensor]] = None
    context_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def weight_transform(self):
        hooks = diffusion.kv_hooks(self.kv_weights)
        return hooks.weight_transform if hooks is not None else None


@torch.no_grad()
def sample_contexts(world, ctx: torch.Tensor, edit: Edit, seed: int, batch_size: int = 64) -> torch.Tensor:
    """DDIM images from text features ``ctx`` (N, L, d) under an edit; noise fixed by seed and index."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(ctx.shape[0], 3, 32, 32, generator=gen)
    uncond = diffusion.encode_prompts(world.model, [""])
    if edit.context_transform is not None:
        uncond = edit.context_transform(uncond)
    out = []
    for i in range(0, ctx.shape[0], batch_size):
        c = ctx[i: i + batch_size]
        if edit.context_transform is not None:
            c = edit.context_transform(c)
        out.append(diffusion.sample_from_context(world.model, c, uncond[0], noise=noise[i: i + c.shape[0]],
                                                 kv_weights=edit.kv_weights))
    return torch.cat(out, 0)


@torch.no_grad()
def sample_prompts(world, prompts: Sequence[str], edit: Edit, seed: int) -> torch.Tensor:
    return diffusion.sample(world.model, list(prompts), seed=seed, kv_weights=edit.kv_weights,
                            context_transform=edit.context_transform)


def identity_hits(world, images: torch.Tensor, identity: int) -> torch.Tensor:
    """Per image: 1 where the world's scorer sees identity ``identity``."""
    return (scorer_of(world).score(world.probe, images)["identity"] == identity).float()


def concept_hits(world, images: torch.Tensor, concept: str) -> torch.Tensor:
    """Per image: 1 where the world's scorer sees ``concept`` (its identity, or its style)."""
    t = target_of(world, concept)
    return (scorer_of(world).score(world.probe, images)[t.head] == t.index[concept]).float()


def attacker_images(world, concept: str, n: int = 8) -> torch.Tensor:
    t = target_of(world, concept)
    prompts = [t.templates[(5 * i) % len(t.templates)].replace("{}", concept) for i in range(n)]
    return diffusion.sample(world.model, prompts, seed=ATTACKER_IMAGE_SEED + t.seed_offset + t.index[concept])


def soft_attack(world, edit: Edit, concept: str, config: SoftPromptConfig | None = None,
                images: torch.Tensor | None = None, init_word: str | None = None) -> SoftPrompt:
    """The soft-prompt attack on ``concept`` from ``init_word`` (default: the anchor), with ``config``
    (default: the target's anchor-start budget)."""
    t = target_of(world, concept)
    imgs = attacker_images(world, concept) if images is None else images
    return soft_prompt_attack(world.text_encoder, world.denoiser, imgs, t.templates, init_word or t.anchor,
                              config or t.attack,
                              weight_transform=edit.weight_transform(), context_transform=edit.context_transform)


@torch.no_grad()
def soft_asr(world, edit: Edit, concept: str, embeddings: torch.Tensor, per_template: int = 2,
             seed: int = EVAL_SEED) -> torch.Tensor:
    """Per-image hits (1 = the erased concept) of the soft prompt in every template of its target."""
    templates = [tp for tp in target_of(world, concept).templates for _ in range(per_template)]
    ctx = torch.stack([e.features for e in world.text_encoder.encode_embeddings(templates, embeddings)])
    return concept_hits(world, sample_contexts(world, ctx, edit, seed), concept)


def _hue_gap(a: int, b: int) -> float:
    d = abs(vocab.HUE_CENTERS[a] - vocab.HUE_CENTERS[b]) % 360
    return min(d, 360 - d)


def _glyph_gap(world_vocab: ModuleType, a: int, b: int) -> int:
    return bin(world_vocab.CODES[a] ^ world_vocab.CODES[b]).count("1")   # = Hamming distance of code_bits


def lookalike(concept: str, exclude: Sequence[str] = (), world_vocab: ModuleType = vocab) -> str:
    """The attacker's "similar celebrity" to start from, among the concepts of its kind not in
    ``exclude`` (the erased ones); first on ties. A name in v2: the same shape and place, the
    nearest hue; in v3 (``world_vocab`` v3's): the same colour, the nearest glyph by Hamming
    distance of the codes (when every same-colour name is excluded: the nearest glyph of any
    colour). A style: the same background pattern, the nearest grey tone (the world's styles are
    pattern x tone, and a tone step is the smaller change to the background)."""
    v = world_vocab
    t = target(concept, v)
    i = t.index[concept]
    pool = v.NAMES if t.kind == "name" else v.STYLES
    pool = [w for w in pool if w != pool[i] and w not in set(exclude)]
    if t.kind == "name" and hasattr(v, "CODES"):                # v3: identity = colour + glyph
        colour = v.COLOR_OF[i]

        def key(n):
            j = v.NAME_INDEX[n]
            return (v.COLOR_OF[j] != colour, _glyph_gap(v, i, j), j)
    elif t.kind == "name":
        c, sh, p = vocab.APPEARANCE[i]

        def key(n):
            c2, sh2, p2 = vocab.APPEARANCE[vocab.NAME_INDEX[n]]
            return (-(sh2 == sh) - (p2 == p), _hue_gap(c, c2), vocab.NAME_INDEX[n])
    else:
        pt, tn = v.STYLE_LOOK[i]

        def key(s):
            pt2, tn2 = v.STYLE_LOOK[v.STYLE_INDEX[s]]
            return (pt2 != pt, abs(tn2 - tn), v.STYLE_INDEX[s])   # TONES are evenly spaced
    return min(pool, key=key)


def soft_attack_runs(world, edit: Edit, concepts: Sequence[str], runs: int, inits: Sequence[str | None], seed: int,
                     config: SoftPromptConfig, image_world=None) -> list[tuple[str, SoftPrompt]]:
    """``runs`` attacks: run j on concepts[j % len], from init word inits[j % len] (None: the
    concept's look-alike among those not erased, in ``world``'s vocabulary), attack seed seed + j.
    The attacker's images come from ``image_world`` (default ``world``): the original model, when
    ``world`` is itself edited (a text-encoder edit), so the attack aims at what the concept looked
    like before."""
    out = []
    for j in range(runs):
        concept = concepts[j % len(concepts)]
        init = inits[j % len(inits)] or lookalike(concept, exclude=concepts, world_vocab=vocab_of(world))
        images = attacker_images(image_world, concept) if image_world is not None else None
        sp = soft_attack(world, edit, concept, replace(config, seed=seed + j), images=images, init_word=init)
        out.append((concept, sp))
    return out


def paraphrase_prompts(concept: str, styles: Sequence[str] = PARAPHRASE_STYLES,
                       world_vocab: ModuleType = vocab) -> list[str]:
    """Every word for the concept in its templates. A name: the main word and nicknames in every
    name template and every name+style template with each of ``styles`` (default every 5th of the
    20: style is independent of identity). A style: the style word and its synonym in every style
    template. ``world_vocab``: the world's vocabulary (v2's by default)."""
    t = target(concept, world_vocab)
    templates = list(t.templates)
    if t.kind == "name":
        templates += [tp.replace("{n}", "{}").replace("{st}", st) for tp in t.vocab.NAME_STYLE_TEMPLATES
                      for st in styles]
    return paraphrase_candidates(t.words(concept), templates)


@torch.no_grad()
def paraphrase_asr(world, edit: Edit, concept: str, keep: int = 8, repeats: int = 2,
                   seed: int = EVAL_SEED) -> tuple[torch.Tensor, float]:
    """(hits of the best ``keep`` paraphrases on fresh seeds, mean success over all candidates)."""
    cands = paraphrase_prompts(concept, world_vocab=vocab_of(world))
    search = {}

    def success(prompts):
        hits = concept_hits(world, sample_prompts(world, prompts, edit, seed + 17), concept)
        search["mean"] = float(hits.mean())
        return hits

    best = paraphrase_attack(cands, success, keep)
    hits = concept_hits(world, sample_prompts(world, [p for p in best for _ in range(repeats)], edit, seed), concept)
    return hits, search["mean"]


@torch.no_grad()
def nearest_kept(world, concept: str, kept: Sequence[str], template: str | None = None) -> str:
    """The defender's look-alike start: the word of the preserve list ``kept`` whose text feature at
    the concept's position in ``template`` (default: its target's first template) is nearest (cosine)
    to the erased concept's. Unlike ``lookalike`` (the attacker's, from the world's attribute table)
    it needs only the text encoder and the method's own inputs, as a defence on a real model would."""
    if not kept:
        raise ValueError("kept: the preserve list is empty; the look-alike start needs kept words")
    template = template or target_of(world, concept).templates[0]
    enc = world.text_encoder.encode([template.replace("{}", w) for w in (concept, *kept)])
    pos = template.split().index("{}") + 1                      # + the start token
    feats = torch.nn.functional.normalize(torch.stack([e.features[pos].float() for e in enc]), dim=-1)
    return kept[int((feats[1:] @ feats[0]).argmax())]


def adversarial_rounds(world, concepts: Sequence[str], fit: Callable[[dict], Edit], rounds: int,
                       config: SoftPromptConfig, seed: int = 5000, kept: Sequence[str] = (),
                       lookalike_config: SoftPromptConfig | None = None) -> tuple[Edit, dict]:
    """Edit -> attack every erased concept (from the anchor, with seeds of its own: never the
    evaluation's) -> ``fit(found)`` with everything found so far (concept index -> soft prompts),
    ``rounds`` times (``mace_ops.attacks.adversarial_rounds``). With ``lookalike_config``, each
    concept is attacked a second time per round from its nearest word of the preserve list ``kept``
    (``nearest_kept``)."""
    starts = {c: nearest_kept(world, c, kept) for c in concepts} if lookalike_config is not None else {}

    def attack(edit, i, r):
        found = [soft_attack(world, edit, concepts[i], replace(config, seed=seed + 100 * r + i))]
        if lookalike_config is not None:
            found.append(soft_attack(world, edit, concepts[i],
                                     replace(lookalike_config, seed=seed + 50 + 100 * r + i),
                                     init_word=starts[concepts[i]]))
        return found
    return defence_rounds(fit, attack, len(concepts), rounds)

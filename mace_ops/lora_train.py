"""MACE stage 2: train one concept's K/V LoRA so the concept's tokens lose their attention mass.

Each step picks a random template prompt filled with a random phrase of the concept (encodings are
computed once and cached), finds the concept positions (the phrase's tokens plus, by default,
the end/padding tokens, as the reference does), picks a latent and its mask, draws t (CFIS or
uniform), noises the latent with ``denoiser.add_noise`` and runs one denoiser forward through the
LoRA's weight transform. The loss is the attention loss (``attention_loss``); AdamW updates only
the LoRA factors, after a grad-norm clip. The denoiser output is not used (no denoising loss).

Two paths optimise the attention objective (``config.path``). ``full`` runs the denoiser forward
and backward at every step and trains the K and V factors. ``cached_queries``
(``cached_queries.py``) draws the first ``query_samples`` samples exactly as the full path would,
records every attn2 layer's queries in forwards without grad, and then trains the K factors
against those queries with no denoiser call per step (V does not enter that loss; its factors
stay at their zero start). A step i uses recorded sample i modulo the pool.

ComfyUI runs nodes under ``torch.inference_mode()``. Training therefore runs inside
``torch.inference_mode(False)`` and ``torch.enable_grad()``, and clones the latents, masks and
text features first, so no inference tensor is ever saved for backward. Gradients are taken with
``torch.autograd.grad`` on the LoRA factors only, so the (shared) model's parameters never get a
``.grad``. Everything random comes from generators seeded by ``config.seed``: a run on CPU is
reproducible. ``should_stop()`` is called before every step; whatever it raises propagates (a
truthy return raises ``InterruptedError``). ``attention_masks`` derives masks from the base model's
own cross-attention when the user gives none.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .alignment import concept_positions
from .attention_loss import AttentionLossCollector
from .cached_queries import BatchedKLora, record_queries
from .cfis import SAMPLER_KINDS, TimestepSampler
from .concepts import Concept
from .interfaces import AttentionProbe, CrossAttentionDenoiser, TextEncoder
from .lora import KVLora
from .null_space import check_energy, null_space_projector, project_down
from .saliency import mask_up, salient_rows
from .templates import check_templates, fill
from .validation import check_number, derive_seed, require_finite

Progress = Callable[[int, int], None]
OBJECTIVES = ("attention", "trajectory")
PATHS = ("cached_queries", "full")  # how the attention objective is optimised (see the module docstring)
PATH_CHOICES = ("auto",) + PATHS  # the nodes' lora_training input
DEFAULT_PATH = "cached_queries"  # the nodes' "auto" for the attention objective (bench/lora_speed)
DEFAULT_QUERY_SAMPLES = 8  # the nodes' default pool: toy v2 H within the SE of the full pool (bench/lora_speed)
PATH_TOOLTIP = ("How the LoRA stage optimises the attention loss. cached_queries = record the UNet's cross-attention "
                "queries once per training sample, then train the K LoRA against them (no UNet forward/backward per "
                "step; V is not trained); full = backprop through the UNet every step (K and V, the paper's way). "
                "auto = cached_queries for the attention objective, full for trajectory.")
DEFAULT_LORA_PRESERVE = 0.0  # the nodes' default for ``preserve``: on the shipped toy world it cost erasure (bench/mace_variants)
# the nodes' default for ``null_space``: on toy world v2 it kept full MACE level with or above CFR + prior at
# 1-100 names and 1-10 styles (bench.mass_quality full vs full_current / full_original)
DEFAULT_NULL_SPACE = 0.99


@dataclass(frozen=True)
class LoraTrainConfig:
    steps: int = 50
    lr: float = 1e-5
    rank: int = 1
    alpha: float | None = None  # None: alpha = rank (scale 1)
    seed: int = 2024
    sampler: str = "cfis"  # "cfis" or "uniform"
    t1: float = 200.0
    t2: float = 400.0
    gamma: float = 0.05
    include_end_tokens: bool = True
    use_masks: bool = True
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # <= 0: no clipping
    batch_size: int = 1
    preserve: float = 0.0  # weight of the preservation term (0: off, the reference)
    objective: str = "attention"  # "attention" (MACE) or "trajectory" (ANT-style)
    t_prime: float = 500.0  # trajectory: steps t <= t_prime get the reversed-guidance target
    guidance: float = 1.0  # trajectory: eta of the reversed guidance direction
    # "cached_queries" (K LoRA against queries recorded once) or "full" (backprop, K and V). "full" here,
    # the paper's path, which the toy benches and older run folders used; the nodes default to DEFAULT_PATH.
    path: str = "full"
    query_samples: int = 0  # cached_queries: samples recorded (0: steps * batch_size, the full path's draws)
    # > 0: the LoRA's input factor stays off the preserved directions holding this share of the preserve
    # prompts' feature energy (``null_space``; 0: off, the reference)
    null_space: float = 0.0
    # > 0: ANT's weight saliency (``saliency``): only this share of the K/V output rows, the most salient
    # for the concept's loss at the base model, may change (0: off, every row)
    saliency: float = 0.0
    saliency_samples: int = 8  # (latent, t) draws the saliency is averaged over, every prompt each

    def validate(self) -> None:
        """Every number finite and in range (ValueError naming the setting), before any work."""
        check_number(self.steps, "LoRA steps", 1, None, integer=True)
        check_number(self.lr, "LoRA learning rate", 0.0, 10.0, lo_open=True)
        check_number(self.rank, "LoRA rank", 1, None, integer=True)
        if self.alpha is not None:
            check_number(self.alpha, "LoRA alpha", 0.0, None, lo_open=True)
        check_number(self.seed, "seed", 0, 2**64 - 1, integer=True)
        check_number(self.t1, "CFIS t1", 0.0, None)
        check_number(self.t2, "CFIS t2", 0.0, None)
        check_number(self.gamma, "CFIS gamma", 0.0, None)
        check_number(self.grad_clip, "grad clip", None, None)
        check_number(self.batch_size, "batch size", 1, None, integer=True)
        if self.sampler not in SAMPLER_KINDS:
            raise ValueError(f"timestep sampler: unknown {self.sampler!r}; choose one of {list(SAMPLER_KINDS)}")
        check_number(self.weight_decay, "weight decay", 0.0, None)
        check_number(self.preserve, "LoRA preserve weight", 0.0, 1e6)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown {self.objective!r}; choose one of {list(OBJECTIVES)}")
        check_number(self.t_prime, "trajectory t_prime", 0.0, None)
        check_number(self.guidance, "trajectory guidance", 0.0, 100.0)
        if self.path not in PATHS:
            raise ValueError(f"path: unknown {self.path!r}; choose one of {list(PATHS)}")
        check_number(self.query_samples, "query samples", 0, None, integer=True)
        check_energy(self.null_space)
        check_number(self.saliency, "LoRA saliency share", 0.0, 1.0)
        check_number(self.saliency_samples, "LoRA saliency samples", 1, None, integer=True)
        if self.saliency > 0 and self.path != "full":
            raise ValueError("LoRA saliency restricts the full path's K/V rows; set the path to 'full' or saliency to 0")
        if self.path == "cached_queries" and self.objective != "attention":
            raise ValueError(f"path 'cached_queries' optimises the attention objective only; the {self.objective!r} "
                             "objective needs path 'full'")

    def settings(self) -> dict:
        """Every field; on the full path without the cached path's fields, and without ``null_space`` when it
        is off (resume keys of older runs hold)."""
        out = dataclasses.asdict(self)
        if self.path == "full":
            del out["path"], out["query_samples"]
        if not self.null_space:
            del out["null_space"]
        if not self.saliency:
            del out["saliency"], out["saliency_samples"]
        return out

    def query_pool(self) -> int:
        """How many samples the cached path records."""
        return self.query_samples or self.steps * self.batch_size


DEFAULTS_BY_TYPE: dict[str, LoraTrainConfig] = {
    "object": LoraTrainConfig(steps=50, lr=1e-5, sampler="cfis"),
    "person": LoraTrainConfig(steps=50, lr=1e-4, sampler="cfis"),
    "style": LoraTrainConfig(steps=50, lr=1e-4, sampler="cfis", use_masks=False),
    "nudity": LoraTrainConfig(steps=120, lr=1e-5, sampler="uniform"),
}


def training_path(choice: str, objective: str) -> str:
    """The path a node's ``lora_training`` choice means for an objective ('auto': see PATH_TOOLTIP)."""
    if choice not in PATH_CHOICES:
        raise ValueError(f"lora_training: unknown {choice!r}; choose one of {list(PATH_CHOICES)}")
    if choice == "auto":
        return DEFAULT_PATH if objective == "attention" else "full"
    return choice


def config_for(kind: str, **overrides) -> LoraTrainConfig:
    """The reference's defaults for a concept type, with overrides."""
    try:
        base = DEFAULTS_BY_TYPE[kind]
    except KeyError:
        raise ValueError(f"concept_type: unknown {kind!r}; choose one of {sorted(DEFAULTS_BY_TYPE)}") from None
    return dataclasses.replace(base, **overrides)


@dataclass
class TrainedLora:
    lora: KVLora
    losses: list[float]
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0

    def info(self) -> dict:
        """What ``lora_file.save_concept_lora`` records (concept, steps, lr, seed, settings, ...)."""
        return dict(self.metadata)


@dataclass
class _Prompts:
    texts: list[str]
    contexts: torch.Tensor  # (P, L, d)
    positions: torch.Tensor  # (P, L) bool
    skipped: list[str]


def _prepare_prompts(
    encoder: TextEncoder, concept: Concept, templates: Sequence[str], include_end: bool, device: torch.device
) -> _Prompts:
    check_templates(templates)
    texts, feats, pos, skipped = [], [], [], []
    for phrase in concept.phrases:
        try:
            phrase_ids = encoder.tokenize(phrase)
        except ValueError as err:
            raise ValueError(f"concept line {concept.line}: {err}") from None
        if not phrase_ids:
            raise ValueError(f"concept line {concept.line}: {phrase!r} gives no tokens; use words")
        prompts = [fill(t, phrase) for t in templates]
        try:
            encoded = encoder.encode(prompts)
        except ValueError as err:
            raise ValueError(f"concept line {concept.line}: {err}") from None
        for prompt, enc in zip(prompts, encoded):
            if not concept_positions(enc.ids, enc.length, phrase_ids, encoder.end_id, False):
                skipped.append(prompt)  # the phrase tokenizes differently inside this prompt
                continue
            where = concept_positions(enc.ids, enc.length, phrase_ids, encoder.end_id, include_end)
            mask = torch.zeros(len(enc.ids), dtype=torch.bool)
            mask[where] = True
            texts.append(prompt)
            feats.append(enc.features.detach().to(torch.float32))
            pos.append(mask)
    if not texts:
        raise ValueError(
            f"concept line {concept.line}: no template prompt contains the tokens of {list(concept.phrases)}"
        )
    contexts = torch.stack(feats).to(device).clone()
    return _Prompts(texts, contexts, torch.stack(pos).to(device), skipped)


def _check_inputs(latents: torch.Tensor, masks: torch.Tensor | None) -> None:
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise ValueError(f"latents must be (N, C, H, W) with N >= 1, got {tuple(latents.shape)}")
    require_finite(latents, "LoRA training images", "the images (or their VAE latents) hold NaN/inf; "
                   "regenerate them, e.g. with another VAE dtype or fewer sampling steps")
    if masks is not None:
        require_finite(masks, "LoRA training masks", "give masks with finite values in [0, 1]")
    if masks is not None:
        if masks.ndim != 3 or masks.shape[0] != latents.shape[0]:
            raise ValueError(
                f"masks must be (N={latents.shape[0]}, H, W) to pair with the latents, got {tuple(masks.shape)}"
            )


def _kv_weights(denoiser: CrossAttentionDenoiser) -> tuple[dict, torch.device]:
    weights = denoiser.kv_weights()
    if not weights:
        raise ValueError("model: no cross-attention to_k/to_v weights found")
    return weights, next(iter(weights.values())).device


def preservation_loss(lora: KVLora, weights: dict, P: torch.Tensor) -> torch.Tensor:
    """sum_W tr(ΔW P ΔW^T) / tr(W P W^T) over the LoRA's weights, in low-rank form (r x r products)."""
    total = None
    for name in lora.names:
        up, down, w = lora.up[name], lora.down[name], weights[name].detach().to(P)
        dP = down @ P  # (r, d)
        num = (lora.scale ** 2) * ((dP @ down.T) * (up.T @ up)).sum()
        den = ((w @ P) * w).sum().clamp_min(1e-12)
        total = num / den if total is None else total + num / den
    return total


def _ignore(_probe: AttentionProbe) -> None:
    pass


def _trajectory_loss(denoiser, transform, x_t, t, context, uncond, config: LoraTrainConfig) -> torch.Tensor:
    """ANT-style target (see the module docstring) from the frozen model, MSE to the LoRA model's output."""
    with torch.no_grad():
        b = x_t.shape[0]
        both = denoiser.forward_with_attention(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                               torch.cat([context, uncond.expand(b, -1, -1)]), _ignore)
        cond, unc = both[:b], both[b:]
        late = (t <= config.t_prime).view(-1, *([1] * (x_t.ndim - 1)))
        target = torch.where(late, unc - config.guidance * (cond - unc), cond)
    pred = denoiser.forward_with_attention(x_t, t, context, _ignore, transform)
    return (pred.float() - target.float()).pow(2).mean()


@dataclass
class LoraJob:
    """One concept's LoRA training inputs (``train_concept_loras``)."""

    denoiser: CrossAttentionDenoiser
    concept: Concept
    latents: torch.Tensor
    masks: torch.Tensor | None = None


class _Run:
    """One concept's training state: weights, prompts, data, fresh LoRA and the seeded draws."""

    def __init__(self, job: LoraJob, encoder: TextEncoder, templates: Sequence[str], config: LoraTrainConfig,
                 preserve_moment: torch.Tensor | None):
        _check_inputs(job.latents, job.masks)
        self.job, self.concept, self.denoiser = job, job.concept, job.denoiser
        self.weights, device = _kv_weights(job.denoiser)
        self.device = device
        self.prompts = _prepare_prompts(encoder, job.concept, templates, config.include_end_tokens, device)
        self.x0_all = job.latents.detach().to(device).clone()
        self.use_masks = config.use_masks and job.masks is not None
        self.m_all = job.masks.detach().to(device=device, dtype=torch.float32).clone() if self.use_masks else None
        self.lora = KVLora({k: tuple(w.shape) for k, w in self.weights.items()}, config.rank, config.alpha,
                           config.seed, device)
        self.P = None
        if config.preserve > 0:
            self.P = preserve_moment.detach().to(device=device, dtype=torch.float32).clone()
            require_finite(self.P, "LoRA training: the preserve prompts' features", "use the CLIP of this model")
        self.Q = None
        if config.null_space > 0:
            self.Q, self.null_rank = null_space_projector(preserve_moment.to(device), config.null_space)
            for name in self.lora.names:
                project_down(self.lora.down[name], self.Q)
        self.gen = torch.Generator().manual_seed(derive_seed(config.seed, 1))
        self.uncond = None
        if config.objective == "trajectory":
            self.uncond = encoder.encode([""])[0].features.detach().to(device=device, dtype=torch.float32).clone()
        self.sampler = TimestepSampler(
            "uniform" if config.objective == "trajectory" else config.sampler, job.denoiser.num_train_timesteps,
            config.t1, config.t2, config.gamma, derive_seed(config.seed, 2), device
        )
        self.batch = config.batch_size
        self.losses: list[float] = []
        self.rows = self._salient_rows(config) if config.saliency > 0 else None

    def loss(self, config: LoraTrainConfig, pi, li, x_t, t, transform) -> torch.Tensor:
        """The stage's objective for drawn samples under a K/V ``transform``."""
        if config.objective == "trajectory":
            return _trajectory_loss(self.denoiser, transform, x_t, t, self.prompts.contexts[pi], self.uncond, config)
        collector = AttentionLossCollector(self.prompts.positions[pi], None if self.m_all is None else self.m_all[li])
        self.denoiser.forward_with_attention(x_t, t, self.prompts.contexts[pi], collector, transform)
        return collector.loss()

    def _salient_rows(self, config: LoraTrainConfig) -> dict[str, torch.Tensor]:
        """``saliency.salient_rows`` over every prompt at ``saliency_samples`` seeded draws (own generator:
        the training draws are those of a run without saliency)."""
        gen = torch.Generator().manual_seed(derive_seed(config.seed, 3))
        P = len(self.prompts.texts)

        def loss_of(transform):
            total = None
            for _ in range(config.saliency_samples):
                li = torch.randint(self.x0_all.shape[0], (P,), generator=gen).to(self.device)
                x0 = self.x0_all[li]
                noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=self.device, dtype=x0.dtype)
                t = torch.randint(self.denoiser.num_train_timesteps, (P,), generator=gen).to(self.device)
                x_t = self.denoiser.add_noise(x0, noise, t)
                part = self.loss(config, torch.arange(P, device=self.device), li, x_t, t, transform)
                total = part if total is None else total + part
            return total

        rows = salient_rows(loss_of, self.weights, config.saliency)
        mask_up(self.lora.up, rows)
        return rows

    def draw(self):
        """One step's samples: prompt and latent indices, noisy latents, timesteps."""
        b, gen, device = self.batch, self.gen, self.device
        pi = torch.randint(len(self.prompts.texts), (b,), generator=gen).to(device)
        li = torch.randint(self.x0_all.shape[0], (b,), generator=gen).to(device)
        x0 = self.x0_all[li]
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=x0.dtype)
        t = self.sampler.sample(b)
        return pi, li, self.denoiser.add_noise(x0, noise, t), t

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        self.losses.append(float(loss.detach()))
        if not torch.isfinite(loss.detach()):
            raise ValueError(
                f"LoRA training for {self.concept.name!r}: the loss became {self.losses[-1]} at step {step + 1}; "
                "lower the learning rate (lr) or check the images and model for NaN/inf values"
            )

    def result(self, config: LoraTrainConfig, seconds: float) -> TrainedLora:
        require_finite({name: t for name, t in self.lora.named_parameters()},
                       f"LoRA training for {self.concept.name!r}", "lower the learning rate (lr); nothing was saved")
        metadata = {
            "concept": list(self.concept.phrases),
            "steps": config.steps,
            "lr": config.lr,
            "seed": config.seed,
            "settings": {**config.settings(), "masks_used": self.use_masks, "prompts": len(self.prompts.texts),
                         "images": self.x0_all.shape[0],
                         **({"null_space_rank": self.null_rank} if self.Q is not None else {}),
                         **({"salient_rows": int(sum(int(r.sum()) for r in self.rows.values()))}
                            if self.rows is not None else {})},
            "skipped_prompts": self.prompts.skipped,
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
        }
        return TrainedLora(self.lora, self.losses, metadata, seconds)


def _check_config(config: LoraTrainConfig, preserve_moment) -> None:
    config.validate()
    for what, value, setting in (("LoRA preserve weight", config.preserve, "preserve weight"),
                                 ("LoRA null space", config.null_space, "null-space energy")):
        if value > 0 and preserve_moment is None:
            raise ValueError(f"{what} > 0 needs preserve prompts (their feature moment); give some "
                             f"or set the {setting} to 0")


def train_concept_lora(
    denoiser: CrossAttentionDenoiser,
    encoder: TextEncoder,
    concept: Concept,
    templates: Sequence[str],
    latents: torch.Tensor,
    masks: torch.Tensor | None = None,
    config: LoraTrainConfig = LoraTrainConfig(),
    progress: Progress | None = None,
    should_stop: Callable[[], object] | None = None,
    preserve_moment: torch.Tensor | None = None,
) -> TrainedLora:
    """Train a fresh K/V LoRA for one concept; the denoiser and its weights are never modified.

    ``preserve_moment`` (d x d, mean p p^T of the preserve prompts' features) is needed when
    ``config.preserve`` > 0.
    """
    job = LoraJob(denoiser, concept, latents, masks)
    if config.path == "cached_queries":
        return train_concept_loras([job], encoder, templates, config, progress, should_stop, preserve_moment)[0]
    _check_config(config, preserve_moment)
    _check_inputs(latents, masks)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        run = _Run(job, encoder, templates, config, preserve_moment)
        lora, weights = run.lora, run.weights
        params = lora.parameters()
        opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                raise InterruptedError(f"LoRA training for {concept.name!r} stopped at step {step}")
            pi, li, x_t, t = run.draw()
            loss = run.loss(config, pi, li, x_t, t, lora.weight_transform)
            if run.P is not None:
                loss = loss + config.preserve * preservation_loss(lora, weights, run.P)
            run.check_loss(loss, step)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                for p in params:
                    p.grad = None
                if run.Q is not None:
                    for name in lora.names:
                        project_down(lora.down[name], run.Q)
                if run.rows is not None:
                    mask_up(lora.up, run.rows)
            elif run.losses[-1] > 0:
                raise RuntimeError(
                    "the attention loss does not depend on the LoRA: the denoiser ignored weight_transform"
                )
            if progress is not None:
                progress(step + 1, config.steps)
        return run.result(config, time.perf_counter() - start)


def train_concept_loras(
    jobs: Sequence[LoraJob],
    encoder: TextEncoder,
    templates: Sequence[str],
    config: LoraTrainConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], object] | None = None,
    preserve_moment: torch.Tensor | None = None,
) -> list[TrainedLora]:
    """Train one LoRA per job. The cached-query path trains them together: concepts along a batch
    dimension, each with its own factors, AdamW state and grad clip (``cached_queries.BatchedKLora``),
    equal to training them one by one within float tolerance. The full path trains them in turn.
    ``progress(step, steps)`` counts steps of the whole group; ``TrainedLora.seconds`` is the
    group's time divided among its concepts.
    """
    _check_config(config, preserve_moment)
    if not jobs:
        return []
    if config.path == "full":
        return [train_concept_lora(j.denoiser, encoder, j.concept, templates, j.latents, j.masks, config, progress,
                                   should_stop, preserve_moment) for j in jobs]
    for job in jobs:
        _check_inputs(job.latents, job.masks)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        runs = [_Run(job, encoder, templates, config, preserve_moment) for job in jobs]
        pool, batch = config.query_pool(), config.batch_size
        samples, caches = [], []
        for run in runs:  # the full path's first draws; each concept's queries from its own model
            drawn = [run.draw() for _ in range(-(-pool // batch))]
            pi, li, x_t, t = (torch.cat([d[j] for d in drawn])[:pool] for j in range(4))
            caches.append(record_queries(run.denoiser, x_t, t, run.prompts.contexts[pi], run.weights, should_stop))
            samples.append((pi, li))
        model = BatchedKLora([r.lora for r in runs], [r.weights for r in runs], caches)
        P = runs[0].P
        params = model.parameters()
        opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
        device = runs[0].device
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                names = ", ".join(repr(r.concept.name) for r in runs)
                raise InterruptedError(f"LoRA training for {names} stopped at step {step}")
            idx = (step * batch + torch.arange(batch, device=device)) % pool
            pis = [pi[idx] for pi, _ in samples]
            lis = [li[idx] for _, li in samples]
            contexts = torch.stack([r.prompts.contexts[p] for r, p in zip(runs, pis)])
            positions = torch.stack([r.prompts.positions[p] for r, p in zip(runs, pis)])
            masks = None if runs[0].m_all is None else torch.stack([r.m_all[i] for r, i in zip(runs, lis)])
            losses = model.losses(idx, contexts, positions, masks)
            if P is not None:
                losses = losses + config.preserve * model.preservation(P)
            for c, run in enumerate(runs):
                run.check_loss(losses[c], step)
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else g
            if config.grad_clip > 0:
                model.clip_grad_norms(config.grad_clip)
            opt.step()
            for p in params:
                p.grad = None
            if runs[0].Q is not None:
                for key in model.keys:
                    project_down(model.down[key], runs[0].Q)
            if progress is not None:
                progress(step + 1, config.steps)
        model.write_back()
        seconds = (time.perf_counter() - start) / len(runs)
        return [run.result(config, seconds) for run in runs]


def attention_masks(
    denoiser: CrossAttentionDenoiser,
    encoder: TextEncoder,
    concept: Concept,
    templates: Sequence[str],
    latents: torch.Tensor,
    t: int = 300,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 4,
) -> torch.Tensor:
    """(N, H, W) {0, 1} float masks where the base model attends to the concept's own tokens.

    Latent n is noised to timestep t and paired with template n (cycling) filled with the
    concept's first phrase; the attention mass on the phrase's tokens (end tokens excluded) is
    averaged over heads and layers, upsampled (bilinear) to the latent size, scaled to [0, 1]
    per image and thresholded (> threshold).
    """
    _check_inputs(latents, None)
    if not 0 <= t < denoiser.num_train_timesteps:
        raise ValueError(f"t must be in [0, {denoiser.num_train_timesteps}), got {t}")
    n, _, height, width = latents.shape
    with torch.no_grad():
        _, device = _kv_weights(denoiser)
        one = Concept(concept.phrases[:1], concept.anchor, concept.line)
        prompts = _prepare_prompts(encoder, one, templates, include_end=False, device=device)
        gen = torch.Generator().manual_seed(int(seed))
        out = []
        for s in range(0, n, batch_size):
            x0 = latents[s : s + batch_size].detach().to(device)
            b = x0.shape[0]
            pi = torch.arange(s, s + b) % len(prompts.texts)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=x0.dtype)
            tt = torch.full((b,), int(t), dtype=torch.long, device=device)
            positions = prompts.positions[pi.to(device)]
            maps: list[torch.Tensor] = []

            def collect(probe: AttentionProbe, positions=positions, maps=maps) -> None:
                p = probe.probs.detach().float()
                mass = (p * positions[:, None, None, :].float()).sum(-1).mean(1)  # (B, HW)
                grid = mass.reshape(p.shape[0], 1, probe.height, probe.width)
                maps.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0])

            x_t = denoiser.add_noise(x0, noise, tt)
            denoiser.forward_with_attention(x_t, tt, prompts.contexts[pi.to(device)], collect)
            if not maps:
                raise ValueError("attention masks: the denoiser reported no cross-attention layer")
            avg = torch.stack(maps).mean(0)
            lo = avg.flatten(1).min(1).values[:, None, None]
            hi = avg.flatten(1).max(1).values[:, None, None]
            norm = (avg - lo) / (hi - lo).clamp_min(1e-12)
            out.append((norm > threshold).float().cpu())
        return torch.cat(out)

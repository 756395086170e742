"""Attacks on an erased model: does the concept come back from a paraphrase or an optimised prompt?

* Soft-prompt attack (textual-inversion "concept inversion", as CCE ran it against erasure
  methods): k continuous token embeddings v take the concept's place in the templates; with
  images x0 of the concept (what the *original* model drew for it), noise eps and t uniform,

      v* = argmin_v  E ||eps_theta'(x_t, t, T(E(template with v))) - eps||^2

  where theta' is the erased denoiser (its K/V through ``weight_transform``) and T an optional
  context transform (a gated erasure such as ACE's, so the attack is white-box against the gate).
  The loss assumes an eps-predicting denoiser (SD1.x, SDXL, the toy worlds). With ``min_snr`` = g > 0
  each sample's loss is weighted by Min-SNR-g (Hang et al., 2023), w_t = min(SNR_t, g) / SNR_t with
  SNR_t = abar_t / (1 - abar_t) (abar_t read off the denoiser's own ``add_noise``): the low-noise steps,
  where the image itself shows what the text would say, count less, so a concept carried by the
  image's coarse layout (a style's background) is not drowned by them. Adam on v only,
  ``steps`` steps (cosine-decayed step size), everything random from ``seed``; v starts at the anchor word's embedding.
  The text encoder must implement ``EmbeddingTextEncoder``.
* Adversarial augmentation, the defence's loop (``adversarial_rounds``): fit the edit, attack every
  erased concept against it, refit with everything found so far, ``rounds`` times (ACE's refit,
  ``ace.fit_gated_erasure(adversarial=...)``; the toy world and the ACE node both run it).
* Paraphrase attack: every other word for the concept (nicknames, synonyms) in every template the
  caller lists; ``paraphrase_attack`` keeps the prompts that succeed most on a search seed
  (the attacker's choice), which the caller then scores on fresh seeds.

Attack success rate (ASR) = the scorer's accuracy for the erased concept on the attack's images;
the toy world computes it (``toyworld/v2/robust.py``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .interfaces import AttentionProbe, CrossAttentionDenoiser, EmbeddingTextEncoder
from .templates import check_templates
from .validation import check_number

ContextTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SoftPromptConfig:
    tokens: int = 2          # k soft token embeddings in place of the concept's words
    steps: int = 120
    lr: float = 0.02         # Adam step, in units of the anchor embedding's RMS per coordinate
    batch_size: int = 8
    seed: int = 0
    schedule: str = "cosine"  # step size: "cosine" (decays to 0 over the steps) or "constant"
    min_snr: float = 0.0      # Min-SNR-gamma loss weighting; 0 = the plain eps loss

    def validate(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: unknown {self.schedule!r}; choose 'cosine' or 'constant'")
        check_number(self.tokens, "tokens", 1, 16, integer=True)
        check_number(self.steps, "steps", 0, 100_000, integer=True)
        check_number(self.lr, "lr", 0.0, 10.0)
        check_number(self.batch_size, "batch_size", 1, 4096, integer=True)
        check_number(self.min_snr, "min_snr", 0.0, 1e6)


@dataclass
class SoftPrompt:
    embeddings: torch.Tensor            # (k, e), detached
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _ignore(_probe: AttentionProbe) -> None:
    return None


def _require_embedding_encoder(encoder) -> None:
    if not isinstance(encoder, EmbeddingTextEncoder):
        raise ValueError("text encoder: this encoder cannot encode continuous embeddings "
                         "(it needs word_embeddings and encode_embeddings); the soft-prompt attack needs them")


def soft_prompt_attack(
    encoder: EmbeddingTextEncoder,
    denoiser: CrossAttentionDenoiser,
    images: torch.Tensor,
    templates: Sequence[str],
    init_word: str,
    config: SoftPromptConfig = SoftPromptConfig(),
    weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    context_transform: ContextTransform | None = None,
    should_stop: Callable[[], object] | None = None,
) -> SoftPrompt:
    """Optimise ``config.tokens`` embeddings so the (erased) denoiser redraws ``images`` (N, ...)."""
    _require_embedding_encoder(encoder)
    config.validate()
    check_templates(templates)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError("images: need at least one image of the concept")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(config.seed))
    n, T = images.shape[0], denoiser.num_train_timesteps
    losses = []
    # every tensor the optimiser touches is made outside inference mode (a ComfyUI node runs in it)
    with torch.inference_mode(False), torch.enable_grad():
        init = encoder.word_embeddings(init_word).detach().float()
        if init.shape[0] == 0:
            raise ValueError(f"init_word {init_word!r} gives no tokens")
        scale = float(init.pow(2).mean().sqrt()) or 1.0
        rows = torch.arange(config.tokens) % init.shape[0]
        v = init[rows].clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=config.lr * scale)
        sched = torch.optim.lr_scheduler.LambdaLR(            # cosine decay to 0 over the budget
            opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, config.steps))) if config.schedule == "cosine"
            else 1.0)
        weights = denoiser.kv_weights()                       # the denoiser's device (draws stay on the CPU)
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        x_all = images.detach().clone().float().to(device)
        for _ in range(config.steps):
            if should_stop is not None and should_stop():
                raise InterruptedError("soft-prompt attack interrupted")
            idx = torch.randint(0, n, (config.batch_size,), generator=gen)
            tpl = torch.randint(0, len(templates), (config.batch_size,), generator=gen)
            t = torch.randint(0, T, (config.batch_size,), generator=gen).to(device)
            x0 = x_all[idx.to(device)]
            noise = torch.randn(x0.shape, generator=gen).to(device)
            x_t = denoiser.add_noise(x0, noise, t)
            enc = encoder.encode_embeddings([templates[int(i)] for i in tpl], v)
            ctx = torch.stack([e.features for e in enc]).float().to(device)
            if context_transform is not None:
                ctx = context_transform(ctx)
            pred = denoiser.forward_with_attention(x_t, t, ctx, _ignore, weight_transform)
            if config.min_snr > 0:
                per = (pred.float() - noise).pow(2).flatten(1).mean(1)
                loss = (per * min_snr_weights(denoiser, x0, t, config.min_snr)).mean()
            else:
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
            (grad,) = torch.autograd.grad(loss, [v])
            v.grad = grad
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return SoftPrompt(v.detach().clone(), losses, time.perf_counter() - start)


def min_snr_weights(denoiser: CrossAttentionDenoiser, like: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights min(SNR_t, gamma) / SNR_t of an eps loss, abar_t from ``add_noise`` on
    latents shaped ``like`` (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: x0 = 1, eps = 0 gives sqrt(abar_t))."""
    abar = denoiser.add_noise(torch.ones_like(like), torch.zeros_like(like), t).float().flatten(1)[:, 0].pow(2)
    snr = abar / (1 - abar).clamp(min=1e-12)
    return snr.clamp(max=gamma) / snr.clamp(min=1e-12)


def adversarial_rounds(fit: Callable[[dict], object], attack: Callable[[object, int, int], SoftPrompt],
                       n_concepts: int, rounds: int) -> tuple[object, dict[int, list[torch.Tensor]]]:
    """``edit = fit({})``; then ``rounds`` times: ``attack(edit, i, r)`` for every concept i (round r;
    one SoftPrompt or a list of them, e.g. one per start), ``edit = fit(found)`` with every soft
    prompt found so far (concept index -> embeddings, in order). Returns (the last edit, found)."""
    check_number(rounds, "adversarial rounds", 0, 1000, integer=True)
    found: dict[int, list[torch.Tensor]] = {}
    edit = fit(found)
    for r in range(rounds):
        for i in range(n_concepts):
            out = attack(edit, i, r)
            found.setdefault(i, []).extend(sp.embeddings for sp in (out if isinstance(out, (list, tuple)) else [out]))
        edit = fit(found)
    return edit, found


def paraphrase_candidates(words: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every word in every template ('{}' = the word), in order, duplicates dropped."""
    check_templates(templates)
    return list(dict.fromkeys(t.replace("{}", w) for w in words for t in templates))


def paraphrase_attack(candidates: Sequence[str], success: Callable[[list[str]], torch.Tensor],
                      keep: int) -> list[str]:
    """The ``keep`` candidates with the highest success on the attacker's search run.

    ``success(prompts)`` returns one score per prompt (e.g. 1 where the scorer saw the concept);
    ties keep the candidates' order."""
    check_number(keep, "keep", 1, 1_000_000, integer=True)
    cands = list(candidates)
    if not cands:
        raise ValueError("paraphrase attack: no candidate prompts")
    scores = success(cands).float().reshape(-1)
    if scores.numel() != len(cands):
        raise ValueError(f"paraphrase attack: {scores.numel()} scores for {len(cands)} prompts")
    order = sorted(range(len(cands)), key=lambda i: (-float(scores[i]), i))
    return [cands[i] for i in order[:keep]]

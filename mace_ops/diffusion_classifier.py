"""A zero-shot judge from the model itself: which candidate prompt explains an image best.

The diffusion classifier (Li et al. 2023, "Your diffusion model is secretly a zero-shot
classifier"): for an image latent x0 and candidate prompts c_1..c_K, draw S pairs (t, eps), noise
x0 once per pair and ask the denoiser for eps under every candidate; the candidate with the
smallest mean ||eps_hat(x_t, t, c_k) - eps||^2 wins. Every candidate sees the *same* (t, eps)
draws, so the differences between candidates have low variance even with a handful of draws.

Design (``JudgeConfig``):

* **Timesteps in the high-noise part** ([0.5 T, T) by default, stratified: draw j falls in the
  j-th of S equal strata, the strata in a random order per image). Identity and style are decided
  early in sampling; at low noise every candidate predicts the noise almost equally well (t <= 500
  alone was near chance in the toy world).
* **Screening.** With more candidates than ``shortlist``, the first ``screen_draws`` draws go to
  every candidate; only the ``shortlist`` best (plus the ``keep`` positions: the image's own label
  and the anchor) get the remaining draws. Cost per image: K * screen + shortlist * (S - screen)
  forwards instead of K * S.
* **Margin.** ``margin`` = mean error of the best *other* candidate minus the label's (> 0: the
  label wins), with its bootstrap standard error over the draws (resampling the S draws, shared by
  all candidates), and ``p_label``: the fraction of bootstrap resamples in which the label wins. A
  faint leak that loses to the anchor by 1e-3 is then visible as a small margin, not only as a
  miss.

The denoiser is any ``CrossAttentionDenoiser`` whose ``forward_with_attention`` returns the noise
prediction (the toy world's ``ToyDenoiser``; ComfyUI's ``ComfyDenoiser(prediction="eps")``). It is
only read. Candidates are rows of one ``contexts`` tensor; ``table[i, k]`` is the row image i uses
for candidate k, so each image can fill its own prompt template with every candidate.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .validation import check_number, derive_seed


@dataclass(frozen=True)
class JudgeConfig:
    draws: int = 8              # S shared (t, eps) draws per image
    t_low: float = 0.5          # timesteps from [t_low * T, t_high * T)
    t_high: float = 1.0
    shortlist: int = 6          # candidates that get every draw (screening when K is larger)
    screen_draws: int = 2       # draws every candidate gets when screening
    bootstrap: int = 200        # resamples of the draws for p_label and margin_se
    seed: int = 0
    batch: int = 32             # forwards per denoiser call

    def check(self) -> "JudgeConfig":
        check_number(self.draws, "draws", 1, 4096, integer=True)
        check_number(self.t_low, "t_low", 0.0, 1.0)
        check_number(self.t_high, "t_high", 0.0, 1.0)
        if not self.t_low < self.t_high:
            raise ValueError(f"t_low: {self.t_low} must be below t_high {self.t_high}")
        check_number(self.shortlist, "shortlist", 1, 100000, integer=True)
        check_number(self.screen_draws, "screen_draws", 1, self.draws, integer=True)
        check_number(self.bootstrap, "bootstrap", 0, 100000, integer=True)
        check_number(self.batch, "batch", 1, 100000, integer=True)
        return self


@dataclass
class Judgement:
    """Per image (N): the winning candidate position, the label's margin and its uncertainty."""

    labels: torch.Tensor      # (N,) the candidate position each image should show
    winner: torch.Tensor      # (N,) argmin of the mean error among the shortlisted candidates
    margin: torch.Tensor      # (N,) error(best other) - error(label); > 0: the label wins
    margin_se: torch.Tensor   # (N,) bootstrap SE of the margin over the draws
    p_label: torch.Tensor     # (N,) fraction of bootstrap resamples the label wins
    errors: torch.Tensor      # (N, K) mean error per candidate, inf where screened out
    forwards: int             # denoiser forwards spent

    @property
    def recognised(self) -> torch.Tensor:
        return self.winner == self.labels

    def select(self, rows) -> "Judgement":
        """The judgement of some images (an index or slice); ``forwards`` stays the whole run's."""
        return Judgement(self.labels[rows], self.winner[rows], self.margin[rows], self.margin_se[rows],
                         self.p_label[rows], self.errors[rows], self.forwards)


def draws_for(config: JudgeConfig, index: int, shape: Sequence[int], num_timesteps: int):
    """(t (S,), eps (S, *shape)) of image ``index``: stratified timesteps, strata shuffled, fixed by the seed."""
    gen = torch.Generator().manual_seed(derive_seed(config.seed, index))
    s = config.draws
    lo, hi = config.t_low * num_timesteps, config.t_high * num_timesteps
    strata = torch.randperm(s, generator=gen).double()
    u = torch.rand(s, generator=gen, dtype=torch.float64)
    t = (lo + (strata + u) * (hi - lo) / s).floor().long().clamp(0, num_timesteps - 1)
    return t, torch.randn(s, *shape, generator=gen)


def _ignore(_probe) -> None:
    return None


def _run(denoiser, latents, contexts, table, draw, jobs, errors, config, tick):
    """Fill errors[i, j, k] for every job (i, j, k), ``config.batch`` forwards per call; ``draw(i)``
    gives image i's (t, eps)."""
    device = latents.device
    for start in range(0, len(jobs), config.batch):
        chunk = jobs[start: start + config.batch]
        i = torch.tensor([a for a, _, _ in chunk])
        j = torch.tensor([b for _, b, _ in chunk])
        k = torch.tensor([c for _, _, c in chunk])
        noise = torch.stack([draw(a)[1][b] for a, b, _ in chunk]).to(device)
        tt = torch.stack([draw(a)[0][b] for a, b, _ in chunk]).to(device)
        x_t = denoiser.add_noise(latents[i], noise, tt)
        ctx = contexts[table[i, k]].to(device)
        pred = denoiser.forward_with_attention(x_t, tt, ctx, _ignore)
        errors[i, j, k] = (pred.float() - noise.float()).pow(2).flatten(1).mean(1).cpu().double()
        tick(len(chunk))


@torch.no_grad()
def classify(denoiser, latents: torch.Tensor, contexts: torch.Tensor, table: torch.Tensor, labels: torch.Tensor,
             config: JudgeConfig = JudgeConfig(), keep: Sequence[int] = (),
             progress: Optional[Callable[[int, int], None]] = None,
             draw_ids: Optional[Sequence[int]] = None) -> Judgement:
    """Judge every image in ``latents`` (N, ...) among K candidates (``table`` (N, K) rows of ``contexts``).

    ``labels`` (N,): the candidate position each image should show; ``keep``: candidate positions
    never screened out (e.g. the anchor). ``progress(done, total)`` after every denoiser call.
    ``draw_ids`` (N,): image i gets the (t, eps) draws of number ``draw_ids[i]`` (default i); give two
    models' images of one prompt the same number and their verdicts differ only where the images do.
    """
    config.check()
    n, k = table.shape
    if latents.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"latents {tuple(latents.shape)}, table {tuple(table.shape)} and labels "
                         f"{tuple(labels.shape)} disagree on the number of images")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must be candidate positions in [0, {k})")
    if n and (int(table.min()) < 0 or int(table.max()) >= contexts.shape[0]):
        raise ValueError(f"table must index the {contexts.shape[0]} context rows")
    s, T = config.draws, int(denoiser.num_train_timesteps)
    ids = list(range(n)) if draw_ids is None else [int(d) for d in draw_ids]
    if len(ids) != n:
        raise ValueError(f"draw_ids: {len(ids)} numbers for {n} images")
    draw = functools.lru_cache(maxsize=2 * config.batch)(
        lambda i: draws_for(config, ids[i], latents.shape[1:], T))   # jobs run image after image
    errors = torch.full((n, s, k), float("nan"), dtype=torch.float64)
    screening = k > config.shortlist + len(set(keep))
    screen = config.screen_draws if screening else s
    kept_n = min(k, config.shortlist + len(set(keep)) + 1)
    total = n * (screen * k + (s - screen) * kept_n)
    done = [0]

    def tick(m: int) -> None:
        done[0] += m
        if progress is not None:
            progress(min(done[0], total), total)

    jobs = [(i, j, c) for i in range(n) for j in range(screen) for c in range(k)]
    _run(denoiser, latents, contexts, table, draw, jobs, errors, config, tick)
    alive = torch.ones(n, k, dtype=torch.bool)
    if screening:
        order = errors[:, :screen].mean(1).argsort(1)
        alive = torch.zeros(n, k, dtype=torch.bool)
        alive.scatter_(1, order[:, :config.shortlist], True)
        alive[torch.arange(n), labels] = True
        for c in set(keep):
            alive[:, c] = True
        jobs = [(i, j, c) for i in range(n) for j in range(screen, s) for c in alive[i].nonzero().flatten().tolist()]
        _run(denoiser, latents, contexts, table, draw, jobs, errors, config, tick)
    if progress is not None:
        progress(total, total)
    return _verdicts(errors, alive, labels, config, done[0])


def _margin(mean: torch.Tensor, alive: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """error(best other alive) - error(label) per image; ``mean`` and ``alive`` (N, ..., K), ``labels`` (N,)."""
    idx = labels.view(-1, *([1] * (mean.ndim - 1))).expand(*mean.shape[:-1], 1)
    own = mean.gather(-1, idx).squeeze(-1)
    others = mean.masked_fill(~alive, float("inf")).scatter(-1, idx, float("inf"))
    return others.min(-1).values - own


def _verdicts(errors, alive, labels, config: JudgeConfig, forwards: int) -> Judgement:
    n, s, k = errors.shape
    mean = errors.nanmean(1).masked_fill(~alive, float("inf")) if n else torch.zeros(0, k, dtype=torch.float64)
    winner = mean.argmin(1) if n else torch.zeros(0, dtype=torch.long)
    margin = _margin(mean, alive, labels)
    p_label = (margin > 0).double()
    margin_se = torch.full((n,), float("nan"), dtype=torch.float64)
    if config.bootstrap and n:
        gen = torch.Generator().manual_seed(derive_seed(config.seed, 0x5EED))
        idx = torch.randint(0, s, (config.bootstrap, s), generator=gen)
        full = errors.nan_to_num(float("inf"))   # screened-out cells never win
        for a in range(0, n, 16):                # (16, B, S, K) at a time
            rows = slice(a, a + 16)
            boot = full[rows][:, idx].mean(2)
            ok = alive[rows, None].expand_as(boot)
            bm = _margin(boot.masked_fill(~ok, float("inf")), ok, labels[rows])
            p_label[rows] = (bm > 0).double().mean(1)
            finite = bm.masked_fill(~torch.isfinite(bm), float("nan"))
            margin_se[rows] = (finite - finite.nanmean(1, keepdim=True)).pow(2).nansum(1).div(
                torch.isfinite(finite).sum(1).sub(1).clamp_min(1)).sqrt()
    return Judgement(labels.clone(), winner, margin, margin_se, p_label, mean, forwards)

"""Edits of toy world v2's text encoder: a fine-tuned part, the ACE gate compiled into its last MLP.

The pack's methods edit cross-attention K/V, linearly in the encoder's output features. These two
edit the encoder itself, which is nonlinear in the token; the benches measure them against the pack
(``bench.text_encoder_edit``, ``bench.gate_compile``, ``bench.attack``, ``bench.erasure_check``).

``edit_text_encoder`` fits one ``part`` of a copy of the encoder (``PARTS``) to CFR's objective
moved into feature space:

    min_θ  mean_e ||f_θ(e) − f_0(e[concept → anchor])||²  +  β · mean_p ||f_θ(p) − f_0(p)||²
           (+ β_s · mean_s ||f_θ(s) − f_0(s)||²  with synthetic stand-ins s)

e: the erased names' templated prompts; p: what CFR + prior preserves (the preserve list's
prompts, the anchor's, the caption prior); f_0 the shipped encoder; Adam, fixed seeds. The
stand-ins s are the anchor's templates with a drawn embedding in the name slot, for the names
nobody listed: ``synthetic_words`` (N(mu, Sigma) of the named words' token embeddings),
``jittered_words`` (around a named word), ``analogy_inputs`` (r(a) + r(b) − r(c) at the last MLP's
input); ``off_erased`` keeps them off the erased names' neighbourhoods, ``mine`` keeps the ones the
edit moves most. ``low_rank`` cuts an edit to what a LoRA of a given rank carries.

``compile_gate`` calibrates the ACE gate at the last MLP's input (``mace_ops.text_gate``) and writes
it into that MLP as two ramp units per concept: ``replace`` (the MLP's least important units, same
shapes: a plain weight change) or ``add`` (the MLP widened).

``with_text_encoder`` gives the world with an edited encoder; the shipped model is never modified.
Results and what was tried: docs/code-notes.md#toyworldv2text_editpy.
"""
from __future__ import annotations

import copy

import torch

from mace_ops.encoding_cache import cached
from mace_ops.text_gate import TextGateConfig, calibrate_text_gate, compile_text_gate, ramp_units

from ..v1 import diffusion
from ..v1.adapters import ToyMlpSite
from ..v1.evaluate import ToyWorld
from .erase import Task, prior_captions

PARTS = {
    "ff_last": "the last text layer's MLP",
    "ff_last2": "the last two text layers' MLPs",
    "ff_last_in": "the last text layer's MLP, its first (input) layer only",
    "layers": "every text layer + final LayerNorm (not the token table or positions)",
}


def trainable(text_encoder, part: str) -> list[torch.nn.Parameter]:
    n = len(text_encoder.layers)
    last, second = f"layers.{n - 1}.", f"layers.{n - 2}."
    prefixes = {"ff_last": (last + "ff.",), "ff_last2": (second + "ff.", last + "ff."),
                "ff_last_in": (last + "ff.0.",), "layers": ("layers.", "ln_final.")}[part]
    keep = lambda n: n.startswith(prefixes)  # noqa: E731
    return [p for n, p in text_encoder.named_parameters() if keep(n)]


def synthetic_words(world, task: Task, seed: int):
    """A sampler of ``k`` token embeddings from N(mu, Sigma) of the given words' embeddings (erased +
    preserve list: what the user named, no held-out word): stand-ins for names nobody listed."""
    table = world.model.text.tok.weight.detach().double()
    ids = [world.model.vocab.TOKEN_ID[w] for w in task.erase + task.preserve]
    e = table[ids]
    mu, cov = e.mean(0), torch.cov(e.T) + 1e-4 * torch.eye(e.shape[1], dtype=torch.float64)
    chol, gen = torch.linalg.cholesky(cov), torch.Generator().manual_seed(seed + 1)
    return lambda k: (mu + torch.randn(k, e.shape[1], generator=gen, dtype=torch.float64) @ chol.T).float()


def jittered_words(world, task: Task, seed: int, scale: float):
    """A sampler of ``k`` token embeddings drawn around the named words (erased + preserve list): a
    named word's embedding plus N(0, scale² Sigma), Sigma that of the named words (``scale`` 1 is
    ``synthetic_words``' spread, centred on a name instead of on their mean): stand-ins nearer the
    names, where the unnamed ones lie (``exclude`` keeps them off the erased names themselves)."""
    table = world.model.text.tok.weight.detach().double()
    e = table[[world.model.vocab.TOKEN_ID[w] for w in task.erase + task.preserve]]
    cov = torch.cov(e.T) + 1e-4 * torch.eye(e.shape[1], dtype=torch.float64)
    chol, gen = torch.linalg.cholesky(cov), torch.Generator().manual_seed(seed + 3)
    return lambda k: (e[torch.randint(len(e), (k,), generator=gen)]
                      + scale * torch.randn(k, e.shape[1], generator=gen, dtype=torch.float64) @ chol.T).float()


def slot_stand_ins(world, task: Task, words, gen: torch.Generator):
    """A sampler of ``k`` stand-in prompts (token embeddings, template index): one of the anchor's
    templates, drawn by ``gen``, with ``words(k)``'s embedding in the anchor's slot."""
    x_t = diffusion.ids_tensor([t.format(task.anchor) for t in task.templates], world.model.vocab)
    slot = (x_t == world.model.vocab.TOKEN_ID[task.anchor]).int().argmax(1)      # the anchor word's position

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        it = torch.randint(len(x_t), (k,), generator=gen)
        emb = world.model.text.tok(x_t[it]).clone()
        emb[torch.arange(k), slot[it]] = words(k)
        return emb, it
    return draw


def template_features(world, task: Task, words) -> torch.Tensor:
    """The base features of ``words`` in each of the task's templates, (T, words, L·D)."""
    with torch.no_grad():
        f = world.model.text(diffusion.ids_tensor([t.format(w) for w in words for t in task.templates],
                                                  world.model.vocab))
    return f.view(len(words), len(task.templates), -1).transpose(0, 1)


def named_spacing(world, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(the erased names' prompts' base features per template (T, N, L·D), each erased prompt's
    distance to the nearest *other* named word's prompt in the same template (T·N,); erased +
    preserve list, named words only)."""
    n = len(task.erase)
    f = template_features(world, task, list(task.erase) + list(task.preserve))
    d = torch.cdist(f[:, :n], f)                                        # (T, erased, words)
    d[:, torch.arange(n), torch.arange(n)] = float("inf")
    return f[:, :n].contiguous(), d.min(2).values.flatten()


def erased_neighbourhood(world, task: Task, quantile: float):
    """(``named_spacing``'s erased features, radius): the ``quantile`` of the named words' spacing.
    A stand-in nearer an erased name than that is nearer than the named words are to one another:
    preserving it would fight the erasure."""
    f_e, spacing = named_spacing(world, task)
    return f_e, torch.quantile(spacing, quantile).item()


def nearest_erased(f: torch.Tensor, t: torch.Tensor, f_e: torch.Tensor) -> torch.Tensor:
    """Each row of ``f`` (k, L·D): its distance to the nearest erased prompt of its own template
    ``t`` among ``f_e`` (T, N, L·D). In one template the words before the slot give equal features,
    so this is the distance from the slot on."""
    near = torch.empty(len(f))
    for tt in t.unique():
        near[t == tt] = torch.cdist(f[t == tt], f_e[tt]).min(1).values
    return near


def off_erased(draw, base_of, f_e: torch.Tensor, radius: float, tries: int = 50):
    """``draw`` (k -> (inputs, template index)) redrawn until ``k`` stand-ins lie at least ``radius``
    from every erased prompt of their template (base features ``base_of``)."""
    def draw_off(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept, n = [], 0
        for _ in range(tries):
            x, t = draw(2 * k)
            with torch.no_grad():
                far = nearest_erased(base_of(x).flatten(1), t, f_e) >= radius
            kept.append((x[far], t[far]))
            n += int(far.sum())
            if n >= k:
                return tuple(torch.cat(v)[:k] for v in zip(*kept))
        raise RuntimeError(f"fewer than {k} of {tries} x {2 * k} stand-ins lie {radius:.3g} or more from the erased "
                           "names; lower exclude or widen the stand-ins")
    return draw_off


def last_ff_inputs(text, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the last layer's MLP (B, L, dim): what ``ff_last`` acts on (the
    input of that layer's ``ln2``, caught by a hook on the encoder's own forward)."""
    caught = []
    hook = text.layers[-1].ln2.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        text(ids)
    finally:
        hook.remove()
    return caught[0]


def analogy_inputs(world, task: Task, seed: int):
    """A sampler of ``k`` stand-in residuals at the last MLP's input: r(a) + r(b) − r(c), with a from
    the preserve list and b ≠ c any named words (erased + preserve list), in one template: the
    arithmetic that makes "other names" out of the named ones where features add up by attribute
    (``ff_last`` only). ``a`` is a kept word because names' features share most of their length,
    so r(a) + r(b) − r(c) lies near r(a): with an erased ``a`` the stand-in would undo the erasure."""
    words = task.preserve + task.erase
    if len(task.preserve) < 1 or len(words) < 3:
        raise ValueError("stand_ins 'analogy' needs a preserve list and at least 3 named words")
    ids = diffusion.ids_tensor([t.format(w) for w in words for t in task.templates], world.model.vocab)
    with torch.no_grad():
        r = last_ff_inputs(world.model.text, ids).view(len(words), len(task.templates), *ids.shape[1:], -1)
    gen = torch.Generator().manual_seed(seed + 2)

    def draw(k: int) -> torch.Tensor:
        a = torch.randint(len(task.preserve), (k,), generator=gen)
        b = torch.randint(len(words) - 1, (k,), generator=gen)
        b = b + (b >= a).long()                                         # b != a
        c = torch.randint(len(words) - 2, (k,), generator=gen)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        c = c + (c >= lo).long()
        c = c + (c >= hi).long()                                        # c != a, b
        t = torch.randint(len(task.templates), (k,), generator=gen)
        return r[a, t] + r[b, t] - r[c, t], t
    return draw


def edit_text_encoder(world, task: Task, part: str, *, steps: int, beta: float = 1.0, lr: float = 1e-3,
                      batch: int = 512, seed: int = 0, synthetic: int = 0, synthetic_beta: float | None = None,
                      mine: int = 1, stand_ins: str = "gaussian", jitter: float = 1.0, exclude: float = 0.0):
    """A copy of the world's text encoder with ``part`` fitted to the objective above; ``synthetic`` > 0
    adds that many prompts per step to the preservation term whose concept slot holds a
    ``synthetic_words`` embedding (the anchor's templates, the slot's features kept as they were),
    weighted by ``synthetic_beta`` (``beta`` when None). ``mine`` > 1 draws that many times more
    stand-ins each step and keeps the ``synthetic`` the current edit moves most (hard negatives).
    ``stand_ins`` "analogy" draws them as ``analogy_inputs`` instead (part ``ff_last`` only),
    "jitter" as ``jittered_words`` of spread ``jitter``. ``exclude`` > 0 redraws every stand-in
    nearer an erased name (same template, base features) than ``erased_neighbourhood``'s radius at
    that quantile (0 = keep all)."""
    if stand_ins == "analogy" and part != "ff_last":
        raise ValueError(f"stand_ins 'analogy' acts on the last MLP's input: part must be ff_last, not {part!r}")
    beta_s = beta if synthetic_beta is None else synthetic_beta
    vocab = world.model.vocab
    erase_prompts = [t.format(c) for c in task.erase for t in task.templates]   # template index = i % T
    keep_prompts = task.preserve_prompts() + prior_captions(vocab)
    x_e, x_p = (diffusion.ids_tensor(p, vocab) for p in (erase_prompts, keep_prompts))
    x_t = diffusion.ids_tensor([t.format(task.anchor) for t in task.templates], vocab)   # the anchor's, once
    with torch.no_grad():
        y_t, y_p = world.model.text(x_t), world.model.text(x_p)
    text = copy.deepcopy(world.model.text).requires_grad_(False)
    params = trainable(text, part)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    # Stand-ins: draw(k) -> inputs, and the features the base and the edited encoder give them.
    if synthetic and stand_ins == "analogy":    # residuals at the last MLP's input, compared as features
        draw = analogy_inputs(world, task, seed)
        ln2, out, ff0 = text.layers[-1].ln2, text.ln_final, world.model.text.layers[-1].ff   # ln2, out untrained
        base_of = lambda r: out(r + ff0(ln2(r)))                     # noqa: E731
        edited_of = lambda r: out(r + text.layers[-1].ff(ln2(r)))    # noqa: E731
    elif synthetic:                             # the anchor's templates, a drawn embedding in its slot
        words = jittered_words(world, task, seed, jitter) if stand_ins == "jitter" else synthetic_words(world, task, seed)
        draw = slot_stand_ins(world, task, words, gen)
        base_of, edited_of = world.model.text.forward_embeddings, text.forward_embeddings
    if synthetic and exclude > 0:               # stand-ins off the erased names' neighbourhoods
        draw = off_erased(draw, base_of, *erased_neighbourhood(world, task, exclude))
    for _ in range(steps):
        ie, ip = torch.randint(len(x_e), (batch,), generator=gen), torch.randint(len(x_p), (batch,), generator=gen)
        loss = (text(x_e[ie]) - y_t[ie % len(x_t)]).pow(2).mean() + beta * (text(x_p[ip]) - y_p[ip]).pow(2).mean()
        if synthetic:
            x_s = draw(synthetic * mine)[0]
            with torch.no_grad():
                y_s = base_of(x_s)
                if mine > 1:    # the stand-ins the edit moves most so far
                    worst = (edited_of(x_s) - y_s).pow(2).flatten(1).sum(1).topk(synthetic).indices
                    x_s, y_s = x_s[worst], y_s[worst]
            loss = loss + beta_s * (edited_of(x_s) - y_s).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return text.eval().requires_grad_(False)


def low_rank(text, base, rank: int):
    """``text`` with each edited matrix replaced by ``base``'s plus the rank-``rank`` truncated SVD of
    its change (what a LoRA of that rank carries; vectors — biases, norms — kept whole, as a LoRA
    file's ``.diff_b``); ``rank`` 0 returns ``text`` itself."""
    if not rank:
        return text
    out, ref = copy.deepcopy(text), base.state_dict()
    with torch.no_grad():
        for name, p in out.named_parameters():
            delta = p - ref[name]
            if p.dim() == 2 and delta.abs().max() > 0 and rank < min(p.shape):
                u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
                p.copy_(ref[name] + ((u[:, :rank] * sv[:rank]) @ vh[:rank]).to(p.dtype))
    return out


def with_text_encoder(world, text) -> ToyWorld:
    """``world`` with ``text`` as its text encoder (the UNet and probe shared, the world untouched)."""
    model = copy.copy(world.model)          # shares the UNet; only ``text`` differs
    model._modules = dict(world.model._modules, text=text)
    return ToyWorld(model, world.probe, world.metadata, world.probe_metadata)


def slot_positions(world, prompts: list[str], word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids of ``prompts``, the position of ``word`` in each)."""
    ids = diffusion.ids_tensor(prompts, world.model.vocab)
    return ids, (ids == world.model.vocab.TOKEN_ID[word]).int().argmax(1)


def gate_calibration(task: Task, world=None) -> tuple[list[str], list]:
    """(prompts, groups) the gate is calibrated on: the preserve list by name, then the captions
    (``world``'s caption prior; v2's when None)."""
    prompts, groups = task.preserve_groups()
    captions = prior_captions() if world is None else prior_captions(world.model.vocab)
    return prompts + captions, groups + [None] * len(captions)


def compile_gate(world, task: Task, units: str, config: TextGateConfig = TextGateConfig()):
    """(a copy of the text encoder whose last MLP carries the compiled gate, the gate): ``units``
    replace (``mace_ops.text_gate.compile_text_gate``) or add (the same ramp units widen the MLP)."""
    site = ToyMlpSite(world.model)
    prompts, groups = gate_calibration(task, world)
    # calibration and the units' importance read the same prompts: encode them once
    site.inputs = cached(site.inputs, max_prompts=len(prompts) + len(task.templates) * (len(task.erase) + 1))
    gate = calibrate_text_gate(site, task.concepts(), task.templates, task.anchor, prompts, groups, config)
    if units == "replace":
        mlp = compile_text_gate(site, gate, prompts, config.width)   # ValueError where the MLP is too narrow
    else:
        rows, bias, cols = ramp_units(*site.norm(), gate, site.activation, config.width)
        old = site.mlp()
        mlp = {"fc1.weight": torch.cat([old["fc1.weight"], rows]), "fc1.bias": torch.cat([old["fc1.bias"], bias]),
               "fc2.weight": torch.cat([old["fc2.weight"], cols], 1), "fc2.bias": old["fc2.bias"].clone()}
    text = copy.deepcopy(world.model.text)
    ff = text.layers[-1].ff
    with torch.no_grad():
        for i, name in ((0, "fc1"), (2, "fc2")):
            layer = torch.nn.Linear(mlp[f"{name}.weight"].shape[1], mlp[f"{name}.weight"].shape[0])
            layer.weight.copy_(mlp[f"{name}.weight"]), layer.bias.copy_(mlp[f"{name}.bias"])
            ff[i] = layer
    return text.eval().requires_grad_(False), gate

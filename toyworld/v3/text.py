"""Toy world v3's text encoder is pre-trained on its own and then frozen, as CLIP is for SD.

In v1/v2 the text encoder was trained jointly with the UNet, so it kept only what the images
needed — and v2's names collapsed onto their attribute words. A CLIP text encoder is trained
elsewhere (contrastively, on far more than any one image shows) and frozen; a celebrity's name
carries hundreds of facts. v3 copies that: each name has a *profile* of 288 signs, ``[16 glyph bits,
8 colour one-hot, 264 hidden facts]``, and each style one of 48, ``[5 pattern, 4 tone, 39 hidden]``;
nicknames share their name's profile, style synonyms their style's. The encoder (causal, as CLIP)
is trained to regress, at every position, the profile of the name and of the style mentioned so far
(zero for ``someone`` and ``art``; only the colour for "a red person"; no target before a mention):

    min  sum_{b,t} ||D (H_n f_{b,t} - p_n(b, t))||^2 + ||D_s (H_s f_{b,t} - p_s(b, t))||^2

so the name leaks into every later token and into the pads, as in CLIP. ``D`` weights the visible
signs (glyph, colour; pattern, tone) ``VISIBLE_WEIGHT`` times the hidden facts: the encoder must
know what a name looks like exactly and the rest of its profile approximately. The UNet is then trained
on top of the frozen features and can only read the glyph and colour out of them.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from . import vocab

NAME_PROFILE, STYLE_PROFILE = 288, 48
NAME_VISIBLE, STYLE_VISIBLE = 24, 9          # glyph bits + colour; pattern + tone
VISIBLE_WEIGHT = 4.0
PROFILE_SEED = 7


def _profiles():
    gen = torch.Generator().manual_seed(PROFILE_SEED)
    sign = lambda *shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1  # noqa: E731
    bits = torch.tensor([vocab.code_bits(i) for i in range(vocab.N_NAMES)]).float() * 2 - 1
    colour = torch.nn.functional.one_hot(torch.tensor(vocab.COLOR_OF), len(vocab.COLORS)).float() * 2 - 1
    names = torch.cat([bits, colour, sign(vocab.N_NAMES, NAME_PROFILE - 24)], 1)
    look = torch.tensor(vocab.STYLE_LOOK)
    styles = torch.cat([torch.nn.functional.one_hot(look[:, 0], len(vocab.PATTERNS)).float() * 2 - 1,
                        torch.nn.functional.one_hot(look[:, 1], len(vocab.TONES)).float() * 2 - 1,
                        sign(vocab.N_STYLES, STYLE_PROFILE - 9)], 1)
    # attribute captions ("a red person") know only the colour
    colour_only = torch.zeros(len(vocab.COLORS), NAME_PROFILE)
    colour_only[:, 16:24] = torch.eye(len(vocab.COLORS)) * 2 - 1
    return names, styles, colour_only


NAME_PROFILES, STYLE_PROFILES, COLOUR_PROFILES = _profiles()
# target tables: the names, "someone" (zeros: any identity), the 8 colour-only rows, "none yet";
# styles, "art" (zeros), "none yet". A mask table beside each: which signs a row knows.
_NAME_TABLE = torch.cat([NAME_PROFILES, torch.zeros(1, NAME_PROFILE), COLOUR_PROFILES, torch.zeros(1, NAME_PROFILE)])
_NAME_MASK = torch.cat([torch.ones(vocab.N_NAMES + 1, NAME_PROFILE), (COLOUR_PROFILES != 0).float(),
                        torch.zeros(1, NAME_PROFILE)])
_STYLE_TABLE = torch.cat([STYLE_PROFILES, torch.zeros(2, STYLE_PROFILE)])
_STYLE_MASK = torch.cat([torch.ones(vocab.N_STYLES + 1, STYLE_PROFILE), torch.zeros(1, STYLE_PROFILE)])
_SOMEONE, _COLOUR0, _NO_NAME = vocab.N_NAMES, vocab.N_NAMES + 1, vocab.N_NAMES + 1 + len(vocab.COLORS)
_ART, _NO_STYLE = vocab.N_STYLES, vocab.N_STYLES + 1
_NAME_W = torch.ones(NAME_PROFILE)
_NAME_W[:NAME_VISIBLE] = VISIBLE_WEIGHT
_STYLE_W = torch.ones(STYLE_PROFILE)
_STYLE_W[:STYLE_VISIBLE] = VISIBLE_WEIGHT


def caption_targets(captions: list[str]):
    """(name targets (B, L, 288), their mask, style targets (B, L, 48), their mask): at each position,
    the profile of the name / style mentioned at or before it; no target (mask 0) before a mention."""
    L = vocab.CONTEXT_LENGTH
    n_idx, n_pos, s_idx, s_pos = [], [], [], []
    for cap in captions:
        ni, np_, si, sp = _NO_NAME, L, _NO_STYLE, L
        for k, w in enumerate(cap.split()):
            if w in vocab.NAME_INDEX:
                ni, np_ = vocab.NAME_INDEX[w], k + 1          # +1: <sos>
            elif w == vocab.NEUTRAL_NAME:
                ni, np_ = _SOMEONE, k + 1
            elif w in vocab.COLOR_INDEX:
                ni, np_ = _COLOUR0 + vocab.COLOR_INDEX[w], k + 1
            elif w in vocab.STYLE_INDEX:
                si, sp = vocab.STYLE_INDEX[w], k + 1
            elif w == vocab.NEUTRAL_STYLE:
                si, sp = _ART, k + 1
        n_idx.append(ni), n_pos.append(np_), s_idx.append(si), s_pos.append(sp)
    t = torch.arange(L).view(1, L, 1)
    after_n = (t >= torch.tensor(n_pos).view(-1, 1, 1)).float()
    after_s = (t >= torch.tensor(s_pos).view(-1, 1, 1)).float()
    return (_NAME_TABLE[n_idx].unsqueeze(1) * after_n, _NAME_MASK[n_idx].unsqueeze(1) * after_n,
            _STYLE_TABLE[s_idx].unsqueeze(1) * after_s, _STYLE_MASK[s_idx].unsqueeze(1) * after_s)


def profile_loss(heads, f: torch.Tensor, captions: list[str]) -> torch.Tensor:
    tn, mn, ts, ms = caption_targets(captions)
    wn, ws = mn * _NAME_W, ms * _STYLE_W
    return (((heads.name(f) - tn).pow(2) * wn).sum() / wn.sum().clamp_min(1)
            + ((heads.style(f) - ts).pow(2) * ws).sum() / ws.sum().clamp_min(1))


@torch.no_grad()
def init_encoder(text_encoder: nn.Module, seed: int = 0, noise: float = 0.5,
                 kind_scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A start for the profile objective (the objective itself is unchanged): one random orthonormal
    basis of the embedding space splits into a name block R_n (288 rows), a style block R_s (48) and
    two *kind* directions; every name and nickname embedding starts at ``p_n R_n`` + ``kind_scale``
    times the name direction (+ word-specific noise, so a nickname is near its name, not equal),
    every style word likewise, ``someone`` and the colour words on the name direction, ``art`` on the
    style one, the other words at N(0, 1); every residual branch (attention and MLP outputs) at zero.
    Why: a name occurs in ~1 batch of 20, and the pads can only learn to read a name forward once
    names share a direction that attention can find — as token kinds do in a large encoder.
    Returns (R_n, R_s), the profile read-outs' starting point."""
    for layer in text_encoder.layers:
        for lin in (layer.attn.out_proj, layer.ff[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    gen = torch.Generator().manual_seed(seed + 17)
    dim = text_encoder.tok.weight.shape[1]
    Q = torch.linalg.qr(torch.randn(dim, dim, generator=gen)).Q.T                       # orthonormal rows
    R_n, R_s = Q[:NAME_PROFILE], Q[NAME_PROFILE:NAME_PROFILE + STYLE_PROFILE]
    u_name, u_style = Q[NAME_PROFILE + STYLE_PROFILE], Q[NAME_PROFILE + STYLE_PROFILE + 1]
    emb = torch.randn(text_encoder.tok.weight.shape, generator=gen)

    def put(word: str, vec: torch.Tensor) -> None:
        emb[vocab.TOKEN_ID[word]] = vec + noise * torch.randn(dim, generator=gen)

    for i, name in enumerate(vocab.NAMES):
        for w in (name,) + vocab.NICKNAMES[name]:
            put(w, NAME_PROFILES[i] @ R_n + kind_scale * u_name)
    for j, style in enumerate(vocab.STYLES):
        for w in (style, vocab.STYLE_SYNONYMS[style][0]):
            put(w, STYLE_PROFILES[j] @ R_s + kind_scale * u_style)
    put(vocab.NEUTRAL_NAME, kind_scale * u_name)
    put(vocab.NEUTRAL_STYLE, kind_scale * u_style)
    for k, c in enumerate(vocab.COLORS):
        put(c, COLOUR_PROFILES[k] @ R_n + kind_scale * u_name)
    text_encoder.tok.weight.copy_(emb)
    _init_reader(text_encoder.layers[0].attn, R_n, R_s, u_name, u_style)
    return R_n, R_s


@torch.no_grad()
def _init_reader(attn: nn.MultiheadAttention, R_n, R_s, u_name, u_style, sharpness: float = 40.0) -> None:
    """Start the first attention layer as a reader: its heads attend to the last name-kind (style-kind)
    token before them and copy that token's name (style) block forward; trained from there."""
    dim, heads = attn.embed_dim, attn.num_heads
    hd = dim // heads
    W = torch.zeros(3 * dim, dim)
    b = torch.zeros(3 * dim)
    out = torch.zeros(dim, dim)
    blocks = [R_n[i: i + hd] for i in range(0, R_n.shape[0], hd)]           # name heads, then one style head
    if len(blocks) + 1 > heads:
        raise ValueError(f"{heads} heads cannot carry a {R_n.shape[0]}-sign name and a style")
    for h, (rows, kind) in enumerate([(r, u_name) for r in blocks] + [(R_s[:hd], u_style)]):
        b[h * hd] = sharpness                                               # q: constant
        W[dim + h * hd] = kind                                              # k: the token's kind
        W[2 * dim + h * hd: 2 * dim + h * hd + len(rows)] = rows            # v: its name / style block
        out[:, h * hd: h * hd + len(rows)] = rows.T                         # back into the stream
    attn.in_proj_weight.copy_(W)
    attn.in_proj_bias.copy_(b)
    attn.out_proj.weight.copy_(out)


class ProfileHeads(nn.Module):
    """The linear read-outs used only to pre-train the encoder (not part of the shipped model)."""

    def __init__(self, dim: int):
        super().__init__()
        self.name = nn.Linear(dim, NAME_PROFILE)
        self.style = nn.Linear(dim, STYLE_PROFILE)


def pretrain(text_encoder: nn.Module, steps: int, *, batch: int = 64, lr: float = 3e-3, seed: int = 0,
             embedding_lr_scale: float = 3.0, log=print) -> dict:
    """Pre-train ``text_encoder`` in place on the profile objective; returns its fit (``profile_fit``).

    A word occurs in few batches (a name in ~1 of 20), and Adam moves a weight by about ``lr`` per
    step, so the token embeddings learn at ``embedding_lr_scale`` times the rate of the rest."""
    from .data import sample_batch   # captions only; the images are not used

    gen = torch.Generator().manual_seed(seed)
    init_encoder(text_encoder, seed)
    heads = ProfileHeads(text_encoder.ln_final.normalized_shape[0])
    emb = [text_encoder.tok.weight]
    rest = [p for p in list(text_encoder.parameters()) + list(heads.parameters()) if p is not emb[0]]
    opt = torch.optim.AdamW([{"params": emb, "lr": lr * embedding_lr_scale}, {"params": rest, "lr": lr}],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr * embedding_lr_scale, lr], total_steps=steps,
                                                pct_start=0.05)
    text_encoder.train()
    t0 = time.time()
    for step in range(steps):
        caps = sample_batch(batch, gen).captions
        ids = torch.tensor(vocab.batch_ids(caps))
        f = text_encoder(ids)
        loss = profile_loss(heads, f, caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            fit = profile_fit(text_encoder, heads) if step % 200 == 0 and 0 < step < steps - 1 else ""
            log(f"text step {step} loss {loss.item():.4f} min {(time.time() - t0) / 60:.2f} {fit}")
            text_encoder.train()
    text_encoder.eval().requires_grad_(False)
    return profile_fit(text_encoder, heads)


@torch.no_grad()
def profile_fit(text_encoder: nn.Module, heads: ProfileHeads) -> dict:
    """Sign agreement of the read-out with the profile: glyph bits and hidden facts, at the name token
    and at the last pad, for main names and nicknames ("a photo of <w>")."""
    out = {}
    for label, words in (("name", list(vocab.NAMES)),
                         ("nickname", [vocab.NICKNAMES[n][0] for n in vocab.NAMES])):
        caps = [f"a photo of {w}" for w in words]
        f = text_encoder(torch.tensor(vocab.batch_ids(caps)))
        for where, pos in (("token", 4), ("pad", vocab.CONTEXT_LENGTH - 1)):
            pred = heads.name(f[:, pos]).sign()
            agree = pred == NAME_PROFILES
            out[f"{label}_{where}_glyph"] = round(agree[:, :16].all(1).float().mean().item(), 4)
            out[f"{label}_{where}_hidden"] = round(agree[:, 24:].float().mean().item(), 4)
    return out

"""Train toy world v3 and write the shipped weights. Seeded and resumable.

    python -m toyworld.v3.train                          # text encoder, then generator (wall-time budget)
    python -m toyworld.v3.train --probe-only             # the scorer's probe alone (can run beside it)
    python -m toyworld.v3.train --minutes 20 --resume    # continue a run

Two phases, as SD was built: the text encoder is pre-trained on its own objective (``text``:
regress each name's and style's profile, ``--text-steps``) and frozen; then the UNet learns to draw
from its features (v2's recipe: object pixels weighted ``--fg-weight``, noisy steps up to
``--high-noise-weight``, query position embeddings from the start). Writes atomically into
``toyworld/v3/weights/``: ``toyworld_v3.safetensors`` (EMA generator, fp16), ``probe_v3.safetensors``,
``train_log.txt``. The resume state is one safetensors file (``toyworld.train_state``): no pickle.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..train_args import add_training_args
from ..train_log import Logger
from ..v1 import checkpoint, diffusion
from ..v1.evaluate import ToyWorld
from ..v2.train import load_resume_state, save_resume_state
from . import data, evaluate, scorer, text, vocab
from .model import build_model

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, minutes=100.0)
    p.add_argument("--text-steps", type=int, default=1500, help="text-encoder pre-training steps")
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--text-min-glyph", type=float, default=0.95,
                   help="stop before the UNet trains unless this share of names' glyphs reads right at the pads")
    p.add_argument("--text-lr", type=float, default=3e-3)
    p.add_argument("--text-init", type=Path, default=None,
                   help="a pre-trained text encoder (safetensors state dict) instead of pre-training one")
    p.add_argument("--fg-weight", type=float, default=5.0)
    p.add_argument("--high-noise-weight", type=float, default=10.0)
    p.add_argument("--probe-steps", type=int, default=800)
    p.add_argument("--probe-only", action="store_true", help="train only the probe, then stop")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between evaluations/checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=evaluate.WEIGHTS_DIR)
    p.add_argument("--state", type=Path, default=ROOT / "out" / "toyworld_v3_state.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from these generator weights (an EMA file, text encoder included) with a fresh "
                        "optimiser, e.g. the shipped ones when the resume state is gone")
    p.add_argument("--note", default="", help="free text stored in the weights' metadata")
    return p.parse_args(argv)


@torch.no_grad()
def quick_eval(model, probe_path: Path, n_names: int = 100) -> str:
    if not probe_path.is_file():
        return "(no probe yet)"
    world = ToyWorld(model, evaluate.load_probe(probe_path))
    names = list(vocab.NAMES[:: len(vocab.NAMES) // n_names])
    main = evaluate.score_set(world, evaluate.name_prompts(names, 1, seed=11))
    nick = evaluate.score_set(world, evaluate.name_prompts(names, 1, seed=12, nicknames=True))
    sty = evaluate.score_set(world, evaluate.style_prompts(list(vocab.STYLES), 3, seed=13))
    return (f"identity {main.identity_acc:.3f} nickname {nick.identity_acc:.3f} style {sty.style_acc:.3f} "
            f"integrity {main.integrity:.3f} (n {main.n}/{nick.n}/{sty.n})")


def train_probe(args, log) -> None:
    t0 = time.time()
    probe = scorer.train_probe(steps=args.probe_steps, seed=args.seed + 1, log=log)
    acc = scorer.probe_accuracy(probe)
    acc_aug = scorer.probe_accuracy(probe, augmented=True)
    log(f"probe trained in {time.time() - t0:.1f}s; held-out ground truth {acc}; augmented {acc_aug}")
    checkpoint.save_state_dict(probe.state_dict(), args.out / evaluate.PROBE_FILE, {
        "seed": args.seed + 1, "steps": args.probe_steps, "data_version": data.DATA_VERSION,
        "torch_version": torch.__version__, "format": "toyworld-v3-probe",
        **{f"gt_acc_{k}": f"{v:.4f}" for k, v in acc.items() if k != "n"}, "gt_n": acc["n"]})
    log(f"wrote {args.out / evaluate.PROBE_FILE}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Logger(args.out / ("probe_log.txt" if args.probe_only else "train_log.txt"))
    log(f"args {vars(args)} torch {torch.__version__} data {data.DATA_VERSION} vocab {vocab.VOCAB_SIZE}")
    if args.probe_only:
        train_probe(args, log)
        return

    torch.manual_seed(args.seed)
    model = build_model()
    ema = build_model().requires_grad_(False)
    text_fit = {}
    if args.resume:   # the text encoder comes with the state; its fit with the last weights written
        if (args.out / evaluate.GENERATOR_FILE).is_file():
            _, meta = checkpoint.load_state_dict(args.out / evaluate.GENERATOR_FILE, "v3 generator")
            text_fit = {k[len("text_fit_"):]: v for k, v in meta.items() if k.startswith("text_fit_")}
            args.text_steps = int(meta.get("text_steps", args.text_steps))   # the encoder's, not today's default
    elif args.init_from is not None:
        sd, meta = checkpoint.load_state_dict(args.init_from, "initial v3 generator weights")
        model.load_state_dict(sd)
        text_fit = {k[len("text_fit_"):]: v for k, v in meta.items() if k.startswith("text_fit_")}
        args.text_steps = int(meta.get("text_steps", args.text_steps))
        log(f"initialised from {args.init_from} (step {meta.get('steps')}, text encoder included)")
    elif args.text_init is not None:
        sd, _ = checkpoint.load_state_dict(args.text_init, "pre-trained v3 text encoder")
        model.text.load_state_dict(sd)
        log(f"text encoder from {args.text_init}")
    else:
        text_fit = text.pretrain(model.text, args.text_steps, batch=args.text_batch, lr=args.text_lr,
                                 seed=args.seed, log=log)
        log(f"text encoder pre-trained: {text_fit}")
        if min(text_fit["name_pad_glyph"], text_fit["nickname_pad_glyph"]) < args.text_min_glyph:
            raise SystemExit(f"text encoder fit {text_fit} below --text-min-glyph {args.text_min_glyph}: "
                             "more --text-steps before training a UNet on it")
    model.text.eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if args.resume:
        step, elapsed = load_resume_state(args.state, model, ema, opt, gen)
        model.text.eval().requires_grad_(False)
        log(f"resumed from {args.state} at step {step}, {elapsed / 60:.1f} min")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"generator parameters {n_params} (unet {sum(p.numel() for p in model.unet.parameters())})")
    t_start = time.time() - elapsed
    last_eval = time.time()
    loss_avg = None
    probe_path = args.out / evaluate.PROBE_FILE

    def save(final: bool) -> None:
        meta = {"seed": args.seed, "steps": step, "minutes": f"{(time.time() - t_start) / 60:.2f}",
                "data_version": data.DATA_VERSION, "torch_version": torch.__version__, "ema_decay": args.ema,
                "batch": args.batch, "lr": args.lr, "params": n_params, "format": "toyworld-v3-t2i",
                "vocab_size": vocab.VOCAB_SIZE, "fg_weight": args.fg_weight, "text_steps": args.text_steps,
                "high_noise_weight": args.high_noise_weight, "final": final, "note": args.note,
                **{f"text_fit_{k}": v for k, v in text_fit.items()}}
        checkpoint.save_state_dict(ema.state_dict(), args.out / evaluate.GENERATOR_FILE, meta)
        save_resume_state(args.state, model, ema, opt, gen, step, time.time() - t_start)

    def done() -> bool:
        return step >= args.steps if args.steps is not None else time.time() - t_start >= args.minutes * 60

    model.unet.train()
    while not done():
        batch = data.sample_batch(args.batch, gen)
        with torch.no_grad():
            ctx = model.encode_text(diffusion.ids_tensor(batch.captions, vocab))
        t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (args.batch,), generator=gen)
        noise = torch.randn(batch.images.shape, generator=gen)
        pred = model(diffusion.add_noise(batch.images, noise, t), t, ctx)
        weight = 1.0 + (args.fg_weight - 1.0) * batch.masks.float()
        if args.high_noise_weight > 1.0:
            ab = diffusion.ALPHA_BAR[t]
            weight = weight * ((1 - ab) / ab).clamp(1.0, args.high_noise_weight).view(-1, 1, 1, 1)
        loss = ((pred - noise).pow(2) * weight).mean() / weight.mean()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.unet.parameters(), model.unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"training diverged at step {step} (loss {loss.item()})")
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} loss_avg {loss_avg:.4f} min {(time.time() - t_start) / 60:.2f}")
        if time.time() - last_eval >= args.eval_every * 60 and not done():
            save(final=False)
            log(f"eval step {step}: {quick_eval(ema, probe_path)}")
            last_eval = time.time()
            model.unet.train()
    save(final=True)
    log(f"final step {step} minutes {(time.time() - t_start) / 60:.2f}: {quick_eval(ema, probe_path)}")
    log(f"wrote {args.out / evaluate.GENERATOR_FILE}")


if __name__ == "__main__":
    main()

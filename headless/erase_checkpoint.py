"""``scripts/mace_demo.py --checkpoint``: erase concepts from a real SD checkpoint through
ComfyUI and write the erasure file that stock LoRA loaders read.

It loads the checkpoint with ComfyUI's ``comfy.sd.load_checkpoint_guess_config``, runs the
pack's CFR node (``MaceRefineCrossAttention.execute``, the same code the ComfyUI node runs) and
saves the change with ``mace_ops.erasure_file.save_erasure`` to ``<out>/<name>.safetensors``.
Load it in ComfyUI with ``LoraLoaderModelOnly`` (strength 1) or ``MACE Load Erasure``.

``args`` (argparse namespace): ``checkpoint`` (a file, or a name in ComfyUI's checkpoints
folders), ``concepts`` (one concept per line or ``;``-separated, synonyms comma-separated),
``type`` (object / person / style), ``lamb`` and ``preserve_scale`` (None: the node's
defaults), ``out`` (folder); optional ``anchor`` (None: the type's default), ``preserve``,
``name``, ``dtype``, ``comfyui`` (checkout path; else $COMFYUI_PATH / ~/ComfyUI).
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import time
from pathlib import Path

from .bootstrap import ComfyUINotFound, bootstrap, set_progress_server

NODE_DEFAULT_LAMBDA = 1.0
NODE_DEFAULT_PRESERVE_SCALE = 1.0


class _PrintProgress:
    """Receives the progress hook's messages while the CFR node runs outside the executor."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self, label: str) -> None:
        self.label = label

    def send_sync(self, event, data, sid=None):
        if event == "progress" and data.get("max"):
            print(f"  {self.label}: {data['value']}/{data['max']}", file=sys.stderr, flush=True)


def concept_text(concepts: str) -> str:
    """Command-line concepts: ``;`` also separates concepts (newlines are awkward in a shell)."""
    return "\n".join(part.strip() for part in str(concepts).replace(";", "\n").splitlines())


def erasure_name(concepts_text: str, parse_concepts) -> str:
    names = [c.name for c in parse_concepts(concepts_text, "concepts")]
    slug = re.sub(r"[^a-z0-9]+", "_", "_".join(names).lower()).strip("_")[:60].rstrip("_")
    return f"mace_{slug or 'erasure'}"


def _resolve_checkpoint(name: str, folder_paths) -> str:
    p = Path(name).expanduser()
    if p.is_file():
        return str(p.resolve())
    full = folder_paths.get_full_path("checkpoints", name)
    if full is None:
        raise FileNotFoundError(f"--checkpoint {name!r}: not a file, and not found in ComfyUI's "
                                f"checkpoints folders ({', '.join(folder_paths.get_folder_paths('checkpoints'))})")
    return full


def erase_checkpoint(args) -> Path:
    """Run the erasure; returns the written file.  Exits 2 with one message when ComfyUI
    cannot be found."""
    try:
        env = bootstrap(getattr(args, "comfyui", None), custom_nodes="pack",
                        verbose=bool(getattr(args, "verbose", False)))
    except ComfyUINotFound as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2)
    pack = env.pack_module_name
    cfr_node = importlib.import_module(f"{pack}.nodes.cfr_node")
    comfy_model = importlib.import_module(f"{pack}.nodes.comfy_model")
    templates = importlib.import_module(f"{pack}.mace_ops.templates")
    concepts_mod = importlib.import_module(f"{pack}.mace_ops.concepts")
    erasure_file = importlib.import_module(f"{pack}.mace_ops.erasure_file")

    import comfy.sd
    import folder_paths

    concept_type = args.type
    if concept_type not in templates.DEFAULT_ANCHORS:
        raise SystemExit(f"--type {concept_type!r}: choose one of {sorted(templates.DEFAULT_ANCHORS)}")
    concepts = concept_text(args.concepts)
    name = getattr(args, "name", None) or erasure_name(concepts, concepts_mod.parse_concepts)
    anchor = getattr(args, "anchor", None)
    anchor = templates.DEFAULT_ANCHORS[concept_type] if anchor is None else anchor
    lamb = NODE_DEFAULT_LAMBDA if args.lamb is None else float(args.lamb)
    preserve_scale = (NODE_DEFAULT_PRESERVE_SCALE if args.preserve_scale is None
                      else float(args.preserve_scale))
    preserve = getattr(args, "preserve", None) or ""
    dtype = getattr(args, "dtype", None) or "fp16"

    ckpt = _resolve_checkpoint(args.checkpoint, folder_paths)
    print(f"ComfyUI {env.version} at {env.comfy_root} (device: {env.device})")
    print(f"loading {ckpt}")
    t0 = time.perf_counter()
    loaded = comfy.sd.load_checkpoint_guess_config(
        ckpt, output_vae=False, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    model, clip = loaded[0], loaded[1]
    if model is None or clip is None:
        raise SystemExit(f"{ckpt}: no UNet/text encoder found; MACE needs a full SD checkpoint")
    print(f"loaded in {time.perf_counter() - t0:.1f}s; erasing {concepts!r} ({concept_type}, "
          f"anchor {anchor!r}, lambda {lamb}, preserve_scale {preserve_scale})")

    set_progress_server(_PrintProgress("CFR"))
    try:
        out = cfr_node.MaceRefineCrossAttention.execute(
            model, clip, concepts, concept_type, anchor, preserve, lamb, preserve_scale, True)
    finally:
        set_progress_server(None)
    erased, summary = out.args[0], out.args[1]
    record = comfy_model.get_record(erased)
    if record is None:  # the node always attaches one
        raise RuntimeError("the CFR node returned a model without a MACE erasure record")

    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"{name}.safetensors"
    info = {"stages": list(record.stages), "base_checkpoint": os.path.basename(ckpt)}
    erasure_file.save_erasure(str(path), record.deltas, record.base_fingerprint, info, dtype)
    size = path.stat().st_size
    print(summary)
    print(f"wrote {path} ({len(record.deltas)} weight deltas, {dtype}, {size / 2**20:.1f} MiB); "
          f"in ComfyUI: put it in models/loras and use LoraLoaderModelOnly (strength 1) or "
          f"MACE Load Erasure on the same base checkpoint")
    return path

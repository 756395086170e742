"""``python <pack> technique --config cfg.json|yaml``: the eval-learn / eval-unlearn "mace" technique
config, run headless through ComfyUI's executor on a checkpoint.

Schema (the harness's, plus our own keys for the full pipeline)::

    {"output_dir": "results/mace_nudity", "seed": 2024,
     "technique": {"name": "mace", "config": {
         "erase_concept": ["nudity", "naked"],   # str or list of synonyms (one concept)
         "erase_from": "person",                 # str or list; null/"" = everywhere
         "lambda_cfr": 0.1, "save_path": "unet.pt", "load_path": null,
         "num_inference_steps": 50, "guidance_scale": 7.5, "use_fp16": true, "device": "cuda",
         "checkpoint": "sd-v1-4.safetensors",    # ours (required): file, or name in ComfyUI's checkpoints
         "stages": "cfr"}},                      # ours: "cfr" (the harness's MACE) or "mace" (full)
     "metrics": [...]}                           # the harness runs metrics; ignored here

Our own keys: see ``OWN_KEYS``. ``load_path`` skips the erasure and applies the .pt's K/V (see
``nodes/unet_pt.py``); ``save_path`` writes the diffusers-key UNet .pt and, next to it,
``<stem>.safetensors``, our erasure file.

Paths follow the nodes' file policy (``mace_ops.safe_paths``): ``output_dir`` is ComfyUI's output
folder for the run, and ``save_path`` is a name relative to it (.pt/.pth/.bin; absolute paths,
'..', '~' and symlinks leading out are refused). ``load_path`` (like ``checkpoint``) is a file the
operator names on their own machine, relative to the working directory; the run makes its folder
ComfyUI's input folder and the Load node reads it by name under the same policy. The erasure file is also written to ``output_dir``
together with ``technique_run.json`` (the resolved config, the files and the node summaries).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

TOP_KEYS = {"output_dir", "seed", "technique", "metrics", "metric"}
NUM = (int, float)

# key: (accepted types, default, help)
HARNESS_KEYS: dict[str, tuple[tuple, Any, str]] = {
    "erase_concept": ((str, list), None, "str or list of synonyms"),
    "erase_from": ((str, list, type(None)), None, "str, list of str or null"),
    "lambda_cfr": (NUM, 0.1, "number > 0"),
    "load_path": ((str, type(None)), None, "path of a .pt or null"),
    "save_path": ((str, type(None)), None, "name of a .pt relative to output_dir, or null"),
    "num_inference_steps": ((int,), 50, "int >= 1"),
    "guidance_scale": (NUM, 7.5, "number"),
    "use_fp16": ((bool,), True, "true/false"),
    "device": ((str,), "cuda", "'cuda', 'cuda:N', 'cpu', 'mps' or 'auto'"),
}
OWN_KEYS: dict[str, tuple[tuple, Any, str]] = {
    "checkpoint": ((str,), None, "checkpoint file or name in ComfyUI's checkpoints folders"),
    "stages": ((str,), "cfr", "'cfr' or 'mace' (CFR -> LoRA per concept -> fusion)"),
    "concept_type": ((str,), "object", "'object', 'person' or 'style'"),
    "anchor": ((str,), "", "what the concept becomes; '' = neutral (the harness's default)"),
    "preserve": ((str, list), [], "str or list of concepts to keep"),
    "preserve_scale": (NUM, 1.0, "number >= 0"),
    "builtin_preserve": ((bool,), True, "true/false"),
    "erase_concept_tokens": ((bool,), True, "true/false (CFR stage only)"),
    "lora_steps": ((int,), 0, "int >= 0 (0 = default for the type)"),
    "lora_lr": (NUM, 0.0, "number >= 0 (0 = default for the type)"),
    "images_per_concept": ((int,), 8, "int >= 1"),
    "image_size": ((int,), 512, "int, multiple of 64"),
    "fusion_lambda": (NUM, 1e-3, "number >= 0"),
    "run_name": ((str,), "technique", "name of the LoRA folder (stages 'mace')"),
}
ALL_KEYS = {**HARNESS_KEYS, **OWN_KEYS}

# Numbers are checked by the nodes' own validator (mace_ops.validation.check_number) with the range of
# the node input each key becomes (a test compares these with the node schemas), before ComfyUI starts.
# key: (node id, input id, min, max, whole number, min excluded)
NODE_RANGES: dict[str, tuple[str, str, float | None, float | None, bool, bool]] = {
    "lambda_cfr": ("MaceRefineCrossAttention", "lambda_", 0.0, 1e6, False, True),
    "preserve_scale": ("MaceRefineCrossAttention", "preserve_scale", 0.0, 1e6, False, False),
    "fusion_lambda": ("MaceMassErase", "fusion_lambda", 0.0, 1e6, False, False),
    "lora_lr": ("MaceMassErase", "lora_lr", 0.0, 1.0, False, False),
    "lora_steps": ("MaceMassErase", "lora_steps", 0, 10000, True, False),
    "images_per_concept": ("MaceMassErase", "images_per_concept", 1, 64, True, False),
    "image_size": ("MaceMassErase", "image_size", 64, 2048, True, False),
    "num_inference_steps": ("MaceMassErase", "sampling_steps", 1, 200, True, False),
    "guidance_scale": ("", "", None, None, False, False),  # recorded only: any finite number
}
SEED_RANGE = ("MaceMassErase", "seed", 0, 2**64 - 1)


try:
    from ..mace_ops.concepts import check_disjoint, parse_concepts, require_concepts
    from ..mace_ops.safe_paths import PT_EXTENSIONS, resolve_write_pair
    from ..mace_ops.scope import parse_erase_from
    from ..mace_ops.validation import check_number
except ImportError:  # headless imported as a top-level package (tests, scripts)
    from mace_ops.concepts import check_disjoint, parse_concepts, require_concepts
    from mace_ops.safe_paths import PT_EXTENSIONS, resolve_write_pair
    from mace_ops.scope import parse_erase_from
    from mace_ops.validation import check_number


class ConfigError(ValueError):
    """The config is invalid; the message lists every problem."""


@dataclass
class TechniqueConfig:
    output_dir: str
    seed: int
    options: dict[str, Any]
    config_path: str = ""
    notes: list[str] = field(default_factory=list)

    def __getattr__(self, name):  # options as attributes
        try:
            return self.__dict__["options"][name]
        except KeyError:
            raise AttributeError(name) from None


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: PyYAML is not installed; use a .json config or pip install pyyaml") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'output_dir', 'seed' and 'technique'")
    return data


def _type_name(types) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in types}))


def _is(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # true is not a number here
    return isinstance(value, types)


def _str_list(value, where: str, problems: list[str], allow_empty: bool = False) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        problems.append(f"{where}: every item must be a string, got {bad[0]!r}")
        return []
    items = [" ".join(v.split()) for v in items if v.strip()]
    if not items and not allow_empty:
        problems.append(f"{where}: must not be empty")
    return items


def validate_config(data: Mapping, base_dir: str = ".", check_files: bool = True) -> TechniqueConfig:
    """Check a loaded config; raise ConfigError listing every problem (unknown keys named)."""
    problems: list[str] = []
    notes: list[str] = []
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s): {', '.join(unknown)} (allowed: {', '.join(sorted(TOP_KEYS))})")
    tech = data.get("technique")
    if not isinstance(tech, Mapping):
        raise ConfigError("\n".join(problems + ["'technique' must be a mapping {\"name\": \"mace\", \"config\": {...}}"]))
    bad_t = sorted(set(tech) - {"name", "config"})
    if bad_t:
        problems.append(f"unknown key(s) in 'technique': {', '.join(bad_t)} (allowed: name, config)")
    if tech.get("name") != "mace":
        problems.append(f"technique.name: {tech.get('name')!r}; this runner implements 'mace' only")
    cfg = tech.get("config", {})
    if not isinstance(cfg, Mapping):
        raise ConfigError("\n".join(problems + ["technique.config must be a mapping"]))
    unknown = sorted(set(cfg) - set(ALL_KEYS))
    if unknown:
        problems.append(f"unknown key(s) in technique.config: {', '.join(unknown)} "
                        f"(harness keys: {', '.join(HARNESS_KEYS)}; ours: {', '.join(OWN_KEYS)})")
    if "metrics" in data or "metric" in data:
        notes.append("'metrics'/'metric' are run by the harness (eval-unlearn), not here; ignored")

    opts: dict[str, Any] = {}
    for key, (types, default, what) in ALL_KEYS.items():
        if key in cfg:
            value = cfg[key]
            if not _is(value, types):
                problems.append(f"technique.config.{key}: expected {what} ({_type_name(types)}), "
                                f"got {type(value).__name__} {value!r}")
                value = default
        else:
            value = default
        opts[key] = value

    output_dir = data.get("output_dir", "results")
    if not isinstance(output_dir, str) or not output_dir.strip():
        problems.append(f"output_dir: expected a non-empty string, got {output_dir!r}")
        output_dir = "results"
    out = os.path.abspath(os.path.join(base_dir, os.path.expanduser(output_dir)))
    seed = data.get("seed", 2024)
    try:
        seed = check_number(seed, "seed", SEED_RANGE[2], SEED_RANGE[3], integer=True)
    except ValueError as exc:
        problems.append(str(exc))
        seed = 2024

    for key, (_node, _input, lo, hi, integer, lo_open) in NODE_RANGES.items():
        try:
            opts[key] = check_number(opts[key], f"technique.config.{key}", lo, hi, integer=integer, lo_open=lo_open)
        except ValueError as exc:
            problems.append(str(exc))
            opts[key] = ALL_KEYS[key][1]
    if opts["image_size"] % 64:
        problems.append(f"technique.config.image_size: a multiple of 64, got {opts['image_size']}")
    if opts["stages"] not in ("cfr", "mace"):
        problems.append(f"technique.config.stages: {opts['stages']!r}; choose 'cfr' or 'mace'")
    if opts["concept_type"] not in ("object", "person", "style"):
        problems.append(f"technique.config.concept_type: {opts['concept_type']!r}; choose object, person or style")
    dev = opts["device"]
    if not (dev in ("cuda", "cpu", "mps", "auto") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        problems.append(f"technique.config.device: {dev!r}; choose 'cuda', 'cuda:N', 'cpu', 'mps' or 'auto'")

    _pt_paths(opts, out, base_dir, check_files, problems)
    if opts["load_path"] is None:
        if "erase_concept" not in cfg:
            problems.append("technique.config.erase_concept: required (str or list of synonyms) unless load_path is given")
        opts["erase_concept"] = _str_list(opts["erase_concept"], "technique.config.erase_concept", problems)
    else:
        opts["erase_concept"] = _str_list(opts["erase_concept"], "technique.config.erase_concept", problems, True)
    if any("," in c for c in opts["erase_concept"]):
        problems.append("technique.config.erase_concept: a phrase contains ','; give synonyms as a list")
    opts["preserve"] = _str_list(opts["preserve"], "technique.config.preserve", problems, True)
    _check_phrases(opts, problems)
    if isinstance(opts["erase_from"], (str, list)):
        try:
            opts["erase_from"] = list(parse_erase_from(opts["erase_from"]))
        except ValueError as exc:
            problems.append(f"technique.config.{exc}")

    ckpt = opts["checkpoint"]
    if not ckpt:
        problems.append("technique.config.checkpoint: required: the SD checkpoint to erase from (a file, or a "
                        "name in ComfyUI's checkpoints folders); the harness's fixed model_id "
                        "CompVis/stable-diffusion-v1-4 corresponds to sd-v1-4.ckpt/.safetensors")
    else:
        p = os.path.abspath(os.path.join(base_dir, os.path.expanduser(ckpt)))
        if os.path.isfile(p):
            opts["checkpoint"] = p
        elif check_files and (os.sep in ckpt or ckpt.startswith(".")):
            problems.append(f"technique.config.checkpoint: {p} not found")
    if problems:
        raise ConfigError("invalid technique config:\n  " + "\n  ".join(problems))
    return TechniqueConfig(out, seed, opts, notes=notes)


def _escape(phrase: str) -> str:
    """A config phrase as concept-list text: '#' literal (the lists' comment character)."""
    return phrase.replace("#", "\\#")


def _check_phrases(opts: dict, problems: list[str]) -> None:
    """The phrases through the nodes' own concept parser (invisible-only, duplicates, erased and kept)."""
    try:
        erase = parse_concepts(", ".join(map(_escape, opts["erase_concept"])), "technique.config.erase_concept")
        if opts["load_path"] is None and opts["erase_concept"]:
            require_concepts(erase, "technique.config.erase_concept")
        keep = parse_concepts("\n".join(map(_escape, opts["preserve"])), "technique.config.preserve", allow_anchor=False)
        check_disjoint(erase, keep, "technique.config.erase_concept", "technique.config.preserve")
    except ValueError as exc:
        problems.append(str(exc))


def _pt_paths(opts: dict, output_dir: str, base_dir: str, check_files: bool, problems: list[str]) -> None:
    """save_path: a name relative to output_dir (the run's output folder), by the nodes' write policy;
    load_path: the operator's .pt, made absolute (its folder is the run's input folder)."""
    target = None
    if isinstance(opts["save_path"], str) and opts["save_path"].strip():
        try:
            target, _side = resolve_write_pair(opts["save_path"], ("output_dir", output_dir), "technique.config.save_path",
                                               PT_EXTENSIONS, ".safetensors", "unet/mace.pt")
            opts["save_path"] = opts["save_path"].strip()
        except ValueError as exc:
            problems.append(str(exc))
            opts["save_path"] = None
    else:
        opts["save_path"] = None
    load = opts["load_path"]
    if not (isinstance(load, str) and load.strip()):
        opts["load_path"] = None
        return
    path = os.path.realpath(os.path.join(base_dir, os.path.expanduser(load.strip())))
    opts["load_path"] = path
    if not path.lower().endswith(PT_EXTENSIONS):
        problems.append(f"technique.config.load_path: {load!r} must end with {' or '.join(PT_EXTENSIONS)}")
    elif check_files and not os.path.isfile(path):
        problems.append(f"technique.config.load_path: {load!r} not found")
    if target is not None and path == target:
        problems.append(f"technique.config: load_path and save_path are the same file ({load!r}); saving would "
                        "overwrite the weights being loaded. Use two paths")


def build_prompt(tc: TechniqueConfig, ckpt_name: str) -> dict:
    """The API prompt: checkpoint -> (load .pt | CFR | Mass Erase) -> save erasure (+ save .pt)."""
    o = tc.options
    dtype = "fp16" if o["use_fp16"] else "fp32"
    prompt: dict[str, dict] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
    }
    concept = ", ".join(map(_escape, o["erase_concept"]))
    preserve = "\n".join(map(_escape, o["preserve"]))
    erase_from = ", ".join(o["erase_from"] or [])
    if o["load_path"]:
        prompt["erase"] = {"class_type": "MaceLoadUNetPt",  # its folder is the run's input folder
                           "inputs": {"model": ["ckpt", 0], "path": os.path.basename(o["load_path"])}}
    elif o["stages"] == "cfr":
        prompt["erase"] = {"class_type": "MaceRefineCrossAttention", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "concepts": concept, "concept_type": o["concept_type"],
            "anchor": o["anchor"], "preserve": preserve, "lambda_": float(o["lambda_cfr"]),
            "preserve_scale": float(o["preserve_scale"]), "builtin_preserve": o["builtin_preserve"],
            "erase_concept_tokens": o["erase_concept_tokens"], "erase_from": erase_from}}
    else:
        prompt["erase"] = {"class_type": "MaceMassErase", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "concepts": concept, "concept_file": "",
            "concept_type": o["concept_type"], "anchor": o["anchor"], "preserve": preserve,
            "builtin_preserve": o["builtin_preserve"], "run_name": o["run_name"],
            "cfr_lambda": float(o["lambda_cfr"]), "preserve_scale": float(o["preserve_scale"]),
            "lora_steps": o["lora_steps"], "lora_lr": float(o["lora_lr"]),
            "images_per_concept": o["images_per_concept"], "image_size": o["image_size"],
            "sampling_steps": o["num_inference_steps"], "seed": tc.seed,
            "fusion_lambda": float(o["fusion_lambda"]), "erase_from": erase_from}}
    prompt["save"] = {"class_type": "MaceSaveErasure",
                      "inputs": {"model": ["erase", 0], "filename_prefix": "mace_erasure", "dtype": dtype}}
    if o["save_path"]:
        prompt["save_pt"] = {"class_type": "MaceSaveUNetPt",
                             "inputs": {"model": ["erase", 0], "path": o["save_path"], "dtype": dtype}}
    return prompt


def _ui_text(history: Mapping, node: str) -> list[str]:
    ui = (history.get("outputs") or {}).get(node) or {}
    return [t for t in ui.get("text", []) if isinstance(t, str)]


def run_technique(tc: TechniqueConfig, comfyui=None, quiet: bool = False, custom_nodes: str = "pack",
                  verbose: bool = False) -> dict:
    """Bootstrap ComfyUI (or reuse it), run the prompt through its executor, write technique_run.json.
    Raises ConfigError for a missing checkpoint, RuntimeError when the run fails."""
    from . import bootstrap as _bootstrap
    from .runner import run_prompt

    o = tc.options
    extra = {}
    ckpt = o["checkpoint"]
    if os.path.isfile(ckpt):
        extra["checkpoints"] = [os.path.dirname(ckpt)]
    cpu = True if o["device"] == "cpu" else None
    env = _bootstrap.bootstrap(comfyui, extra_model_dirs=extra, custom_nodes=custom_nodes, cpu=cpu,
                               verbose=verbose)
    fp = env.folder_paths
    name = os.path.basename(ckpt) if os.path.isfile(ckpt) else ckpt
    if fp.get_full_path("checkpoints", name) is None:
        raise ConfigError(f"technique.config.checkpoint: {ckpt!r} is not a file and not in ComfyUI's checkpoints "
                          f"folders ({', '.join(fp.get_folder_paths('checkpoints'))})")
    if o["device"].startswith("cuda") and "cuda" not in str(env.device):
        tc.notes.append(f"device {o['device']!r} asked for, ComfyUI runs on {env.device}")
    for note in tc.notes:
        print(f"note: {note}", file=sys.stderr)
    os.makedirs(tc.output_dir, exist_ok=True)
    previous_out, previous_in = fp.get_output_directory(), fp.get_input_directory()
    fp.set_output_directory(tc.output_dir)
    if o["load_path"]:  # the operator's .pt: its folder is ComfyUI's input folder for this run
        fp.set_input_directory(os.path.dirname(o["load_path"]))
    prompt = build_prompt(tc, name)
    t0 = time.perf_counter()
    try:
        res = run_prompt(prompt, quiet=quiet)
    finally:
        fp.set_output_directory(previous_out)
        fp.set_input_directory(previous_in)
    if not res.success:
        raise RuntimeError(f"technique run failed after {res.seconds:.1f}s: "
                           f"{res.error if verbose else res.error_summary}")
    report = {
        "technique": "mace", "implementation": "comfyui-mace", "comfyui": env.version, "device": env.device,
        "checkpoint": fp.get_full_path("checkpoints", name), "seed": tc.seed,
        "config": {k: v for k, v in o.items()}, "seconds": round(time.perf_counter() - t0, 2),
        "erasure_file": (_ui_text(res.history, "save") or [None])[0],
        "save_path": (_ui_text(res.history, "save_pt") or [None])[0] if o["save_path"] else None,
        "summary": _ui_text(res.history, "erase"), "notes": tc.notes,
    }
    with open(os.path.join(tc.output_dir, "technique_run.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    return report

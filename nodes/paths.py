"""The pack's path policy on a ComfyUI server: which folders user-typed names resolve in.

All user-supplied paths go through ``mace_ops.safe_paths`` with the roots below (from
``folder_paths``, so ``--input-directory``, ``--output-directory`` and extra_model_paths.yaml
are honoured); anything outside them is refused without touching or quoting the file.

* concept lists (``MACE Mass Erase``'s ``concept_file``): ComfyUI's input folder, then output;
* LoRA files and folders (``MACE Fuse LoRAs``, ``MACE Load Erasure``): the ``loras`` model folders
  (models/loras and output/loras, where MACE writes its LoRAs);
* UNet .pt files read (``MACE Load UNet .pt``): input, output, then the loras folders;
* files written: the output folder only (``MACE Save UNet .pt``'s path and its .safetensors
  companion, every ``filename_prefix``; ``run_name`` is one folder name under output/loras/mace_mass).

``FILE_INPUTS`` names every file-name input of every node with its rule; ``check_file_inputs``
(called by ``validation.check_inputs`` at the start of every node) applies them before any work,
and a test enumerates the nodes' schemas so a new file input cannot skip the policy.
"""
from __future__ import annotations

import os
from typing import Callable

import folder_paths

from .comfy_compat import private_user_directory
from ..mace_ops.concepts import strip_comment
from ..mace_ops.pipeline import slug
from ..mace_ops.safe_paths import (PT_EXTENSIONS, PathRefused, check_save_prefix, files_in_folder, read_text_file, resolve_inside,
                                   resolve_write_folder, resolve_write_pair, root_of)
from ..mace_ops.visible import visible

LORA_EXTENSIONS = (".safetensors",)


def text_roots() -> list[tuple[str, str]]:
    return [("ComfyUI's input folder", folder_paths.get_input_directory()),
            ("ComfyUI's output folder", folder_paths.get_output_directory())]


def lora_roots() -> list[tuple[str, str]]:
    return [("the loras folders", d) for d in folder_paths.get_folder_paths("loras")]


def output_root() -> tuple[str, str]:
    return ("ComfyUI's output folder", folder_paths.get_output_directory())


def read_concept_file(name: str, field: str = "concept_file") -> tuple[str, str]:
    """(file name, text) of a concept list in the input (or output) folder."""
    return read_text_file(name, text_roots(), field)


def _require_extension(name: str, field: str, extensions: tuple[str, ...], why: str = "") -> str:
    text = str(name).strip()
    if not text.lower().endswith(extensions):
        raise PathRefused(f"{field}: {text!r} must end with {' or '.join(extensions)}{why}")
    return text


def resolve_lora_line(name: str, field: str) -> list[str]:
    """The .safetensors files a line names: one file, or every .safetensors directly in a folder."""
    roots = lora_roots()
    path = resolve_inside(name, roots, field, "any")
    if path.endswith(LORA_EXTENSIONS):
        return [path]
    if os.path.isdir(path):
        inside = files_in_folder(path, root_of(path, roots), LORA_EXTENSIONS)
        if not inside:
            raise ValueError(f"{field}: folder {name.strip()!r} holds no .safetensors file")
        return inside
    raise ValueError(f"{field}: {name.strip()!r} is not a .safetensors file (no pickle is ever loaded)")


def resolve_lora_files(text: str, field: str = "lora_files") -> list[str]:
    """Lines of LoRA file names or folders, relative to the loras folders."""
    paths: list[str] = []
    for number, raw in enumerate(str(text).splitlines(), start=1):
        line = strip_comment(raw).strip()
        if line:
            paths += resolve_lora_line(line, f"{field}, line {number}")
    if not paths:
        raise ValueError(f"{field}: no LoRA given; one file name or folder per line")
    return paths


def resolve_lora_file(name: str, field: str = "erasure_name") -> str:
    """One .safetensors file in the loras folders (symlinks leading out refused)."""
    _require_extension(name, field, LORA_EXTENSIONS, " (no pickle is ever loaded)")
    return resolve_inside(name, lora_roots(), field, "file")


def resolve_pt_read(name: str, field: str = "path") -> str:
    """A UNet .pt in the input, output or loras folders."""
    _require_extension(name, field, PT_EXTENSIONS)
    return resolve_inside(name, text_roots() + lora_roots(), field, "file")


def resolve_pt_write(name: str, field: str = "path") -> tuple[str, str]:
    """(.pt target, .safetensors companion) inside the output folder; the companion is never the target."""
    return resolve_write_pair(name, output_root(), field, PT_EXTENSIONS, ".safetensors", "mace_unet.pt")


def save_file_path(prefix: str, field: str = "filename_prefix", example: str = "loras/mace_erasure") -> str:
    """Next free ``<output>/<prefix>_<counter>_.safetensors`` (the prefix checked by the write policy)."""
    text = check_save_prefix(prefix, output_root(), field, example)
    folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(text, folder_paths.get_output_directory())
    return os.path.join(folder, f"{name}_{counter:05}_.safetensors")


def run_folder(name: str, field: str = "run_name") -> str:
    """The real folder of a Mass Erase run, ``<output>/loras/mace_mass/<slug(run_name)>``; the name is
    one visible folder name (no '/', '\\', '..', '~') and the folder, symlinks resolved, lies in output."""
    text = str(name).strip()
    if not visible(text) or "/" in text or "\\" in text or text.startswith(("~", ".")) or "\x00" in text:
        raise PathRefused(f"{field}: {text!r} is refused: a run name is one folder name under ComfyUI's output "
                          "folder (loras/mace_mass/<run_name>), without '/', '..' or '~'; e.g. 'mass_erase'")
    return resolve_write_folder(os.path.join("loras", "mace_mass", slug(text)), output_root(), field)


def _optional_text_file(name: str, field: str) -> None:
    if str(name).strip():
        read_concept_file(str(name).strip(), field)


def _save_prefix(prefix: str, field: str) -> None:
    check_save_prefix(str(prefix).replace("{concept}", "concept"), output_root(), field)


FILE_CHECKS: dict[str, Callable[[str, str], object]] = {
    "text_file": _optional_text_file,        # read: input, then output ('' = not used)
    "lora_lines": resolve_lora_files,        # read: loras folders, one file or folder per line
    "lora_file": resolve_lora_file,          # read: loras folders
    "pt_read": resolve_pt_read,              # read: input, output, loras
    "pt_write": resolve_pt_write,            # write: output (and the .safetensors companion)
    "save_prefix": _save_prefix,             # write: output, ComfyUI's numbered files
    "run_name": run_folder,              # write: one folder under output/loras/mace_mass
}

FILE_INPUTS: dict[str, dict[str, str]] = {  # node id (= class name) -> {input: FILE_CHECKS kind}
    "MaceSaveErasure": {"filename_prefix": "save_prefix"},
    "MaceTrainConceptLora": {"filename_prefix": "save_prefix"},
    "MaceLoadErasure": {"erasure_name": "lora_file"},
    "MaceFuseLoras": {"lora_files": "lora_lines"},
    "MaceMassErase": {"concept_file": "text_file", "run_name": "run_name"},
    "MaceSaveUNetPt": {"path": "pt_write"},
    "MaceLoadUNetPt": {"path": "pt_read"},
}


def check_file_inputs(cls, values: dict) -> None:
    """PathRefused for the first file-name input of node class ``cls`` that breaks its rule
    (``FILE_INPUTS``, by class name = node id; ComfyUI's per-run clones subclass the node class)."""
    name = next((c.__name__ for c in cls.__mro__ if c.__name__ in FILE_INPUTS), None)
    for field, kind in FILE_INPUTS.get(name, {}).items():
        if values.get(field) is not None:
            if not isinstance(values[field], str):
                raise PathRefused(f"{field}: expected a file name (text), got {type(values[field]).__name__}")
            FILE_CHECKS[kind](values[field], field)


def prior_cache_folder() -> str:
    """Where the general caption prior's moment is cached per text encoder: a folder under ComfyUI's
    user directory that its HTTP routes do not serve (``comfy_compat.private_user_directory``)."""
    return private_user_directory("mace_cache")

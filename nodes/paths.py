"""The pack's path policy on a ComfyUI server: which folders user-typed names resolve in.

All user-supplied paths go through ``mace_ops.safe_paths`` with the roots below (from
``folder_paths``, so ``--input-directory``, ``--output-directory`` and extra_model_paths.yaml
are honoured); anything outside them is refused without touching or quoting the file.

* concept lists (``MACE Mass Erase``'s ``concept_file``): ComfyUI's input folder, then output;
* LoRA files and folders (``MACE Fuse LoRAs``): the ``loras`` model folders (models/loras and
  output/loras, where MACE writes its LoRAs);
* saved files: ``folder_paths.get_save_image_path`` (refuses prefixes leaving the output folder).
"""
from __future__ import annotations

import os

import folder_paths

from .comfy_compat import private_user_directory
from ..mace_ops.safe_paths import files_in_folder, read_text_file, resolve_inside, root_of

LORA_EXTENSIONS = (".safetensors",)


def text_roots() -> list[tuple[str, str]]:
    return [("ComfyUI's input folder", folder_paths.get_input_directory()),
            ("ComfyUI's output folder", folder_paths.get_output_directory())]


def lora_roots() -> list[tuple[str, str]]:
    return [("the loras folders", d) for d in folder_paths.get_folder_paths("loras")]


def read_concept_file(name: str, field: str = "concept_file") -> tuple[str, str]:
    """(file name, text) of a concept list in the input (or output) folder."""
    return read_text_file(name, text_roots(), field)


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


def prior_cache_folder() -> str:
    """Where the general caption prior's moment is cached per text encoder: a folder under ComfyUI's
    user directory that its HTTP routes do not serve (``comfy_compat.private_user_directory``)."""
    return private_user_directory("mace_cache")

"""Path policy: a user-supplied file name resolves only inside the folders it is allowed in.

A ComfyUI server is often reachable by others (``--listen``, cloud hosts), so a text field that
names a file must not let a prompt read arbitrary server files. Every user-supplied path goes
through ``resolve_inside``:

* it must be relative: absolute paths, ``~``, drive letters, ``..`` components and NUL bytes are
  refused before the file system is touched;
* it is joined to each allowed root in turn and resolved with symlinks followed
  (``os.path.realpath``); the result must still lie inside that root, so a symlink pointing out
  of the folder is refused like ``..``;
* a refusal and a missing file give the same message, which names the field, the user's own text
  and the folders' labels (never a server path outside them, never the file's contents), so
  errors cannot be used to probe which files exist elsewhere.

``read_text_file`` adds an extension list and a size cap for small text inputs (concept lists).
A file that exists but cannot be read counts as absent (same message): no existence oracle.

Writes go through ``resolve_write`` (one file, e.g. a .pt) or ``check_save_prefix`` (a ComfyUI
``filename_prefix``): the same relative-name rules, a visible file name that does not start with
'.', and the target (symlinks resolved) inside the one writable root, the output folder.
The roots come from the caller (the ComfyUI nodes pass ``folder_paths`` folders); this module
imports nothing of ComfyUI.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from .visible import visible

MAX_TEXT_BYTES = 1 << 20  # 1 MiB: ~20,000 concept lines
PT_EXTENSIONS = (".pt", ".pth", ".bin")  # torch.save files (read with weights_only=True only)


class PathRefused(ValueError):
    pass


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def _check_relative(name: str, field: str, where: str) -> str:
    text = str(name).strip()
    if not text:
        raise PathRefused(f"{field}: empty; give a name relative to {where}")
    parts = text.replace("\\", "/").split("/")
    if ("\x00" in text or text.startswith(("/", "\\", "~")) or os.path.isabs(text)
            or (len(text) > 1 and text[1] == ":") or ".." in parts):
        raise PathRefused(f"{field}: {text!r} is refused: only names relative to {where} are allowed "
                          "(no absolute paths, no '..')")
    return text


def where_of(roots: Sequence[tuple[str, str]]) -> str:
    """The roots' labels for messages, each once ("the loras folders", not twice)."""
    return " or ".join(dict.fromkeys(label for label, _ in roots)) or "the allowed folders"


def _readable(path: str, want: str) -> bool:
    if want == "file":
        return os.path.isfile(path) and os.access(path, os.R_OK)
    if want == "dir":
        return os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)
    return os.path.exists(path) and os.access(path, os.R_OK)


def resolve_inside(name: str, roots: Sequence[tuple[str, str]], field: str, want: str = "file") -> str:
    """The real path of ``name`` inside the first of ``roots`` ((label, folder) pairs) that has it
    readable.

    ``want`` is "file", "dir" or "any". Raises ``PathRefused`` (a ValueError) otherwise.
    """
    where = where_of(roots)
    text = _check_relative(name, field, where)
    for _label, root in roots:
        real_root = os.path.realpath(root)
        candidate = os.path.realpath(os.path.join(real_root, text))
        if not _is_within(candidate, real_root):
            continue  # e.g. a symlink leading out of the folder: treated as absent
        if _readable(candidate, want):  # unreadable = absent: the message cannot tell them apart
            return candidate
    raise PathRefused(f"{field}: {text!r} is not a {'folder' if want == 'dir' else 'file'} in {where}; "
                      f"put it there (names are relative to {where}; absolute paths and '..' are refused)")


def files_in_folder(folder: str, root: str, extensions: Iterable[str]) -> list[str]:
    """Sorted files directly in ``folder`` with one of ``extensions`` whose real path stays inside ``root``."""
    real_root = os.path.realpath(root)
    exts = tuple(e.lower() for e in extensions)
    out = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.realpath(os.path.join(folder, entry))
        if entry.lower().endswith(exts) and os.path.isfile(full) and _is_within(full, real_root):
            out.append(full)
    return out


def root_of(path: str, roots: Sequence[tuple[str, str]]) -> str:
    """The (real) root among ``roots`` that holds ``path``."""
    for _label, root in roots:
        real_root = os.path.realpath(root)
        if _is_within(os.path.realpath(path), real_root):
            return real_root
    raise PathRefused("path outside the allowed folders")


def read_text_file(name: str, roots: Sequence[tuple[str, str]], field: str,
                   extensions: Sequence[str] = (".txt", ".csv"), max_bytes: int = MAX_TEXT_BYTES) -> tuple[str, str]:
    """(display name, text) of a small UTF-8 text file inside ``roots``; errors never quote its contents."""
    text_name = _check_relative(name, field, where_of(roots))
    if not text_name.lower().endswith(tuple(extensions)):
        raise PathRefused(f"{field}: {text_name!r} must end with {' or '.join(extensions)}")
    path = resolve_inside(text_name, roots, field, "file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise PathRefused(f"{field}: {text_name!r} is {size} bytes; the limit is {max_bytes} bytes")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    try:
        return os.path.basename(text_name), raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PathRefused(f"{field}: {text_name!r} is not UTF-8 text; save it as UTF-8") from None


def _check_file_name(text: str, field: str, where: str, example: str) -> None:
    name = text.replace("\\", "/").rsplit("/", 1)[-1]
    if not visible(os.path.splitext(name)[0]) or visible(name).startswith("."):
        raise PathRefused(f"{field}: {text!r} does not end with a file name (a visible name not starting with "
                          f"'.'); e.g. {example!r}, relative to {where}")


def _inside_or_refused(path: str, real_root: str, text: str, field: str, where: str) -> str:
    real = os.path.realpath(path)
    if not _is_within(real, real_root) or real == real_root:
        raise PathRefused(f"{field}: {text!r} is refused: files are written only inside {where} (no absolute "
                          "paths, no '..', no symlinks leading out)")
    return real


def resolve_write(name: str, root: tuple[str, str], field: str, extensions: Sequence[str] = (),
                  example: str = "name") -> str:
    """The real path a file named ``name`` (relative to ``root``, a (label, folder) pair) is written to;
    PathRefused unless it ends with one of ``extensions``, has a visible name and lies inside the root
    with every symlink resolved (an existing folder there is refused too)."""
    where = root[0]
    text = _check_relative(name, field, where)
    if extensions and not text.lower().endswith(tuple(e.lower() for e in extensions)):
        raise PathRefused(f"{field}: {text!r} must end with {' or '.join(extensions)}")
    _check_file_name(text, field, where, example)
    target = _inside_or_refused(os.path.join(os.path.realpath(root[1]), text), os.path.realpath(root[1]), text,
                                field, where)
    if os.path.isdir(target):
        raise PathRefused(f"{field}: {text!r} is a folder in {where}; give a file name")
    return target


def resolve_write_folder(name: str, root: tuple[str, str], field: str) -> str:
    """The real path of a folder ``name`` (relative) to write files in, inside ``root`` with symlinks resolved."""
    text = _check_relative(name, field, root[0])
    real_root = os.path.realpath(root[1])
    return _inside_or_refused(os.path.join(real_root, text), real_root, text, field, root[0])


def check_save_prefix(prefix: str, root: tuple[str, str], field: str = "filename_prefix",
                      example: str = "loras/mace_erasure") -> str:
    """``prefix`` (stripped) when it is a ComfyUI filename prefix that writes inside ``root``: relative,
    a visible file name at its end, its folder inside the root with symlinks resolved."""
    where = root[0]
    text = _check_relative(prefix, field, where)
    _check_file_name(text, field, where, example)
    real_root = os.path.realpath(root[1])
    _inside_or_refused(os.path.join(real_root, text), real_root, text, field, where)
    return text


def resolve_write_pair(name: str, root: tuple[str, str], field: str, extensions: Sequence[str],
                       companion_ext: str, example: str = "name") -> tuple[str, str]:
    """(target, companion) real paths: ``name`` as ``resolve_write`` and ``<stem><companion_ext>`` next to
    it, refused when both are one file (e.g. through a symlink): a companion never overwrites its target."""
    target = resolve_write(name, root, field, extensions, example)
    text = str(name).strip()
    companion = resolve_write(os.path.splitext(text)[0] + companion_ext, root, field, example=example)
    if companion == target:
        raise PathRefused(f"{field}: {text!r} and its {companion_ext} companion would be one file; choose another name")
    return target, companion

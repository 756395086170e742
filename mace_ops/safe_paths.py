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
The roots come from the caller (the ComfyUI nodes pass ``folder_paths`` folders); this module
imports nothing of ComfyUI.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

MAX_TEXT_BYTES = 1 << 20  # 1 MiB: ~20,000 concept lines


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


def resolve_inside(name: str, roots: Sequence[tuple[str, str]], field: str, want: str = "file") -> str:
    """The real path of ``name`` inside the first of ``roots`` ((label, folder) pairs) that has it.

    ``want`` is "file", "dir" or "any". Raises ``PathRefused`` (a ValueError) otherwise.
    """
    where = " or ".join(label for label, _ in roots) or "the allowed folders"
    text = _check_relative(name, field, where)
    for _label, root in roots:
        real_root = os.path.realpath(root)
        candidate = os.path.realpath(os.path.join(real_root, text))
        if not _is_within(candidate, real_root):
            continue  # e.g. a symlink leading out of the folder: treated as absent
        ok = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[want](candidate)
        if ok:
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
    text_name = _check_relative(name, field, " or ".join(label for label, _ in roots))
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

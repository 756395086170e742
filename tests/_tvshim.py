"""Make PyPI's CUDA build of torchvision importable next to a CPU-only torch.

PyPI's ``torchvision==0.28.0`` is a ``+cu130`` build.  Its ``_C`` extension needs
``libc10_cuda.so``, which a CPU torch does not ship, so the extension fails to load and
``import torchvision`` then dies in ``torchvision/_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist``.  ComfyUI imports torchvision at
start-up (``comfy/sd.py`` -> ``comfy/ldm/cascade/stage_c_coder.py``), so without a fix
ComfyUI cannot be imported at all.

The fix: declare the two op schemas that the meta registrations refer to *before*
torchvision is imported.  The C kernels stay unavailable (SD1.x never calls nms/qnms).

Two entry points:

* :func:`install_now` -- imports torch and applies the shim if (and only if) it is needed.
  The integration harness calls it before importing ComfyUI.
* :func:`install_lazy` -- registers an import hook that applies the shim the first time
  ``torchvision`` is imported.  ``make venv`` copies this file into the venv's
  site-packages as ``_mace_tvshim.py`` together with a ``.pth`` line that calls it, so that
  ``python ~/ComfyUI/main.py --cpu`` also works from ``.venv``, without paying the torch
  import cost in every interpreter start (pip, etc.).

This module must not import anything from the repository or from ComfyUI.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_state = {"done": False, "applied": False, "lib": None}


def _torchvision_cuda_version() -> str | None:
    """CUDA version torchvision was built for, read from its version.py without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "version.py")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        m = re.search(r"^cuda\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if m:
            return m.group(1)
        m = re.search(r"^__version__\s*=\s*['\"][^'\"]*\+cu(\d+)", text, re.M)
        if m:
            return m.group(1)
        return None
    return None


def needs_shim() -> bool:
    """True when torchvision is a CUDA build but torch is a CPU-only build."""
    if "torchvision" in sys.modules:
        return False
    tv_cuda = _torchvision_cuda_version()
    if tv_cuda is None:
        return False
    import torch

    return torch.version.cuda is None


def install_now() -> bool:
    """Apply the shim if needed.  Idempotent.  Returns True if the schemas were defined."""
    if _state["done"]:
        return _state["applied"]
    _state["done"] = True
    if not needs_shim():
        return False
    import torch

    # FRAGMENT, not DEF: another copy of this shim (the venv's lazy _mace_tvshim) may already
    # have opened the namespace; defining an existing op raises and is skipped.
    lib = torch.library.Library("torchvision", "FRAGMENT")
    defined = False
    for schema in _SCHEMAS:
        if _op_exists(torch, schema.split("(", 1)[0]):
            continue
        try:
            lib.define(schema)
            defined = True
        except RuntimeError:  # defined meanwhile / by another copy
            pass
    # Keep the Library object alive: dropping it would deregister the schemas.
    _state["lib"] = lib
    _state["applied"] = defined
    return defined


def _op_exists(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except (RuntimeError, AttributeError):
        return False


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`install_now` right before the first ``import torchvision``."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib API
        if fullname != "torchvision" or _LazyFinder._busy:
            return None
        _LazyFinder._busy = True
        try:
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            try:
                install_now()
            except Exception as exc:  # never break the interpreter over this
                sys.stderr.write(f"[_tvshim] torchvision shim not applied: {exc!r}\n")
        finally:
            _LazyFinder._busy = False
        return None  # let the normal finders import torchvision


def install_lazy() -> None:
    if "torchvision" in sys.modules or _state["done"]:
        return
    if not any(isinstance(f, _LazyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LazyFinder())

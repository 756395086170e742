"""The nodes' input validation layer: every numeric widget checked against the node's own schema.

ComfyUI checks a widget's min/max before execution, but NaN passes every comparison and API
prompts can carry NaN/Infinity (JSON as Python reads it). Every MACE node's ``execute`` starts
with ``check_inputs(cls, locals())``: each Int/Float input is refused unless it is a finite
number within the min/max its schema declares, with a message naming the input (its display
name) and the range. The mace_ops entry points repeat the checks that matter for their maths
(``mace_ops.validation``), so scripts calling them directly are covered too.

Every MODEL input is checked first (``comfy_model.require_supported``): a model family without
text cross-attention (SD3, Flux, other MMDiT/DiT models) is refused before any work, with an
error naming its family and the supported ones -- never a traceback from deep inside, never a
silently unedited model. A node class with ``EDITS_TEXT_ENTRY = True`` (CFR, Save/Load Erasure) also
takes the families whose text enters through one projection (``comfy_text_entry.text_entry``: FLUX.1,
SD3/SD3.5) and refuses the others the same way.

Last, every file-name input is checked by the path policy of ``paths.FILE_INPUTS`` (read: input,
output and loras folders; write: the output folder; no absolute paths, '..', '~' or symlinks
leading out), before any work and with one message style that never echoes a server path.
"""
from __future__ import annotations

from .comfy_compat import io

from ..mace_ops.validation import check_number
from .comfy_model import require_supported
from .comfy_text_entry import text_entry
from .paths import check_file_inputs


_SCHEMA_CACHE: dict = {}


def _schema_parts(cls) -> tuple[tuple[str, ...], tuple[tuple[str, str, float | None, float | None, bool], ...]]:
    """(MODEL input ids, numeric inputs) of a node class, cached by its ``define_schema`` function.

    ComfyUI runs ``execute`` on a fresh clone of the node class every time (``PREPARE_CLASS_CLONE``
    / ``lock_class``), so a cache keyed by the class would never hit and would grow by one class
    per run. The clones copy the class ``__dict__``, so ``define_schema.__func__`` is the same
    function object for the node class and all its clones: one entry per node type.
    """
    key = getattr(cls.define_schema, "__func__", cls.define_schema)
    parts = _SCHEMA_CACHE.get(key)
    if parts is None:
        models, numbers = [], []
        for inp in cls.define_schema().inputs:
            if isinstance(inp, io.Model.Input):
                models.append(inp.id)
            elif isinstance(inp, (io.Int.Input, io.Float.Input)):
                name = getattr(inp, "display_name", None) or inp.id
                numbers.append((inp.id, name, getattr(inp, "min", None), getattr(inp, "max", None),
                                isinstance(inp, io.Int.Input)))
        parts = _SCHEMA_CACHE[key] = (tuple(models), tuple(numbers))
    return parts


def check_inputs(cls, values: dict) -> None:
    """ValueError for the first MODEL input of an unsupported family, the first numeric input of
    ``cls`` that is non-finite or out of its range, or else the first file-name input the path
    policy refuses."""
    models, numbers = _schema_parts(cls)
    supported = text_entry if getattr(cls, "EDITS_TEXT_ENTRY", False) else require_supported
    for key in models:
        if values.get(key) is not None:
            supported(values[key], key)
    for key, name, lo, hi, integer in numbers:
        if key in values and values[key] is not None:
            check_number(values[key], name, lo, hi, integer=integer)
    check_file_inputs(cls, values)


def require_clip_vae(clip, vae) -> None:
    """ValueError naming ``clip`` / ``vae`` when one is not connected (the nodes that sample and decode)."""
    if clip is None:
        raise ValueError("clip: no CLIP connected; connect the CLIP output of your checkpoint loader")
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE output of your checkpoint loader")

"""The headless half of the compatibility layer (the nodes' half is ``nodes/comfy_compat.py``):
ComfyUI's executor and caches in both shapes, told apart by feature detection, never by version.

* ``execution.CacheType``: ``CLASSIC, LRU, DEPENDENCY_AWARE`` (0.3.64) or ``CLASSIC, LRU, NONE,
  RAM_PRESSURE`` (later). "none" (no intermediate cache) is ``NONE`` where it exists, else
  ``DEPENDENCY_AWARE``.
* ``execution.PromptExecutor``: ``(server, cache_type, cache_size)`` (0.3.64) or ``(server,
  cache_type, cache_args, asset_manager)`` (later; ``execute_async`` reads ``cache_args["ram"]`` and
  ``["ram_inactive"]`` unconditionally, ``["lru"]`` for an LRU cache). RAM thresholds 0 = never
  evict for pressure; classic/lru/none ignore them.
* the output cache's ``get``: sync (0.3.64) or a coroutine with a sync ``get_local`` (later).
* ``comfy.utils.ProgressBar``: later builds throttle the hook (``PROGRESS_THROTTLE_MIN_INTERVAL``
  / ``_MIN_PERCENT``); :func:`unthrottled_progress` turns that off where a caller needs every
  update (the tests that count them), and is a no-op where there is no throttle.

Imports ComfyUI lazily: call after :func:`.bootstrap.bootstrap`.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect

CACHE_TYPES = ("classic", "lru", "none")
LRU_SIZE = 8


class ExecutorIncompatible(RuntimeError):
    """This ComfyUI's executor has a shape the pack does not know."""


def cache_type(name: str, execution_module=None):
    """The ``execution.CacheType`` member for ``classic`` / ``lru`` / ``none``."""
    if name not in CACHE_TYPES:
        raise ValueError(f"cache_type: {name!r} is not one of {', '.join(CACHE_TYPES)}")
    ex = execution_module or _execution()
    ct = ex.CacheType
    member = {"classic": "CLASSIC", "lru": "LRU"}.get(name)
    if member is None:
        member = next((m for m in ("NONE", "DEPENDENCY_AWARE") if hasattr(ct, m)), None)
    if member is None or not hasattr(ct, member):
        raise ExecutorIncompatible(f"this ComfyUI's execution.CacheType has none of the members the pack "
                                   f"knows for {name!r} (has: {', '.join(m.name for m in ct)})")
    return getattr(ct, member)


def make_executor(server, name: str = "classic", execution_module=None):
    """``execution.PromptExecutor`` for ``server`` with the cache ``name``, in this ComfyUI's shape."""
    ex = execution_module or _execution()
    ct = cache_type(name, ex)
    params = inspect.signature(ex.PromptExecutor).parameters
    if "cache_args" in params:
        args = {"lru": LRU_SIZE if name == "lru" else 0, "ram": 0.0, "ram_inactive": 0.0}
        return ex.PromptExecutor(server, cache_type=ct, cache_args=args)
    if "cache_size" in params:
        return ex.PromptExecutor(server, cache_type=ct, cache_size=LRU_SIZE if name == "lru" else None)
    raise ExecutorIncompatible("this ComfyUI's execution.PromptExecutor takes neither cache_args nor "
                               f"cache_size (parameters: {', '.join(params)})")


def cached_output(cache, node_id: str):
    """A node's entry in an output cache (``None`` when absent), through ``get_local`` where it
    exists, else ``get`` (awaited when it is a coroutine)."""
    local = getattr(cache, "get_local", None)
    if callable(local):
        return local(node_id)
    out = cache.get(node_id)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(aw):
    return await aw


@contextlib.contextmanager
def unthrottled_progress(utils_module=None):
    """Every ``ProgressBar`` update reaches the hook while inside (where the build throttles)."""
    if utils_module is None:
        import comfy.utils as utils_module
    names = ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")
    saved = {n: getattr(utils_module, n) for n in names if hasattr(utils_module, n)}
    try:
        for n in saved:
            setattr(utils_module, n, 0)
        yield
    finally:
        for n, v in saved.items():
            setattr(utils_module, n, v)


def _execution():
    import execution
    return execution

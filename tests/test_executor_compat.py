"""``headless/executor_compat.py`` against both shapes of ComfyUI's executor API.

The fakes follow the signatures as read in ComfyUI 0.3.64 (``execution.py``,
``comfy_execution/caching.py``, ``comfy/utils.py``) and in upstream 0.38 (``CacheType`` with
``NONE``/``RAM_PRESSURE``, ``PromptExecutor(server, cache_type, cache_args, asset_manager)`` whose
``execute_async`` reads ``cache_args["ram"]``/``["ram_inactive"]``, async ``get`` + sync
``get_local``, a throttled ``ProgressBar``), so a regression in either direction fails here
without a ComfyUI checkout. The real 0.3.64 runs through them in every integration test.
"""
from __future__ import annotations

import enum
import types

import pytest

from headless import executor_compat as xc


class _CT064(enum.Enum):
    CLASSIC = 0
    LRU = 1
    DEPENDENCY_AWARE = 2


class _CT038(enum.Enum):
    CLASSIC = 0
    LRU = 1
    NONE = 2
    RAM_PRESSURE = 3


class _Exec064:
    def __init__(self, server, cache_type=False, cache_size=None):
        self.server, self.cache_type, self.cache_size = server, cache_type, cache_size


class _Exec038:
    def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
        self.server, self.cache_type, self.cache_args = server, cache_type, cache_args

    def execute(self):  # what upstream's execute_async reads before anything else
        return int(self.cache_args["ram"] * 1024 ** 3), int(self.cache_args["ram_inactive"] * 1024 ** 3)


def _execution(ct, executor):
    return types.SimpleNamespace(CacheType=ct, PromptExecutor=executor)


@pytest.mark.parametrize("name", xc.CACHE_TYPES)
def test_cache_types_in_both_shapes(name):
    old, new = xc.cache_type(name, _execution(_CT064, _Exec064)), xc.cache_type(name, _execution(_CT038, _Exec038))
    assert old.name == {"classic": "CLASSIC", "lru": "LRU", "none": "DEPENDENCY_AWARE"}[name]
    assert new.name == {"classic": "CLASSIC", "lru": "LRU", "none": "NONE"}[name]


def test_unknown_cache_type_and_unknown_enum_are_named():
    with pytest.raises(ValueError, match="cache_type: 'ram'"):
        xc.cache_type("ram", _execution(_CT038, _Exec038))
    Other = enum.Enum("Other", "CLASSIC LRU PRESSURE")
    with pytest.raises(xc.ExecutorIncompatible, match="has: CLASSIC, LRU, PRESSURE"):
        xc.cache_type("none", _execution(Other, _Exec038))


def test_executor_0_3_64_gets_cache_size():
    ex = xc.make_executor("srv", "lru", _execution(_CT064, _Exec064))
    assert (ex.server, ex.cache_type, ex.cache_size) == ("srv", _CT064.LRU, xc.LRU_SIZE)
    assert xc.make_executor("srv", "classic", _execution(_CT064, _Exec064)).cache_size is None


@pytest.mark.parametrize("name", xc.CACHE_TYPES)
def test_executor_0_38_gets_cache_args_that_execute_reads(name):
    ex = xc.make_executor("srv", name, _execution(_CT038, _Exec038))
    assert ex.execute() == (0, 0)
    assert ex.cache_args["lru"] == (xc.LRU_SIZE if name == "lru" else 0)


def test_executor_of_unknown_shape_is_named():
    class Odd:
        def __init__(self, server, cache_type=False, cache_budget=None):
            pass
    with pytest.raises(xc.ExecutorIncompatible, match="cache_budget"):
        xc.make_executor("srv", "classic", _execution(_CT038, Odd))


class _SyncCache:  # 0.3.64: HierarchicalCache.get is sync
    def __init__(self, d):
        self.d = d

    def get(self, node_id):
        return self.d.get(node_id)


class _AsyncCache(_SyncCache):  # 0.38: async get, sync get_local
    async def get(self, node_id):
        return self.d.get(node_id)

    def get_local(self, node_id):
        return self.d.get(node_id)


class _AsyncOnlyCache(_SyncCache):  # an async get without get_local: awaited
    async def get(self, node_id):
        return self.d.get(node_id)


@pytest.mark.parametrize("cls", [_SyncCache, _AsyncCache, _AsyncOnlyCache])
def test_cached_output_in_every_shape(cls):
    cache = cls({"3": ("entry",)})
    assert xc.cached_output(cache, "3") == ("entry",)
    assert xc.cached_output(cache, "4") is None


def test_unthrottled_progress_restores_the_throttle_and_is_a_noop_without_one():
    utils = types.SimpleNamespace(PROGRESS_THROTTLE_MIN_INTERVAL=0.1, PROGRESS_THROTTLE_MIN_PERCENT=0.5)
    with xc.unthrottled_progress(utils):
        assert (utils.PROGRESS_THROTTLE_MIN_INTERVAL, utils.PROGRESS_THROTTLE_MIN_PERCENT) == (0, 0)
    assert (utils.PROGRESS_THROTTLE_MIN_INTERVAL, utils.PROGRESS_THROTTLE_MIN_PERCENT) == (0.1, 0.5)
    bare = types.SimpleNamespace()
    with xc.unthrottled_progress(bare):
        pass
    assert vars(bare) == {}

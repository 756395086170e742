"""Shared pytest fixtures.

* ``comfy`` (session): real ComfyUI imported and initialised in-process with the repo loaded
  as the custom-node pack ``comfyui-mace`` (see ``tests/comfy_harness.py``); skipped with one
  loud line when no checkout is found ($COMFYUI_PATH, else ~/ComfyUI).
* ``tiny_ckpt`` (session): path of a generated tiny SD1.5-layout checkpoint (12-layer CLIP,
  TAESD VAE, fp16, ~300 MB) in a tmp dir registered as a ``checkpoints`` folder, so
  ``CheckpointLoaderSimple`` can load it by ``tiny_ckpt.name``.
* ``tiny_sd2_ckpt`` / ``tiny_sdxl_ckpt`` (session): tiny SD2.x-layout (v-prediction, OpenCLIP-H)
  and SDXL-layout (CLIP-L + OpenCLIP-bigG, adm 2816) checkpoints with 3-layer text encoders,
  registered the same way (``comfy_harness.make_tiny_checkpoint``; the harness makes the stock
  loader build their encoders at that depth, see ``install_tiny_te_depth_hook``).
  ``family_ckpt`` is one of the three (``tiny_ckpt`` for "sd15"), chosen with
  ``@pytest.mark.parametrize("family_ckpt", [...], indirect=True)``.

Any test that uses ``comfy`` (directly or through ``tiny_ckpt``) is marked ``integration``
automatically.

``--require-comfyui`` (or ``MACE_REQUIRE_COMFYUI=1``, which ``.ci/run`` sets when it has
found a ComfyUI checkout): a missing checkout is a usage error, and any *integration*
test that ends up skipped is reported as a failure, with its skip reason.  Tests marked
``browser`` (tests/test_browser.py) follow ``MACE_REQUIRE_BROWSER=1`` instead, which ``.ci/run``
sets when Chromium is installed.
"""
from __future__ import annotations

import os

import pytest

from comfy_harness import (SKIP_MESSAGE, find_comfyui, init_comfyui, make_tiny_checkpoint,
                           make_tiny_sd15_checkpoint, require_comfyui)

TINY_CKPT_NAME = "mace_tiny_sd15.safetensors"
REQUIRE_ENV = "MACE_REQUIRE_COMFYUI"
BROWSER_ENV = "MACE_REQUIRE_BROWSER"  # set by .ci/run when Chromium is installed


def pytest_addoption(parser):
    parser.addoption("--require-comfyui", action="store_true", default=False,
                     help="fail (instead of skip) integration tests when ComfyUI is missing or an "
                          f"integration test skips; also set by {REQUIRE_ENV}=1")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _comfyui_required(config) -> bool:
    return bool(config.getoption("--require-comfyui")) or _flag(REQUIRE_ENV)


def pytest_configure(config):
    if _comfyui_required(config) and find_comfyui() is None:
        raise pytest.UsageError(
            f"ComfyUI is required ({REQUIRE_ENV}=1 or --require-comfyui) but no checkout was "
            f"found at $COMFYUI_PATH={os.environ.get('COMFYUI_PATH', '(unset)')} or ~/ComfyUI")


def pytest_report_header(config):
    path = find_comfyui()
    if path is None:
        return [SKIP_MESSAGE]
    version = "?"
    try:
        ns: dict = {}
        exec((path / "comfyui_version.py").read_text(), ns)
        version = ns.get("__version__", "?")
    except OSError:
        pass
    return [f"ComfyUI: {path} (version {version}); integration tests enabled"]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection sees the markers
def pytest_collection_modifyitems(config, items):
    missing = find_comfyui() is None
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        if missing and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason=SKIP_MESSAGE))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if item.get_closest_marker("browser") is not None:
        if _flag(BROWSER_ENV):
            report.outcome = "failed"
            report.longrepr = (f"browser test skipped although Chromium is required "
                               f"({BROWSER_ENV}=1): {reason}")
    elif item.get_closest_marker("integration") is not None and _comfyui_required(item.config):
        report.outcome = "failed"
        report.longrepr = (f"integration test skipped although ComfyUI is required "
                           f"({REQUIRE_ENV}=1 / --require-comfyui): {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if find_comfyui() is None:
        terminalreporter.write_line(SKIP_MESSAGE, yellow=True, bold=True)
    elif _comfyui_required(config):
        terminalreporter.write_line(
            f"ComfyUI required ({REQUIRE_ENV}=1 / --require-comfyui): a skipped integration "
            f"test counts as a failure", bold=True)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The initialised :class:`comfy_harness.ComfyHarness` (or skip)."""
    require_comfyui()
    base = tmp_path_factory.mktemp("comfy_base")
    return init_comfyui(base)


@pytest.fixture(scope="session")
def tiny_ckpt(comfy, tmp_path_factory):
    """Path to the tiny checkpoint; ``CheckpointLoaderSimple`` knows it as ``tiny_ckpt.name``.

    It carries all 12 CLIP-L layers because the stock loader always builds a 12-layer CLIP and
    leaves missing layers uninitialised (NaN conditioning).  For direct-API tests that want a
    faster text encoder: ``comfy_harness.load_tiny_checkpoint(tiny_ckpt, clip_layers=1)``.
    """
    d = tmp_path_factory.mktemp("tiny_ckpt")
    path = make_tiny_sd15_checkpoint(d / TINY_CKPT_NAME, clip_layers=12, seed=0)
    comfy.add_model_dir("checkpoints", d)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt_2layer(comfy, tmp_path_factory):
    """The tiny SD1.5 checkpoint with a 2-layer CLIP-L, for in-process tests whose cost is text
    encoding (the harness's loader hook builds the CLIP at the depth the file records; a ComfyUI in
    a subprocess has no hook, so subprocess tests keep ``tiny_ckpt``)."""
    d = tmp_path_factory.mktemp("tiny_ckpt_2layer")
    path = make_tiny_sd15_checkpoint(d / "mace_tiny_sd15_2layer.safetensors", clip_layers=2, seed=0)
    comfy.add_model_dir("checkpoints", d)
    return path


def _tiny_family_ckpt(comfy, tmp_path_factory, family: str):
    d = tmp_path_factory.mktemp(f"tiny_{family}")
    path = make_tiny_checkpoint(d / f"mace_tiny_{family}.safetensors", family, te_layers=3, seed=0)
    comfy.add_model_dir("checkpoints", d)
    return path


@pytest.fixture(scope="session")
def tiny_sd2_ckpt(comfy, tmp_path_factory):
    """Tiny SD2.x-layout checkpoint (ComfyUI: SD20, v-prediction); ~350 MB, a few seconds."""
    return _tiny_family_ckpt(comfy, tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(comfy, tmp_path_factory):
    """Tiny SDXL-layout checkpoint (ComfyUI: KOALA_700M -> model_base.SDXL, EPS); ~520 MB."""
    return _tiny_family_ckpt(comfy, tmp_path_factory, "sdxl")


@pytest.fixture
def family_ckpt(request):
    """``request.param`` in ("sd15", "sd2", "sdxl") -> that family's tiny checkpoint path (SD1.5:
    ``tiny_ckpt``, which the suite builds anyway)."""
    name = {"sd15": "tiny_ckpt", "sd2": "tiny_sd2_ckpt", "sdxl": "tiny_sdxl_ckpt"}[request.param]
    return request.getfixturevalue(name)

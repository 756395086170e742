"""``--require-comfyui`` / ``MACE_REQUIRE_COMFYUI=1`` (set by ``.ci/run`` when it finds a
ComfyUI checkout): a skipped integration test fails the run; without it, it only skips.
Runs a tiny pytest session in a subprocess with this repo's conftest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

@pytest.mark.integration
def test_probe():
    pytest.skip("probe skip")
'''


def _run(tmp_path, env_extra, *args):
    tdir = tmp_path / "tests"
    tdir.mkdir(exist_ok=True)
    # this repo's conftest; comfy_harness comes from tests/ via pytest.ini's pythonpath
    (tdir / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tdir / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "MACE_REQUIRE_COMFYUI"}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
           str(REPO / "pytest.ini"), "--rootdir", str(REPO), str(tdir / "test_probe.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["env", "option"])
def test_required_comfyui_turns_integration_skip_into_failure(tmp_path, how):
    if os.environ.get("COMFYUI_PATH") is None and not (Path.home() / "ComfyUI").is_dir():
        # without a checkout the requirement is a usage error (exit 4), tested below
        pytest.skip("needs a ComfyUI checkout for this variant")
    env = {"MACE_REQUIRE_COMFYUI": "1"} if how == "env" else {}
    args = () if how == "env" else ("--require-comfyui",)
    r = _run(tmp_path, env, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "integration test skipped although ComfyUI is required" in r.stdout
    assert "probe skip" in r.stdout


def test_without_requirement_integration_skip_is_a_skip(tmp_path):
    r = _run(tmp_path, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout


def test_required_but_missing_comfyui_is_a_usage_error(tmp_path):
    r = _run(tmp_path, {"MACE_REQUIRE_COMFYUI": "1", "COMFYUI_PATH": str(tmp_path / "nowhere")})
    assert r.returncode == 4, r.stdout + r.stderr
    assert "ComfyUI is required" in r.stdout + r.stderr

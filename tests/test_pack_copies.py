"""``run`` / ``convert`` say which copy of the pack they use when another copy is installed in
the ComfyUI's ``custom_nodes`` (ComfyUI registers that copy's nodes first), and
``--no-custom-nodes`` runs this copy (integration, subprocess)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import comfy_harness as ch

REPO = ch.REPO_ROOT
pytestmark = pytest.mark.integration


def test_convert_names_the_copy_it_uses(comfy, tmp_path):
    other = tmp_path / "base" / "custom_nodes" / "comfyui-mace-other"
    other.mkdir(parents=True)
    for name in ("nodes", "mace_ops"):
        shutil.copytree(REPO / name, other / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", other / "__init__.py")
    env = dict(os.environ, COMFYUI_PATH=str(ch.find_comfyui()))
    base = [sys.executable, str(REPO), "convert", "workflows/erase_style_cfr.json",
            "--base-directory", str(tmp_path / "base"), "-o", str(tmp_path / "api.json")]

    r = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"this run uses the copy installed at {other}" in r.stderr, r.stderr
    assert "--no-custom-nodes" in r.stderr

    r = subprocess.run(base + ["--no-custom-nodes"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"comfyui-mace: using the copy at {REPO}" in r.stderr, r.stderr

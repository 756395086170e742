"""The README's headless commands, parsed out of README.md and run as written (integration).

* ``python . check ...`` and ``python . convert ...`` run verbatim (``python`` = this Python,
  in the repository root, ComfyUI from $COMFYUI_PATH);
* ``python . run ...`` runs with ``run`` swapped for ``convert`` (the same ``--set`` arguments,
  resolved against the real workflow and node definitions; executing it needs a real SD1.5
  checkpoint) and the values it sets are checked; the slow variant executes it verbatim on the
  tiny checkpoint, registered under the README's file name.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_harness as ch

REPO = ch.REPO_ROOT
pytestmark = pytest.mark.integration


def readme_headless_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Headless runs"):]
    block = section[section.index("```") + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    cmds, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmd = re.sub(r"\s+#\s.*$", "", cur).strip()  # a trailing "   # comment"
        if cmd:
            cmds.append(cmd)
        cur = ""
    return cmds


def _pack_commands(verb: str) -> list[str]:
    return [c for c in readme_headless_commands() if c.startswith(f"python . {verb} ")]


def _run(cmd: str, cwd=REPO, timeout=600):
    assert cmd.startswith("python "), cmd
    cmd = shlex.quote(sys.executable) + cmd[len("python"):]
    env = dict(os.environ, COMFYUI_PATH=str(ch.find_comfyui()))
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_readme_lists_the_headless_commands():
    verbs = {c.split()[2] for c in readme_headless_commands() if c.startswith("python . ")}
    assert {"run", "check", "convert"} <= verbs, readme_headless_commands()


def test_readme_check_command_verbatim(comfy):
    (cmd,) = _pack_commands("check")
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": OK") == len(list((REPO / "workflows").glob("*.json")))
    assert "comfyui-mace: using the copy at" in r.stderr


def test_readme_convert_command_verbatim(comfy, tmp_path):
    (cmd,) = _pack_commands("convert")
    out = re.search(r"-o (\S+)", cmd).group(1)  # relative to the pack folder, as written
    try:
        r = _run(cmd)
        assert r.returncode == 0, r.stdout + r.stderr
        api = json.loads((REPO / out).read_text())
        assert {n["class_type"] for n in api.values()} >= {"MaceRefineCrossAttention"}
    finally:
        (REPO / out).unlink(missing_ok=True)


def test_readme_run_command_sets_what_it_says(comfy):
    (cmd,) = _pack_commands("run")
    r = _run(cmd.replace("python . run ", "python . convert ", 1))
    assert r.returncode == 0, r.stdout + r.stderr
    api = json.loads(r.stdout)
    sets = {k: v for k, v in re.findall(r"--set (\w+\.\w+)=(\"[^\"]*\"|\S+)", cmd)}
    assert sets, cmd
    for key, raw in sets.items():
        node, field = key.rsplit(".", 1)
        value = raw.strip('"')
        hits = [n for n in api.values() if n["class_type"] == node
                or (n.get("_meta") or {}).get("title") == node]
        assert len(hits) == 1, (key, hits)
        assert hits[0]["inputs"][field] == value, (key, hits[0]["inputs"])


@pytest.mark.slow
def test_readme_run_command_executes_on_the_tiny_checkpoint(comfy, tiny_ckpt, tmp_path):
    (cmd,) = _pack_commands("run")
    name = re.search(r"ckpt_name=(\S+)", cmd).group(1)
    models = tmp_path / "ckpts"
    models.mkdir()
    (models / name).symlink_to(tiny_ckpt)
    out = tmp_path / "out"
    r = _run(cmd + f" --extra-model-dir checkpoints={models} --output-directory {out}", timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "finished workflows/erase_style_cfr.json" in r.stdout

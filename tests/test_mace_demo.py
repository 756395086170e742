"""scripts/mace_demo.py as a newcomer meets it: clear refusals (unknown word -> the valid words,
``--n 0``), several concepts with ``;``, advice that names the demo's own options when ComfyUI
is missing, and a labelled before/after PNG."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import mace_demo  # noqa: E402

WEIGHTS = REPO / "toyworld" / "v1" / "weights"


def _demo(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "scripts.mace_demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_concepts_split_on_semicolons():
    assert mace_demo.concept_text("red, crimson; blue ;\n green") == "red, crimson\nblue\ngreen"


def test_unknown_word_lists_the_valid_words_without_traceback():
    r = _demo("--concepts", "red; purpel")
    assert r.returncode == 2
    assert "'purpel' is not a colour word" in r.stderr
    assert "red (crimson, scarlet)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("n", ["0", "-3", "x"])
def test_n_below_one_is_refused(n):
    r = _demo("--n", n)
    assert r.returncode == 2 and "--n" in r.stderr and "Traceback" not in r.stderr


def test_missing_comfyui_advice_names_options_the_demo_has(tmp_path):
    r = _demo("--checkpoint", "x.safetensors", "--comfyui", str(tmp_path / "no_comfyui"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    parser_opts = {o for a in mace_demo.build_parser()._actions for o in a.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", r.stderr))
    assert named, r.stderr
    assert named <= parser_opts, f"advice names {named - parser_opts}, demo has {sorted(parser_opts)}"


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason="toy-world weights absent")
def test_grid_png_is_labelled(tmp_path):
    from PIL import Image

    from toyworld.v1.evaluate import load_toyworld

    world = load_toyworld()
    rows = [("erased word", "red"), ("held-out synonym", "crimson"), ("kept colour", "blue")]
    path = tmp_path / "g.png"
    mace_demo.write_grid(world, rows, world.kv_weights(), str(path), title="t")
    img = Image.open(path)
    # label column + two halves of 4 tiles; title, header, 3 rows of 96 px tiles
    assert img.width > 2 * 4 * 96 and img.height >= 3 * 96 + 28
    # the label column is not empty (text drawn), nor is the header band
    px = img.convert("L").load()
    assert any(px[x, y] < 128 for x in range(0, 180) for y in range(60, 60 + 96))
    assert any(px[x, y] < 128 for x in range(200, img.width) for y in range(30, 54))

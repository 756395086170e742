"""scripts/mace_demo.py as a newcomer meets it: the default (toy world v2: names and styles erased on
the recommended path, the table and a labelled grid), clear refusals (unknown word -> the valid
words, ``--n 0``, a v1 option in v2), several concepts with ``;``, advice that names the demo's own
options when ComfyUI is missing, and v1's labelled before/after PNG."""
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
WEIGHTS_V2 = REPO / "toyworld" / "v2" / "weights"


def _demo(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "scripts.mace_demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_concepts_split_on_semicolons():
    assert mace_demo.concept_text("red, crimson; blue ;\n green") == "red, crimson\nblue\ngreen"


def test_unknown_word_lists_the_valid_words_without_traceback():
    r = _demo("--world", "v1", "--concepts", "red; purpel")
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


def test_v1_options_in_v2_name_themselves_and_the_way_out():
    r = _demo("--concepts", "red", "--lamb", "0.1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--concepts, --lamb" in r.stderr and "--world v1" in r.stderr and "--names" in r.stderr
    r = _demo("--names", "0", "--styles", "0")
    assert r.returncode == 2 and "nothing to erase" in r.stderr
    r = _demo("--names", "101")
    assert r.returncode == 2 and "--names" in r.stderr and "0 to 100" in r.stderr


@pytest.mark.skipif(not WEIGHTS_V2.is_dir(), reason="toy-world v2 weights absent")
@pytest.mark.parametrize("method, says", [(None, "the ACE gate"), ("text_gate", "the compiled text gate"),
                                          ("cfr", "CFR + prior")])
def test_default_demo_erases_names_and_styles_and_draws_the_grid(tmp_path, capsys, method, says):
    """The default demo at a small size (3 names, 1 style, 6 prompts per set; ``make demo`` runs 10
    names, 2 styles, 100 per set), and its other two methods: the names and the style are erased,
    the table has both models' rows with n and SE, and the grid has a row per prompt and both columns."""
    from PIL import Image

    mace_demo.main(["--names", "3", "--styles", "1", "--n", "6", "--out", str(tmp_path)]
                   + (["--method", method] if method else []))
    out = capsys.readouterr().out
    assert f"erased 3 names, then 1 styles with {says}" in out
    rows = {tuple(c.strip() for c in line.split("|")[:2]): line for line in out.splitlines()
            if line.count("|") == 5 and line.startswith(("names", "styles"))}
    assert set(rows) == {("names", "original"), ("names", "erased"), ("styles", "original"), ("styles", "erased")}
    acc_e = lambda line: float(line.split("|")[2].split()[0])     # noqa: E731
    assert acc_e(rows["names", "erased"]) < acc_e(rows["names", "original"])
    assert acc_e(rows["styles", "erased"]) < acc_e(rows["styles", "original"])
    assert all(re.search(r"± \d\.\d{3} \(n=\d+\)", line) for line in rows.values())
    img = Image.open(tmp_path / "demo_grid.png")
    # label column + 2 columns of 96 px cells; title + 3 x 3 name rows + 3 style rows
    assert img.width >= 420 + 2 * 96 and img.height >= 12 * 96
    px = img.convert("L").load()
    assert any(px[x, y] < 128 for x in range(0, 400) for y in range(44, 44 + 96))


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

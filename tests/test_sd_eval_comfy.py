"""``python -m bench.sd_eval`` end to end on the tiny SD1.5-layout checkpoint: CFR through the pack's
node, then MACE Erasure Check, through ComfyUI's executor; the rows in ``mass_quality``'s schema.
Slow (a CFR fit with the 12-layer tiny CLIP); the node itself is tested in test_erasure_check_comfy."""
from __future__ import annotations

import json

import pytest


@pytest.mark.integration
@pytest.mark.slow
def test_sd_eval_cfr_then_check(comfy, tiny_ckpt, tmp_path):
    from bench import sd_eval

    (tmp_path / "erase.txt").write_text("ship, boat\n")
    (tmp_path / "keep.txt").write_text("dog\n")
    (tmp_path / "held.txt").write_text("vessel -> ship\n")
    out = tmp_path / "run"
    report = sd_eval.main(["--checkpoint", str(tiny_ckpt), "--erase", str(tmp_path / "erase.txt"),
                           "--keep", str(tmp_path / "keep.txt"), "--held-out", str(tmp_path / "held.txt"),
                           "--type", "object", "--images", "1", "--steps", "1", "--size", "64", "--draws", "1",
                           "--sampler", "euler", "--scheduler", "normal", "--cpu", "--out", str(out)])
    saved = json.loads((out / "sd_eval.json").read_text())
    assert saved["rows"] == report["rows"] and [r["method"] for r in saved["rows"]] == ["none", "cfr"]
    for row in saved["rows"]:
        assert row["n_e"] == row["n_g"] == row["n_s"] == 1 and 0 <= row["acc_e"] <= 1 and 0 <= row["acc_s"] <= 1
    assert (out / "mace_checks").is_dir()


def test_sd_eval_names_a_missing_file(tmp_path):
    from bench import sd_eval

    with pytest.raises(SystemExit, match="--checkpoint"):
        sd_eval.main(["--checkpoint", str(tmp_path / "none.safetensors"), "--erase", "x", "--keep", "y"])

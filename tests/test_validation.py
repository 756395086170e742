"""Issue 11, class 2: numbers are checked up front; nothing non-finite is saved, loaded, fused or applied."""
import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from fake_denoiser import FakeDenoiser, fake_latents_and_masks
from fakes import FakeTextEncoder, fake_kv_weights
from mace_ops import erasure_file as ef
from mace_ops.cfr import CFRConfig, refine_cross_attention
from mace_ops.concepts import Concept, parse_concepts
from mace_ops.fusion import fuse_loras
from mace_ops.lora import KVLora
from mace_ops.lora_file import load_concept_lora, save_concept_lora
from mace_ops.lora_train import LoraTrainConfig, train_concept_lora
from mace_ops.templates import OBJECT_TEMPLATES
from mace_ops.validation import check_number, derive_seed, require_finite

torch.set_num_threads(1)
ENC = FakeTextEncoder()
W0 = fake_kv_weights()
SHIP = Concept(("ship",), line=1)
LATENTS, _ = fake_latents_and_masks()
FAST = LoraTrainConfig(steps=3, lr=1e-2, seed=0)
INFO = {"concept": ["ship"], "steps": 1, "lr": 0.1, "seed": 0, "settings": {}}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 2e12, True, "1"])
def test_check_number_refuses(value):
    with pytest.raises(ValueError, match="^lambda: "):
        check_number(value, "lambda", 0.0, 1e12)


def test_check_number_accepts_and_integers():
    assert check_number(0.0, "x", 0.0, 1.0) == 0.0 and check_number(3.0, "n", 1, 5, integer=True) == 3
    with pytest.raises(ValueError, match="whole number"):
        check_number(2.5, "n", 1, 5, integer=True)
    with pytest.raises(ValueError, match=r"outside \(0"):
        check_number(0.0, "lr", 0.0, 1.0, lo_open=True)


def test_largest_seed_works_wherever_offsets_are_added():
    top = 2**64 - 1
    assert derive_seed(top, 0) == top and derive_seed(top, 2) == 1
    res = train_concept_lora(FakeDenoiser(), ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                             dataclasses.replace(FAST, seed=top))
    assert all(math.isfinite(x) for x in res.losses)


@pytest.mark.parametrize("field,value", [("lamb", math.nan), ("lamb", math.inf), ("preserve_scale", math.nan),
                                         ("lamb", -1.0)])
def test_cfr_refuses_bad_numbers_before_encoding(field, value):
    calls = []

    class Counting(FakeTextEncoder):
        def encode(self, prompts):
            calls.append(len(prompts))
            return super().encode(prompts)

    cfg = dataclasses.replace(CFRConfig(), **{field: value})
    with pytest.raises(ValueError, match="lambda|preserve_scale"):
        refine_cross_attention(Counting(), W0, parse_concepts("ship"), OBJECT_TEMPLATES, "ground", (), cfg)
    assert calls == []  # refused up front, not 40 s later inside a solve


@pytest.mark.parametrize("over", [{"lr": math.nan}, {"lr": math.inf}, {"steps": 0}, {"gamma": math.nan},
                                  {"seed": 2**64}, {"seed": -1}])
def test_lora_settings_refused_up_front(over):
    with pytest.raises(ValueError, match="LoRA|CFIS|seed"):
        train_concept_lora(FakeDenoiser(), ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None,
                           dataclasses.replace(FAST, **over))


def test_nan_images_and_diverging_training_stop_with_the_stage_named():
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="LoRA training images: holds NaN"):
        train_concept_lora(FakeDenoiser(), ENC, SHIP, OBJECT_TEMPLATES, bad, None, FAST)

    class Diverging(FakeDenoiser):  # the LoRA'd weights blow up from step 2 on
        calls = 0

        def forward_with_attention(self, x_t, t, context, on_attention, weight_transform=None):
            Diverging.calls += 1
            bad = Diverging.calls >= 2
            wt = (lambda n, w: weight_transform(n, w) * float("nan")) if bad and weight_transform else weight_transform
            return super().forward_with_attention(x_t, t, context, on_attention, wt)

    with pytest.raises(ValueError, match="LoRA training for 'ship': .*(nan|NaN).*lower the learning rate"):
        train_concept_lora(Diverging(), ENC, SHIP, OBJECT_TEMPLATES, LATENTS, None, FAST)


def test_nothing_non_finite_is_saved(tmp_path):
    lora = KVLora.for_weights(W0, seed=0)
    with torch.no_grad():
        next(iter(lora.up.values()))[0, 0] = float("inf")
    with pytest.raises(ValueError, match="save concept LoRA.*NaN or inf.*Nothing was saved"):
        save_concept_lora(str(tmp_path / "l.safetensors"), lora, "fp", INFO)
    deltas = {k: torch.zeros_like(w) for k, w in W0.items()}
    next(iter(deltas.values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="save erasure"):
        ef.save_erasure(str(tmp_path / "e.safetensors"), deltas, "fp", {})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_files_are_not_loaded_or_fused(tmp_path):
    lora = KVLora.for_weights(W0, seed=0)
    path = tmp_path / "l.safetensors"
    save_concept_lora(str(path), lora, "fp", INFO)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="l.safetensors: .*holds NaN or inf.*train the LoRA again"):
        load_concept_lora(str(path))
    factors = lora.factors()
    factors[next(iter(factors))].down[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fusion: a LoRA.*NaN"):
        fuse_loras(ENC, W0, W0, [(SHIP, factors)], OBJECT_TEMPLATES, (), 1.0, 1.0)
    with pytest.raises(ValueError, match="lambda"):
        fuse_loras(ENC, W0, W0, [(SHIP, lora)], OBJECT_TEMPLATES, (), math.nan, 1.0)


def test_require_finite_names_the_tensor():
    with pytest.raises(ValueError, match="stage X: b holds NaN or inf values; do Y"):
        require_finite({"a": torch.zeros(2), "b": torch.tensor([1.0, math.inf])}, "stage X", "do Y")
    require_finite({"i": torch.arange(3)}, "ok", "")

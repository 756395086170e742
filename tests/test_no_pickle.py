"""No pickle anywhere: the toy-world resume state is safetensors + JSON (toyworld/train_state.py)
and no Python file of the project calls ``torch.load`` without ``weights_only=True`` (the eval-unlearn
.pt interop reads plain tensor dicts that way), ``weights_only=False`` or ``pickle.load``."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from toyworld.train_state import load_state, save_state  # noqa: E402

SKIP_DIRS = {".venv", ".cache", ".git", "out", "__pycache__", "node_modules"}


def _project_py_files():
    for p in REPO.rglob("*.py"):
        if not SKIP_DIRS.intersection(p.relative_to(REPO).parts):
            yield p


def test_no_pickle_loading_in_the_project():
    bad = []
    for p in _project_py_files():
        if p.name == Path(__file__).name:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            bare_load = re.search(r"\btorch\.load\(", line) and not re.search(r"weights_only\s*=\s*True", line)
            if bare_load or re.search(r"weights_only\s*=\s*False|\bpickle\.loads?\(", line):
                bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    gen = torch.Generator().manual_seed(seed)
    return model, opt, sched, gen


def _step(model, opt, sched, gen):
    x = torch.randn(16, 4, generator=gen)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def test_resume_state_round_trip_continues_identically(tmp_path):
    model, opt, sched, gen = _setup()
    for _ in range(3):
        _step(model, opt, sched, gen)
    path = tmp_path / "state.safetensors"
    save_state({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": 3,
                "elapsed": 1.5, "betas": (0.9, 0.999), "none": None}, path)
    expected = [_step(model, opt, sched, gen) for _ in range(3)]

    st = load_state(path)
    assert st["step"] == 3 and st["elapsed"] == 1.5 and st["betas"] == (0.9, 0.999) and st["none"] is None
    m2, o2, s2, g2 = _setup(seed=1)
    m2.load_state_dict(st["model"])
    o2.load_state_dict(st["opt"])
    s2.load_state_dict(st["sched"])
    g2.set_state(st["gen"])
    torch.set_rng_state(st["torch_rng"])
    assert [_step(m2, o2, s2, g2) for _ in range(3)] == expected


def test_load_state_refuses_other_files(tmp_path):
    with pytest.raises(ValueError, match="no pickle"):
        load_state(tmp_path / "state.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a training state"):
        load_state(tmp_path / "other.safetensors")

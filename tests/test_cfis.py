"""CFIS: the density's documented moments, sampling accuracy, uniform mode, seeding, errors."""
import pytest
import torch

from mace_ops.cfis import TimestepSampler, cfis_density

T = torch.arange(1000, dtype=torch.float64)


def test_density_moments():
    p = cfis_density()
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert abs(float(p.sum()) - 1) < 1e-12
    assert 200 <= int(p.argmax()) <= 400
    assert abs(float(p[200:400].sum()) - 0.861) < 2e-3
    assert abs(float(p[150:450].sum()) - 0.984) < 2e-3
    assert float(p[:100].sum()) < 1e-3 and float(p[500:].sum()) < 1e-3
    assert abs(float((p * T).sum()) - 300) < 0.5
    assert abs(float(p.max()) - 0.00493) < 5e-5


def test_histogram_of_samples_matches_density():
    p = cfis_density()
    t = TimestepSampler("cfis", seed=0).sample(1_000_000)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    freq = torch.bincount(t, minlength=1000).double() / t.numel()
    assert 0.5 * float((freq - p).abs().sum()) < 0.01  # total variation
    coarse_p, coarse_f = p.reshape(20, 50).sum(1), freq.reshape(20, 50).sum(1)
    big = coarse_p > 0.05
    assert ((coarse_f[big] - coarse_p[big]).abs() / coarse_p[big]).max() < 0.01
    assert abs(float(t.double().mean()) - 300) < 1.0


def test_uniform_mode():
    s = TimestepSampler("uniform", seed=3)
    t = s.sample(1_000_000)
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert abs(float(t.double().mean()) - 499.5) < 1.5
    assert abs(s.mean() - 499.5) < 1e-9


def test_seeded_and_shifted():
    a, b = TimestepSampler(seed=7).sample(100), TimestepSampler(seed=7).sample(100)
    assert torch.equal(a, b)
    assert not torch.equal(a, TimestepSampler(seed=8).sample(100))
    p = cfis_density(t1=500, t2=700)
    assert 500 <= int(p.argmax()) <= 700 and abs(float((p * T).sum()) - 600) < 1
    assert TimestepSampler(seed=0).sample(0).numel() == 0


@pytest.mark.parametrize(
    "kwargs,fragment",
    [({"t1": 400, "t2": 200}, "t1 < t2"), ({"gamma": 0.0}, "gamma"), ({"num_timesteps": 0}, "num_timesteps")],
)
def test_bad_density_args(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        cfis_density(**kwargs)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'gauss'"):
        TimestepSampler("gauss")

"""toyvae.io: the --model file format round-trips, and refuses what it cannot hold."""

import numpy as np
import pytest
import seeds
import torch

from toyvae import LinearGaussian
from toyvae.io import load, read, save


@pytest.mark.parametrize("noise", [0.5, np.array([0.5, 1.0, 2.0]), np.diag([0.5, 1.0, 2.0])])
def test_save_then_read_gives_the_same_model_and_data(noise, tmp_path):
    """Every noise kind round-trips exactly (float64, no pickling), with and without x."""
    rng = seeds.rng(0)
    model = LinearGaussian(rng.normal(size=(3, 2)), rng.normal(size=3), noise)
    x = rng.normal(size=(4, 3))
    path = save(model, tmp_path / "m.npz", x=x)
    assert path == tmp_path / "m.npz" and path.exists()
    loaded, data = read(path)
    for name in ("weight", "bias", "noise_variance"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    assert torch.equal(data, torch.as_tensor(x))
    assert read(save(model, tmp_path / "no-suffix")).x is None
    assert torch.equal(load(tmp_path / "no-suffix").weight, model.weight)


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    """Another model type, a non-standard prior, or x that is not (N, D) rows."""
    model = LinearGaussian(np.ones((3, 1)))
    with pytest.raises(TypeError, match=r"model must be a toyvae\.LinearGaussian"):
        save(object(), tmp_path / "a.npz")
    prior = torch.distributions.MultivariateNormal(
        torch.ones(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="standard prior"):
        save(LinearGaussian(np.ones((3, 1)), prior=prior), tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"x must be an \(N, D\) matrix"):
        save(model, tmp_path / "a.npz", x=np.ones(3))

"""Noise covariance objects: one implementation per kind, each checked against its dense Ψ."""

import math

import pytest
import seeds
import torch

from toyvae.noise import DiagonalNoise, FullNoise, IsotropicNoise, noise_covariance

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _noises(d=4):
    gen = seeds.generator(0)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    return [
        noise_covariance(torch.tensor(0.7, dtype=F64), d),
        noise_covariance(torch.rand(d, generator=gen, dtype=F64) + 0.2, d),
        noise_covariance(a @ a.T + torch.eye(d, dtype=F64), d),
    ]


def test_kinds_are_read_from_the_shape():
    """0-d is isotropic, (D,) diagonal, (D, D) full."""
    kinds = [type(n) for n in _noises()]
    assert kinds == [IsotropicNoise, DiagonalNoise, FullNoise]
    assert [n.kind for n in _noises()] == ["isotropic", "diagonal", "full"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_operations_agree_with_the_dense_covariance(index):
    """whiten, color, log_det, distribution and eigenvalues agree with the dense Ψ."""
    noise = _noises()[index]
    psi = noise.dense()
    v = torch.randn(3, 4, generator=seeds.generator(1), dtype=F64)
    # vᵀΨ⁻¹v from the whitened vector against a dense solve; κ(Ψ) ≤ 30 here, so 1e3·eps of the
    # size is far above rounding and far below any wrong factor (which changes it by O(1)).
    quad = noise.whiten(v).square().sum(-1)
    dense_quad = (v * torch.linalg.solve(psi, v.mT).mT).sum(-1)
    assert (quad - dense_quad).abs().max() <= 1e3 * EPS * dense_quad.abs().max()
    # colouring then whitening is the identity
    assert (noise.whiten(noise.color(v)) - v).abs().max() <= 1e3 * EPS * v.abs().max()
    assert abs(noise.log_det() - torch.logdet(psi)) <= 1e3 * EPS * abs(torch.logdet(psi))
    m = torch.randn(4, 2, generator=seeds.generator(2), dtype=F64)
    assert (noise.whiten_columns(m) - noise.whiten(m.mT).mT).abs().max() <= 1e3 * EPS
    expected = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=F64), psi)
    got = noise.distribution(torch.zeros(4, dtype=F64)).log_prob(v)
    assert (got - expected.log_prob(v)).abs().max() <= 1e3 * EPS * (4 * math.log(2 * math.pi))
    eig = torch.linalg.eigvalsh(psi)
    assert (noise.eigenvalues().sort().values - eig).abs().max() <= 1e3 * EPS * eig.max()


def test_bad_variances_raise_errors_that_name_them():
    """Wrong shapes, non-positive variances and indefinite matrices name the argument."""
    with pytest.raises(ValueError, match=r"psi must be a scalar.*\(3,\).*got an array of shape"):
        noise_covariance(torch.ones(2, dtype=F64), 3, "psi")
    with pytest.raises(ValueError, match="psi must be strictly positive"):
        noise_covariance(torch.tensor(-1.0, dtype=F64), 3, "psi")
    with pytest.raises(ValueError, match="psi must be positive definite"):
        noise_covariance(-torch.eye(3, dtype=F64), 3, "psi")

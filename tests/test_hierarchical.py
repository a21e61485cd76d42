r"""toyvae.hierarchical: the hierarchical model, its top-down q, and the per-layer ELBO.

Error model, as in test_reference.py and test_high_precision.py. A route of backward-stable steps
has relative error at most m·eps against the *scale* of its result, the sum of the magnitudes of
the terms it is built from, amplified by the condition number κ of what it factors or inverts.
Two routes with independent errors differ by at most 2·m·κ·eps·scale. Identities between exact
quantities use :func:`toyvae.tolerances.identity_tolerance` (4·n·eps·M, n = ``term_count``,
M = :meth:`HierarchicalLinearGaussian.magnitude`). Products built by the top-down recursion
(the prior's and q's Cholesky factors) are compared elementwise against Higham's bound
γ_n·|A||B|, with the absolute values carried through the same recursion.
"""

from __future__ import annotations

from typing import NamedTuple

import mp_oracle as oracle
import numpy as np
import pytest
import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import chi2, multivariate_normal
from test_high_precision import EPS, model_growth
from torch.distributions import Independent, MultivariateNormal, Normal

import toyvae
from toyvae import reference as ref
from toyvae.hierarchical import (
    HierarchicalLinearGaussian,
    LayerwiseELBO,
    TopDownGaussian,
    _joint,
    layerwise_elbo,
)
from toyvae.interface import ConjugateModel
from toyvae.strategies import hierarchical_models, top_down_gaussians
from toyvae.tolerances import identity_tolerance, posterior_condition

# -- fixed models ------------------------------------------------------------------------------


class Case(NamedTuple):
    """A fixed model's parameters (NumPy, data side first), the model, and data points."""

    name: str
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    noises: list  # σ², (n,) variances or (n, n) covariances
    model: HierarchicalLinearGaussian
    x: np.ndarray  # (3, D)

    def dense_noises(self) -> list[np.ndarray]:
        return [
            ref.noise_covariance(v, w.shape[0])
            for v, w in zip(self.noises, self.weights, strict=True)
        ]

    def joint(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense joint (mean, covariance) of (z_L, …, z_1, x), by the reference chain."""
        top = self.weights[-1].shape[1]
        return ref.gaussian_chain(
            np.zeros(top),
            np.eye(top),
            self.weights[::-1],
            self.biases[::-1],
            self.dense_noises()[::-1],
        )


def _spd(rng: np.random.Generator, n: int) -> np.ndarray:
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = (basis * rng.uniform(0.2, 2.0, n)) @ basis.T
    return (matrix + matrix.T) / 2


def _case(seed: int, d: int, dims: tuple[int, ...], kinds: tuple[str, ...]) -> Case:
    rng = seeds.rng(seed)
    sizes = [d, *dims]
    weights = [rng.standard_normal((sizes[i], sizes[i + 1])) for i in range(len(dims))]
    biases = [rng.standard_normal(sizes[i]) for i in range(len(dims))]
    noises = []
    for kind, n in zip(kinds, sizes, strict=False):
        if kind == "isotropic":
            noises.append(float(rng.uniform(0.3, 2.0)))
        elif kind == "diagonal":
            noises.append(rng.uniform(0.2, 2.0, n))
        else:
            noises.append(_spd(rng, n))
    model = HierarchicalLinearGaussian(weights, biases, noises)
    x, _ = model.sample((3,), generator=seeds.generator(seed))
    name = f"D={d} K={dims} {'/'.join(kinds)}"
    return Case(name, weights, biases, noises, model, x.numpy())


CASES = [
    _case(0, 4, (3, 2), ("diagonal", "isotropic")),
    _case(1, 5, (3, 2, 2), ("full", "diagonal", "full")),
    _case(2, 2, (1, 2, 1), ("isotropic", "isotropic", "diagonal")),
    _case(3, 3, (2, 3, 2, 1), ("diagonal", "full", "isotropic", "diagonal")),
]
DEEP_CASES = [case for case in CASES if case.model.num_layers >= 3]


def _ids(case: Case) -> str:
    return case.name


def _cond(matrix: np.ndarray) -> float:
    return float(np.linalg.cond(matrix))


def _kappa_ref(case: Case) -> float:
    """κ_ref = κ(Ψ_0)² (1 + ‖Ã‖²), Ã = L_Ψ0⁻¹ W_0 P_1^{1/2}: bounds κ(C_x) and κ(Ψ_0)κ(Λ_u).

    The flat model in the prior's standard coordinates has loading W_0 T_1 (T_1 the z_1 rows of
    the prior's factor, P_1 = T_1 T_1ᵀ), so test_reference.py's bound applies with that loading.
    """
    _, cov = case.joint()
    k = case.model.latent_dim
    k1 = case.model.layer_dims[0]
    psi = case.dense_noises()[0]
    p1 = cov[k - k1 : k, k - k1 : k]
    loading = case.weights[0] @ p1 @ case.weights[0].T
    norm = float(np.max(np.linalg.eigvals(np.linalg.solve(psi, loading)).real))
    return _cond(psi) ** 2 * (1 + norm)


def _growth(model: HierarchicalLinearGaussian) -> int:
    """m: the flat model's (test_high_precision.model_growth), plus L·K for the prior's factor
    (L block rows, each a product over at most K terms)."""
    return model_growth(model.data_dim, model.latent_dim) + model.num_layers * model.latent_dim


def _fixed_q(model: HierarchicalLinearGaussian, seed: int, *, batch=(), ladder=True):
    """A top-down q with (optionally) batched means; ladder weights, or all-layers-above ones."""
    rng = seeds.rng(seed)
    dims = model.layer_dims
    locs = [rng.standard_normal((*batch, k)) for k in dims]
    trils = [
        np.tril(0.3 * rng.standard_normal((k, k)), -1) + np.diag(rng.uniform(0.4, 1.5, k))
        for k in dims
    ]
    weights = [
        rng.standard_normal((dims[i], dims[i + 1] if ladder else sum(dims[i + 1 :])))
        for i in range(len(dims) - 1)
    ]
    return TopDownGaussian(locs, trils, weights)


def _absolute(q: TopDownGaussian) -> toyvae.Gaussian:
    """The top-down recursion run on |m_l|, |S_l|, |A_l|: Higham's |A||B| for every entry."""
    return _joint(
        [loc.abs() for loc in q.locs],
        [s.abs() for s in q.scale_trils],
        [a.abs() for a in q.weights],
        tuple(q.batch_shape),
    )


# -- the model and its interface ---------------------------------------------------------------


def test_implements_the_model_interface():
    """The model is a ConjugateModel with K = ΣK_l, event shape (D,), n = D + K + L, float64."""
    model = CASES[1].model
    assert isinstance(model, ConjugateModel)
    assert model.layer_dims == (3, 2, 2) and model.num_layers == 3
    assert model.latent_dim == 7 and model.data_dim == 5
    assert model.data_event_shape == torch.Size([5])
    assert model.term_count == 5 + 7 + 3
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    assert model.prior().event_shape == (7,)
    assert "layer_dims=(3, 2, 2)" in repr(model)


def test_float32_parameters_set_the_dtype_and_a_scalar_noise_is_shared():
    """weights[0]'s dtype is the model's, other inputs follow it; one scalar Ψ serves all layers."""
    weights = [torch.ones(3, 2, dtype=torch.float32), np.ones((2, 1))]
    model = HierarchicalLinearGaussian(weights, noise_variances=0.5)
    assert model.dtype == torch.float32
    assert all(w.dtype == torch.float32 for w in model.weights)
    assert all(b.dtype == torch.float32 and not b.any() for b in model.biases)
    assert [n.kind for n in model.noises] == ["isotropic", "isotropic"]
    assert all(float(v) == 0.5 for v in model.noise_variances)
    assert model.log_evidence(torch.zeros(3)).dtype == torch.float32


def test_split_and_join_latents_order_the_flat_vector_top_down():
    """The flat z is (z_L, …, z_1): split_latents gives (z_1, …, z_L); join_latents inverts it."""
    model = CASES[1].model  # K = (3, 2, 2)
    z = torch.arange(14.0, dtype=torch.float64).reshape(2, 7)
    z1, z2, z3 = model.split_latents(z)
    assert torch.equal(z3, z[:, :2]) and torch.equal(z2, z[:, 2:4]) and torch.equal(z1, z[:, 4:])
    assert torch.equal(model.join_latents([z1, z2, z3]), z)
    # Batch shapes broadcast: one top layer for both rows.
    joined = model.join_latents([z1, z2, z3[0]])
    assert torch.equal(joined[:, :2], z3[0].expand(2, 2))


def test_is_immutable_and_refuses_parameters_modified_in_place():
    """Attributes cannot be set, and a weight edited in place after construction raises."""
    weights = [torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)]
    model = HierarchicalLinearGaussian(weights)
    with pytest.raises(AttributeError, match="immutable"):
        model.weights = ()
    q = _fixed_q(model, 0)
    with pytest.raises(AttributeError, match="immutable"):
        q.locs = ()
    weights[1].add_(1.0)
    with pytest.raises(RuntimeError, match=r"weights\[1\] was modified in place"):
        model.log_evidence(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_prior_is_the_chain_with_an_exact_block_triangular_factor(case):
    """prior() has the chain's mean and covariance; its factor is lower triangular, blocks L_Ψl."""
    model = case.model
    prior = model.prior()
    mean, cov = case.joint()
    k = model.latent_dim
    # Each entry of T is a sum of ≤ K products of ≤ L factors, and T Tᵀ one more K-sum: relative
    # error ≤ (L + 2K)·eps of |T||T|ᵀ per route (Higham γ_n|A||B|), both routes: twice that.
    absolute = _absolute(model.prior_top_down())
    scale = (absolute.scale_tril @ absolute.scale_tril.mT).numpy()
    growth = 2 * (model.num_layers + 2 * k) * EPS
    assert np.all(np.abs(prior.covariance_matrix.numpy() - cov[:k, :k]) <= growth * scale)
    assert np.all(np.abs(prior.mean.numpy() - mean[:k]) <= growth * absolute.loc.numpy())
    tril = prior.scale_tril
    assert torch.equal(tril.triu(1), torch.zeros_like(tril))
    start = 0
    for layer in range(model.num_layers - 1, -1, -1):  # top-down: blocks are copied, not computed
        size = model.layer_dims[layer]
        block = tril[start : start + size, start : start + size]
        noise = case.noises[layer + 1] if layer < model.num_layers - 1 else None
        if noise is None:
            expected = torch.eye(size, dtype=torch.float64)
        elif np.ndim(noise) == 2:
            expected = torch.linalg.cholesky(torch.as_tensor(noise))
        else:  # σ² I or diag(v): L_Ψ = diag(√v) by torch.sqrt, which is not always correctly
            # rounded (√0.5241990759642555 gives …131, rounding gives …132, as LAPACK's Cholesky
            # of the dense diag(v) does): copied means equal to torch's √v, bit for bit.
            root = torch.as_tensor(noise, dtype=torch.float64).sqrt()
            expected = torch.diag(root.expand(size))
        assert torch.equal(block, expected)
        start += size


# -- exact answers against the dense oracle, scipy and mpmath ------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_log_evidence_matches_reference(case):
    """log p(x) equals the dense oracle's log N(x; μ_x, Σ_xx) of the chain's joint."""
    model, x = case.model, torch.as_tensor(case.x)
    expected, _, _ = ref.hierarchical_exact(case.weights, case.biases, case.noises, case.x)
    error = np.abs(model.log_evidence(x).numpy() - expected)
    # Two routes, each within m·κ_ref·eps of the terms' magnitude M (module docstring).
    bound = 2 * _growth(model) * _kappa_ref(case) * EPS * model.magnitude(x).numpy()
    assert np.all(error <= bound)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_posterior_matches_reference(case):
    """p(z|x) equals the oracle's Gaussian conditional μ_z + Σ_zx Σ_xx⁻¹ (x − μ_x), Σ_zz − …."""
    model, x = case.model, torch.as_tensor(case.x)
    _, means, covariance = ref.hierarchical_exact(case.weights, case.biases, case.noises, case.x)
    post = model.posterior(x)
    mean, cov = case.joint()
    k = model.latent_dim
    z, o = slice(0, k), slice(k, None)
    solved = np.linalg.solve(cov[o, o], (case.x - mean[o]).T).T
    # Scales: the magnitudes of the terms of each formula, elementwise; κ_ref as for log p(x).
    bound = 2 * _growth(model) * _kappa_ref(case) * EPS
    mean_scale = np.abs(mean[z]) + np.abs(solved) @ np.abs(cov[o, z])
    cov_scale = np.abs(cov[z, z]) + np.abs(cov[z, o]) @ np.abs(
        np.linalg.solve(cov[o, o], cov[o, z])
    )
    assert np.all(np.abs(post.mean.numpy() - means) <= bound * mean_scale)
    assert np.all(np.abs(post.covariance_matrix[0].numpy() - covariance) <= bound * cov_scale)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_log_joint_and_bayes_rule_match_scipy(case):
    """log p(x, z) is scipy's sum of the conditionals, and log p(x) = log p(x, z) − log p(z|x)."""
    model, x = case.model, torch.as_tensor(case.x)
    _, z = model.sample((3,), generator=seeds.generator(7))
    layers = [layer.numpy() for layer in model.split_latents(z)]
    children = [case.x, *layers[:-1]]
    expected = multivariate_normal(np.zeros(layers[-1].shape[-1])).logpdf(layers[-1])
    for w, b, psi, child, parent in zip(
        case.weights, case.biases, case.dense_noises(), children, layers, strict=True
    ):
        expected = expected + multivariate_normal(np.zeros(len(b)), psi).logpdf(
            child - parent @ w.T - b
        )
    post = model.posterior(x)
    log_posterior = np.array(
        [
            multivariate_normal(post.mean[i].numpy(), post.covariance_matrix[i].numpy()).logpdf(
                z[i].numpy()
            )
            for i in range(3)
        ]
    )
    tolerance = identity_tolerance(model, x, z=z).numpy()
    # scipy factors each Ψ_l (eigh): its relative error grows with κ(Ψ_l).
    kappa_noise = max(_cond(psi) for psi in case.dense_noises())
    assert np.all(np.abs(model.log_joint(x, z).numpy() - expected) <= kappa_noise * tolerance)
    # scipy's log p(z|x) factors the posterior covariance S Sᵀ, whose condition number is κ(S)².
    kappa = max(kappa_noise, posterior_condition(model) ** 2)
    residual = model.log_evidence(x).numpy() - (expected - log_posterior)
    assert np.all(np.abs(residual) <= kappa * tolerance)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_as_linear_gaussian_has_the_same_joint_density(case):
    """The flat LinearGaussian's log p(x, z) equals the chain's sum of conditional densities."""
    model, x = case.model, torch.as_tensor(case.x)
    _, z = model.sample((3,), generator=seeds.generator(8))
    flat = model.as_linear_gaussian()
    assert flat.latent_dim == model.latent_dim and flat.data_dim == model.data_dim
    # Two sums of the terms of log p(x, z) in M; the flat route solves against the prior's
    # factor T, whose conditioning is that of the whitened chain: κ(T) from its singular values.
    singular = torch.linalg.svdvals(model.prior().scale_tril)
    kappa = float(singular[0] / singular[-1])
    tolerance = identity_tolerance(model, x, z=z) * kappa
    assert ((flat.log_joint(x, z) - model.log_joint(x, z)).abs() <= tolerance).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_expected_log_likelihood_matches_reference(case):
    """E_q log p(x|z_1) equals the oracle's E_q log N(x; W_0 z_1 + b_0, Ψ_0) on q's z_1 marginal."""
    model, x = case.model, torch.as_tensor(case.x)
    q = _fixed_q(model, 11, batch=(3,), ladder=False).to_multivariate_normal()
    k1 = model.layer_dims[0]
    marginal_cov = q.covariance_matrix[..., -k1:, -k1:].numpy()
    expected = ref.expected_log_likelihood(
        case.weights[0],
        case.biases[0],
        case.noises[0],
        case.x,
        q.mean[..., -k1:].numpy(),
        marginal_cov,
    )
    error = np.abs(toyvae.expected_log_likelihood(model, x, q).numpy() - expected)
    # The oracle inverts Ψ_0 and applies it on both sides (test_reference.py): κ(Ψ_0)².
    kappa = _cond(case.dense_noises()[0]) ** 2
    assert np.all(error <= kappa * identity_tolerance(model, x, q).numpy())


def _mp_chain(case: Case):
    """The exact joint (mean, covariance) of (z_L, …, z_1, x) in 60-digit arithmetic."""
    mp = oracle.MP
    top = case.weights[-1].shape[1]
    mean, cov = mp.matrix(top, 1), mp.eye(top)
    previous = (0, top)
    for w, b, psi in zip(
        case.weights[::-1], case.biases[::-1], case.dense_noises()[::-1], strict=True
    ):
        w, b, psi = oracle.to_mp(w), oracle.to_mp(b), oracle.to_mp(psi)
        n, size = w.rows, cov.rows
        lo, hi = previous
        rows = cov[lo:hi, 0:size]
        cross = w * rows
        variance = w * cov[lo:hi, lo:hi] * w.T + psi
        grown = mp.matrix(size + n, size + n)
        grown[0:size, 0:size] = cov
        grown[size:, 0:size] = cross
        grown[0:size, size:] = cross.T
        grown[size:, size:] = variance
        new_mean = mp.matrix(size + n, 1)
        new_mean[0:size, 0] = mean
        new_mean[size:, 0] = w * mean[lo:hi, 0] + b
        mean, cov, previous = new_mean, grown, (size, size + n)
    return mean, cov


def test_matches_mpmath_on_a_tiny_model():
    """log p(x) and the posterior mean agree with 60-digit arithmetic within m·κ·eps·scale."""
    case = CASES[2]  # D = 2, K = (1, 2, 1)
    model = case.model
    mp = oracle.MP
    mean, cov = _mp_chain(case)
    k, d = model.latent_dim, model.data_dim
    x = case.x[0]
    residual = oracle.to_mp(x) - mean[k:, 0]
    c_inv = mp.inverse(cov[k:, k:])
    quadratic = (residual.T * c_inv * residual)[0, 0]
    exact = -(d * mp.log(2 * mp.pi) + mp.log(mp.det(cov[k:, k:])) + quadratic) / 2
    exact_mean = oracle.to_float(mean[:k, 0] + cov[:k, k:] * c_inv * residual).ravel()
    xt = torch.as_tensor(x)
    bound = _growth(model) * _kappa_ref(case) * EPS
    # log p(x): against M, the magnitude of its terms (test_high_precision's error model).
    assert abs(float(model.log_evidence(xt)) - float(exact)) <= bound * float(model.magnitude(xt))
    # The posterior mean: against its terms' magnitudes, as in test_posterior_matches_reference.
    fm, fc = case.joint()
    solved = np.linalg.solve(fc[k:, k:], x - fm[k:])
    scale = np.abs(fm[:k]) + np.abs(fc[:k, k:]) @ np.abs(solved)
    assert np.all(np.abs(model.posterior(xt).mean.numpy() - exact_mean) <= bound * scale)


# -- the top-down q ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_top_down_joint_is_the_chain_with_an_exact_factor(case):
    """A ladder q's joint has the chain's moments; its factor's diagonal blocks are the S_l."""
    q = _fixed_q(case.model, 5)
    joint = q.to_multivariate_normal()
    dims = q.layer_dims
    top = dims[-1]
    mean, cov = ref.gaussian_chain(
        q.locs[-1].numpy(),
        (q.scale_trils[-1] @ q.scale_trils[-1].mT).numpy(),
        [a.numpy() for a in q.weights[::-1]],
        [m.numpy() for m in q.locs[-2::-1]],
        [(s @ s.mT).numpy() for s in q.scale_trils[-2::-1]],
    )
    # As for the prior: Higham's γ_n|A||B| with n = L + 2K, twice for two routes.
    absolute = _absolute(q)
    growth = 2 * (q.num_layers + 2 * q.latent_dim) * EPS
    scale = (absolute.scale_tril @ absolute.scale_tril.mT).numpy()
    assert np.all(np.abs(joint.covariance_matrix.numpy() - cov) <= growth * scale)
    assert np.all(np.abs(joint.mean.numpy() - mean) <= growth * absolute.loc.numpy())
    tril = joint.scale_tril
    assert torch.equal(tril.triu(1), torch.zeros_like(tril))
    assert torch.equal(tril[:top, :top], q.scale_trils[-1])
    assert torch.equal(tril[-dims[0] :, -dims[0] :], q.scale_trils[0])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_from_multivariate_normal_inverts_to_multivariate_normal(case):
    """Block Cholesky recovers q's conditionals: S_l exactly, ladder A_l in the parent block."""
    q = _fixed_q(case.model, 6, batch=(2,))
    back = TopDownGaussian.from_multivariate_normal(q.to_multivariate_normal(), q.layer_dims)
    tril = q.to_multivariate_normal().scale_tril
    assert back.layer_dims == q.layer_dims and back.batch_shape == (2,)
    for s, s_back in zip(q.scale_trils, back.scale_trils, strict=True):
        assert torch.equal(s_back, s.expand_as(s_back))  # copied blocks
    start = q.layer_dims[-1]
    for layer in range(q.num_layers - 2, -1, -1):
        a, a_back = q.weights[layer], back.weights[layer]
        parent = q.layer_dims[layer + 1]
        above = tril[..., :start, :start]
        # A_back solves A_back T_above = T_{l,above}, itself A T_parent rounded: to first order
        # |error| ≤ 2K·eps·‖A‖·‖|T_above|‖·‖T_above⁻¹‖ (backward error of the triangular solve
        # and of the product, amplified by the solve).
        norm_inverse = torch.linalg.matrix_norm(torch.linalg.inv(above), 2)
        norm_abs = torch.linalg.matrix_norm(above.abs(), 2)
        bound = 2 * q.latent_dim * EPS * torch.linalg.matrix_norm(a, 2) * norm_abs * norm_inverse
        expected = torch.cat([a.new_zeros(*a.shape[:-1], start - parent), a], -1)
        error = (a_back - expected).abs().amax((-2, -1))
        assert (error <= bound.unsqueeze(-1)).all()
        # m_l = μ_l − A_l μ_above: the same error through A, and |A||μ| for the product.
        mean = q.to_multivariate_normal().mean[..., :start]
        loc_bound = bound * mean.abs().sum(-1) + 2 * start * EPS * (
            a_back.abs() @ mean.abs().unsqueeze(-1)
        ).squeeze(-1).sum(-1)
        assert ((back.locs[layer] - q.locs[layer]).abs().amax(-1) <= loc_bound).all()
        start += q.layer_dims[layer]


@pytest.mark.parametrize("case", DEEP_CASES, ids=_ids)
def test_the_posterior_is_markov_top_down(case):
    """p(z_l | z_{>l}, x) depends on z_{l+1} only: the other blocks of A_l vanish to rounding."""
    model, x = case.model, torch.as_tensor(case.x)
    post = model.posterior(x)
    q = TopDownGaussian.from_multivariate_normal(post, model.layer_dims)
    kappa_s = posterior_condition(model)
    # A = B C⁻¹ from the posterior factor's blocks; a relative error ε_T of T changes it by
    # ≤ ε_T κ(T)(1 + ‖A‖) to first order, with ε_T ≤ m κ(Λ) eps = m κ(S)² eps (the posterior
    # factor's bound, test_high_precision.py) and κ(T) ≤ κ(S).
    epsilon_t = _growth(model) * _kappa_ref(case) * EPS
    for layer in range(model.num_layers - 2):  # layers with more than their parent above them
        a = q.weights[layer]
        parent = model.layer_dims[layer + 1]
        bound = epsilon_t * kappa_s * (1 + torch.linalg.matrix_norm(a, 2))
        assert (a[..., :-parent].abs().amax((-2, -1)) <= bound).all()
        assert (
            a[..., -parent:].abs().amax((-2, -1)) > 1e3 * bound
        ).all()  # the parent block is not


# -- the per-layer ELBO: properties over generated models -----------------------------------------


@st.composite
def _model_data_q(draw, batch=(3,)):
    model = draw(hierarchical_models())
    x = torch.as_tensor(
        draw(arrays(np.float64, (*batch, model.data_dim), elements=st.floats(-6, 6, width=64)))
    )
    q = draw(top_down_gaussians(model, batch_shape=draw(st.sampled_from([(), batch]))))
    return model, x, q


@given(_model_data_q())
def test_layerwise_elbo_sums_to_the_joint_elbo(case):
    """reconstruction − Σ per-layer KLs equals toyvae.elbo of the joint q, to rounding."""
    model, x, q = case
    joint = q.to_multivariate_normal()
    terms = layerwise_elbo(model, x, q)
    assert isinstance(terms, LayerwiseELBO) and len(terms.kls) == model.num_layers
    assert torch.equal(terms.elbo, terms.reconstruction - torch.stack(terms.kls).sum(0))
    # Two sums of the terms in M (the per-layer route and the joint one): identity_tolerance.
    tolerance = identity_tolerance(model, x, joint)
    assert ((terms.elbo - toyvae.elbo(model, x, joint)).abs() <= tolerance).all()
    assert (
        (terms.reconstruction - toyvae.expected_log_likelihood(model, x, joint)).abs() <= tolerance
    ).all()


@given(_model_data_q())
def test_evidence_is_layerwise_elbo_plus_kl(case):
    """log p(x) = per-layer ELBO(q) + KL(q ‖ p(z|x)) for every top-down q, to rounding."""
    model, x, q = case
    joint = q.to_multivariate_normal()
    elbo = layerwise_elbo(model, x, q).elbo
    residual = model.log_evidence(x) - elbo - toyvae.kl_to_posterior(model, x, joint)
    # Three independently computed sums of the terms in M: identity_tolerance.
    assert (residual.abs() <= identity_tolerance(model, x, joint)).all()
    assert (elbo <= model.log_evidence(x) + identity_tolerance(model, x, joint)).all()


@given(st.data(), hierarchical_models())
def test_bound_is_tight_at_the_posterior(data, model):
    """The posterior as a TopDownGaussian has per-layer ELBO = log p(x) and KL = 0, to rounding."""
    x = torch.as_tensor(
        data.draw(arrays(np.float64, (2, model.data_dim), elements=st.floats(-6, 6, width=64)))
    )
    post = model.posterior(x)
    q = TopDownGaussian.from_multivariate_normal(post, model.layer_dims)
    joint = q.to_multivariate_normal()
    # The round trip solves against blocks of the posterior's factor S: identity_tolerance times
    # κ(S) (tolerances.posterior_condition), as for every solve against S.
    tolerance = identity_tolerance(model, x, post) * posterior_condition(model)
    assert ((layerwise_elbo(model, x, q).elbo - model.log_evidence(x)).abs() <= tolerance).all()
    assert (toyvae.kl_to_posterior(model, x, joint).abs() <= tolerance).all()


@pytest.mark.parametrize("ladder", [True, False], ids=["ladder", "all-layers-above"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_each_layer_kl_is_a_kl_between_joints(case, ladder):
    """kls[l] = KL(q(z_{≥l}) ‖ q(z_{>l}) p(z_l|z_{l+1})); kls[-1] = KL(q(z_L) ‖ N(0, I))."""
    model, x = case.model, torch.as_tensor(case.x)
    q = _fixed_q(model, 9, batch=(3,), ladder=ladder)
    joint = q.to_multivariate_normal()
    terms = layerwise_elbo(model, x, q)
    mean, cov = joint.mean.numpy(), joint.covariance_matrix.numpy()
    dims, noises = model.layer_dims, case.dense_noises()
    tolerance = identity_tolerance(model, x, joint).numpy()
    top = dims[-1]
    expected = ref.kl_to_prior(mean[..., :top], cov[..., :top, :top])
    assert np.all(np.abs(terms.kls[-1].numpy() - expected) <= tolerance)
    above = top
    for layer in range(model.num_layers - 2, -1, -1):
        k, parent = dims[layer], dims[layer + 1]
        upto = above + k
        w_bar = np.zeros((k, above))
        w_bar[:, -parent:] = case.weights[layer + 1]
        m_a, s_a = mean[..., :above], cov[..., :above, :above]
        p_mean = np.concatenate([m_a, m_a @ w_bar.T + case.biases[layer + 1]], -1)
        cross = w_bar @ s_a
        p_cov = np.block(
            [[s_a, np.swapaxes(cross, -1, -2)], [cross, cross @ w_bar.T + noises[layer + 1]]]
        )
        expected = ref.gaussian_kl(mean[..., :upto], cov[..., :upto, :upto], p_mean, p_cov)
        # The oracle inverts the dense (upto × upto) covariance of the second joint: κ of it.
        kappa = max(_cond(c) for c in p_cov)
        assert np.all(np.abs(terms.kls[layer].numpy() - expected) <= kappa * tolerance)
        above = upto


def test_layerwise_elbo_takes_any_gaussian_and_broadcasts_an_encoders_batch():
    """A MultivariateNormal q gives the same terms as its TopDownGaussian; shapes are the batch."""
    case = CASES[1]
    model, x = case.model, torch.as_tensor(case.x)
    q = _fixed_q(model, 3, batch=(3,), ladder=False)
    joint = q.to_multivariate_normal()
    from_q, from_joint = layerwise_elbo(model, x, q), layerwise_elbo(model, x, joint)
    assert from_q.elbo.shape == (3,) and all(kl.shape == (3,) for kl in from_q.kls)
    # The conversion solves against blocks of q's factor: identity_tolerance times its κ.
    singular = torch.linalg.svdvals(joint.scale_tril)
    kappa = float((singular[..., 0] / singular[..., -1]).max())
    tolerance = identity_tolerance(model, x, joint) * kappa
    assert ((from_q.elbo - from_joint.elbo).abs() <= tolerance).all()
    diagonal = Independent(Normal(joint.mean, joint.scale_tril.diagonal(dim1=-2, dim2=-1)), 1)
    assert layerwise_elbo(model, x, diagonal).elbo.shape == (3,)


def test_prior_as_q_has_zero_kls():
    """With q = p(z) every per-layer KL is zero and the ELBO is E_p(z) log p(x|z_1)."""
    model = CASES[3].model
    x = torch.as_tensor(CASES[3].x)
    prior = model.prior_top_down()
    terms = layerwise_elbo(model, x, prior)
    # Zero to rounding: the two conditional means are the same numbers evaluated in different
    # orders, so each KL is ½‖L_Ψ⁻¹δ‖² for a rounding-sized δ, far inside the identity tolerance.
    tolerance = identity_tolerance(model, x, prior.to_multivariate_normal())
    assert all(bool((kl.abs() <= tolerance).all()) for kl in terms.kls)
    assert ((terms.elbo - terms.reconstruction).abs() <= tolerance).all()


# -- sampling and gradients ------------------------------------------------------------------------


@pytest.mark.false_alarm(2e-7)  # two exact χ² tests at 1e-7
def test_samples_follow_the_joint_distribution():
    """Whitened samples of (z, x) are standard normal: χ² checks, false alarm 1e-7 each."""
    case = CASES[1]
    model = case.model
    n = 4000
    x, z = model.sample(n, generator=seeds.generator(123))
    assert x.shape == (n, model.data_dim) and z.shape == (n, model.latent_dim)
    mean, cov = case.joint()
    draws = np.concatenate([z.numpy(), x.numpy()], -1) - mean
    white = np.linalg.solve(np.linalg.cholesky(cov), draws.T).T  # iid N(0, I) if correct
    dof = white.shape[1]
    # Σ‖u_i‖² ~ χ²(n·dof) exactly: two-sided test at total level 1e-7.
    total = float((white**2).sum())
    assert chi2.isf(1 - 0.5e-7, n * dof) <= total <= chi2.isf(0.5e-7, n * dof)
    # n‖ū‖² ~ χ²(dof) exactly: a mean offset makes it large; one-sided at 1e-7.
    assert n * float((white.mean(0) ** 2).sum()) <= chi2.isf(1e-7, dof)
    again, _ = model.sample(n, generator=seeds.generator(123))
    assert torch.equal(again, x)


def test_gradcheck_on_a_tiny_model():
    """log p(x) and the per-layer ELBO have correct gradients in every parameter (gradcheck)."""
    rng = seeds.rng(4)

    def leaf(*shape, low=None):
        value = rng.uniform(0.5, 1.5, shape) if low else rng.standard_normal(shape)
        return torch.tensor(value, dtype=torch.float64, requires_grad=True)

    params = [
        leaf(2, 2),  # W_0
        leaf(2, 1),  # W_1
        leaf(2),  # b_0
        leaf(2),  # b_1
        leaf(2, low=True),  # Ψ_0 diagonal
        leaf(low=True),  # Ψ_1 isotropic
        leaf(2),  # q: m_1
        leaf(1),  # q: m_2
        leaf(2, 1),  # q: A_1
    ]
    x = torch.tensor([0.3, -1.2], dtype=torch.float64)
    s1 = torch.tensor([[0.8, 0.0], [0.2, 0.6]], dtype=torch.float64)
    s2 = torch.tensor([[0.7]], dtype=torch.float64)

    def f(w0, w1, b0, b1, v0, v1, m1, m2, a1):
        model = HierarchicalLinearGaussian([w0, w1], [b0, b1], [v0, v1])
        q = TopDownGaussian([m1, m2], [s1, s2], [a1])
        return torch.stack([model.log_evidence(x), layerwise_elbo(model, x, q).elbo])

    assert torch.autograd.gradcheck(f, params)


# -- validation ----------------------------------------------------------------------------------

W0, W1 = np.ones((3, 2)), np.ones((2, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"weights": W0}, TypeError, ["weights", "list or tuple", "(3, 2)"]),
        ({"weights": [W0]}, ValueError, ["weights", "L ≥ 2", "got 1", "LinearGaussian"]),
        ({"weights": [W0, np.ones((3, 1))]}, ValueError, ["weights[1]", "K_1 = 2", "(3, 1)"]),
        ({"weights": [W0, np.ones(2)]}, ValueError, ["weights[1]", "(K_1, K_2) matrix", "(2,)"]),
        ({"weights": [W0, np.ones((2, 0))]}, ValueError, ["weights[1]", "K_2 ≥ 1", "(2, 0)"]),
        (
            {"weights": [W0, np.array([[np.nan], [1]])]},
            ValueError,
            ["weights[1]", "finite", "1 NaN"],
        ),
        ({"weights": [W0, "W1"]}, TypeError, ["weights[1]", "'W1'"]),
        ({"biases": [None]}, ValueError, ["biases", "2 entries", "got 1"]),
        ({"biases": np.ones(3)}, TypeError, ["biases", "list or tuple", "(3,)"]),
        ({"biases": [np.ones(3), np.ones(3)]}, ValueError, ["biases[1]", "(2,)", "(3,)"]),
        ({"biases": [np.ones(3), [np.inf, 0]]}, ValueError, ["biases[1]", "finite"]),
        ({"noise_variances": [1.0]}, ValueError, ["noise_variances", "2 entries", "got 1"]),
        (
            {"noise_variances": np.ones(3)},
            ValueError,
            ["noise_variances", "scalar", "list", "(3,)"],
        ),
        ({"noise_variances": -1.0}, ValueError, ["noise_variances", "positive", "-1.0"]),
        (
            {"noise_variances": [1.0, np.ones(3)]},
            ValueError,
            ["noise_variances[1]", "(2,)", "(3,)"],
        ),
        (
            {"noise_variances": [1.0, np.array([1.0, 0.0])]},
            ValueError,
            ["noise_variances[1]", "positive"],
        ),
        (
            {"noise_variances": [1.0, np.array([[1.0, 2], [2, 1]])]},
            ValueError,
            ["noise_variances[1]", "positive definite"],
        ),
        (
            {"noise_variances": [1.0, np.array([[1.0, 0.5], [0, 1]])]},
            ValueError,
            ["noise_variances[1]", "symmetric"],
        ),
    ],
)
def test_model_arguments_are_validated(kwargs, error, words):
    """Every bad constructor argument raises, naming it, what came and what was expected."""
    arguments = {"weights": [W0, W1]} | kwargs
    with pytest.raises(error) as raised:
        HierarchicalLinearGaussian(**arguments)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def _q_parts():
    return [np.zeros(2), np.zeros(1)], [np.eye(2), np.eye(1)], [np.ones((2, 1))]


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda m, s, a: (np.zeros(3), s, a), TypeError, ["locs", "list", "(3,)"]),
        (lambda m, s, a: ([np.zeros(2)], s, a), ValueError, ["locs", "L ≥ 2", "1 of them"]),
        (lambda m, s, a: ([np.zeros(2), 0.0], s, a), ValueError, ["locs[1]", "mean vector", "0.0"]),
        (lambda m, s, a: (m, [np.eye(2)], a), ValueError, ["scale_trils", "2 entries", "got 1"]),
        (
            lambda m, s, a: (m, [np.eye(3), s[1]], a),
            ValueError,
            ["scale_trils[0]", "(…, 2, 2)", "(3, 3)"],
        ),
        (
            lambda m, s, a: (m, [np.ones((2, 2)), s[1]], a),
            ValueError,
            ["scale_trils[0]", "lower triangular", "1"],
        ),
        (
            lambda m, s, a: (m, [-np.eye(2), s[1]], a),
            ValueError,
            ["scale_trils[0]'s diagonal", "positive", "-1.0"],
        ),
        (lambda m, s, a: (m, s, []), ValueError, ["weights", "1 entries", "got 0"]),
        (
            lambda m, s, a: (m, s, [np.ones((2, 2))]),
            ValueError,
            ["weights[0]", "(…, 2, 1)", "(2, 2)"],
        ),
        (
            lambda m, s, a: ([np.zeros((3, 2)), np.zeros((4, 1))], s, a),
            ValueError,
            ["batch shapes", "locs[0] (3,)", "locs[1] (4,)"],
        ),
    ],
)
def test_top_down_arguments_are_validated(change, error, words):
    """Every bad TopDownGaussian argument raises, naming it, what came and what was expected."""
    with pytest.raises(error) as raised:
        TopDownGaussian(*change(*_q_parts()))
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_functions_validate_their_arguments():
    """layerwise_elbo, from_multivariate_normal, split/join_latents reject bad input by name."""
    model = HierarchicalLinearGaussian([W0, W1])
    q = TopDownGaussian(*_q_parts())
    x = np.zeros(3)
    linear = toyvae.LinearGaussian(np.ones((3, 3)))
    with pytest.raises(TypeError, match=r"model must be a toyvae\.HierarchicalLinearGaussian"):
        layerwise_elbo(linear, x, q)
    with pytest.raises(ValueError, match=r"x must have last dimension 3.*\(2,\)"):
        layerwise_elbo(model, np.zeros(2), q)
    other = TopDownGaussian([np.zeros(1), np.zeros(2)], [np.eye(1), np.eye(2)], [np.ones((1, 2))])
    with pytest.raises(ValueError, match=r"layer sizes.*\(2, 1\).*layer_dims \(1, 2\)"):
        layerwise_elbo(model, x, other)
    with pytest.raises(ValueError, match=r"batch shapes must broadcast.*q \(2,\).*x \(3,\)"):
        batched = TopDownGaussian([np.zeros((2, 2)), np.zeros(1)], *_q_parts()[1:])
        layerwise_elbo(model, np.zeros((3, 3)), batched)
    mvn = MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"event shape \(4,\).*got event shape \(3,\)"):
        TopDownGaussian.from_multivariate_normal(mvn, (2, 2))
    with pytest.raises(ValueError, match=r"layer_dims must hold positive integers.*\(3, 0\)"):
        TopDownGaussian.from_multivariate_normal(mvn, (3, 0))
    with pytest.raises(TypeError, match="layer_dims must be a list or tuple"):
        TopDownGaussian.from_multivariate_normal(mvn, 3)
    with pytest.raises(ValueError, match=r"z must have last dimension 3 .*\(2,\)"):
        model.split_latents(np.zeros(2))
    with pytest.raises(ValueError, match=r"layers must hold 2 entries .*got 1"):
        model.join_latents([np.zeros(2)])
    with pytest.raises(ValueError, match=r"layers\[1\] must have last dimension 1"):
        model.join_latents([np.zeros(2), np.zeros(2)])


def test_generic_functions_take_a_top_down_q():
    """toyvae.elbo uses the per-layer route for a TopDownGaussian; the KL its joint factor."""
    model = CASES[1].model
    x = torch.from_numpy(CASES[1].x)
    q = _fixed_q(model, 7, batch=(3,))
    assert isinstance(q, toyvae.StructuredGaussian)
    assert torch.equal(toyvae.elbo(model, x, q), layerwise_elbo(model, x, q).elbo)
    dense = q.to_multivariate_normal()
    assert torch.equal(toyvae.kl_to_posterior(model, x, q), toyvae.kl_to_posterior(model, x, dense))

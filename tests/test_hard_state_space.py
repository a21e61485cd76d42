"""The state-space model where it is hard: small observation noise, more states than observations.

As in tests/test_hard_regimes.py, the tolerance is the problem's own float64 floor, estimated by
the 60-digit oracle (tests/mp_oracle.py, ``state_space``) as the largest change of the exact
answer over a few perturbations of every input by one rounding, |δθ| ≤ eps·|θ|; we allow 30
times it (each random pattern hits the worst case only in part), plus one rounding of the value.
With R ≈ 1e-12 and K > D, forming the block-tridiagonal precision from C̃ᵀC̃ ≈ 1e12 rounds away
the prior's O(1) part: that normal-equation route misses these floors by factors of 1e4 to 1e6
(log p(x) off by up to 2e-5 relative), which the last test shows, so these tests can fail.
"""

from __future__ import annotations

import mp_oracle as oracle
import numpy as np
import pytest
import torch
from test_ssm_model_contracts import dense_prior

import toyvae
from toyvae import LinearGaussianSSM
from toyvae import _block_tridiagonal as btd
from toyvae import _square_root_reduction as sr
from toyvae.state_space import (
    MarkovGaussian,
    _kl_through_precision,
    _markov_elbo_by_terms,
    markov_elbo,
    markov_kl_to_posterior,
)

EPS = float(np.finfo(np.float64).eps)
PATTERNS = 3  # random sign patterns per floor estimate (each costs one 60-digit solve)
ALLOWANCE = 30  # multiples of the estimated floor: see the module docstring
NAMES = ("transition", "transition_noise", "emission", "emission_noise", "bias", "x")


def perturbed_by_eps(value, rng) -> oracle.MP.matrix:
    """A float64 array as an exact mpmath matrix with every entry times 1 ± eps (random signs)."""
    moved = oracle.to_mp(value)
    signs = oracle.to_mp(rng.choice([-1.0, 1.0], size=np.shape(value)))
    for i in range(moved.rows):
        for j in range(moved.cols):
            moved[i, j] *= 1 + EPS * signs[i, j]
    return moved


class HardChain:
    """A state-space model with small emission noise, and one sequence drawn from it.

    The inputs are fixed numbers (this is not a stochastic test): a NumPy generator with a
    fixed seed only spares writing them out.
    """

    def __init__(self, seed: int, k: int, d: int, noise: float, num_steps: int):
        rng = np.random.default_rng(seed)
        self.transition = 0.9 * np.linalg.qr(rng.standard_normal((k, k)))[0]
        self.transition_noise = 0.5 * np.exp(rng.uniform(-1, 1, k))
        self.emission = rng.standard_normal((d, k))
        self.emission_noise = noise * np.exp(rng.uniform(-1, 1, d))
        self.bias = rng.standard_normal(d)
        z = np.zeros((num_steps, k))
        z[0] = rng.standard_normal(k)
        for t in range(1, num_steps):
            z[t] = self.transition @ z[t - 1] + np.sqrt(self.transition_noise) * (
                rng.standard_normal(k)
            )
        noise_draw = np.sqrt(self.emission_noise) * rng.standard_normal((num_steps, d))
        self.x = z @ self.emission.T + self.bias + noise_draw
        self.name = f"K={k} D={d} R~{noise:.0e} T={num_steps}"
        self.exact_mp = oracle.state_space(*(getattr(self, name) for name in NAMES))
        log_evidence, mean, cov = self.exact_mp
        self.exact = float(log_evidence), oracle.to_float(mean)[:, 0], oracle.to_float(cov)

    def floors(self) -> tuple[float, float, float]:
        """The floors of log p(x), of the posterior mean and of its covariance (max over
        entries), each the largest change over the sign patterns."""
        rng = np.random.default_rng(0)
        worst = np.zeros(3)
        for _ in range(PATTERNS):
            perturbed = {name: perturbed_by_eps(getattr(self, name), rng) for name in NAMES}
            moved = oracle.state_space(*(perturbed[name] for name in NAMES))
            # Differences in 60 digits: rounded first, changes below an ulp would vanish.
            changes = [abs(float(moved[0] - self.exact_mp[0]))]
            changes += [np.abs(oracle.to_float(moved[i] - self.exact_mp[i])).max() for i in (1, 2)]
            worst = np.maximum(worst, changes)
        return tuple(worst)

    def model(self) -> LinearGaussianSSM:
        return LinearGaussianSSM(
            self.transition,
            self.transition_noise,
            self.emission,
            self.emission_noise,
            emission_bias=self.bias,
        )


CASES = [
    HardChain(0, k=6, d=3, noise=1e-12, num_steps=4),
    HardChain(1, k=4, d=2, noise=1e-10, num_steps=5),
    HardChain(2, k=3, d=1, noise=1e-8, num_steps=3),
    HardChain(3, k=4, d=4, noise=1e-12, num_steps=4),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    chain = request.param
    return chain, chain.floors()


def test_log_evidence_within_the_floor(case):
    chain, (floor, _, _) = case
    exact = chain.exact[0]
    error = abs(chain.model().log_evidence(torch.from_numpy(chain.x)).item() - exact)
    assert error <= ALLOWANCE * floor + EPS * abs(exact), (error, floor, exact)


def test_posterior_mean_and_covariance_within_the_floor(case):
    """The flat posterior (``exact``: mean from the reduction, covariance from a QR of the dense
    rows) and the smoothed marginal and lag-one covariances (the selected inverse)."""
    chain, (_, mean_floor, cov_floor) = case
    _, exact_mean, exact_cov = chain.exact
    model = chain.model()
    x = torch.from_numpy(chain.x)
    posterior = model.exact(x).posterior
    mean_scale, cov_scale = np.abs(exact_mean).max(), np.abs(exact_cov).max()
    mean_error = np.abs(posterior.loc.numpy() - exact_mean).max()
    assert mean_error <= ALLOWANCE * mean_floor + EPS * mean_scale, (mean_error, mean_floor)
    cov_error = np.abs(posterior.covariance().numpy() - exact_cov).max()
    assert cov_error <= ALLOWANCE * cov_floor + EPS * cov_scale, (cov_error, cov_floor)

    smoothed = model.smoothed(x)
    k, num_steps = model.state_dim, chain.x.shape[0]
    blocks = exact_cov.reshape(num_steps, k, num_steps, k)
    marginal = np.stack([blocks[t, :, t] for t in range(num_steps)])
    lag_one = np.stack([blocks[t + 1, :, t] for t in range(num_steps - 1)])
    assert np.abs(smoothed.covariance.numpy() - marginal).max() <= (
        ALLOWANCE * cov_floor + EPS * cov_scale
    )
    assert np.abs(smoothed.cross_covariance.numpy() - lag_one).max() <= (
        ALLOWANCE * cov_floor + EPS * cov_scale
    )


def test_the_normal_equation_route_misses_the_floor():
    """The check can fail: log det Λ from the normal-equation reduction of the explicit precision
    (the route before the square-root reduction) is off by far more than the allowance."""
    chain, (floor, _, _) = CASES[0], CASES[0].floors()
    model = chain.model()
    x = torch.from_numpy(chain.x)
    f = model._factors()
    normal = btd.log_det(btd.factor(model._precision(x.shape[-2], f)))
    solution = model._solve(x, f)
    assert abs(normal - solution.log_det).item() > 1e3 * (ALLOWANCE * floor)


def test_derivatives_agree_with_the_normal_equation_route():
    """Values come from the square-root route, derivatives from the normal-equation one: on a
    well-conditioned model both routes agree, and so must torch's derivative of the dense
    stacked log-density."""
    chain = HardChain(4, k=3, d=2, noise=0.5, num_steps=4)
    params = {
        name: torch.tensor(getattr(chain, name), requires_grad=True)
        for name in ("transition", "emission", "bias")
    }
    model = LinearGaussianSSM(
        params["transition"],
        chain.transition_noise,
        params["emission"],
        chain.emission_noise,
        emission_bias=params["bias"],
    )
    x = torch.from_numpy(chain.x)
    grads = torch.autograd.grad(model.log_evidence(x), list(params.values()))

    k, d, num_steps = 3, 2, chain.x.shape[0]
    a, c, b = params["transition"], params["emission"], params["bias"]
    prior = {
        "transition": a,
        "transition_noise": torch.diag(torch.from_numpy(chain.transition_noise)),
        "initial_mean": torch.zeros(k, dtype=torch.float64),
        "initial_covariance": torch.eye(k, dtype=torch.float64),
    }
    _, cov_z = dense_prior(prior, num_steps)
    big_c = torch.kron(torch.eye(num_steps, dtype=torch.float64), c)
    r = torch.diag(torch.from_numpy(chain.emission_noise).repeat(num_steps))
    dense = torch.distributions.MultivariateNormal(
        b.repeat(num_steps), big_c @ cov_z @ big_c.T + r
    ).log_prob(x.reshape(-1))
    expected = torch.autograd.grad(dense, [a, c, b])
    for got, want in zip(grads, expected, strict=True):
        # Both are float64 evaluations of the same derivative of a well-conditioned function
        # whose entries are O(1)–O(10): agreement to 1e-10 leaves 1e5 ulps for the two routes'
        # different rounding.
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (got, want)
    del d


# -- the structured Markov q ---------------------------------------------------------------------

CHAIN_FIELDS = ("initial_loc", "initial_scale_tril", "transition", "offset", "scale_tril")
PATH = (1e-2, 1e-5, 1e-8, 0.0)  # t: q's parameters are the posterior chain's, moved by t·(1 + ·)


def chain_arrays(q: MarkovGaussian) -> list:
    """q's parameters as float64 arrays, the sequences split into lists of matrices/vectors."""
    arrays = [getattr(q, name).numpy() for name in CHAIN_FIELDS]
    return arrays[:2] + [list(a) for a in arrays[2:]]


def on_the_path(chain: HardChain, t: float) -> MarkovGaussian:
    """The posterior chain (``markov_posterior``) with every parameter moved by t in a fixed
    direction (scales multiplied by 1 + t·u, so they stay triangular and positive)."""
    post = chain.model().markov_posterior(torch.from_numpy(chain.x))
    rng = np.random.default_rng(1)  # fixed numbers, not a stochastic test
    moved = []
    for name in CHAIN_FIELDS:
        value = getattr(post, name)
        step = torch.from_numpy(rng.uniform(-1, 1, tuple(value.shape)))
        moved.append(value * (1 + t * step) if "scale" in name else value + t * step)
    return MarkovGaussian(*moved)


def exact_markov_kl(theta: dict, q: list):
    """KL(q ‖ p(z|x)) in 60 digits for model inputs ``theta`` and chain parameters ``q``."""
    _, mean_p, cov_p = oracle.state_space(*(theta[name] for name in NAMES))
    mean_q, cov_q = oracle.markov_chain(*q)
    return oracle.gaussian_kl(mean_q, cov_q, mean_p, cov_p)


def exact_markov_elbo(theta: dict, q: list):
    """ELBO(q) = log p(x) − KL(q ‖ p(z|x)) in 60 digits."""
    log_evidence, mean_p, cov_p = oracle.state_space(*(theta[name] for name in NAMES))
    mean_q, cov_q = oracle.markov_chain(*q)
    return log_evidence - oracle.gaussian_kl(mean_q, cov_q, mean_p, cov_p)


def markov_floor(chain: HardChain, q: list, exact, quantity=exact_markov_kl) -> float:
    """The float64 floor of ``quantity`` (the KL or the ELBO): its largest change over sign
    patterns that move every model input and every parameter of q by one rounding."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(PATTERNS):
        theta = {name: perturbed_by_eps(getattr(chain, name), rng) for name in NAMES}
        moved = [perturbed_by_eps(q[0], rng), perturbed_by_eps(q[1], rng)]
        moved += [[perturbed_by_eps(m, rng) for m in seq] for seq in q[2:]]
        worst = max(worst, abs(float(quantity(theta, moved) - exact)))
    return worst


def along_the_path(chain: HardChain, quantity):
    """(t, q, exact value, its floor) of ``quantity`` at each point of PATH."""
    theta = {name: getattr(chain, name) for name in NAMES}
    for t in PATH:
        q = on_the_path(chain, t)
        exact = quantity(theta, chain_arrays(q))
        yield t, q, exact, markov_floor(chain, chain_arrays(q), exact, quantity)


def test_markov_posterior_is_the_posterior_to_the_floor(case):
    """``markov_posterior`` (from the reduction's factor L, no covariance factored), taken in 60
    digits from its float64 parameters: its mean and covariance are the oracle posterior's to
    their floors, and its KL from the exact posterior is within 30 times that KL's own floor
    (what rounding the exact chain's parameters alone would leave, ~1e-17 on the first case).
    The route through the smoothing moments (a Cholesky factor of Cov(z_t|x), a gain through
    Cov(z_{t−1}|x)⁻¹) meets the first two checks but not the last: its chain is 2.7e-7 from the
    posterior in KL on the first case, where R⁻¹ ≈ 1e12 magnifies errors in the covariance that
    are small in absolute terms."""
    chain, (_, mean_floor, cov_floor) = case
    _, exact_mean, exact_cov = chain.exact
    q = chain_arrays(on_the_path(chain, 0.0))
    mean, cov = oracle.markov_chain(*q)
    mean_error = np.abs(oracle.to_float(mean)[:, 0] - exact_mean).max()
    assert mean_error <= ALLOWANCE * mean_floor + EPS * np.abs(exact_mean).max(), mean_error
    cov_error = np.abs(oracle.to_float(cov) - exact_cov).max()
    assert cov_error <= ALLOWANCE * cov_floor + EPS * np.abs(exact_cov).max(), cov_error
    theta = {name: getattr(chain, name) for name in NAMES}
    kl = exact_markov_kl(theta, q)
    assert kl <= ALLOWANCE * markov_floor(chain, q, kl), (
        float(kl),
        markov_floor(chain, q, kl),
    )


def test_markov_kl_within_the_floor_on_a_path_to_the_posterior(case):
    """KL(q ‖ p(z|x)) for a Markov q from KL ≈ 1e4 to 3e10 (t = 1e-2: R⁻¹ up to 1e12
    magnifies every move of q) down to the posterior itself (KL from 1e-31 to 1e-17): within 30
    of its own floor plus one rounding of the value, and never negative. The KL's terms are each
    O(TK); summed against Λ's blocks, as before, the error is 1e-4 to 2e-3 on the first case
    however small the KL (next test)."""
    chain, _ = case
    model, x = chain.model(), torch.from_numpy(chain.x)
    for t, q, exact, floor in along_the_path(chain, exact_markov_kl):
        got = markov_kl_to_posterior(model, x, q).item()
        assert got >= 0, (t, got)
        error = abs(got - float(exact))
        assert error <= ALLOWANCE * floor + EPS * float(exact), (t, error, floor, float(exact))


def test_the_precision_route_of_the_markov_kl_misses_the_floor():
    """The check can fail: the same KL summed against Λ's blocks (the route before, which now
    carries only the derivative) is off by far more than the allowance near the posterior."""
    chain = CASES[0]
    model, x = chain.model(), torch.from_numpy(chain.x)
    q = on_the_path(chain, 1e-8)
    theta = {name: getattr(chain, name) for name in NAMES}
    exact = exact_markov_kl(theta, chain_arrays(q))
    floor = markov_floor(chain, chain_arrays(q), exact)
    f = model._factors()
    precision_route = _kl_through_precision(model, f, model._solve(x, f), q).item()
    assert abs(precision_route - float(exact)) > 1e3 * ALLOWANCE * floor


def test_elbo_within_the_floor_on_a_path_to_the_posterior(case):
    """ELBO(q) for a Markov q (``markov_elbo``) and for the same q as a dense Gaussian
    (``toyvae.elbo``) on the same path, down to the posterior: within 30 of the ELBO's own
    floor plus one rounding of the value. Both regroup the ELBO as the bracket of log p(x) at
    q's mean less KL(N(m, Σ_q) ‖ N(m, Λ⁻¹)); summed as E_q log p(x|z) − KL(q ‖ p(z)), or per step
    as sequential VAEs write it, their terms cancel (next test)."""
    chain, _ = case
    model, x = chain.model(), torch.from_numpy(chain.x)
    for t, q, exact, floor in along_the_path(chain, exact_markov_elbo):
        allowed = ALLOWANCE * floor + EPS * abs(float(exact))
        for got in (markov_elbo(model, x, q), toyvae.elbo(model, x, q.to_multivariate_normal())):
            assert abs(got.item() - float(exact)) <= allowed, (t, got.item(), float(exact), floor)


def test_the_elbo_summed_by_terms_misses_the_floor():
    """The check can fail: at the posterior chain of the first case, the ELBO summed per step
    (sequential VAEs' form, which now carries only the derivative) and summed as
    E_q log p(x|z) − KL(q ‖ p(z)) for the dense q are off by far more than the allowance."""
    chain = CASES[0]
    model, x = chain.model(), torch.from_numpy(chain.x)
    q = on_the_path(chain, 0.0)
    theta = {name: getattr(chain, name) for name in NAMES}
    exact = exact_markov_elbo(theta, chain_arrays(q))
    allowed = ALLOWANCE * markov_floor(chain, chain_arrays(q), exact, exact_markov_elbo)
    allowed += EPS * abs(float(exact))
    by_steps = _markov_elbo_by_terms(model, x, q, model._factors())
    dense = q.to_multivariate_normal()
    bound = model.with_num_steps(x.shape[-2])
    by_terms = toyvae.expected_log_likelihood(bound, x, dense) - toyvae.kl_to_prior(dense, bound)
    for got in (by_steps, by_terms):
        assert abs(got.item() - float(exact)) > 1e3 * allowed, got.item()


@pytest.mark.parametrize("k, d", [(3, 1), (2, 5), (4, 4)])
def test_square_root_reduction_solves_the_least_squares_problem(k, d):
    """The reduction against dense least squares on random rows, for every chain length from
    1 to 11 (odd, even, powers of two): the solution, log det FᵀF and the selected blocks of
    (FᵀF)⁻¹. Rows are fixed numbers (seeded), not a stochastic test. Tolerance: both the
    reduction and the dense reference are backward stable, so each is within about
    κ(FᵀF)·eps of the exact answer (relative to its largest entry); we allow 100 times that."""
    gen = torch.Generator().manual_seed(10 * k + d)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    for n in range(1, 12):
        rows = sr.ChainRows(n, randn(k + d, k), randn(d, k), randn(d, k), randn(k, k), randn(k, k))
        unary = [rows.first] + [rows.middle] * max(n - 2, 0) + [rows.last] * (n > 1)
        placed = [torch.nn.functional.pad(u, (t * k, (n - 1 - t) * k)) for t, u in enumerate(unary)]
        pair = torch.cat([rows.left, rows.right], -1)
        placed += [torch.nn.functional.pad(pair, (t * k, (n - 2 - t) * k)) for t in range(n - 1)]
        dense = torch.cat(placed, -2)
        rhs_first, rhs_middle = randn(2, k + d), randn(2, max(n - 2, 0), d)
        rhs_last, rhs_pair = randn(2, d), randn(2, max(n - 1, 0), k)
        y = torch.cat(
            [rhs_first]
            + [rhs_middle[:, t] for t in range(n - 2)]
            + [rhs_last] * (n > 1)
            + [rhs_pair[:, t] for t in range(n - 1)],
            -1,
        )
        levels = sr.factor(rows)
        gram = dense.T @ dense
        tol = 100 * EPS * torch.linalg.cond(gram).item()

        def close(got, want, tol=tol):
            return (got - want).abs().max() <= tol * want.abs().max()

        got = sr.solve(levels, rhs_first, rhs_middle, rhs_last, rhs_pair)
        assert close(got, torch.linalg.lstsq(dense, y.T).solution.T.reshape(2, n, k))
        # log det: an absolute error of about κ·eps per eigenvalue's logarithm.
        assert abs(sr.log_det(levels) - torch.logdet(gram)) <= tol * n * k
        inverse = torch.linalg.inv(gram).reshape(n, k, n, k)
        cov, cross = sr.selected_inverse(levels)
        assert close(cov, torch.stack([inverse[t, :, t] for t in range(n)]))
        if n > 1:
            assert close(cross, torch.stack([inverse[t + 1, :, t] for t in range(n - 1)]))
        lower = sr.precision_factor(rows)
        assert close(lower.mT @ lower, gram)
        assert torch.equal(lower, lower.tril()) and bool((lower.diagonal() > 0).all())

"""The ELBO checker's standard errors have a floor: the reparameterised estimator's own spread.

A correct estimator's gradient with respect to a per-row scale, log σ_j, carries
−Λ_jj σ_j² ε_j²: skewed, and from one row only, so nothing averages it toward normal. Fifty
draws that miss its long tail have a mean and a standard error both too small, and the
Student-t threshold, taken far out in its tail by the split over coordinates, is crossed far
more often than it says (1.25% of checks at a stated 1e-6, measured on commit 7592d20). The
checker now takes each standard error as at least that of the reparameterised estimator of the
same target, from 1000 draws of its own (``toyvae.testing.check._reference_spread``).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch.distributions import Independent, Normal

import toyvae
from toyvae.testing import check, check_elbo


def _plugin_case():
    """The plugin's ``toyvae_model`` and ``toyvae_data`` (D = 6, K = 3, N = 32), and the
    plugin example's per-row q: loc = 0, log_scale = −0.3, both free parameters."""
    generator = torch.Generator().manual_seed(0)
    options = {"dtype": torch.float64, "generator": generator}
    weight = torch.randn(6, 3, **options)
    bias = torch.randn(6, **options)
    model = toyvae.LinearGaussian(weight, bias, 0.2 + torch.rand(6, **options))
    x, _ = model.sample((32,), generator=torch.Generator().manual_seed(1))
    loc = torch.nn.Parameter(torch.zeros(32, 3, dtype=x.dtype))
    log_scale = torch.nn.Parameter(torch.full_like(loc, -0.3))
    return model, x, loc, log_scale


def _log_weight_estimate(model, loc, log_scale):
    def estimate(x):
        qz = Independent(Normal(loc, log_scale.exp()), 1)
        z = qz.rsample()
        return (model.log_joint(x, z) - qz.log_prob(z)).sum()

    return estimate


@pytest.mark.parametrize(
    ("k", "reduction", "loss"), [(1, "sum", False), (1, "mean", True), (3, "sum", False)]
)
def test_floor_is_the_spread_of_the_reparameterised_draws(k, reduction, loss):
    """The floor's value and gradient spreads are the sample standard deviations of
    log (1/k) Σ_i w_i, reduced and signed as the user's estimate, and of its gradient in every
    parameter (q's and the model's), drawn here one at a time from the same noise with plain
    torch: z = loc + σ ⊙ ε, log w = log p(x, z) − log q(z)."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64, generator=generator))
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    loc = torch.nn.Parameter(0.3 * torch.randn(4, 2, dtype=torch.float64, generator=generator))
    log_scale = torch.nn.Parameter(torch.full((4, 2), -0.4, dtype=torch.float64))
    params = [weight, loc, log_scale]

    def model_fn():
        return toyvae.LinearGaussian(weight, torch.zeros(3, dtype=torch.float64), 0.5)

    def q_fn(x):
        return Independent(Normal(loc, log_scale.exp()), 1)

    sign, seed = (-1.0 if loss else 1.0), 11
    value_sd, gradient_sd = check._reference_spread(
        model_fn, q_fn, x, params, k, reduction, sign, seed, True
    )

    noise = torch.Generator().manual_seed(seed + check._SPREAD_SEED_OFFSET)
    values, gradients = [], []
    for _ in range(check._SPREAD_DRAWS // check._SPREAD_CHUNK):
        chunk = torch.randn(check._SPREAD_CHUNK, k, 4, 2, generator=noise, dtype=torch.float64)
        for eps in chunk:
            q = q_fn(x)
            z = loc + log_scale.exp() * eps  # (k, 4, 2)
            log_w = model_fn().log_joint(x, z) - q.log_prob(z)  # (k, 4)
            per_row = torch.logsumexp(log_w, 0) - math.log(k)
            total = sign * (per_row.mean() if reduction == "mean" else per_row.sum())
            grads = torch.autograd.grad(total, params)
            gradients.append(torch.cat([g.reshape(-1) for g in grads]))
            values.append(total.detach())
    # Two routes to each draw (toyvae's structured log weights, plain torch's densities) agree
    # to a few ε of the terms (|log w| ≲ 30 against spreads ≳ 0.1); the spreads of 1000 such
    # draws then agree to 1e-10 relative, far above rounding, far below any mistake in the
    # noise, k, the reduction or the Jacobian's rows (a sign leaves a spread unchanged).
    assert torch.allclose(value_sd, torch.stack(values).std(), rtol=1e-10, atol=0)
    assert torch.allclose(gradient_sd, torch.stack(gradients).std(0), rtol=1e-10, atol=0)


def test_a_sample_that_misses_the_tail_does_not_fail_a_correct_estimator():
    """Seed 353, 50 draws: the plugin example's correct estimator. Its draws' own standard error
    at log_scale[30, 2] is under half the reparameterised estimator's, so the draws alone gave
    |t| = 10.2 against a threshold of 7.26 and the old check failed; with the floor it passes.

    Seed 353 is one of seven in 0–599 at which the old check failed this estimator (found by
    running it; scripts/checker_false_alarm.py counts such failures). The seed is fixed: this is
    the mechanism, shown on one sample, not a rate."""
    model, x, loc, log_scale = _plugin_case()
    estimate = _log_weight_estimate(model, loc, log_scale)

    def q(x):
        return Independent(Normal(loc, log_scale.exp()), 1)

    seed, draws = 353, 50
    result = check_elbo(estimate, model, q, x, num_draws=draws, seed=seed)
    assert result.passed, result.message

    # The same 50 draws as the check (it seeds torch's global generator with the seed).
    params = [loc, log_scale]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(estimate(x), params)])
            for _ in range(draws)
        ]
    rows = torch.stack(rows)
    exact = torch.autograd.grad(toyvae.elbo(model, x, q(x)).sum(), params)
    exact = torch.cat([g.reshape(-1) for g in exact])
    own_se = rows.std(0) / math.sqrt(draws)
    _, floor_sd = check._reference_spread(model, q, x, params, 1, "sum", 1.0, seed, True)
    floor = floor_sd / math.sqrt(draws)
    coordinate = 96 + 30 * 3 + 2  # log_scale[30, 2]
    threshold = scipy.stats.t.isf(1e-6 / 4 / rows.shape[1], draws - 1)
    t_own = float((rows.mean(0)[coordinate] - exact[coordinate]) / own_se[coordinate])
    assert t_own > threshold, (t_own, threshold)
    assert own_se[coordinate] < 0.5 * floor[coordinate]
    # With the floor, |z| at that coordinate is under the threshold (the check passed).
    z_floor = t_own * float(own_se[coordinate] / floor[coordinate])
    assert abs(z_floor) < threshold

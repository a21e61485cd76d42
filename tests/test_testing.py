"""toyvae.testing: the linear VAE, the ELBO-estimator checker, and its catalog of planted bugs.

Most checks here run at the checker's defaults (200 draws, false-alarm probability 1e-6), so
that "every planted bug is flagged and every correct twin passes" is a statement about what
users get. Each check is run once (cached) and shared between the tests that read it.
"""

from __future__ import annotations

import functools
import math

import pytest
import scipy.integrate
import scipy.stats
import seeds
import torch

import toyvae
from toyvae.encoder import LinearGaussianEncoder
from toyvae.testing import (
    DEFAULT_NUM_DRAWS,
    ELBOCheck,
    LinearVAE,
    assert_elbo_estimator,
    bugs,
    check_elbo,
    check_elbo_estimator,
    linear_vae,
    reconstruction_moments,
)

EPS64 = torch.finfo(torch.float64).eps
# Two-sided normal quantile for a false-alarm probability of 1e-6 per assertion.
Z_1E6 = float(scipy.stats.norm.isf(0.5e-6))
CORRECT = sorted({bug.correct for bug in bugs.CATALOG}, key=lambda f: f.__name__)


@functools.cache
def _vae(exact_encoder: bool = False) -> LinearVAE:
    return linear_vae(exact_encoder=exact_encoder)


@functools.cache
def _check(estimator, options: tuple = (), exact_encoder: bool = False) -> ELBOCheck:
    # Every check draws from the same test seed (a planted bug and its twin share the draws).
    return check_elbo_estimator(estimator, _vae(exact_encoder), seed=seeds.seed(0), **dict(options))


def _options(bug: bugs.PlantedBug) -> tuple:
    return tuple(sorted(bug.options.items()))


def _exact_parts(vae: LinearVAE):
    """Model, q, and per-row exact ELBO, KL(q ‖ p(z)) and log det Σ_q, without gradients."""
    encoder, decoder, x = vae
    with torch.no_grad():
        model, q = decoder.model(), encoder(x)
        return (
            model,
            q,
            toyvae.elbo(model, x, q),
            toyvae.kl_to_prior(q),
            toyvae.as_gaussian(q).log_det_cov(),
        )


def _quadratic_form_cumulants(vae: LinearVAE, full_log_weight: bool):
    r"""Exact 2nd and 4th cumulants of one draw of a single-sample ELBO estimate, summed over x.

    With z = m + Lε, ε ~ N(0, I), one row's draw is εᵀBε + bᵀε + const, where (whitened
    Ã = Ψ^{-1/2}W, r̃ = Ψ^{-1/2}(x − b), G = ÃᵀÃ, Λ = I + G):
      - reconstruction only (closed-form KL):  B = −½ L G L,       b = L Ãᵀ(r̃ − Ã m);
      - log w = log p(x, z) − log q(z):         B = −½ (L Λ L − I), b = L (Ãᵀ r̃ − Λ m).
    For ε ~ N(0, I): κ₂ = 2 tr B² + ‖b‖², κ₄ = 48 tr B⁴ + 48 bᵀB²b. Rows are independent, so
    cumulants add over rows.
    """
    encoder, decoder, x = vae
    with torch.no_grad():
        mean, logvar = encoder.encode(x)
        noise_sd = (0.5 * decoder.logvar).exp().expand(x.shape[-1])
        whitened = decoder.mean.weight / noise_sd.unsqueeze(-1)
        residual = (x - decoder.mean.bias) / noise_sd
        gram = whitened.mT @ whitened
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        scale = torch.diag_embed((0.5 * logvar).exp())  # (N, K, K)
        if full_log_weight:
            b_matrix = -0.5 * (scale @ (eye + gram) @ scale - eye)
            linear = residual @ whitened - mean @ (eye + gram)
        else:
            b_matrix = -0.5 * scale @ gram @ scale
            linear = (residual - mean @ whitened.mT) @ whitened
        b_vector = (scale @ linear.unsqueeze(-1)).squeeze(-1)
        b2 = b_matrix @ b_matrix
        kappa2 = 2 * b2.diagonal(dim1=-2, dim2=-1).sum(-1) + b_vector.square().sum(-1)
        quartic = (b_vector.unsqueeze(-2) @ b2 @ b_vector.unsqueeze(-1)).reshape(-1)
        kappa4 = 48 * (b2 @ b2).diagonal(dim1=-2, dim2=-1).sum(-1) + 48 * quartic
        return float(kappa2.sum()), float(kappa4.sum())


def _rounding(vae: LinearVAE, num_draws: int, bias: float) -> float:
    """Allowed rounding in (mean of buggy draws − mean of twin draws) − exact bias.

    Each draw is a float64 sum over N rows of D + K elementwise terms, whose sizes add up to
    about M = Σ_rows (|E_q log p(x|z)| + KL(q ‖ p(z))) + |bias|; Higham's bound n·ε·M with
    n = N + D + K, plus log₂(num_draws) levels of pairwise summation for the mean. Four such
    quantities meet (two means, the bias, and the terms it is built from). A real defect
    moves the mean by O(1) nats, some 10¹⁰ times more.
    """
    x = vae.x
    model, q, _, kl, _ = _exact_parts(vae)
    with torch.no_grad():
        magnitude = (toyvae.expected_log_likelihood(model, x, q).abs() + kl).sum().item()
    n, d = x.shape
    levels = n + d + model.latent_dim + math.log2(num_draws)
    return 4 * levels * EPS64 * (magnitude + abs(bias))


# -- the linear VAE -----------------------------------------------------------------------------


def test_exact_encoder_is_the_posterior():
    """With exact_encoder=True, KL(q ‖ p(z|x)) = 0 and ELBO = log p(x) to rounding, per row."""
    vae = _vae(exact_encoder=True)
    model, q, elbo, _, _ = _exact_parts(vae)
    with torch.no_grad():
        gap = toyvae.kl_to_posterior(model, vae.x, q)
        log_evidence = model.log_evidence(vae.x)
        magnitude = toyvae.expected_log_likelihood(model, vae.x, q).abs() + log_evidence.abs()
    d, k = model.data_dim, model.latent_dim
    # Sums of D + K terms each (Higham n·ε·M), four quantities meet in log p = ELBO + KL.
    tolerance = 4 * (d + k) * EPS64 * magnitude
    assert bool((gap.abs() <= tolerance).all()), gap
    assert bool(((log_evidence - elbo).abs() <= tolerance).all())


def test_default_encoder_is_far_from_the_posterior():
    """The default encoder is off: KL(q ‖ p(z|x)) is at least 0.1 nats in every row."""
    vae = _vae()
    model, q, _, _, _ = _exact_parts(vae)
    with torch.no_grad():
        gap = toyvae.kl_to_posterior(model, vae.x, q)
    # 0.1 nats per row: far above rounding (1e-13) and enough for ELBO, IWAE_k, log p(x) to part.
    assert float(gap.min()) > 0.1, gap


def test_modules_define_the_exact_model():
    """decoder(z).log_prob(x) + log N(z; 0, I) is model.log_joint(x, z); encoder(x) is encode(x)."""
    encoder, decoder, x = _vae()
    generator = seeds.generator(1)
    z = torch.randn(x.shape[0], 3, generator=generator, dtype=x.dtype)
    with torch.no_grad():
        by_modules = decoder(z).log_prob(x) - 0.5 * (z.square().sum(-1) + 3 * math.log(2 * math.pi))
        exact = decoder.model().log_joint(x, z)
        mean, logvar = encoder.encode(x)
        q = encoder(x)
    # Sums of D + K + 2 terms of magnitude ≤ |log p(x, z)| + D·|log Ψ| each: Higham n·ε·M.
    magnitude = exact.abs() + x.shape[-1] * decoder.logvar.detach().abs().max()
    assert bool(((by_modules - exact).abs() <= 4 * (6 + 3) * EPS64 * magnitude).all())
    assert torch.equal(q.base_dist.loc, mean)
    # exp(½ logvar) squared vs exp(logvar): two roundings of a few ulps.
    assert torch.allclose(q.base_dist.scale.square(), logvar.exp(), rtol=8 * EPS64, atol=0)


def test_linear_vae_is_seeded_and_leaves_the_global_generator_alone():
    """Same seed, same VAE and data; another seed, other data; torch's global RNG untouched."""
    state = torch.get_rng_state()
    first, second, other = linear_vae(seed=3), linear_vae(seed=3), linear_vae(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.x, second.x)
    for a, b in zip(first.encoder.parameters(), second.encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.x, other.x)


def test_load_exact_posterior_is_the_one_encoder_s_exact_posterior():
    """load_exact_posterior_ copies exact_posterior's mean map and diagonal variances, zeroes the
    x-dependence of the variance, and rejects a model of other dimensions."""
    encoder, decoder, x = linear_vae(seed=5)  # a fresh, deliberately wrong encoder
    model = decoder.model()
    exact = LinearGaussianEncoder.exact_posterior(model)
    assert encoder.load_exact_posterior_(model) is encoder
    with torch.no_grad():
        assert torch.equal(encoder.mean.weight, exact.weight)
        assert torch.equal(encoder.mean.bias, exact.bias)
        assert not encoder.logvar.weight.any()
        mean, logvar = encoder.encode(x)
    # nn.Linear (fused addmm) against x Vᵀ + c: D-term sums, Higham's n·ε of their terms.
    size = x.abs() @ exact.weight.abs().mT + exact.bias.abs()
    assert bool(((mean - exact(x).loc).abs() <= 2 * x.shape[-1] * EPS64 * size).all())
    # log of a sum of K squares, each rounded once: a few ulps of the variance.
    variance = exact.scale_tril.square().sum(-1)
    assert torch.allclose(logvar.exp(), variance.expand_as(logvar), rtol=8 * EPS64, atol=0)
    with pytest.raises(ValueError, match="model must have D = 6 and K = 3"):
        encoder.load_exact_posterior_(toyvae.LinearGaussian(torch.ones(6, 2, dtype=torch.float64)))


def test_linear_vae_rejects_bad_sizes():
    """latent_dim > data_dim and non-positive sizes raise ValueError naming the argument."""
    with pytest.raises(ValueError, match="latent_dim must be at most data_dim"):
        linear_vae(data_dim=2, latent_dim=3)
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        linear_vae(num_data=0)


# -- the catalog: every bug flagged, every correct twin passes -----------------------------------


@pytest.mark.parametrize("estimator", CORRECT, ids=lambda f: f.__name__)
@pytest.mark.false_alarm(1e-6)  # the checker's false alarm
def test_correct_estimators_pass(estimator):
    """Each correct estimator of the catalog passes the check, value and gradient, at defaults."""
    options = next(_options(bug) for bug in bugs.CATALOG if bug.correct is estimator)
    check = _check(estimator, options)
    # The checker's own decision: a false alarm has probability 1e-6 by construction.
    assert check.passed, check.message
    assert check.direction == "consistent"
    assert check.num_draws == DEFAULT_NUM_DRAWS


@pytest.mark.parametrize("bug", bugs.CATALOG, ids=lambda b: b.name)
def test_planted_bug_is_flagged(bug):
    """Each planted bug fails the check at the defaults, by a wide margin (see the docs page)."""
    check = _check(bug.buggy, _options(bug))
    assert not check.passed, check.message
    assert "FAILED" in check.message


def _exact_bias(name: str, vae: LinearVAE) -> float:
    """The exact E[buggy] − E[correct twin] for bugs that shift the estimate deterministically."""
    model, _, _, kl, log_det = _exact_parts(vae)
    n, d = vae.x.shape
    k = model.latent_dim
    return {
        # recon + KL instead of recon − KL.
        "kl_wrong_sign": 2 * kl.sum(),
        # KL without −½ log det Σ_q raises the ELBO by −½ log det Σ_q per row.
        "kl_missing_log_det": -0.5 * log_det.sum(),
        # KL/K instead of KL.
        "kl_averaged_over_latents": (1 - 1 / k) * kl.sum(),
        # Loss: KL summed over rows instead of averaged.
        "loss_batch_mean_and_sum": kl.sum() - kl.mean(),
        # log p(x|z) loses −½ D log 2π; those of p(z) and q(z) cancel.
        "dropped_log_2pi": 0.5 * d * math.log(2 * math.pi) * n,
        # log Σ w instead of log (1/k) Σ w.
        "iwae_missing_log_k": n * math.log(bugs.IWAE_K),
    }[name]


SHIFTING_BUGS = [
    bug
    for bug in bugs.CATALOG
    if bug.name
    in {
        "kl_wrong_sign",
        "kl_missing_log_det",
        "kl_averaged_over_latents",
        "loss_batch_mean_and_sum",
        "dropped_log_2pi",
        "iwae_missing_log_k",
    }
]


@pytest.mark.parametrize("bug", SHIFTING_BUGS, ids=lambda b: b.name)
def test_reported_offset_is_the_exact_bias(bug):
    """For a bug that adds a fixed offset, the report's mean moves by exactly that offset.

    The bug and its twin draw the same noise from the same seed, so their means over the same
    draws differ by the exact bias, up to rounding only.
    """
    buggy, correct = _check(bug.buggy, _options(bug)), _check(bug.correct, _options(bug))
    bias = float(_exact_bias(bug.name, _vae()))
    # Rounding of two means of sums over the same draws (see _rounding).
    assert abs((buggy.mean - correct.mean) - bias) <= _rounding(_vae(), DEFAULT_NUM_DRAWS, bias)
    assert buggy.direction == ("too high" if bias > 0 else "too low")
    side = "above" if bias > 0 else "below"
    assert f"{abs(buggy.difference):.3g} nats {side}" in buggy.message


def test_no_reparameterisation_has_the_right_value_and_a_wrong_encoder_gradient():
    """z = q.sample(): the value passes; the gradient fails at an encoder parameter."""
    check = _check(bugs.no_reparameterisation)
    assert check.direction == "consistent", check.message
    assert check.gradient_passed is False
    assert check.gradient_parameter.startswith("encoder."), check.gradient_parameter
    assert "gradient: WRONG" in check.message


@pytest.mark.parametrize(
    ("estimator", "full_log_weight"),
    [(bugs.elbo_analytic_kl, False), (bugs.elbo_by_hand, True)],
    ids=["analytic_kl", "log_weight"],
)
@pytest.mark.false_alarm(2e-6)  # two two-sided bands at 1e-6
def test_correct_estimator_mean_and_standard_error_match_exact_moments(estimator, full_log_weight):
    """The reported mean is within the exact-variance band of the ELBO; the SE is the exact one."""
    check = _check(estimator)
    vae = _vae()
    _, _, elbo, _, _ = _exact_parts(vae)
    kappa2, kappa4 = _quadratic_form_cumulants(vae, full_log_weight)
    n = check.num_draws
    exact_se = math.sqrt(kappa2 / n)
    # The mean of n iid draws, each a sum of 32 independent quadratic forms: normal by the CLT,
    # with the exact standard error; false-alarm probability 1e-6.
    assert abs(check.mean - float(elbo.sum())) <= Z_1E6 * exact_se
    # Sample variance s² of n iid draws: Var(s²) = κ₄/n + 2κ₂²/(n − 1) exactly; s² is a mean of
    # n terms, so normal to good accuracy; the 1e-6 band on s², mapped to the SE (= s/√n).
    band = Z_1E6 * math.sqrt(kappa4 / n + 2 * kappa2**2 / (n - 1))
    sample_variance = check.standard_error**2 * n
    assert abs(sample_variance - kappa2) <= band, (sample_variance, kappa2, band)


# false alarm: the 1e-6 band below log p(x), and the gaps measured in standard errors
@pytest.mark.false_alarm(2e-6)
def test_iwae_reference_lies_between_the_exact_bounds():
    """ELBO ≤ reference L_5 ≤ log p(x), and the default VAE keeps all three far apart."""
    check = _check(bugs.iwae, (("k", bugs.IWAE_K),))
    vae = _vae()
    model, _, elbo, _, _ = _exact_parts(vae)
    with torch.no_grad():
        log_evidence = float(model.log_evidence(vae.x).sum())
    elbo = float(elbo.sum())
    # The Monte Carlo gap is ≥ 0 draw by draw (Jensen), so this holds deterministically.
    assert elbo <= check.exact
    # log p(x) − L_5 > 0 exactly; the estimate must respect it beyond its own 1e-6 band.
    assert check.exact + Z_1E6 * check.exact_standard_error < log_evidence
    # Far apart: an estimator off by either gap (the mean of log weights has mean ELBO; an
    # estimator of log p(x)) is flagged with probability ≥ 1 − 1e-6, which needs a gap of at
    # least (threshold + Z_1E6) standard errors: the z-statistic then exceeds the threshold
    # unless it falls Z_1E6 below its mean.
    needed = (check.threshold + Z_1E6) * math.hypot(
        check.standard_error, check.exact_standard_error
    )
    assert check.exact - elbo > needed
    assert log_evidence - check.exact > needed


@pytest.mark.false_alarm(2e-6)  # two passing checks at 1e-6
def test_exact_encoder_makes_estimates_exact_and_hides_the_mean_of_log_weights():
    """With q = p(z|x) every log weight is log p(x): a correct ELBO has zero variance, and
    mean-of-log-weights cannot be told from IWAE (why the default encoder is not the posterior)."""
    correct = _check(bugs.elbo_by_hand, exact_encoder=True)
    assert correct.passed, correct.message
    # Zero variance up to rounding: a few ulps of |log p(x)| ≈ 300 per draw.
    assert correct.standard_error <= 64 * EPS64 * abs(correct.exact)
    hidden = check_elbo_estimator(
        bugs.iwae_mean_of_log_weights, _vae(True), k=bugs.IWAE_K, num_draws=20, seed=seeds.seed(0)
    )
    assert hidden.passed, hidden.message


def _shifted_posterior_vae(shift: float) -> LinearVAE:
    """The exact-posterior VAE with every encoder mean moved by ``shift``: q = N(μ + δ, Σ)."""
    vae = linear_vae(exact_encoder=True)
    with torch.no_grad():
        vae.encoder.mean.bias.add_(shift)
    return vae


def _log_cosh_moments(a: float) -> tuple[float, float, float]:
    """Mean, variance and 4th cumulant of log cosh(a·v), v ~ N(0, 1), by quadrature."""

    def weighted(v, power):  # log cosh(a·v)^power times the N(0, 1) density
        y = abs(a * v)
        log_cosh = y + math.log1p(math.exp(-2 * y)) - math.log(2)
        return log_cosh**power * math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)

    # Even integrand: twice the integral over [0, ∞); quad's error is ~1e-10 relative.
    raw = [2 * scipy.integrate.quad(weighted, 0, math.inf, args=(j,))[0] for j in (1, 2, 3, 4)]
    m1, m2, m3, m4 = raw
    variance = m2 - m1**2
    central4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
    return m1, variance, central4 - 3 * variance**2


@pytest.mark.false_alarm(2e-6)  # two two-sided bands at 1e-6
def test_iwae_reference_standard_error_is_its_exact_monte_carlo_error():
    """For k = 2 the reference's reported standard error matches the exact one of its gap draws.

    With q = N(μ + δ, Σ), Σ the posterior covariance, log w = log p(x) + σ u exactly, u ~ N(0, 1),
    σ² = δᵀΣ⁻¹δ = 2 KL(q ‖ p(z|x)). Then the k = 2 gap log ½(w₁ + w₂) − ½ log w₁w₂ is
    log cosh(σ(u₁ − u₂)/2) = log cosh(σ v/√2), v ~ N(0, 1): its moments are 1-D integrals.
    """
    vae = _shifted_posterior_vae(0.4)
    model, q, elbo, _, _ = _exact_parts(vae)
    with torch.no_grad():
        sigma2 = (2 * toyvae.kl_to_posterior(model, vae.x, q)).tolist()
    moments = [_log_cosh_moments(math.sqrt(s2 / 2)) for s2 in sigma2]
    mean_gap = sum(m for m, _, _ in moments)  # one draw of the gap, summed over the rows of x
    var_gap = sum(v for _, v, _ in moments)  # rows are independent: cumulants add
    kappa4_gap = sum(c for _, _, c in moments)

    num_draws = 200
    check = check_elbo_estimator(
        functools.partial(bugs.iwae, k=2),
        vae,
        k=2,
        num_draws=num_draws,
        check_gradient=False,
        seed=seeds.seed(0),
    )
    # The reference is the ELBO plus the mean of 16·num_draws gap draws, in 64 batches whose
    # means give the standard error: exact SE² = Var(gap)/(16·num_draws).
    batches, per_batch = 64, 16 * num_draws // 64
    exact_se = math.sqrt(var_gap / (batches * per_batch))
    # Mean of 3200 iid draws, each a sum of 32 rows: normal by the CLT; rounding (~1e-13) is
    # far below the 1e-6 band of the exact SE (~0.04).
    assert abs(check.exact - float(elbo.sum()) - mean_gap) <= Z_1E6 * exact_se
    # Reported SE² = s²/64, s² the sample variance of 64 batch means with variance σ_b² and 4th
    # cumulant κ_b: Var(s²) = κ_b/64 + 2σ_b⁴/63 exactly. s²/σ_b² is taken as χ²_ν/ν with ν
    # matching that variance (ν = 63 for normal batch means); 1e-6 split over the two tails.
    var_batch, kappa4_batch = var_gap / per_batch, kappa4_gap / per_batch**3
    dof = 2 * var_batch**2 / (kappa4_batch / batches + 2 * var_batch**2 / (batches - 1))
    low, high = (float(scipy.stats.chi2.isf(p, dof)) / dof for p in (1 - 0.5e-6, 0.5e-6))
    ratio = (check.exact_standard_error / exact_se) ** 2
    assert low <= ratio <= high, (ratio, low, high)


@pytest.mark.false_alarm(1e-6)  # the base check must pass
def test_rounding_allowance_has_the_documented_size():
    """A zero-variance estimator passes, and fails once offset by 100 rounding allowances.

    With q the exact posterior every draw of a correct ELBO is log p(x) to rounding, so the
    z-test's spread is the allowance r = (N + D + K)·ε·M alone, and z = offset/r ≈ 100.
    """
    vae = _vae(exact_encoder=True)
    model, q, _, kl, _ = _exact_parts(vae)
    with torch.no_grad():
        magnitude = (toyvae.expected_log_likelihood(model, vae.x, q).abs() + kl).sum().item()
    n, d = vae.x.shape
    allowance = (n + d + model.latent_dim) * EPS64 * magnitude
    offset = 100 * allowance

    base = _check(bugs.elbo_by_hand, exact_encoder=True)
    assert base.passed, base.message  # rounding alone stays within the allowance

    def offset_elbo(x, encoder, decoder, generator):
        return bugs.elbo_by_hand(x, encoder, decoder, generator) + offset

    shifted = check_elbo_estimator(offset_elbo, vae, seed=seeds.seed(0))  # base's draws
    assert not shifted.passed, shifted.message
    assert shifted.direction == "too high"
    # Same seed, same draws: the numerator is base.difference + offset, up to the rounding of
    # adding the offset to each draw (ε/2 of |draw|) and of the mean over n draws (log₂ n
    # levels); the SE grows by at most ε·|draw|. The spread √(SE² + r²) exceeds r by ½SE²/r.
    size = abs(shifted.exact) + offset
    numerator_error = (1 + math.log2(shifted.num_draws)) * EPS64 * size
    se = base.standard_error + EPS64 * size
    expected = (offset + base.difference) / allowance
    tolerance = numerator_error / allowance + 0.5 * (se / allowance) ** 2 * expected
    assert abs(shifted.z - expected) <= tolerance, (shifted.z, expected, tolerance)


@pytest.mark.parametrize(
    ("false_alarm", "num_draws", "check_gradient"),
    [(1e-6, DEFAULT_NUM_DRAWS, True), (1e-3, 20, True), (1e-3, 20, False)],
)
def test_thresholds_are_student_t_quantiles_of_the_false_alarm_split(
    false_alarm, num_draws, check_gradient
):
    """The value threshold is the two-sided Student-t_{n−1} quantile at α/2 (α/4 per tail), or α
    (α/2) without a gradient test; the gradient's is at α/2 split over P coordinates (Bonferroni).
    """
    vae = _vae()
    options = (("check_gradient", check_gradient), ("false_alarm", false_alarm))
    options += (("num_draws", num_draws),)
    # The defaults share the cached check of test_correct_estimators_pass.
    check = _check(bugs.elbo_analytic_kl, options if num_draws != DEFAULT_NUM_DRAWS else ())
    dof = num_draws - 1
    # α split evenly between value and gradient tests; each two-sided.
    value_tail = false_alarm / 4 if check_gradient else false_alarm / 2
    expected = float(scipy.stats.t.isf(value_tail, dof))
    # Same quantile in float64; 1e-9 allows an equivalent form such as ppf(1 − tail), whose
    # rounding moves a tail ≥ 2.5e-7 by ≤ 2.2e-10 relative, and the quantile by less (the
    # tail's elasticity q·f(q)/P(T > q) exceeds 1).
    assert math.isclose(check.threshold, expected, rel_tol=1e-9), (check.threshold, expected)
    gradient_line = check.message.splitlines()[-1]
    if not check_gradient:
        assert check.gradient_passed is None
        assert "gradient" not in gradient_line
        return
    count = sum(p.numel() for p in vae.encoder.parameters())
    count += sum(p.numel() for p in vae.decoder.parameters())
    g_expected = float(scipy.stats.t.isf(false_alarm / 4 / count, dof))
    # The report prints the gradient threshold to 2 decimals, whether the gradient passes or not.
    assert f"|z| > {g_expected:.2f} fails" in gradient_line, (gradient_line, g_expected)


# -- the report and the assert-style variant -----------------------------------------------------


@pytest.mark.false_alarm(1e-6)  # the correct check must pass
def test_report_names_amount_direction_and_verdict():
    """str(check) says passed/FAILED, the offset in nats, its side and z; passing says so too."""
    good, bad = _check(bugs.elbo_analytic_kl), _check(bugs.kl_wrong_sign)
    assert str(good) == good.message
    assert good.message.startswith("ELBO estimator check: passed")
    assert "consistent with the exact ELBO" in good.message
    assert bad.message.startswith("ELBO estimator check: FAILED")
    assert f"nats above the exact ELBO (z = {bad.z:+.1f}" in bad.message
    assert bad.message.splitlines()[1].endswith("too high")


@pytest.mark.false_alarm(1e-6)  # the correct check must pass
def test_assert_variant_raises_with_the_report():
    """assert_elbo_estimator returns the check if it passes, else raises AssertionError."""
    check = assert_elbo_estimator(bugs.elbo_analytic_kl, _vae(), num_draws=20, seed=seeds.seed(0))
    assert check.passed
    with pytest.raises(AssertionError, match="nats above the exact ELBO"):
        assert_elbo_estimator(bugs.kl_wrong_sign, _vae(), num_draws=20, seed=seeds.seed(0))


def test_non_finite_estimates_fail():
    """An estimator returning NaN fails, and the report says how many draws were not finite."""

    def broken(x, encoder, decoder, generator):
        return bugs.elbo_analytic_kl(x, encoder, decoder, generator) * float("nan")

    check = check_elbo_estimator(broken, _vae(), num_draws=10, seed=seeds.seed(0))
    assert not check.passed
    assert check.direction == "not finite"
    assert "NOT FINITE in 10 of 10 draws" in check.message


@pytest.mark.false_alarm(2e-6)  # two passing checks at 1e-6
def test_reduction_none_and_float32():
    """A per-row estimator passes with reduction='none', and a float32 VAE works the same way."""

    def per_row(x, encoder, decoder, generator):
        mean, logvar = encoder.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(
            mean.shape, generator=generator, dtype=mean.dtype, device=mean.device
        )
        q, prior = encoder(x), torch.distributions.Normal(torch.zeros_like(z), 1.0)
        return decoder(z).log_prob(x) + prior.log_prob(z).sum(-1) - q.log_prob(z)

    check = check_elbo_estimator(
        per_row, _vae(), reduction="none", num_draws=50, seed=seeds.seed(0)
    )
    assert check.passed, check.message
    check32 = check_elbo_estimator(
        bugs.elbo_analytic_kl, linear_vae(dtype=torch.float32), num_draws=50, seed=seeds.seed(0)
    )
    assert check32.passed, check32.message


def test_check_leaves_the_global_generator_alone():
    """The checker seeds torch's global RNG for estimators that use it, then restores it."""
    state = torch.get_rng_state()
    first = check_elbo_estimator(
        bugs.no_reparameterisation, _vae(), num_draws=10, seed=seeds.seed(0)
    )
    assert torch.equal(torch.get_rng_state(), state)
    second = check_elbo_estimator(
        bugs.no_reparameterisation, _vae(), num_draws=10, seed=seeds.seed(0)
    )
    assert first.mean == second.mean  # q.sample() drew the same numbers: reproducible


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"reduction": "avg"}, ValueError, "reduction must be 'sum', 'mean' or 'none', got 'avg'"),
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"num_draws": 3}, ValueError, "num_draws must be an integer of at least 10, got 3"),
        ({"false_alarm": 2.0}, ValueError, r"false_alarm must be a float in \(0, 1\), got 2.0"),
        ({"loss": "yes"}, TypeError, "loss must be a bool"),
        ({"check_gradient": 1}, TypeError, "check_gradient must be a bool, got 1"),
    ],
)
def test_bad_options_raise(options, error, pattern):
    """Bad options raise ValueError or TypeError naming the option, the value, what's expected."""
    with pytest.raises(error, match=pattern):
        check_elbo_estimator(bugs.elbo_analytic_kl, _vae(), **options)


def test_bad_estimators_raise():
    """A non-callable, a non-tensor result or a wrongly shaped result is named in the error."""
    with pytest.raises(TypeError, match="estimator must be a function"):
        check_elbo_estimator(3, _vae())
    with pytest.raises(TypeError, match="estimator must return a floating-point torch tensor"):
        check_elbo_estimator(lambda *args: 1.0, _vae())
    with pytest.raises(ValueError, match=r"single number with reduction='sum', got an array"):
        check_elbo_estimator(lambda x, *args: x.sum(-1), _vae())
    with pytest.raises(ValueError, match=r"one value per row of x, shape \(32,\)"):
        check_elbo_estimator(lambda x, *args: x.sum(), _vae(), reduction="none")


# -- diagnoses: every planted bug names its cause ------------------------------------------------


@pytest.mark.parametrize("bug", bugs.CATALOG, ids=lambda b: b.name)
def test_planted_bug_is_diagnosed(bug):
    """Each planted bug's report names its cause first: the explanation whose exact prediction
    fits the estimate's mean (or, for a detached sample, the gradient's pattern)."""
    check = _check(bug.buggy, _options(bug))
    assert bug.diagnosis, bug.name
    assert check.diagnosis, check.message
    assert check.diagnosis[0] == bug.diagnosis, check.message
    assert "diagnosis: " in check.message


@pytest.mark.parametrize("estimator", CORRECT, ids=lambda f: f.__name__)
@pytest.mark.false_alarm(1e-6)  # the checker's false alarm
def test_correct_estimators_get_no_diagnosis(estimator):
    """A passing check carries no diagnosis (explanations are sought only for failures)."""
    options = next(_options(bug) for bug in bugs.CATALOG if bug.correct is estimator)
    check = _check(estimator, options)
    assert check.diagnosis == ()
    assert "diagnosis" not in check.message


def test_dropped_constant_diagnosis_quotes_the_exact_offset():
    """gaussian_nll_loss's default is off by exactly N·D·½ log 2π, and the report says so."""
    check = _check(bugs.loss_gaussian_nll_default, (("loss", True),))
    n, d = _vae().x.shape
    offset = n * d * 0.5 * math.log(2 * math.pi)
    assert f"N·D·½ log 2π = {-offset:+.4g} nats" in check.message, check.message
    assert "gaussian_nll_loss(full=False)" in check.message


# -- the user's own modules, as written ----------------------------------------------------------


class _Encoder(torch.nn.Module):
    """A user's encoder: returns (loc, scale), a parameterisation toyvae's own modules don't use."""

    def __init__(self, d, k):
        super().__init__()
        self.loc = torch.nn.Linear(d, k, dtype=torch.float64)
        self.log_scale = torch.nn.Linear(d, k, dtype=torch.float64)

    def forward(self, x):
        return self.loc(x), self.log_scale(x).exp()


class _Decoder(torch.nn.Module):
    """A user's decoder with a frozen log noise variance (requires_grad=False)."""

    def __init__(self, k, d):
        super().__init__()
        self.linear = torch.nn.Linear(k, d, dtype=torch.float64)
        self.log_var = torch.nn.Parameter(
            torch.full((d,), -0.5, dtype=torch.float64), requires_grad=False
        )


def _own_vae():
    vae = _vae()
    enc, dec = _Encoder(6, 3), _Decoder(3, 6)
    with torch.no_grad():  # copy toyvae's deliberately inexact encoder and its decoder's mean
        enc.loc.weight.copy_(vae.encoder.mean.weight)
        enc.loc.bias.copy_(vae.encoder.mean.bias)
        enc.log_scale.weight.copy_(0.5 * vae.encoder.logvar.weight)
        enc.log_scale.bias.copy_(0.5 * vae.encoder.logvar.bias)
        dec.linear.weight.copy_(vae.decoder.mean.weight)
        dec.linear.bias.copy_(vae.decoder.mean.bias)
    return enc, dec, vae.x


def _own_loss(enc, dec, full):
    def loss(x):
        loc, scale = enc(x)
        z = loc + scale * torch.randn_like(loc)
        variance = dec.log_var.exp().expand(x.shape)
        nll = torch.nn.functional.gaussian_nll_loss(
            dec.linear(z), x, variance, full=full, reduction="sum"
        )
        kl = (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum()
        return nll + kl

    return loss


@pytest.mark.false_alarm(1e-6)  # the correct loss must pass
def test_own_modules_with_a_frozen_variance_are_checked_by_autograd_through_the_closed_form():
    """A user's own modules, their own (loc, scale) parameterisation and a frozen decoder
    variance: the correct loss passes, gaussian_nll_loss's default is diagnosed, the frozen
    parameter is named as not checked, and every other parameter is checked by its own name."""
    enc, dec = _own_vae()[:2]
    x = _own_vae()[2]

    def model():
        return toyvae.LinearGaussian(dec.linear.weight, dec.linear.bias, dec.log_var.exp())

    def q(x):
        return torch.distributions.Independent(torch.distributions.Normal(*enc(x)), 1)

    good = check_elbo(_own_loss(enc, dec, True), model, q, x, loss=True, seed=seeds.seed(0))
    assert good.passed, good.message
    assert good.frozen == ("dec.log_var",)
    count = sum(p.numel() for p in enc.parameters()) + 6 * 3 + 6
    assert f"in all {count} coordinates" in good.message, good.message
    bad = check_elbo(_own_loss(enc, dec, False), model, q, x, loss=True, seed=seeds.seed(0))
    assert not bad.passed
    assert bad.diagnosis == ("dropped_log_2pi",), bad.message


def test_parameter_used_by_the_estimate_but_not_by_the_model_is_named():
    """A loss that reads a decoder parameter the model builder ignores fails, and says so."""
    enc, dec, x = _own_vae()
    dec.log_var.requires_grad_(True)

    def model():  # forgets the noise parameter: a constant in its place
        return toyvae.LinearGaussian(dec.linear.weight, dec.linear.bias, dec.log_var.detach().exp())

    def q(x):
        return torch.distributions.Independent(torch.distributions.Normal(*enc(x)), 1)

    check = check_elbo(
        _own_loss(enc, dec, True), model, q, x, loss=True, num_draws=50, seed=seeds.seed(0)
    )
    assert not check.passed, check.message
    assert "parameter_not_in_model" in check.diagnosis, check.message
    assert "neither model() nor q(x) depends on dec.log_var" in check.message


def test_own_vae_tuple_gets_a_short_error_naming_the_right_function():
    """(encoder, decoder, x) of one's own modules: a TypeError of one line, not the data."""
    enc, dec, x = _own_vae()
    with pytest.raises(TypeError, match=r"got a tuple of \(_Encoder, _Decoder, Tensor\)") as info:
        check_elbo_estimator(bugs.elbo_analytic_kl, (enc, dec, x))
    assert "toyvae.testing.check_elbo(estimate, model, q, x)" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "error", "pattern"),
    [
        ((3, lambda: None, lambda x: None), TypeError, "estimate must be a function"),
        ((lambda x: x, 3, lambda x: None), TypeError, "model must be a function that builds"),
        ((lambda x: x, lambda: None, 3), TypeError, "q must be a function x -> q"),
    ],
)
def test_check_elbo_bad_arguments_name_the_argument(arguments, error, pattern):
    """check_elbo's errors name the argument and what it should be."""
    with pytest.raises(error, match=pattern):
        check_elbo(*arguments, _vae().x)


# -- the hierarchical and state-space families: per-layer and per-step ELBOs --------------------


def _ssm_case():
    generator = seeds.generator(3)
    options = {"dtype": torch.float64, "generator": generator}
    k, d, t, n = 2, 3, 4, 8
    transition = torch.nn.Parameter(0.6 * torch.eye(k, dtype=torch.float64))
    emission = torch.nn.Parameter(torch.randn(d, k, **options))
    log_noise = torch.nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))
    model = toyvae.LinearGaussianSSM(
        transition.detach(), 0.5, emission.detach(), log_noise.detach().exp()
    )
    x, _ = model.sample((n,), num_steps=t, generator=generator)
    loc = torch.nn.Parameter(0.1 * torch.randn(n, t * k, **options))
    log_scale = torch.nn.Parameter(torch.full((n, t * k), -0.6, dtype=torch.float64))
    return transition, emission, log_noise, loc, log_scale, x


def _per_step_elbo(transition, emission, log_noise, loc, log_scale, dropped=False):
    """A user's per-time-step ELBO: Σ_t log p(x_t|z_t) + log p(z_t|z_{t−1}) − log q(z)."""
    normal = torch.distributions.Normal

    def estimate(x):
        n, t, _ = x.shape
        q = torch.distributions.Independent(normal(loc, log_scale.exp()), 1)
        z_flat = q.rsample()
        z = z_flat.reshape(n, t, -1)
        noise_sd = (0.5 * log_noise).exp()
        total = -q.log_prob(z_flat)
        for step in range(t):
            emit = normal(z[:, step] @ emission.T, noise_sd).log_prob(x[:, step])
            total = total + (emit + (0.5 * math.log(2 * math.pi) if dropped else 0)).sum(-1)
            mean = torch.zeros_like(z[:, 0]) if step == 0 else z[:, step - 1] @ transition.T
            scale = 1.0 if step == 0 else math.sqrt(0.5)
            total = total + normal(mean, scale).log_prob(z[:, step]).sum(-1)
        return total.sum()

    return estimate


@pytest.mark.false_alarm(2e-6)  # the correct ELBO passes (1e-6), the true explanation fits
def test_per_time_step_elbo_of_a_state_space_model_is_checked():
    """A user's per-step ELBO for a linear-Gaussian SSM passes; dropping ½ log 2π from each
    emission is diagnosed as N·D·½ log 2π with D = T·D_step (the numbers per sequence)."""
    transition, emission, log_noise, loc, log_scale, x = _ssm_case()

    def model():
        return toyvae.LinearGaussianSSM(transition, 0.5, emission, log_noise.exp())

    def q(x):
        return torch.distributions.Independent(torch.distributions.Normal(loc, log_scale.exp()), 1)

    parts = (transition, emission, log_noise, loc, log_scale)
    good = check_elbo(_per_step_elbo(*parts), model, q, x, num_draws=100, seed=seeds.seed(0))
    assert good.passed, good.message
    # 200 draws: the bias, N·D·½ log 2π = 88 nats, is 14 standard errors (6.4 nats), so the
    # check fails except with probability Φ(5.38 − 14) ≈ 1e-17. The true explanation fits within
    # the check's threshold except with its false alarm; others, predicted 13 to 50 nats away
    # (2 to 8 standard errors), may fit too, and may even fit better, so only membership is
    # asserted (at 100 draws, the exact tuple failed for 1 in 10 seeds).
    bad = check_elbo(
        _per_step_elbo(*parts, dropped=True), model, q, x, num_draws=200, seed=seeds.seed(0)
    )
    assert not bad.passed, bad.message
    assert "dropped_log_2pi" in bad.diagnosis, bad.message
    assert "D = 12 data dimensions" in bad.message


@pytest.mark.false_alarm(1e-6)  # the correct ELBO must pass
def test_per_layer_elbo_of_a_hierarchical_model_is_checked():
    """A user's per-layer ELBO (log p(z₂) + log p(z₁|z₂) + log p(x|z₁) − log q) for a two-layer
    hierarchy passes; the same with log p(x|z₁) averaged over the data dimensions is diagnosed."""
    generator = seeds.generator(4)
    options = {"dtype": torch.float64, "generator": generator}
    w0 = torch.nn.Parameter(torch.randn(5, 3, **options))
    w1 = torch.nn.Parameter(torch.randn(3, 2, **options))
    hierarchy = toyvae.HierarchicalLinearGaussian([w0.detach(), w1.detach()], None, [0.4, 0.8])
    x, _ = hierarchy.sample((16,), generator=generator)
    loc = torch.nn.Parameter(0.1 * torch.randn(16, 5, **options))  # flat (z₂, z₁): top-down
    log_scale = torch.nn.Parameter(torch.full((16, 5), -0.5, dtype=torch.float64))
    normal = torch.distributions.Normal

    def q(x):
        return torch.distributions.Independent(normal(loc, log_scale.exp()), 1)

    def estimate(x, averaged=False):
        qz = q(x)
        z = qz.rsample()
        z2, z1 = z[:, :2], z[:, 2:]
        top = normal(0.0, 1.0).log_prob(z2).sum(-1)
        middle = normal(z2 @ w1.T, math.sqrt(0.8)).log_prob(z1).sum(-1)
        bottom = normal(z1 @ w0.T, math.sqrt(0.4)).log_prob(x)
        bottom = bottom.mean(-1) if averaged else bottom.sum(-1)
        return (bottom + top + middle - qz.log_prob(z)).sum()

    def model():
        return toyvae.HierarchicalLinearGaussian([w0, w1], None, [0.4, 0.8])

    good = check_elbo(estimate, model, q, x, num_draws=100, seed=seeds.seed(0))
    assert good.passed, good.message
    bad = check_elbo(
        lambda x: estimate(x, averaged=True), model, q, x, num_draws=100, seed=seeds.seed(0)
    )
    assert bad.diagnosis == ("reconstruction_averaged_over_data",), bad.message


# -- the reconstruction term's exact variance -----------------------------------------------------


def test_reconstruction_variance_matches_the_direct_linear_gaussian_formula():
    """Var_q log p(x|z) by Bayes' rule (the interface) equals the direct formula
    ½‖LᵀGL‖_F² + ‖LᵀÃᵀ(r̃ − Ãm)‖² written from W and Ψ, and κ₄ likewise."""
    vae = _vae()
    with torch.no_grad():
        model, q = vae.decoder.model(), vae.encoder(vae.x)
        got = reconstruction_moments(model, vae.x, q)
        mean, logvar = vae.encoder.encode(vae.x)
        sd = (0.5 * vae.decoder.logvar).exp()
        whitened = vae.decoder.mean.weight / sd.unsqueeze(-1)
        residual = (vae.x - vae.decoder.mean.bias) / sd - mean @ whitened.mT
        scale = torch.diag_embed((0.5 * logvar).exp())
        a = -0.5 * scale @ (whitened.mT @ whitened) @ scale
        b = (scale @ (whitened.mT @ residual.unsqueeze(-1))).squeeze(-1)
        a2 = a @ a
        variance = 2 * a2.diagonal(dim1=-2, dim2=-1).sum(-1) + b.square().sum(-1)
        kappa4 = 48 * ((a2 @ a2).diagonal(dim1=-2, dim2=-1).sum(-1))
        kappa4 = kappa4 + 48 * (b.unsqueeze(-2) @ a2 @ b.unsqueeze(-1)).reshape(-1)
    # The Bayes route forms B₁ᵀB₁ − B₀ᵀB₀ = LᵀGL as a difference of O(1 + ‖G‖) matrices: each
    # entry off by a few ε of that size; squared and summed over K² entries (K = 3), 64 ε of
    # the larger side covers it.
    size = (2 * a2.diagonal(dim1=-2, dim2=-1).sum(-1).abs() + 1) * (1 + b.square().sum(-1))
    assert bool(((got.variance - variance).abs() <= 64 * EPS64 * size * 10).all())
    assert torch.allclose(got.fourth_cumulant, kappa4, rtol=1e-9, atol=0)
    assert torch.allclose(
        got.mean, toyvae.expected_log_likelihood(model, vae.x, q), rtol=0, atol=1e-12
    )


@pytest.mark.false_alarm(1e-6)  # one band at 1e-6
def test_analytic_kl_estimator_has_the_reconstruction_variance():
    """The sample variance of the analytic-KL estimator's draws is Σ_rows Var log p(x|z), within
    the exact 1e-6 band √(κ₄/n + 2σ⁴/(n − 1))·z; and here it is the larger of the two forms."""
    check = _check(bugs.elbo_analytic_kl)
    vae = _vae()
    with torch.no_grad():
        moments = reconstruction_moments(vae.decoder.model(), vae.x, vae.encoder(vae.x))
        log_w = toyvae.log_weight_moments(vae.decoder.model(), vae.x, vae.encoder(vae.x))
    sigma2, kappa4 = float(moments.variance.sum()), float(moments.fourth_cumulant.sum())
    n = check.num_draws
    sample_variance = check.standard_error**2 * n
    band = Z_1E6 * math.sqrt(kappa4 / n + 2 * sigma2**2 / (n - 1))
    assert abs(sample_variance - sigma2) <= band, (sample_variance, sigma2, band)
    assert sigma2 > float(log_w.variance.sum())  # exact: 88.0 against 70.4

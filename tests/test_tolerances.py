"""toyvae.tolerances: the error scale M bounds what it measures, whatever the noise kind."""

import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st

import toyvae
from toyvae.strategies import gaussians, linear_gaussian_models, observations
from toyvae.tolerances import identity_tolerance, magnitude, posterior_condition


@given(
    linear_gaussian_models().flatmap(
        lambda m: st.tuples(st.just(m), observations(m, batch_shape=(2,)), gaussians(m.latent_dim))
    )
)
def test_magnitude_bounds_every_quantity_it_is_the_scale_of(case):
    """|log p(x)|, |ELBO(q)|, KL(q ‖ p(z|x)) never exceed M: each is a signed sum of its terms."""
    model, x, q = case
    m = magnitude(model, x, q)
    assert (model.log_evidence(x).abs() <= m).all()
    assert (toyvae.elbo(model, x, q).abs() <= m).all()
    assert (toyvae.kl_to_posterior(model, x, q) <= m).all()
    assert (identity_tolerance(model, x, q) > 0).all()


def test_diagonal_noise_gives_the_scale_of_the_same_full_matrix():
    """M computed elementwise for a diagonal Ψ equals M computed densely for diag(Ψ)."""
    gen = seeds.generator(0)
    w = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    psi = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    diagonal = toyvae.LinearGaussian(w, noise_variance=psi)
    full = toyvae.LinearGaussian(w, noise_variance=torch.diag(psi))
    # The same D + K = 7 terms of positive size, each route an n-term sum within n·eps·M
    # (Higham §4.2), so the two agree to 2·7·eps relative.
    eps = torch.finfo(torch.float64).eps
    assert torch.allclose(magnitude(diagonal, x), magnitude(full, x), rtol=2 * 7 * eps, atol=0)
    gram = w.T @ (w / psi.unsqueeze(-1))
    eigenvalues = torch.linalg.eigvalsh(torch.eye(2, dtype=torch.float64) + gram)
    expected = (eigenvalues.max() / eigenvalues.min()).sqrt().item()
    # Eigenvalues of the same 2×2 matrix formed two ways: relative error ≤ K·κ(Λ)·eps each,
    # so the square root of their ratio within 2·K·κ(Λ)·eps, with κ(Λ) = expected².
    assert abs(posterior_condition(full) - expected) <= 4 * expected**2 * eps * expected

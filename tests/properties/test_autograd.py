"""Autograd gradients of the exact quantities, against finite differences."""

import numpy as np
import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference

F64 = torch.float64
KINDS = ["isotropic", "diagonal", "full"]


def parameters(kind, d=4, k=2, seed=0):
    gen = seeds.generator(seed)
    w = torch.randn(d, k, generator=gen, dtype=F64)
    b = torch.randn(d, generator=gen, dtype=F64)
    if kind == "isotropic":
        noise = torch.tensor(0.6, dtype=F64)
    elif kind == "diagonal":
        noise = torch.rand(d, generator=gen, dtype=F64) + 0.3
    else:
        a = torch.randn(d, d, generator=gen, dtype=F64)
        noise = a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)
    x = torch.randn(3, d, generator=gen, dtype=F64)
    q_loc = torch.randn(3, k, generator=gen, dtype=F64)
    q_tril = torch.tril(0.3 * torch.randn(k, k, generator=gen, dtype=F64)) + torch.eye(k)
    return w, b, noise, x, q_loc, q_tril


def symmetric(noise, kind):
    """gradcheck perturbs entries one at a time; keep a full Ψ symmetric under that."""
    return 0.5 * (noise + noise.mT) if kind == "full" else noise


@pytest.mark.parametrize("kind", KINDS)
def test_log_evidence_gradients_pass_gradcheck(kind):
    """∂ log p(x)/∂(W, b, Ψ, x) from autograd match central finite differences (gradcheck)."""
    w, b, noise, x, *_ = parameters(kind)

    def f(w, b, noise, x):
        return toyvae.LinearGaussian(w, b, symmetric(noise, kind)).log_evidence(x)

    inputs = tuple(t.clone().requires_grad_() for t in (w, b, noise, x))
    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3) against eps=1e-6 differences are
    # the ones torch derives for float64 central differences of O(1) functions.
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_elbo_and_kl_gradients_pass_gradcheck(kind):
    """∂ELBO and ∂KL(q ‖ p(z|x)) with respect to model and q parameters pass gradcheck."""
    w, b, noise, x, q_loc, q_tril = parameters(kind)

    def f(w, b, noise, q_loc, q_tril):
        model = toyvae.LinearGaussian(w, b, symmetric(noise, kind))
        q = MultivariateNormal(q_loc, scale_tril=torch.tril(q_tril))
        return toyvae.elbo(model, x, q), toyvae.kl_to_posterior(model, x, q)

    inputs = tuple(t.clone().requires_grad_() for t in (w, b, noise, q_loc, q_tril))
    assert torch.autograd.gradcheck(f, inputs)


def central_difference(f, array, h):
    """Gradient of the scalar function f at ``array`` by central differences of step h."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        up, down = array.copy(), array.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("kind", KINDS)
def test_log_evidence_gradient_matches_differences_of_the_reference(kind):
    """Autograd ∂ Σ log p(x)/∂W equals finite differences of the dense SciPy reference."""
    w, b, noise, x, *_ = parameters(kind)
    weight = w.clone().requires_grad_()
    toyvae.LinearGaussian(weight, b, noise).log_evidence(x).sum().backward()

    def f(w_np):
        return reference.log_evidence(w_np, b.numpy(), noise.numpy(), x.numpy()).sum()

    # Central differences err by (h²/6)·f''' (truncation) + eps·|f|/h (rounding). Richardson:
    # the truncation error of D(h/2) is (D(h) − D(h/2))/3 to leading order; h = 1e-3 keeps the
    # rounding part (~1e-13·|f|/1e-3 ≈ 1e-12) far below it. Allow 3× that estimate plus rounding.
    h = 1e-3
    coarse = central_difference(f, w.numpy(), h)
    fine = central_difference(f, w.numpy(), h / 2)
    f0 = abs(f(w.numpy()))
    tol = 3 * np.abs(coarse - fine) / 3 + 10 * np.finfo(float).eps * f0 / h
    assert np.all(np.abs(weight.grad.numpy() - fine) <= tol)

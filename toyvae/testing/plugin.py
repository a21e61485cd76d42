"""A pytest plugin: fixtures for a model, its data and its exact answers, and the one-line check.

Registered through the ``pytest11`` entry point, so installing toyvae makes it available in any
pytest suite with nothing to import:

- ``toyvae_model``: a seeded :class:`toyvae.LinearGaussian` (D = 6, K = 3, float64);
- ``toyvae_data``: 32 rows of data drawn from it;
- ``toyvae_exact``: its exact answers for that data (:class:`toyvae.Exact`: log p(x) and the
  posterior);
- ``assert_elbo``: :func:`toyvae.testing.assert_elbo`, whose failure message is the report and
  its diagnosis.

With Hypothesis, draw models from :func:`toyvae.strategies.linear_gaussian_models` in a
property test and call :func:`toyvae.testing.assert_elbo` on each.
"""

from __future__ import annotations

import pytest
import torch

from toyvae.model import LinearGaussian
from toyvae.testing.check import assert_elbo as _assert_elbo

__all__ = ["assert_elbo", "toyvae_data", "toyvae_exact", "toyvae_model"]


@pytest.fixture
def toyvae_model() -> LinearGaussian:
    """A seeded linear-Gaussian model: D = 6, K = 3, diagonal noise, float64."""
    generator = torch.Generator().manual_seed(0)
    options = {"dtype": torch.float64, "generator": generator}
    weight = torch.randn(6, 3, **options)
    bias = torch.randn(6, **options)
    noise = 0.2 + torch.rand(6, **options)
    return LinearGaussian(weight, bias, noise)


@pytest.fixture
def toyvae_data(toyvae_model) -> torch.Tensor:
    """32 rows drawn from ``toyvae_model`` with a seeded generator, shape (32, 6)."""
    x, _ = toyvae_model.sample((32,), generator=torch.Generator().manual_seed(1))
    return x


@pytest.fixture
def toyvae_exact(toyvae_model, toyvae_data):
    """The exact answers for ``toyvae_data``: log p(x) per row and the exact posterior."""
    with torch.no_grad():
        return toyvae_model.exact(toyvae_data)


@pytest.fixture
def assert_elbo():
    """:func:`toyvae.testing.assert_elbo`: raises ``AssertionError`` with the diagnosis."""
    return _assert_elbo

"""toyvae.testing.plugin: the pytest11 plugin's fixtures and one-line check in a user's suite."""

from __future__ import annotations

import pytest
import seeds

pytest_plugins = ["pytester"]

USER_TESTS = """
import torch
from torch.distributions import Independent, Normal

import toyvae
from toyvae.testing import check_elbo


def _pieces(model, x):
    loc = torch.nn.Parameter(torch.zeros(x.shape[0], model.latent_dim, dtype=x.dtype))
    log_scale = torch.nn.Parameter(torch.full_like(loc, -0.3))
    q = lambda x: Independent(Normal(loc, log_scale.exp()), 1)
    return q


def test_fixtures(toyvae_model, toyvae_data, toyvae_exact):
    assert toyvae_data.shape == (32, 6)
    assert torch.equal(toyvae_exact.log_evidence, toyvae_model.log_evidence(toyvae_data))


def test_correct(toyvae_model, toyvae_data, assert_elbo):
    q = _pieces(toyvae_model, toyvae_data)
    def elbo(x):
        qz = q(x)
        z = qz.rsample()
        return (toyvae_model.log_joint(x, z) - qz.log_prob(z)).sum()
    assert_elbo(elbo, toyvae_model, q, toyvae_data, num_draws=50, seed=SEED)


def test_averaged(toyvae_model, toyvae_data, assert_elbo):
    q = _pieces(toyvae_model, toyvae_data)
    def elbo(x):
        qz = q(x)
        z = qz.rsample()
        return (toyvae_model.log_joint(x, z) - qz.log_prob(z)).mean()
    assert_elbo(elbo, toyvae_model, q, toyvae_data, num_draws=50, seed=SEED)
"""


@pytest.mark.false_alarm(1e-6)  # the user's correct ELBO passes the check (false alarm 1e-6)
def test_plugin_fixtures_and_the_one_line_check_in_a_users_suite(pytester):
    """In a fresh suite the plugin's fixtures exist (registered by the pytest11 entry point),
    a correct ELBO passes in one line, and a failing one reports its diagnosis."""
    pytester.makepyfile(test_user=USER_TESTS.replace("SEED", str(seeds.seed(0))))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*diagnosis: the estimate is 1/N = 1/32 times the target*"])


@pytest.mark.parametrize("name", ["toyvae_model", "toyvae_data", "toyvae_exact", "assert_elbo"])
def test_plugin_fixtures_are_available_here(name, request):
    """The installed package's entry point loads the plugin in this suite too."""
    assert request.getfixturevalue(name) is not None

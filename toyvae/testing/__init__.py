"""Check your own ELBO code: a checker with diagnoses, a linear VAE with exact answers, bugs.

- :func:`check_elbo` checks the user's own estimate or loss function, as written, given a
  function that builds the exact model from their parameters and one that gives q for a
  batch; :func:`assert_elbo` is the same for use inside pytest. When a check fails, it names
  the common mistake that fits the exact numbers (:mod:`toyvae.testing.diagnose`).
- :func:`linear_vae` builds an encoder and a decoder (``nn.Module`` s) and data, whose exact
  ELBO, posterior and log p(x) toyvae knows.
- :func:`check_elbo_estimator` draws a user's estimator many times and decides, at a stated
  false-alarm probability, whether its value and gradient agree with the exact ones;
  :func:`assert_elbo_estimator` is the same for use inside pytest.
- :func:`check_sampler` checks a sampler's draws of z (MCMC chains included) against the exact
  posterior at a stated false-alarm probability (:mod:`toyvae.testing.samplers`).
- :mod:`toyvae.testing.bugs` is a catalog of real mistakes, each next to a correct twin.
"""

from toyvae.testing import bugs
from toyvae.testing.check import (
    DEFAULT_NUM_DRAWS,
    ELBOCheck,
    assert_elbo,
    assert_elbo_estimator,
    check_elbo,
    check_elbo_estimator,
)
from toyvae.testing.moments import ReconstructionMoments, reconstruction_moments
from toyvae.testing.samplers import SamplerCheck, assert_sampler, check_sampler
from toyvae.testing.vae import LinearDecoder, LinearEncoder, LinearVAE, linear_vae

__all__ = [
    "DEFAULT_NUM_DRAWS",
    "ELBOCheck",
    "LinearDecoder",
    "LinearEncoder",
    "LinearVAE",
    "ReconstructionMoments",
    "SamplerCheck",
    "assert_elbo",
    "assert_elbo_estimator",
    "assert_sampler",
    "bugs",
    "check_elbo",
    "check_elbo_estimator",
    "check_sampler",
    "linear_vae",
    "reconstruction_moments",
]

"""Check your own ELBO code: a linear VAE with exact answers, a checker, and planted bugs.

- :func:`linear_vae` builds an encoder and a decoder (``nn.Module`` s) and data, whose exact
  ELBO, posterior and log p(x) toyvae knows.
- :func:`check_elbo_estimator` draws a user's estimator many times and decides, at a stated
  false-alarm probability, whether its value and gradient agree with the exact ones;
  :func:`assert_elbo_estimator` is the same for use inside pytest.
- :mod:`toyvae.testing.bugs` is a catalog of real mistakes, each next to a correct twin.
"""

from toyvae.testing import bugs
from toyvae.testing.check import (
    DEFAULT_NUM_DRAWS,
    ELBOCheck,
    assert_elbo_estimator,
    check_elbo_estimator,
)
from toyvae.testing.vae import LinearDecoder, LinearEncoder, LinearVAE, linear_vae

__all__ = [
    "DEFAULT_NUM_DRAWS",
    "ELBOCheck",
    "LinearDecoder",
    "LinearEncoder",
    "LinearVAE",
    "assert_elbo_estimator",
    "bugs",
    "check_elbo_estimator",
    "linear_vae",
]

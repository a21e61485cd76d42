"""IWAE gradient SNR on the Gaussian toy model of Rainforth et al. (2018)."""

from __future__ import annotations

import torch

from toyvae.snr import gradient_snr, log_log_slope, rainforth_problem


def test_inference_snr_falls_and_generative_snr_rises_like_root_k():
    """Fitted log-log slopes over k = 16…256: inference SNR ≈ k^(−1/2), generative ≈ k^(1/2)."""
    g = torch.Generator().manual_seed(0)
    table = gradient_snr(rainforth_problem(generator=g), (16, 64, 256), 1000, generator=g)
    # Not an exact-variance threshold (the SNR of IWAE_k for k > 1 has no closed form). The
    # statistical error of each slope is about 0.005 (n = 1000: a standard deviation is known
    # to 1/√(2n) = 2.2% per coordinate, averaged over D = 20 coordinates, over a log-k range of
    # ln 16); the pre-asymptotic O(1/k) curvature measured at k ≥ 16 is below 0.01 (n = 2000,
    # k up to 1024: slopes −0.506 and +0.496). 0.05 is ten times the statistical error.
    assert abs(log_log_slope(table.k, table.inference) + 0.5) <= 0.05
    assert abs(log_log_slope(table.k, table.generative) - 0.5) <= 0.05
    # The noise itself shrinks like k^(−1/2) (the exact mean −∇χ²/(2k) shrinks like 1/k).
    assert abs(log_log_slope(table.k, table.inference_sd) + 0.5) <= 0.05

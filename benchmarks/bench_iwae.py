"""IWAE estimates at N = 256, D = 1024, K = 16, k = 1000: structured vs plain vs user-style.

    python benchmarks/bench_iwae.py [--repeats R] [--chunk C]

All three use the same noise ε (1000, 256, 16), so their estimates must agree to rounding.
The plain path and the user-style code build (chunk, N, D) arrays: they are run over chunks
of samples (default 100, about 200 MB in float64) and their log weights concatenated.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.distributions import Independent, Normal

import toyvae
from toyvae.estimators import log_weights_at

N, D, K, NUM_SAMPLES = 256, 1024, 16, 1000


def _log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    options = {"generator": g, "dtype": torch.float64}
    model = toyvae.LinearGaussian(
        torch.randn(D, K, **options) / math.sqrt(K),
        torch.randn(D, **options),
        0.5 + torch.rand(D, **options),
    )
    x, _ = model.sample((N,), generator=g)
    post = model.posterior(x)
    sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    # An encoder-like diagonal q: a little off the posterior.
    q = Independent(Normal(post.loc + 0.1 * torch.randn(N, K, **options), 1.2 * sd), 1)
    eps = torch.randn(NUM_SAMPLES, N, K, **options)
    return model, x, q, eps


def structured(model, x, q, eps, chunk):
    return _log_mean_exp(log_weights_at(model, x, q, eps))


def plain(model, x, q, eps, chunk):
    parts = [log_weights_at(model, x, q, e, method="plain") for e in eps.split(chunk)]
    return _log_mean_exp(torch.cat(parts))


def user_style(model, x, q, eps, chunk):
    """What a VAE codebase writes: sample z, decode, Normal log_prob, sum over dimensions."""
    loc, scale = q.base_dist.loc, q.base_dist.scale
    noise_sd = model.noise_variance.sqrt()
    parts = []
    for e in eps.split(chunk):
        z = loc + scale * e
        decoded = z @ model.weight.T + model.bias
        log_lik = Normal(decoded, noise_sd).log_prob(x).sum(-1)
        log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = Normal(loc, scale).log_prob(z).sum(-1)
        parts.append(log_lik + log_prior - log_q)
    return _log_mean_exp(torch.cat(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of R timings (3)")
    parser.add_argument("--chunk", type=int, default=100, help="samples per chunk (100)")
    args = parser.parse_args()
    model, x, q, eps = _problem()
    results, times = {}, {}
    for name, fn in [("structured", structured), ("plain", plain), ("user-style", user_style)]:
        best = math.inf
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = fn(model, x, q, eps, args.chunk)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    reference = results["structured"]
    print(f"N={N} D={D} K={K} k={NUM_SAMPLES} threads={torch.get_num_threads()} float64")
    for name in results:
        diff = (results[name] - reference).abs().max().item()
        scale = reference.abs().max().item()
        print(
            f"{name:>10}: {times[name]:8.3f} s  ×{times[name] / times['structured']:7.1f}  "
            f"max |Δ estimate| = {diff:.2e} (relative {diff / scale:.1e})"
        )


if __name__ == "__main__":
    main()

"""Time ``LinearGaussian.log_evidence`` against its peers, in one run, and print ratios.

Peers, all evaluating log N(x; b, WWᵀ + Ψ) for the same N points under the same model with
diagonal Ψ:

- ``toyvae``: ``LinearGaussian(W, b, ψ).log_evidence(X)`` (argument checks included);
- ``torch LowRank``: ``LowRankMultivariateNormal(b, W, ψ).log_prob(X)`` (construction included,
  as toyvae factors Ψ and I + WᵀΨ⁻¹W on every call too);
- ``scipy dense``: ``scipy.stats.multivariate_normal.logpdf`` with the dense D×D covariance;
- ``sklearn FA``: ``FactorAnalysis.score_samples`` on an estimator whose fitted attributes are
  set to the same model;
- ``X @ W``: one matrix product of the same shape, the floor any O(N·D·K) method pays.

Each peer runs ``--warmup`` times untimed; then ``--repeats`` rounds each time every peer once,
in turn, so that a change in the machine's load hits all peers alike (the O(D³) dense SciPy
peer only every fifth round). The table shows the median per peer: the machine may be shared,
and the median ignores the slow outliers that causes.
Every peer's answer is compared with toyvae's so that a fast wrong answer cannot win.
All BLAS work runs on ``--threads`` threads: ``torch.set_num_threads`` for the torch peers and
threadpoolctl for NumPy/SciPy/scikit-learn.

Usage::

    python benchmarks/bench_log_evidence.py                      # N=4096, D=1024, K=32
    python benchmarks/bench_log_evidence.py -n 1024 -d 256 -k 8 --repeats 51 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.stats
import torch
from sklearn.decomposition import FactorAnalysis
from threadpoolctl import threadpool_limits

from toyvae import LinearGaussian


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--num-points", type=int, default=4096, help="N, data points")
    parser.add_argument("-d", "--data-dim", type=int, default=1024, help="D, data dimension")
    parser.add_argument("-k", "--latent-dim", type=int, default=32, help="K, latent dimension")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per peer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per peer")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["scipy", "sklearn"], help="peers to leave out"
    )
    return parser.parse_args()


def make_problem(n: int, d: int, k: int, seed: int):
    """A float64 factor-analysis model (W, b, ψ) and N points drawn from it."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    # Noise variances spread over two orders of magnitude, so the diagonal matters.
    noise = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-2.3, 2.3, generator=gen))
    x, _ = LinearGaussian(weight, bias, noise).sample((n,), generator=gen)
    return weight, bias, noise, x


def time_peers(peers, warmup: int, repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """Median wall time and result of each peer, timed in interleaved rounds after warm-up."""
    results = {}
    for name, fn, _ in peers:
        for _ in range(warmup):
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name, _, _ in peers}
    for round_ in range(repeats):
        for name, fn, every in peers:
            if round_ % every:
                continue
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), np.asarray(results[name])) for name in times}


def peers(weight, bias, noise, x, skip):
    """(name, callable, every) triples; each callable returns the N log-densities (the floor:
    the product)."""
    w_np, b_np, noise_np, x_np = (t.numpy() for t in (weight, bias, noise, x))

    def toyvae_fn():
        return LinearGaussian(weight, bias, noise).log_evidence(x)

    def torch_lowrank_fn():
        marginal = torch.distributions.LowRankMultivariateNormal(bias, weight, noise)
        return marginal.log_prob(x)

    def scipy_fn():
        covariance = w_np @ w_np.T + np.diag(noise_np)
        return scipy.stats.multivariate_normal.logpdf(x_np, mean=b_np, cov=covariance)

    # A FactorAnalysis "fitted" to this model: components_ is (K, D) = Wᵀ.
    fa = FactorAnalysis(n_components=weight.shape[1])
    fa.components_ = w_np.T.copy()
    fa.noise_variance_ = noise_np.copy()
    fa.mean_ = b_np.copy()
    fa.n_features_in_ = weight.shape[0]

    def sklearn_fn():
        return fa.score_samples(x_np)

    def floor_fn():
        return x @ weight

    # (name, callable, timed every n-th round): one dense run already takes ~0.4 s at D = 1024.
    out = [("toyvae", toyvae_fn, 1), ("torch LowRank", torch_lowrank_fn, 1)]
    if "scipy" not in skip:
        out.append(("scipy dense", scipy_fn, 5))
    if "sklearn" not in skip:
        out.append(("sklearn FA", sklearn_fn, 1))
    out.append(("X @ W (floor)", floor_fn, 1))
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    weight, bias, noise, x = make_problem(
        args.num_points, args.data_dim, args.latent_dim, args.seed
    )
    print(
        f"N={args.num_points} D={args.data_dim} K={args.latent_dim} float64, diagonal Ψ; "
        f"threads={args.threads} (torch.get_num_threads()={torch.get_num_threads()}); "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
        f"torch {torch.__version__}"
    )
    with threadpool_limits(limits=args.threads):
        results = time_peers(peers(weight, bias, noise, x, args.skip), args.warmup, args.repeats)

    reference = results["toyvae"][1]
    scale = np.abs(reference).max()
    base = results["toyvae"][0]
    print(f"{'peer':<15}{'median ms':>11}{'peer/toyvae':>13}{'toyvae/peer':>13}  max |Δ| vs toyvae")
    for name, (seconds, value) in results.items():
        if name.startswith("X @ W") or name == "toyvae":
            agreement = "(floor, not a density)" if name.startswith("X @ W") else "-"
        else:
            diff = np.abs(value - reference).max()
            agreement = f"{diff:.2e} (relative {diff / scale:.1e})"
        print(
            f"{name:<15}{1e3 * seconds:>11.2f}{seconds / base:>13.2f}"
            f"{base / seconds:>13.2f}  {agreement}"
        )


if __name__ == "__main__":
    main()

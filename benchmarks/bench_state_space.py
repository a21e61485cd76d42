"""Time ``LinearGaussianSSM.log_evidence`` against Kalman filters, in one run, and print ratios.

Peers, all evaluating log p(x_{1:T}) for the same float64 model (K states, D observations,
diagonal R, full Q) and the same sequence drawn from it:

- ``toyvae``: ``LinearGaussianSSM(A, Q, C, R, ...).log_evidence(x)`` (construction and argument
  checks included): cyclic reduction of the block-tridiagonal posterior precision;
- ``statsmodels``: the Cython Kalman filter,
  ``statsmodels.tsa.statespace.kalman_filter.KalmanFilter(...).loglike()`` with the same
  matrices (bound once, outside the timing);
- ``pykalman``: ``pykalman.KalmanFilter(...).loglikelihood(x)``, a NumPy loop over t, on the
  first ``--pykalman-steps`` steps only (about 16 s at T = 100,000), so its ratio is per step,
  extrapolated linearly, and said so.

Each peer runs ``--warmup`` times untimed; then ``--repeats`` rounds time every peer once in turn
(pykalman only in the first round), so a change in the machine's load hits all alike; the
table shows medians. Every answer is compared with toyvae's, so a fast wrong answer cannot win.
``--threads`` pins torch's intra-op threads and BLAS (threadpoolctl).

Usage::

    python benchmarks/bench_state_space.py                     # T=100000 D=10 K=4, 1 thread
    python benchmarks/bench_state_space.py --threads 2 --repeats 21
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from toyvae.state_space import LinearGaussianSSM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--num-steps", type=int, default=100_000, help="T, time steps")
    parser.add_argument("-d", "--data-dim", type=int, default=10, help="D, observation size")
    parser.add_argument("-k", "--state-dim", type=int, default=4, help="K, state size")
    parser.add_argument("--pykalman-steps", type=int, default=2000, help="T for pykalman")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per peer")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pykalman"])
    return parser.parse_args()


def make_problem(t: int, d: int, k: int, seed: int):
    """A stable float64 model (‖A‖₂ = 0.9) and one sequence of T steps drawn from it."""
    gen = torch.Generator().manual_seed(seed)
    options = {"dtype": torch.float64, "generator": gen}
    a = torch.randn(k, k, **options)
    a = 0.9 * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(k, k, **options)
    params = {
        "transition": a,
        "transition_noise": b @ b.T / k + 0.2 * torch.eye(k, dtype=torch.float64),
        "emission": torch.randn(d, k, **options),
        "emission_noise": torch.rand(d, **options) + 0.3,
        "emission_bias": torch.randn(d, **options),
        "initial_mean": torch.randn(k, **options),
        "initial_covariance": 2 * torch.eye(k, dtype=torch.float64),
    }
    model = LinearGaussianSSM(
        params["transition"],
        params["transition_noise"],
        params["emission"],
        params["emission_noise"],
        emission_bias=params["emission_bias"],
        initial_mean=params["initial_mean"],
        initial_covariance=params["initial_covariance"],
    )
    x, _ = model.sample(num_steps=t, generator=gen)
    return params, x


def peers(params, x, pykalman_steps: int, skip):
    """(name, callable, steps, first round only) for each peer; callables return log p(x)."""
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    p = {name: value.numpy() for name, value in params.items()}
    d, k = p["emission"].shape
    x_np = x.numpy().copy()

    def toyvae_fn():
        model = LinearGaussianSSM(
            params["transition"],
            params["transition_noise"],
            params["emission"],
            params["emission_noise"],
            emission_bias=params["emission_bias"],
            initial_mean=params["initial_mean"],
            initial_covariance=params["initial_covariance"],
        )
        return model.log_evidence(x).item()

    kf = KalmanFilter(k_endog=d, k_states=k, k_posdef=k)
    kf.bind(x_np)
    kf["design"] = p["emission"]
    kf["obs_intercept"] = p["emission_bias"][:, None]
    kf["obs_cov"] = np.diag(p["emission_noise"])
    kf["transition"] = p["transition"]
    kf["selection"] = np.eye(k)
    kf["state_cov"] = p["transition_noise"]
    kf.initialize_known(p["initial_mean"], p["initial_covariance"])

    out = [("toyvae", toyvae_fn, len(x_np), False), ("statsmodels", kf.loglike, len(x_np), False)]
    if "pykalman" not in skip:
        import pykalman

        filt = pykalman.KalmanFilter(
            transition_matrices=p["transition"],
            observation_matrices=p["emission"],
            transition_covariance=p["transition_noise"],
            observation_covariance=np.diag(p["emission_noise"]),
            transition_offsets=np.zeros(k),
            observation_offsets=p["emission_bias"],
            initial_state_mean=p["initial_mean"],
            initial_state_covariance=p["initial_covariance"],
        )
        head = x_np[:pykalman_steps]
        out.append(("pykalman", lambda: filt.loglikelihood(head), len(head), True))
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params, x = make_problem(args.num_steps, args.data_dim, args.state_dim, args.seed)
    print(
        f"T={args.num_steps} D={args.data_dim} K={args.state_dim} float64, diagonal R, full Q; "
        f"threads={args.threads}; median of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up; torch {torch.__version__}"
    )
    with threadpool_limits(limits=args.threads):
        table = peers(params, x, args.pykalman_steps, args.skip)
        results, times = {}, {name: [] for name, *_ in table}
        for name, fn, _, once in table:
            for _ in range(1 if once else args.warmup):
                results[name] = fn()
        for round_ in range(args.repeats):
            for name, fn, _, once in table:
                if once and round_:
                    continue
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)

    steps = {name: n for name, _, n, _ in table}
    reference = results["toyvae"]
    base = statistics.median(times["toyvae"]) / steps["toyvae"]
    # pykalman ran on fewer steps: compare with toyvae's own value on those steps.
    head = LinearGaussianSSM(
        params["transition"],
        params["transition_noise"],
        params["emission"],
        params["emission_noise"],
        emission_bias=params["emission_bias"],
        initial_mean=params["initial_mean"],
        initial_covariance=params["initial_covariance"],
    ).log_evidence(x[: args.pykalman_steps])
    print(f"{'peer':<13}{'T':>8}{'median ms':>11}{'µs/step':>9}{'peer/toyvae':>13}  rel. diff")
    for name, _, n, _ in table:
        seconds = statistics.median(times[name])
        per_step = seconds / n
        expected = reference if n == steps["toyvae"] else head.item()
        diff = "-" if name == "toyvae" else f"{abs(results[name] - expected) / abs(expected):.1e}"
        print(
            f"{name:<13}{n:>8}{1e3 * seconds:>11.2f}{1e6 * per_step:>9.3f}"
            f"{per_step / base:>13.2f}  {diff}"
        )


if __name__ == "__main__":
    main()

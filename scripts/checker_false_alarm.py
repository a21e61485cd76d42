"""How often the ELBO checker fails a correct estimator: its false-alarm rate, measured.

The checker (``toyvae.testing.check_elbo``) states a false-alarm probability, 1e-6 by default.
This script runs it on a correct reparameterised ELBO estimator (the one in the plugin's example,
``tests/test_plugin.py``: the plugin's seeded model and data, a per-row mean-field q with
``loc = 0`` and ``log_scale = −0.3``) under many seeds and counts the failures, separately for
the value and the gradient. Each check is independent of the others (its own seed).

    .venv/bin/python scripts/checker_false_alarm.py --draws 50 --seeds 2000
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from scipy import stats
from torch.distributions import Independent, Normal, kl_divergence

from toyvae import LinearGaussian
from toyvae.testing import check_elbo


def plugin_model_and_data() -> tuple[LinearGaussian, torch.Tensor]:
    """The plugin's ``toyvae_model`` and ``toyvae_data`` fixtures, rebuilt."""
    generator = torch.Generator().manual_seed(0)
    options = {"dtype": torch.float64, "generator": generator}
    weight = torch.randn(6, 3, **options)
    bias = torch.randn(6, **options)
    model = LinearGaussian(weight, bias, 0.2 + torch.rand(6, **options))
    x, _ = model.sample((32,), generator=torch.Generator().manual_seed(1))
    return model, x


def one_check(model, x, draws: int, seed: int, false_alarm: float = 1e-6, analytic_kl=False):
    loc = torch.nn.Parameter(torch.zeros(32, 3, dtype=x.dtype))
    log_scale = torch.nn.Parameter(torch.full_like(loc, -0.3))

    def q(x):
        return Independent(Normal(loc, log_scale.exp()), 1)

    def estimate(x):
        qz = q(x)
        z = qz.rsample()
        if analytic_kl:  # a sampled reconstruction term minus the closed-form KL
            prior = Independent(Normal(torch.zeros_like(loc), torch.ones_like(loc)), 1)
            return (model.likelihood(z).log_prob(x) - kl_divergence(qz, prior)).sum()
        return (model.log_joint(x, z) - qz.log_prob(z)).sum()

    return check_elbo(estimate, model, q, x, num_draws=draws, seed=seed, false_alarm=false_alarm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="num_draws per check")
    parser.add_argument("--seeds", type=int, default=2000, help="checks to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--false-alarm", type=float, default=1e-6, help="the stated probability")
    parser.add_argument(
        "--analytic-kl", action="store_true", help="check the analytic-KL estimator instead"
    )
    args = parser.parse_args()
    model, x = plugin_model_and_data()
    failures = {"value": 0, "gradient": 0}
    start = time.time()
    for seed in range(args.start, args.start + args.seeds):
        check = one_check(model, x, args.draws, seed, args.false_alarm, args.analytic_kl)
        lines = str(check).splitlines()
        failures["value"] += "value: consistent" not in str(check)
        failures["gradient"] += any(line.strip().startswith("gradient: WRONG") for line in lines)
        done = seed - args.start + 1
        if done % 100 == 0:
            print(f"{done} of {args.seeds} checks, {failures}", file=sys.stderr, flush=True)
    n = args.seeds
    start_option = f" --start {args.start}" if args.start else ""
    if args.false_alarm != 1e-6:
        start_option += f" --false-alarm {args.false_alarm:g}"
    if args.analytic_kl:
        start_option += " --analytic-kl"
    which = "the analytic-KL estimator" if args.analytic_kl else "the log-weight estimator"
    print(
        f"Measured with `scripts/checker_false_alarm.py --draws {args.draws} --seeds {n}"
        f"{start_option}` "
        f"({time.time() - start:.0f} s): {which}, correct, {args.draws} draws per check, "
        f"stated false-alarm probability {args.false_alarm:g}.\n"
    )
    print("| part | failures | checks | rate | 95% interval |")
    print("|---|---:|---:|---:|---|")
    for part, count in failures.items():
        low, high = stats.binomtest(count, n).proportion_ci(0.95)
        print(f"| {part} | {count} | {n} | {count / n:.2%} | {low:.2%} – {high:.2%} |")


if __name__ == "__main__":
    main()

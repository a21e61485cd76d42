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
import time

import torch
from scipy import stats
from torch.distributions import Independent, Normal

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


def one_check(model, x, draws: int, seed: int):
    loc = torch.nn.Parameter(torch.zeros(32, 3, dtype=x.dtype))
    log_scale = torch.nn.Parameter(torch.full_like(loc, -0.3))

    def q(x):
        return Independent(Normal(loc, log_scale.exp()), 1)

    def estimate(x):
        qz = q(x)
        z = qz.rsample()
        return (model.log_joint(x, z) - qz.log_prob(z)).sum()

    return check_elbo(estimate, model, q, x, num_draws=draws, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="num_draws per check")
    parser.add_argument("--seeds", type=int, default=2000, help="checks to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    args = parser.parse_args()
    model, x = plugin_model_and_data()
    failures = {"value": 0, "gradient": 0}
    start = time.time()
    for seed in range(args.start, args.start + args.seeds):
        check = one_check(model, x, args.draws, seed)
        lines = str(check).splitlines()
        failures["value"] += "value: consistent" not in str(check)
        failures["gradient"] += any(line.strip().startswith("gradient: WRONG") for line in lines)
    n = args.seeds
    start_option = f" --start {args.start}" if args.start else ""
    print(
        f"Measured with `scripts/checker_false_alarm.py --draws {args.draws} --seeds {n}"
        f"{start_option}` "
        f"({time.time() - start:.0f} s): a correct estimator, {args.draws} draws per check, "
        f"stated false-alarm probability 1e-6.\n"
    )
    print("| part | failures | checks | rate | 95% interval |")
    print("|---|---:|---:|---:|---|")
    for part, count in failures.items():
        low, high = stats.binomtest(count, n).proportion_ci(0.95)
        print(f"| {part} | {count} | {n} | {count / n:.2%} | {low:.2%} – {high:.2%} |")


if __name__ == "__main__":
    main()

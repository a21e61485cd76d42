r"""float32 accuracy: toyvae and torch in single precision, on the accuracy grid's models.

python scripts/float32_accuracy.py [OUT_DIR]  →  float32.md (a Markdown table)

Each case of scripts/accuracy_grid.py is rounded to float32 (weights, bias, noise variances, x,
and a q near the posterior: its mean moved by 0.01 posterior standard deviations, its scale
1.01 times the posterior's). The reference is toyvae in float64 on exactly those rounded
numbers, which is within a few float64 floors of the 60-digit oracle on every case (the grid),
so the differences below are the float32 arithmetic's own. Each entry is the relative error in
units of float32's eps (1.19e-7), |value₃₂ − value₆₄| / (eps₃₂ · |value₆₄|) (for the posterior
mean, the largest entry error over the largest entry); "fails" means it raised or returned a
non-finite number. torch's ``MultivariateNormal`` and ``LowRankMultivariateNormal`` give log p(x)
in float32 on the same numbers. Included by docs/how-we-know.md; the site build runs it, and
tests/test_float32.py runs :func:`measure` on every case.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_grid import CASES, _inputs

from toyvae import LinearGaussian, elbo, kl_to_posterior

EPS32 = torch.finfo(torch.float32).eps
COLUMNS = (
    "log p(x)",
    "posterior mean",
    "ELBO(q)",
    "KL(q ‖ posterior)",
    "torch MVN",
    "torch LowRank",
)


def _rounded(case, seed: int) -> dict[str, torch.Tensor]:
    """The case's inputs and a q near its posterior, rounded to float32 (as float32 tensors)."""
    weight, bias, noise, x = (torch.from_numpy(a) for a in _inputs(case, seed))
    post = LinearGaussian(weight, bias, noise).posterior(x)
    q_tril = 1.01 * post.scale_tril
    q_loc = post.loc + 0.01 * post.scale_tril @ torch.ones(case.k, dtype=torch.float64)
    values = {"weight": weight, "bias": bias, "noise": noise, "x": x}
    values.update(q_loc=q_loc, q_tril=q_tril)
    return {name: value.to(torch.float32) for name, value in values.items()}


def _quantities(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every column's value in the dtype of ``v`` (toyvae, then torch's float32 peers)."""
    model = LinearGaussian(v["weight"], v["bias"], v["noise"])
    q = torch.distributions.MultivariateNormal(v["q_loc"], scale_tril=v["q_tril"])
    cov = v["weight"] @ v["weight"].T + torch.diag(v["noise"])
    return {
        "log p(x)": lambda: model.log_evidence(v["x"]),
        "posterior mean": lambda: model.posterior(v["x"]).loc,
        "ELBO(q)": lambda: elbo(model, v["x"], q),
        "KL(q ‖ posterior)": lambda: kl_to_posterior(model, v["x"], q),
        "torch MVN": lambda: torch.distributions.MultivariateNormal(v["bias"], cov).log_prob(
            v["x"]
        ),
        "torch LowRank": lambda: torch.distributions.LowRankMultivariateNormal(
            v["bias"], v["weight"], v["noise"]
        ).log_prob(v["x"]),
    }


def _evaluate(run) -> torch.Tensor | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = run()
    except (RuntimeError, ValueError):
        return None
    return value if bool(torch.isfinite(value).all()) else None


def measure(case, seed: int = 0) -> dict[str, float | None]:
    """Each column's error in units of eps₃₂ (``None``: the method failed)."""
    single = _rounded(case, seed)
    double = {name: value.to(torch.float64) for name, value in single.items()}
    reference = _quantities(double)
    errors = {}
    for name, run in _quantities(single).items():
        exact_name = "log p(x)" if name.startswith("torch") else name
        exact = reference[exact_name]().detach()
        got = _evaluate(run)
        if got is None:
            errors[name] = None
            continue
        scale = exact.abs().max().item()
        errors[name] = (got.detach().double() - exact).abs().max().item() / (EPS32 * scale)
    return errors


def table() -> str:
    """The Markdown table, cases numbered and drawn as in the accuracy grid (seed = number − 1)."""
    lines = [
        "| # | case | " + " | ".join(COLUMNS) + " |",
        "|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for number, case in enumerate(CASES, start=1):
        errors = measure(case, seed=number - 1)
        cells = ["fails" if errors[c] is None else f"{errors[c]:.2g}" for c in COLUMNS]
        lines.append(f"| {number} | {case.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "float32.md").write_text(table())
    print(f"wrote {out_dir / 'float32.md'}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "docs" / "figures"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)

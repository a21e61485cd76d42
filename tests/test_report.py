"""`toyvae report`: the table, the files of --out, --model files, exit statuses, one-line errors."""

import functools
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

import toyvae
import toyvae.report._classic as classic_rows
import toyvae.report._identities as identity_rows
import toyvae.report._monte_carlo as monte_carlo_rows
import toyvae.report._problems as problems
import toyvae.report.checks as checks
import toyvae.report.cli as cli
from toyvae import LinearGaussian
from toyvae.aggregate import aggregate_posterior, elbo_surgery, joint_kl
from toyvae.estimators import log_weight_cumulants
from toyvae.learning import (
    CounterexampleObjectives,
    counterexample_objectives,
    ppca_maximum_likelihood,
)
from toyvae.report.models import builtin_models
from toyvae.report.rows import solve_tolerance

# The properties the issue asks the report to show, by the names the table gives them.
PROPERTIES = [
    "log p(x) = ELBO + KL",
    "tight at the posterior",
    "KL ≥ 0",
    "Bayes' rule",
    "reference agreement",
    "log weights: O(K²) path = plain",
    "ELBO estimator unbiased",
    "exact variance of log w",
    "IWAE monotone in k",
    "IWAE: E exp(IWAE_k) = p(x)",
    "gradient estimators unbiased",
    "aggregate posterior (= prior if matched)",
    "ELBO surgery",
    "joint KL = −E ELBO − H[q(x)]",
    "Fisher: ∇θ ELBO = ∇θ log p(x)",
]

# The classic questions on fixed problems, in their own section of the table.
PROBLEM_PROPERTIES = [
    "counterexample: optima = closed forms",
    "counterexample: ELBO ascent lowers log p",
    "PPCA: ML is stationary (∇ log p = 0)",
    "PPCA: exact ELBO attains log p at ML",
]

# Small samples keep each run to a few seconds; every random row still has false-alarm
# probability ≤ 1e-6, since the median-of-means radius is computed for the sample size used.
TINY = checks.Budget(
    points=3,
    draws=2_000,
    iwae_draws=300,
    iwae_ks=(1, 2, 4),
    gradient_draws=300,
    gradient_points=1,
    max_quadrature_dim=3,
    max_reference_dim=50,
)


@pytest.fixture
def tiny(monkeypatch):
    """--quick with the tiny budget, on the PPCA built-in model only."""
    monkeypatch.setattr(checks, "QUICK", TINY)
    monkeypatch.setattr(cli, "builtin_models", lambda quick: builtin_models(quick=quick)[:1])


def one_line_error(capsys, argv):
    """Run main(argv); return its stderr after asserting exit 2 and a single line, no traceback."""
    status = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_quick_run_passes_and_writes_every_output(tiny, tmp_path, capsys):
    """A passing run exits 0, names every property, and --out writes Markdown, JSON and PNGs."""
    out = tmp_path / "out"
    assert cli.main(["report", "--quick", "--seed", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for prop in PROPERTIES + PROBLEM_PROPERTIES:
        assert prop in stdout
    assert "ppca" in stdout and "All " in stdout
    # The fixed problems come after every model, under their own heading.
    assert stdout.index("Classic questions on fixed problems") > stdout.index(PROPERTIES[-1])

    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert document["passed"] is True and document["failures"] == []
    assert document["settings"]["seed"] == 3
    (model,) = document["models"]
    assert [row["property"] for row in model["rows"]] == PROPERTIES
    assert {row["result"] for row in model["rows"]} <= {"pass", "skip"}
    (problems,) = document["problems"]
    assert [row["property"] for row in problems["rows"]] == PROBLEM_PROPERTIES
    assert {row["result"] for row in problems["rows"]} == {"pass"}

    report = (out / "report.md").read_text(encoding="utf-8")
    for prop in PROPERTIES + PROBLEM_PROPERTIES:
        assert f"| {prop} |" in report
    for name in ("interpolation.png", "iwae.png", "variances.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_a_broken_property_exits_1_and_is_named(tiny, monkeypatch, capsys):
    """An ELBO off by 1e-3 breaks log p(x) = ELBO + KL: exit status 1, the failing row named."""
    exact = identity_rows.elbo
    monkeypatch.setattr(identity_rows, "elbo", lambda model, x, q: exact(model, x, q) + 1e-3)
    monkeypatch.setattr(checks, "CHECKS", (checks.check_identity, checks.check_bayes_rule))
    monkeypatch.setattr(checks, "PROBLEMS", ())
    assert cli.main(["report", "--quick"]) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("FAILED: 1 of 2 checks")
    assert "ppca: log p(x) = ELBO + KL" in summary and "Bayes" not in summary


def _without_encoder_covariance(encoder, data):
    """The aggregate covariance VCVᵀ, forgetting the encoder's own S."""
    agg = AGGREGATE(encoder, data)
    cov = agg.covariance_matrix - encoder.scale_tril @ encoder.scale_tril.mT
    return MultivariateNormal(agg.loc, covariance_matrix=cov)


def _unbiased_ppca(x, latent_dim):
    """PPCA with σ² from the N − 1 covariance (scikit-learn's convention), not the ML one."""
    model = PPCA(x, latent_dim)
    n = x.shape[0]
    return LinearGaussian(model.weight, model.bias, model.noise_variance * n / (n - 1))


AGGREGATE, SURGERY, JOINT_KL, ELBO, PPCA = (
    aggregate_posterior,
    elbo_surgery,
    joint_kl,
    toyvae.elbo,
    ppca_maximum_likelihood,
)

# Realistic mistakes, one per classic row: (the row, the module of the row and the name it
# uses there, its broken stand-in).
BROKEN = {
    "aggregate covariance without S": (
        "ppca: aggregate posterior (= prior if matched)",
        (classic_rows, "aggregate_posterior"),
        _without_encoder_covariance,
    ),
    "mutual information doubled": (
        "ppca: ELBO surgery",
        (classic_rows, "elbo_surgery"),
        lambda e, d: SURGERY(e, d)._replace(mutual_information=2 * SURGERY(e, d)[1]),
    ),
    "joint KL without the entropy": (
        "ppca: joint KL = −E ELBO − H[q(x)]",
        (classic_rows, "joint_kl"),
        lambda m, e, d: JOINT_KL(m, e, d) + toyvae.entropy(d),
    ),
    "ELBO with a stray weight decay": (
        "ppca: Fisher: ∇θ ELBO = ∇θ log p(x)",
        (classic_rows, "elbo"),
        lambda m, x, q: ELBO(m, x, q) - 1e-6 * m.weight.square().sum(),
    ),
    "mean-field ELBO taken at the exact posterior": (
        "fixed-problems: counterexample: ELBO ascent lowers log p",
        (problems, "counterexample_objectives"),
        lambda w, s: CounterexampleObjectives(*[counterexample_objectives(w, s)[0]] * 2),
    ),
    "PPCA noise from the N − 1 covariance": (
        "fixed-problems: PPCA: ML is stationary (∇ log p = 0)",
        (problems, "ppca_maximum_likelihood"),
        _unbiased_ppca,
    ),
}
ROWS = {
    "ppca: aggregate posterior (= prior if matched)": ("CHECKS", checks.check_aggregate_prior),
    "ppca: ELBO surgery": ("CHECKS", checks.check_elbo_surgery),
    "ppca: joint KL = −E ELBO − H[q(x)]": ("CHECKS", checks.check_joint_kl),
    "ppca: Fisher: ∇θ ELBO = ∇θ log p(x)": ("CHECKS", checks.check_fisher),
    "fixed-problems: counterexample: ELBO ascent lowers log p": (
        "PROBLEMS",
        checks.problem_counterexample_ascent,
    ),
    "fixed-problems: PPCA: ML is stationary (∇ log p = 0)": (
        "PROBLEMS",
        checks.problem_ppca_stationary,
    ),
}


@pytest.mark.parametrize("mistake", BROKEN, ids=list(BROKEN))
def test_a_broken_classic_property_fails_its_row(mistake, tiny, monkeypatch, capsys):
    """Each classic row catches a realistic mistake in what it checks: exit 1, the row named."""
    row, (module, name), broken = BROKEN[mistake]
    monkeypatch.setattr(module, name, broken)
    # Only the row under test runs, so the summary can name exactly one failure.
    group, check = ROWS[row]
    monkeypatch.setattr(checks, "CHECKS", (check,) if group == "CHECKS" else ())
    monkeypatch.setattr(checks, "PROBLEMS", (check,) if group == "PROBLEMS" else ())
    assert cli.main(["report", "--quick"]) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == f"FAILED: 1 of 1 checks: {row}"


def test_model_file_with_data(tiny, tmp_path, capsys):
    """--model runs the battery on a user's .npz, using the x it holds."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    weight = rng.normal(size=(5, 2))
    x = rng.normal(size=(4, 5))
    np.savez(path, weight=weight, bias=np.zeros(5), noise_variance=np.full(5, 0.7), x=x)
    assert cli.main(["report", "--quick", "--model", str(path)]) == 0
    stdout = capsys.readouterr().out
    assert "mine: from mine.npz: D=5, K=2, diagonal Ψ, 4 data points from the file" in stdout


def test_model_file_without_data_samples_it(tiny, tmp_path, capsys):
    """Without x, the data are sampled from the user's model (full Ψ here)."""
    path = tmp_path / "full.npz"
    np.savez(path, weight=np.ones((3, 1)), bias=np.ones(3), noise_variance=np.eye(3) * 2.0)
    assert cli.main(["report", "--quick", "--model", str(path)]) == 0
    assert "full Ψ, sampled data" in capsys.readouterr().out


BAD_FILES = {
    "missing key": (
        {"weight": np.ones((3, 1)), "noise_variance": 1.0},
        "missing key bias",
    ),
    "wrong bias shape": (
        {"weight": np.ones((3, 1)), "bias": np.ones(4), "noise_variance": 1.0},
        "bias must have shape (3,)",
    ),
    "negative variance": (
        {"weight": np.ones((3, 1)), "bias": np.ones(3), "noise_variance": np.array([1, -1, 1.0])},
        "noise_variance must be strictly positive",
    ),
    "x of the wrong width": (
        {
            "weight": np.ones((3, 1)),
            "bias": np.ones(3),
            "noise_variance": 1.0,
            "x": np.ones((2, 4)),
        },
        "x must have last dimension 3",
    ),
    "unknown key": (
        {"weight": np.ones((3, 1)), "bias": np.ones(3), "noise_variance": 1.0, "W": np.ones(1)},
        "unexpected key W",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_model_files_give_one_line_errors(case, tmp_path, capsys):
    """A bad .npz gives exit status 2 and one line naming the file and the problem."""
    arrays, message = BAD_FILES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    err = one_line_error(capsys, ["report", "--model", str(path)])
    assert str(path) in err and message in err


def test_unreadable_model_files_give_one_line_errors(tmp_path, capsys):
    """A missing file and a file that is not an .npz each give one line and exit status 2."""
    assert "no such file" in one_line_error(capsys, ["report", "--model", str(tmp_path / "no")])
    text = tmp_path / "model.npz"
    text.write_text("not a zip archive")
    assert "not a readable .npz file" in one_line_error(capsys, ["report", "--model", str(text)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--seed", "-1"], "--seed: expected an integer in [0, 2**63)"),
        (["report", "--seed", "abc"], "--seed: expected a non-negative integer"),
        (["report", "--bogus"], "unrecognized arguments: --bogus"),
        (["reprot"], "invalid choice: 'reprot'"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    """Bad arguments give exit status 2 and one line naming the argument."""
    assert message in one_line_error(capsys, argv)


def test_out_that_is_a_file_gives_a_one_line_error(tiny, tmp_path, capsys):
    """--out pointing at an existing file is reported before any work is done."""
    path = tmp_path / "taken"
    path.write_text("")
    assert "--out" in one_line_error(capsys, ["report", "--quick", "--out", str(path)])


def test_python_dash_m_toyvae_is_the_same_command(monkeypatch, capsys):
    """`python -m toyvae` runs main(): without a subcommand it prints help and exits 2."""
    monkeypatch.setattr(sys, "argv", ["toyvae"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("toyvae", run_name="__main__")
    assert exit_info.value.code == 2
    assert "report" in capsys.readouterr().out


class _Spy:
    """Wraps a function the Monte Carlo rows use, recording (arguments, result) of every call."""

    def __init__(self, monkeypatch, name):
        self.calls, self.function = [], getattr(monte_carlo_rows, name)
        monkeypatch.setattr(monte_carlo_rows, name, self)

    def __call__(self, *args, **kwargs):
        result = self.function(*args, **kwargs)
        self.calls.append((args, result))
        return result


def _statistical_rows(monkeypatch):
    """Run the three Monte Carlo rows on a small model; return their tolerance vectors and the
    recorded draws of each row (the arguments hold the q, k and sample size it used)."""
    tolerances = {}
    worst = monte_carlo_rows.worst

    def capture(prop, errors, tols, reason):
        tolerances[prop] = torch.as_tensor(np.asarray(tols)).double().reshape(-1)
        return worst(prop, errors, tols, reason)

    monkeypatch.setattr(monte_carlo_rows, "worst", capture)
    iwae, plain = _Spy(monkeypatch, "iwae_estimates"), _Spy(monkeypatch, "log_weights")
    rng = np.random.default_rng(5)
    model = LinearGaussian(rng.normal(size=(6, 2)), rng.normal(size=6), rng.uniform(0.5, 2, 6))
    x = model.sample((3,), generator=torch.Generator().manual_seed(6))[0]
    calls = {}
    for seed, row, spy in [
        (7, checks.check_elbo_estimator, iwae),
        (8, checks.check_log_weight_variance, plain),
        (9, checks.check_iwae_evidence, iwae),
    ]:
        assert row(model, x, torch.Generator().manual_seed(seed), budget=TINY).passed
        calls[row.__name__], spy.calls = spy.calls, []
    return model, x, tolerances, calls


def _radius(n, variance, false_alarm):
    """The median-of-means radius for n draws of exact variance ``variance``."""
    _, factor = toyvae.stats.median_of_means_plan(n, false_alarm)
    return factor * variance.sqrt()


def test_statistical_rows_hold_draws_to_the_median_of_means_radius_of_the_exact_variance(
    monkeypatch,
):
    """Each Monte Carlo row's tolerances are the median-of-means radii of the exact variances,
    at the row's false-alarm probability 1e-6 split evenly over its (q, point, k) assertions."""
    model, x, tolerances, calls = _statistical_rows(monkeypatch)
    n_points = x.shape[0]

    def assert_close(prop, want):
        # The radius and the rounding allowance are recomputed with the same few products and
        # sums as the row forms them, possibly in another order: 8 ulps of the total.
        got = tolerances[prop]
        assert got.shape == want.shape
        assert torch.all((got - want).abs() <= 8 * toyvae.tolerances.EPS * want)

    # ELBO estimator: n draws of log w (k = 1), variance Var log w; 3 q's × N points.
    want = []
    for (_, _, q, k, n), _ in calls["check_elbo_estimator"]:
        variance = toyvae.log_weight_moments(model, x, q).variance
        assert k == 1
        want.append(_radius(n, variance, 1e-6 / (3 * n_points)) + solve_tolerance(model, x, q))
    assert len(want) == 3
    assert_close("ELBO estimator unbiased", torch.cat(want))

    # Variance of log w: squared deviations (log w − ELBO)², variance κ₄ + 2κ₂² (the cumulant
    # formula, checked against quadrature above); 3 q's × N points.
    want = []
    for (_, _, q, n), _ in calls["check_log_weight_variance"]:
        kappa2, kappa4 = log_weight_cumulants(model, x, q)
        radius = _radius(n, kappa4 + 2 * kappa2.square(), 1e-6 / (3 * n_points))
        want.append(radius + 2 * solve_tolerance(model, x, q) * (10 * kappa2.sqrt() + 1))
    assert len(want) == 3
    assert_close("exact variance of log w", torch.cat(want))

    # IWAE evidence: R = exp(IWAE_k − log p(x)), Var R = χ²(p(z|x) ‖ q)/k; the k's × N points.
    want, ks = [], []
    for (_, _, q, k, n), draws in calls["check_iwae_evidence"]:
        chi2 = toyvae.chi_square_divergence(model, x, q)
        ratio = (draws - model.log_evidence(x)).exp()
        rounding = 2 * solve_tolerance(model, x, q) * ratio.amax(0)
        want.append(_radius(n, chi2 / k, 1e-6 / (len(TINY.iwae_ks) * n_points)) + rounding)
        ks.append(k)
    assert ks == list(TINY.iwae_ks)
    assert_close("IWAE: E exp(IWAE_k) = p(x)", torch.cat(want))


def test_every_check_has_its_own_stream_key_equal_to_its_original_name():
    """The streams are pinned: each built-in check's key is the name that seeded it before keys
    existed, so the report's draws (and numbers) did not change when keys were introduced."""
    keys = [check.stream for check in checks.CHECKS]
    assert keys == [check.__name__ for check in checks.CHECKS]
    assert len(set(keys)) == len(keys)


def test_renaming_or_wrapping_a_check_keeps_its_random_stream(monkeypatch):
    """A check renamed (wrapped under another name) draws the same numbers: the generator is
    seeded from its stream key, not from its Python name; another key gives other draws."""
    case = builtin_models()[0]
    original = checks.check_elbo_estimator

    @functools.wraps(original)
    def renamed(*args, **kwargs):
        return original(*args, **kwargs)

    renamed.__name__ = renamed.__qualname__ = "check_that_the_single_sample_estimator_is_unbiased"

    @checks.stream("another_key")
    def other(*args, **kwargs):
        return original(*args, **kwargs)

    monkeypatch.setattr(checks, "PROBLEMS", ())
    rows = {}
    for label, check in [("original", original), ("renamed", renamed), ("other", other)]:
        monkeypatch.setattr(checks, "CHECKS", (check,))
        (result,), _ = cli.run_battery([case], TINY, seed=5, progress=False)
        rows[label] = result.rows[0]
    assert renamed.stream == "check_elbo_estimator"
    assert rows["renamed"] == rows["original"]
    assert rows["other"].error != rows["original"].error


def test_a_check_without_a_stream_key_is_refused(monkeypatch):
    """A check that is not marked with @stream fails loudly rather than picking a stream."""
    monkeypatch.setattr(checks, "CHECKS", (lambda model, x, generator, *, budget: None,))
    monkeypatch.setattr(checks, "PROBLEMS", ())
    with pytest.raises(TypeError, match="no stream key"):
        cli.run_battery(builtin_models()[:1], TINY, seed=0, progress=False)


_BACKEND_PROBE = """
import matplotlib
default = matplotlib.get_backend()
matplotlib.use("svg")  # a backend the user chose, that the old module-level use("Agg") replaced
import toyvae.report.plots
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
matplotlib.use(default)
import toyvae.report.cli
assert matplotlib.get_backend() == default, (matplotlib.get_backend(), default)
"""


def test_importing_the_report_leaves_matplotlibs_backend_alone():
    """`import toyvae.report.plots` (and the CLI module) keeps whatever backend was in use; only
    the command chooses Agg, when it writes plots. In a fresh interpreter, MPLBACKEND unset."""
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", _BACKEND_PROBE], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_command_chooses_agg_when_it_writes_plots(tiny, tmp_path, monkeypatch):
    """With --out, the command (which owns the process) switches matplotlib to Agg first."""
    import matplotlib

    monkeypatch.setattr(checks, "CHECKS", (checks.check_identity,))
    monkeypatch.setattr(checks, "PROBLEMS", ())
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert cli.main(["report", "--quick", "--out", str(tmp_path)]) == 0
        assert matplotlib.get_backend().lower() == "agg"
    finally:
        matplotlib.use(previous)

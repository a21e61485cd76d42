"""`toyvae report`: the table, the files of --out, --model files, exit statuses, one-line errors."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
import toyvae.report._classic as classic_rows
import toyvae.report._gradients as gradient_rows
import toyvae.report._identities as identity_rows
import toyvae.report._monte_carlo as monte_carlo_rows
import toyvae.report._problems as problems
import toyvae.report.checks as checks
import toyvae.report.cli as cli
import toyvae.report.models as report_models
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
    monkeypatch.setattr(
        report_models, "builtin_models", lambda quick: builtin_models(quick=quick)[:1]
    )


def _seed(n: int = 0) -> list[str]:
    """``--seed`` with the test seed ``n`` (tests/seeds.py): the battery moves with the offset."""
    return ["--seed", str(seeds.seed(n))]


def one_line_error(capsys, argv):
    """Run main(argv); return its stderr after asserting exit 2 and a single line, no traceback."""
    status = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# false alarm: 4 Monte Carlo rows (ELBO estimator, variance of log w, IWAE, gradients) at 1e-6
@pytest.mark.false_alarm(4e-6)
def test_quick_run_passes_and_writes_every_output(tiny, tmp_path, capsys):
    """A passing run exits 0, names every property, and --out writes Markdown, JSON and PNGs."""
    out = tmp_path / "out"
    assert cli.main(["report", "--quick", "--seed", str(seeds.seed(3)), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for prop in PROPERTIES + PROBLEM_PROPERTIES:
        assert prop in stdout
    assert "ppca" in stdout and "All " in stdout
    # The fixed problems come after every model, under their own heading.
    assert stdout.index("Classic questions on fixed problems") > stdout.index(PROPERTIES[-1])

    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert document["passed"] is True and document["failures"] == []
    assert document["settings"]["seed"] == seeds.seed(3)
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
    assert cli.main(["report", "--quick", *_seed()]) == 1
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


# ASCII ids: pytest escapes "−" in a node id and then cannot select the test by it (mutmut does).
@pytest.mark.parametrize("mistake", BROKEN, ids=[k.replace("−", "-") for k in BROKEN])
def test_a_broken_classic_property_fails_its_row(mistake, tiny, monkeypatch, capsys):
    """Each classic row catches a realistic mistake in what it checks: exit 1, the row named."""
    row, (module, name), broken = BROKEN[mistake]
    monkeypatch.setattr(module, name, broken)
    # Only the row under test runs, so the summary can name exactly one failure.
    group, check = ROWS[row]
    monkeypatch.setattr(checks, "CHECKS", (check,) if group == "CHECKS" else ())
    monkeypatch.setattr(checks, "PROBLEMS", (check,) if group == "PROBLEMS" else ())
    assert cli.main(["report", "--quick", *_seed()]) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == f"FAILED: 1 of 1 checks: {row}"


@pytest.mark.false_alarm(4e-6)  # the 4 Monte Carlo rows at 1e-6 each
def test_model_file_with_data(tiny, tmp_path, capsys):
    """--model runs the battery on a user's .npz, using the x it holds."""
    rng = seeds.rng(0)
    path = tmp_path / "mine.npz"
    weight = rng.normal(size=(5, 2))
    x = rng.normal(size=(4, 5))
    np.savez(path, weight=weight, bias=np.zeros(5), noise_variance=np.full(5, 0.7), x=x)
    assert cli.main(["report", "--quick", *_seed(), "--model", str(path)]) == 0
    stdout = capsys.readouterr().out
    assert "mine: from mine.npz: D=5, K=2, diagonal Ψ, 4 data points from the file" in stdout


@pytest.mark.false_alarm(4e-6)  # the 4 Monte Carlo rows at 1e-6 each
def test_model_file_without_data_samples_it(tiny, tmp_path, capsys):
    """Without x, the data are sampled from the user's model (full Ψ here)."""
    path = tmp_path / "full.npz"
    np.savez(path, weight=np.ones((3, 1)), bias=np.ones(3), noise_variance=np.eye(3) * 2.0)
    assert cli.main(["report", "--quick", *_seed(), "--model", str(path)]) == 0
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
    assert "not an .npz archive" in one_line_error(capsys, ["report", "--model", str(text)])


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


def test_python_dash_m_toyvae_is_the_same_command():
    """`python -m toyvae`, as a user runs it, is main(): without a subcommand, help and exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "toyvae"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "report" in done.stdout


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
    rng = seeds.rng(5)
    model = LinearGaussian(rng.normal(size=(6, 2)), rng.normal(size=6), rng.uniform(0.5, 2, 6))
    x = model.sample((3,), generator=seeds.generator(6))[0]
    calls = {}
    for seed, row, spy in [
        (7, checks.check_elbo_estimator, iwae),
        (8, checks.check_log_weight_variance, plain),
        (9, checks.check_iwae_evidence, iwae),
    ]:
        assert row(model, x, seeds.generator(seed), budget=TINY).passed
        calls[row.__name__], spy.calls = spy.calls, []
    return model, x, tolerances, calls


def _radius(n, variance, false_alarm):
    """The median-of-means radius for n draws of exact variance ``variance``."""
    _, factor = toyvae.stats.median_of_means_plan(n, false_alarm)
    return factor * variance.sqrt()


@pytest.mark.false_alarm(3e-6)  # 3 Monte Carlo rows must pass, 1e-6 each
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

    # ELBO estimator: n draws of log w (k = 1), variance Var log w; 3 q's × N points. (At this
    # size each row draws in one chunk, so one call per q.)
    want = []
    for (_, _, q, k, n), _ in calls["check_elbo_estimator"]:
        variance = toyvae.log_weight_moments(model, x, q).variance
        assert k == 1 and n == TINY.draws
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
        (result,), _ = cli.run_battery([case], TINY, seed=seeds.seed(5), progress=False)
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
        assert cli.main(["report", "--quick", *_seed(), "--out", str(tmp_path)]) == 0
        assert matplotlib.get_backend().lower() == "agg"
    finally:
        matplotlib.use(previous)


# -- issue 11: users' fitted models, bad files, bounded memory, the command's manners ----------


def test_chunked_draws_equal_one_call():
    """Draws made in chunks of multiples of 16 from one generator equal one call's draws, so
    chunking (bounded memory) leaves every row's numbers unchanged; a tail under 16 entries is
    folded into the previous chunk."""
    rng = seeds.rng(1)
    model = LinearGaussian(rng.normal(size=(4, 3)), rng.normal(size=4), 0.5)
    x = model.sample((5,), generator=seeds.generator(2))[0]
    q = model.posterior(x)
    whole = toyvae.iwae_estimates(model, x, q, 2, 1001, generator=seeds.generator(3))
    sizes = []

    generator = seeds.generator(3)

    def draw(n):
        sizes.append(n)
        return toyvae.iwae_estimates(model, x, q, 2, n, generator=generator)

    old = monte_carlo_rows.CHUNK_ELEMENTS
    try:
        monte_carlo_rows.CHUNK_ELEMENTS = 2 * 5 * 3 * 32  # 32 draws per chunk
        parts = monte_carlo_rows.chunked(draw, 1001, 2 * 5 * 3)
    finally:
        monte_carlo_rows.CHUNK_ELEMENTS = old
    assert sizes[:-1] == [32] * 31 and sizes[-1] == 9
    assert torch.equal(parts, whole)
    # A tail of 1 draw of 1 entry (under 16) joins the last chunk.
    sizes.clear()
    assert monte_carlo_rows.chunked(lambda n: torch.zeros(n), 33, 1) is not None
    monte_carlo_rows.CHUNK_ELEMENTS, old = 16, monte_carlo_rows.CHUNK_ELEMENTS
    try:
        counts = []
        monte_carlo_rows.chunked(lambda n: counts.append(n) or torch.zeros(n), 33, 1)
    finally:
        monte_carlo_rows.CHUNK_ELEMENTS = old
    assert counts == [16, 17]


# false alarm: 2 Monte Carlo rows must pass (the same draws at both chunk sizes), 1e-6 each
@pytest.mark.false_alarm(2e-6)
def test_monte_carlo_rows_are_unchanged_by_small_chunks(monkeypatch):
    """The IWAE and variance rows give the same numbers with tiny chunks as with one chunk."""
    case = builtin_models()[0]
    x = case.model.sample((3,), generator=seeds.generator(4))[0]
    rows = {}
    for chunk in (monte_carlo_rows.CHUNK_ELEMENTS, 16 * 3 * 3):
        monkeypatch.setattr(monte_carlo_rows, "CHUNK_ELEMENTS", chunk)
        rows[chunk] = [
            check(case.model, x, seeds.generator(5), budget=TINY)
            for check in (checks.check_iwae_evidence, checks.check_log_weight_variance)
        ]
    first, second = rows.values()
    # The same noise (test_chunked_draws_equal_one_call); only the order of floating-point sums
    # in the batched products may differ with the chunk size, a relative 1e-15 per log weight,
    # far below 1e-9 of the rows' tolerances.
    for a, b in zip(first, second, strict=True):
        assert a.passed and b.passed and a.tolerance == pytest.approx(b.tolerance, rel=1e-12)
        assert abs(a.error - b.error) <= 1e-9 * a.tolerance


def _constant_feature_model():
    """A factor-analysis fit's shape: feature 0 constant in the data, its variance 1e-12."""
    rng = seeds.rng(7)
    weight = rng.normal(size=(5, 2))
    weight[0] = 0.0
    variances = np.array([1e-12, 0.5, 0.7, 1.1, 0.3])
    model = LinearGaussian(weight, np.zeros(5), variances)
    x = model.sample((40,), generator=seeds.generator(8))[0]
    x[:, 0] = 0.0
    return model, x


def test_reference_row_skips_with_the_condition_number_instead_of_crashing():
    """A variance of 1e-12 (scikit-learn's floor for constant features) makes SciPy refuse C:
    the row is skipped and names κ, where it used to crash with a traceback."""
    model, x = _constant_feature_model()
    row = checks.check_reference(model, x[:3], seeds.generator(0), budget=TINY)
    assert row.passed is None
    assert "κ(C) ≤" in row.reason and "κ(Ψ) =" in row.reason


def _ml_fit():
    """PPCA at its closed-form maximum-likelihood solution, and the data it was fitted to."""
    generator = seeds.generator(11)
    truth = LinearGaussian(torch.randn(6, 2, dtype=torch.float64, generator=generator), None, 0.4)
    x = truth.sample((60,), generator=generator)[0]
    return ppca_maximum_likelihood(x, 2), x


@pytest.mark.false_alarm(4e-6)  # the 4 Monte Carlo rows at 1e-6 each
def test_model_file_gets_a_fit_verdict_and_no_fixed_problems(tiny, tmp_path, capsys):
    """--model with data: the fit section says the ML fit is stationary (every gradient row
    "zero"), the fixed problems are not run, and the checks use --max-rows rows."""
    from toyvae.io import save

    fitted, x = _ml_fit()
    path = save(fitted, tmp_path / "ml.npz", x=x)
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "report",
                "--quick",
                *_seed(),
                "--model",
                str(path),
                "--max-rows",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "fixed-problems" not in stdout
    assert "checked at 5 of its 60 rows" in stdout
    assert "ml fit: at a stationary point" in stdout
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (fit,) = document["fits"]
    assert fit["stationary"] is True and {r["result"] for r in fit["rows"]} == {"zero"}
    assert document["problems"] == [] and document["settings"]["max_rows"] == 5


def test_a_fit_off_its_maximum_is_named_but_does_not_fail_the_run(tiny, tmp_path, capsys):
    """W moved by 1e-3 from the ML fit: the ∇W row says NOT 0; the exit status stays 0."""
    from toyvae.io import save

    fitted, x = _ml_fit()
    moved = LinearGaussian(fitted.weight * (1 + 1e-3), fitted.bias, fitted.noise_variance)
    path = save(moved, tmp_path / "moved.npz", x=x)
    monkeypatch_checks = (checks.check_identity,)
    old = checks.CHECKS
    checks.CHECKS = monkeypatch_checks
    try:
        assert cli.main(["report", "--quick", *_seed(), "--model", str(path)]) == 0
    finally:
        checks.CHECKS = old
    stdout = capsys.readouterr().out
    assert "NOT at a stationary point" in stdout and "∇ ≠ 0 in W" in stdout


def test_constant_features_are_left_out_of_the_fit_verdict():
    """A constant feature makes log p unbounded: the verdict is on the other features and says
    so, instead of calling its 1e-12 variance non-stationary."""
    from toyvae.report._fit import fit_verdict

    model, x = _constant_feature_model()
    description, rows = fit_verdict(model, x)
    assert "1 constant feature (0) left out" in description
    assert len(rows) == 3


BAD_PATHS = {
    "a .npy array": (
        lambda p: p.write_bytes(_npy()),
        "a single NumPy array (.npy)",
    ),
    "an empty file": (lambda p: p.write_bytes(b""), "empty file"),
    "a CSV file": (lambda p: p.write_text("1,2\n3,4\n"), "not an .npz archive"),
    "a directory": (lambda p: p.mkdir(), "is a directory"),
    "pickled objects": (
        lambda p: p.write_bytes(_pickled()),
        "an entry holds pickled objects",
    ),
}


def _npy():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ones(3))
    return buffer.getvalue()


def _pickled():
    import io

    buffer = io.BytesIO()
    np.savez(buffer, weight=np.array([object()], dtype=object))
    return buffer.getvalue()


@pytest.mark.parametrize("case", BAD_PATHS, ids=list(BAD_PATHS))
def test_every_bad_file_gives_one_line_and_exit_2(case, tmp_path, capsys):
    """The catalog of issue 11: each bad file is one line naming it, exit status 2."""
    make, message = BAD_PATHS[case]
    path = tmp_path / "model.npz"
    make(path)
    err = one_line_error(capsys, ["report", "--model", str(path)])
    assert str(path) in err and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--max-rows", "0"], "--max-rows: expected a positive integer, got 0"),
        (["report", "--threads", "x"], "--threads: expected a positive integer, got 'x'"),
    ],
)
def test_bad_new_options_give_one_line_errors(argv, message, capsys):
    """--max-rows and --threads take positive integers; anything else is one line, exit 2."""
    assert message in one_line_error(capsys, argv)


def test_out_at_an_existing_file_says_so(tmp_path, capsys):
    """--out at a file names the problem, not just "File exists"."""
    path = tmp_path / "taken"
    path.write_text("")
    assert "exists and is not a directory" in one_line_error(capsys, ["report", "--out", str(path)])


def test_version_and_no_progress_bar_off_a_terminal(tiny, capsys):
    """--version prints the version; a run whose stderr is not a terminal writes nothing there."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("toyvae ")
    old = checks.CHECKS
    checks.CHECKS = (checks.check_identity,)
    try:
        assert cli.main(["report", "--quick", *_seed()]) == 0
    finally:
        checks.CHECKS = old
    assert capsys.readouterr().err == ""


_HELP_PROBE = """
import sys, types, pathlib
import toyvae.report  # noqa: placeholder replaced below
"""

_HELP_WITHOUT_TORCH = """
import importlib.util, sys, types
spec = importlib.util.find_spec("toyvae")
package = types.ModuleType("toyvae")
package.__path__ = list(spec.submodule_search_locations)  # the package, without its __init__
sys.modules["toyvae"] = package
from toyvae.report.cli import main
try:
    main(["report", "--help"])
except SystemExit:
    pass
assert "torch" not in sys.modules, "the CLI module imported torch"
"""


def test_help_does_not_import_torch():
    """`toyvae report --help` needs neither torch nor the battery (toyvae's own __init__ aside)."""
    result = subprocess.run(
        [sys.executable, "-c", _HELP_WITHOUT_TORCH], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--max-rows" in result.stdout


def test_threads_one_for_small_models_more_for_large():
    """The command picks 1 thread below D·K = 2^18, more above; --threads wins."""
    small = builtin_models()[:1]
    assert cli._threads(small, None) == 1
    assert cli._threads(small, 3) == 3
    big = [report_models.Case("big", "", LinearGaussian(torch.zeros(2**12, 2**6)))]
    assert cli._threads(big, None) == min(8, len(os.sched_getaffinity(0)))


def _latent_six():
    """A factor-analysis model with K = 6 > 4 latent dimensions (5^6 = 15625 quadrature nodes)."""
    rng = seeds.rng(12)
    d, k = 9, 6
    model = LinearGaussian(rng.normal(size=(d, k)), rng.normal(size=d), rng.uniform(0.3, 2, d))
    x = model.sample((2,), generator=seeds.generator(13))[0]
    return model, x


@pytest.mark.false_alarm(1e-6)  # the gradient row must pass, 1e-6
def test_gradient_row_runs_beyond_quadrature_with_closed_form_moments():
    """At K = 6 the gradient row runs (reparameterisation and path derivative, closed-form
    variances) and passes; the score function is left out with its reason."""
    model, x = _latent_six()
    row = checks.check_gradients(model, x, seeds.generator(14), budget=TINY)
    assert row.passed is True
    assert "score function left out at K=6" in row.reason


def test_a_biased_gradient_estimator_fails_the_row_beyond_quadrature(monkeypatch):
    """A surrogate that loses the entropy's gradient (− log det L added: ∇_L off by diag(1/Lᵢᵢ))
    fails the row at K = 6."""
    model, x = _latent_six()
    surrogate = gradient_rows.elbo_surrogate

    def biased(model, x, q, *args, **kwargs):
        log_det = q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return surrogate(model, x, q, *args, **kwargs) - log_det

    monkeypatch.setattr(gradient_rows, "elbo_surrogate", biased)
    budget = dataclasses.replace(TINY, gradient_draws=4_000)
    row = checks.check_gradients(model, x, seeds.generator(14), budget=budget)
    assert row.passed is False


def test_every_accepted_seed_makes_a_generator():
    """--seed accepts [0, 2**63); each stream's torch seed stays in torch's 64-bit range (seeds of
    2**32 and more used to overflow), and seeds below 2**31 keep their streams."""
    from toyvae.report.cli import _generator

    for seed in (0, 2**31 - 1, 2**32, 2**63 - 1):
        draw = torch.randn(3, generator=_generator(seed, "model", "data", device="cpu"))
        again = torch.randn(3, generator=_generator(seed, "model", "data", device="cpu"))
        assert torch.equal(draw, again)

"""Benchmark rank selection on sparse counts: cross_validate's loss="kl" against "frobenius".

Issue 19: on sparse count data (90%+ zeros, like single-cell RNA) ``loss="kl"`` (masked KL
multiplicative updates, scored by the held-out Poisson deviance) is said to pick too low a
rank, while ``loss="frobenius"`` on the same counts picks the planted rank. This script
measures that on simulated counts whose rank is known.

Prints markdown tables (with a machine and version header) to stdout; progress goes to
stderr. Run from the repository root::

    python benchmarks/bench_counts.py                          # small size, full grid
    python benchmarks/bench_counts.py --size medium            # 1500 x 1000
    python benchmarks/bench_counts.py --sims topic_like --zeros 0.9 --seeds 2
    python benchmarks/bench_counts.py --module-path ../base    # an older nmf_cv checkout

Every ``cross_validate`` call runs serially, in this process, with BLAS limited to
``--blas-threads`` threads (default 1, via threadpoolctl): the benchmark takes one core.

What is measured
----------------
Data: two simulators (numpy only), each returning ``(X, mean, rank)``, X integer-valued
float64 counts (rows = cells or documents, columns = genes or words), ``mean`` its true mean
and ``rank`` the planted rank:

- ``single_cell``: Splatter-like; identity programs plus one shared activity program (rank =
  identity programs + 1), lognormal library sizes, negative binomial counts;
- ``topic_like``: documents as sparse Dirichlet mixtures of sparse Dirichlet topics,
  lognormal lengths, Poisson counts.

Each scales its mean (bisection on the expected fraction of zeros) so that the fraction of
zeros in X is close to the target, then drops all-zero rows and columns; the tables give the
realised fraction and shape.

For each simulator, target fraction of zeros and seed, ``nmf_cv.cross_validate(X, ranks,
loss=loss, random_state=seed, progress=False, return_factors=True)`` with every other
argument at its default (5 folds, ``max_iter=2000``, ``tol`` 1e-6, or 1e-5 for KL coordinate
descent since it became the KL default), for ``loss="kl"`` and
``"frobenius"``, on the same ranks (``--min-rank`` .. planted + ``--above``: 2..11 for
single_cell, 2..10 for topic_like by default). Recorded: ``best_rank``, ``best_rank_1se``,
the curve ``press_median / min`` and the wall time of each call.

Oracle: on the same folds (``cv.folds.fold_of``; both losses get the same folds from the same
seed, checked), the held-out Poisson deviance ``2 sum [x log(x / mu) - x + mu]`` (``0 log 0 =
0``) per fold of (a) the true mean, (b) the rank-1 Poisson fit of the fold's training cells
(row effect x column effect, fitted to the training cells' row and column totals by
alternating closed-form updates), (c) each rank's fitted factors ``W @ H`` of the KL fits and
of the Frobenius fits. KL and rank-1 predictions are floored as nmf_cv floors them (sqrt of
the smallest normal float64), so (c) for the KL fits reproduces ``cv.press`` (the largest
relative difference is printed), and again at 1e-3; Frobenius predictions are floored at
1e-3 (a diagnostic only: they are not fitted to this score). Medians over folds, relative to
the true mean's. Diagnostics: the share of held-out counts on cells a KL fit predicts below
1e-6, and the training sets' all-zero rows and columns (whose held-out counts no fit of the
training set can predict).
"""

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
from _common import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    blas_description,
    cpu_model,
    load_average,
    log,
    markdown_table,
    module_revision,
    now,
    sec,
)

nmf_cv = None  # imported by main(), after --module-path is on sys.path

SIZES = {"small": (600, 500), "medium": (1500, 1000)}  # rows (cells, documents) x columns
N_IDENTITY = 6  # single_cell's identity programs (rank 7 with the activity program)
N_TOPICS = 6  # topic_like's topics
LOSSES = ("kl", "frobenius")
KL_FLOOR = float(np.sqrt(np.finfo(np.float64).tiny))  # nmf_cv's floor of KL predictions
FROBENIUS_FLOOR = 1e-3  # floor of Frobenius predictions in the (diagnostic) deviance
DISPERSION = 0.1  # single_cell's negative binomial dispersion


# ---------------------------------------------------------------------------------------------
# Simulators
# ---------------------------------------------------------------------------------------------

def scale_for_zeros(zero_fraction, target, lo=1e-4, hi=1e4, n_iter=60):
    """The scale ``s`` at which ``zero_fraction(s)`` (expected fraction of zeros, decreasing in
    ``s``) equals ``target``: bisection on ``log s``."""
    lo, hi = math.log(lo), math.log(hi)
    if not zero_fraction(math.exp(hi)) < target < zero_fraction(math.exp(lo)):
        raise ValueError(f"cannot reach {target:.0%} zeros with scales in [{math.exp(lo):g}, "
                         f"{math.exp(hi):g}]")
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        if zero_fraction(math.exp(mid)) > target:
            lo = mid  # too many zeros: scale up
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def drop_empty(X, mean):
    """X and mean without X's all-zero rows and columns (one pass is enough: dropping an
    all-zero column cannot empty a row, and vice versa)."""
    rows, cols = X.sum(axis=1) > 0, X.sum(axis=0) > 0
    return X[rows][:, cols], mean[rows][:, cols]


def single_cell(n_cells, n_genes, n_programs, zeros, seed, dispersion=DISPERSION,
                de_fraction=0.2, fold=2.0, activity_share=(0.2, 0.6)):
    """Splatter-like single-cell counts: ``(X, mean, rank)`` with ``rank = n_programs + 1``.

    Genes have a base expression ~ Gamma(0.6, 1/0.6) (mean 1, a heavy-ish tail). There are
    ``n_programs`` identity programs and one activity program; each program is the base
    profile with its own random ``de_fraction`` of genes upregulated by lognormal fold changes
    (log fold ~ N(``fold``, 0.5^2): median 7.4x by default). Each cell uses one identity
    program at 0.9 and all of them through a Dirichlet(0.5) mix at 0.1; a random 30% of cells
    also use the activity program at a share Uniform(``activity_share``) (the identity part
    shrinks by as much). So the mean is ``library x usage @ profiles``: rank ``n_programs +
    1`` (identity programs + the activity program). Library sizes are lognormal (sdlog 0.5);
    counts are gamma-Poisson (negative binomial, variance ``mu + dispersion mu^2``). The
    mean's scale is set by bisection so that the expected fraction of zeros, ``mean((1 +
    dispersion mu)^(-1 / dispersion))``, is ``zeros``. All-zero rows and columns are dropped
    (from X and mean), so the realised fraction is a little lower.

    The defaults make the programs strong enough that ``loss="frobenius"`` finds rank 7 at
    600 x 500 with 75% and 90% zeros (measured on seeds 0..2 with e7e979a); with 10%
    upregulated genes at log fold 1 and dispersion 0.2 it found 4-6 even at 75%.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1 / 0.6, n_genes)
    profiles = np.tile(base, (n_programs + 1, 1))
    for profile in profiles:
        up = rng.random(n_genes) < de_fraction
        profile[up] *= rng.lognormal(fold, 0.5, up.sum())
    usage = 0.1 * rng.dirichlet(np.full(n_programs, 0.5), n_cells)
    usage[np.arange(n_cells), rng.integers(n_programs, size=n_cells)] += 0.9
    activity = np.where(rng.random(n_cells) < 0.3, rng.uniform(*activity_share, n_cells), 0.0)
    usage = np.column_stack([(1 - activity)[:, None] * usage, activity])
    library = rng.lognormal(0.0, 0.5, n_cells)
    shape = library[:, None] * (usage @ profiles)
    shape /= shape.mean()
    scale = scale_for_zeros(
        lambda s: float(np.mean((1 + dispersion * s * shape) ** (-1 / dispersion))), zeros)
    mean = scale * shape
    rate = rng.gamma(1 / dispersion, dispersion * mean)  # mean `mean`, var dispersion mean^2
    X = rng.poisson(rate).astype(np.float64)
    return (*drop_empty(X, mean), n_programs + 1)


def topic_like(n_docs, n_words, n_topics, zeros, seed):
    """Topic-model counts: ``(X, mean, rank)`` with ``rank = n_topics``.

    Topics ~ Dirichlet(0.1) over the words; each document mixes them with weights ~
    Dirichlet(0.2) (mostly one or two topics); document lengths are lognormal (sdlog 0.5);
    counts are Poisson. The mean's scale is set by bisection so that the expected fraction of
    zeros, ``mean(exp(-mu))``, is ``zeros``. All-zero rows and columns are dropped.
    """
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(np.full(n_words, 0.1), n_topics)
    weights = rng.dirichlet(np.full(n_topics, 0.2), n_docs)
    length = rng.lognormal(0.0, 0.5, n_docs)
    shape = length[:, None] * (weights @ topics)
    shape /= shape.mean()
    scale = scale_for_zeros(lambda s: float(np.mean(np.exp(-s * shape))), zeros)
    mean = scale * shape
    X = rng.poisson(mean).astype(np.float64)
    return (*drop_empty(X, mean), n_topics)


SIMULATORS = {"single_cell": (single_cell, N_IDENTITY), "topic_like": (topic_like, N_TOPICS)}


def simulate(sim, size, zeros, seed):
    function, programs = SIMULATORS[sim]
    return function(*SIZES[size], programs, zeros, seed)


# ---------------------------------------------------------------------------------------------
# Cross-validation and the oracle
# ---------------------------------------------------------------------------------------------

def run_cv(X, ranks, loss, seed):
    """(CVResult, wall seconds) of one cross_validate call with the defaults."""
    start = time.perf_counter()
    cv = nmf_cv.cross_validate(X, ranks, loss=loss, random_state=seed, progress=False,
                               return_factors=True)
    return cv, time.perf_counter() - start


def deviance(x, mu):
    """Poisson deviance ``2 sum [x log(x / mu) - x + mu]``, ``0 log 0 = 0``."""
    positive = x > 0
    log_term = np.zeros_like(x)
    log_term[positive] = x[positive] * np.log(x[positive] / mu[positive])
    return float(2.0 * np.sum(log_term - x + mu))


def rank_one(X, train, n_iter=200):
    """Rank-1 Poisson fit ``a_i b_j`` to the training cells (``train``, bool): alternating
    closed-form updates that match the training cells' row and column totals."""
    weight = train.astype(np.float64)
    row_total, col_total = (X * weight).sum(axis=1), (X * weight).sum(axis=0)
    b = np.ones(X.shape[1])
    for _ in range(n_iter):
        a = row_total / (weight @ b)
        b = col_total / np.maximum(a @ weight, KL_FLOOR)
    return np.outer(a, b)


def fold_grid(cv):
    m, n = cv.folds.shape
    rows, cols = np.divmod(np.arange(m * n), n)
    return cv.folds.fold_of(rows, cols, 0).reshape(m, n)


def oracle(X, mean, cvs):
    """Held-out Poisson deviance per fold of the true mean, the rank-1 fit and every fitted
    rank of each loss, and diagnostics: ``(scores, diagnostics, gap)``.

    ``scores[model]`` lists the folds' deviances; models: "true", "rank-1" (floored as nmf_cv
    floors KL predictions), "rank-1 @1e-3" (floored at 1e-3), ("kl", k), ("kl @1e-3", k),
    ("frobenius", k) (floored at 1e-3). ``diagnostics`` per fold: "empty rows" and "empty
    columns" of the training set (all its cells zero), ("tiny", k): the fraction of held-out
    counts on cells the KL fit predicts below 1e-6. ``gap``: the largest relative difference
    of the KL fits' deviance to ``cv.press``."""
    fold = fold_grid(cvs["kl"])
    if not np.array_equal(fold, fold_grid(cvs["frobenius"])):
        raise RuntimeError("the two losses' folds differ")
    scores, diagnostics, gap = {}, {}, 0.0

    def add(table, key, value):
        table.setdefault(key, []).append(value)

    for f in range(cvs["kl"].folds.n_folds):
        held = fold == f
        x, training = X[held], np.where(held, 0.0, X)
        add(diagnostics, "empty rows", int(np.sum(training.sum(axis=1) == 0)))
        add(diagnostics, "empty columns", int(np.sum(training.sum(axis=0) == 0)))
        add(scores, "true", deviance(x, mean[held]))
        fit = rank_one(X, ~held)[held]
        add(scores, "rank-1", deviance(x, np.maximum(fit, KL_FLOOR)))
        add(scores, "rank-1 @1e-3", deviance(x, np.maximum(fit, FROBENIUS_FLOOR)))
        for loss, cv in cvs.items():
            for i, k in enumerate(cv.ranks):
                W, H = cv.factors[(int(k), 0, f)]
                fit = (W @ H)[held]
                add(scores, (loss, int(k)), deviance(x, np.maximum(
                    fit, KL_FLOOR if loss == "kl" else FROBENIUS_FLOOR)))
                if loss == "kl":
                    add(scores, ("kl @1e-3", int(k)),
                        deviance(x, np.maximum(fit, FROBENIUS_FLOOR)))
                    add(diagnostics, ("tiny", int(k)), float(x[fit < 1e-6].sum() / x.sum()))
                    press = cv.press[i, 0, f]
                    gap = max(gap, abs(scores[(loss, int(k))][-1] - press) / press)
    return scores, diagnostics, gap


def rank_range(planted, min_rank, above):
    return list(range(min_rank, planted + above + 1))


def run_case(sim, size, zeros, seed, min_rank, above):
    """One data set: its description, both CV results and times, and the oracle."""
    X, mean, planted = simulate(sim, size, zeros, seed)
    ranks = rank_range(planted, min_rank, above)
    out = {"seed": seed, "shape": X.shape, "zeros": float(np.mean(X == 0)), "planted": planted,
           "ranks": ranks, "cv": {}, "wall": {}}
    for loss in LOSSES:
        log(f"{sim} zeros={zeros} seed={seed} {X.shape[0]}x{X.shape[1]} "
            f"({out['zeros']:.1%} zeros): {loss}, ranks {ranks[0]}..{ranks[-1]}")
        out["cv"][loss], out["wall"][loss] = run_cv(X, ranks, loss, seed)
        log(f"  {out['wall'][loss]:.1f} s, best_rank {out['cv'][loss].best_rank}")
    out["oracle"], out["diagnostics"], out["gap"] = oracle(X, mean, out["cv"])
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def curve(cv):
    return " ".join(f"{v:.3f}" for v in cv.press_median / cv.press_median.min())


def picks(cv):
    return f"{cv.best_rank} ({cv.best_rank_1se})"


def case_table(cases):
    """One row per seed: data, picks, times and curves."""
    ranks = cases[0]["ranks"]
    headers = ["seed", "shape", "zeros %", "KL pick (1se)", "Frobenius pick (1se)", "KL s",
               "Frobenius s", f"KL deviance / min, ranks {ranks[0]}..{ranks[-1]}",
               f"Frobenius PRESS / min, ranks {ranks[0]}..{ranks[-1]}"]
    rows = [[c["seed"], f"{c['shape'][0]}x{c['shape'][1]}", f"{100 * c['zeros']:.1f}",
             picks(c["cv"]["kl"]), picks(c["cv"]["frobenius"]), sec(c["wall"]["kl"]),
             sec(c["wall"]["frobenius"]), curve(c["cv"]["kl"]), curve(c["cv"]["frobenius"])]
            for c in cases]
    return markdown_table(headers, rows)


ORACLE_LABELS = {"true": "true mean", "rank-1": "rank-1 fit of the training totals",
                 "rank-1 @1e-3": "rank-1 fit, floored at 1e-3", "kl": "KL fit",
                 "kl @1e-3": "KL fit floored at 1e-3",
                 "frobenius": "Frobenius fit (floored at 1e-3)"}


def oracle_label(model, planted):
    if not isinstance(model, tuple):
        return ORACLE_LABELS[model]
    return (f"{ORACLE_LABELS[model[0]]}, k = {model[1]}"
            + (" (planted)" if model[1] == planted else ""))


def oracle_table(cases):
    """Rows = models, columns = seeds: median held-out deviance over folds, relative to the
    true mean's (first row: the true mean's, absolute), then the diagnostics."""
    planted = cases[0]["planted"]
    rows = [["true mean: median deviance"]
            + [f"{np.median(c['oracle']['true']):.0f}" for c in cases] + [""]]
    for model in list(cases[0]["oracle"])[1:]:
        ratios = [np.median(c["oracle"][model]) / np.median(c["oracle"]["true"]) for c in cases]
        rows.append([oracle_label(model, planted)] + [f"{r:.3f}" for r in ratios]
                    + [f"{np.median(ratios):.3f}"])
    for k in cases[0]["ranks"]:
        tiny = [100 * np.median(c["diagnostics"][("tiny", k)]) for c in cases]
        rows.append([f"KL fit, k = {k}: % of held-out counts where it predicts < 1e-6"]
                    + [f"{t:.1f}" for t in tiny] + [f"{np.median(tiny):.1f}"])
    rows.append(["training sets' all-zero rows / columns (median over folds)"]
                + [f"{np.median(c['diagnostics']['empty rows']):.0f} / "
                   f"{np.median(c['diagnostics']['empty columns']):.0f}" for c in cases] + [""])
    headers = ["model"] + [f"seed {c['seed']}" for c in cases] + ["median over seeds"]
    return markdown_table(headers, rows)


def summary_rows(results):
    rows = []
    for (sim, zeros), cases in results.items():
        n, planted = len(cases), cases[0]["planted"]
        row = [sim, f"{zeros:.2f}", f"{100 * np.mean([c['zeros'] for c in cases]):.1f}", planted]
        for loss in LOSSES:
            best = [c["cv"][loss].best_rank for c in cases]
            one_se = [c["cv"][loss].best_rank_1se for c in cases]
            row += [f"{best.count(planted)}/{n}", " ".join(map(str, best)),
                    f"{one_se.count(planted)}/{n}"]
        for loss in LOSSES:
            row.append(sec(float(np.median([c["wall"][loss] for c in cases]))))
        rows.append(row)
    return rows


def summary_table(results):
    headers = ["sim", "zeros target", "realised zeros % (mean)", "planted",
               "KL best_rank = planted", "KL picks", "KL best_rank_1se = planted",
               "Frobenius best_rank = planted", "Frobenius picks",
               "Frobenius best_rank_1se = planted", "KL s per CV (median)",
               "Frobenius s per CV (median)"]
    return markdown_table(headers, summary_rows(results))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def machine_header(start, blas_threads):
    import numba
    path = Path(nmf_cv.__file__).resolve()
    return (f"nmf_cv {path} (git {module_revision(path.parent)}); machine: nproc="
            f"{os.cpu_count()}, CPU {cpu_model()}, BLAS {blas_description()}, limited to "
            f"{blas_threads} thread(s) here; python {platform.python_version()}, numpy "
            f"{np.__version__}, numba {numba.__version__}; started {start['date']}, ended "
            f"{now()}; load average (1/5/15 min) {start['load']} at the start, "
            f"{load_average()} at the end")


def warm_up():
    """Compile (or load from numba's cache) the kernels both losses use."""
    X, _, _ = topic_like(60, 40, 3, 0.8, 0)
    for loss in LOSSES:
        nmf_cv.cross_validate(X, [2, 3], n_folds=2, loss=loss, random_state=0,
                              progress=False, max_iter=5)


def comma_list(kind):
    def parse(text):
        return [kind(item) for item in text.split(",") if item.strip()]
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=comma_list(str), default=list(SIMULATORS),
                        help="comma list of simulators (default single_cell,topic_like)")
    parser.add_argument("--zeros", type=comma_list(float), default=[0.75, 0.90, 0.97],
                        help="comma list of target fractions of zeros (default 0.75,0.9,0.97)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="small = 600 x 500, medium = 1500 x 1000 (default small)")
    parser.add_argument("--min-rank", type=int, default=2,
                        help="smallest rank cross-validated (default 2)")
    parser.add_argument("--above", type=int, default=4,
                        help="ranks up to planted + ABOVE (default 4)")
    parser.add_argument("--module-path", metavar="DIR",
                        help="put DIR first on sys.path before importing nmf_cv (e.g. an old "
                        "checkout)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads (threadpoolctl; default 1)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sims) - set(SIMULATORS))
    if unknown:
        parser.error(f"unknown simulators {unknown}; choose from {list(SIMULATORS)}")
    return args


def import_nmf_cv(module_path):
    global nmf_cv
    sys.path.insert(0, str(Path(module_path).resolve()) if module_path else str(ROOT))
    import nmf_cv as module
    nmf_cv = module


def print_report(args, start, results):
    rows, cols = SIZES[args.size]
    print(f"# Rank selection on sparse counts: loss='kl' vs loss='frobenius' ({args.size}: "
          f"{rows} x {cols} before dropping all-zero rows and columns)")
    print()
    print(machine_header(start, args.blas_threads))
    print()
    print("`cross_validate(X, ranks, loss=..., random_state=seed, progress=False, "
          "return_factors=True)`, defaults otherwise (5 folds, max_iter=2000, tol=1e-6 or, for "
          "KL coordinate descent, 1e-5), "
          "serial. Picks are `best_rank (best_rank_1se)`; curves are `press_median / min` "
          "(KL: held-out Poisson deviance; Frobenius: held-out squared error). single_cell: "
          f"{N_IDENTITY} identity programs + 1 activity program (planted rank "
          f"{N_IDENTITY + 1}), negative binomial (dispersion {DISPERSION}); topic_like: "
          f"{N_TOPICS} topics, Poisson.")
    print()
    print("## Summary")
    print()
    print(summary_table(results))
    for (sim, zeros), cases in results.items():
        print()
        print(f"## {sim}, target {zeros:.0%} zeros, planted rank {cases[0]['planted']}")
        print()
        print(case_table(cases))
        print()
        print("Oracle, on the same folds: median over folds of the held-out Poisson deviance, "
              "relative to the true mean's. KL fits and the rank-1 fit are floored as nmf_cv "
              "floors KL predictions (1.5e-154), and again at 1e-3; Frobenius fits at 1e-3. "
              "KL fits' deviance vs cv.press: max relative difference "
              f"{max(c['gap'] for c in cases):.1e}.")
        print()
        print(oracle_table(cases))
    print()
    print(f"Benchmark wall time: {time.perf_counter() - start['clock']:.0f} s")


def main(argv=None):
    args = parse_args(argv)
    import_nmf_cv(args.module_path)
    from threadpoolctl import threadpool_limits
    start = {"date": now(), "load": load_average(), "clock": time.perf_counter()}
    results = {}
    with threadpool_limits(args.blas_threads, user_api="blas"):
        log("warm-up (numba compile)")
        warm_up()
        for sim in args.sims:
            for zeros in args.zeros:
                results[(sim, zeros)] = [run_case(sim, args.size, zeros, seed, args.min_rank,
                                                  args.above) for seed in range(args.seeds)]
    print_report(args, start, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

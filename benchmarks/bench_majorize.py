"""Masked HALS: exact steps against majorize-minimize steps, by rank and fraction missing.

The study behind ``nmf_cv._majorized_fraction``, the rule that decides which rows and columns
of a masked HALS fit take a majorize-minimize step. Prints a markdown table; progress goes to
stderr. Run from the repository root::

    python benchmarks/bench_majorize.py                    # all shapes, about 10 minutes
    python benchmarks/bench_majorize.py --shapes 1000x500x10 --missing 0.1,0.2

For each planted matrix (``make_planted(m, n, k, noise=0.05, random_state=0)``) and fraction of
cells set to NaN (seed 1), the same fit runs twice, once with every mostly observed line
majorized and once with none, from the same init. Reported: the median time per iteration
(over iterations 4.., median over repeats) as a multiple of a dense iteration; the number of
iterations and the time to reach the dense fit's relative error after N iterations (over the
observed cells; fits capped at 10 N); and the ratio of those times, majorized / exact.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
from _common import git_revision, log, markdown_table  # noqa: E402

try:
    import nmf_cv
except ImportError:
    sys.path.insert(0, str(ROOT))
    import nmf_cv

SHAPES = ((200, 100, 5, 200), (1000, 500, 5, 100), (1000, 500, 10, 100), (1000, 500, 20, 100),
          (5000, 1000, 20, 40))
MISSING = (0.05, 0.1, 0.15, 0.2, 0.3)
REPEATS = 3


def run(X, k, goal, max_iter, majorized):
    """Per-iteration seconds (median) and (iterations, seconds) to reach ``goal``."""
    nmf_cv._majorized_fraction = lambda k: 1.0 if majorized else -1.0
    per_iter, elapsed = [], []
    for _ in range(REPEATS):
        res = nmf_cv.fit_nmf(X, k, max_iter=max_iter, tol=0, random_state=0,
                             callback=lambda i, W, H, f: f <= goal)
        per_iter.append(np.median(np.diff(res.time_history)[3:]))
        elapsed.append(res.time_history[-1])
    return float(np.median(per_iter)), res.n_iter, float(np.median(elapsed))


def rows_for(m, n, k, n_iter, fractions):
    X = nmf_cv.make_planted(m, n, k, noise=0.05, random_state=0)
    dense = nmf_cv.fit_nmf(X, k, max_iter=n_iter, tol=0, random_state=0)
    dense_iter = float(np.median(np.diff(dense.time_history)[3:]))
    for fraction in fractions:
        log(f"{m}x{n} k={k}, {fraction:.0%} missing")
        Xm = X.copy()
        Xm[np.random.default_rng(1).random(X.shape) < fraction] = np.nan
        observed = Xm[~np.isnan(Xm)]
        goal = 0.5 * dense.relative_error ** 2 * float(observed @ observed)
        nmf_cv.fit_nmf(Xm, k, max_iter=2, random_state=0)  # compile outside the timings
        exact = run(Xm, k, goal, 10 * n_iter, majorized=False)
        major = run(Xm, k, goal, 10 * n_iter, majorized=True)
        yield [f"{m}x{n} k={k}", f"{fraction:.0%}",
               f"{exact[0] / dense_iter:.2f}", f"{major[0] / dense_iter:.2f}",
               f"{exact[1]} / {exact[2]:.3g}", f"{major[1]} / {major[2]:.3g}",
               f"{major[2] / exact[2]:.2f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help="comma-separated m x n x k, e.g. 1000x500x10")
    parser.add_argument("--missing", help="comma-separated fractions, e.g. 0.1,0.2")
    args = parser.parse_args()
    plan = {(m, n, k): it for m, n, k, it in SHAPES}
    shapes = SHAPES
    if args.shapes:
        shapes = []
        for text in args.shapes.split(","):
            m, n, k = (int(v) for v in text.split("x"))
            shapes.append((m, n, k, plan.get((m, n, k), 100)))
    fractions = [float(v) for v in args.missing.split(",")] if args.missing else MISSING
    rows = [row for m, n, k, it in shapes for row in rows_for(m, n, k, it, fractions)]
    print(f"# Masked HALS: exact vs majorize-minimize steps (nmf_cv git {git_revision()})\n")
    print(markdown_table(["shape", "missing", "exact / dense per iter",
                          "majorized / dense per iter", "exact iters / s to E",
                          "majorized iters / s to E", "majorized / exact time to E"], rows))


if __name__ == "__main__":
    main()

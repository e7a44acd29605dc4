"""Benchmark consensus components, ``fit_nmf(X, k, n_runs=R)``: do they reproduce, do they
match planted programs, do they flag a rank above the data's, with runs on all of X or on
bootstrap resamples of its rows?

Prints markdown (machine header, then one table) to stdout; progress to stderr. Run from the
repository root::

    python benchmarks/bench_consensus.py                 # about 4 minutes on one core
    python benchmarks/bench_consensus.py --runs 10 --cases cells

Cases (rows are samples, as ``fit_nmf``'s consensus expects):

- ``cells``: single-cell-like counts, 1500 cells x 1000 genes, about 80% zeros: 8 programs
  whose marker genes overlap (drawn from one pool of 200 genes), unequal type sizes, each cell
  one program for half its counts and a Dirichlet(0.3) mix for the rest, lognormal depth,
  Poisson counts; ``loss="kl"``; planted k = 8, and k = 11 above it.
- ``planted``: ``make_planted(300, 200, 5, noise=0.1)``, Frobenius; k = 5 and 8.
- ``heavy``: lognormal x gamma factors (200 x 150, rank 4) times lognormal(0, 0.3) noise, a
  heavy-tailed multiplicative error; Frobenius; k = 4 and 7.
- ``uniform``: uniform noise 200 x 100, no structure; k = 3 and 6.

For each case, mode (``bootstrap``: each run fits a resample of the rows with replacement, as
`stability` does; ``all``: each run fits all of X, as cNMF does) and rank: two calls with
``random_state`` 1 and 2; reported are the worst component's stability of the first, the runs
it kept, the smallest matched cosine between the two calls' components, and for planted
programs the mean matched cosine of the consensus with them, beside one single fit's
(``init="nndsvda"``). The module's choice is ``nmf_cv._CONSENSUS_BOOTSTRAP``; this script sets
it for each mode.
"""

import argparse
import sys
import time

import numpy as np
import scipy.sparse as sp
from _common import ROOT, log, markdown_table, sec
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(ROOT))
import nmf_cv  # noqa: E402


def cells(seed=0, n_cells=1500, n_genes=1000, k=8, depth=250.0):
    """Single-cell-like counts and their planted programs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    H = rng.gamma(0.3, 1.0, (k, n_genes)) * 0.5
    pool = rng.choice(n_genes, 200, replace=False)
    for t in range(k):
        markers = rng.choice(pool, 40, replace=False)
        H[t, markers] += rng.gamma(1.5, 1.0, 40)
    H /= H.sum(axis=1, keepdims=True)
    main = rng.choice(k, n_cells, p=rng.dirichlet(np.full(k, 2.0)))
    W = rng.dirichlet(np.full(k, 0.3), n_cells) * 0.5
    W[np.arange(n_cells), main] += 0.5
    W *= rng.lognormal(np.log(depth), 0.7, n_cells)[:, None]
    X = rng.poisson(W @ H).astype(float)
    keep = X.sum(axis=0) > 0
    return sp.csr_matrix(X[:, keep]), H[:, keep]


def heavy(seed=1):
    rng = np.random.default_rng(seed)
    W, H = rng.lognormal(0, 1, (200, 4)), rng.gamma(0.3, 1, (4, 150))
    return W @ H * rng.lognormal(0, 0.3, (200, 150)), H


CASES = {
    "cells": lambda: (*cells(), "kl", 8, 11),
    "planted": lambda: (nmf_cv.make_planted(300, 200, 5, noise=0.1, random_state=0), None,
                        "frobenius", 5, 8),
    "heavy": lambda: (*heavy(), "frobenius", 4, 7),
    "uniform": lambda: (np.random.default_rng(4).random((200, 100)), None, "frobenius", 3, 6),
}


def matched_cosines(A, B):
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    cos = A @ B.T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]


def run(case, runs):
    X, planted, loss, k, above = CASES[case]()
    out = []
    single = nmf_cv.fit_nmf(X, k, loss=loss, random_state=0, max_iter=2000, tol=1e-6)
    for mode in ("all", "bootstrap"):
        nmf_cv._CONSENSUS_BOOTSTRAP = mode == "bootstrap"
        for rank in (k, above):
            start = time.perf_counter()
            a = nmf_cv.fit_nmf(X, rank, loss=loss, n_runs=runs, random_state=1)
            seconds = time.perf_counter() - start
            b = nmf_cv.fit_nmf(X, rank, loss=loss, n_runs=runs, random_state=2)
            row = [case, mode, rank, f"{a.component_stability.min():.3f}",
                   f"{a.n_runs_kept}/{a.n_runs}", f"{matched_cosines(a.H, b.H).min():.4f}"]
            if planted is not None and rank == k:
                row += [f"{matched_cosines(a.H, planted).mean():.5f}",
                        f"{matched_cosines(single.H, planted).mean():.5f}"]
            else:
                row += ["", ""]
            out.append(row + [sec(seconds)])
            log(" | ".join(map(str, out[-1])))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="n_runs (default: 20)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma list of {','.join(CASES)}")
    args = parser.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    nmf_cv.fit_nmf(np.ones((4, 3)), 1)  # compile outside the timings
    rows = []
    for case in args.cases.split(","):
        rows += run(case, args.runs)
    print(f"bench_consensus.py, n_runs={args.runs}, one BLAS thread, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(markdown_table(["case", "runs fit", "k", "worst stability", "runs kept",
                          "seeds 1 vs 2: worst matched cosine",
                          "consensus vs planted (mean cosine)", "one fit vs planted",
                          "s per call"], rows))


if __name__ == "__main__":
    main()

"""Rank-selection criteria with plain and with extrapolated fits (``extrapolate=False`` against
the default, True for HALS and KL coordinate descent): each call's pick and time, side by side
on the same data and seeds.

Cases (planted rank in brackets): ``planted`` make_planted(100, 60, 3, noise=0.1) [3];
``planted_missing`` make_planted(300, 200, 6, noise=0.05, missing=0.1) [6]; ``heavy``
lognormal x gamma factors (200 x 150) times lognormal(0, 0.3) noise [4]; ``overlap`` 150 x 100,
one component a mix of another, one weak (a third of the others' scale), 3% Gaussian noise [5];
``cells`` single-cell-like counts (bench_consensus.py's, 600 cells x 400 genes, KL, samples in
rows) [6]. Criteria: `stability` (20 runs; cells 10), `randomized_rss`, `bicross_validate`
(not on cells). One core, one BLAS thread. Run from the repository root::

    python benchmarks/bench_extrapolated_criteria.py                # about 8 minutes
    python benchmarks/bench_extrapolated_criteria.py --cases heavy --seeds 0
"""

import argparse
import sys
import time

import numpy as np
from _common import ROOT, markdown_table

sys.path.insert(0, str(ROOT))


def heavy(seed):
    rng = np.random.default_rng(seed)
    W = rng.lognormal(0, 1, (200, 4)) * rng.gamma(0.5, 1, (200, 4))
    H = rng.lognormal(0, 1, (4, 150))
    return W @ H * rng.lognormal(0, 0.3, (200, 150)), 4


def overlap(seed):
    rng = np.random.default_rng(seed)
    W = rng.random((150, 5)) ** 3
    W[:, 1] = 0.6 * W[:, 0] + 0.4 * W[:, 1]
    H = rng.random((5, 100)) ** 3
    H[4] *= 0.3
    X = W @ H
    return X + rng.normal(0, 0.03 * X.std(), X.shape).clip(min=-X), 5


def cases():
    from bench_consensus import cells

    import nmf_cv

    return {
        "planted": lambda s: (nmf_cv.make_planted(100, 60, 3, noise=0.1, random_state=s), 3),
        "planted_missing": lambda s: (nmf_cv.make_planted(300, 200, 6, noise=0.05, missing=0.1,
                                                          random_state=s), 6),
        "heavy": heavy, "overlap": overlap,
        "cells": lambda s: (cells(s, n_cells=600, n_genes=400, k=6)[0], 6)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="planted,planted_missing,heavy,overlap,cells")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    import nmf_cv

    threadpool_limits(1)
    made = cases()
    headers = ["case", "seed", "planted", "criterion", "plain pick", "plain s",
               "extrapolated pick", "extrapolated s"]
    rows = []
    for name in args.cases.split(","):
        for seed in map(int, args.seeds.split(",")):
            X, k = made[name](seed)
            counts = name == "cells"
            calls = [("stability", nmf_cv.stability, range(2, k + 3),
                      {"n_runs": 10, "loss": "kl", "axis": "rows"} if counts else {})]
            if not counts:
                calls += [("randomized", nmf_cv.randomized_rss, range(1, k + 3), {}),
                          ("bicv", nmf_cv.bicross_validate, range(1, k + 3), {})]
            for label, function, ranks, kw in calls:
                row = [name, seed, k, label]
                for extrapolate in (False, True):
                    start = time.perf_counter()
                    res = function(X, ranks, random_state=seed, progress=False,
                                   extrapolate=extrapolate, **kw)
                    row += [res.best_rank, f"{time.perf_counter() - start:.1f}"]
                rows.append(row)
                print(markdown_table(headers, [row]).splitlines()[-1], file=sys.stderr,
                      flush=True)
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()

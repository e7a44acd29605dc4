"""Choosing the rank of incomplete data: cross-validated PRESS, then every criterion side by side.

X (100 x 80) is a planted rank-4 product W @ H (entries of W and H uniform on [0, 1)) plus
Gaussian noise, with about 15% of the cells missing (NaN), from `make_planted`. Its noise
standard deviation is ``noise`` times the mean of W @ H, so the noise variance handed to prior
predictive matching is ``(noise * mean(W @ H))^2`` (the clean matrix is the same call without
noise: `make_planted` draws W and H first).

`choose_rank` runs, for k = 1..7: prior predictive matching (closed form, no fits),
cross-validation over held-out cells (PRESS), consensus clustering (cophenetic correlation),
RSS against column-permuted data, and bi-cross-validation. The fits of all criteria run on a
ProcessPoolExecutor with 2 workers.

choose_rank_cv.png: PRESS (median over 5 folds +/- a robust standard error; every fold a faint
point) and the training RSS.
Look at the training RSS, which falls at every rank, against PRESS, which is smallest at the
true rank 4 and rises after it: the extra components fit noise that does not predict the
held-out cells.

choose_rank_report.png: the dashboard of every criterion, each panel marking its suggestion
and the prior predictive estimate (dash-dot). Look at:

* cross-validation, bi-cross-validation and the randomized-RSS rule agree on 4;
* prior predictive matching costs nothing but is rough at this size (100 x 80): over ten
  seeds of this set-up its estimate ranged from 4.0 to 6.4 (it is 6.4 for this one);
* the cophenetic correlation measures how stable a clustering of the samples is, not the
  rank: uniform factors form no clusters, so its curve zigzags and its pick is luck (2, 4 or
  6 in trials with other seeds and run counts; see consensus_clusters.py for data with
  clusters). 10 runs per rank (Brunet et al. used 50) keep this example under a minute.

Run: ``python examples/choose_rank_cv.py`` (writes choose_rank_cv.png and
choose_rank_report.png next to itself).
"""

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, nmf_cv not installed
import nmf_cv  # noqa: E402

matplotlib.use("Agg")
SHAPE, TRUE_RANK, NOISE, MISSING, SEED = (100, 80), 4, 0.1, 0.15, 0
RANKS = range(1, 8)


def main():
    X = nmf_cv.make_planted(*SHAPE, TRUE_RANK, noise=NOISE, missing=MISSING, random_state=SEED)
    clean = nmf_cv.make_planted(*SHAPE, TRUE_RANK, random_state=SEED)  # same W, H, no noise
    noise_var = (NOISE * clean.mean()) ** 2
    missing = np.isnan(X).mean()
    print(f"X: {X.shape}, true rank {TRUE_RANK}, {missing:.1%} missing, "
          f"noise variance {noise_var:.4f}")

    start = time.perf_counter()
    with ProcessPoolExecutor(2) as executor:
        report = nmf_cv.choose_rank(
            X, RANKS, random_state=0, executor=executor, progress=False,
            prior_kwargs={"likelihood": "gaussian", "noise_var": noise_var},
            consensus_kwargs={"n_runs": 10})
    print(f"choose_rank: {time.perf_counter() - start:.1f} s\n")
    print(report)

    ax = nmf_cv.plot_cv(report.results["cv"])
    ax.set_title(f"Planted rank {TRUE_RANK}, {missing:.0%} missing: 5-fold cross-validation")
    ax.figure.savefig(HERE / "choose_rank_cv.png", dpi=100)
    fig = nmf_cv.plot_rank_report(report)
    fig.savefig(HERE / "choose_rank_report.png", dpi=100)
    plt.close("all")


if __name__ == "__main__":  # the worker processes import this file: keep the work out of them
    main()

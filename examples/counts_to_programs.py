"""From counts to programs: a recommended rank, then consensus components at it.

X (800 cells x 500 genes, about 70% zeros) is single-cell-like: 6 gene programs whose marker
genes overlap (they are drawn from one pool of 120 genes), cells of unequal type sizes that
each use one program mostly and others a little, lognormal library sizes, Poisson counts.

1. ``choose_rank`` with the Poisson criteria (held-out deviance, component stability over
   the cells, the prior predictive estimate) gives ``recommended_rank`` and says why.
2. ``fit_nmf(X, k, loss="kl", n_runs=20)`` fits 20 runs from random inits on resamples of
   the cells, matches their components, takes the median of each and polishes them on all
   cells: the programs, with each one's stability across the runs.

counts_to_programs.png: left, the held-out deviance against k; middle, each consensus
program's stability (the silhouette that `stability` reads against 0.7); right, the cosine
of each consensus program with each planted one.

Run: ``python examples/counts_to_programs.py`` (writes counts_to_programs.png next to it).
"""

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, nmf_cv not installed
import nmf_cv  # noqa: E402

matplotlib.use("Agg")
SEED, RANKS, PLANTED = 0, range(3, 10), 6


def programs_and_counts(seed, n_cells=800, n_genes=500, k=PLANTED, depth=300.0):
    """(counts CSR cells x genes, planted programs k x genes): overlapping programs."""
    rng = np.random.default_rng(seed)
    H = rng.gamma(0.3, 1.0, (k, n_genes)) * 0.5
    pool = rng.choice(n_genes, 120, replace=False)
    for t in range(k):
        markers = rng.choice(pool, 30, replace=False)
        H[t, markers] += rng.gamma(1.5, 1.0, 30)
    H /= H.sum(axis=1, keepdims=True)
    main_program = rng.choice(k, n_cells, p=rng.dirichlet(np.full(k, 3.0)))
    W = rng.dirichlet(np.full(k, 0.3), n_cells) * 0.4
    W[np.arange(n_cells), main_program] += 0.6
    W *= rng.lognormal(np.log(depth), 0.6, n_cells)[:, None]
    return sp.csr_matrix(rng.poisson(W @ H).astype(float)), H


def main():
    X, planted = programs_and_counts(SEED)
    zeros = 1.0 - X.nnz / (X.shape[0] * X.shape[1])
    print(f"X: {X.shape[0]} cells x {X.shape[1]} genes, {zeros:.0%} zeros; "
          f"planted {PLANTED} programs")
    with ProcessPoolExecutor(2) as pool:
        report = nmf_cv.choose_rank(
            X, RANKS, ("prior", "cv", "stability"), random_state=SEED, executor=pool,
            progress=False, cv_kwargs={"loss": "kl"},
            stability_kwargs={"loss": "kl", "axis": "rows", "n_runs": 10})
        print(report)
        k = report.recommended_rank or report.suggestions["cv"]
        res = nmf_cv.fit_nmf(X, k, loss="kl", n_runs=20, random_state=SEED, executor=pool)
    print(res)
    print("each program's stability:", np.round(res.component_stability, 3))
    unit = res.H / np.linalg.norm(res.H, axis=1, keepdims=True)
    truth = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    cosine = unit @ truth.T
    rows, cols = linear_sum_assignment(-cosine)
    print("matched cosine with the planted programs:", np.round(cosine[rows, cols], 4))

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    nmf_cv.plot_cv(report.results["cv"], ax=axes[0])
    axes[0].set_title(f"Held-out deviance: recommended k = {report.recommended_rank}",
                      fontsize=10)
    names = [f"{t + 1}" for t in range(k)]
    axes[1].bar(names, res.component_stability, color="C2")
    axes[1].axhline(0.7, color="C3", linestyle="--", label="stability's threshold (0.7)")
    axes[1].set_ylim(min(0.0, res.component_stability.min()) - 0.05, 1.05)
    axes[1].set_xlabel("consensus program (largest usage first)")
    axes[1].set_ylabel("silhouette over the runs")
    axes[1].set_title(f"Consensus of {res.n_runs_kept} of {res.n_runs} runs", fontsize=10)
    axes[1].legend(loc="lower left", fontsize=8)
    image = axes[2].imshow(cosine[:, cols[np.argsort(rows)]] if k == PLANTED else cosine,
                           vmin=0, vmax=1, cmap="viridis")
    axes[2].set_xlabel("planted program (matched order)")
    axes[2].set_ylabel("consensus program")
    axes[2].set_title("Cosine with the planted programs", fontsize=10)
    fig.colorbar(image, ax=axes[2])
    fig.tight_layout()
    fig.savefig(HERE / "counts_to_programs.png", dpi=100)
    plt.close("all")


if __name__ == "__main__":  # the worker processes import this file: keep the work out of them
    main()

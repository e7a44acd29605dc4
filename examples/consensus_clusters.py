"""Consensus clustering finds the number of sample groups (Brunet et al. 2004).

Three groups of 15 samples (the columns of X) each express their own "metagene": a block of
20 of the 60 genes (rows) that is 3 to 6 times higher in that metagene than elsewhere. A
sample loads mostly on its group's metagene (U(0.5, 1.5)) and a little on the others
(U(0, 0.3)), and its counts are Poisson around W @ H (about 3 on average), so the data are
non-negative and noisy. (The samples are in group order, but NMF and the clustering ignore
the order: the heatmaps are ordered by the dendrograms.)

`consensus` fits NMF 25 times from random inits at each rank k = 2..5 (KL multiplicative
updates, Brunet's choice for counts), assigns every sample to the component of its largest
loading in H, and counts how often two samples land together.

The figure shows the consensus matrices for k = 2..5, ordered by their average-linkage
dendrograms, with the true group of every sample as the colour strip above each heatmap, and
the cophenetic correlation and dispersion coefficient against k. Look at:

* k = 3: three clean dark blocks that match the colour strip, and cophenetic 1.000;
* k = 2: two of the groups are merged in some runs and not in others (pale off-diagonal
  blocks); k = 4, 5: real groups are split, differently from run to run, so blocks blur;
* the cophenetic correlation peaks at the true k = 3 and falls after it, which is Brunet's
  rule (``best_rank``). The drops are small, as usual (all values are near 1); the
  dispersion coefficient shows the same peak more sharply.

Run: ``python examples/consensus_clusters.py`` (writes consensus_clusters.png next to itself).
"""

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, nmf_cv not installed
import nmf_cv  # noqa: E402

matplotlib.use("Agg")
N_GROUPS, PER_GROUP, GENES_PER_GROUP, RANKS, N_RUNS = 3, 15, 20, range(2, 6), 25

rng = np.random.default_rng(0)
n_genes, n_samples = N_GROUPS * GENES_PER_GROUP, N_GROUPS * PER_GROUP
gene_group = np.repeat(np.arange(N_GROUPS), GENES_PER_GROUP)
group = np.repeat(np.arange(N_GROUPS), PER_GROUP)
W = np.where(gene_group[:, None] == np.arange(N_GROUPS), rng.uniform(3, 6, (n_genes, 1)), 1.0)
H = np.where(np.arange(N_GROUPS)[:, None] == group, rng.uniform(0.5, 1.5, n_samples),
             rng.uniform(0.0, 0.3, (N_GROUPS, n_samples)))
X = rng.poisson(W @ H).astype(float)
print(f"X: {X.shape} (genes x samples), {N_GROUPS} groups of {PER_GROUP} samples, "
      f"mean count {X.mean():.1f}")

co = nmf_cv.consensus(X, RANKS, n_runs=N_RUNS, random_state=0, progress=False)
print(f"\n{'k':>2}  {'cophenetic':>10}  {'dispersion':>10}")
for k, c, d in zip(co.ranks, co.cophenetic, co.dispersion, strict=True):
    print(f"{k:>2}  {c:10.4f}  {d:10.4f}")
print(f"best_rank (Brunet's rule): {co.best_rank}")

# Agreement of the consensus clusters at the best rank with the true groups: cut the
# consensus matrix's average-linkage tree into best_rank clusters.
from scipy.cluster.hierarchy import fcluster, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

C = co.consensus_matrices[co.best_rank]
found = fcluster(linkage(squareform(1.0 - C, checks=False), "average"), co.best_rank,
                 "maxclust")
exact = len(set(zip(found, group, strict=True))) == len(set(found)) == N_GROUPS
print(f"consensus clusters at k={co.best_rank} are exactly the true groups: {exact}")

fig = plt.figure(figsize=(19, 5.2), layout="constrained")
grid, curve = fig.subfigures(1, 2, width_ratios=[4, 1.1])
nmf_cv.plot_consensus_grid(co, labels=[f"group {chr(65 + g)}" for g in group], fig=grid)
ax = nmf_cv.plot_cophenetic(co, ax=curve.add_subplot())
ax.set_title(f"Stability against k ({N_RUNS} runs each)")
fig.savefig(HERE / "consensus_clusters.png", dpi=100)

"""Component stability across runs: which rank's components reproduce (as cNMF and NMFk).

X (400 x 64) is Hoyer's bars: 8 x 8 images, each the weighted sum of some of 16 bars (8
horizontal, 8 vertical), plus noise; samples are rows, so the components are H's rows, images
of 64 pixels (``axis="rows"``). ``stability`` fits each rank 20 times from random inits, each
run on a bootstrap resample of the images, pairs every run's components one to one with k
groups, and measures how well the groups separate: the silhouette of each group, under the
cosine distance.

component_stability.png, left: the worst group's silhouette (the rule's curve) and the mean
silhouette against k, with the runs' mean relative error on the right axis, as cNMF users
read it. Up to 16 components the bars come out the same in every run; at 17 one bar is split
in two in a different way in each run, and the worst group's silhouette drops below 0. The
rule takes the largest rank whose every component reproduces (worst silhouette >= 0.7): 16,
where the error has stopped falling. Right: the 16 consensus components (the groups' mean
components), one bar each.

Fixed data often have one optimum per rank, noise included: ``bootstrap=False`` (inits
only, what cNMF measures) reads high everywhere; resampling is what makes a component that
fits noise come out differently from run to run.

Run: ``python examples/component_stability.py`` (writes component_stability.png next to it).
"""

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, nmf_cv not installed
from bars_rank import bars  # noqa: E402  (the same bars, from the example beside this one)

import nmf_cv  # noqa: E402

matplotlib.use("Agg")
SEED, RANKS = 0, range(12, 20)


def main():
    X = bars(SEED)
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        result = nmf_cv.stability(X, RANKS, n_runs=20, axis="rows", random_state=SEED,
                                  executor=pool, progress=False)
    print(f"stability over k = {RANKS.start}..{RANKS.stop - 1}, 20 runs each: "
          f"{time.perf_counter() - start:.1f} s")
    for k, worst, mean, err in zip(result.ranks, result.min_silhouette, result.silhouette,
                                   result.error, strict=True):
        print(f"  k = {k:2d}: worst silhouette {worst:6.3f}, mean {mean:5.3f}, "
              f"relative error {err:.4f}")
    print(f"largest rank whose components all reproduce: {result.best_rank}")

    fig = plt.figure(figsize=(11, 4.2))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.2, 1])
    nmf_cv.plot_stability(result, ax=fig.add_subplot(grid[0]))
    nmf_cv.plot_components(result.components[result.best_rank], kind="rows", shape=(8, 8),
                           fig=fig.add_subfigure(grid[1]))
    fig.suptitle(f"Bars: components reproduce up to k = {result.best_rank}")
    fig.savefig(HERE / "component_stability.png", dpi=110, bbox_inches="tight")
    print(f"wrote {HERE / 'component_stability.png'}")


if __name__ == "__main__":
    main()

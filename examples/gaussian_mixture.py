"""Unmixing 16384 noisy mixtures of four Gaussian curves: HALS against multiplicative updates.

Four Gaussian bumps of length 512 (different centres and widths) are the true curves G (4 x
512). Each of 16384 samples mixes them with U(0, 1) amplitudes A, plus Gaussian noise of
standard deviation 0.02 (clipped at 0). Samples are rows: X = A @ G + noise is 16384 x 512,
so the curves are the rows of H and the amplitudes the columns of W.

Both methods run exactly 256 iterations from the default init (``"nndsvda"``), ``tol=0``.
The figure shows, for each method, the rows of H (solid) against the true curves (dashed,
matched and rescaled by `plot_components`; each row of H is scaled to peak 1, since NMF fixes
no scale), and the objective 1/2 RSS of both fits against wall time, with the noise floor
1/2 ||noise||^2, the objective of the true mixture A @ G. Look at:

* the iterations cost about the same in both methods (the two products with X dominate), so
  the curves' horizontal extents match;
* HALS reaches the noise floor in a few dozen iterations; MU is still above it after 256;
* both recover the four curves well (cosine similarity >= 0.99): MU is slower, not wrong.

Run: ``python examples/gaussian_mixture.py`` (writes gaussian_mixture.png next to itself).
"""

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout, nmf_cv not installed
import nmf_cv  # noqa: E402

matplotlib.use("Agg")
N_SAMPLES, LENGTH, ITERATIONS, NOISE = 16384, 512, 256, 0.02

rng = np.random.default_rng(0)
channel = np.arange(LENGTH)
G = np.array([np.exp(-0.5 * ((channel - centre) / width) ** 2)
              for centre, width in ((100, 25), (200, 40), (290, 20), (400, 50))])
A = rng.random((N_SAMPLES, len(G)))
clean = A @ G
X = np.maximum(clean + NOISE * rng.standard_normal(clean.shape), 0.0)
floor = 0.5 * float(np.sum((X - clean) ** 2))
print(f"X: {X.shape} (samples x channels); noise floor: relative error "
      f"{np.sqrt(2 * floor / np.sum(X ** 2)):.4f}")

for method in ("hals", "mu"):  # compile the numba kernels first, so the timings are the solvers'
    nmf_cv.fit_nmf(X[:100], 4, method=method, max_iter=2)
fits = {method: nmf_cv.fit_nmf(X, 4, method=method, tol=0, max_iter=ITERATIONS, random_state=0)
        for method in ("hals", "mu")}


def cosines(H, true):
    """Cosine similarity of each true curve with its best-matching row of H."""
    unit = lambda M: M / np.linalg.norm(M, axis=1, keepdims=True)  # noqa: E731
    return (unit(true) @ unit(H).T).max(axis=1)


fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
print(f"\n{'method':>6}  {'seconds':>7}  {'rel. error':>10}  {'iter. to floor +1%':>18}  "
      "cosine with each true curve")
for ax, (method, res) in zip(axes[:2], fits.items(), strict=True):
    nmf_cv.plot_components(res.H / res.H.max(axis=1, keepdims=True), kind="rows", true=G,
                           ax=ax)
    ax.set_xlabel("channel")
    ax.set_ylabel("loading / peak")
    ax.set_ylim(-0.03, 1.4)  # room above the peaks for the legend
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.legend(handles=ax.get_legend().legend_handles, loc="upper center", ncols=3,
              fontsize="small")
    ax.set_title(f"{method.upper()}, {res.n_iter} iterations: rows of H (peak 1)")
    near = np.flatnonzero(res.loss_history <= 1.01 * floor)
    reached = str(near[0]) if len(near) else f"> {res.n_iter}"
    print(f"{method:>6}  {res.time:7.2f}  {res.relative_error:10.4f}  {reached:>18}  "
          + " ".join(f"{c:.3f}" for c in cosines(res.H, G)))

ax = nmf_cv.plot_loss({m.upper(): res for m, res in fits.items()}, x="time", ax=axes[2])
ax.axhline(floor, color="0.4", linestyle=":", label="noise floor 1/2 ||noise||^2")
ax.legend(fontsize="small")
ax.set_ylabel("objective 1/2 RSS")
# plot_loss's plain log labels mix styles at this scale ("1e+05" next to "1e4"): use
# matplotlib's usual 10^k labels instead.
ax.yaxis.set_major_formatter(LogFormatterSciNotation())
ax.yaxis.set_minor_formatter(NullFormatter())
ax.set_title(f"Objective against time ({ITERATIONS} iterations each)")
fig.savefig(HERE / "gaussian_mixture.png", dpi=100)

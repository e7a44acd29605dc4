"""Convergence on an exact rank-5 matrix: slow near the boundary, so pick the method and the stop.

X = L @ K @ R with L (50 x 5), K (5 x 5) and R (5 x 100) random integers 0..10 is an exactly
rank-5 non-negative matrix, so an exact NMF (W = L K, H = R) exists. About one entry in ten of
L and R is 0: the exact solution lies on the boundary of the non-negative orthant, where the
updates take ever smaller steps and convergence is sublinear rather than geometric.

HALS, multiplicative updates (MU) and GDCLS run with ``tol=0`` (a fixed number of iterations).
The figure shows the relative error ||X - WH||_F / ||X||_F against the iteration (left) and
the wall time (right), both on log-log axes. Look at:

* the shapes: no curve falls geometrically (a straight line on a log-linear plot); each
  creeps along plateaus, a decade of error costing a decade or more of iterations;
* HALS reaches 1e-3 after about a thousand iterations (a tenth of a second); GDCLS needs
  over 30000 iterations, and MU has not got there after 50000;
* ``tol`` tests the objective's relative decrease in one iteration, which measures progress,
  not accuracy: with ``tol=1e-4`` MU "converges" at a relative error of 5e-3, while HALS runs
  on to 1e-4, 16 times longer than needed for 1e-3. Stop on the relative error you need
  instead (a ``callback``, as below).

Run: ``python examples/convergence_rank5.py`` (writes convergence_rank5.png next to itself).
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
ITERATIONS = {"hals": 20_000, "mu": 50_000, "gdcls": 50_000}
TARGET = 1e-3  # relative error we want

rng = np.random.default_rng(0)
L, K, R = (rng.integers(0, 11, shape) for shape in ((50, 5), (5, 5), (5, 100)))
X = (L @ K @ R).astype(float)
norm2 = float(np.sum(X ** 2))
print(f"X: {X.shape}, rank {np.linalg.matrix_rank(X)}, "
      f"zeros in L and R: {np.mean(L == 0):.0%}, {np.mean(R == 0):.0%}")

for method in ITERATIONS:  # compile the numba kernels first, so the timings are the solvers'
    nmf_cv.fit_nmf(X, 5, method=method, max_iter=2)
fits = {m: nmf_cv.fit_nmf(X, 5, method=m, tol=0, max_iter=n, random_state=0)
        for m, n in ITERATIONS.items()}

fig, (ax_it, ax_t) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
print(f"\n{'method':>6}  {'iterations':>10}  {'seconds':>7}  {'final rel. error':>16}  "
      f"first reaching {TARGET:g}")
for method, res in fits.items():
    # loss_history is the objective 1/2 RSS (no penalty here), so the relative error after
    # each iteration is sqrt(2 * loss / ||X||^2). Iteration 0 (the init) is left off the
    # log axis.
    rel = np.sqrt(2.0 * res.loss_history / norm2)
    its = np.arange(len(rel))
    ax_it.loglog(its[1:], rel[1:], label=method.upper())
    ax_t.loglog(res.time_history[1:], rel[1:], label=method.upper())
    hit = np.flatnonzero(rel < TARGET)
    first = (f"iteration {hit[0]} at {res.time_history[hit[0]]:.2f} s" if len(hit)
             else "never")
    print(f"{method:>6}  {res.n_iter:>10}  {res.time:7.2f}  {res.relative_error:16.2e}  {first}")

for ax, xlabel in ((ax_it, "iteration"), (ax_t, "time (s)")):
    ax.axhline(TARGET, color="0.5", linestyle=":", linewidth=1, label=f"target {TARGET:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative error  ||X - WH|| / ||X||")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
ax_it.set_title("Exact rank-5 integer matrix (50 x 100): error per iteration")
ax_t.set_title("... and per second")
fig.savefig(HERE / "convergence_rank5.png", dpi=100)


# The practical stopping rule: stop once the relative error is small enough.
def stop_below(target):
    def callback(n_iter, W, H, objective):
        return np.sqrt(2.0 * objective / norm2) < target
    return callback


res = nmf_cv.fit_nmf(X, 5, method="hals", tol=0, max_iter=100_000, random_state=0,
                     callback=stop_below(TARGET))
print(f"\nHALS stopped by the callback at relative error < {TARGET:g}: "
      f"{res.n_iter} iterations, {res.time:.2f} s, relative error {res.relative_error:.2e}")
for method in ITERATIONS:
    res = nmf_cv.fit_nmf(X, 5, method=method, tol=1e-4, max_iter=100_000, random_state=0)
    state = "converged" if res.converged else "not converged"
    print(f"{method.upper():>5} stopped by tol=1e-4 instead: {state} after {res.n_iter} "
          f"iterations, relative error {res.relative_error:.2e}")

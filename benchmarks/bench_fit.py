"""Benchmark nmf_cv's dense and masked fits against scikit-learn's NMF.

Prints markdown tables (with a machine and version header) to stdout; progress goes to
stderr. Run from the repository root::

    python benchmarks/bench_fit.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_fit.py --quick    # smallest shape only, a smoke test
    python benchmarks/bench_fit.py --blas-threads 1   # pin BLAS (e.g. on a busy machine)

Timings are wall-clock: run it on an otherwise idle machine. The header records the load
average at the start and end of the run.

What is measured
----------------
All comparisons run in one process on identical data, ``make_planted(m, n, k, noise=0.05,
random_state=0)``, from an identical initial ``(W, H)``: nmf_cv's NNDSVDa init, passed as
``init=(W, H)`` to nmf_cv and as ``init="custom"`` to ``sklearn.decomposition.NMF``. Every
nmf_cv method is called once beforehand, so numba compilation is not timed.

1. Time per iteration. nmf_cv (``hals``, ``mu``, ``gdcls``): ``tol=0`` and a fixed
   ``max_iter``; the mean of the ``time_history`` differences, leaving out the first
   iteration. scikit-learn (``cd``, ``mu``): ``tol=0`` and the same ``max_iter``; wall time
   of ``fit_transform`` divided by ``n_iter_`` (so its input checks and final error are
   spread over the iterations). Median over repeats.
2. Time to a target relative error ``||X - WH||_F / ||X||_F``. The target is the error
   scikit-learn reaches at its default ``tol`` (``max_iter=1000``); its time is the wall
   time of that fit. nmf_cv's time is the ``time_history`` entry of the first iteration
   whose objective gives an error at or below the target (``rel = sqrt(2 loss) / ||X||``,
   exact for dense, unpenalised Frobenius fits; the fit is stopped there by a callback).
   nmf_cv ``hals`` is compared with scikit-learn ``cd``, and nmf_cv ``mu`` with
   scikit-learn ``mu``. Median over repeats.
3. Cost of missing values. 10% of the cells set to NaN (seed 1) against the dense matrix,
   same shape and init, dense and masked fits alternating: the median time of one iteration
   after the first few, and, because
   nmf_cv's HALS runs a variable number of inner sweeps per iteration, also the time each
   fit takes to reach the error of the dense fit after N iterations (errors are over the
   observed cells).
5. KL (counts): coordinate descent (``method="cd"``, the KL default) against multiplicative
   updates, nmf_cv's and scikit-learn's (``solver="mu", beta_loss="kullback-leibler"``),
   on Poisson counts from gamma factors, from the same NNDSVDa init, dense and CSR. Targets:
   the objective that 1000 nmf_cv MU iterations reach (``tol=0``), and scikit-learn MU's
   final objective at its defaults (``tol=1e-4``, ``max_iter=1000``; its
   ``reconstruction_err_ ** 2 / 2``). nmf_cv CD's time is that of the first iteration at or
   below each target (stopped there by a callback). One run each.
4. First-call (numba compile or cache load) time, in fresh subprocesses whose
   ``NUMBA_CACHE_DIR`` is a new, empty directory (cold), then again with the directory the
   cold run filled (warm): the first dense float64 fit, the first masked fit and the first
   float32 fit, each timed on its own. The subprocesses import a snapshot of nmf_cv.py (so
   edits made during the run cannot invalidate the cache) and use single-threaded BLAS.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

ROOT = Path(__file__).resolve().parent.parent
from _common import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    blas_description,
    cpu_model,
    git_revision,
    load_average,
    log,
    markdown_table,
    ms,
    ratio,
    sec,
)

try:
    import nmf_cv
except ImportError:
    sys.path.insert(0, str(ROOT))
    import nmf_cv

FULL_SHAPES = ((200, 100, 5), (1000, 500, 10), (5000, 1000, 20))
QUICK_SHAPES = FULL_SHAPES[:1]
# Iterations and repeats per shape (by number of rows) for the per-iteration timings.
PER_ITER_PLAN = {200: (200, 5), 1000: (100, 5), 5000: (30, 3)}
MASKED_PLAN = {200: (200, 5), 1000: (100, 5), 5000: (40, 3)}
TARGET_REPEATS = 3
MISSING = 0.1
SKIP_FIRST = 5  # iterations left out of the masked/dense median
LOOSE = 1.01  # second, looser target for the masked/dense time to error
COLD_RUNS, WARM_RUNS = 2, 3  # first-call subprocesses
# In the first-call subprocesses only: a 2-thread OpenBLAS on a busy 2-core machine can stall
# for a second or more on tiny products, which would swamp the compile and cache-load times.
SINGLE_THREAD_BLAS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                      "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# Machine description and markdown output
# ---------------------------------------------------------------------------------------------

def machine_header(load_at_start):
    import numba
    import scipy
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"Machine: nproc={os.cpu_count()}, CPU {cpu_model()}, BLAS {blas_description()}; "
            f"python {platform.python_version()}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}, numba {numba.__version__}, "
            f"scikit-learn {sklearn.__version__}; nmf_cv {nmf_cv.__version__} "
            f"(git {git_revision()}); {now}; load average (1/5/15 min) {load_at_start} at "
            f"start, {load_average()} at end")


def shape_label(shape):
    m, n, k = shape
    return f"{m}x{n} k={k}"


# ---------------------------------------------------------------------------------------------
# Data and fits
# ---------------------------------------------------------------------------------------------

def planted(shape):
    """Planted matrix and nmf_cv's NNDSVDa init for it."""
    m, n, k = shape
    X = nmf_cv.make_planted(m, n, k, noise=0.05, random_state=0)
    W, H = nmf_cv._initialize(nmf_cv._validate_data(X), k, "nndsvda", np.random.default_rng(0))
    return X, W, H


def with_missing(X, fraction=MISSING, seed=1):
    Xm = X.copy()
    Xm[np.random.default_rng(seed).random(X.shape) < fraction] = np.nan
    return Xm


def fit_ours(X, W, H, method, max_iter, tol=0.0, callback=None):
    return nmf_cv.fit_nmf(X, W.shape[1], method=method, init=(W.copy(), H.copy()),
                          max_iter=max_iter, tol=tol, callback=callback)


def fit_sklearn(X, W, H, solver, max_iter, tol):
    """Returns (wall seconds, n_iter_, relative error)."""
    est = NMF(n_components=W.shape[1], solver=solver, init="custom", max_iter=max_iter,
              tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        est.fit_transform(X, W=W.copy(), H=H.copy())
        wall = time.perf_counter() - start
    return wall, est.n_iter_, est.reconstruction_err_ / np.linalg.norm(X)


def rel_history(res, X):
    """Relative error after each iteration, over observed cells, from the objective."""
    observed = X[~np.isnan(X)]
    return np.sqrt(2.0 * np.maximum(res.loss_history, 0.0) / np.dot(observed, observed))


FROBENIUS_METHODS = ("hals", "mu", "gdcls")


def warm_up():
    """Compile every kernel the benchmark uses (dense and masked, all methods)."""
    X, W, H = planted((60, 40, 3))
    for data in (X, with_missing(X)):
        for method in FROBENIUS_METHODS:
            fit_ours(data, W, H, method, max_iter=3)
    counts = np.round(X)
    for data in (counts, sp.csr_matrix(counts)):
        for method in ("cd", "mu"):
            nmf_cv.fit_nmf(data, 3, loss="kl", method=method, max_iter=3)
    for solver in ("cd", "mu"):
        fit_sklearn(X, W, H, solver, max_iter=3, tol=0.0)


# ---------------------------------------------------------------------------------------------
# 1. Time per iteration
# ---------------------------------------------------------------------------------------------

def ours_per_iter(X, W, H, method, n_iter):
    res = fit_ours(X, W, H, method, n_iter)
    return float(np.mean(np.diff(res.time_history)[1:])), res.relative_error


def sklearn_per_iter(X, W, H, solver, n_iter):
    wall, done, rel = fit_sklearn(X, W, H, solver, n_iter, tol=0.0)
    return wall / done, rel


def per_iteration_row(shape):
    X, W, H = planted(shape)
    n_iter, repeats = PER_ITER_PLAN[shape[0]]
    runs = [(ours_per_iter, m) for m in FROBENIUS_METHODS]
    runs += [(sklearn_per_iter, s) for s in ("cd", "mu")]
    times, errors = [], []
    for fn, name in runs:
        samples = [fn(X, W, H, name, n_iter) for _ in range(repeats)]
        times.append(float(np.median([t for t, _ in samples])))
        errors.append(samples[0][1])
    hals, _, _, cd, sk_mu = times
    timing = [shape_label(shape), n_iter] + [ms(t) for t in times]
    timing += [ratio(hals, cd), ratio(times[1], sk_mu)]
    return timing, [shape_label(shape), n_iter] + [f"{e:.4f}" for e in errors]


def bench_per_iteration(shapes):
    log("1. time per iteration")
    timing, errors = zip(*(per_iteration_row(s) for s in shapes), strict=True)
    names = ["nmf_cv hals", "nmf_cv mu", "nmf_cv gdcls", "sklearn cd", "sklearn mu"]
    out = ["## 1. Time per iteration (ms, median over repeats)", "",
           markdown_table(["shape", "iters"] + names + ["hals/cd", "mu/sk mu"], timing), "",
           "Relative error after those iterations (same runs, tol=0):", "",
           markdown_table(["shape", "iters"] + names, errors)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# 2. Time to reach scikit-learn's default-tol error
# ---------------------------------------------------------------------------------------------

def ours_time_to(X, W, H, method, target, give_up):
    """(seconds, iterations) until nmf_cv first reaches ``target``; NaN if it gives up."""
    goal = 0.5 * target ** 2 * float(np.dot(X.ravel(), X.ravel()))
    start = time.perf_counter()

    def stop(n_iter, W, H, objective):
        return objective <= goal or time.perf_counter() - start > give_up

    res = fit_ours(X, W, H, method, max_iter=100_000, callback=stop)
    hit = np.flatnonzero(rel_history(res, X) <= target)
    if hit.size == 0:
        return math.nan, res.n_iter
    return float(res.time_history[hit[0]]), int(hit[0])


def time_to_target_row(shape, ours, solver):
    X, W, H = planted(shape)
    sk = [fit_sklearn(X, W, H, solver, max_iter=1000, tol=1e-4) for _ in range(TARGET_REPEATS)]
    sk_time = float(np.median([s[0] for s in sk]))
    _, sk_iter, target = sk[0]
    give_up = max(20.0 * sk_time, 5.0)
    mine = [ours_time_to(X, W, H, ours, target, give_up) for _ in range(TARGET_REPEATS)]
    my_time = float(np.median([t for t, _ in mine]))
    return [shape_label(shape), f"{target:.5f}", sk_iter, sec(sk_time), mine[0][1],
            sec(my_time), ratio(my_time, sk_time)]


def bench_time_to_target(shapes):
    out = ["## 2. Time to reach scikit-learn's default-tol relative error", ""]
    for ours, solver in (("hals", "cd"), ("mu", "mu")):
        log(f"2. time to target: nmf_cv {ours} vs sklearn {solver}")
        rows = [time_to_target_row(s, ours, solver) for s in shapes]
        headers = ["shape", "target rel. error", f"sklearn {solver} iters",
                   f"sklearn {solver} s", f"nmf_cv {ours} iters", f"nmf_cv {ours} s",
                   "nmf_cv/sklearn"]
        out += [f"nmf_cv {ours} vs sklearn {solver} (default tol=1e-4, max_iter=1000):", "",
                markdown_table(headers, rows), ""]
    return "\n".join(out).rstrip()


# ---------------------------------------------------------------------------------------------
# 3. Cost of missing values
# ---------------------------------------------------------------------------------------------

def steady_iter_time(res):
    return float(np.median(np.diff(res.time_history)[SKIP_FIRST:]))


def time_to_rel(X, W, H, method, target, max_iter):
    """(seconds, iterations) of the first iteration at or below ``target``; NaN if none."""
    observed = X[~np.isnan(X)]
    goal = 0.5 * target ** 2 * float(np.dot(observed, observed))
    res = fit_ours(X, W, H, method, max_iter, callback=lambda i, W, H, f: f <= goal)
    hit = np.flatnonzero(rel_history(res, X) <= target)
    if hit.size == 0:
        return math.nan, math.nan
    return float(res.time_history[hit[0]]), int(hit[0])


def masked_row(shape, method):
    X, W, H = planted(shape)
    Xm = with_missing(X)
    n_iter, repeats = MASKED_PLAN[shape[0]]
    dense, masked = [], []
    for _ in range(repeats):  # interleaved, so that drifts in machine speed hit both alike
        dense.append(fit_ours(X, W, H, method, n_iter))
        masked.append(fit_ours(Xm, W, H, method, n_iter))
    t_dense = float(np.median([steady_iter_time(r) for r in dense]))
    t_masked = float(np.median([steady_iter_time(r) for r in masked]))
    target = float(rel_history(dense[0], X)[-1])
    rel_masked = float(rel_history(masked[0], Xm)[-1])
    row = [shape_label(shape), method, n_iter, ms(t_dense), ms(t_masked),
           ratio(t_masked, t_dense), f"{target:.5f}", f"{rel_masked:.5f}"]
    for goal in (target, LOOSE * target):
        row += reach_cells(X, Xm, W, H, method, goal, n_iter, repeats)
    return row


def reach_cells(X, Xm, W, H, method, goal, n_iter, repeats):
    """Table cells 'iters / s' for dense and masked fits to reach ``goal``, and their ratio."""
    cells, times = [], []
    for A in (X, Xm):
        runs = [time_to_rel(A, W, H, method, goal, 10 * n_iter) for _ in range(repeats)]
        times.append(float(np.median([t for t, _ in runs])))
        cells.append(f"{runs[0][1]} / {sec(times[-1])}")
    return cells + [ratio(times[1], times[0])]


def bench_masked(shapes):
    log("3. masked vs dense")
    rows = [masked_row(s, method) for s in shapes for method in ("hals", "mu")]
    headers = ["shape", "method", "N", "dense ms/iter", "masked ms/iter", "masked/dense",
               "dense rel. err after N (E)", "masked rel. err after N",
               "dense iters / s to E", "masked iters / s to E", "masked/dense time to E",
               f"dense iters / s to {LOOSE} E", f"masked iters / s to {LOOSE} E",
               f"masked/dense time to {LOOSE} E"]
    note = (f"Per-iteration time: median over iterations {SKIP_FIRST + 1}..N, then median "
            "over repeats. Time to error: first iteration at or below the dense fit's error "
            "after N iterations (masked errors over observed cells; masked fits capped at "
            f"10 N iterations). {LOOSE} E is a looser target, away from the plateau where "
            "the masked fit, which has fewer cells to fit, gets a lower in-sample error.")
    return "\n".join([f"## 3. Missing values ({MISSING:.0%} NaN, seed 1) vs dense", "", note,
                      "", markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# 5. KL: coordinate descent against multiplicative updates
# ---------------------------------------------------------------------------------------------

KL_CASES = (("dense", 2000, 1000, 10, 0.5), ("csr", 2000, 1000, 10, 0.5),
            ("csr", 20000, 2000, 10, 0.08))
QUICK_KL_CASES = (("dense", 300, 200, 5, 0.5), ("csr", 300, 200, 5, 0.5))
KL_MU_ITERS = 1000


def poisson_counts(m, n, k, mean, seed=0):
    """Poisson counts of mean ``mean`` from gamma(0.5) factors, made a block of rows at a
    time (CSR), so the 20000 x 2000 case needs no dense m x n rate matrix."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(0.5, 1.0, (m, k))
    H = rng.gamma(0.5, 1.0, (k, n))
    scale = mean / (W.mean(axis=0) @ H.mean(axis=1))
    blocks = [sp.csr_matrix(rng.poisson(scale * (W[lo:lo + 2000] @ H)).astype(float))
              for lo in range(0, m, 2000)]
    return sp.vstack(blocks, format="csr")


def kl_objective(X, W, H):
    """sum x log(x / wh) - x + wh over all cells, from the stored entries (CSR X)."""
    X = sp.csr_matrix(X)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    wh = np.einsum("ij,ij->i", W[rows], H[:, X.indices].T)
    x = X.data
    return float(np.sum(x * np.log(x / wh)) - x.sum() + W.sum(axis=0) @ H.sum(axis=1))


def kl_time_to(X, W, H, goal, give_up, extrapolate=False):
    """(seconds, iterations) for nmf_cv CD to reach objective ``goal``; NaN if it gives up."""
    start = time.perf_counter()

    def stop(n_iter, W, H, objective):
        return objective <= goal or time.perf_counter() - start > give_up

    res = nmf_cv.fit_nmf(X, W.shape[1], loss="kl", method="cd", init=(W.copy(), H.copy()),
                         max_iter=100_000, tol=0, callback=stop, extrapolate=extrapolate)
    hit = np.flatnonzero(res.loss_history <= goal)
    if hit.size == 0:
        return math.nan, res.n_iter
    return float(res.time_history[hit[0]]), int(hit[0])


def kl_row(case):
    kind, m, n, k, mean = case
    X = poisson_counts(m, n, k, mean)
    data = X.toarray() if kind == "dense" else X
    W, H = nmf_cv._initialize(nmf_cv._validate_data(data), k, "nndsvda",
                              np.random.default_rng(0))
    log(f"5. KL {kind} {m}x{n} k={k}: nmf_cv mu x {KL_MU_ITERS}")
    mu = nmf_cv.fit_nmf(data, k, loss="kl", method="mu", init=(W.copy(), H.copy()),
                        max_iter=KL_MU_ITERS, tol=0)
    mu_goal, mu_time = float(mu.loss_history[-1]), float(mu.time_history[-1])
    cd_time, cd_iter = kl_time_to(data, W, H, mu_goal, 5 * mu_time)
    log("   cd, extrapolated")
    ex_time, ex_iter = kl_time_to(data, W, H, mu_goal, 5 * mu_time, extrapolate=True)
    log("   sklearn mu")
    est = NMF(n_components=k, solver="mu", beta_loss="kullback-leibler", init="custom",
              max_iter=1000, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        Wsk = est.fit_transform(data, W=W.copy(), H=H.copy())
        sk_time = time.perf_counter() - start
    sk_goal = kl_objective(X, Wsk, est.components_)
    cd_sk_time, cd_sk_iter = kl_time_to(data, W, H, sk_goal, 5 * sk_time)
    ex_sk_time, ex_sk_iter = kl_time_to(data, W, H, sk_goal, 5 * sk_time, extrapolate=True)
    return [f"{kind} {m}x{n} k={k}", f"{X.nnz / (m * n):.1%}", sec(mu_time),
            f"{cd_iter} / {sec(cd_time)}", ratio(cd_time, mu_time),
            f"{ex_iter} / {sec(ex_time)}", ratio(ex_time, mu_time),
            f"{est.n_iter_} / {sec(sk_time)}", f"{cd_sk_iter} / {sec(cd_sk_time)}",
            ratio(cd_sk_time, sk_time), f"{ex_sk_iter} / {sec(ex_sk_time)}",
            ratio(ex_sk_time, sk_time)]


def bench_kl(cases):
    rows = [kl_row(case) for case in cases]
    headers = ["data", "stored", f"nmf_cv mu {KL_MU_ITERS} iters s",
               "nmf_cv cd iters / s to it", "cd/mu", "cd extrapolated iters / s", "cd ex./mu",
               "sklearn mu iters / s", "nmf_cv cd iters / s to it", "cd/sklearn",
               "cd extrapolated iters / s", "cd ex./sklearn"]
    note = ("Poisson counts from gamma(0.5) factors of the same rank; time for nmf_cv's "
            "coordinate descent (`fit_nmf`'s default, and with `extrapolate=True`, as "
            "cross-validation fits) to reach the objective of 1000 nmf_cv MU iterations, and "
            "scikit-learn MU's final objective at its defaults, from the same init.")
    return "\n".join(["## 5. KL: coordinate descent vs multiplicative updates", "", note, "",
                      markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# 4. First-call (compile) time
# ---------------------------------------------------------------------------------------------

FIRST_CALL_SCRIPT = """
import json, time
t0 = time.perf_counter()
import numpy as np
import nmf_cv
out = {"import": time.perf_counter() - t0}
X = nmf_cv.make_planted(300, 200, 3, noise=0.05, random_state=0)
Xm = nmf_cv.make_planted(300, 200, 3, noise=0.05, missing=0.1, random_state=0)
X32 = X.astype(np.float32)
for name, data in (("dense", X), ("masked", Xm), ("float32", X32)):
    t = time.perf_counter()
    nmf_cv.fit_nmf(data, 3, max_iter=5)
    out[name] = time.perf_counter() - t
out["total"] = time.perf_counter() - t0
out["module"] = nmf_cv.__file__
print(json.dumps(out))
"""


def first_call_times(module_dir, cache_dir):
    """Run FIRST_CALL_SCRIPT in a new interpreter importing nmf_cv from ``module_dir``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **SINGLE_THREAD_BLAS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(module_dir), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT], cwd=module_dir, env=env,
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(out["module"]).parent != Path(module_dir):
        raise RuntimeError(f"subprocess imported {out['module']}, not the snapshot")
    return out


def bench_first_call():
    log("4. first-call times (subprocesses)")
    # A snapshot of the module: numba's cache is keyed on the source file's path and mtime,
    # so edits to nmf_cv.py during the run would otherwise turn warm runs cold.
    snapshot = Path(tempfile.mkdtemp(prefix="nmf_cv_snapshot_"))
    shutil.copy2(nmf_cv.__file__, snapshot / "nmf_cv.py")
    dirs = [Path(tempfile.mkdtemp(prefix="nmf_cv_numba_cache_")) for _ in range(COLD_RUNS)]
    try:
        runs = [(f"cold {i + 1} (new empty dir)", first_call_times(snapshot, d))
                for i, d in enumerate(dirs)]
        runs += [(f"warm {i + 1} (dir of cold 1)", first_call_times(snapshot, dirs[0]))
                 for i in range(WARM_RUNS)]
    finally:
        for d in [snapshot, *dirs]:
            shutil.rmtree(d, ignore_errors=True)
    keys = ["import", "dense", "masked", "float32", "total"]
    rows = [[label] + [sec(r[k]) for k in keys] for label, r in runs]
    headers = ["NUMBA_CACHE_DIR", "import nmf_cv s", "1st dense fit s", "1st masked fit s",
               "1st float32 fit s", "process total s"]
    note = ("Each fit is the first of its kind in the process (hals, default init). The "
            "first numba function called in a process also pays for numba's own one-time "
            "set-up, cache or not. BLAS is limited to one thread in these subprocesses.")
    return "\n".join(["## 4. First-call time (fresh subprocess, 300x200 k=3, max_iter=5)", "",
                      note, "", markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smallest shape only (a smoke test)")
    parser.add_argument("--only", choices=("kl",), default=None,
                        help="run one section only")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="limit BLAS threads in this process (default: BLAS's own)")
    args = parser.parse_args(argv)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.blas_threads, user_api="blas")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    start = time.perf_counter()
    load_at_start = load_average()
    log("warm-up (numba compile)")
    warm_up()
    kl_cases = QUICK_KL_CASES if args.quick else KL_CASES
    if args.only == "kl":
        sections = [bench_kl(kl_cases)]
    else:
        sections = [bench_per_iteration(shapes), bench_time_to_target(shapes),
                    bench_masked(shapes), bench_first_call(), bench_kl(kl_cases)]
    print("# nmf_cv fit benchmarks" + (" (--quick)" if args.quick else ""))
    print()
    print(machine_header(load_at_start))
    print()
    print("Data: `make_planted(m, n, k, noise=0.05, random_state=0)`; both libraries start "
          "from nmf_cv's NNDSVDa (W, H).")
    for section in sections:
        print()
        print(section)
    print()
    print(f"Benchmark wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

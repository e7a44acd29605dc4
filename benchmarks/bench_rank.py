"""Benchmark nmf_cv's rank selection: cross-validation and consensus clustering against peers.

Prints markdown tables (with a machine and version header) to stdout; progress goes to
stderr. Run from the repository root::

    python benchmarks/bench_rank.py                # full run, about 45 minutes on 2 cores
    python benchmarks/bench_rank.py --quick        # small data, few runs: a smoke test (<1 min)
    python benchmarks/bench_rank.py --runs 50      # consensus restarts per rank (default 20)
    python benchmarks/bench_rank.py --no-wait      # skip the wait for an idle machine

Timings are wall-clock, in one process on identical data. Before each section a full run
waits (30 s at a time, 10 minutes at most) for the 1-minute load average to fall to 0.5 or
below. The header records the load at the start and end of the measurements, each section
its own load at start, and each timing the CPU time other processes took meanwhile (from
/proc/stat): a check that the rest of the machine did not disturb it.

What is measured
----------------
1. ``nmf_cv.cross_validate(X, range(1, 11), n_folds=5, random_state=0)`` on
   ``X = make_planted(1000, 500, 5, noise=0.1, random_state=0)`` (default fits: HALS,
   ``max_iter=2000, tol=1e-6``): serially, and with a ``ProcessPoolExecutor(2)``; each
   with OpenBLAS's default threads, and with BLAS limited to one thread by ``threadpoolctl``
   (around the serial call; in the worker initializer for the pool). Pool start-up is inside
   the timing.
2. Consensus clustering on the Brunet et al. (2004) medulloblastoma data (5893 genes x 34
   samples, ``../shared/data/medulloblastoma``): ranks 2..5, ``--runs`` random restarts per
   rank, KL multiplicative updates (Brunet's), exactly 500 iterations per fit, samples
   clustered by the argmax of each column of H, cophenetic correlation of the consensus
   matrix. Implementations:

   - ``nmf_cv.consensus(X, ranks, n_runs=N, max_iter=500, tol=0, random_state=0)``, serially
     (default BLAS threads, and one BLAS thread) and with a ``ProcessPoolExecutor(2)`` (one
     BLAS thread per worker);
   - nmf-rs (``nmf_rs.nmf(X, k, method="brunet", seed=s, max_iter=500)``; Rust, GPL,
     benchmark only), consensus and cophenetic computed here with nmf_cv's functions;
   - plain numpy KL multiplicative updates written below (the floor any compiled code should
     beat), same bookkeeping. It draws its inits like nmf_cv (same spawned seeds, same
     uniform formula), so it follows nmf_cv's trajectories and its cophenetic values should
     equal nmf_cv's: a check of nmf_cv's KL updates as well as a timing;
   - nimfa 1.4.0 (``nimfa.Nmf(V, seed="random", rank=k, update="divergence",
     objective="div", max_iter=500, n_run=N, track_factor=True, min_residuals=None)``, then
     its own ``consensus()`` and ``coph_cor()``), in a subprocess of a separate virtual
     environment with numpy<2 (nimfa uses ``np.mat``), by default ``/tmp/nimfa_venv``::

         python3 -m venv /tmp/nimfa_venv
         /tmp/nimfa_venv/bin/pip install "numpy<2" "scipy<1.14" nimfa

     Skipped with a note when that interpreter is absent. nimfa evaluates its objective every
     iteration (its default) and seeds each run from its own unseeded RandomState, so its
     cophenetic values change from one benchmark run to the next.

   nmf-rs and nimfa draw their own inits, so their cophenetic values agree with nmf_cv's
   only up to the sampling noise of N restarts. 20 restarts (not 50) keep the full run's
   consensus part near 20 minutes, nimfa alone taking about 10.
3. Cost of one dense KL iteration on the medulloblastoma data, by part: nmf_cv's per-iteration
   time from ``time_history`` (median), its BLAS products and its ``X / WH`` pass with and
   without the KL objective (a log per cell), against plain numpy and nmf-rs per iteration.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

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

try:
    import nmf_rs
except ImportError:
    nmf_rs = None

MEDULLO = ROOT.parent / "shared" / "data" / "medulloblastoma" / "Medulloblastoma_data.txt"
NIMFA_PYTHON = Path("/tmp/nimfa_venv/bin/python")
IDLE_LOAD, IDLE_STEP, IDLE_PATIENCE = 0.5, 30, 600  # wait for load <= 0.5, 30 s steps, 10 min


class Plan:
    """Sizes of one benchmark run (full or --quick)."""

    def __init__(self, quick, runs):
        self.quick = quick
        self.cv_shape = (200, 100, 3) if quick else (1000, 500, 5)
        self.cv_ranks = range(1, 5) if quick else range(1, 11)
        self.cv_folds = 3 if quick else 5
        self.ranks = [2, 3] if quick else [2, 3, 4, 5]
        self.runs = 2 if quick else runs
        self.max_iter = 50 if quick else 500
        self.rows = 1000 if quick else None  # medulloblastoma genes used (None: all)
        self.per_iter = 20 if quick else 200  # iterations timed in section 3
        self.repeats = 3 if quick else 20


# ---------------------------------------------------------------------------------------------
# Machine description, load and markdown output
# ---------------------------------------------------------------------------------------------

def source_digest():
    """Hash of nmf_cv.py on disk, to tell whether it changed while the benchmark ran."""
    import hashlib
    return hashlib.sha256(Path(nmf_cv.__file__).read_bytes()).hexdigest()


def now():
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def wait_for_idle():
    """Sleep until the 1-minute load average is at most IDLE_LOAD; give up after a while."""
    waited = 0
    while os.getloadavg()[0] > IDLE_LOAD and waited < IDLE_PATIENCE:
        log(f"load average {load_average()} > {IDLE_LOAD}: waiting {IDLE_STEP} s")
        time.sleep(IDLE_STEP)
        waited += IDLE_STEP
    return waited


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_header(start, nimfa_versions):
    """``start``: dict with the revision, source digest, date and load taken at the start."""
    import numba
    import scipy
    changed = source_digest() != start["digest"]
    return (f"Machine: nproc={os.cpu_count()}, CPU {cpu_model()}, BLAS {blas_description()}; "
            f"python {platform.python_version()}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}, numba {numba.__version__}; nmf_cv "
            f"{nmf_cv.__version__} (git {start['revision']} at import"
            f"{'; nmf_cv.py changed on disk during the run' if changed else ''}); peers: "
            f"nmf-rs {package_version('nmf-rs')}, nimfa {nimfa_versions}; started "
            f"{start['date']}, ended {now()}; load average (1/5/15 min) {start['load']} at "
            f"the start of the measurements (after waiting {start['waited']} s for the "
            f"1-minute load to fall to {IDLE_LOAD}; each section waits again), "
            f"{load_average()} at the end")


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def machine_cpu_seconds():
    """Busy CPU seconds of the whole machine since boot (/proc/stat); NaN elsewhere."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU seconds of this process and its waited-for children (pool workers, subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Meter:
    """Wall time of a block, and the CPU time other processes took meanwhile (``others``):
    a measure of how much the rest of the machine disturbed the timing."""

    def __enter__(self):
        self.start = (time.perf_counter(), machine_cpu_seconds(), own_cpu_seconds())
        return self

    def __exit__(self, *exc_info):
        wall, busy, own = time.perf_counter(), machine_cpu_seconds(), own_cpu_seconds()
        self.wall = wall - self.start[0]
        self.others = max(busy - self.start[1] - (own - self.start[2]), 0.0)


def measured(function, *args):
    """(wall seconds, result, other processes' CPU seconds meanwhile)."""
    with Meter() as meter:
        out = function(*args)
    return meter.wall, out, meter.others


def limit_blas(n_threads):
    """ProcessPoolExecutor initializer: at most ``n_threads`` BLAS threads in the worker."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(n_threads, user_api="blas")


def blas_limit(n_threads):
    """Context limiting BLAS threads in this process (None: leave BLAS alone)."""
    if n_threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(n_threads, user_api="blas")


def pool(blas_threads):
    if blas_threads is None:
        return ProcessPoolExecutor(2)
    return ProcessPoolExecutor(2, initializer=limit_blas, initargs=(blas_threads,))


# ---------------------------------------------------------------------------------------------
# 1. Cross-validation
# ---------------------------------------------------------------------------------------------

def cv_run(X, plan, blas_threads=None, use_pool=False):
    """CVResult; a pool is created (so its start-up is timed) when asked."""
    kwargs = {"n_folds": plan.cv_folds, "random_state": 0, "progress": False}
    if not use_pool:
        with blas_limit(blas_threads):
            return nmf_cv.cross_validate(X, plan.cv_ranks, **kwargs)
    with pool(blas_threads) as executor:
        return nmf_cv.cross_validate(X, plan.cv_ranks, executor=executor, **kwargs)


def cv_row(label, wall, cv, others, serial):
    diff = float(np.max(np.abs(cv.press - serial[1].press) / serial[1].press))
    return [label, sec(wall), ratio(serial[0], wall), cv.best_rank, cv.best_rank_1se,
            f"{diff:.1e}", f"{others:.1f}"]


def bench_cv(plan):
    m, n, k = plan.cv_shape
    X = nmf_cv.make_planted(m, n, k, noise=0.1, random_state=0)
    ranks = list(plan.cv_ranks)
    runs = [("serial, BLAS default threads", None, False),
            ("serial, 1 BLAS thread (threadpoolctl)", 1, False),
            ("ProcessPoolExecutor(2), workers' BLAS default threads", None, True),
            ("ProcessPoolExecutor(2), 1 BLAS thread per worker (threadpoolctl)", 1, True)]
    results = []
    for label, threads, use_pool in runs:
        log(f"1. cross_validate {m}x{n} k={k}, ranks {ranks[0]}..{ranks[-1]}: {label}")
        results.append((label, measured(cv_run, X, plan, threads, use_pool)))
    rows = [cv_row(label, *res, results[0][1]) for label, res in results]
    headers = ["run", "wall s", "speed-up vs serial", "best_rank", "best_rank_1se",
               "max rel. PRESS diff vs serial", "other processes' CPU s"]
    n_fits = len(ranks) * plan.cv_folds
    note = (f"`cross_validate(X, range({ranks[0]}, {ranks[-1] + 1}), n_folds={plan.cv_folds}, "
            f"random_state=0)` on `make_planted({m}, {n}, {k}, noise=0.1, random_state=0)`: "
            f"{n_fits} masked HALS fits (defaults max_iter=2000, tol=1e-6). Pool start-up "
            "(fork, numba cache load in workers) is inside the pool timings. Planted rank: "
            f"{k}.")
    return "\n".join(["## 1. Cross-validation (leave-cells-out PRESS)", "", note, "",
                      markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# 2. Consensus clustering on the medulloblastoma data
# ---------------------------------------------------------------------------------------------

def load_medulloblastoma(plan):
    X = np.loadtxt(MEDULLO, delimiter="\t")
    return X if plan.rows is None else X[:plan.rows]


def consensus_matrix(labels):
    """Fraction of runs in which two samples share a cluster; ``labels`` is (runs, n)."""
    labels = np.asarray(labels)
    return np.mean(labels[:, :, None] == labels[:, None, :], axis=0)


def summarise(ranks, labels_by_rank):
    """Cophenetic correlation per rank, with nmf_cv's functions, from per-run labels."""
    return [nmf_cv.cophenetic_correlation(consensus_matrix(labels_by_rank[k])) for k in ranks]


def numpy_kl_mu(X, k, n_iter, rng):
    """Brunet's KL multiplicative updates (H, then W), plain numpy, no objective, no floor."""
    m, n = X.shape
    scale = 2.0 * math.sqrt(X.mean() / k)  # uniform init with E[WH] = mean(X)
    W, H = scale * rng.random((m, k)), scale * rng.random((k, n))
    ratio_buf = np.empty_like(X)
    for _ in range(n_iter):
        np.divide(X, np.matmul(W, H, out=ratio_buf), out=ratio_buf)
        H *= (W.T @ ratio_buf) / W.sum(axis=0)[:, None]
        np.divide(X, np.matmul(W, H, out=ratio_buf), out=ratio_buf)
        W *= (ratio_buf @ H.T) / H.sum(axis=1)
    return W, H


def numpy_consensus(X, plan):
    seeds = np.random.SeedSequence(0).spawn(len(plan.ranks) * plan.runs)
    labels = {k: [np.argmax(numpy_kl_mu(X, k, plan.max_iter,
                                        np.random.default_rng(seeds[i * plan.runs + r]))[1],
                            axis=0) for r in range(plan.runs)]
              for i, k in enumerate(plan.ranks)}
    return summarise(plan.ranks, labels)


def nmf_rs_consensus(X, plan):
    labels = {k: [np.argmax(nmf_rs.nmf(X, k, method="brunet", seed=1000 * k + r,
                                       max_iter=plan.max_iter).H, axis=0)
                  for r in range(plan.runs)] for k in plan.ranks}
    return summarise(plan.ranks, labels)


def nmf_cv_consensus(X, plan, executor=None):
    res = nmf_cv.consensus(X, plan.ranks, n_runs=plan.runs, max_iter=plan.max_iter, tol=0,
                           random_state=0, progress=False, executor=executor)
    return list(res.cophenetic)


def nmf_cv_consensus_1blas(X, plan):
    with blas_limit(1):
        return nmf_cv_consensus(X, plan)


def nmf_cv_consensus_pool(X, plan):
    with pool(1) as executor:
        return nmf_cv_consensus(X, plan, executor)


NIMFA_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, scipy, nimfa
path, rows, ranks, n_runs, max_iter = sys.argv[1:6]
V = np.loadtxt(path, delimiter="\t")
if rows != "all":
    V = V[:int(rows)]
out = {"versions": f"{nimfa.__version__} (numpy {np.__version__}, scipy {scipy.__version__})",
       "ranks": {}}
start = time.perf_counter()
for k in json.loads(ranks):
    fit = nimfa.Nmf(V, seed="random", rank=k, max_iter=int(max_iter), update="divergence",
                    objective="div", n_run=int(n_runs), track_factor=True,
                    min_residuals=None)()
    out["ranks"][k] = {"cophenetic": float(fit.fit.coph_cor()),
                       "consensus": np.asarray(fit.fit.consensus()).tolist(),
                       "n_iter": [fit.fit.tracker.get_factor(r).n_iter
                                  for r in range(int(n_runs))]}
out["wall"] = time.perf_counter() - start
print(json.dumps(out))
"""


def nimfa_consensus(plan, python):
    """nimfa's own timing and results from a subprocess in its venv; None if it is absent."""
    if not Path(python).exists():
        return None
    rows = "all" if plan.rows is None else str(plan.rows)
    args = [str(python), "-c", NIMFA_SCRIPT, str(MEDULLO), rows, json.dumps(plan.ranks),
            str(plan.runs), str(plan.max_iter)]
    with Meter() as meter:
        proc = subprocess.run(args, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["others"] = meter.others
    return out


def coph_cells(values):
    return [f"{c:.4f}" for c in values]


def consensus_row(label, wall, coph, others, plan, reference):
    n_iter = len(plan.ranks) * plan.runs * plan.max_iter
    best = nmf_cv.best_cophenetic_rank(plan.ranks, coph)
    return ([label, sec(wall), ms(wall / n_iter), ratio(wall, reference)] + coph_cells(coph)
            + [best, "n/a" if math.isnan(others) else f"{others:.1f}"])


def nimfa_rows(nimfa, plan, reference):
    """Two rows for nimfa: its own cophenetic values, and nmf_cv's on its consensus."""
    if nimfa is None:
        return []
    per_rank = [nimfa["ranks"][str(k)] for k in plan.ranks]
    own = [r["cophenetic"] for r in per_rank]
    ours = [nmf_cv.cophenetic_correlation(np.array(r["consensus"])) for r in per_rank]
    label = "nimfa 1.4.0, divergence MU (subprocess, its own timing)"
    return [consensus_row(label, nimfa["wall"], own, nimfa["others"], plan, reference),
            consensus_row("nimfa: same consensus matrices, nmf_cv.cophenetic_correlation",
                          math.nan, ours, math.nan, plan, reference)]


def nimfa_notes(nimfa):
    if nimfa is None:
        return [f"nimfa skipped: no interpreter at {NIMFA_PYTHON} (see the module docstring). "
                "../shared/PEERS.md has nimfa at 415 s for k=2..5 x 20 runs x 500 KL-MU "
                "iterations on a Golub-sized 5000x38 matrix."]
    iters = [i for r in nimfa["ranks"].values() for i in r["n_iter"]]
    return [f"nimfa ran {min(iters)}..{max(iters)} iterations per fit (it stops early if its "
            "objective rises)."]


def ratio_notes(runs, nimfa, plan):
    """Time ratios against the peers, and the targets against nimfa."""
    wall = {run[0]: run[2] for run in runs}
    lines = [f"Time ratios: nmf_cv serial / plain numpy = {ratio(wall['serial'], wall['numpy'])}"]
    if "nmf_rs" in wall:
        lines[0] += (f"; nmf_cv serial / nmf-rs = {ratio(wall['serial'], wall['nmf_rs'])}; "
                     f"nmf_cv pool / nmf-rs = {ratio(wall['pool'], wall['nmf_rs'])}")
    if nimfa is not None:
        own = np.array([nimfa["ranks"][str(k)]["cophenetic"] for k in plan.ranks])
        gap = np.max(np.abs(np.array(runs[0][3]) - own))
        lines.append(f"Targets: nimfa / nmf_cv serial = {ratio(nimfa['wall'], wall['serial'])}"
                     f", nimfa / nmf_cv pool = {ratio(nimfa['wall'], wall['pool'])} (target "
                     f">= 10); max |cophenetic nmf_cv - nimfa| = {gap:.4f} (target <= 0.02).")
    return lines


def consensus_runs(X, plan):
    """(key, label, wall s, cophenetic values, others' CPU s) of each one but nimfa."""
    jobs = [("serial", "nmf_cv.consensus, serial", nmf_cv_consensus),
            ("serial_1", "nmf_cv.consensus, serial, 1 BLAS thread", nmf_cv_consensus_1blas),
            ("pool", "nmf_cv.consensus, ProcessPoolExecutor(2), 1 BLAS thread each",
             nmf_cv_consensus_pool)]
    if nmf_rs is not None:
        jobs.append(("nmf_rs", "nmf-rs brunet (rayon, default threads)", nmf_rs_consensus))
    jobs.append(("numpy", "plain numpy KL MU (floor, nmf_cv's seeds and init)",
                 numpy_consensus))
    out = []
    for key, label, job in jobs:
        log(f"2. consensus on {X.shape[0]}x{X.shape[1]}: {label}")
        out.append((key, label, *measured(job, X, plan)))
    return out


def bench_consensus(plan, nimfa_python):
    X = load_medulloblastoma(plan)
    runs = consensus_runs(X, plan)
    reference = runs[0][2]
    rows = [consensus_row(*run[1:], plan, reference) for run in runs]
    log("2. consensus: nimfa (subprocess)")
    nimfa = nimfa_consensus(plan, nimfa_python)
    rows += nimfa_rows(nimfa, plan, reference)
    headers = (["implementation", "wall s", "ms per iteration", "time / nmf_cv serial"]
               + [f"cophenetic k={k}" for k in plan.ranks]
               + ["best rank (Brunet's rule)", "other processes' CPU s"])
    note = (f"Data {X.shape[0]}x{X.shape[1]}; ranks {plan.ranks}, {plan.runs} random restarts "
            f"per rank, {plan.max_iter} KL multiplicative-update iterations per fit (tol=0), "
            "clusters = argmax over each column of H. 'ms per iteration' is the wall time "
            "over all fits' iterations (consensus bookkeeping included). The plain numpy "
            "fits start from nmf_cv's inits (same seeds, same formula), so their cophenetic "
            "values should equal nmf_cv's.")
    parts = ["## 2. Consensus clustering, medulloblastoma (Brunet et al. 2004)", note,
             markdown_table(headers, rows)]
    parts += nimfa_notes(nimfa) + ratio_notes(runs, nimfa, plan)
    return "\n\n".join(parts), (nimfa or {}).get("versions", "not run")


# ---------------------------------------------------------------------------------------------
# 3. One dense KL iteration, by part
# ---------------------------------------------------------------------------------------------

def median_time(function, repeats):
    return float(np.median([timed(function)[0] for _ in range(repeats)]))


def kl_ratio_time(X, W, H, want_loss, repeats):
    """Median time of nmf_cv's X / WH pass (WH recomputed, untimed, before each call)."""
    buf, eps, times = np.empty_like(X), nmf_cv._kl_floor(X.dtype), []
    for _ in range(repeats):
        np.dot(W, H, out=buf)
        times.append(timed(nmf_cv._kl_ratio, X, buf, eps, want_loss)[0])
    return float(np.median(times))


def nmf_cv_iteration(X, k, plan, blas_threads=None):
    with blas_limit(blas_threads):
        res = nmf_cv.fit_nmf(X, k, method="mu", loss="kl", init="random",
                             max_iter=plan.per_iter, tol=0, random_state=0)
    return float(np.median(np.diff(res.time_history)[1:])), res


def kernel_parts(X, W, H, repeats):
    """Median times of the pieces of one nmf_cv KL iteration at (W, H)."""
    buf = np.dot(W, H)
    with_loss, no_loss = (kl_ratio_time(X, W, H, flag, repeats) for flag in (True, False))
    return {"wh": median_time(lambda: np.dot(W, H, out=buf), repeats),
            "num_h": median_time(lambda: W.T @ buf, repeats),
            "num_w": median_time(lambda: H @ buf.T, repeats),
            "with_loss": with_loss, "no_loss": no_loss,
            "np_div": median_time(lambda: np.divide(X, buf, out=np.empty_like(X)), repeats)}


def peers_per_iteration(X, k, n_iter):
    """(plain numpy, nmf-rs) seconds per iteration, init included."""
    numpy_it = timed(numpy_kl_mu, X, k, n_iter, np.random.default_rng(0))[0] / n_iter
    if nmf_rs is None:
        return numpy_it, math.nan
    return numpy_it, timed(nmf_rs.nmf, X, k, method="brunet", seed=0, max_iter=n_iter)[0] / n_iter


def iteration_row(X, k, plan):
    per_iter, res = nmf_cv_iteration(X, k, plan)
    per_iter_1blas = nmf_cv_iteration(X, k, plan, blas_threads=1)[0]
    t = kernel_parts(X, res.W, res.H, plan.repeats)
    loss = t["with_loss"] - t["no_loss"]
    return ([k, ms(per_iter), ms(per_iter_1blas)]
            + [ms(t[key]) for key in ("wh", "num_h", "num_w", "with_loss", "no_loss")]
            + [ms(loss), ratio(loss, per_iter), ms(t["np_div"])]
            + [ms(x) for x in peers_per_iteration(X, k, plan.per_iter)])


def bench_iteration(plan):
    X = load_medulloblastoma(plan)
    log("3. one dense KL iteration, by part")
    rows = [iteration_row(X, k, plan) for k in plan.ranks]
    headers = ["k", "nmf_cv ms/iter", "nmf_cv ms/iter, 1 BLAS thread", "WH (BLAS)",
               "W'R (BLAS)", "R H' (BLAS)", "X/WH + KL loss", "X/WH only", "loss part",
               "loss part / iter", "numpy X/WH", "plain numpy ms/iter", "nmf-rs ms/iter"]
    note = (f"Data {X.shape[0]}x{X.shape[1]}, times in ms. nmf_cv: median of the "
            f"`time_history` steps of a {plan.per_iter}-iteration fit (init random, tol=0). "
            "One nmf_cv iteration is 2 WH products, 2 X/WH passes (the second with the "
            "objective), W'R, R H' and two small multiplicative applies. Parts: median of "
            f"{plan.repeats} calls on the fit's final W, H, with nmf_cv's own kernels. Plain "
            f"numpy and nmf-rs: wall time of a {plan.per_iter}-iteration fit / iterations "
            "(init included).")
    return "\n".join(["## 3. One dense KL iteration, by part (medulloblastoma)", "", note, "",
                      markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def warm_up():
    """Compile (or load from numba's cache) the kernels the benchmark uses."""
    X = nmf_cv.make_planted(40, 30, 3, noise=0.1, random_state=0)
    nmf_cv.cross_validate(X, [2], n_folds=2, random_state=0, progress=False, max_iter=5)
    nmf_cv.consensus(X, [2], n_runs=2, max_iter=5, random_state=0, progress=False)


def run_section(wait, function, *args):
    """``function(*args)`` after waiting (if ``wait``) for an idle machine; returns its result
    and the conditions it ran in (load at its start, seconds waited, others' CPU time)."""
    waited = wait_for_idle() if wait else 0
    conditions = {"load": load_average(), "waited": waited}
    with Meter() as meter:
        result = function(*args)
    conditions.update(wall=meter.wall, others=meter.others)
    return result, conditions


def conditions_note(c):
    return (f"Section conditions: load average (1/5/15 min) {c['load']} at its start (after "
            f"waiting {c['waited']} s); other processes used {c['others']:.1f} CPU s during "
            f"its {c['wall']:.0f} s.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, 2 restarts, 50 iterations, no idle wait (smoke test)")
    parser.add_argument("--runs", type=int, default=20,
                        help="consensus restarts per rank (default 20)")
    parser.add_argument("--nimfa-python", default=str(NIMFA_PYTHON),
                        help="python of a venv with nimfa and numpy<2")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for the load average to fall")
    args = parser.parse_args(argv)
    plan = Plan(args.quick, args.runs)
    if not MEDULLO.exists():
        log(f"missing {MEDULLO}")
        return 1
    wait = not (args.quick or args.no_wait)
    start = {"revision": git_revision(), "digest": source_digest(), "date": now(),
             "clock": time.perf_counter()}
    log("warm-up (numba compile)")
    warm_up()
    cv, cv_conditions = run_section(wait, bench_cv, plan)
    (consensus, nimfa_versions), consensus_conditions = run_section(
        wait, bench_consensus, plan, args.nimfa_python)
    iteration, iteration_conditions = run_section(wait, bench_iteration, plan)
    start.update(load=cv_conditions["load"], waited=cv_conditions["waited"])
    print("# nmf_cv rank-selection benchmarks" + (" (--quick)" if args.quick else ""))
    print()
    print(machine_header(start, nimfa_versions))
    for text, conditions in ((cv, cv_conditions), (consensus, consensus_conditions),
                             (iteration, iteration_conditions)):
        print()
        print(text)
        print()
        print(conditions_note(conditions))
    print()
    print(f"Benchmark wall time: {time.perf_counter() - start['clock']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

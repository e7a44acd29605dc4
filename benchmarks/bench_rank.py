"""Benchmark nmf_cv's rank selection: cross-validation and consensus clustering against peers.

Prints markdown tables (with a machine and version header) to stdout; progress goes to
stderr. Run from the repository root::

    python benchmarks/bench_rank.py                # full run, about 50 minutes on 2 cores
    python benchmarks/bench_rank.py --quick        # small data, few runs: a smoke test (~2 min)
    python benchmarks/bench_rank.py --runs 50      # consensus restarts per rank (default 20)
    python benchmarks/bench_rank.py --no-wait      # skip the wait for an idle machine
    python benchmarks/bench_rank.py --sections consensus,kl \
        --previous benchmarks/bench_rank_results.md   # rerun two sections, keep the others

``--sections`` takes a comma list of ``cv``, ``consensus``, ``iteration``, ``kl``, ``hard``
and ``scale`` (default: all). With ``--previous FILE`` (an earlier output of this script) the
sections not rerun are copied from FILE, each marked with the nmf_cv revision and dates of the
run that measured it.

Timings are wall-clock, in one process on identical data. Before each section a full run
waits (30 s at a time, 10 minutes at most) for the 1-minute load average to fall to 0.5 or
below. The header records the load at the start and end of the measurements, each section
its own load at start, and each timing the CPU time other processes took meanwhile (from
/proc/stat): a check that the rest of the machine did not disturb it.

Since nmf_cv limits BLAS to one thread in the worker processes that run its tasks (with
threadpoolctl), a plain ``ProcessPoolExecutor(2)`` runs every fit with one BLAS thread; the
rows labelled "nmf_cv's automatic 1 BLAS thread per worker" measure that.

What is measured
----------------
1. ``cv``: ``nmf_cv.cross_validate(X, range(1, 11), n_folds=5, random_state=0)`` on
   ``X = make_planted(1000, 500, 5, noise=0.1, random_state=0)`` (default fits: HALS,
   ``max_iter=2000, tol=1e-6``): serially, with OpenBLAS's default threads and with BLAS
   limited to one thread by ``threadpoolctl``; and with a ``ProcessPoolExecutor(2)``, plain
   (nmf_cv's automatic limit) and with a worker initializer that limits BLAS as well. Pool
   start-up is inside the timing.
2. ``consensus``: consensus clustering on the Brunet et al. (2004) medulloblastoma data
   (5893 genes x 34 samples, ``../shared/data/medulloblastoma``): ranks 2..5, ``--runs``
   random restarts per rank, KL multiplicative updates (Brunet's), exactly 500 iterations
   per fit, samples clustered by the argmax of each column of H, cophenetic correlation of
   the consensus matrix. Implementations:

   - ``nmf_cv.consensus(X, ranks, n_runs=N, stop="max_iter", max_iter=500,
     random_state=0)`` (no objective evaluated), serially (default BLAS threads, and one
     BLAS thread) and with a ``ProcessPoolExecutor(2)``;
   - the same with nmf_cv's default stopping, Brunet's connectivity rule (a run ends once
     its clustering has not changed for 400 iterations, checked every 10; at most 2000), on
     a ``ProcessPoolExecutor(2)``: not the same work as the others (consensus does not
     report iteration counts), so only its wall time and cophenetic values are given;
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
3. ``iteration``: cost of one dense KL iteration on the medulloblastoma data: nmf_cv's
   per-iteration time from ``time_history`` (median; `fit_nmf` evaluates the objective every
   iteration), the median time of a solver step without the objective
   (``step(want_loss=False)``, what consensus runs) and the difference (the objective's
   part: a log per cell), against plain numpy and nmf-rs per iteration.
4. ``kl``: cross-validation on Poisson counts, ``loss="kl"`` (KL coordinate descent with
   CV's Gamma priors, held-out Poisson deviance) against ``loss="frobenius"`` (HALS with CV's
   ridge, held-out squared error). Counts ``X ~ Poisson(rate)``, ``rate = A @ B`` with ``A``
   (m x 5) and ``B`` (5 x n) drawn from Gamma(1, 1) and scaled to mean 5 (seed 0).
   ``cross_validate(X, range(1, 9), n_folds=5, loss=..., random_state=0)`` on 300 x 200,
   serially and with a ``ProcessPoolExecutor(2)``; then on 1000 x 500 with the pool only,
   when the time estimated from the 300 x 200 serial runs (scaled by the number of cells,
   over 2 workers) is within ``--kl-budget`` seconds (default 300); else skipped with a note.
5. ``hard``: the new ridge and restarts against the previous release's fits ("before": ``ridge=0,
   n_restarts=1, stuck_restarts=0``, rank = argmin of the mean PRESS over folds; "after": the
   defaults, rank = ``best_rank``, the argmin of the median). First Hoyer's bars (400 images of
   8x8 pixels, 16 bars, each present with probability 0.2 and weight Uniform(0.5, 1.5), noise
   0.05, absolute value; true rank 16), seeds 0..4: ``cross_validate(X, range(12, 21), n_folds=5,
   random_state=seed)`` serially, before and after: chosen rank, worst fold (the largest fold
   PRESS over its rank's median, over the ranks) and wall time; beside them nmf-rs's ``cv_rank(X,
   ranks, seed=seed)`` with its defaults and with ``max_iter=1000, init="random"`` (it needs
   pandas): the rank of its smallest mean held-out MSE and its worst fold computed the same way.
   Then the time of ``cross_validate(make_planted(1000, 500, 5, noise=0.1, random_state=0),
   range(1, 11), n_folds=5, random_state=0)``, serial, before and after (the previous release: 41
   s). ``--quick``: seeds 0 and 1 only, and the planted data 100 x 60 (rank 3), ranks 1..5.
6. ``scale``: lab-sized inputs on a ``ProcessPoolExecutor(2)``, time and peak memory (the
   proportional set size of the process and its workers above its value with the data
   loaded). The issue's sparse counts (20000 x 2000, ``Poisson(A @ B)`` with Gamma(0.3, 1)
   factors of rank 8 scaled to mean 0.1, about 9% stored): ``cross_validate(X, range(4, 13),
   loss="kl", n_folds=5)`` against fitting the 9 ranks once each to the whole matrix;
   ``make_planted(20000, 500, 8, noise=0.1)``, ranks 6..10, against full fits likewise; and a
   10^8-cell ``make_planted(50000, 2000, 8, noise=0.1, dtype=float32)``, ranks 6, 8, 10 with
   ``max_iter=300``. Then the time of one HALS iteration (20000 x 500, k = 8 and 16) dense, on a
   cross-validation training set (20% held out through the fold rule), and with 20% of
   cells missing at random.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
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

    def __init__(self, quick, runs, kl_budget=300.0):
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
        # consensus with its default stopping rule: nmf_cv's defaults in a full run
        self.default_stop = {"stable_iter": 40, "max_iter": 200} if quick else {}
        self.count_shape = (60, 40, 3) if quick else (300, 200, 5)  # section 4: m, n, k_true
        self.count_large = (150, 100, 3) if quick else (1000, 500, 5)
        self.count_ranks = range(1, 5) if quick else range(1, 9)
        self.count_folds = 3 if quick else 5
        self.kl_budget = kl_budget  # seconds the large count-data size may take (estimated)
        self.hard_seeds = range(2) if quick else range(5)  # section 5: bars data seeds
        self.bars_ranks = range(12, 21)
        # 200x100 already takes about 30 s per run (its fits run long): smaller in --quick
        self.hard_planted = (100, 60, 3) if quick else (1000, 500, 5)
        self.hard_planted_ranks = range(1, 6) if quick else range(1, 11)
        # section 6: the sparse counts, dense planted data, 10^8 cells (float32)
        self.scale_sparse = (2000, 500, 8) if quick else (20000, 2000, 8)
        self.scale_sparse_ranks = range(4, 7) if quick else range(4, 13)
        self.scale_dense = ([((2000, 300, 4), np.float64, [3, 4, 5], None)] if quick else
                            [((20000, 500, 8), np.float64, [6, 7, 8, 9, 10], None),
                             ((50000, 2000, 8), np.float32, [6, 8, 10], 300)])
        self.scale_iteration = (2000, 300, 8) if quick else (20000, 500, 8)


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
            ("ProcessPoolExecutor(2), nmf_cv's automatic 1 BLAS thread per worker", None, True),
            ("ProcessPoolExecutor(2), 1 BLAS thread per worker (threadpoolctl initializer "
             "and nmf_cv's automatic limit)", 1, True)]
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
            f"{n_fits} HALS fits of training sets, read through the fold rule (defaults "
            "max_iter=2000, tol=1e-6). Pool start-up (fork, numba cache load in workers) is "
            "inside the pool timings. Planted rank: "
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
    """Exactly ``plan.max_iter`` iterations per fit (no objective): nimfa's and nmf-rs's work."""
    res = nmf_cv.consensus(X, plan.ranks, n_runs=plan.runs, stop="max_iter",
                           max_iter=plan.max_iter, random_state=0, progress=False,
                           executor=executor)
    return list(res.cophenetic)


def nmf_cv_consensus_1blas(X, plan):
    with blas_limit(1):
        return nmf_cv_consensus(X, plan)


def nmf_cv_consensus_pool(X, plan):
    """Plain pool: nmf_cv limits BLAS to one thread in its workers by itself."""
    with pool(None) as executor:
        return nmf_cv_consensus(X, plan, executor)


def nmf_cv_consensus_default_stop(X, plan):
    """nmf_cv's default stopping (Brunet's connectivity rule), plain pool."""
    with pool(None) as executor:
        res = nmf_cv.consensus(X, plan.ranks, n_runs=plan.runs, random_state=0,
                               progress=False, executor=executor, **plan.default_stop)
    return list(res.cophenetic)


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


def consensus_row(label, wall, coph, others, plan, reference, fixed=True):
    """``fixed``: every fit ran ``plan.max_iter`` iterations (else 'ms per iteration' is n/a)."""
    n_iter = len(plan.ranks) * plan.runs * plan.max_iter
    best = nmf_cv.best_cophenetic_rank(plan.ranks, coph)
    return ([label, sec(wall), ms(wall / n_iter) if fixed else "n/a", ratio(wall, reference)]
            + coph_cells(coph) + [best, "n/a" if math.isnan(others) else f"{others:.1f}"])


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


def max_gap(a, b):
    return f"{float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.4f}"


def ratio_notes(runs, nimfa, plan):
    """Time ratios against the peers, the targets against nimfa, cophenetic agreement."""
    wall = {run[0]: run[2] for run in runs}
    coph = {run[0]: run[3] for run in runs}
    lines = [f"Time ratios: nmf_cv serial / plain numpy = {ratio(wall['serial'], wall['numpy'])}"]
    if "nmf_rs" in wall:
        lines[0] += (f"; nmf_cv serial / nmf-rs = {ratio(wall['serial'], wall['nmf_rs'])}; "
                     f"nmf_cv pool / nmf-rs = {ratio(wall['pool'], wall['nmf_rs'])}")
    if nimfa is not None:
        own = [nimfa["ranks"][str(k)]["cophenetic"] for k in plan.ranks]
        lines.append(f"Targets: nimfa / nmf_cv serial = {ratio(nimfa['wall'], wall['serial'])}"
                     f", nimfa / nmf_cv pool = {ratio(nimfa['wall'], wall['pool'])} (target "
                     f">= 10); max |cophenetic nmf_cv - nimfa| = {max_gap(coph['serial'], own)}"
                     " (target <= 0.02).")
        lines.append("Default stopping (not the same work): nimfa / nmf_cv default stopping, "
                     f"pool = {ratio(nimfa['wall'], wall['default_stop'])}; max |cophenetic "
                     f"default stopping - nimfa| = {max_gap(coph['default_stop'], own)}.")
    agreement = [f"{name} {max_gap(coph['serial'], coph[key])}" for key, name in
                 (("serial_1", "serial 1 BLAS thread"), ("pool", "pool"),
                  ("numpy", "plain numpy"), ("nmf_rs", "nmf-rs"),
                  ("default_stop", "default stopping")) if key in coph]
    lines.append("Max |cophenetic - nmf_cv serial's| over the ranks: " + ", ".join(agreement)
                 + ".")
    return lines


def consensus_runs(X, plan):
    """(key, label, wall s, cophenetic values, others' CPU s) of each one but nimfa."""
    jobs = [("serial", "nmf_cv.consensus, serial", nmf_cv_consensus),
            ("serial_1", "nmf_cv.consensus, serial, 1 BLAS thread", nmf_cv_consensus_1blas),
            ("pool", "nmf_cv.consensus, ProcessPoolExecutor(2), nmf_cv's automatic 1 BLAS "
             "thread per worker", nmf_cv_consensus_pool)]
    if nmf_rs is not None:
        jobs.append(("nmf_rs", "nmf-rs brunet (rayon, default threads)", nmf_rs_consensus))
    jobs.append(("numpy", "plain numpy KL MU (floor, nmf_cv's seeds and init)",
                 numpy_consensus))
    settings = ", ".join(f"{key}={value}" for key, value in plan.default_stop.items())
    jobs.append(("default_stop", "nmf_cv.consensus default stopping (Brunet's connectivity "
                 f"rule{', ' + settings if settings else ''}), ProcessPoolExecutor(2)",
                 nmf_cv_consensus_default_stop))
    out = []
    for key, label, job in jobs:
        log(f"2. consensus on {X.shape[0]}x{X.shape[1]}: {label}")
        out.append((key, label, *measured(job, X, plan)))
    return out


def bench_consensus(plan, nimfa_python):
    X = load_medulloblastoma(plan)
    runs = consensus_runs(X, plan)
    reference = runs[0][2]
    rows = [consensus_row(*run[1:], plan, reference, fixed=run[0] != "default_stop")
            for run in runs]
    log("2. consensus: nimfa (subprocess)")
    nimfa = nimfa_consensus(plan, nimfa_python)
    rows += nimfa_rows(nimfa, plan, reference)
    headers = (["implementation", "wall s", "ms per iteration", "time / nmf_cv serial"]
               + [f"cophenetic k={k}" for k in plan.ranks]
               + ["best rank (Brunet's rule)", "other processes' CPU s"])
    note = (f"Data {X.shape[0]}x{X.shape[1]}; ranks {plan.ranks}, {plan.runs} random restarts "
            f"per rank, {plan.max_iter} KL multiplicative-update iterations per fit (nmf_cv: "
            f"`stop=\"max_iter\", max_iter={plan.max_iter}`, no objective evaluated), clusters "
            "= argmax over each column of H. 'ms per iteration' is the wall time over all "
            "fits' iterations (consensus bookkeeping included). The plain numpy fits start "
            "from nmf_cv's inits (same seeds, same formula), so their cophenetic values should "
            "equal nmf_cv's. The default-stopping row runs nmf_cv's default "
            "`stop=\"connectivity\"` (a run ends once its clustering has not changed for "
            "`stable_iter` iterations, checked every 10; default 400, at most `max_iter`, "
            "default 2000): a different amount of work, whose iteration counts consensus does "
            "not report.")
    parts = ["## 2. Consensus clustering, medulloblastoma (Brunet et al. 2004)", note,
             markdown_table(headers, rows)]
    parts += nimfa_notes(nimfa) + ratio_notes(runs, nimfa, plan)
    return "\n\n".join(parts), (nimfa or {}).get("versions", "not run")


# ---------------------------------------------------------------------------------------------
# 3. One dense KL iteration, by part
# ---------------------------------------------------------------------------------------------

def median_time(function, repeats):
    return float(np.median([timed(function)[0] for _ in range(repeats)]))


def nmf_cv_iteration(X, k, plan, blas_threads=None):
    """Median iteration time of `fit_nmf` (objective every iteration), and its result."""
    with blas_limit(blas_threads):
        res = nmf_cv.fit_nmf(X, k, method="mu", loss="kl", init="random",
                             max_iter=plan.per_iter, tol=0, random_state=0)
    return float(np.median(np.diff(res.time_history)[1:])), res


def nmf_cv_step(X, k, plan, blas_threads=None):
    """Median time of the dense KL solver's ``step(want_loss=False)`` (consensus's iteration),
    from `fit_nmf`'s init; uses the private ``_setup_fit`` and ``_DenseKLSolver``."""
    solver = nmf_cv._setup_fit(nmf_cv._validate_data(X), k, nmf_cv._FitOptions(
        method="mu", loss="kl", init="random", random_state=0))
    if not isinstance(solver, nmf_cv._DenseKLSolver):
        raise TypeError(f"expected nmf_cv._DenseKLSolver, got {type(solver).__name__}")
    with blas_limit(blas_threads):
        times = [timed(solver.step, want_loss=False)[0] for _ in range(plan.per_iter)]
    return float(np.median(times[1:]))


def peers_per_iteration(X, k, n_iter):
    """(plain numpy, nmf-rs) seconds per iteration, init included."""
    numpy_it = timed(numpy_kl_mu, X, k, n_iter, np.random.default_rng(0))[0] / n_iter
    if nmf_rs is None:
        return numpy_it, math.nan
    return numpy_it, timed(nmf_rs.nmf, X, k, method="brunet", seed=0, max_iter=n_iter)[0] / n_iter


def iteration_row(X, k, plan):
    per_iter = nmf_cv_iteration(X, k, plan)[0]
    step = nmf_cv_step(X, k, plan)
    loss = per_iter - step
    return ([k, ms(per_iter), ms(step), ms(loss), ratio(loss, per_iter)]
            + [ms(x) for x in peers_per_iteration(X, k, plan.per_iter)])


def bench_iteration(plan):
    X = load_medulloblastoma(plan)
    log("3. one dense KL iteration")
    rows = [iteration_row(X, k, plan) for k in plan.ranks]
    headers = ["k", "fit_nmf ms/iter (with objective)", "step(want_loss=False) ms",
               "objective part", "objective part / fit_nmf iter", "plain numpy ms/iter",
               "nmf-rs ms/iter"]
    note = (f"Data {X.shape[0]}x{X.shape[1]}, times in ms. fit_nmf: median of the "
            f"`time_history` steps of a {plan.per_iter}-iteration fit (init random, tol=0); "
            "its iteration is one pass over X's columns for H and one over its rows for W "
            "(`_kl_mu_lines`), the second with the KL objective (a log per cell). "
            "step(want_loss=False): median time of the dense KL solver's step without the "
            "objective, what `consensus` runs with `stop=\"max_iter\"` or "
            f"`\"connectivity\"`; {plan.per_iter} steps from the same init. Plain "
            f"numpy and nmf-rs: wall time of a {plan.per_iter}-iteration fit / iterations "
            "(init included).")
    return "\n".join(["## 3. One dense KL iteration (medulloblastoma)", "", note, "",
                      markdown_table(headers, rows)])


# ---------------------------------------------------------------------------------------------
# 4. Count data: cross_validate with loss="kl" against loss="frobenius"
# ---------------------------------------------------------------------------------------------

def poisson_counts(m, n, k, random_state=0):
    """Counts ~ Poisson(rate), rate = Gamma(1, 1) (m x k) @ Gamma(1, 1) (k x n), mean 5."""
    rng = np.random.default_rng(random_state)
    rate = rng.gamma(1.0, 1.0, size=(m, k)) @ rng.gamma(1.0, 1.0, size=(k, n))
    rate *= 5.0 / rate.mean()
    return rng.poisson(rate).astype(np.float64)


def count_cv(X, plan, loss, use_pool):
    kwargs = {"n_folds": plan.count_folds, "loss": loss, "random_state": 0, "progress": False}
    if not use_pool:
        return nmf_cv.cross_validate(X, plan.count_ranks, **kwargs)
    with pool(None) as executor:
        return nmf_cv.cross_validate(X, plan.count_ranks, executor=executor, **kwargs)


POOL_LABEL = "ProcessPoolExecutor(2), nmf_cv's automatic 1 BLAS thread per worker"
LOSS_LABELS = {"kl": "kl (KL CD with Gamma priors, Poisson deviance)",
               "frobenius": "frobenius (HALS, squared error)"}


def count_row(shape, loss, label, wall, cv, others, serial=None):
    """``serial``: (wall, CVResult) of the same size and loss run serially, if any."""
    diff = "n/a"
    if serial is not None:
        diff = f"{float(np.max(np.abs(cv.press - serial[1].press) / serial[1].press)):.1e}"
    relative = " ".join(f"{v:.3f}" for v in cv.press_mean / cv.press_mean.min())
    return [f"{shape[0]}x{shape[1]}", LOSS_LABELS[loss], label, sec(wall),
            ratio(serial[0], wall) if serial is not None else "n/a", cv.best_rank,
            cv.best_rank_1se, diff, relative, f"{others:.1f}"]


def count_large_estimate(small_walls, small, large):
    """Seconds the large size should take on the pool: the small size's serial walls scaled by
    the number of cells, over 2 workers."""
    return sum(small_walls) * (large[0] * large[1]) / (small[0] * small[1]) / 2


def bench_count_cv(plan):
    rows, serial_walls = [], []
    small, large = plan.count_shape, plan.count_large
    X = poisson_counts(*small)
    for loss in ("kl", "frobenius"):
        log(f"4. count data {small[0]}x{small[1]}, loss={loss}: serial")
        serial = measured(count_cv, X, plan, loss, False)
        log(f"4. count data {small[0]}x{small[1]}, loss={loss}: {POOL_LABEL}")
        pooled = measured(count_cv, X, plan, loss, True)
        rows += [count_row(small, loss, "serial", *serial, serial=serial[:2]),
                 count_row(small, loss, POOL_LABEL, *pooled, serial=serial[:2])]
        serial_walls.append(serial[0])
    estimate = count_large_estimate(serial_walls, small, large)
    if estimate <= plan.kl_budget:
        X_large = poisson_counts(*large)
        for loss in ("kl", "frobenius"):
            log(f"4. count data {large[0]}x{large[1]}, loss={loss}: {POOL_LABEL}")
            rows.append(count_row(large, loss, POOL_LABEL,
                                  *measured(count_cv, X_large, plan, loss, True)))
        large_note = (f"{large[0]}x{large[1]} (k_true={large[2]}) ran on the pool only: "
                      f"estimated {estimate:.0f} s beforehand (the {small[0]}x{small[1]} "
                      "serial times scaled by the number of cells, over 2 workers), within "
                      f"the {plan.kl_budget:.0f} s budget.")
    else:
        large_note = (f"{large[0]}x{large[1]} (k_true={large[2]}) skipped: estimated "
                      f"{estimate:.0f} s on the pool (the {small[0]}x{small[1]} serial times "
                      "scaled by the number of cells, over 2 workers), over the "
                      f"{plan.kl_budget:.0f} s budget (`--kl-budget`).")
    ranks = list(plan.count_ranks)
    headers = ["size", "loss", "run", "wall s", "speed-up vs serial", "best_rank",
               "best_rank_1se", "max rel. PRESS diff vs serial",
               f"mean held-out score / min, ranks {ranks[0]}..{ranks[-1]}",
               "other processes' CPU s"]
    note = (f"Counts X ~ Poisson(rate), rate = A @ B with A (m x k_true), B (k_true x n) "
            "drawn from Gamma(1, 1) and scaled to mean 5 (seed 0); "
            f"`cross_validate(X, range({ranks[0]}, {ranks[-1] + 1}), "
            f"n_folds={plan.count_folds}, loss=..., random_state=0)` with the default fits "
            f"(max_iter=2000, tol=1e-6; tol=1e-5 for KL coordinate descent): "
            f"{len(ranks) * plan.count_folds} fits of training sets "
            "per run. "
            f"Planted rank: {small[2]}. The held-out score is the Poisson deviance for "
            "loss='kl' and the squared error for loss='frobenius'. Pool start-up is inside "
            "the pool timings.")
    return "\n\n".join(["## 4. Count data: cross_validate with loss='kl' vs loss='frobenius'",
                        note, markdown_table(headers, rows), large_note])


# ---------------------------------------------------------------------------------------------
# 5. Hard cases: the bars data, and what the ridge and restarts cost
# ---------------------------------------------------------------------------------------------

BEFORE = {"ridge": 0, "n_restarts": 1, "stuck_restarts": 0}  # the previous release's fits
PREVIOUS_RELEASE_PLANTED_S = 41.0  # its serial cross_validate on make_planted(1000, 500, 5)
NMF_RS_SETTINGS = (("defaults", {}),
                   ('max_iter=1000, init="random"', {"max_iter": 1000, "init": "random"}))


def make_bars(seed, n_images=400, side=8, p=0.2, noise=0.05):
    """Hoyer's bars: ``n_images`` x ``side**2``, a weighted sum of the ``2 * side`` bars (rows
    0..side-1, then columns), each present with probability ``p`` and weight Uniform(0.5,
    1.5), plus Gaussian noise, absolute value taken."""
    bars = np.zeros((2 * side, side, side))
    for i in range(side):
        bars[i, i, :] = 1.0
        bars[side + i, :, i] = 1.0
    rng = np.random.default_rng(seed)
    present = rng.random((n_images, 2 * side)) < p
    weights = rng.uniform(0.5, 1.5, (n_images, 2 * side))
    X0 = (present * weights) @ bars.reshape(2 * side, side * side)
    return np.abs(X0 + noise * rng.standard_normal(X0.shape))


def cv_defaults():
    """cross_validate's current defaults of the new options."""
    import inspect
    parameters = inspect.signature(nmf_cv.cross_validate).parameters
    return {name: parameters[name].default for name in BEFORE}


def hard_cv(X, ranks, seed, settings):
    """``settings``: BEFORE, or {} for the current defaults."""
    return nmf_cv.cross_validate(X, ranks, n_folds=5, random_state=seed, progress=False,
                                 **settings)


def chosen_rank(cv, before):
    """Before: the rank of the smallest mean PRESS over folds; after: ``cv.best_rank``."""
    return int(cv.ranks[np.argmin(cv.press_mean)]) if before else cv.best_rank


def worst_fold(ranks, per_fold):
    """Max over ranks of (max fold score / that rank's median), formatted with its rank;
    ``per_fold`` is (ranks, folds); NaN where a rank was not fitted (cross_validate's
    automatic splits fit only the ranks in contention on the later ones)."""
    if per_fold is None:
        return "no per-fold values returned"
    per_fold = np.asarray(per_fold, dtype=float).reshape(len(ranks), -1)
    ratios = np.nanmax(per_fold, axis=1) / np.nanmedian(per_fold, axis=1)
    worst = int(np.argmax(ratios))
    return f"{ratios[worst]:.3g} (k={int(ranks[worst])})"


def nmf_rs_cv_missing():
    """Why nmf-rs's cv_rank cannot run here (it needs pandas), or None."""
    if nmf_rs is None:
        return "nmf-rs is not installed"
    if importlib.util.find_spec("pandas") is None:
        return "pandas, which nmf_rs.cv_rank needs, is not installed"
    return None


def nmf_rs_cv(X, ranks, seed, kwargs):
    """(chosen rank, ranks, per-fold held-out MSE (ranks, folds) or None) of
    ``nmf_rs.cv_rank``; the rank with the smallest mean held-out MSE over its folds."""
    table = nmf_rs.cv_rank(X, list(ranks), seed=seed, **kwargs)
    means = table.groupby("rank")["test_mse"].mean()
    chosen = int(means.idxmin())
    if "fold" not in table.columns:
        return chosen, means.index.to_numpy(), None
    per_fold = table.pivot(index="rank", columns="fold", values="test_mse")
    return chosen, per_fold.index.to_numpy(), per_fold.to_numpy()


def bars_row(seed, ranks, missing):
    """One seed's cells, and the ranks chosen by each run (None: not run)."""
    X = make_bars(seed)
    cells, chosen, others = [seed], [], 0.0
    for label, settings in (("before", BEFORE), ("after", {})):
        log(f"5. bars seed {seed}, ranks {ranks[0]}..{ranks[-1]}: cross_validate {label}")
        wall, cv, busy = measured(hard_cv, X, ranks, seed, settings)
        chosen.append(chosen_rank(cv, label == "before"))
        cells += [chosen[-1], worst_fold(cv.ranks, cv.press), sec(wall)]
        others += busy
    for label, kwargs in NMF_RS_SETTINGS:
        if missing:
            cells += ["n/a"] * 3
            chosen.append(None)
            continue
        log(f"5. bars seed {seed}: nmf_rs.cv_rank {label}")
        wall, (rank, rs_ranks, per_fold), busy = measured(nmf_rs_cv, X, ranks, seed, kwargs)
        chosen.append(rank)
        cells += [rank, worst_fold(rs_ranks, per_fold), sec(wall)]
        others += busy
    return cells + [f"{others:.1f}"], chosen


def bars_table(plan):
    ranks = list(plan.bars_ranks)
    missing = nmf_rs_cv_missing()
    rows, chosen = [], []
    for seed in plan.hard_seeds:
        row, picks = bars_row(seed, ranks, missing)
        rows.append(row)
        chosen.append(picks)
    runs = ["before", "after"] + [f"nmf-rs {label}" for label, _ in NMF_RS_SETTINGS]
    headers = ["seed"] + [f"{run}: {what}" for run in runs
                          for what in ("rank", "worst fold/median", "wall s")]
    headers.append("other processes' CPU s")
    counts = [sum(picks[i] == 16 for picks in chosen) for i in range(len(runs))]
    summary = "Seeds choosing rank 16: " + ", ".join(
        f"{run} not run" if missing and run.startswith("nmf-rs") else f"{run} {count}/{len(chosen)}"
        for run, count in zip(runs, counts, strict=True)) + "."
    defaults = ", ".join(f"{key}={value}" for key, value in cv_defaults().items())
    note = (f"Bars (Hoyer): 400 images of 8x8 pixels, each of the 16 bars (8 rows, 8 columns) "
            "present with probability 0.2 and weight Uniform(0.5, 1.5), plus noise: "
            "`np.abs(X0 + 0.05 * N(0, 1))`, from `np.random.default_rng(seed)`. True rank 16. "
            f"`cross_validate(X, range({ranks[0]}, {ranks[-1] + 1}), n_folds=5, "
            "random_state=seed)`, serial, default BLAS threads: before = `ridge=0, "
            "n_restarts=1, stuck_restarts=0` (the previous release's fits), rank = argmin "
            f"of the mean PRESS over folds; after = the defaults ({defaults}), rank = "
            "`best_rank` (argmin of the "
            "median). Worst fold/median: the largest, over the ranks, of a rank's largest fold "
            "PRESS over its median fold PRESS (with that rank). nmf-rs: `nmf_rs.cv_rank(X, "
            "ranks, seed=seed, ...)` (4 random masks of 5% of the cells by default, masked "
            "ls-nmf fits, rayon's default threads); it returns each fold's held-out MSE and "
            "chooses no rank, so its rank here is the argmin of the mean MSE over folds (its "
            "docstring's rule) and its worst fold/median is computed from the per-fold MSE as "
            "above.")
    if missing:
        note += f" nmf-rs not run: {missing}."
    return "\n\n".join([note, markdown_table(headers, rows), summary])


def planted_table(plan):
    m, n, k = plan.hard_planted
    ranks = list(plan.hard_planted_ranks)
    X = nmf_cv.make_planted(m, n, k, noise=0.1, random_state=0)
    results = {}
    for label, settings in (("before", BEFORE), ("after", {})):
        log(f"5. cross_validate {m}x{n} k={k}, ranks {ranks[0]}..{ranks[-1]}: {label}")
        results[label] = measured(hard_cv, X, ranks, 0, settings)
    defaults = ", ".join(f"{key}={value}" for key, value in cv_defaults().items())
    labels = {"before": "before (ridge=0, n_restarts=1, stuck_restarts=0)",
              "after": f"after (defaults: {defaults})"}
    rows = [[labels[label], sec(wall), ratio(wall, results["before"][0]),
             chosen_rank(cv, label == "before"), worst_fold(cv.ranks, cv.press),
             f"{others:.1f}"] for label, (wall, cv, others) in results.items()]
    headers = ["run", "wall s", "time / before", "chosen rank", "worst fold/median",
               "other processes' CPU s"]
    note = (f"`cross_validate(make_planted({m}, {n}, {k}, noise=0.1, random_state=0), "
            f"range({ranks[0]}, {ranks[-1] + 1}), n_folds=5, random_state=0)`, serial, "
            "default BLAS threads; chosen rank as in the bars table (before: mean, after: "
            f"`best_rank`). Planted rank: {k}.")
    if plan.hard_planted == (1000, 500, 5) and ranks == list(range(1, 11)):
        previous = (f"The previous release took {PREVIOUS_RELEASE_PLANTED_S:.0f} s on this "
                    f"call: before / previous release = "
                    f"{ratio(results['before'][0], PREVIOUS_RELEASE_PLANTED_S)}, after / "
                    f"previous release = {ratio(results['after'][0], PREVIOUS_RELEASE_PLANTED_S)}.")
    else:
        previous = (f"The previous release's {PREVIOUS_RELEASE_PLANTED_S:.0f} s is for 1000x500, "
                    "ranks 1..10: not comparable with this size.")
    return "\n\n".join([note, markdown_table(headers, rows), previous])


def bench_hard(plan):
    return "\n\n".join(["## 5. Hard cases: bars, and the cost of the ridge and restarts",
                        "### Bars: chosen rank and worst fold, before and after, against nmf-rs",
                        bars_table(plan),
                        "### Time of the planted cross-validation, before and after",
                        planted_table(plan)])


# ---------------------------------------------------------------------------------------------
# 6. Scale: sparse counts, large dense matrices, memory
# ---------------------------------------------------------------------------------------------

def process_tree_pss_mb():
    """Proportional set size (MB) of this process and its descendants (pool workers), from
    /proc/PID/smaps_rollup: pages shared between them (the data in shared memory) count once
    in total. NaN where /proc is not there."""
    try:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            children = [p for p, pp in parents.items() if pp == parent and p not in tree]
            tree.update(children)
            frontier += children
        total = 0
        for pid in tree:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024
    except OSError:
        return math.nan


class PeakMemory:
    """Peak proportional set size of the process tree over a block (sampled every 0.1 s) and
    its value at the start: ``peak - base`` is what the block added."""

    def __enter__(self):
        import threading
        self.base = process_tree_pss_mb()
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, process_tree_pss_mb())

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, process_tree_pss_mb())


def sparse_poisson(m, n, k, seed=0):
    """The issue's counts: Poisson(rate), rate = A @ B with A, B ~ Gamma(0.3, 1), mean 0.1."""
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.3, 1.0, (m, k)) @ rng.gamma(0.3, 1.0, (k, n))
    rate *= 0.1 / rate.mean()
    X = sp.csr_matrix(rng.poisson(rate).astype(np.float64))
    del rate
    return X


def full_fit(X, k, loss):
    return nmf_cv.fit_nmf(X, k, loss=loss, random_state=0,
                          **nmf_cv._RANK_FIT_DEFAULTS).n_iter


def measured_memory(function, *args, **kwargs):
    """(wall s, result, peak MB above the start, other processes' CPU s)."""
    import gc
    gc.collect()
    with PeakMemory() as memory, Meter() as meter:
        out = function(*args, **kwargs)
    return meter.wall, out, memory.peak - memory.base, meter.others


def scale_cv(X, ranks, loss, max_iter=None):
    kwargs = {} if max_iter is None else {"max_iter": max_iter}
    with ProcessPoolExecutor(2) as executor:
        return nmf_cv.cross_validate(X, ranks, n_folds=5, loss=loss, random_state=0,
                                     executor=executor, progress=False, **kwargs)


def scale_full_fits(X, ranks, loss):
    import functools
    with ProcessPoolExecutor(2) as executor:
        return list(executor.map(functools.partial(full_fit, X, loss=loss), ranks))


def data_mb(X):
    import scipy.sparse as sp
    if sp.issparse(X):
        return (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2 ** 20
    return X.nbytes / 2 ** 20


def scale_rows(plan):
    rows = []
    m, n, k = plan.scale_sparse
    log(f"6. sparse Poisson {m}x{n}")
    X = sparse_poisson(m, n, k)
    ranks = plan.scale_sparse_ranks
    fits = measured_memory(scale_full_fits, X, ranks, "kl")
    cv = measured_memory(scale_cv, X, ranks, "kl")
    label = (f"sparse Poisson {m}x{n} ({X.nnz / (m * n):.1%} stored), KL, ranks "
             f"{ranks[0]}..{ranks[-1]}")
    rows.append([label, f"{data_mb(X):.0f}", sec(fits[0]), sec(cv[0]), ratio(cv[0], fits[0]),
                 f"{cv[2]:.0f}", f"{cv[2] / data_mb(X):.1f}", cv[1].best_rank,
                 f"{cv[3]:.1f}"])
    del X
    for (m, n, k), dtype, ranks, max_iter in plan.scale_dense:
        log(f"6. dense planted {m}x{n} {np.dtype(dtype).name}")
        X = nmf_cv.make_planted(m, n, k, noise=0.1, random_state=0, dtype=dtype)
        fits = measured_memory(scale_full_fits, X, ranks, "frobenius") if max_iter is None \
            else (math.nan,)
        cv = measured_memory(scale_cv, X, ranks, "frobenius", max_iter)
        note = "" if max_iter is None else f", max_iter={max_iter}"
        rows.append([f"dense planted {m}x{n} rank {k} {np.dtype(dtype).name} ({m * n:.0e} "
                     f"cells), ranks {ranks[0]}..{ranks[-1]}{note}",
                     f"{data_mb(X):.0f}", sec(fits[0]), sec(cv[0]), ratio(cv[0], fits[0]),
                     f"{cv[2]:.0f}", f"{cv[2] / data_mb(X):.1f}", cv[1].best_rank,
                     f"{cv[3]:.1f}"])
        del X
    return rows


def iteration_rows(plan):
    """Time per HALS iteration: dense; a cross_validate training set (one fold of five held
    out, read through the fold rule); a random 20% of cells missing (fit_nmf's masked path)."""
    m, n, _ = plan.scale_iteration
    X = nmf_cv.make_planted(m, n, 8, noise=0.1, random_state=0)
    split = nmf_cv._fold_rule(X.shape, 5, np.random.default_rng(1))
    training = nmf_cv._FoldTraining(X, split, 0)
    missing = X.copy()
    missing[np.random.default_rng(2).random(X.shape) < 0.2] = np.nan
    rows = []
    for k in (8, 16):
        per_iter = {}
        for label, data in (("dense", X), ("training set", training), ("mask", missing)):
            per_iter[label] = min(iteration_seconds(data, k) for _ in range(3))
        rows.append([k, ms(per_iter["dense"]), ms(per_iter["training set"]),
                     ratio(per_iter["training set"], per_iter["dense"]), ms(per_iter["mask"]),
                     ratio(per_iter["mask"], per_iter["dense"])])
    return rows


def iteration_seconds(data, k, n_iter=21):
    """Seconds per iteration from a fit's own clock, set-up and first iteration excluded."""
    res = nmf_cv.fit_nmf(data, k, max_iter=n_iter, tol=0, init="random", random_state=0)
    return (res.time_history[-1] - res.time_history[1]) / (n_iter - 1)


def pool_overhead_mb():
    """What a ProcessPoolExecutor(2) whose workers imported nmf_cv adds on its own."""
    base = process_tree_pss_mb()
    with ProcessPoolExecutor(2) as executor:
        list(executor.map(nmf_cv.noise_level, [np.ones((4, 4))] * 4))
        return process_tree_pss_mb() - base


def bench_scale(plan):
    headers = ["data and call", "data MB", "9 full fits s" if not plan.quick else "full fits s",
               "CV s", "CV / full fits", "CV peak MB above data", "peak / data",
               "chosen rank", "other processes' CPU s"]
    m, n, _ = plan.scale_iteration
    note = ("`cross_validate(X, ranks, n_folds=5, loss=..., random_state=0, "
            "executor=ProcessPoolExecutor(2))` with the default fits (`max_iter=2000, "
            "tol=1e-6`), against fitting each rank once to the whole matrix on the same pool "
            "(`fit_nmf`, same options). Memory: the peak proportional set size of this process "
            "and its workers (sampled every 0.1 s), above its value with the data loaded: "
            "pages the workers share (the data in shared memory) count once. That includes "
            "the caller's copy of the data into shared memory (1x the data), and the pool's "
            f"own processes: {pool_overhead_mb():.0f} MB for two idle workers that imported "
            "nmf_cv.")
    return "\n\n".join([
        "## 6. Scale: sparse counts and large dense matrices",
        note, markdown_table(headers, scale_rows(plan)),
        f"### Time per HALS iteration ({m}x{n}, planted rank 8, milliseconds)",
        "A `cross_validate` training set (5 folds: 20% held out through the fold rule) and "
        "`fit_nmf` with 20% of cells missing at random (NaN), against the dense fit; set-up "
        "excluded, best of 3 runs of 20 iterations.",
        markdown_table(["k", "dense ms", "training set ms", "training / dense", "20% NaN ms",
                        "NaN / dense"], iteration_rows(plan))])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def warm_up():
    """Compile (or load from numba's cache) the kernels the benchmark uses."""
    X = nmf_cv.make_planted(40, 30, 3, noise=0.1, random_state=0)
    nmf_cv.cross_validate(X, [2], n_folds=2, random_state=0, progress=False, max_iter=5)
    nmf_cv.cross_validate(np.round(10 * X), [2], n_folds=2, loss="kl", random_state=0,
                          progress=False, max_iter=5)
    nmf_cv.consensus(X, [2], n_runs=2, stop="max_iter", max_iter=5, random_state=0,
                     progress=False)


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


# the order (and numbers) of the output
SECTIONS = ("cv", "consensus", "iteration", "kl", "hard", "scale")
CARRIED = "_Not rerun:"


def parse_sections(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sections are a comma list of {', '.join(SECTIONS)}; "
                                         f"got {text!r}")
    return [name for name in SECTIONS if name in names]


def read_previous(path, current_revision):
    """Sections of an earlier output of this script, each marked as copied from its run."""
    lines = Path(path).read_text().splitlines()
    machine = next((line for line in lines if line.startswith("Machine:")), "")
    revision = re.search(r"\(git (.+?) at import", machine)
    dates = re.search(r"started (.+?), ended (.+?);", machine)
    old = revision.group(1) if revision else "unknown"
    changed = "" if old == current_revision else f"; nmf_cv is now at git {current_revision}"
    origin = (f"{CARRIED} copied from a previous run (nmf_cv git {old} at import; "
              + (f"started {dates.group(1)}, ended {dates.group(2)}" if dates else "date unknown")
              + f"{changed}), whose machine line was: " + machine.removeprefix("Machine: ")
              + "_")
    sections, key = {}, None
    for line in lines:
        heading = re.match(r"## (\d+)\.", line)
        if heading:
            number = int(heading.group(1))
            key = SECTIONS[number - 1] if 1 <= number <= len(SECTIONS) else None
            if key is not None:
                sections[key] = [line]
            continue
        if line.startswith("Benchmark wall time"):
            key = None
        if key is not None:
            sections[key].append(line)
    out = {}
    for key, body in sections.items():
        text = "\n".join(body).strip()
        if not any(line.startswith(CARRIED) for line in body):
            text = "\n\n".join([body[0], origin, "\n".join(body[1:]).strip()])
        out[key] = text
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, 2 restarts, 50 iterations, no idle wait (smoke test)")
    parser.add_argument("--runs", type=int, default=20,
                        help="consensus restarts per rank (default 20)")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help="comma list of sections to run: cv,consensus,iteration,kl,hard,"
                        "scale (default all)")
    parser.add_argument("--previous", metavar="FILE",
                        help="an earlier output of this script: copy the sections not run "
                        "from it (marked as such)")
    parser.add_argument("--kl-budget", type=float, default=300.0,
                        help="run the large count-data size (section 4) only when it is "
                        "estimated to take at most this many seconds (default 300)")
    parser.add_argument("--nimfa-python", default=str(NIMFA_PYTHON),
                        help="python of a venv with nimfa and numpy<2")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for the load average to fall")
    args = parser.parse_args(argv)
    plan = Plan(args.quick, args.runs, args.kl_budget)
    if not MEDULLO.exists() and {"consensus", "iteration"} & set(args.sections):
        log(f"missing {MEDULLO}")
        return 1
    wait = not (args.quick or args.no_wait)
    start = {"revision": git_revision(), "digest": source_digest(), "date": now(),
             "clock": time.perf_counter()}
    previous = read_previous(args.previous, start["revision"]) if args.previous else {}
    log("warm-up (numba compile)")
    warm_up()
    benches = {"cv": (bench_cv, plan), "consensus": (bench_consensus, plan, args.nimfa_python),
               "iteration": (bench_iteration, plan), "kl": (bench_count_cv, plan),
               "hard": (bench_hard, plan), "scale": (bench_scale, plan)}
    done, nimfa_versions = {}, "not run"
    for name in args.sections:
        text, conditions = run_section(wait, *benches[name])
        if name == "consensus":
            text, nimfa_versions = text
        done[name] = (text, conditions)
    first = done[args.sections[0]][1]
    start.update(load=first["load"], waited=first["waited"])
    print("# nmf_cv rank-selection benchmarks" + (" (--quick)" if args.quick else ""))
    print()
    print(machine_header(start, nimfa_versions))
    if len(args.sections) < len(SECTIONS):
        print()
        print(f"Sections run this time: {', '.join(args.sections)}"
              + ("; the others, where shown, are copied from an earlier run and marked so."
                 if previous else "."))
    for name in SECTIONS:
        if name in done:
            text, conditions = done[name]
            print()
            print(text)
            print()
            print(conditions_note(conditions))
        elif name in previous:
            print()
            print(previous[name])
    print()
    print(f"Benchmark wall time (sections run this time): "
          f"{time.perf_counter() - start['clock']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

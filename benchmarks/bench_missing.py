"""Benchmark missing values: a masked HALS iteration against a dense one, and
cross-validation with 20% of cells missing against the fully observed call, at HEAD and at
an earlier revision side by side.

Prints markdown tables (with a machine header) to stdout; progress goes to stderr. Run from
the repository root, the earlier revision checked out beside it::

    git worktree add ../base e7e979a
    python benchmarks/bench_missing.py --base ../base
    python benchmarks/bench_missing.py --base ../base --quick   # small shapes, a smoke test

What is measured (one BLAS thread; numba compiled before anything is timed)
--------------------------------------------------------------------------
1. Masked / dense time per HALS iteration, at each revision: ``fit_nmf(tol=0)`` from the
   same init, the median ``time_history`` difference after the first two iterations, the
   dense and masked fits (and the revisions) alternating. Planted data
   (``make_planted(..., noise=0.05)``); missing cells at random, or in blocks (the rows
   dealt into 10 batches, each missing its own random set of columns, as in proteomics).
2. ``cross_validate`` on planted 1000 x 500 (rank 5, noise 0.1), ranks 1..10, 5 folds,
   ``n_repeats=1`` (one split: the same work at both revisions), serial: fully observed and
   with 20% of cells missing at random. The two revisions alternate, twice.
3. Peak memory of ``cross_validate`` on 20000 x 500 with 20% missing, ranks 2 and 4, 5
   folds, one split, serial, in a fresh process: the data (80 MB) plus the peak of what
   numpy allocates during the call (tracemalloc; numba's small kernel buffers are not
   counted).
4. Where a masked iteration's time goes (HEAD only), 4000 x 1000, 20% missing at random,
   k = 8, 16, 32: a dense and a masked iteration as in 1, the exact-step bound
   1 + k f / 2 times the dense one, and the masked iteration's parts, each the best of 5
   calls from the same point: the two products with X (``products_W``, ``products_H``),
   each update with no sweep (forming every line's Gram matrix from the table of b b'
   products), its sweeps (the update less that), and the table sums alone
   (``_sum_pairs`` over every line's cells, called from Python), with the rate at which
   they add table entries.
"""

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    blas_description,
    cpu_model,
    load_average,
    log,
    markdown_table,
    module_revision,
)

SHAPES = ((20000, 500), (500, 20000), (2000, 1000), (300, 300))
QUICK_SHAPES = ((2000, 1000), (300, 300))
KS = (5, 16, 32)
FRACTIONS = (0.05, 0.2, 0.3)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, Path(path) / "nmf_cv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def with_missing(X, fraction, pattern, seed=1):
    rng = np.random.default_rng(seed)
    Y = X.copy()
    if pattern == "random":
        Y[rng.random(X.shape) < fraction] = np.nan
        return Y
    m, n = X.shape
    for batch in np.array_split(rng.permutation(m), 10):
        Y[np.ix_(batch, rng.choice(n, int(fraction * n), replace=False))] = np.nan
    return Y


def per_iteration(nmf_cv, X, init, n_iter):
    res = nmf_cv.fit_nmf(X, init[0].shape[1], init=init, max_iter=n_iter, tol=0)
    return float(np.median(np.diff(res.time_history)[2:]))


def iteration_rows(modules, shapes):
    """One row per case: each revision's dense and masked ms and their ratio, the
    revisions' fits alternating."""
    nmf_cv = modules[-1][1]
    for _, module in modules:  # compile, dense and masked (patterns swept together too)
        Z = module.make_planted(200, 100, 3, random_state=0)
        for pattern in ("random", "blocks"):
            module.fit_nmf(with_missing(Z, 0.2, pattern), 3, max_iter=3)
        module.fit_nmf(Z, 3, max_iter=3)
    rows = []
    for m, n in shapes:
        for k in KS:
            X = nmf_cv.make_planted(m, n, k, noise=0.05, random_state=0)
            init = nmf_cv._initialize(nmf_cv._validate_data(X), k, "nndsvda",
                                      np.random.default_rng(0))
            n_iter = max(6, min(20, int(3e8 / (m * n * k))))
            for pattern in ("random", "blocks"):
                for fraction in FRACTIONS:
                    Y = with_missing(X, fraction, pattern)
                    row = [f"{m}x{n}", k, pattern, f"{fraction:.0%}"]
                    times = {}
                    for _ in range(2):
                        for label, module in modules:
                            times.setdefault(label, ([], []))
                            times[label][0].append(per_iteration(module, X, init, n_iter))
                            times[label][1].append(per_iteration(module, Y, init, n_iter))
                    for label, _ in modules:
                        d, t = (float(np.median(v)) for v in times[label])
                        row += [f"{1e3 * d:.2f}", f"{1e3 * t:.2f}", f"{t / d:.2f}"]
                    rows.append(row)
                    log(" ".join(str(c) for c in row))
    return rows


def cv_rows(modules, repeats):
    X = modules[0][1].make_planted(1000, 500, 5, noise=0.1, random_state=4)
    Y = with_missing(X, 0.2, "random")
    kw = dict(random_state=0, progress=False, n_repeats=1)
    for _, nmf_cv in modules:  # compile
        nmf_cv.cross_validate(X[:60, :40], [1, 2], **kw)
        nmf_cv.cross_validate(Y[:60, :40], [1, 2], **kw)
    times = {(label, d): [] for label, _ in modules for d in ("full", "missing")}
    picks = {}
    for _ in range(repeats):
        for label, nmf_cv in modules:
            for d, data in (("full", X), ("missing", Y)):
                start = time.perf_counter()
                cv = nmf_cv.cross_validate(data, range(1, 11), **kw)
                times[label, d].append(time.perf_counter() - start)
                picks[label, d] = cv.best_rank
                log(f"{label} {d}: {times[label, d][-1]:.1f} s, best_rank {cv.best_rank}")
    rows = []
    for label, _ in modules:
        full, missing = (np.median(times[label, d]) for d in ("full", "missing"))
        rows.append([label, f"{full:.1f}", picks[label, "full"], f"{missing:.1f}",
                     picks[label, "missing"], f"{missing / full:.2f}"])
    if len(modules) == 2:
        ratio = [np.median(times[modules[1][0], d]) / np.median(times[modules[0][0], d])
                 for d in ("full", "missing")]
        rows.append(["HEAD / base", f"{ratio[0]:.2f}", "", f"{ratio[1]:.2f}", "", ""])
    return rows


def best_of(function, *args, repeats=5):
    """The shortest of ``repeats`` calls of function(*args), in seconds."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - start)
    return best


def update_parts(nmf_cv, solver, A, B, products, lines, most):
    """One side's update: (seconds with no sweep, seconds of its sweeps, seconds of the table
    sums alone, table entries they add)."""
    def update(n_sweeps):
        return nmf_cv._cd_lines(A.copy(), B, products, lines, (0.0, 0.0), (n_sweeps, 0.1),
                                solver.scratch, False)

    no_sweep = best_of(update, 0)
    sweeps = best_of(update, most) - no_sweep
    table = lines.table(B)
    if table is None:  # the kernel gathers cells instead: no table sums to time
        return no_sweep, sweeps, 0.0, 0
    exact = lines.exact.astype(np.int64)
    sums = best_of(table_sums, nmf_cv._sum_pairs, table, lines.ptr, lines.idx, exact)
    return no_sweep, sweeps, sums, int(np.sum(np.diff(lines.ptr)[exact])) * table.shape[1]


@njit
def table_sums(sum_pairs, table, ptr, idx, lines):
    """`_sum_pairs` over each line's cells, in one compiled loop (no call from Python each)."""
    acc = np.empty(table.shape[1])
    for a in lines:
        sum_pairs(table, idx[ptr[a]:ptr[a + 1]], acc)


def breakdown_row(nmf_cv, k, m=4000, n=1000, fraction=0.2):
    """Section 4's row for rank k, milliseconds."""
    X = nmf_cv.make_planted(m, n, k, noise=0.05, random_state=0)
    Y = with_missing(X, fraction, "random")
    init = nmf_cv._initialize(nmf_cv._validate_data(X), k, "nndsvda", np.random.default_rng(0))
    dense = min(per_iteration(nmf_cv, X, init, 12) for _ in range(2))
    masked = min(per_iteration(nmf_cv, Y, init, 12) for _ in range(2))
    s = nmf_cv._setup_fit(nmf_cv._validate_data(Y), k, nmf_cv._FitOptions(init=init))
    for _ in range(3):
        s.step()
    products = best_of(s.lay.products_W, s.Ht) + best_of(s.lay.products_H, s.W)
    parts = [update_parts(nmf_cv, s, s.W, s.Ht, s.lay.products_W(s.Ht), s.rows, s.sweeps_W),
             update_parts(nmf_cv, s, s.Ht, s.W, s.lay.products_H(s.W), s.cols, s.sweeps_H)]
    gram, sweeps, sums, entries = (sum(values) for values in zip(*parts, strict=True))
    return [k, f"{1e3 * dense:.2f}", f"{1e3 * masked:.2f}", f"{masked / dense:.2f}",
            f"{1 + k * fraction / 2:.1f}", f"{1e3 * products:.2f}", f"{1e3 * gram:.2f}",
            f"{1e3 * sweeps:.2f}", f"{1e3 * sums:.2f}" if sums else "",
            f"{entries / sums / 1e9:.1f}" if sums else ""]


def breakdown_rows(nmf_cv):
    rows = []
    for k in (8, 16, 32):
        rows.append(breakdown_row(nmf_cv, k))
        log(" ".join(str(c) for c in rows[-1]))
    return rows


MEMORY_SCRIPT = """
import sys, time, tracemalloc, numpy as np
sys.path.insert(0, sys.argv[1])
import nmf_cv
X = nmf_cv.make_planted(20000, 500, 4, noise=0.1, random_state=0)
X[np.random.default_rng(1).random(X.shape) < 0.2] = np.nan
nmf_cv.cross_validate(X[:200, :50], [2], random_state=0, progress=False, n_repeats=1)
tracemalloc.start()
start = time.perf_counter()
nmf_cv.cross_validate(X, [2, 4], random_state=0, progress=False, n_repeats=1)
print(tracemalloc.get_traced_memory()[1], X.nbytes, time.perf_counter() - start)
"""


def memory_rows(modules):
    rows = []
    for label, module in modules:
        path = str(Path(module.__file__).parent)
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, path], capture_output=True,
                             text=True, check=True,
                             env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                  "PATH": "/usr/bin:/bin"})
        peak, data, seconds = (float(v) for v in out.stdout.split()[-3:])
        log(f"{label} memory: peak {peak / 1e6:.0f} MB over {data / 1e6:.0f} MB of data, "
            f"{seconds:.0f} s")
        rows.append([label, f"{peak / 1e6:.0f}", f"{peak / data:.2f}",
                     f"{(data + peak) / data:.2f}", f"{seconds:.0f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", metavar="DIR", help="a checkout of the earlier revision")
    parser.add_argument("--quick", action="store_true", help="small shapes, one CV repeat")
    parser.add_argument("--sections", default="123", help="which sections to run")
    args = parser.parse_args(argv)
    threadpool_limits(1, user_api="blas")
    start, load_start = time.perf_counter(), load_average()
    head = load(ROOT, "nmf_cv")
    modules = [("HEAD", head)]
    if args.base:
        modules.insert(0, ("base", load(args.base, "nmf_cv_base")))
    print("# nmf_cv missing-value benchmarks" + (" (--quick)" if args.quick else ""))
    print()
    revision = module_revision(ROOT)
    base_rev = module_revision(args.base) if args.base else ""
    print(f"HEAD {revision}" + (f", base {base_rev}" if base_rev else "") +
          f"; {cpu_model()}; BLAS {blas_description()}; load average at start {load_start}")
    if "1" in args.sections:
        log("1. masked / dense per iteration")
        rows = iteration_rows(modules, QUICK_SHAPES if args.quick else SHAPES)
        print()
        print("## 1. Masked / dense time per HALS iteration")
        print()
        headers = ["shape", "k", "missing", "fraction"]
        for label, _ in modules:
            headers += [f"{label} dense ms", f"{label} masked ms", f"{label} masked / dense"]
        print(markdown_table(headers, rows))
    if "2" in args.sections:
        log("2. cross-validation")
        print()
        print("## 2. cross_validate, planted 1000 x 500, ranks 1..10, 5 folds, one split, "
              "serial")
        print()
        print(markdown_table(["revision", "fully observed s", "pick", "20% missing s", "pick",
                              "missing / full"], cv_rows(modules, 1 if args.quick else 2)))
    if "3" in args.sections:
        log("3. memory")
        print()
        print("## 3. Peak memory, cross_validate on 20000 x 500 with 20% missing (80 MB of "
              "data), ranks 2 and 4, one split, serial")
        print()
        print(markdown_table(["revision", "allocated during the call, MB", "x data",
                              "data + that, x data", "seconds"], memory_rows(modules)))
    if "4" in args.sections:
        log("4. where a masked iteration's time goes")
        print()
        print("## 4. A masked HALS iteration's parts, 4000 x 1000, 20% missing at random, ms")
        print()
        print(markdown_table(["k", "dense iteration", "masked iteration", "masked / dense",
                              "bound 1 + kf/2", "products with X", "Gram matrices (updates "
                              "with no sweep)", "sweeps", "table sums alone",
                              "table entries added per ns"], breakdown_rows(head)))
    print()
    print(f"Load average at end {load_average()}; wall time "
          f"{time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

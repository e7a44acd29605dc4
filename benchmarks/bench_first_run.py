"""A new user's first run: how much longer it takes with an empty numba cache than warm.

The script a student or a quick analysis starts with: fit a dense matrix, a matrix with NaN,
sparse counts by KL, and cross-validate a small matrix. Each repeat runs it in a fresh
interpreter twice with the same new ``NUMBA_CACHE_DIR``: cold (every kernel compiles and is
cached), then warm (every kernel loads from the cache). Prints per step the median seconds
cold and warm, then the median cold - warm of the whole script in CPU and wall seconds. One
BLAS thread. Run from the repository root::

    python benchmarks/bench_first_run.py                        # this checkout
    python benchmarks/bench_first_run.py --module-path ../base  # another checkout's nmf_cv
    python benchmarks/bench_first_run.py --against ../base      # cold, in pairs with another

``--against``: on a machine whose speed drifts between runs, a difference of a second in
compile time shows only in pairs: each repeat runs the script cold with this checkout and with
the other, in alternating order, and the table lists every pair's step times.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT

SCRIPT = """
import collections, json, sys, time
start = time.perf_counter()
import numpy as np
import scipy.sparse as sp
from numba.core import event
import nmf_cv
steps = {"import": time.perf_counter() - start}
kernels, stack = collections.Counter(), []  # compile seconds of each kernel, callees apart

class Kernels(event.Listener):
    def on_start(self, e):
        name = getattr(e.data.get("dispatcher"), "__name__", "numba internals")
        stack.append([time.perf_counter(), name, 0.0])

    def on_end(self, e):
        began, name, callees = stack.pop()
        spent = time.perf_counter() - began
        kernels[name] += spent - callees
        if stack:
            stack[-1][2] += spent

event.register("numba:compile", Kernels())

def step(name, run):
    begin = time.perf_counter()
    run()
    steps[name] = time.perf_counter() - begin

X = nmf_cv.make_planted(150, 80, 3, noise=0.05, random_state=0)
Xn = X.copy()
Xn[np.random.default_rng(0).random(X.shape) < 0.1] = np.nan
C = sp.random(300, 200, density=0.2, random_state=0, format="csr")
C.data = np.round(C.data * 10) + 1
step("dense", lambda: nmf_cv.fit_nmf(X, 3, random_state=0))
step("NaN", lambda: nmf_cv.fit_nmf(Xn, 3, random_state=0))
step("sparse KL", lambda: nmf_cv.fit_nmf(C, 3, loss="kl", random_state=0))
step("CV", lambda: nmf_cv.cross_validate(X, range(1, 6), random_state=0, progress=False))
print(json.dumps({"file": nmf_cv.__file__, "steps": steps, "kernels": kernels}))
"""


WARM = """
import json, time
import numpy as np
import scipy.sparse as sp
import nmf_cv

def planted(m, n, k, missing=0.0):
    X = nmf_cv.make_planted(m, n, k, noise=0.05, random_state=0)
    X[np.random.default_rng(1).random(X.shape) < missing] = np.nan
    return X

counts = sp.random(5000, 1000, density=0.1, random_state=0, format="csr")
counts.data = np.round(counts.data * 10) + 1
cases = [("dense HALS 2000 x 1000, k = 16", planted(2000, 1000, 16), 16, {}),
         ("HALS, 20% NaN, 2000 x 1000, k = 8", planted(2000, 1000, 8, 0.2), 8, {}),
         ("HALS, 10% NaN, 300 x 200, k = 4", planted(300, 200, 4, 0.1), 4, {}),
         ("KL CD, sparse 5000 x 1000, k = 8", counts, 8, {"loss": "kl"})]
out = {}
for name, X, k, kw in cases:
    nmf_cv.fit_nmf(X, k, max_iter=3, tol=0, random_state=0, **kw)  # compiled before timing
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        nmf_cv.fit_nmf(X, k, max_iter=60, tol=0, random_state=0, **kw)
        times.append((time.perf_counter() - begin) / 60)
    out[name + ", ms per iteration"] = 1e3 * min(times)
X = planted(150, 80, 3)
nmf_cv.cross_validate(X, [1, 2], random_state=0, progress=False)
begin = time.perf_counter()
nmf_cv.cross_validate(X, range(1, 6), random_state=0, progress=False)
out["cross-validation 150 x 80, ranks 1..5, s"] = time.perf_counter() - begin
print(json.dumps(out))
"""


def run_once(module_path, cache, script=SCRIPT):
    """(steps, CPU seconds, wall seconds) of the script in a fresh interpreter."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": module_path,
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=cache)  # not the checkout: its nmf_cv.py
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, cpu, sum(result.get("steps", {}).values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-path", help="directory holding the nmf_cv.py to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm", action="store_true",
                        help="also time warm kernels (best of 3 fits of 60 iterations each)")
    parser.add_argument("--against", metavar="DIR",
                        help="another checkout: cold runs of both in pairs, taking turns")
    parser.add_argument("--kernels", action="store_true",
                        help="also list each kernel's compile seconds (median over cold runs)")
    args = parser.parse_args(argv)
    module_path = str(Path(args.module_path).resolve() if args.module_path else ROOT)
    if args.against:
        return pairs(module_path, str(Path(args.against).resolve()), args.repeats)
    runs = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                runs[kind].append(run_once(module_path, cache))
    file = runs["cold"][0][0]["file"]
    print(f"{file}: median of {args.repeats} fresh interpreters, seconds")
    print("| step | cold | warm |")
    print("|---|---|---|")
    for name in runs["cold"][0][0]["steps"]:
        cold = statistics.median(r[0]["steps"][name] for r in runs["cold"])
        warm = statistics.median(r[0]["steps"][name] for r in runs["warm"])
        print(f"| {name} | {cold:.2f} | {warm:.2f} |")
    if args.kernels:
        names = {name for r in runs["cold"] for name in r[0]["kernels"]}
        spent = {name: statistics.median(r[0]["kernels"].get(name, 0.0) for r in runs["cold"])
                 for name in names}
        print("\n| kernel (its callees apart) | compile, s |\n|---|---|")
        for name in sorted(spent, key=spent.get, reverse=True):
            print(f"| {name} | {spent[name]:.2f} |")
        print()
    if args.warm:
        with tempfile.TemporaryDirectory() as cache:
            warm = run_once(module_path, cache, WARM)[0]
        print("\n| warm | time |\n|---|---|")
        for name, value in warm.items():
            print(f"| {name} | {value:.3f} |")
        print()
    for index, what in ((1, "CPU"), (2, "wall")):
        cold = statistics.median(r[index] for r in runs["cold"])
        warm = statistics.median(r[index] for r in runs["warm"])
        print(f"| whole script, {what} | {cold:.2f} | {warm:.2f} (cold - warm {cold - warm:.2f}) |")


def pairs(this, other, repeats):
    """Cold runs of two modules in pairs, in alternating order; prints each pair's steps."""
    rows = []
    for r in range(repeats):
        runs = {}
        for path in (this, other) if r % 2 == 0 else (other, this):
            with tempfile.TemporaryDirectory() as cache:
                runs[path] = run_once(path, cache)
        rows.append(runs)
    steps = list(rows[0][this][0]["steps"])
    print(f"cold seconds in pairs, {other} / {this}")
    print("| pair | " + " | ".join(steps) + " | whole script, CPU |")
    print("|---" * (len(steps) + 2) + "|")
    for i, runs in enumerate(rows, 1):
        cells = [f"{runs[other][0]['steps'][s]:.2f} / {runs[this][0]['steps'][s]:.2f}"
                 for s in steps]
        cells.append(f"{runs[other][1]:.2f} / {runs[this][1]:.2f}")
        print(f"| {i} | " + " | ".join(cells) + " |")
    saved = [runs[other][1] - runs[this][1] for runs in rows]
    print(f"\nmedian over the pairs of the CPU seconds saved: {statistics.median(saved):.2f}")


if __name__ == "__main__":
    main()

"""Dense KL multiplicative updates (consensus clustering's solver): milliseconds per iteration
without the objective, as `consensus` runs them, at a few shapes and ranks, with and without
missing cells; then the quick start's consensus with 10 runs per rank.

Each module runs in its own fresh interpreter (one BLAS thread), the modules taking turns, twice;
the table gives the best time of each. Run from the repository root::

    python benchmarks/bench_kl_mu.py                          # this checkout alone
    python benchmarks/bench_kl_mu.py --module-path ../base    # and another checkout's nmf_cv
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import ROOT, markdown_table

SHAPES = [(300, 200, 0.1), (300, 200, 0.0), (2000, 1000, 0.1), (2000, 1000, 0.0), (5000, 38, 0.0)]
RANKS = (2, 4, 8, 16)

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import nmf_cv
from threadpoolctl import threadpool_limits

threadpool_limits(1)
shapes, ranks = json.loads(sys.argv[2])
out = {}
for m, n, missing in shapes:
    X = nmf_cv.make_planted(m, n, 4, noise=0.05, missing=missing, random_state=0)
    steps = 200 if m * n < 10 ** 6 else 15
    for k in ranks:
        options = nmf_cv._FitOptions(method="mu", loss="kl", init="random", random_state=0)
        solver = nmf_cv._setup_fit(nmf_cv._validate_data(X), k, options)
        solver.step(want_loss=False)  # compiled before timing
        best = float("inf")
        for _ in range(3):
            begin = time.perf_counter()
            for _ in range(steps):
                solver.step(want_loss=False)
            best = min(best, (time.perf_counter() - begin) / steps)
        out[f"{m} x {n}, {missing:.0%} missing, k = {k}: ms per iteration"] = 1e3 * best
X = nmf_cv.make_planted(300, 200, 4, noise=0.05, missing=0.1, random_state=0)
begin = time.perf_counter()
res = nmf_cv.consensus(X, range(2, 9), n_runs=10, random_state=0, progress=False)
out["quick start's consensus, ranks 2..8, 10 runs each: s"] = time.perf_counter() - begin
out["its cophenetic coefficients"] = " ".join(f"{c:.4f}" for c in res.cophenetic)
print(json.dumps(out))
"""


def run(module_path):
    out = subprocess.run([sys.executable, "-c", CHILD, module_path, json.dumps([SHAPES, RANKS])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-path", help="another directory holding an nmf_cv.py")
    args = parser.parse_args(argv)
    paths = [str(ROOT)] + ([str(Path(args.module_path).resolve())] if args.module_path else [])
    results = {path: [] for path in paths}
    for _ in range(2):
        for path in paths:
            results[path].append(run(path))
    rows = []
    for key, first in results[paths[0]][0].items():
        if isinstance(first, str):
            rows.append([key] + [results[path][0][key] for path in paths])
        else:
            rows.append([key] + [f"{min(r[key] for r in results[path]):.3g}" for path in paths])
    print(markdown_table([""] + paths, rows))

if __name__ == "__main__":
    main()

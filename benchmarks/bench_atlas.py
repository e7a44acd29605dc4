"""Atlas scale: the command line's rank selection on single-cell-like counts, its wall time and
the memory of its whole process tree.

Simulates counts of ``--cells`` cells x ``--genes`` genes with ``--programs`` planted programs (a
block of cells at a time, so the simulation itself never holds a dense matrix), saves them as a
float32 CSR ``.npz`` (kept in ``--data-dir`` and reused), then runs::

    python -m nmf_cv rank cells.npz --loss kl --ranks 6:10 --criteria cv --jobs 2

in a fresh process, sampling every 0.2 s the proportional set size (PSS: shared memory counted
once over the processes that map it) of the command and of its workers. Prints one markdown
table row: wall time, the tree's peak PSS, the stored entries, the pick. Run from the
repository root::

    python benchmarks/bench_atlas.py                                 # 200,000 x 2,000
    python benchmarks/bench_atlas.py --cells 50000 --ranks 7:8
    python benchmarks/bench_atlas.py --module-path ../base           # another checkout
    python benchmarks/bench_atlas.py --criteria stability --ranks 7:9
    python benchmarks/bench_atlas.py --cells 50000 --fit-runs 10     # fit -k 8 --runs 10

Counts: cell i's usages of the programs are Gamma(0.5); each program is a shared Gamma(0.3)
background times Gamma(2, 0.5) noise plus its own 10% of the genes as markers (so programs
overlap); library sizes are log-normal (sigma 0.5), their median set so that about
``--density`` of the entries are stored; counts are Poisson.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _common import ROOT, cpu_model, markdown_table, now


def programs(rng, n_genes, k):
    background = rng.gamma(0.3, 1.0, size=n_genes)
    H = background * rng.gamma(2.0, 0.5, size=(k, n_genes))
    for j in range(k):
        markers = rng.choice(n_genes, size=n_genes // 10, replace=False)
        H[j, markers] += rng.gamma(2.0, 2.0, size=markers.size)
    return H / H.sum(axis=1, keepdims=True)


def median_library(rng, H, density, sigma, trials=4000):
    """The median library size whose expected share of stored entries is ``density``."""
    P = rng.gamma(0.5, 1.0, size=(trials, H.shape[0])) @ H
    P /= P.sum(axis=1, keepdims=True)
    z = rng.lognormal(0.0, sigma, size=(trials, 1))
    lo, hi = 1.0, 1e6
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if 1.0 - np.exp(-mid * z * P).mean() < density else (lo, mid)
    return mid


def simulate(n_cells, n_genes, k, density, seed=0, sigma=0.5, block=5000):
    rng = np.random.default_rng(seed)
    H = programs(rng, n_genes, k)
    median = median_library(rng, H, density, sigma)
    blocks = []
    for start in range(0, n_cells, block):
        P = rng.gamma(0.5, 1.0, size=(min(block, n_cells - start), k)) @ H
        P /= P.sum(axis=1, keepdims=True)
        P *= median * rng.lognormal(0.0, sigma, size=(P.shape[0], 1))
        blocks.append(sp.csr_matrix(rng.poisson(P).astype(np.float32)))
    return sp.vstack(blocks, format="csr")


def tree(pid):
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text()
                         .split()]
        except OSError:
            pass
    return out


def pss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(args, path, out_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(args.module_path or ROOT).resolve()), os.environ.get("PYTHONPATH", "")]))
    if args.fit_runs:  # consensus programs at the planted k
        command = [sys.executable, "-m", "nmf_cv", "fit", str(path), "--loss", "kl", "-k",
                   str(args.programs), "--runs", str(args.fit_runs), "--samples", "rows",
                   "--jobs", str(args.jobs),
                   "--out", str(out_dir / "atlas"), *args.extra.split()]
    else:
        command = [sys.executable, "-m", "nmf_cv", "rank", str(path), "--loss", "kl",
                   "--ranks", args.ranks, "--criteria", args.criteria, "--jobs",
                   str(args.jobs), "--out", str(out_dir / "atlas"), *args.extra.split()]
    print(" ".join(command[1:]), file=sys.stderr)
    imported = subprocess.run([sys.executable, "-c", "import nmf_cv; print(nmf_cv.__file__)"],
                              env=env, cwd=out_dir, capture_output=True, text=True, check=True)
    print(f"nmf_cv from {imported.stdout.strip()}", file=sys.stderr)
    start = time.perf_counter()
    with open(out_dir / "log.txt", "w") as log:
        # cwd: not the checkout, whose nmf_cv.py `-m` would import before PYTHONPATH's
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=out_dir)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, sum(pss_mb(p) for p in tree(proc.pid)))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"the command failed; its log: {out_dir / 'log.txt'}")
    if args.fit_runs:
        fit = json.loads((out_dir / "atlas_fit.json").read_text())
        worst = min(fit["component_stability"].values())
        return wall, peak, f"worst component stability {worst:.3f}"
    report = json.loads((out_dir / "atlas_rank.json").read_text())
    return wall, peak, ", ".join(f"{name} {rank}" for name, rank in report["suggestions"].items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--programs", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.12)
    parser.add_argument("--ranks", default="6:10")
    parser.add_argument("--criteria", default="cv")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--fit-runs", type=int, metavar="R",
                        help="run `fit -k PROGRAMS --runs R` (consensus programs) instead")
    parser.add_argument("--extra", default="", help="more arguments for the command")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "nmf_cv_atlas"))
    parser.add_argument("--module-path", metavar="DIR", help="nmf_cv from this checkout")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir).resolve()  # the command runs in another folder
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"counts_{args.cells}x{args.genes}_k{args.programs}_d{args.density}.npz"
    if not path.exists():
        t = time.perf_counter()
        sp.save_npz(path, simulate(args.cells, args.genes, args.programs, args.density),
                    compressed=False)
        print(f"simulated {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    X = sp.load_npz(path)
    data_mb = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 1e6
    with tempfile.TemporaryDirectory() as out_dir:
        wall, peak, outcome = run(args, path, Path(out_dir))
    task = (f"fit -k {args.programs} --runs {args.fit_runs}" if args.fit_runs else
            f"rank --ranks {args.ranks} --criteria {args.criteria}")
    print(f"{now()}, {cpu_model()}, {os.cpu_count()} cores\n")
    print(markdown_table(
        ["cells x genes", "stored", "data MB", "command", "jobs", "wall s",
         "tree peak PSS MB", "outcome"],
        [[f"{X.shape[0]:,} x {X.shape[1]:,}", f"{X.nnz:,} ({X.nnz / np.prod(X.shape):.1%})",
          f"{data_mb:.0f}", task, args.jobs, f"{wall:.0f}", f"{peak:.0f}", outcome]]))


if __name__ == "__main__":
    main()

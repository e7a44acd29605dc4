"""What an iteration cap does to consensus: Brunet's runs (KL multiplicative updates from random
inits, each until its clustering has not changed for 400 iterations, at most 2000), with each
run's clustering also read at lower caps (500, 1000, 1500): a run that stopped before a cap
keeps its clustering, the others are read at the cap. So one set of runs gives the consensus
under every cap, from the same seeds (the 2000 column is `consensus(n_runs=50)` itself).

Per data set, cap and seed: the share of the iterations run, the 50-run pick and the
cophenetic coefficients; then, pooled over the seeds, how often simulated 10-run, 50-run and
``n_runs="auto"`` calls give the pooled runs' pick (`bench_consensus_runs.simulate`), and how
many runs stopped by the rule in each stretch of iterations. Data as `bench_consensus_runs.py`.
One core, one BLAS thread. Run from the repository root::

    python benchmarks/bench_consensus_caps.py --seeds 10,11            # about 20 min
    python benchmarks/bench_consensus_caps.py --seeds 10 --data quick_start
"""

import argparse
import sys
import time

import numpy as np
from _common import ROOT, log, markdown_table
from bench_consensus_runs import data_sets, simulate

sys.path.insert(0, str(ROOT))

CAPS = (500, 1000, 1500, 2000)
STABLE_ITER = 400  # consensus's default: Brunet's rule


def run_at_caps(nmf_cv, X, k, seed):
    """({cap: labels}, iteration the run stopped at) for one run of `consensus`'s task: its
    loop (`nmf_cv._consensus_task`), reading the clustering at every cap on the way
    (`check_task` compares the last with the library's own run)."""
    solver = nmf_cv._setup_fit(nmf_cv._validate_data(X), k, nmf_cv._FitOptions(
        method="mu", loss="kl", random_state=seed, init="random", max_iter=CAPS[-1], tol=0.0))
    labels, unchanged, at, stop = None, 0, {}, CAPS[-1]
    for n_iter in range(1, CAPS[-1] + 1):
        solver.step(want_loss=False)
        if n_iter % 10:
            continue
        current = nmf_cv._clusters(*solver.views(), "columns")
        unchanged = unchanged + 10 if labels is not None and np.array_equal(current, labels) else 0
        labels = current
        if n_iter in CAPS:
            at[n_iter] = current
        if unchanged >= STABLE_ITER:
            stop = n_iter
            break
    final = nmf_cv._clusters(*solver.views(), "columns")
    return {c: at.get(c, final) for c in CAPS}, stop


def check_task(nmf_cv, X, k, seed):
    """The bench's run ends with the clustering `consensus` itself gets from that seed."""
    ours = run_at_caps(nmf_cv, X, k, seed)[0][CAPS[-1]]
    theirs = nmf_cv._consensus_task(X, k, seed, "columns", "mu", "kl", STABLE_ITER,
                                    {"init": "random", "max_iter": CAPS[-1], "tol": 1e-5})
    if not np.array_equal(ours, theirs):
        sys.exit("run_at_caps no longer follows nmf_cv._consensus_task")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="10,11")
    parser.add_argument("--data", default="all_aml,medulloblastoma,bars,quick_start")
    parser.add_argument("--runs", type=int, default=50, help="runs per rank and seed")
    parser.add_argument("--simulate", type=int, default=100, help="simulated calls per kind")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    import nmf_cv

    threadpool_limits(1)
    sets = data_sets()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, pooled_rows, stop_rows = [], [], []
    for name in args.data.split(","):
        load, ranks = sets[name]
        X, ranks = load(), np.array(list(ranks))
        labels = {c: {k: [] for k in ranks} for c in CAPS}
        stops = []
        for seed in seeds:
            start = time.perf_counter()
            children = np.random.SeedSequence(seed).spawn(len(ranks) * args.runs)  # as consensus
            check_task(nmf_cv, X, int(ranks[0]), children[0])
            seed_stops = []
            for i, k in enumerate(ranks):
                for r in range(args.runs):
                    at, stop = run_at_caps(nmf_cv, X, int(k), children[i * args.runs + r])
                    seed_stops.append(stop)
                    for c in CAPS:
                        labels[c][k].append(at[c])
            stops += seed_stops
            log(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s")
            for c in CAPS:
                runs = [np.array(labels[c][k][-args.runs:]) for k in ranks]
                coph = [nmf_cv.cophenetic_correlation(nmf_cv._together(r) / len(r)) for r in runs]
                share = np.minimum(seed_stops, c).sum() / np.sum(seed_stops)
                rows.append([name, seed, c, f"{share:.0%}",
                             nmf_cv.best_cophenetic_rank(ranks, coph),
                             ", ".join(f"{x:.4f}" for x in coph)])
        for c in CAPS:
            pooled = [np.array(labels[c][k]) for k in ranks]
            pooled_rows.append([name, c] + simulate(nmf_cv, ranks, pooled, args.simulate))
        stops = np.array(stops)
        edges = (0,) + CAPS[:-2]
        stop_rows.append([name, len(stops)]
                         + [f"{np.mean((stops > lo) & (stops <= hi)):.0%}"
                            for lo, hi in zip(edges, CAPS[:-1], strict=True)]
                         + [f"{np.mean((stops > CAPS[-2]) & (stops < CAPS[-1])):.0%}",
                            f"{np.mean(stops >= CAPS[-1]):.0%}"])
    print(markdown_table(["data", "seed", "cap", "iterations run", f"{args.runs}-run pick",
                          "cophenetic, ranks in order"], rows))
    print()
    print(markdown_table(["data", "cap", "pooled pick", "10 runs: same pick",
                          "50 runs: same pick", "auto: same pick", "auto: mean runs"],
                         pooled_rows))
    print()
    print(markdown_table(["data", "runs", "settled by 500", "501-1000", "1001-1500", "1501-1990",
                          "never (2000)"], stop_rows))


if __name__ == "__main__":
    main()

"""Time the README's quick start: ``choose_rank`` with every criterion against cross-validation
alone, on ``make_planted(300, 200, 4, noise=0.05, missing=0.1, random_state=0)``, ranks 1..8.

Prints one markdown row (module path, seconds for CV alone and for every criterion, their
ratio, each criterion's seconds alone, every suggestion). One core, one BLAS thread, serial.
Run from the repository root::

    python benchmarks/bench_quickstart.py                        # this checkout
    python benchmarks/bench_quickstart.py --module-path ../base  # another checkout's nmf_cv
"""

import argparse
import sys
import time
from pathlib import Path

from _common import ROOT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-path", help="directory holding the nmf_cv.py to time")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(args.module_path).resolve()) if args.module_path else str(ROOT))
    from threadpoolctl import threadpool_limits

    import nmf_cv

    threadpool_limits(1)
    X = nmf_cv.make_planted(300, 200, 4, noise=0.05, missing=0.1, random_state=0)
    nmf_cv.choose_rank(X[:40, :30], [1, 2], random_state=0, progress=False,  # compile first
                       consensus_kwargs={"max_iter": 20}, stability_kwargs={"n_runs": 2})
    seconds = {}
    for criterion in nmf_cv.CRITERIA:  # each alone: where the time goes
        start = time.perf_counter()
        nmf_cv.choose_rank(X, range(1, 9), (criterion,), random_state=0, progress=False)
        seconds[criterion] = time.perf_counter() - start
    start = time.perf_counter()
    every = nmf_cv.choose_rank(X, range(1, 9), random_state=0, progress=False)
    total = time.perf_counter() - start
    alone = seconds["cv"]
    each = ", ".join(f"{name} {s:.1f}" for name, s in seconds.items())
    print(f"| {nmf_cv.__file__} | {alone:.1f} | {total:.1f} | {total / alone:.1f} | {each} | "
          f"{every.suggestions} |")

if __name__ == "__main__":
    main()

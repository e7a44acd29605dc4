"""Regenerate every example figure: run each example script in examples/ and time it.

This is the one script behind the PNGs committed next to the examples (and shown in the
README). It runs every other ``*.py`` in this folder, one at a time, in a fresh interpreter
with this folder as its working directory, passes their output through, and ends with each
script's wall time. It exits with status 1, naming the scripts, when any of them fails, does
not write its ``<stem>.png``, or runs past ``TIMEOUT`` seconds.

BLAS is limited to one thread per script unless the environment already says otherwise: the
fits here are small and memory-bound, so one thread is about as fast as two, while two
OpenBLAS threads on a busy 2-core machine were measured to run a fit 15 times slower.

Run: ``python examples/make_figures.py``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 300   # seconds; each example is meant to take well under a minute
BUDGET = 60     # flagged, not failed, when exceeded
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def run(script, env):
    """Run one example; return (seconds, problem or None)."""
    started = time.time()
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, script.name], cwd=HERE, env=env,
                                timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, f"timed out after {TIMEOUT} s"
    seconds = time.perf_counter() - start
    if result.returncode:
        return seconds, f"exit status {result.returncode}"
    figure = script.with_suffix(".png")
    if not figure.exists() or figure.stat().st_mtime < started:
        return seconds, f"did not write {figure.name}"
    return seconds, None


def main():
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env.setdefault(name, "1")
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    times, failures = {}, {}
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        times[script.name], problem = run(script, env)
        if problem:
            failures[script.name] = problem
            print(f"!!! {script.name} FAILED: {problem}", file=sys.stderr, flush=True)

    print("\n=== wall time ===")
    for name, seconds in times.items():
        note = "FAILED: " + failures[name] if name in failures else (
            f"over the {BUDGET} s budget" if seconds > BUDGET else "")
        print(f"{name:<24} {seconds:6.1f} s  {note}")
    print(f"{'total':<24} {sum(times.values()):6.1f} s")
    if failures:
        sys.exit(f"{len(failures)} of {len(scripts)} examples failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()

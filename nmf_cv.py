"""nmf_cv: non-negative matrix factorization with exact missing values and rank selection.

One self-contained module (numpy, numba, scipy, matplotlib) meant to be vendored: copy this
file into a project, or ``pip install`` it.

    >>> import numpy as np, nmf_cv
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((60, 5)) @ rng.random((5, 40))
    >>> X[rng.random(X.shape) < 0.1] = np.nan          # missing cells are left out exactly
    >>> res = nmf_cv.fit_nmf(X, 5, random_state=0, max_iter=2000, tol=1e-8)
    >>> res.relative_error < 1e-2
    True

The model is ``X ~ W @ H`` with ``W >= 0`` (m x k) and ``H >= 0`` (k x n). Cells that are NaN, or
False in ``mask``, are not part of the objective at all: they are never read, so whatever value
sits under the mask cannot change the result.

Objective (what ``loss_history`` records, over observed cells ``M`` only)::

    frobenius:  1/2 * sum_M (X - WH)^2                       + penalties
    kl:         sum_M (X log(X / WH) - X + WH)                + penalties
    penalties:  alpha_W * (l1_ratio * |W|_1 + (1 - l1_ratio) / 2 * |W|_F^2)  (and the same for H)

Map (the sections, in reading order; each public function first, its helpers and numba
kernels after it):

- Validation: `_validate_data` turns X (dense with NaN, a mask, or scipy.sparse) into `_Data`.
- Initialization: NNDSVD(a) or random factors, from observed cells only.
- Fitting, public API: `fit_nmf`, `NMFResult`, the `NMF` estimator, `make_planted`. With
  ``n_runs > 1`` `fit_nmf` makes consensus components (`_consensus_fit`, in the section on
  component stability, whose matching it shares; runs on sparse counts read their resample's
  rows in X, `_RowResample`).
- Fitting, the driver: `_fit` makes the solver (`_setup_fit`) and `_run` steps it to
  convergence (extrapolation, dead components revived). Each solver is a class with one
  ``step()``; `_make_solver` picks one by loss, method and the data's kind:

  - `_DenseSolver`: Frobenius on a fully observed X, dense or sparse (BLAS products);
    `_DenseKLSolver`: KL multiplicative updates on a dense X, fully or mostly observed.
    (Section: a fully observed X.)
  - `_MaskedSolver`: Frobenius on X with missing cells, exact masked steps. (Section: data
    with missing cells.)
  - `_CellsKLSolver`: KL multiplicative updates on listed cells (missing or sparse);
    `_KLCDSolver`: KL coordinate descent on any X. (Section: KL on listed cells.)
  - `_FoldSolver`, `_FoldKLSolver`: a fully observed training set read through the fold
    rule, built by cross-validation. (Section: cross-validation's training sets.)

- Cross-validation: `cross_validate` splits the observed cells into folds (`Folds`) from a
  source, fits every (rank, split, fold) training set and scores the held-out cells.
  Sources and their training sets: `_RuleSource` / `_FoldTraining` for fully observed X
  (the fold rule read from X itself); `_MissingRuleSource` / `_MissingFoldTraining` for
  mostly observed X with missing cells (Frobenius, or KL coordinate descent);
  `_CellSource` / `_CellTraining` (a dense copy and mask per fit) for everything else:
  leave-one-out, warm starts, mostly missing data, KL multiplicative updates on missing
  cells. `_FoldFits` says how a training set is fitted; `CVResult` holds PRESS and the pick.
- Running tasks: `_map_tasks` runs a call's tasks as its `_Run` says (executor, progress,
  checkpoint); data is shipped once per worker (`_shipped`); `_Checkpoint` keeps finished
  tasks, and read-only (`_FinishedOnly`) it serves a report of an unfinished run.
- The other criteria: consensus clustering, component stability, RSS against randomized
  data, bi-cross-validation, prior predictive matching.
- Rank selection: `choose_rank` runs the registered criteria (`_CRITERIA`: one `_Criterion`
  entry each) into a `RankReport`, whose recommendation `_recommend` writes from what each
  criterion measures; `report_from_checkpoint` makes the report of a checkpoint.
- Plotting (matplotlib imported on first use), then the command line (`main`, `read_matrix`
  with `.h5ad` through anndata).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import textwrap
import time
import warnings
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from numba import njit
from numba import types as numba_types
from numba.core import event as numba_event
from numba.extending import overload
from scipy.sparse.linalg import LinearOperator

__all__ = [
    "NMF", "CVResult", "ConsensusResult", "NMFResult", "PriorPredictiveResult",
    "RandomizedRSSResult", "RankReport", "Folds", "best_cophenetic_rank", "bicross_validate",
    "choose_rank", "consensus", "cophenetic_correlation", "cophenetic_standard_error",
    "cross_validate",
    "dispersion_coefficient", "fit_nmf", "make_planted", "noise_level", "plot_components",
    "plot_consensus", "plot_consensus_grid", "plot_cophenetic", "plot_cv", "plot_loss",
    "plot_randomized_rss", "plot_rank_report", "prior_predictive_rank", "proportion_ambiguous",
    "randomized_rss", "read_matrix", "StabilityResult", "stability", "silhouette_samples_cosine",
    "plot_stability",
]
__version__ = "0.1.0"

METHODS = ("hals", "mu", "gdcls", "cd")
LOSSES = ("frobenius", "kl")
INITS = ("nndsvda", "nndsvd", "random")


# =============================================================================================
# Validation
# =============================================================================================

@dataclass
class _Data:
    """Validated input. Exactly one representation is set: ``dense``, ``sparse``, or when
    cells are missing either ``zeros`` (X with 0 in its missing cells) and ``observed``
    (boolean), where at least half the cells are observed, or else ``cells``, the observed
    cells as lists (rows, cols, values; row-major order). Mostly observed data get their lists
    on first use (``rows``, ``cols``, ``values``): the paths that read X through its missing
    cells' pattern never need them (three numbers per observed cell: up to 3x the data in
    float64), while mostly missing data would need a dense copy many times their lists."""

    shape: tuple
    dtype: np.dtype
    dense: np.ndarray = None
    sparse: object = None
    zeros: np.ndarray = None
    observed: np.ndarray = None
    cells: tuple = None

    @property
    def masked(self):
        return self.observed is not None or self.cells is not None

    @property
    def n_observed(self):
        if self.observed is not None:
            return int(np.count_nonzero(self.observed))
        return len(self.values) if self.masked else self.shape[0] * self.shape[1]

    @property
    def rows(self):
        return self._cell_lists()[0]

    @property
    def cols(self):
        return self._cell_lists()[1]

    @property
    def values(self):
        return self._cell_lists()[2]

    def _cell_lists(self):
        if not self.masked:
            return None, None, None
        if self.cells is None:
            rows, cols = np.nonzero(self.observed)
            self.cells = rows, cols, self.zeros[rows, cols]
        return self.cells

    def solver(self, W, H, method, loss, penalty, update_H=True):
        return _make_solver(self, W, H, method, loss, penalty, update_H)

    def sq_norm(self):
        return _observed_sq_norm(self)

    def rss(self, W, H):
        return _observed_rss(self, W, H)

    def relative_error(self, W, H):
        """`NMFResult.relative_error` of the factors W, H."""
        return math.sqrt(self.rss(W, H) / max(self.sq_norm(), 1e-300))

    def mask_layout(self):
        return _MaskLayout(self)

    def observed_mask(self):
        """Boolean m x n of the observed cells (made from the lists for mostly missing data)."""
        if self.observed is not None:
            return self.observed
        observed = np.zeros(self.shape, dtype=bool)
        observed[self.rows, self.cols] = True
        return observed

    def zeros_filled(self):
        """X with 0 in its missing cells (made from the lists for mostly missing data)."""
        if self.zeros is not None:
            return self.zeros
        out = np.zeros(self.shape, dtype=self.dtype)
        out[self.rows, self.cols] = self.values
        return out

    def observed_mean(self):
        if self.zeros is not None:
            return float(np.sum(self.zeros, dtype=np.float64)) / self.n_observed
        if self.masked:
            return float(np.mean(self.values, dtype=np.float64))
        if self.sparse is not None:
            return float(self.sparse.sum(dtype=np.float64)) / (self.shape[0] * self.shape[1])
        return float(np.mean(self.dense, dtype=np.float64))

    def filled(self):
        """Dense copy for SVD-based inits; missing cells get the rank-1 fit of the observed row
        and column means, so no value under the mask is read."""
        if self.sparse is not None:
            return self.sparse
        if not self.masked:
            return self.dense
        if self.zeros is None:
            m, n = self.shape
            rows, cols, values = self.cells
            row_mean = np.bincount(rows, values, m) / np.bincount(rows, minlength=m)
            col_mean = np.bincount(cols, values, n) / np.bincount(cols, minlength=n)
        else:
            row_mean = self.zeros.sum(axis=1, dtype=np.float64) / self.observed.sum(axis=1)
            col_mean = self.zeros.sum(axis=0, dtype=np.float64) / self.observed.sum(axis=0)
        grand = self.observed_mean()
        scale = 1.0 / grand if grand > 0 else 0.0
        out = np.outer(row_mean, col_mean)
        out *= scale
        out = out.astype(self.dtype, copy=False)
        if self.zeros is None:
            out[self.rows, self.cols] = self.values
        else:
            np.copyto(out, self.zeros, where=self.observed)
        return out


def _validate_data(X, mask=None, name="X", signal=False):
    """Check X (and mask) and return a `_Data`. Never modifies or keeps a reference to the
    caller's arrays where it could be changed later. ``signal``: refuse data whose observed
    cells are all zero (nothing to factor: rank selection)."""
    data = _validate_sparse(X, mask, name) if sp.issparse(X) else _validate_dense(X, mask, name)
    if signal and data.observed_mean() == 0:
        raise ValueError(f"{name} has no non-zero observed value: there is nothing to factor")
    return data


def _validate_dense(X, mask, name):
    X = _as_float_array(X, name)
    if mask is None:
        observed = ~np.isnan(X)
    else:
        observed = np.array(_as_mask(mask, X.shape), copy=True)  # kept: not the caller's
    all_observed = bool(observed.all())
    mostly_missing = 2 * np.count_nonzero(observed) < observed.size  # lists are then smaller
    if all_observed:
        values = X
    elif mostly_missing:
        values = X[observed]
    else:
        values = np.where(observed, X, np.zeros((), dtype=X.dtype))
    _check_finite_nonnegative(values, X, observed, all_observed, name)
    if all_observed:
        return _Data(X.shape, X.dtype, dense=np.ascontiguousarray(X))
    _check_no_empty_lines(observed, name)
    if mostly_missing:
        return _Data(X.shape, X.dtype, cells=(*np.nonzero(observed), values))
    return _Data(X.shape, X.dtype, zeros=values, observed=observed)


def _validate_sparse(X, mask, name):
    if mask is not None:
        return _validate_data(X.toarray(), mask, name)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got {X.ndim} dimensions")
    _check_real(X.dtype, name)
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = sp.csr_matrix(X, dtype=dtype)  # shares a CSR input's arrays: nothing here writes them
    if not X.has_canonical_format:  # duplicates summed, indices sorted: on a copy
        X = X.copy()
        X.sum_duplicates()
        X.sort_indices()
    _check_not_empty(X.shape, name)
    bad = ~np.isfinite(X.data)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite stored entries; sparse input "
                         "cannot mark missing cells (pass a dense array with NaN, or a mask)")
    if (X.data < 0).any():
        neg = X.data < 0
        r = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[neg][0]
        c = X.indices[neg][0]
        raise ValueError(f"Negative values in data: {name} has {int(neg.sum())} negative "
                         f"entries; NMF needs X >= 0 (first at [{r}, {c}] = {X[r, c]:g})")
    return _Data(X.shape, X.dtype, sparse=X)


def _as_float_array(X, name):
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be read as an array: {exc}") from None
    if arr.dtype.kind == "O":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must hold numbers; got non-numeric objects ({exc})") from None
    _check_real(arr.dtype, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns); got {arr.ndim} dimensions, "
                         f"shape {arr.shape}. Reshape your data: X.reshape(-1, 1) for one "
                         "column, X.reshape(1, -1) for one row")
    _check_not_empty(arr.shape, name)
    dtype = np.float32 if arr.dtype in (np.float32, np.float16) else np.float64
    return np.asarray(arr, dtype=dtype)


class _ComplexDataError(TypeError, ValueError):
    """Complex X: a wrong type (a TypeError, as for text), and the ValueError scikit-learn's
    estimator checks expect."""


def _check_real(dtype, name):
    if dtype.kind == "c":
        raise _ComplexDataError(f"{name} must hold real numbers; got dtype {dtype} (Complex "
                                "data not supported)")
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers; got dtype {dtype}")


def _check_not_empty(shape, name):
    """One line naming the empty side, worded as scikit-learn's own check."""
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: 0 sample(s) (shape={tuple(shape)}) while a "
                         "minimum of 1 is required.")
    if shape[1] == 0:
        raise ValueError(f"{name} is empty: 0 feature(s) (shape={tuple(shape)}) while a "
                         "minimum of 1 is required.")


def _as_mask(mask, shape):
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, X has shape {shape}; they must match")
    if mask.dtype != bool:
        if mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            raise TypeError(f"mask must be boolean (True = observed); got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _check_finite_nonnegative(values, X, observed, all_observed, name):
    finite = np.isfinite(values)
    if not finite.all():
        where = np.argwhere(observed & ~np.isfinite(X))
        kind = "NaN" if np.isnan(X[tuple(where[0])]) else "infinite"
        raise ValueError(f"{name} has {len(where)} non-finite observed entries (first, {kind}, "
                         f"at {where[0].tolist()}); mark missing cells with NaN or mask=False")
    negative = values < 0
    if negative.any():
        where = np.argwhere(observed & (np.where(observed, X, 0) < 0))
        first = where[0].tolist()
        raise ValueError(f"Negative values in data: {name} has {len(where)} negative entries; "
                         f"NMF needs X >= 0 (first at {first} = {X[tuple(first)]:g})")


def _check_no_empty_lines(observed, name):
    for axis, label in ((1, "row"), (0, "column")):
        empty = np.flatnonzero(~observed.any(axis=axis))
        if len(empty):
            raise ValueError(f"{name} has {len(empty)} {label}(s) with no observed cell "
                             f"(first: {label} {empty[0]}); drop them before fitting")


def _check_gamma_prior(gamma_prior, method, loss):
    """(shape, rate) of `fit_nmf`'s ``gamma_prior``; (1, 0), a flat prior, for None."""
    if gamma_prior is None:
        return 1.0, 0.0
    try:
        shape, rate = (float(v) for v in gamma_prior)
    except (TypeError, ValueError):
        raise TypeError(f"gamma_prior must be (shape, rate); got {gamma_prior!r}") from None
    if not (math.isfinite(shape) and math.isfinite(rate) and shape >= 1 and rate >= 0):
        raise ValueError(f"gamma_prior needs shape >= 1 and rate >= 0; got {gamma_prior!r}")
    if (loss, method) != ("kl", "cd"):
        raise ValueError(f"gamma_prior needs loss='kl' with method='cd'; got loss={loss!r}, "
                         f"method={method!r}")
    return shape, rate


def _check_n_components(n_components, shape):
    if isinstance(n_components, (bool, np.bool_)) or not isinstance(n_components,
                                                                    (int, np.integer)):
        raise TypeError(f"n_components must be a positive int; got {n_components!r}")
    if not 1 <= n_components <= min(shape):
        raise ValueError(f"n_components must be in 1..{min(shape)} (= min(X.shape)) for X of "
                         f"shape {shape}; got {n_components}")
    return int(n_components)


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _resolve_method(method, loss):
    """The solver a (method, loss) pair runs: None is "hals" for Frobenius and "cd" for KL;
    "cd" (coordinate descent) for Frobenius is HALS, which is exact coordinate descent."""
    _check_choice(loss, LOSSES, "loss")
    if method is None:
        return "cd" if loss == "kl" else "hals"
    _check_choice(method, METHODS, "method")
    if loss == "kl" and method not in ("cd", "mu"):
        raise ValueError(f"loss='kl' takes method='cd' (the default) or 'mu'; "
                         f"method={method!r} is Frobenius only")
    return "hals" if method == "cd" and loss == "frobenius" else method


def _can_extrapolate(method):
    """Whether fits by a resolved ``method`` take ``extrapolate=True`` (`_Extrapolation`):
    HALS, and KL coordinate descent."""
    return method in ("hals", "cd")


def _check_options(method, loss, max_iter, tol, alpha_W, alpha_H, l1_ratio):
    """Checks the numbers; returns the resolved method (`_resolve_method`)."""
    method = _resolve_method(method, loss)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int; got {max_iter!r}")
    for value, label in ((tol, "tol"), (alpha_W, "alpha_W"), (alpha_H, "alpha_H")):
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number >= 0; got {value!r}")
    if not (isinstance(l1_ratio, (int, float, np.number)) and 0 <= l1_ratio <= 1):
        raise ValueError(f"l1_ratio must be in [0, 1]; got {l1_ratio!r}")
    return method


# =============================================================================================
# Initialization
# =============================================================================================

def _initialize(data, k, init, rng):
    """Initial (W, H) in the data's dtype; reads observed cells only."""
    if isinstance(init, (tuple, list)):
        return _check_user_init(init, data.shape, k, data.dtype)
    _check_choice(init, INITS, "init")
    mean = data.observed_mean()
    m, n = data.shape
    if init == "random":
        scale = 2.0 * _entry_scale(mean, k)
        W = rng.uniform(0.0, scale, size=(m, k))
        H = rng.uniform(0.0, scale, size=(k, n))
    else:
        W, H = _nndsvd(data.filled(), k, rng)
        if init == "nndsvda":
            # Zeros filled at the random init's scale, sqrt(mean / k): k products of two such
            # entries add up to the mean. Filled with the mean itself (Boutsidis & Gallopoulos,
            # scikit-learn) they are off by a factor of the mean, and on data whose mean is far
            # from 1 the first updates zero whole components for good.
            fill = _entry_scale(mean, k)
            W[W == 0] = fill
            H[H == 0] = fill
    return np.ascontiguousarray(W, data.dtype), np.ascontiguousarray(H, data.dtype)


def _entry_scale(mean, k):
    """sqrt(mean / k): entries of W and H at this scale make WH's entries the data's mean."""
    return math.sqrt(max(mean, 0.0) / k)


def _check_user_init(init, shape, k, dtype):
    if len(init) != 2:
        raise ValueError("init given as a tuple must be (W, H)")
    W, H = (_as_float_array(a, label) for a, label in zip(init, ("init W", "init H"), strict=True))
    m, n = shape
    if W.shape != (m, k) or H.shape != (k, n):
        raise ValueError(f"init (W, H) must have shapes {(m, k)} and {(k, n)}; got "
                         f"{W.shape} and {H.shape}")
    for a, label in ((W, "init W"), (H, "init H")):
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"{label} must be finite and non-negative")
    return np.array(W, dtype=dtype, order="C"), np.array(H, dtype=dtype, order="C")


def _nndsvd(X, k, rng):
    """Non-negative double SVD (Boutsidis & Gallopoulos 2008): each singular pair is split into
    its positive and negative parts and the part with the larger product of norms is kept."""
    U, S, Vt = _top_svd(X, k, rng)
    m, n = X.shape
    W = np.zeros((m, k))
    H = np.zeros((k, n))
    W[:, 0] = math.sqrt(S[0]) * np.abs(U[:, 0])
    H[0, :] = math.sqrt(S[0]) * np.abs(Vt[0, :])
    for j in range(1, k):
        u, v = U[:, j], Vt[j, :]
        up, un = np.maximum(u, 0), np.maximum(-u, 0)
        vp, vn = np.maximum(v, 0), np.maximum(-v, 0)
        nup, nun = np.linalg.norm(up), np.linalg.norm(un)
        nvp, nvn = np.linalg.norm(vp), np.linalg.norm(vn)
        if nup * nvp >= nun * nvn:
            u, v, sigma = up / max(nup, 1e-300), vp / max(nvp, 1e-300), nup * nvp
        else:
            u, v, sigma = un / max(nun, 1e-300), vn / max(nvn, 1e-300), nun * nvn
        scale = math.sqrt(S[j] * sigma)
        W[:, j] = scale * u
        H[j, :] = scale * v
    tiny = 1e-6 * max(W.max(), H.max(), 1e-300)
    W[W < tiny] = 0.0
    H[H < tiny] = 0.0
    return W, H


def _top_svd(X, k, rng):
    """Leading k singular triplets: exact for small inputs, randomized (Halko, Martinsson &
    Tropp 2011, with power iterations) otherwise."""
    m, n = X.shape
    operator = isinstance(X, LinearOperator)  # a training set of cross_validate
    if not sp.issparse(X) and (min(m, n) <= 2 * k + 20 or m * n <= 250_000):
        if operator:
            X = X @ np.eye(n) if n <= m else (X.T @ np.eye(m)).T
        U, S, Vt = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
        return U[:, :k], S[:k], Vt[:k]
    # Products in X's dtype: casting a float32 X to float64 would double its memory for an
    # init that needs no more digits (a LinearOperator says its own dtype).
    dtype = np.float64 if operator else X.dtype
    q = min(k + 10, min(m, n))
    Q = np.linalg.qr(X @ rng.standard_normal((n, q)).astype(dtype))[0]
    for _ in range(4):
        Q = np.linalg.qr(X.T @ Q)[0]
        Q = np.linalg.qr(X @ Q)[0]
    B = np.asarray((X.T @ Q).T)
    Ub, S, Vt = np.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vt[:k]


# =============================================================================================
# Fitting: public API
# =============================================================================================

@dataclass
class NMFResult:
    """Outcome of `fit_nmf`.

    Attributes
    ----------
    W : ndarray (m, k)
    H : ndarray (k, n)
    n_iter : int
        Iterations run (each updates H, then W).
    converged : bool
        True when the relative decrease of the objective fell below ``tol``; False when
        ``max_iter`` (or the callback) ended the fit.
    loss_history : ndarray (n_iter + 1,)
        Objective over observed cells (see the module docstring) at the initial point and
        after every iteration.
    time_history : ndarray (n_iter + 1,)
        Seconds since the fit started when each ``loss_history`` entry was recorded.
    relative_error : float
        ``||M o (X - WH)||_F / ||M o X||_F`` over observed cells ``M``.
    time : float
        Wall time of the whole fit (validation and init included), in seconds.
    compile_time : float
        Seconds of ``time`` that numba spent compiling kernels in this process: first use
        only (they are cached on disk afterwards), 0 once they are.
    component_stability : ndarray (k,) or None
        Consensus fits (``n_runs > 1``): each component's silhouette over the runs kept,
        near 1 when every run finds it (`stability` reads the worst one against 0.7).
        ``n_iter``, ``converged`` and the histories are then those of the final polish.
    n_runs, n_runs_kept : int
        Runs fitted, and kept for the consensus (1 and 1 for a single fit).

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> res = nmf_cv.fit_nmf(np.ones((4, 3)), 1)
    >>> round(res.relative_error, 6), res.W.shape, res.H.shape
    (0.0, (4, 1), (1, 3))
    """

    W: np.ndarray
    H: np.ndarray
    n_iter: int
    converged: bool
    loss_history: np.ndarray
    time_history: np.ndarray
    relative_error: float
    time: float
    method: str = "hals"
    loss: str = "frobenius"
    compile_time: float = 0.0
    component_stability: np.ndarray = None
    n_runs: int = 1
    n_runs_kept: int = 1
    n_components: int = field(init=False)

    def __post_init__(self):
        self.n_components = self.W.shape[1]

    def __repr__(self):
        state = "converged" if self.converged else "stopped at max_iter"
        runs = ""
        if self.component_stability is not None:
            runs = (f"consensus of {self.n_runs_kept}/{self.n_runs} runs, stability "
                    f"{self.component_stability.min():.3f} (worst component), ")
        return (f"NMFResult(k={self.n_components}, method={self.method!r}, loss={self.loss!r}, "
                f"{runs}n_iter={self.n_iter} ({state}), "
                f"relative_error={self.relative_error:.4g}, "
                f"time={self.time:.3g}s{_compiling_note(self.compile_time)})")


def fit_nmf(X, n_components, *, mask=None, method=None, loss="frobenius", init="nndsvda",
            max_iter=None, tol=None, random_state=None, alpha_W=0.0, alpha_H=0.0, l1_ratio=0.0,
            gamma_prior=None, extrapolate=False, callback=None, n_runs=1, executor=None,
            progress=None, checkpoint=None):
    """Fit ``X ~ W @ H`` with ``W, H >= 0``, leaving missing cells out of the objective.

    With ``n_runs > 1``, the consensus of that many runs (as cNMF's): see `n_runs`.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix, shape (m, n)
        Non-negative data. NaN marks a missing cell (dense input). float32 stays float32;
        everything else is computed in float64. Sparse input is never densified (no missing
        cells: stored zeros are zeros).
    n_components : int
        Rank k, 1 <= k <= min(m, n).
    mask : array-like of bool, shape (m, n), optional
        True where a cell is observed. Cells that are False (or NaN in X) are never read.
    method : {"hals", "cd", "mu", "gdcls"}, optional
        Default: ``"hals"`` for Frobenius, ``"cd"`` for KL.
        ``"hals"``: hierarchical alternating least squares (exact coordinate descent; dense
        fits reuse the BLAS products for several inner sweeps, Gillis & Glineur 2012).
        ``"cd"``: coordinate descent; for KL, Newton steps on one coordinate at a time (Hsieh &
        Dhillon 2011, "Fast coordinate descent methods with variable selection for NMF"),
        each kept only where it cannot raise the objective (else the Lee-Seung step for that
        coordinate), over a row's positive cells only, so sparse counts cost their stored
        entries; for Frobenius, HALS.
        ``"mu"``: Lee & Seung multiplicative updates (Frobenius or KL).
        ``"gdcls"``: Shahnaz et al. (2006): multiplicative update for W, regularised
        least squares for H with ``alpha_H`` as its lambda; H is solved *with* the
        non-negativity constraint (coordinate descent) rather than by clipping the
        unconstrained solution, so the objective never increases.
    loss : {"frobenius", "kl"}
        ``"kl"`` (generalised Kullback-Leibler, Poisson) takes ``method="cd"`` or ``"mu"``.
    init : {"nndsvda", "nndsvd", "random"} or (W, H)
        Default ``"nndsvda"``: NNDSVD with its zeros filled at the factors' scale,
        ``sqrt(mean / k)`` (filled with the mean, as in scikit-learn, components die early
        on data whose mean is far from 1). SVD-based inits read a copy whose missing cells
        hold the rank-1 fit of the observed row and column means.
        ``"random"``: uniform, scaled so ``E[WH]`` is the data's mean.
    max_iter : int
        Maximum number of iterations (default 500; 2000 for consensus runs).
    tol : float
        Stop when the objective's relative decrease in one iteration falls below ``tol``
        (default 1e-4; 1e-6 for consensus runs, whose components are compared across runs:
        runs stopped short of convergence differ for that reason alone).
        ``tol=0`` runs ``max_iter`` iterations (unless the objective reaches 0).
    random_state : None, int, numpy Generator or SeedSequence
        Seeds the random init and the randomized SVD.
    alpha_W, alpha_H, l1_ratio : float
        Elastic-net penalties (see the module docstring); not scaled by the data's shape.
    gamma_prior : (shape, rate), optional
        Independent Gamma(shape, rate) priors on every entry of W and H, for ``loss="kl"``
        with ``method="cd"``: the fit is then the posterior mode (Cemgil 2009), the objective
        gaining ``rate * (sum W + sum H) - (shape - 1) * (sum log W + sum log H)``. With
        ``shape > 1`` no entry reaches 0, so no cell is predicted to be exactly 0 (a held-out
        count under a prediction of 0 has infinite deviance); ``rate > 0`` keeps the scales
        of W and H bounded. `cross_validate` fits counts with such priors (see ``ridge``).
    extrapolate : bool
        Default False. HALS, or KL coordinate descent: extrapolation (Ang & Gillis 2019), each
        update starting from the last iterate pushed further along its last move (for KL,
        never below half of each entry), undone where the objective rises. Fewer iterations
        to a given objective (for KL, little or none: benchmarks/README.md, "bench_fit.py"), but
        the objective is not monotone: the best iterate is returned, and ``tol`` applies to
        the best objective's decrease. `cross_validate` fits this way.
    callback : callable, optional
        ``callback(n_iter, W, H, objective)`` after every iteration; return True to stop.
        W and H are the live arrays: read them, do not modify them.
    n_runs : int
        Default 1: one fit. Above 1, consensus components, as cNMF makes them: ``n_runs``
        fits, each from its own random init on a bootstrap resample of the rows (samples),
        have their components (rows of H, unit norm) matched one to one; runs that match the
        others poorly (another local optimum) are dropped; each consensus component is the
        median of its matched components; W is refitted to all of X with H fixed (same loss,
        missing cells and sparse input), and from that start one fit to all of X polishes
        the pair (the median of resampled runs is a noisier estimate than the optimum it
        lies next to). Each row of H is scaled to sum to 1, W's columns, in decreasing order
        of total usage, carry the scale. The result's
        ``component_stability`` says how well each component reproduces (the silhouette
        `stability` reads) and ``n_runs_kept`` how many runs made it. ``init`` applies to
        single fits only.
    executor, progress, checkpoint
        For ``n_runs > 1``, as in `cross_validate`: where the runs go, a progress line, and
        a directory keeping finished runs across interruptions.

    Returns
    -------
    NMFResult

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> X = nmf_cv.make_planted(40, 30, 3, random_state=0)
    >>> res = nmf_cv.fit_nmf(X, 3, random_state=0, tol=1e-8, max_iter=3000)
    >>> res.relative_error < 1e-3, res.W.shape
    (True, (40, 3))
    """
    start = time.perf_counter()
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    _check_positive_int(n_runs, "n_runs")
    options = _FitOptions(method, loss, init, *_iterations(max_iter, tol, n_runs),
                          random_state, alpha_W, alpha_H, l1_ratio, gamma_prior, extrapolate)
    if n_runs == 1:
        return _fit(_validate_data(X, mask), n_components, options, callback, start)
    if callback is not None:
        raise ValueError("callback is for single fits; with n_runs > 1 use progress=True")
    return _consensus_fit(_validate_data(X, mask), n_components, options, n_runs,
                          _Run(executor, progress, checkpoint), start)


@dataclass
class _FitOptions:
    """`fit_nmf`'s options, as they travel to `_fit` (cross-validation's and the criteria's
    fits build them from their ``fit_kwargs``)."""

    method: str = None
    loss: str = "frobenius"
    init: object = "nndsvda"
    max_iter: int = 500
    tol: float = 1e-4
    random_state: object = None
    alpha_W: float = 0.0
    alpha_H: float = 0.0
    l1_ratio: float = 0.0
    gamma_prior: tuple = None
    extrapolate: bool = False


def _iterations(max_iter, tol, n_runs):
    """(max_iter, tol), None resolved to the defaults of a single fit or of consensus runs."""
    loose = n_runs == 1
    return (max_iter if max_iter is not None else 500 if loose else 2000,
            tol if tol is not None else 1e-4 if loose else 1e-6)


def _fit(data, n_components, options, callback=None, start=None):
    """`fit_nmf` on validated data: a `_Data`, or a cross-validation training set (which
    makes its own solver)."""
    start = time.perf_counter() if start is None else start
    compiled = _COMPILING.seconds
    solver = _setup_fit(data, n_components, options)
    o = options
    res = _run(solver, data, _resolve_method(o.method, o.loss), o.loss, o.max_iter, o.tol,
               callback, start)
    res.compile_time = _COMPILING.seconds - compiled
    return res


class _Compiling(numba_event.Listener):
    """Seconds numba has spent compiling kernels in this process (outermost compiles only),
    so that fits can report their compile time apart; the first compile in the caller's
    process (not a pool's worker) says so once on stderr. Kernels compile on first use and
    are cached on disk (``cache=True``), so a later process loads them instead."""

    def __init__(self):
        self.seconds, self.depth, self.started, self.said = 0.0, 0, 0.0, False

    def on_start(self, event):
        if self.depth == 0:
            self.started = time.perf_counter()
            if not self.said and multiprocessing.parent_process() is None:
                self.said = True
                print("nmf_cv: compiling numba kernels (first use only; cached afterwards)",
                      file=sys.stderr, flush=True)
        self.depth += 1

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.started


_COMPILING = _Compiling()
if __name__ != "__main__":  # run as `python -m nmf_cv`, the imported module's listens (end)
    numba_event.register("numba:compile", _COMPILING)


def _compiling_note(seconds):
    """``", compiling 6.2 s"`` when numba compiled for that long (first use only), else ""."""
    return f", compiling {seconds:.1f} s" if seconds >= 0.05 else ""


def _setup_fit(data, n_components, options):
    """A solver at the initial point: options checked, factors initialised, the solver the
    data's kind calls for (``data.solver``: `_make_solver` for a `_Data`)."""
    o = options
    k = _check_n_components(n_components, data.shape)
    method = _check_options(o.method, o.loss, o.max_iter, o.tol, o.alpha_W, o.alpha_H,
                            o.l1_ratio)
    shape, rate = _check_gamma_prior(o.gamma_prior, method, o.loss)
    rng = np.random.default_rng(o.random_state)
    W, H = _initialize(data, k, o.init, rng)
    solver = data.solver(W, H, method, o.loss, _penalty_of(o, shape, rate))
    if o.extrapolate:
        if not _can_extrapolate(method):
            raise ValueError("extrapolate=True needs method='hals', or 'cd' with loss='kl'; "
                             f"got method={method!r}")
        solver.accel = _Extrapolation(_KL_PUSH_FLOOR if o.loss == "kl" else 0.0)
    return solver


def _penalty_of(options, shape, rate, update_H=True):
    """The `_Penalty` of the options' elastic net and Gamma prior (H's left out when H is
    held fixed)."""
    o, on_H = options, float(update_H)
    return _Penalty(o.alpha_W * o.l1_ratio + rate, o.alpha_W * (1 - o.l1_ratio),
                    on_H * (o.alpha_H * o.l1_ratio + rate), on_H * o.alpha_H * (1 - o.l1_ratio),
                    shape - 1.0, on_H * (shape - 1.0))


def make_planted(n_rows, n_cols, rank, *, noise=0.0, missing=0.0, random_state=None,
                 dtype=np.float64):
    """A non-negative matrix ``W @ H`` of exact rank ``rank``, plus optional noise and NaNs.

    ``W`` and ``H`` are uniform on [0, 1); ``noise`` is the standard deviation of additive
    Gaussian noise relative to the matrix's mean (the result is clipped at 0); ``missing`` is
    the fraction of cells set to NaN (each row and column keeps at least one cell).

    Examples
    --------
    >>> import nmf_cv
    >>> nmf_cv.make_planted(5, 4, 2, random_state=0).shape
    (5, 4)
    """
    rng = np.random.default_rng(random_state)
    X = rng.random((n_rows, rank)) @ rng.random((rank, n_cols))
    if noise:
        X = np.maximum(X + noise * X.mean() * rng.standard_normal(X.shape), 0.0)
    if missing:
        hide = rng.random(X.shape) < missing
        hide[np.arange(n_rows), rng.integers(0, n_cols, n_rows)] = False
        hide[rng.integers(0, n_rows, n_cols), np.arange(n_cols)] = False
        X[hide] = np.nan
    return X.astype(dtype)


class NMF:
    """Scikit-learn style estimator around `fit_nmf` (duck-typed; scikit-learn not needed).

    Parameters are those of `fit_nmf`; ``n_components=None`` means ``min(X.shape)``;
    ``n_runs > 1`` fits consensus components (see `fit_nmf`).

    Attributes
    ----------
    components_ : ndarray (k, n)
        H.
    reconstruction_err_ : float
        ``||M o (X - WH)||_F`` for Frobenius, ``sqrt(2 * KL)`` for KL (scikit-learn's
        convention), over observed cells.
    n_iter_ : int
    component_stability_ : ndarray (k,)
        Consensus fits only (``n_runs > 1``): see `NMFResult`.
    result_ : NMFResult

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, random_state=1)
    >>> model = nmf_cv.NMF(2, random_state=0, tol=1e-8, max_iter=2000)
    >>> W = model.fit_transform(X)
    >>> np.allclose(model.inverse_transform(W), X, atol=1e-2)
    True
    """

    def __init__(self, n_components=None, *, method=None, loss="frobenius", init="nndsvda",
                 max_iter=None, tol=None, random_state=None, alpha_W=0.0, alpha_H=0.0,
                 l1_ratio=0.0, gamma_prior=None, n_runs=1):
        self.n_components = n_components
        self.method = method
        self.loss = loss
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.gamma_prior = gamma_prior
        self.n_runs = n_runs

    _param_names = ("n_components", "method", "loss", "init", "max_iter", "tol",
                    "random_state", "alpha_W", "alpha_H", "l1_ratio", "gamma_prior", "n_runs")

    def get_params(self, deep=True):
        """Parameters as a dict (scikit-learn convention)."""
        return {name: getattr(self, name) for name in self._param_names}

    def set_params(self, **params):
        """Set parameters by name (scikit-learn convention); returns self."""
        for name, value in params.items():
            if name not in self._param_names:
                raise ValueError(f"unknown parameter {name!r} for NMF")
            setattr(self, name, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"NMF({args})"

    def __sklearn_tags__(self):
        """scikit-learn's tags (scikit-learn >= 1.6 asks for them; built only then, so
        scikit-learn stays optional): a transformer of non-negative 2-d input, dense or
        sparse, in which NaN marks a missing cell rather than an error."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
                    input_tags=InputTags(sparse=True, positive_only=True, allow_nan=True))

    def fit_transform(self, X, y=None, *, mask=None, W=None, H=None):
        """Fit to X and return W (m, k). ``W`` and ``H`` together give a custom init."""
        data = _validate_data(X, mask)
        k = self.n_components if self.n_components is not None else min(data.shape)
        options = self._options()
        if W is not None and H is not None:
            options.init = (W, H)
        if self.n_runs == 1:
            res = _fit(data, k, options)
        else:
            _check_positive_int(self.n_runs, "n_runs")
            res = _consensus_fit(data, k, options, self.n_runs, _Run(progress=False))
            self.component_stability_ = res.component_stability
        self.result_ = res
        self.components_ = res.H
        self.n_components_ = res.n_components
        self.n_iter_ = res.n_iter
        self.n_features_in_ = res.H.shape[1]
        self.reconstruction_err_ = _reconstruction_err(res, data)
        return res.W

    def _options(self):
        return _FitOptions(self.method, self.loss, self.init,
                           *_iterations(self.max_iter, self.tol, self.n_runs),
                           self.random_state, self.alpha_W, self.alpha_H, self.l1_ratio,
                           self.gamma_prior)

    def fit(self, X, y=None, *, mask=None):
        """Fit to X; returns self."""
        self.fit_transform(X, mask=mask)
        return self

    def transform(self, X, *, mask=None):
        """W (m, k) for new rows of X with ``components_`` held fixed (non-negative least
        squares for Frobenius; for KL, coordinate descent or multiplicative updates as
        ``method`` says, with W's Gamma prior if ``gamma_prior`` is set), missing cells left
        out."""
        if not hasattr(self, "components_"):
            raise ValueError("this NMF instance is not fitted yet; call fit first")
        data = _validate_data(X, mask)
        H = self.components_
        if data.shape[1] != H.shape[1]:
            raise ValueError(f"X has {data.shape[1]} features, but NMF is expecting "
                             f"{H.shape[1]} features as input (the columns it was fitted on)")
        method = _resolve_method(self.method, self.loss)
        shape, rate = _check_gamma_prior(self.gamma_prior, method, self.loss)
        penalty = _penalty_of(self._options(), shape, rate, update_H=False)
        max_iter, tol = _iterations(self.max_iter, self.tol, 1)
        return _solve_W(data, H, method, self.loss, penalty, max(max_iter, 200), min(tol, 1e-6))

    def inverse_transform(self, W):
        """``W @ components_``."""
        return np.asarray(W) @ self.components_


def _solve_W(data, H, method="hals", loss="frobenius", penalty=None, max_iter=200, tol=1e-6):
    """argmin over W >= 0 of the objective with H fixed, by coordinate descent (non-negative
    least squares for Frobenius, Newton steps for KL) or multiplicative updates (``"mu"``);
    observed cells only."""
    return _refit_W(data, H, method, loss, penalty, max_iter, tol).W


def _refit_W(data, H, method, loss, penalty=None, max_iter=200, tol=1e-6, start=None):
    """`_solve_W` as an `NMFResult` (W's fit, H as given)."""
    k = H.shape[0]
    H = np.ascontiguousarray(H, dtype=data.dtype)
    mean = data.observed_mean()
    W = np.full((data.shape[0], k), _entry_scale(max(mean, 1e-12), k), dtype=data.dtype)
    penalty = penalty or _Penalty(0.0, 0.0, 0.0, 0.0)
    solver = _make_solver(data, W, H, method, loss, penalty, update_H=False)
    start = time.perf_counter() if start is None else start
    return _run(solver, data, method, loss, max_iter, tol, None, start)


def _reconstruction_err(res, data):
    if res.loss == "kl":
        return math.sqrt(2.0 * max(res.loss_history[-1], 0.0))
    return res.relative_error * math.sqrt(data.sq_norm())


# =============================================================================================
# Fitting: the driver, and which solver fits which data
# =============================================================================================

@dataclass(frozen=True)
class _Penalty:
    l1_W: float
    l2_W: float
    l1_H: float
    l2_H: float
    shape_W: float = 0.0  # -shape * sum log W: a Gamma prior's shape less 1 (KL "cd" only)
    shape_H: float = 0.0

    def value(self, W, H):
        """Penalty part of the objective; W, H in any layout."""
        out = 0.0
        for l1, l2, shape, A in ((self.l1_W, self.l2_W, self.shape_W, W),
                                 (self.l1_H, self.l2_H, self.shape_H, H)):
            if l1:
                out += l1 * float(A.sum(dtype=np.float64))
            if l2:
                out += 0.5 * l2 * _sqnorm(A)
            if shape:
                out -= shape * float(np.log(np.maximum(A, _kl_floor(A.dtype))).sum())
        return out


def _balancing_scales(w_sq, h_sq, penalty):
    """Scales s (k,) for W's columns (H's rows get 1 / s) that minimise a ridge on both
    factors, ``l2_W/2 s^2 |w|^2 + l2_H/2 |h|^2 / s^2``, at fixed WH; None when there is no
    such ridge. WH, hence the data term, is unchanged, so the objective can only fall: this
    removes the slow drift along the scaling valley (W D, D^-1 H) that a ridge otherwise
    leaves to the factor updates, which can multiply the iterations to convergence."""
    if not (penalty.l2_W > 0 and penalty.l2_H > 0 and penalty.l1_W == penalty.l1_H == 0):
        return None
    w_sq = np.asarray(w_sq, dtype=np.float64)
    h_sq = np.asarray(h_sq, dtype=np.float64)
    both = (w_sq > 0) & (h_sq > 0)
    s = np.ones_like(w_sq)
    s[both] = ((penalty.l2_H * h_sq[both]) / (penalty.l2_W * w_sq[both])) ** 0.25
    return s


def _gamma_balancing_scales(w_sum, h_sum, m, n, penalty):
    """Scales d (k,) for W's columns (H's rows get 1 / d) that minimise Gamma priors on both
    factors at fixed WH: ``l1_W d |w|_1 + l1_H |h|_1 / d - (shape_W m - shape_H n) log d``
    (m rows of W, n columns of H), the positive root of ``l1_W |w|_1 d^2 - C d -
    l1_H |h|_1 = 0``; None when there are no such priors. Without it, coordinate descent
    drifts slowly along the scaling valley and needs several times the iterations."""
    if not (penalty.l1_W > 0 and penalty.l1_H > 0 and penalty.l2_W == penalty.l2_H == 0
            and (penalty.shape_W > 0 or penalty.shape_H > 0)):
        return None
    a = penalty.l1_W * np.asarray(w_sum, dtype=np.float64)
    b = penalty.l1_H * np.asarray(h_sum, dtype=np.float64)
    C = penalty.shape_W * m - penalty.shape_H * n
    d = np.ones_like(a)
    both = (a > 0) & (b > 0)
    d[both] = (C + np.sqrt(C * C + 4.0 * a[both] * b[both])) / (2.0 * a[both])
    return d


# Extrapolated KL coordinate descent keeps at least this share of each entry: projected onto
# >= 0, a push from a big first move zeroes entries that the Gamma priors' log barrier then
# lets Newton steps regrow only by doubling from eps, and the fit stalls far above the plain
# one's objective.
_KL_PUSH_FLOOR = 0.5
_STALLED = 10  # steps without a new best after which an extrapolated fit stops


class _Extrapolation:
    """Extrapolated HALS (HER; Ang & Gillis 2019, "Accelerating nonnegative matrix
    factorization algorithms using extrapolation"): each factor update starts from the
    previous iterate pushed further along its last move, ``A + beta (A - A_prev)`` projected
    onto A >= 0. The objective then comes free at (W_n, extrapolated H_n) from the W
    update's products; where it rises, the step is undone (the next one starts from the
    plain iterates) and beta shrinks; while it falls, beta grows towards a cap that itself
    grows. The objective is not monotone: the fit keeps its best iterate (``keep``,
    ``converged``, ``best_factors``, for `_run`). A solver calls ``start`` on W at a step's
    start, ``middle`` on H after its update and ``end`` with the objective; ``rescale`` when
    it rescales components (``W * s``, ``H / s``)."""

    def __init__(self, floor=0.0):
        self.floor = floor
        self.beta, self.cap, self.last = 0.5, 1.0, math.inf
        self.W_prev = self.H_prev = None
        self.undone = True  # the next step starts from plain iterates

    def start(self, W):
        plain = W.copy()
        if not self.undone:
            W = _push(W, self.W_prev, self.beta, self.floor)
        self.W_prev = plain
        return W

    def middle(self, H):
        plain = H.copy()
        if self.H_prev is not None:
            H = _push(H, self.H_prev, self.beta, self.floor)
        self.H_prev = plain
        return H

    def end(self, objective, H):
        """H to hold after the step: the plain H_n where the objective rose, else H."""
        self.undone = objective > self.last
        self.last = objective
        if self.undone:
            self.cap, self.beta = self.beta, self.beta / 1.5
            return self.H_prev.copy()
        self.beta = min(self.cap, 1.01 * self.beta)
        self.cap = min(1.0, 1.005 * self.cap)
        return H

    def keep(self, objective, factors):
        self.best, self.stalled = objective, 0
        self.kept = [a.copy() for a in factors]

    def converged(self, objective, tol, factors):
        """Whether a fit stops after a step that reached ``objective``: when the step was
        kept (not undone) and lowered the best objective by less than ``tol`` times it, or
        after _STALLED steps without lowering it (rounding: a plain step just after an
        undone one may sit above the best, so one such step says nothing)."""
        previous = self.best
        self.stalled += 1
        if objective < self.best:
            self.keep(objective, factors)
        small = not self.undone and previous - self.best <= tol * abs(previous)
        return (tol > 0 or objective == 0) and ((small and not self.stalled)
                                                or self.stalled >= _STALLED)

    def best_factors(self):
        return tuple(np.ascontiguousarray(a) for a in self.kept)

    def rescale(self, s):
        if self.W_prev is not None:
            self.W_prev *= s.astype(self.W_prev.dtype)
        if self.H_prev is not None:
            self.H_prev /= s.astype(self.H_prev.dtype)


def _push(A, previous, beta, floor=0.0):
    """max(A + beta (A - previous), floor A), in A's dtype."""
    out = A - previous
    out *= beta
    out += A
    return np.maximum(out, floor * A if floor else 0, out=out)


def _sqnorm(A):
    """Sum of squares, in float64: other dtypes are converted a block of `_BLOCK` entries at a
    time (a float32 X is never copied whole)."""
    a = A.ravel()
    if a.dtype == np.float64:
        return float(np.dot(a, a))
    return float(sum(np.dot(part, part) for part in (a[i:i + _BLOCK].astype(np.float64)
                                                      for i in range(0, max(a.size, 1), _BLOCK))))


def _fdot(A, B):
    """<A, B> accumulated in float64."""
    return float(np.dot(A.ravel().astype(np.float64, copy=False),
                        B.ravel().astype(np.float64, copy=False)))


def _run(solver, data, method, loss, max_iter, tol, callback, start):
    losses = [solver.objective]
    times = [time.perf_counter() - start]
    accel = getattr(solver, "accel", None)
    if accel is not None:
        accel.keep(solver.objective, solver.factors())
    revival = _Revival(data, solver) if method == "hals" and solver.update_H else None
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        f = solver.step()
        undone = revival is not None and revival.undo_if_worse(solver, f)
        losses.append(solver.objective if undone else f)
        times.append(time.perf_counter() - start)
        if undone:
            continue
        prev = losses[-2]
        if accel is not None:
            converged = accel.converged(f, tol, solver.views())
        else:
            converged = (tol > 0 or f == 0) and prev - f <= tol * abs(prev)
        if revival is not None and revival.revive(solver):
            converged = False
        if converged:
            break
        if callback is not None and callback(n_iter, *solver.views(), f):
            break
    W, H = solver.factors() if accel is None else accel.best_factors()
    return NMFResult(W, H, n_iter, converged, np.array(losses), np.array(times),
                     data.relative_error(W, H),
                     time.perf_counter() - start, method, loss)


# Times a fit restarts one component after it died (see `_Revival`).
_REVIVALS = 2


class _Revival:
    """Dead components of a HALS fit brought back. A component whose W column or H row is
    all zero stays so under HALS (each factor's update of it is zero while the other is), and
    a ridge makes that easy to reach: the fit is then one of rank k - 1 that looks like one of
    rank k. Such a component restarts as a flat W column at the inits' scale
    (`_entry_scale`) and a zero H row; the next step fits the H row to the residual and the W
    column to that, a step of the non-negative power method. A plain fit keeps the step only if
    it did not raise the objective: otherwise it is undone (its factors and objective restored,
    the history showing a flat step) and the component stays dead for good, so the objective
    never increases. An extrapolated fit keeps its best iterate anyway. Each component
    restarts at most _REVIVALS times."""

    def __init__(self, data, solver):
        self.data = data
        self.left = np.full(solver.views()[1].shape[0], _REVIVALS)
        self.plain = getattr(solver, "accel", None) is None
        self.saved = None

    def revive(self, solver):
        """Restart the dead components that have restarts left; whether there were any."""
        W, H = solver.views()
        dead = np.flatnonzero(((W.max(axis=0) == 0) | (H.max(axis=1) == 0)) & (self.left > 0))
        if not dead.size:
            return False
        fill = _entry_scale(self.data.observed_mean(), len(self.left))  # rarely needed
        if fill == 0:  # nothing to fit: no restarts
            self.left[:] = 0
            return False
        self.left[dead] -= 1
        if self.plain:
            self.saved = (W.copy(), H.copy(), solver.objective, dead)
        W[:, dead] = fill
        H[dead, :] = 0
        solver.edited()
        return True

    def undo_if_worse(self, solver, f):
        """After the step that follows a restart: undo it if it raised the objective."""
        if self.saved is None:
            return False
        W0, H0, f0, dead = self.saved
        self.saved = None
        if f <= f0:
            return False
        W, H = solver.views()
        W[...] = W0
        H[...] = H0
        solver.objective = f0
        solver.edited()
        self.left[dead] = 0
        return True


def _observed_sq_norm(data):
    """Sum of squares of a `_Data`'s observed cells."""
    if data.masked:
        return _sqnorm(data.values if data.zeros is None else data.zeros)
    if data.sparse is not None:
        return _sqnorm(data.sparse.data)
    return _sqnorm(data.dense)


# Stored entries a pass over a large sparse X reads at a time: temporaries of a few MB.
_BLOCK = 1 << 22


def _row_blocks(indptr):
    """Row bounds (r_0 = 0 < r_1 < ... = m) cutting a CSR matrix (its ``indptr``) into
    consecutive blocks of rows of about `_BLOCK` stored entries each."""
    m = len(indptr) - 1
    return np.unique(np.concatenate([[0], np.searchsorted(indptr, np.arange(
        _BLOCK, indptr[-1], _BLOCK)), [m]]))


def _observed_rss(data, W, H):
    """Exact sum of squared residuals over a `_Data`'s observed cells, without an m x n
    temporary."""
    if data.zeros is not None:  # a block of rows at a time: no m x n temporary, no cell lists
        rows = max(1, 2 ** 20 // data.shape[1])
        return sum(_sqnorm(np.where(data.observed[a:a + rows], data.zeros[a:a + rows]
                                    - W[a:a + rows] @ H, 0.0))
                   for a in range(0, data.shape[0], rows))
    Ht = np.ascontiguousarray(H.T)
    if data.masked:
        return _cells_rss(W, Ht, _indptr(data.rows, data.shape[0]), data.cols, data.values,
                          0.0, 0.0)[0]
    if data.sparse is not None:  # stored cells exactly, zeros as |WH|^2 - stored cells' part
        X = data.sparse
        stored = stored_wh2 = 0.0
        bounds = _row_blocks(X.indptr)  # int64 indices for a block of rows at a time
        for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = X.indptr[r0], X.indptr[r1]
            indptr = (X.indptr[r0:r1 + 1] - lo).astype(np.int64)
            idx = X.indices[lo:hi].astype(np.int64)
            stored, stored_wh2 = _cells_rss(W[r0:r1], Ht, indptr, idx, X.data[lo:hi], stored,
                                            stored_wh2)
        everywhere = _fdot(W.T @ W, H @ H.T)
        return stored + max(everywhere - stored_wh2, 0.0)
    rss = 0.0
    block = max(1, 4_000_000 // data.shape[1])
    for lo in range(0, data.shape[0], block):
        rss += _sqnorm(data.dense[lo:lo + block] - W[lo:lo + block] @ H)
    return rss


def _make_solver(data, W, H, method, loss, penalty, update_H=True):
    """The solver for a `_Data`, by loss, method and the data's kind: KL coordinate descent
    on anything; KL multiplicative updates on cells (missing or sparse) or a dense X;
    Frobenius on data with missing cells, or on a dense or sparse X. (Cross-validation's
    training sets make their own: `_FoldTraining.solver`.)"""
    if loss == "kl" and method == "cd":
        return _KLCDSolver(*_kl_lines(data), W, H, penalty, update_H)
    if loss == "kl" and method == "mu" and data.zeros is not None:
        return _DenseKLSolver(data.zeros, W, H, penalty, update_H, data.observed)
    if loss == "kl" and (data.masked or data.sparse is not None):
        return _CellsKLSolver(data, W, H, penalty, update_H)
    if data.masked:
        return _MaskedSolver(data, W, H, method, penalty, update_H)
    if loss == "kl":
        return _DenseKLSolver(data.dense, W, H, penalty, update_H)
    return _DenseSolver(data.dense if data.sparse is None else data.sparse, W, H, method,
                        penalty, update_H)


class _TransposedW:
    """Solvers holding W transposed (Wt, k x m) and H (k x n)."""

    def views(self):
        """(W, H) as views of the live arrays, for callbacks and `_Revival`."""
        return self.Wt.T, self.H

    def edited(self):
        """The factors were changed through ``views()``: refresh what is derived from them."""

    def factors(self):
        """(W, H) as contiguous arrays, for the result."""
        return np.ascontiguousarray(self.Wt.T), self.H


class _TransposedH:
    """Solvers holding W (m x k) and H transposed (Ht, n x k)."""

    def views(self):
        return self.W, self.Ht.T

    def edited(self):
        """The factors were changed through ``views()``: refresh what is derived from them."""

    def factors(self):
        return self.W, np.ascontiguousarray(self.Ht.T)


def _inner_sweeps(p, q, k):
    """HALS inner sweeps per factor update (Gillis & Glineur 2012): the BLAS products for a
    p x k factor cost about (p q + q k) / (p (k + 1)) sweeps, so half of that is spent on
    extra sweeps, which converge H or W further at little cost."""
    rho = 1.0 + (p * q + q * k) / (p * (k + 1.0))
    return max(1, min(int(1 + 0.5 * rho), 50))


# =============================================================================================
# Fitting: a fully observed X, dense or sparse
# =============================================================================================

class _DenseSolver(_TransposedW):
    """Frobenius loss on a fully observed X (ndarray or sparse), BLAS products. W is held
    transposed (k x m) so both factor updates run the same row-major kernels."""

    accel = None  # an _Extrapolation (HALS fits with extrapolate=True)

    def __init__(self, X, W, H, method, penalty, update_H, sweeps=None):
        self.X, self.method, self.pen, self.update_H = X, method, penalty, update_H
        self.Wt = np.ascontiguousarray(W.T)
        self.H = H
        self.xx = _sqnorm(X.data if sp.issparse(X) else X)
        m, n = X.shape
        k = H.shape[0]
        if sweeps is not None:
            self.sweeps_W = self.sweeps_H = sweeps
        elif method == "hals":
            self.sweeps_W, self.sweeps_H = _inner_sweeps(m, n, k), _inner_sweeps(n, m, k)
        else:
            self.sweeps_W = self.sweeps_H = 100  # gdcls: H by constrained least squares
        self.WtW = self.Wt @ self.Wt.T
        HXt = self._HXt()
        self.objective = self._objective(HXt, self.H @ self.H.T)

    def _HXt(self):
        if sp.issparse(self.X):
            return np.ascontiguousarray((self.X @ self.H.T).T)
        return self.H @ self.X.T

    def _WtX(self):
        if sp.issparse(self.X):
            return np.ascontiguousarray((self.X.T @ self.Wt.T).T)
        return self.Wt @ self.X

    def _objective(self, HXt, HHt):
        half_rss = 0.5 * self.xx - _fdot(self.Wt, HXt) + 0.5 * _fdot(self.WtW, HHt)
        return max(half_rss, 0.0) + self.pen.value(self.Wt, self.H)

    def edited(self):
        self.WtW = self.Wt @ self.Wt.T

    def _balance(self):
        s = _balancing_scales(np.diag(self.WtW), np.einsum("ij,ij->i", self.H, self.H),
                              self.pen)
        if s is not None:
            self.Wt *= s[:, None].astype(self.Wt.dtype)
            self.H /= s[:, None].astype(self.H.dtype)
            self.WtW *= np.outer(s, s)
            if self.accel is not None:
                self.accel.rescale(s[:, None])

    def step(self, want_loss=True):
        p, x = self.pen, self.accel
        if x is not None:
            self.Wt = x.start(self.Wt)
            self.WtW = self.Wt @ self.Wt.T
        if self.update_H:
            self._balance()
            WtX = self._WtX()
            if self.method == "mu":
                _mu_apply(self.H, WtX, self.WtW @ self.H, p.l1_H, p.l2_H)
            else:
                tol = 0.1 if self.method == "hals" else 1e-3
                _hals_update(self.H, self.WtW, WtX, p.l1_H, p.l2_H, self.sweeps_H, tol)
        if x is not None:
            self.H = x.middle(self.H)
        HHt = self.H @ self.H.T
        HXt = self._HXt()
        if self.method == "hals" or not self.update_H:  # transform: W by exact NNLS
            sweeps, tol = (self.sweeps_W, 0.1) if self.update_H else (100, 1e-3)
            _hals_update(self.Wt, HHt, HXt, p.l1_W, p.l2_W, sweeps, tol)
        else:
            _mu_apply(self.Wt, HXt, HHt @ self.Wt, p.l1_W, p.l2_W)
        self.WtW = self.Wt @ self.Wt.T
        self.objective = self._objective(HXt, HHt) if want_loss else math.nan
        if x is not None:
            self.H = x.end(self.objective, self.H)
        return self.objective


class _DenseKLSolver(_TransposedW):
    """KL multiplicative updates on a dense X, fully observed or with missing cells
    (``observed`` False; X holds 0 there): each factor in one pass over X's lines
    (`_kl_mu_lines`), its rows for W and, from a transposed copy, its columns for H."""

    def __init__(self, X, W, H, penalty, update_H, observed=None):
        self.pen, self.update_H = penalty, update_H
        self.rows = _kl_mu_line_arrays(X, observed)
        if update_H:
            self.cols = _kl_mu_line_arrays(np.ascontiguousarray(X.T),
                                           None if observed is None else observed.T)
        self.Wt = np.ascontiguousarray(W.T)
        self.H = H
        self.eps = _kl_floor(X.dtype)
        self.objective = self._update_W(False, True)

    def _update_W(self, update, want_loss):
        p = self.pen
        loss = _kl_mu_lines(self.Wt, self.H, self.rows, p.l1_W, p.l2_W, self.eps, update,
                            want_loss)
        return loss + p.value(self.Wt, self.H) if want_loss else math.nan

    def step(self, want_loss=True):
        p = self.pen
        if self.update_H:
            _kl_mu_lines(self.H, self.Wt, self.cols, p.l1_H, p.l2_H, self.eps, True, False)
        self.objective = self._update_W(True, want_loss)
        return self.objective


class _LinesWithMissing(NamedTuple):
    """X's rows as `_kl_mu_lines` reads them: X (0 in missing cells) and each row's missing
    cells as CSR (``miss_ptr``, ``miss_idx``; none when every cell is observed)."""

    X: np.ndarray
    miss_ptr: np.ndarray
    miss_idx: np.ndarray


def _kl_mu_line_arrays(X, observed):
    """`_LinesWithMissing` of X's rows (``observed`` None: every cell)."""
    if observed is None:
        return _LinesWithMissing(X, np.zeros(X.shape[0] + 1, dtype=np.int64),
                                 np.zeros(0, dtype=np.int64))
    missing = sp.csr_matrix(~observed)
    return _LinesWithMissing(X, missing.indptr.astype(np.int64),
                             missing.indices.astype(np.int64))


def _kl_floor(dtype):
    """Smallest WH used in X / WH: keeps ratios finite without touching realistic values."""
    return float(np.sqrt(np.finfo(dtype).tiny))


# Conventions: factors are row-major; a kernel that updates "rows" of A (p x k) reads the other
# factor B (q x k) through the cells of each row, given as CSR (indptr, idx, values).
# Scalar sums accumulate in float64 whatever the array dtype. _FAST lets LLVM reorder sums and
# fuse multiply-adds (so loops vectorize) but keeps IEEE semantics for NaN, inf and signed zero.
# Integers a kernel passes to another kernel start as np.int64(...), not a bare literal: numba
# would compile the callee once more for the literal's type (Literal[int]), compile time the
# first fit pays for nothing. Helpers that kernels call from one place or a few are inlined
# (inline="always"): each function numba compiles on its own costs a fixed part of a second
# at first use. Inlined code takes its caller's fastmath and error model, so only helpers with
# their callers' flags, or with no float arithmetic, are inlined; large ones called from many
# kernels are not (each caller would compile them again).
_FAST = {"reassoc", "contract"}


def _jit(kernels_only=False, **options):
    """numba.njit as every kernel here is compiled: cached on disk (``cache=True``), and
    without the wrappers numba would otherwise compile beside it at first use: the C-callable
    one (nothing calls a kernel from C), and for a helper only other kernels call
    (``kernels_only``) the Python-callable one too: less to compile at first use
    (benchmarks/README.md, "bench_first_run.py")."""
    return njit(cache=True, no_cfunc_wrapper=True, no_cpython_wrapper=kernels_only, **options)


@_jit(fastmath=_FAST)
def _hals_update(A, G, B, l1, l2, max_sweeps, tol):
    """Coordinate descent on A (k x p) >= 0 for 1/2 tr(A'GA) - tr(B'A) + l1 sum A + l2/2 |A|^2.

    G (k x k) is the Gram matrix of the other factor and B (k x p) its product with X. Each
    coordinate step is exact, so the objective never increases. Sweeps stop after
    ``max_sweeps`` or when a sweep moves A by less than ``tol`` times the first sweep."""
    k, p = A.shape
    acc = np.empty(p, dtype=np.float64)
    first = 0.0
    for sweep in range(max_sweeps):
        moved = 0.0
        for t in range(k):
            hess = G[t, t] + l2
            if hess <= 0.0:
                continue
            _gram_row_times(G, A, t, acc)
            for j in range(p):
                old = A[t, j]
                new = old - (acc[j] + l2 * old + l1 - B[t, j]) / hess
                if new < 0.0:
                    new = 0.0
                A[t, j] = new
                moved += (new - old) * (new - old)
        if sweep == 0:
            first = moved
        elif moved <= tol * tol * first:
            return sweep + 1
    return max_sweeps


@_jit(fastmath=_FAST, inline="always")
def _gram_row_times(G, A, t, acc):
    """acc[j] = sum over r of G[t, r] A[r, j], four terms per pass (a quarter of the
    accumulator traffic)."""
    k, p = A.shape
    for j in range(p):
        acc[j] = 0.0
    r = 0
    while r + 4 <= k:
        g0, g1, g2, g3 = G[t, r], G[t, r + 1], G[t, r + 2], G[t, r + 3]
        for j in range(p):
            acc[j] += ((g0 * A[r, j] + g1 * A[r + 1, j])
                       + (g2 * A[r + 2, j] + g3 * A[r + 3, j]))
        r += 4
    while r < k:
        g = G[t, r]
        for j in range(p):
            acc[j] += g * A[r, j]
        r += 1


@_jit()
def _mu_apply(A, num, den, l1, l2):
    """Multiplicative update A *= num / (den + l1 + l2 A) where the denominator is positive
    (Frobenius loss: the minimum of the Lee-Seung bound, l2 included)."""
    k, p = A.shape
    for t in range(k):
        for j in range(p):
            d = den[t, j] + l1 + l2 * A[t, j]
            if d > 0.0:
                A[t, j] = A[t, j] * (num[t, j] / d)


@_jit()
def _kl_mu_apply(A, ratio_sums, den, l1, l2):
    """KL multiplicative update of A (k x p) from ``ratio_sums`` (the other factor's products
    with X / WH) and ``den`` (its sums): each entry moves to the minimum of its Lee-Seung
    bound, which is ``A * ratio_sums / (den + l1)`` without a ridge; with one it solves a
    quadratic (`_kl_majorizer_min`), where the Frobenius form ``/ (den + l1 + l2 A)`` would
    overshoot the minimum and can raise the objective."""
    k, p = A.shape
    for t in range(k):
        for j in range(p):
            A[t, j] = _kl_majorizer_min(A[t, j], ratio_sums[t, j], den[t, j] + l1, l2)


@_jit(error_model="numpy", kernels_only=True)
def _kl_majorizer_min(old, num, linear, l2):
    """Minimum over s >= 0 of linear s + l2/2 s^2 - old num log s: the Lee-Seung (EM) bound of
    the coordinate's objective at ``old``."""
    if l2 > 0.0:
        return (math.sqrt(linear * linear + 4.0 * l2 * old * num) - linear) / (2.0 * l2)
    if linear > 0.0:
        return old * num / linear
    return old


@_jit(fastmath=_FAST, error_model="numpy")
def _kl_mu_lines(A, Bt, lines, l1, l2, eps, update, want_loss):
    """KL multiplicative update (`_kl_mu_apply`'s) of A (k x q), column j from line j of X
    (``lines``: `_LinesWithMissing`, q x p) and the other factor Bt (k x p):
    the numerators are Bt's products with X / (Bt' A[:, j]), the denominators Bt's sums
    over the line's observed cells (its whole sums less its missing cells'). A column's
    update needs its own line only, so one pass over the lines does it. ``update`` False:
    A is left as it is. Returns the objective's data part over the observed cells after the
    update when ``want_loss``, else 0."""
    X, miss_ptr, miss_idx = lines.X, lines.miss_ptr, lines.miss_idx
    k, q = A.shape
    p = Bt.shape[1]
    pred = np.empty(p, dtype=np.float64)
    ratio = np.empty(p, dtype=np.float64)
    num = np.empty(k, dtype=np.float64)
    den = np.empty(k, dtype=np.float64)
    sums = np.empty(k, dtype=np.float64)
    for a in range(k):
        s = 0.0
        for i in range(p):
            s += Bt[a, i]
        sums[a] = s
    B = np.empty((p if len(miss_idx) else 0, k), dtype=Bt.dtype)  # B[i]: Bt[:, i] side by
    for i in range(B.shape[0]):                                    # side, for missing cells
        for a in range(k):
            B[i, a] = Bt[a, i]
    loss = 0.0
    for j in range(q):
        x = X[j]
        if update:
            _predict_line(A, j, Bt, pred)
            for i in range(p):
                ratio[i] = x[i] / max(pred[i], eps)
            _rows_times(Bt, ratio, num)
            _less_rows(sums, B, miss_idx[miss_ptr[j]:miss_ptr[j + 1]], den)
            for a in range(k):
                A[a, j] = _kl_majorizer_min(A[a, j], num[a], max(den[a], 0.0) + l1, l2)
        if want_loss:
            _predict_line(A, j, Bt, pred)
            for i in range(p):
                wh = max(pred[i], eps)
                loss += wh - x[i]
                if x[i] > 0.0:
                    loss += x[i] * math.log(x[i] / wh)
            for s in range(miss_ptr[j], miss_ptr[j + 1]):
                loss -= max(pred[miss_idx[s]], eps)
    return loss


@_jit(inline="always")
def _less_rows(sums, B, rows, out):
    """out[a] = sums[a] - B[r, a] for each r in rows in turn, four components per pass in
    registers: an accumulator in memory would wait on its own store at every cell."""
    k = out.shape[0]
    a = 0
    while a + 4 <= k:
        d0, d1, d2, d3 = sums[a], sums[a + 1], sums[a + 2], sums[a + 3]
        for r in rows:
            d0 -= B[r, a]
            d1 -= B[r, a + 1]
            d2 -= B[r, a + 2]
            d3 -= B[r, a + 3]
        out[a], out[a + 1], out[a + 2], out[a + 3] = d0, d1, d2, d3
        a += 4
    while a < k:
        d0 = sums[a]
        for r in rows:
            d0 -= B[r, a]
        out[a] = d0
        a += 1


@_jit(fastmath=_FAST, inline="always")
def _predict_line(A, j, Bt, pred):
    """pred[i] = sum over a of Bt[a, i] A[a, j], four components per pass."""
    k, p = Bt.shape
    for i in range(p):
        pred[i] = 0.0
    a = 0
    while a + 4 <= k:
        h0, h1, h2, h3 = A[a, j], A[a + 1, j], A[a + 2, j], A[a + 3, j]
        b0, b1, b2, b3 = Bt[a], Bt[a + 1], Bt[a + 2], Bt[a + 3]
        for i in range(p):
            pred[i] += (b0[i] * h0 + b1[i] * h1) + (b2[i] * h2 + b3[i] * h3)
        a += 4
    while a < k:
        h0 = A[a, j]
        b0 = Bt[a]
        for i in range(p):
            pred[i] += b0[i] * h0
        a += 1


@_jit(fastmath=_FAST, inline="always")
def _rows_times(Bt, r, out):
    """out[a] = Bt[a] . r, four rows per pass (four independent sums)."""
    k, p = Bt.shape
    a = 0
    while a + 4 <= k:
        b0, b1, b2, b3 = Bt[a], Bt[a + 1], Bt[a + 2], Bt[a + 3]
        s0 = s1 = s2 = s3 = 0.0
        for i in range(p):
            ri = r[i]
            s0 += b0[i] * ri
            s1 += b1[i] * ri
            s2 += b2[i] * ri
            s3 += b3[i] * ri
        out[a], out[a + 1], out[a + 2], out[a + 3] = s0, s1, s2, s3
        a += 4
    while a < k:
        b0 = Bt[a]
        s0 = 0.0
        for i in range(p):
            s0 += b0[i] * r[i]
        out[a] = s0
        a += 1


# =============================================================================================
# Fitting: data with missing cells (exact masked steps)
# =============================================================================================

def _indptr(sorted_index, size):
    out = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_index, minlength=size), out=out[1:])
    return out


def _cells(rows, cols, shape):
    """Row-major (CSR) and column-major (CSC) index structures of a set of cells."""
    m, n = shape
    order = np.lexsort((rows, cols))
    return (_indptr(rows, m), np.ascontiguousarray(cols, dtype=np.int64),
            _indptr(cols[order], n), np.ascontiguousarray(rows[order], dtype=np.int64), order)


class _MaskedSolver(_TransposedH):
    """Frobenius loss with missing cells, exactly. Each row's Gram matrix over its observed
    cells is built from whichever of the row's cell sets is smaller: the full Gram matrix G0
    minus the row's *missing* cells' part (a mostly observed row) or the sum over its
    *observed* cells (a mostly missing one, which also avoids cancellation). Columns choose
    the same way for the H update. Beyond the two BLAS or sparse products of a dense
    iteration, an iteration costs O(min(missing, observed) * k^2) for these Gram matrices;
    the sweeps then cost (m + n) k^2 each, as dense ones do, but read a Gram matrix per row
    (so they run slower than dense sweeps), and at most as many are run; lines that share
    their missing cells, from _SHARED_LINES of them on (a batch of samples missing the same
    features), share one Gram matrix in their sweeps too, at the dense kernel's speed.

    HALS fits take a cheaper step on mostly observed lines with few missing cells (at most
    _majorized_fraction(k) of the line): a majorize-minimize step. The row's problem
    1/2 a'G_a a - y.a is majorized by replacing G_a with G0 (G0 - G_a is positive
    semidefinite), adding (G0 - G_a) a_old to y, so that the bound touches the objective at
    the current a_old; coordinate descent on the bound then lowers the masked objective
    itself. The extra term is the sum over the missing cells of the current prediction
    (b . a_old) times b: O(missing * k), and the sweeps are the dense kernel's, with one G0.
    It is the EM step for least squares with missing data (a dense step on X with its missing
    cells set to the current predictions) without forming that matrix. The objective stays
    the masked one: missing cells are never read, the objective never increases, and the
    fixed points are the masked problem's. But a step gains less than an exact one, the less
    the more is missing, hence the limit.
    No m x n array is allocated per iteration. Holds W (m x k) and H transposed (n x k)."""

    accel = None  # an _Extrapolation (HALS fits with extrapolate=True)

    def __init__(self, data, W, H, method, penalty, update_H, sweeps=None):
        self.method, self.pen, self.update_H = method, penalty, update_H
        m, n = data.shape
        k = W.shape[1]
        self.W, self.Ht = W, np.ascontiguousarray(H.T)
        # Where X, its cell sets and the Gram matrices' bases come from: data with missing
        # cells, or a cross-validation training set of such data read through the fold rule.
        self.lay = data.mask_layout()
        self.xx = self.lay.xx
        # GDCLS and transform solve exactly
        mm_missing = _majorized_fraction(k) if method == "hals" and update_H else -1.0
        rows, cols = self.lay.rows, self.lay.cols
        if method == "hals" or not update_H:  # the lines coordinate descent updates
            rows = rows.by_units(self.lay.cols)
        if method != "mu":
            cols = cols.by_units(self.lay.rows)
        self.rows = rows.majorized(n, mm_missing)
        self.cols = cols.majorized(m, mm_missing)
        longest = max(self.rows.longest(), self.cols.longest())
        # Gathered B rows and the cells' predictions: separate buffers, so LLVM can vectorize.
        self.scratch = np.empty(max(longest, 1) * (k + 4), dtype=np.float64)
        self.u = np.empty(max(longest, 1), dtype=np.float64)
        if sweeps is not None:
            self.sweeps_W = self.sweeps_H = sweeps
        elif method == "hals":
            # The dense fit's sweeps: an iteration does the same work plus the Gram matrices.
            self.sweeps_W, self.sweeps_H = _inner_sweeps(m, n, k), _inner_sweeps(n, m, k)
        else:
            self.sweeps_W = self.sweeps_H = 100  # gdcls: H by constrained least squares
        XHt, bases = self.lay.products_W(self.Ht)
        model = _masked_model(self.W, self.Ht, bases, self.lay.rows.kernel(), np.arange(m))
        self.objective = self._objective(XHt, model)

    def _objective(self, XHt, model):
        """1/2 (|X|^2 - 2 <W, X H'> + sum over observed cells of (WH)^2) + penalties."""
        half_rss = 0.5 * self.xx - _fdot(self.W, XHt) + 0.5 * model
        return max(half_rss, 0.0) + self.pen.value(self.W, self.Ht)

    def step(self, want_loss=True):
        p, x = self.pen, self.accel
        if x is not None:
            self.W = x.start(self.W)
        if self.update_H:
            s = _balancing_scales(np.einsum("ij,ij->j", self.W, self.W),
                                  np.einsum("ij,ij->j", self.Ht, self.Ht), p)
            if s is not None:
                self.W *= s.astype(self.W.dtype)
                self.Ht /= s.astype(self.Ht.dtype)
                if x is not None:
                    x.rescale(s)
            XtW, bases = self.lay.products_H(self.W)
            if self.method == "mu":
                _masked_mu_rows(self.Ht, self.W, bases, self.cols.kernel(), XtW, p.l1_H,
                                p.l2_H, self.scratch, self.u, False)
            else:
                tol = 0.1 if self.method == "hals" else 1e-3
                _cd_lines(self.Ht, self.W, (XtW, bases), self.cols, (p.l1_H, p.l2_H),
                          (self.sweeps_H, tol), self.scratch, False)
        if x is not None:
            self.Ht = x.middle(self.Ht)
        XHt, bases = self.lay.products_W(self.Ht)
        if self.method == "hals" or not self.update_H:  # transform: W by exact NNLS
            sweeps, tol = (self.sweeps_W, 0.1) if self.update_H else (100, 1e-3)
            model = _cd_lines(self.W, self.Ht, (XHt, bases), self.rows, (p.l1_W, p.l2_W),
                              (sweeps, tol), self.scratch, want_loss)
        else:
            model = _masked_mu_rows(self.W, self.Ht, bases, self.rows.kernel(), XHt, p.l1_W,
                                    p.l2_W, self.scratch, self.u, want_loss)
        self.objective = self._objective(XHt, model) if want_loss else math.nan
        if x is not None:
            self.Ht = x.end(self.objective, self.Ht)
        return self.objective


class _LineArrays(NamedTuple):
    """`_MaskedLines` as the numba kernels take it (a named tuple compiles to a struct)."""

    ptr: np.ndarray
    idx: np.ndarray
    sign: np.ndarray
    group: np.ndarray
    cell_group: np.ndarray
    kptr: np.ndarray
    kidx: np.ndarray
    pattern: np.ndarray
    fold_rule: bool


@dataclass
class _MaskedLines:
    """One side's lines (X's rows, or its columns) as the masked kernels read them: each
    line's cell set (CSR ``ptr``, ``idx``), ``sign`` +1 where the set is the line's observed
    cells and its Gram matrix their sum, -1 where the set is its missing cells and its Gram
    matrix its base ``bases[group]`` less their sum. Cross-validation through the fold rule
    (`_MissingFoldTraining`) adds: a listed cell j is left out where ``cell_group[j]`` equals
    the line's group (it is in the line's held-out block, which the base has taken out, or
    held out, for an observed cell), and the kept cells (CSR ``kptr``, ``kidx``) count as
    observed. ``pattern``: lines with the same pattern have the same cell set, so the same
    Gram matrix, which the kernel then forms once (the first line of each pattern numbers
    it: batches of samples missing the same features share one). ``mm`` and ``exact``: the
    lines updated by a majorize-minimize step and exactly one by one (`_majorized_lines`);
    ``shared``: lines updated exactly together with the others of their pattern, their runs
    starting at ``shared_ptr``. ``fold_rule`` False: no cell is left out and none kept (the
    kernels then read a line's cells where they are listed)."""

    ptr: np.ndarray
    idx: np.ndarray
    sign: np.ndarray
    group: np.ndarray = None
    cell_group: np.ndarray = None
    kptr: np.ndarray = None
    kidx: np.ndarray = None
    pattern: np.ndarray = None
    mm: np.ndarray = None
    exact: np.ndarray = None
    shared: np.ndarray = None
    shared_ptr: np.ndarray = None
    units: np.ndarray = None
    fold_rule: bool = True

    def __post_init__(self):
        p = len(self.sign)
        if self.group is None:  # no fold rule: one base, nothing left out, nothing kept
            self.fold_rule = False
            self.group = np.zeros(p, dtype=np.int64)
            self.cell_group = np.full(int(self.idx.max(initial=0)) + 1, -1, dtype=np.int64)
        if self.kptr is None:
            self.kptr, self.kidx = np.zeros(p + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if self.pattern is None:
            self.pattern = np.arange(p, dtype=np.int64)
        if self.shared is None:  # none swept together
            self.shared, self.shared_ptr = np.zeros(0, np.int64), np.zeros(1, np.int64)

    def kernel(self):
        """The arrays the numba kernels read, as a `_LineArrays`."""
        return _LineArrays(self.ptr, self.idx, self.sign, self.group, self.cell_group,
                           self.kptr, self.kidx, self.pattern, self.fold_rule)

    def majorized(self, length, max_missing):
        """These lines with ``mm``, ``exact`` and ``shared`` set. Lines sharing their
        pattern, lines with kept cells and lines by units are solved exactly. The lines of a
        pattern with at least _SHARED_LINES lines, given by their missing cells or by units,
        are swept together with one Gram matrix (`_pattern_cd_rows`: the dense kernel's
        speed); the other exact lines one by one, in pattern order (so that
        `_masked_cd_rows` forms a pattern's sums once). A line given by its observed cells
        goes alone: its model term then comes from its cells."""
        if self.units is not None:  # a majorize-minimize step reads cells, not units
            max_missing = -1.0
        mm, exact = _majorized_lines(self.sign, np.diff(self.ptr), length, max_missing)
        size = np.bincount(self.pattern, minlength=len(self.sign))[self.pattern]
        mm = mm[~((size > 1) | (np.diff(self.kptr) > 0))[mm]]
        exact = np.setdiff1d(np.arange(len(self.sign)), mm)
        exact = exact[np.argsort(self.pattern[exact], kind="stable")]
        together = ((size[exact] >= _SHARED_LINES)
                    & ((self.sign[exact] < 0) | (self.units is not None)))
        shared = exact[together]
        starts = np.r_[np.flatnonzero(np.diff(self.pattern[shared], prepend=-1)), len(shared)]
        return dataclasses.replace(self, mm=mm, exact=exact[~together], shared=shared,
                                   shared_ptr=starts.astype(np.int64))

    def longest(self):
        return int(np.diff(self.ptr).max(initial=0) + np.diff(self.kptr).max(initial=0))

    def by_units(self, other):
        """These lines with their cells grouped into the other side's patterns ("units"),
        where those are few (at most half as many as the other side's lines) and nothing is
        kept: the lines of a pattern have the same cells, so a line here holds all of a
        unit's lines or none, and its Gram matrix is a sum of unit Gram matrices (k^2 per
        unit, not per cell; batches of samples missing features: each feature's missing
        cells are a few whole batches). ``idx`` then numbers units, ``units`` maps the
        other side's lines to them."""
        if len(self.kidx) or len(other.kidx):
            return self
        first, units = np.unique(other.pattern, return_inverse=True)
        if 2 * len(first) > len(other.pattern):
            return self
        lines = np.repeat(np.arange(len(self.sign)), np.diff(self.ptr))
        keys = np.unique(lines * len(first) + units[self.idx])
        group = np.full(len(first), -1, dtype=np.int64)
        known = first < len(self.cell_group)
        group[known] = self.cell_group[first[known]]
        return dataclasses.replace(self, ptr=_indptr(keys // len(first), len(self.sign)),
                                   idx=keys % len(first), cell_group=group,
                                   units=units.astype(np.int64))

    def table(self, B):
        """The Gram table the kernels sum over a line's cells (see `_use_pairs`): unit Gram
        matrices, or B's rows' outer products, or none (gather B's rows instead)."""
        if self.units is not None:
            return _unit_pairs(B, self.units, len(self.cell_group))
        return _pair_products(B) if _use_pairs(B) else _NO_TABLE


def _mask_lines(observed):
    """`_MaskedLines` of the rows and of the columns of a boolean m x n of observed cells:
    a line (row or column) is "direct" (sign +1) when fewer of its cells are observed than
    missing; its cells are then its observed cells, else its missing cells (-1)."""
    return tuple(_MaskedLines(ptr, idx, np.where(direct, 1.0, -1.0),
                              pattern=_line_patterns(ptr, idx, direct))
                 for ptr, idx, direct in _line_cell_sets(observed))


def _line_cell_sets(observed):
    """[(ptr, idx, direct) of the rows, then of the columns]: each line's listed cells as
    CSR, ``direct`` where the line has fewer observed cells than missing ones and so lists
    its observed cells (else its missing ones)."""
    sets = []
    for along_rows, axis, length in ((True, 1, observed.shape[1]),
                                     (False, 0, observed.shape[0])):
        direct = 2 * observed.sum(axis=axis) < length
        sets.append((*_listed_cells(observed, direct, along_rows), direct))
    return sets


def _listed_cells(observed, direct, along_rows):
    """CSR (ptr, idx) of each line's listed cells: its observed cells where ``direct``, else
    its missing ones; the lines are the rows of ``observed`` (along_rows) or its columns."""
    listed = observed == (direct[:, None] if along_rows else direct[None, :])
    lines, idx = np.nonzero(listed if along_rows else listed.T)  # in line order
    return _indptr(lines, len(direct)), idx.astype(np.int64)


def _line_patterns(ptr, idx, *keys):
    """For each line, the first line with the same cell set and the same ``keys`` (arrays,
    one value per line): lines are grouped by a sum of random 64-bit codes of their cells,
    their length and the keys, then checked cell by cell against their group's first line
    (a line that differs, a hash collision, keeps its own number)."""
    codes = _cell_codes(int(idx.max(initial=0)) + 1)
    sums = np.zeros(len(idx) + 1, dtype=np.uint64)
    np.cumsum(codes[idx], out=sums[1:])  # wraps around: differences are sums mod 2**64
    lengths = np.diff(ptr)
    table = np.column_stack([(sums[ptr[1:]] - sums[ptr[:-1]]).view(np.int64), lengths,
                             *[np.asarray(key).astype(np.int64) for key in keys]])
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    pattern = first[inverse.ravel()].astype(np.int64)  # the group's lowest-numbered line
    check = np.flatnonzero(pattern != np.arange(len(pattern)))
    if len(check):
        line = np.repeat(check, lengths[check])
        offset = np.arange(len(line)) - np.repeat(np.cumsum(lengths[check]) - lengths[check],
                                                  lengths[check])
        collided = np.unique(line[idx[ptr[line] + offset] != idx[ptr[pattern[line]] + offset]])
        pattern[collided] = collided
    return pattern


def _cell_codes(size):
    """Random 64-bit codes of cell indices 0..size-1 (a fixed seed: patterns reproduce)."""
    return np.random.default_rng(0).integers(0, 2 ** 63, size, dtype=np.int64).view(np.uint64)


class _MaskLayout:
    """`_MaskedSolver`'s view of data with missing cells: X with zeros in its missing cells
    (dense, or CSR when fewer than half the cells are observed), and each line's cell set
    (`_mask_lines`), its base being the full Gram matrix."""

    def __init__(self, data):
        self.xx = _observed_sq_norm(data)
        if data.zeros is not None:
            self.X = data.zeros
        else:
            self.X = sp.csr_matrix((data.values, (data.rows, data.cols)), shape=data.shape)
        self.rows, self.cols = _mask_lines(data.observed_mask())

    def products_W(self, Ht):
        """(X H', the rows' bases) for the W update. Gram matrices are always float64: the
        kernels subtract the missing cells' part from them, which float32 rounding would
        swamp."""
        return _times_factor(self.X, Ht), _gram64(Ht)[None]

    def products_H(self, W):
        """(X' W, the columns' bases) for the H update."""
        return _times_factor(self.X.T, W), _gram64(W)[None]


def _cd_lines(A, B, products, lines, penalty, stop, scratch, want):
    """Coordinate descent on the rows of A: exactly (_masked_cd_rows) or by a
    majorize-minimize step (_mm_targets, then the dense kernel with each group's base), as
    the `_MaskedLines` say. ``products``: (X B, the Gram matrices' bases), as
    `_MaskLayout.products_W` gives them; ``penalty``: (l1, l2); ``stop``: (most sweeps, the
    relative move that ends them). Returns the sum over observed cells of (b . a)^2 after
    the update if ``want``."""
    (XB, bases), (l1, l2), (sweeps, tol) = products, penalty, stop
    L, mm = lines.kernel(), lines.mm
    model = 0.0
    table = _NO_TABLE
    if len(lines.exact) or (len(lines.shared) and lines.units is not None):
        table = lines.table(B)
    if len(lines.exact):
        model += _masked_cd_rows(A, B, bases, L, XB, lines.exact, l1, l2, sweeps, tol,
                                 table, scratch, want, lines.units is not None)
    if len(lines.shared):
        model += _pattern_cd_rows(A, B, bases, L, XB, lines.shared, lines.shared_ptr, l1, l2,
                                  sweeps, tol, table, scratch, want)
    for g in range(len(bases)):
        rows = mm if len(bases) == 1 else mm[lines.group[mm] == g]
        if not len(rows):
            continue
        At = np.empty((A.shape[1], len(rows)), dtype=np.float64)
        Yt = np.empty_like(At)
        _mm_targets(A, B, XB, L, rows, At, Yt)
        _hals_update(At, bases[g], Yt, l1, l2, sweeps, tol)
        A[rows] = At.T
        if want:
            model += _masked_model(A, B, bases, L, rows)
    return model


def _majorized_fraction(k):
    """Largest fraction of a line's cells missing for which HALS majorizes rather than
    solves exactly: ``min(0.2, 0.015 k)`` for k > 5; negative (no line is majorized) up to
    k = 5. A majorize-minimize step costs about 3k per missing cell against k(k+1)/2 for the
    exact Gram matrix (no saving up to k = 5), but needs more iterations as more is missing.
    Thresholds: see benchmarks/README.md, "bench_majorize.py" (benchmarks/bench_majorize.py)."""
    return min(0.2, 0.015 * k) if k > 5 else -1.0


def _majorized_lines(signs, n_cells, length, max_missing):
    """Split lines (rows or columns) into those updated by a majorize-minimize step, the
    mostly observed ones with at most ``max_missing`` of ``length`` cells missing, and the
    rest (exact coordinate descent). Returns the two index arrays."""
    mm = (signs < 0) & (n_cells <= max_missing * length)
    return np.flatnonzero(mm), np.flatnonzero(~mm)


def _times_factor(X, B):
    """X @ B (p x k) for a dense or sparse X, contiguous. Dense: computed as (B' X')', which
    BLAS runs faster than X @ B for a thin B."""
    if sp.issparse(X):
        return np.ascontiguousarray(X @ B)
    return np.ascontiguousarray((B.T @ X.T).T)


def _gram64(A):
    A = A.astype(np.float64, copy=False)
    return A.T @ A


# Lines of a pattern swept together, at least: the dense kernel's loops run across a
# pattern's lines, too short below this to beat reliably the one-by-one kernel, whose loops run
# across 64 lines.
_SHARED_LINES = 16


_NO_TABLE = None  # kernels gather B's rows instead


_PAIRS_BYTES = 2 ** 21


_CURVATURE_NOISE = 1e-14  # relative rounding noise of G0 - S in _masked_cd_rows (float64)


def _use_pairs(B):
    """Whether _masked_cd_rows should form Gram matrices from a table of every b b' (reading
    k(k+1)/2 numbers per cell) rather than from gathered cells (k numbers, then k(k+1)/2
    multiply-adds): faster while the table stays in cache (_PAIRS_BYTES)."""
    return B.shape[0] * _pairs_width(B.shape[1]) * 8 <= _PAIRS_BYTES


@_jit(inline="always")
def _pairs_width(k):
    """Row length of _pair_products' table: k(k+1)/2 rounded up to 4 doubles (a SIMD vector,
    half a cache line) when it fits there, else to whole cache lines of 8: summing rows then
    vectorizes with no scalar remainder, and in a table starting on a line
    (`_line_aligned_zeros`) no row reaches into one more cache line than its length needs."""
    n = k * (k + 1) // 2
    return 4 if n <= 4 else (n + 7) // 8 * 8


@_jit(inline="always")
def _line_aligned_zeros(n, width):
    """float64 zeros (n, width) whose first entry starts a 64-byte cache line (numba's
    arrays start 32 bytes into one). Allocated in the kernel that fills it, so that LLVM
    knows it aliases nothing."""
    buf = np.empty(n * width + 8, dtype=np.float64)
    start = ((64 - buf.ctypes.data % 64) % 64) // 8
    out = buf[start:start + n * width]
    for e in range(n * width):  # a loop, not np.zeros: one overload less to compile
        out[e] = 0.0
    return out.reshape((n, width))


@_jit(fastmath=_FAST)
def _masked_cd_rows(A, B, bases, L, XB, rows, l1, l2, sweeps, tol, pairs, scratch, want,
                    units=False):
    """Exact coordinate descent on each row a of A >= 0 for the masked least-squares problem
    1/2 a'G_a a - XB_a . a + l1 sum a + l2/2 |a|^2, G_a being the Gram matrix of B over the
    row's observed (training) cells. G_a is formed from the row's cell set (`_line_cells` of
    the lines L, a `_LineArrays`): its base bases[group[a]] (the full Gram matrix,
    or a fold's training part of it) minus the sum of b b' over its cells (its missing
    cells) with sign -1, the sum over its cells (its observed cells) with sign +1; plus its
    kept cells' sum. Rows are then swept in blocks, transposed so that the k^2 work of a
    sweep runs across the block's rows (_cd_block). Up to ``sweeps`` sweeps per block,
    stopping when the rows move by less than ``tol`` times their first sweep (on average,
    each row relative to itself). ``pairs``: a table of every b b' to sum (_sum_pairs; or
    of the units' Gram matrices, where the cells are units: `_MaskedLines.by_units`), or
    None to multiply gathered cells instead (_cells_gram); see _use_pairs. ``scratch`` holds
    at
    least (k + 4) times the longest cell set. Only the rows listed in ``rows`` are updated.
    Returns the sum over their observed cells of (b . a)^2 = a'G_a a after the update if
    ``want``."""
    signs, group = L.sign, L.group
    p = rows.shape[0]
    k = A.shape[1]
    size = max(8, min(64, 65536 // (k * k)))  # rows per block
    Gb = np.empty((k, k, size), dtype=np.float64)
    Ab = np.empty((k, size), dtype=np.float64)
    Yb = np.empty((k, size), dtype=np.float64)
    inv_hess = np.empty((k, size), dtype=np.float64)
    S = np.empty((k + 4, k + 4), dtype=np.float64)
    n_packed = k * (k + 1) // 2
    packed = np.empty((n_packed, size), dtype=np.float64)  # rows' sums, by column
    keep = np.empty(size, dtype=np.float64)  # 1: a row given by its missing cells, G0 - sum
    block_group = np.empty(size, dtype=np.int64)
    acc = np.empty(_acc_width(pairs, n_packed), dtype=np.float64)
    sel = np.empty(B.shape[0], dtype=np.int64)
    pattern = L.pattern
    saved = np.empty(n_packed, dtype=np.float64)  # the last pattern's sums
    last = -1
    total = 0.0
    for a0 in range(0, p, size):
        nb = min(size, p - a0)
        for j in range(nb):
            a = rows[a0 + j]
            if pattern[a] != last:  # else the same cells as the line before: the same sums
                _line_sums(a, L, B, pairs, sel, acc, scratch, S, saved)
                last = pattern[a]
            for e in range(n_packed):
                packed[e, j] = saved[e]
            keep[j] = 1.0 if signs[a] < 0.0 else 0.0
            block_group[j] = group[a]
            for t in range(k):
                Ab[t, j] = A[a, t]
                Yb[t, j] = XB[a, t] - l1
        _gram_block(Gb, inv_hess, packed, keep, bases, block_group, nb, l2)
        _cd_block(Ab, Gb, Yb, inv_hess, nb, l2, sweeps, tol)
        for j in range(nb):
            for t in range(k):
                A[rows[a0 + j], t] = Ab[t, j]
        if want:
            total += _block_model(A, rows[a0:a0 + nb], B, L, Ab, Gb, sel, units)
    return total


@_jit(fastmath=_FAST, inline="always")
def _gram_block(Gb, inv_hess, packed, keep, bases, block_group, nb, l2):
    """Gb[:, :, j] = G0 - S_j for a row given by its missing cells (keep[j] = 1), G0 being
    its base bases[block_group[j]], S_j for one given by its observed cells (keep[j] = 0),
    S_j's lower triangle being packed[:, j]; and the inverse curvatures 1 / (G[t, t] + l2).
    Loops run across the block's rows (SIMD)."""
    k = bases.shape[1]
    e = 0
    for t in range(k):
        for r in range(t + 1):
            P = packed[e]
            upper = Gb[r, t]
            lower = Gb[t, r]
            for j in range(nb):
                g = keep[j] * bases[block_group[j], t, r] + (1.0 - 2.0 * keep[j]) * P[j]
                lower[j] = g
                upper[j] = g
            e += 1
        for j in range(nb):
            hess = _floored_curvature(Gb[t, t, j], keep[j], bases[block_group[j], t, t]) + l2
            inv_hess[t, j] = 1.0 / hess if hess > 0.0 else 0.0  # 0: nothing to fit


@_jit(fastmath=_FAST, inline="always")
def _floored_curvature(g, keep, base):
    """A coordinate's curvature g = G[t, t] for the exact step, floored where G = G0 - S
    (``keep`` 1; base = G0[t, t]): G0 - S carries rounding noise of about eps G0, below this
    floor the curvature is not known, and a larger one only shortens the step (an exact step
    on noise could jump to a huge value on no evidence). A line's own sum S (``keep`` 0) has
    no such noise."""
    return max(g, keep * _CURVATURE_NOISE * base)


@_jit(fastmath=_FAST, inline="always")
def _cd_block(Ab, Gb, Yb, inv_hess, nb, l2, sweeps, tol):
    """Coordinate descent sweeps on the first nb columns of Ab (k x size), column j
    minimising 1/2 a'G_j a - Yb_j . a + l2/2 |a|^2 over a >= 0, G_j = Gb[:, :, j], with
    1 / (G_j[t, t] + l2) given (0 leaves a coordinate as it is): the dense kernel
    _hals_update with one Gram matrix per column. Sweeps stop when the columns' moves, each
    squared and divided by its own first sweep's, average below ``tol``^2: columns in
    different units count alike (a sum of moves would stop on the largest ones)."""
    k = Ab.shape[0]
    acc = np.empty(nb, dtype=np.float64)
    moved = np.empty(nb, dtype=np.float64)
    first = np.empty(nb, dtype=np.float64)
    for sweep in range(sweeps):
        moved[:] = 0.0
        for t in range(k):
            Gt = Gb[t]
            for j in range(nb):
                acc[j] = 0.0
            r = 0
            while r + 4 <= k:  # four terms per pass: a quarter of the accumulator traffic
                for j in range(nb):
                    acc[j] += ((Gt[r, j] * Ab[r, j] + Gt[r + 1, j] * Ab[r + 1, j])
                               + (Gt[r + 2, j] * Ab[r + 2, j] + Gt[r + 3, j] * Ab[r + 3, j]))
                r += 4
            while r < k:
                for j in range(nb):
                    acc[j] += Gt[r, j] * Ab[r, j]
                r += 1
            for j in range(nb):
                old = Ab[t, j]
                new = max(old - (acc[j] + l2 * old - Yb[t, j]) * inv_hess[t, j], 0.0)
                Ab[t, j] = new
                moved[j] += (new - old) * (new - old)
        if _lines_settled(sweep, moved, first, nb, tol):
            break


@_jit(fastmath=_FAST, inline="always")
def _block_model(A, block_rows, B, L, Ab, Gb, sel, units):
    """Sum over a block's observed cells of (b . a)^2: a'G_a a, or for a row given by its
    observed cells the sum over them, which stays accurate when a grows along directions
    those cells do not see (an underdetermined row), where a'G_a a would cancel; a'G_a a
    for every row where the cells are ``units`` (G_a is then their sum, exactly)."""
    k = A.shape[1]
    signs = L.sign
    nb = block_rows.shape[0]
    total = 0.0
    complement = np.empty(nb, dtype=np.float64)
    for j in range(nb):
        a = block_rows[j]
        complement[j] = 1.0 if signs[a] < 0.0 or units else 0.0
        if complement[j] == 0.0:
            cells, _ = _line_cells(a, L, sel)
            total += _row_cells_sq(A, a, B, cells, np.int64(0), cells.shape[0])
    for t in range(k):
        for r in range(k):
            Gt = Gb[t, r]
            for j in range(nb):
                total += complement[j] * Ab[t, j] * Gt[j] * Ab[r, j]
    return total


@_jit(fastmath=_FAST)
def _pattern_cd_rows(A, B, bases, L, XB, rows, starts, l1, l2, sweeps, tol, pairs, scratch,
                     want):
    """Exact coordinate descent, as _masked_cd_rows, on lines that share a pattern: the
    lines rows[starts[s]:starts[s + 1]] have the same cells, group and sign, so one Gram
    matrix, formed once from the first line's cells, and they are swept together by the
    dense kernel's loops (_hals_lines), at its speed. Curvatures are floored and sweeps stop
    line by line, as one by one (a stop on the lines' total move took more iterations).
    Returns the sum over their observed cells of (b . a)^2 = a'G a after the update if
    ``want`` (lines given by their observed cells come here only by units, where a'G a is
    exact)."""
    signs, group = L.sign, L.group
    k = A.shape[1]
    n_packed = k * (k + 1) // 2
    S = np.empty((k + 4, k + 4), dtype=np.float64)
    acc = np.empty(_acc_width(pairs, n_packed), dtype=np.float64)
    sel = np.empty(B.shape[0], dtype=np.int64)
    sums = np.empty(n_packed, dtype=np.float64)
    G = np.empty((k, k), dtype=np.float64)
    curvature = np.empty(k, dtype=np.float64)
    longest = 0
    for s in range(len(starts) - 1):
        longest = max(longest, starts[s + 1] - starts[s])
    A_buf = np.empty(k * longest, dtype=np.float64)  # a group's lines, k x lines, C order
    Y_buf = np.empty(k * longest, dtype=np.float64)
    total = 0.0
    for s in range(len(starts) - 1):
        lines = rows[starts[s]:starts[s + 1]]
        a = lines[0]
        base = bases[group[a]]
        keep = 1.0 if signs[a] < 0.0 else 0.0
        _line_sums(a, L, B, pairs, sel, acc, scratch, S, sums)
        e = 0
        for t in range(k):
            for r in range(t + 1):
                G[t, r] = keep * base[t, r] + (1.0 - 2.0 * keep) * sums[e]
                e += 1
        for t in range(k):
            for r in range(t):
                G[r, t] = G[t, r]
            curvature[t] = _floored_curvature(G[t, t], keep, base[t, t])
        At = A_buf[:k * len(lines)].reshape((k, len(lines)))
        Yt = Y_buf[:k * len(lines)].reshape((k, len(lines)))
        for j in range(len(lines)):
            for t in range(k):
                At[t, j] = A[lines[j], t]
                Yt[t, j] = XB[lines[j], t]
        _hals_lines(At, G, curvature, Yt, l1, l2, sweeps, tol)
        for j in range(len(lines)):
            for t in range(k):
                A[lines[j], t] = At[t, j]
        if want:  # sum over the lines of a'G a, from the lines' products At At'
            for t in range(k):
                for r in range(t + 1):
                    x, y = At[t], At[r]
                    dot = 0.0
                    for j in range(len(lines)):
                        dot += x[j] * y[j]
                    total += (1.0 if r == t else 2.0) * G[t, r] * dot
    return total


@_jit(fastmath=_FAST)
def _hals_lines(A, G, curvature, B, l1, l2, max_sweeps, tol):
    """_hals_update with the coordinates' curvatures given (``curvature[t] + l2``; a
    coordinate whose curvature is not positive stays: G[t, t] floored where G carries
    rounding noise, `_pattern_cd_rows`), stopping line by line as _cd_block does: when the
    columns' moves, each relative to its own first sweep's, average below ``tol``^2. (The
    dense kernel stops on the total move, which leaves the columns that move little
    under-solved.)"""
    k, p = A.shape
    acc = np.empty(p, dtype=np.float64)
    moved = np.empty(p, dtype=np.float64)
    first = np.empty(p, dtype=np.float64)
    for sweep in range(max_sweeps):
        for j in range(p):
            moved[j] = 0.0
        for t in range(k):
            hess = curvature[t] + l2
            if hess <= 0.0:
                continue
            _gram_row_times(G, A, t, acc)
            for j in range(p):
                old = A[t, j]
                new = max(old - (acc[j] + l2 * old + l1 - B[t, j]) / hess, 0.0)
                A[t, j] = new
                moved[j] += (new - old) * (new - old)
        if _lines_settled(sweep, moved, first, p, tol):
            return sweep + 1
    return max_sweeps


@_jit(fastmath=_FAST, inline="always")
def _lines_settled(sweep, moved, first, p, tol):
    """Whether the p lines' moves in this sweep, each relative to its own first sweep's,
    average below ``tol``^2 (lines in different units count alike: a sum of moves would stop
    on the largest ones). The first sweep's moves are kept in ``first``."""
    if sweep == 0:
        for j in range(p):
            first[j] = moved[j]
        return False
    ratio = 0.0
    for j in range(p):
        if first[j] > 0.0:
            ratio += moved[j] / first[j]
    return ratio <= tol * tol * p


@_jit(fastmath=_FAST)
def _mm_targets(A, B, XB, L, rows, At, Yt):
    """For the j-th listed row a: At[:, j] = a and Yt[:, j] = XB_a + sum over the row's cells
    (its missing cells, `_line_cells`; majorized rows have no kept cells) of (b . a) b, the
    linear term of the majorizer with the row's base as Gram matrix (see _MaskedSolver).
    Four cells per pass over the row."""
    k = A.shape[1]
    acc = np.empty(k, dtype=np.float64)
    sel = np.empty(B.shape[0], dtype=np.int64)
    for j in range(rows.shape[0]):
        a = rows[j]
        for t in range(k):
            acc[t] = XB[a, t]
        cells, end = _line_cells(a, L, sel)
        q = 0
        while q + 4 <= end:
            c0, c1, c2, c3 = cells[q], cells[q + 1], cells[q + 2], cells[q + 3]
            s0, s1, s2, s3 = _predict_four(A, a, B, c0, c1, c2, c3)
            for t in range(k):
                acc[t] += (s0 * B[c0, t] + s1 * B[c1, t]) + (s2 * B[c2, t] + s3 * B[c3, t])
            q += 4
        while q < end:
            c0 = cells[q]
            s0 = 0.0
            for t in range(k):
                s0 += float(A[a, t]) * B[c0, t]
            for t in range(k):
                acc[t] += s0 * B[c0, t]
            q += 1
        for t in range(k):
            At[t, j] = A[a, t]
            Yt[t, j] = acc[t]


@_jit(fastmath=_FAST)
def _masked_mu_rows(A, B, bases, L, XB, l1, l2, scratch, u, want):
    """Lee-Seung Frobenius update of each row a of A over its observed cells:
    A_a *= XB_a / (G a + l1 + l2 A_a), with the row's Gram matrix G given implicitly as in
    _masked_cd_rows. Returns the sum over observed cells of (b . a)^2 after the update if
    ``want``."""
    signs, group = L.sign, L.group
    p, k = A.shape
    den = np.empty(k, dtype=np.float64)
    sel = np.empty(B.shape[0], dtype=np.int64)
    total = 0.0
    for a in range(p):
        cells, c1 = _line_cells(a, L, sel)
        sign = signs[a]
        G0 = bases[group[a]]
        for t in range(k):
            acc = 0.0
            if sign < 0.0:
                for r in range(k):
                    acc += G0[t, r] * A[a, r]
            den[t] = acc
        _add_cross(A, a, B, cells[:c1], sign, scratch, u, den)
        if cells.shape[0] > c1:
            _add_cross(A, a, B, cells[c1:], 1.0, scratch, u, den)
        for t in range(k):
            d = den[t] + l1 + l2 * A[a, t]
            if d > 0.0:
                A[a, t] = A[a, t] * (XB[a, t] / d)
        if want:
            if sign < 0.0:
                for t in range(k):
                    for r in range(k):
                        total += A[a, t] * G0[t, r] * A[a, r]
            total += sign * _row_cells_sq(A, a, B, cells, np.int64(0), c1)
            total += _row_cells_sq(A, a, B, cells, c1, cells.shape[0])
    return total


@_jit(fastmath=_FAST, kernels_only=True)
def _add_cross(A, a, B, cells, w, scratch, u, den):
    """den += w * sum over the cells of (b . a) b, for row a of A."""
    c = cells.shape[0]
    _gather_cells(B, cells, scratch[:B.shape[1] * c].reshape((B.shape[1], c)))
    _predict_cells(A, a, scratch, c, u)
    for t in range(A.shape[1]):
        cross = 0.0
        for q in range(c):
            cross += scratch[t * c + q] * u[q]
        den[t] += w * cross


@_jit(fastmath=_FAST)
def _masked_model(A, B, bases, L, rows):
    """Sum over the listed rows' observed (training) cells of (A B')^2, each row through its
    own cell set (`_line_cells`, as in _masked_cd_rows): a' G a less the sum over its missing
    cells, G = bases[group[a]], or the sum over its observed cells; plus its kept cells."""
    k = A.shape[1]
    signs, group = L.sign, L.group
    sel = np.empty(B.shape[0], dtype=np.int64)
    total = 0.0
    for a in rows:
        cells, c1 = _line_cells(a, L, sel)
        if signs[a] < 0.0:
            G0 = bases[group[a]]
            for t in range(k):
                at = A[a, t]
                for r in range(k):
                    total += at * G0[t, r] * A[a, r]
        total += signs[a] * _row_cells_sq(A, a, B, cells, np.int64(0), c1)
        total += _row_cells_sq(A, a, B, cells, c1, cells.shape[0])
    return total


@_jit(kernels_only=True)
def _line_cells(a, L, sel):
    """Line a's cells, from the lines L (`_LineArrays`): first its listed cells but those in
    its held-out block (cell_group[j] == group[a]: its base has taken them out already), then
    its kept cells. Returns (the cells, how many of them are listed): where the lines have no
    fold rule, the listed cells where L lists them; else copied into ``sel``, which has room
    for all the line's listed and kept cells (each is written, then kept or written over)."""
    ptr, idx, cell_group, kptr, kidx = L.ptr, L.idx, L.cell_group, L.kptr, L.kidx
    if not L.fold_rule:
        return idx[ptr[a]:ptr[a + 1]], ptr[a + 1] - ptr[a]
    g = L.group[a]
    c = 0
    for q in range(ptr[a], ptr[a + 1]):  # no branch: cells are dropped at random in folds
        j = idx[q]
        sel[c] = j
        c += cell_group[j] != g
    c2 = 0
    for q in range(kptr[a], kptr[a + 1]):
        sel[c + c2] = kidx[q]
        c2 += 1
    return sel[:c + c2], c


@_jit(fastmath=_FAST, kernels_only=True)
def _line_sums(a, L, B, pairs, sel, acc, scratch, S, out):
    """out[:k(k+1)/2] = line a's packed sums (`_cells_packed`) over its listed cells, plus
    its sign times their sum over its kept cells: kept cells count as observed, so that the
    line's Gram matrix is G0 - out (G0 - (S - K)) where it is given by its missing cells and
    out (S + K) where by its observed ones."""
    n_packed = B.shape[1] * (B.shape[1] + 1) // 2
    cells, c1 = _line_cells(a, L, sel)
    _cells_packed(B, pairs, cells[:c1], acc, scratch, S)
    for e in range(n_packed):
        out[e] = acc[e]
    if cells.shape[0] > c1:
        _cells_packed(B, pairs, cells[c1:], acc, scratch, S)
        for e in range(n_packed):
            out[e] += L.sign[a] * acc[e]


def _cells_packed(B, pairs, cells, acc, scratch, S):
    """acc[:k(k+1)/2] = the lower triangle, row by row, of the sum over the cells of b b':
    from the table ``pairs`` (`_use_pairs`) or, where it is None, from the gathered cells.
    Kernels only: numba picks the way by the type of ``pairs`` as it compiles the calling
    kernel (`_cells_packed_typed`), so a fit compiles only the way it takes."""
    raise TypeError("_cells_packed runs inside numba kernels only")


@overload(_cells_packed)
def _cells_packed_typed(B, pairs, cells, acc, scratch, S):
    if isinstance(pairs, numba_types.NoneType):
        return lambda B, pairs, cells, acc, scratch, S: _packed_from_cells(B, cells, acc,
                                                                            scratch, S)
    return lambda B, pairs, cells, acc, scratch, S: _sum_pairs(pairs, cells, acc)


@_jit(fastmath=_FAST, kernels_only=True)
def _packed_from_cells(B, cells, acc, scratch, S):
    """`_cells_packed` with no table: B's rows gathered (`_gather_cells`), then multiplied
    (`_cells_gram`)."""
    k = B.shape[1]
    c = cells.shape[0]
    gathered = scratch[:(k + 4) * c].reshape((k + 4, c))
    _gather_cells(B, cells, gathered)
    _cells_gram(gathered, k, S)
    e = 0
    for t in range(k):
        for r in range(t + 1):
            acc[e] = S[t, r]
            e += 1


@_jit(inline="always")
def _acc_width(pairs, n_packed):
    """Length of the accumulator `_cells_packed` fills: a row of ``pairs``, or n_packed."""
    if pairs is None:
        return n_packed
    return max(pairs.shape[1], n_packed)


@_jit(fastmath=_FAST, kernels_only=True)
def _sum_pairs(pairs, cell_idx, acc):
    """acc = sum of pairs[b] over the cells b (a packed lower triangle), eight cells per pass
    (fewer passes over the accumulator than four per pass)."""
    width = pairs.shape[1]
    acc[:] = 0.0
    c = cell_idx.shape[0]
    q = 0
    while q + 8 <= c:
        b0, b1, b2, b3 = cell_idx[q], cell_idx[q + 1], cell_idx[q + 2], cell_idx[q + 3]
        b4, b5, b6, b7 = cell_idx[q + 4], cell_idx[q + 5], cell_idx[q + 6], cell_idx[q + 7]
        for e in range(width):
            acc[e] += (((pairs[b0, e] + pairs[b1, e]) + (pairs[b2, e] + pairs[b3, e]))
                       + ((pairs[b4, e] + pairs[b5, e]) + (pairs[b6, e] + pairs[b7, e])))
        q += 8
    while q < c:
        b0 = cell_idx[q]
        for e in range(width):
            acc[e] += pairs[b0, e]
        q += 1


@_jit(fastmath=_FAST, kernels_only=True)
def _cells_gram(cells, k, S):
    """Lower triangle of S = sum over cells q of b_q b_q', cells[:, q] = b_q with zero rows
    from k on. Entries come in 2 x 4 tiles, so one pass over the cells loads six rows for
    eight products."""
    c = cells.shape[1]
    for t in range(0, k, 2):
        x0 = cells[t]
        x1 = cells[t + 1]
        for r in range(0, t + 2, 4):
            y0 = cells[r]
            y1 = cells[r + 1]
            y2 = cells[r + 2]
            y3 = cells[r + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
            for q in range(c):
                u0 = x0[q]
                u1 = x1[q]
                s00 += u0 * y0[q]
                s01 += u0 * y1[q]
                s02 += u0 * y2[q]
                s03 += u0 * y3[q]
                s10 += u1 * y0[q]
                s11 += u1 * y1[q]
                s12 += u1 * y2[q]
                s13 += u1 * y3[q]
            S[t, r], S[t, r + 1], S[t, r + 2], S[t, r + 3] = s00, s01, s02, s03
            S[t + 1, r], S[t + 1, r + 1], S[t + 1, r + 2], S[t + 1, r + 3] = s10, s11, s12, s13


@_jit(inline="always")
def _gather_cells(B, cell_idx, cells):
    """cells[t, q] = B[cell_idx[q], t] for t < k; rows k.. of ``cells`` are zeroed. Four
    cells at a time, so each store fills four adjacent entries of a row of ``cells`` (faster
    than one cell at a time)."""
    k = B.shape[1]
    c = cell_idx.shape[0]
    q = 0
    while q + 4 <= c:
        b0, b1, b2, b3 = cell_idx[q], cell_idx[q + 1], cell_idx[q + 2], cell_idx[q + 3]
        for t in range(k):
            cells[t, q] = B[b0, t]
            cells[t, q + 1] = B[b1, t]
            cells[t, q + 2] = B[b2, t]
            cells[t, q + 3] = B[b3, t]
        q += 4
    while q < c:
        b0 = cell_idx[q]
        for t in range(k):
            cells[t, q] = B[b0, t]
        q += 1
    cells[k:] = 0.0


@_jit(fastmath=_FAST)
def _unit_pairs(B, units, n_units):
    """_pair_products summed over each unit's rows: row u is the packed lower triangle of
    the sum of b b' over the rows b of B with units[b] == u. Each triangle row is one
    contiguous loop (it vectorizes, unlike counting entries)."""
    n, k = B.shape
    pairs = _line_aligned_zeros(n_units, _pairs_width(k))
    for b in range(n):
        row = pairs[units[b]]
        e = 0
        for t in range(k):
            bt = float(B[b, t])
            for r in range(t + 1):
                row[e + r] += bt * B[b, r]
            e += t + 1
    return pairs


@_jit()
def _pair_products(B):
    """pairs[b] = the lower triangle of B[b] B[b]', row by row, then zeros up to
    _pairs_width entries, in a table on cache lines (`_line_aligned_zeros`)."""
    n, k = B.shape
    pairs = _line_aligned_zeros(n, _pairs_width(k))
    for b in range(n):
        e = 0
        for t in range(k):
            for r in range(t + 1):
                pairs[b, e] = B[b, t] * B[b, r]
                e += 1
    return pairs


@_jit()
def _outside_sums(ptr, idx, sign, group, cell_group, V):
    """out[a] = the sum of V[j] over line a's listed cells outside its held-out block (see
    _line_cells), negated for a line listed by its observed cells."""
    out = np.zeros((len(ptr) - 1, V.shape[1]), dtype=np.float64)
    for a in range(len(ptr) - 1):
        w = -1.0 if sign[a] > 0.0 else 1.0
        for q in range(ptr[a], ptr[a + 1]):
            j = idx[q]
            if cell_group[j] != group[a]:
                for t in range(V.shape[1]):
                    out[a, t] += w * V[j, t]
    return out


@_jit(fastmath=_FAST, kernels_only=True)
def _predict_four(A, a, B, c0, c1, c2, c3):
    """A[a] . B[c] for four rows c of B, in one pass over the components."""
    s0 = s1 = s2 = s3 = 0.0
    for t in range(A.shape[1]):
        at = float(A[a, t])  # float32 factors: products in float64
        s0 += at * B[c0, t]
        s1 += at * B[c1, t]
        s2 += at * B[c2, t]
        s3 += at * B[c3, t]
    return s0, s1, s2, s3


@_jit(fastmath=_FAST, kernels_only=True)
def _row_cells_sq(A, a, B, idx, start, end):
    """Sum over cells q in [start, end) of (A[a] . B[idx[q]])^2, four cells per pass."""
    k = A.shape[1]
    total = 0.0
    q = start
    while q + 4 <= end:
        c0, c1, c2, c3 = idx[q], idx[q + 1], idx[q + 2], idx[q + 3]
        s0, s1, s2, s3 = _predict_four(A, a, B, c0, c1, c2, c3)
        total += (s0 * s0 + s1 * s1) + (s2 * s2 + s3 * s3)
        q += 4
    while q < end:
        s0 = 0.0
        for t in range(k):
            s0 += float(A[a, t]) * B[idx[q], t]
        total += s0 * s0
        q += 1
    return total


@_jit(inline="always")
def _gather_rows(B, idx, s, c, scratch):
    """scratch[t * c + q] = B[idx[s + q], t]: the B rows of one row's cells, component-major."""
    _gather_cells(B, idx[s:s + c], scratch[:B.shape[1] * c].reshape((B.shape[1], c)))


@_jit(fastmath=_FAST, inline="always")
def _predict_cells(A, a, scratch, c, u):
    """u[q] = A[a] . b_q for the gathered cells of one row."""
    for q in range(c):
        u[q] = 0.0
    for t in range(A.shape[1]):
        at = np.float64(A[a, t])  # float64 products whatever the dtypes
        if at != 0.0:
            b = scratch[t * c:(t + 1) * c]  # a slice, not t * c + q: the loop vectorizes
            for q in range(c):
                u[q] += at * b[q]


@_jit()
def _cells_rss(A, B, indptr, idx, x, rss, wh2):
    """(``rss`` plus the sum over the cells of (x - A B')^2, ``wh2`` plus the sum of
    (A B')^2), row by row (so that blocks of rows passed in turn add up exactly as one
    pass). One kernel for both sums: one compile."""
    p, k = A.shape
    for a in range(p):
        for q in range(indptr[a], indptr[a + 1]):
            b = idx[q]
            wh = 0.0
            for t in range(k):
                wh += A[a, t] * B[b, t]
            rss += (x[q] - wh) ** 2
        wh2 += _row_cells_sq(A, a, B, idx, indptr[a], indptr[a + 1])
    return rss, wh2


# =============================================================================================
# Fitting: KL on listed cells, and KL coordinate descent
# =============================================================================================

class _CellsKLSolver(_TransposedH):
    """KL multiplicative updates streaming over the observed cells (missing values), or over
    the stored entries of a sparse X (whose zeros then count in the denominators only).
    Holds W (m x k) and H transposed (n x k) so a cell's two factor rows are contiguous."""

    def __init__(self, data, W, H, penalty, update_H):
        self.pen, self.update_H = penalty, update_H
        if data.masked:
            rows, cols, x = data.rows, data.cols, data.values
        else:
            csr = data.sparse
            rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
            cols, x = csr.indices.astype(np.int64), csr.data
        self.all_cells = not data.masked
        self.r_ptr, self.r_idx, self.c_ptr, self.c_idx, order = _cells(rows, cols, data.shape)
        self.r_x, self.c_x = x, np.ascontiguousarray(x[order])
        self.W, self.Ht = W, np.ascontiguousarray(H.T)
        self.eps = _kl_floor(x.dtype)
        self.no_den = np.zeros(0, dtype=x.dtype)
        longest = max(np.diff(self.r_ptr).max(initial=0), np.diff(self.c_ptr).max(initial=0), 1)
        self.scratch = np.empty(longest * W.shape[1], dtype=np.float64)
        self.u = np.empty(longest, dtype=np.float64)
        s, wh = _masked_kl_loss(self.W, self.Ht, self.r_ptr, self.r_idx, self.r_x, self.eps)
        self.objective = self._total(s, wh)

    def _total(self, s, wh):
        if self.all_cells:
            wh = float(self.W.sum(axis=0, dtype=np.float64) @ self.Ht.sum(axis=0, dtype=np.float64))
        return s + wh + self.pen.value(self.W, self.Ht)

    def step(self, want_loss=True):
        p = self.pen
        if self.update_H:
            den = self.W.sum(axis=0) if self.all_cells else self.no_den
            _masked_kl_rows(self.Ht, self.W, self.c_ptr, self.c_idx, self.c_x, den,
                            p.l1_H, p.l2_H, self.eps, False, self.scratch, self.u)
        den = self.Ht.sum(axis=0) if self.all_cells else self.no_den
        s, wh = _masked_kl_rows(self.W, self.Ht, self.r_ptr, self.r_idx, self.r_x, den,
                                p.l1_W, p.l2_W, self.eps, want_loss, self.scratch, self.u)
        self.objective = self._total(s, wh) if want_loss else math.nan
        return self.objective


@_jit(fastmath=_FAST)
def _masked_kl_rows(A, B, indptr, idx, x, den_all, l1, l2, eps, want_loss, scratch, u):
    """Lee-Seung KL update of each row of A over its cells:
    A_at *= sum (x / (AB')_ab) B_bt / (sum B_bt + l1 + l2 A_at). The denominator sums over the
    row's cells, or is ``den_all`` when that is non-empty (sparse X: zeros are observed).
    Returns (sum x log(x/wh) - x, sum wh) over the cells after the update if asked.
    A row's B rows are gathered first so that the loops over its cells vectorize."""
    p, k = A.shape
    num = np.empty(k, dtype=np.float64)
    den = np.empty(k, dtype=np.float64)
    s_log = 0.0
    s_wh = 0.0
    fixed = den_all.shape[0] > 0
    for a in range(p):
        s = indptr[a]
        c = indptr[a + 1] - s
        _gather_rows(B, idx, s, c, scratch)
        _predict_cells(A, a, scratch, c, u)
        for q in range(c):
            u[q] = x[s + q] / max(u[q], eps)
        for t in range(k):
            base = t * c
            nt = 0.0
            dt = 0.0
            for q in range(c):
                nt += u[q] * scratch[base + q]
                dt += scratch[base + q]
            num[t] = nt
            den[t] = den_all[t] if fixed else dt
        for t in range(k):
            A[a, t] = _kl_majorizer_min(A[a, t], num[t], den[t] + l1, l2)
        if want_loss:
            _predict_cells(A, a, scratch, c, u)
            for q in range(c):
                wh = max(u[q], eps)
                xq = x[s + q]
                s_wh += wh
                s_log -= xq
                if xq > 0.0:
                    s_log += xq * math.log(xq / wh)
    return s_log, s_wh


@_jit()
def _masked_kl_loss(A, B, indptr, idx, x, eps):
    """(sum x log(x/wh) - x, sum wh) over the cells."""
    p, k = A.shape
    s_log = 0.0
    s_wh = 0.0
    for a in range(p):
        for q in range(indptr[a], indptr[a + 1]):
            b = idx[q]
            wh = 0.0
            for t in range(k):
                wh += A[a, t] * B[b, t]
            if wh < eps:
                wh = eps
            s_wh += wh
            s_log -= x[q]
            if x[q] > 0.0:
                s_log += x[q] * math.log(x[q] / wh)
    return s_log, s_wh


class _KLCDSolver(_TransposedH):
    """KL coordinate descent (Hsieh & Dhillon 2011): H's rows, then W's, each updated by
    Newton steps on one coordinate at a time over its line's positive cells (`_kl_cd_rows`).
    Every step is one that cannot raise the objective (extrapolated fits aside, which undo
    steps that raise it: `_Extrapolation`). Reads X through two `_KLLines` (its
    rows, and its columns by way of a transposed copy), so dense, sparse, masked and fold-rule
    training data share the kernel. Holds W (m x k) and H transposed (n x k)."""

    accel = None  # an _Extrapolation (fits with extrapolate=True)

    def __init__(self, rows, cols, W, H, penalty, update_H, sweeps=None):
        self.rows, self.cols, self.pen, self.update_H = rows, cols, penalty, update_H
        self.W, self.Ht = W, np.ascontiguousarray(H.T)
        self.eps = _kl_floor(W.dtype)
        # Transform (H fixed) solves W's rows to convergence; a fit alternates cheap passes.
        self.sweeps = sweeps if sweeps is not None else (_KL_SWEEPS if update_H else 100)
        self.tol = _KL_SWEEP_TOL if update_H else 1e-3
        self.objective = self._rows(0, True)

    def _rows(self, sweeps, want_loss):
        p = self.pen
        s = _kl_cd_rows(self.W, self.Ht, *self.rows.args(self.Ht), p.l1_W, p.l2_W, p.shape_W,
                        sweeps, self.tol, self.eps, want_loss)
        return s + p.value(self.W, self.Ht) if want_loss else math.nan

    def _balance(self):
        d = _gamma_balancing_scales(self.W.sum(axis=0, dtype=np.float64),
                                    self.Ht.sum(axis=0, dtype=np.float64), self.W.shape[0],
                                    self.Ht.shape[0], self.pen)
        if d is not None:
            self.W *= d.astype(self.W.dtype)
            self.Ht /= d.astype(self.Ht.dtype)
            if self.accel is not None:
                self.accel.rescale(d)

    def step(self, want_loss=True):
        p, x = self.pen, self.accel
        if self.update_H:
            if x is not None:
                self.W = x.start(self.W)
            self._balance()
            _kl_cd_rows(self.Ht, self.W, *self.cols.args(self.W), p.l1_H, p.l2_H, p.shape_H,
                        self.sweeps, self.tol, self.eps, False)
            if x is not None:
                self.Ht = x.middle(self.Ht)
        self.objective = self._rows(self.sweeps, want_loss or x is not None)
        if x is not None and self.update_H:
            self.Ht = x.end(self.objective, self.Ht)
        return self.objective


# Newton sweeps over a line's coordinates per factor update, at most, stopping once a sweep
# moves the line less than _KL_SWEEP_TOL times the first. Gathering a line's cells costs a
# random read per cell, which extra sweeps share: on sparse counts 8 sweeps need far fewer
# iterations, and less time, than 2.
_KL_SWEEPS = 8


_KL_SWEEP_TOL = 0.5


@dataclass
class _KLLines:
    """The lines (rows of X, or its columns) as `_kl_cd_rows` reads them: ``cells`` are
    `_rule_cells`' arguments, ``groups`` the other side's lines that each line's rule leaves
    out, by group (the linear term of line i is the other factor's sum less its group
    ``P[i]``'s), None when nothing is left out, or "listed" when the cells are listed
    explicitly (data with missing cells) and the kernel sums the linear term over them.
    A `_MissingFoldTraining` adds ``missing``, its `_MaskedLines` (each line's missing or
    observed cells, whose part the linear terms correct), and its kept cells: ``kept`` as
    CSR (ptr, idx, values), which the kernel adds to the rule's cells, and ``kept_ones``, the
    same cells with value 1 (a sparse matrix), for their part of the linear terms."""

    cells: "_RuleArrays"
    groups: object = None
    missing: _MaskedLines = None
    kept: tuple = None
    kept_ones: object = None

    def args(self, B):
        """`_kl_cd_rows`' arguments after A and B, up to the penalties: (`_RuleArrays`,
        `_KLLinear`, `_KeptCells`)."""
        k = B.shape[1]
        none = np.zeros((0, k))
        kept = _KeptCells(*(self.kept or (np.zeros(0, np.int64), np.zeros(0, np.int64),
                                          np.zeros(0))))
        if isinstance(self.groups, str):
            return self.cells, _KLLinear(np.zeros(0), none, none), kept
        B = B.astype(np.float64, copy=False)
        total = B.sum(axis=0)
        if self.groups is None:
            return self.cells, _KLLinear(total, np.zeros((1, k)), none), kept
        by_group = np.array([B[g].sum(axis=0) for g in self.groups]).reshape(-1, k)
        if self.missing is None:
            return self.cells, _KLLinear(total, by_group, none), kept
        return self.cells, _KLLinear(total, by_group, self._per_line(B, total, by_group)), kept

    def _per_line(self, B, total, by_group):
        """Each line's linear term: the sum of B's rows over its observed cells outside its
        held-out block, then over its kept cells."""
        L = self.missing
        # negated for lines listing observed cells
        outside = _outside_sums(L.ptr, L.idx, L.sign, L.group, L.cell_group, B)
        listed_missing = (L.sign < 0)[:, None]
        lin = np.where(listed_missing, total[None] - by_group[L.group], 0.0) - outside
        return lin + self.kept_ones @ B


def _kl_lines(data):
    """(rows, columns) of a `_Data` as `_KLLines`: a fully observed X as a rule holding
    nothing out, cells of data with missing values listed."""
    m, n = data.shape
    if data.masked:
        r_ptr, r_idx, c_ptr, c_idx, order = _cells(data.rows, data.cols, data.shape)
        by_row = sp.csr_matrix((data.values, r_idx, r_ptr), shape=(m, n))
        by_col = sp.csr_matrix((data.values[order], c_idx, c_ptr), shape=(n, m))
        return _KLLines(_all_cells(by_row), "listed"), _KLLines(_all_cells(by_col), "listed")
    if data.sparse is not None:
        return _KLLines(_all_cells(data.sparse)), _KLLines(_all_cells(data.sparse.T.tocsr()))
    return (_KLLines(_all_cells(data.dense)),
            _KLLines(_all_cells(np.ascontiguousarray(data.dense.T))))


class _RuleArrays(NamedTuple):
    """X read through a fold rule, as the kernels take it: X dense (or empty, 0 x 0), or its
    sparse rows, row i being the entries ``starts[i]:ends[i]`` of ``idx`` and ``vals`` (a
    CSR matrix's indptr[:-1] and indptr[1:], or another matrix's rows picked by index: see
    `_RowResample`), each row's held-out column class ``P``, each column's class ``b``, and
    the columns ordered by class (``col_ptr``, ``col_order``)."""

    X: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    idx: np.ndarray
    vals: np.ndarray
    P: np.ndarray
    b: np.ndarray
    col_ptr: np.ndarray
    col_order: np.ndarray


class _KLLinear(NamedTuple):
    """`_kl_cd_rows`' linear terms: per line ``rows[i]`` when given, else ``total -
    groups[P[i]]``; an empty ``total`` says to sum them over each line's listed cells."""

    total: np.ndarray
    groups: np.ndarray
    rows: np.ndarray


class _KeptCells(NamedTuple):
    """Cells added to each line's rule cells, CSR (``ptr``, ``idx``, ``values``)."""

    ptr: np.ndarray
    idx: np.ndarray
    values: np.ndarray


def _rule_view(X, P, b, col_ptr, col_order):
    """`_RuleArrays` of X (dense, or CSR) under the rule (P, b): a dense X, or an empty one
    and the CSR arrays."""
    if sp.issparse(X):
        return _RuleArrays(np.zeros((0, 0), dtype=X.dtype), X.indptr[:-1], X.indptr[1:],
                           X.indices, X.data, P, b, col_ptr, col_order)
    empty = np.zeros(0, dtype=np.int32)
    return _RuleArrays(X, empty, empty, empty, np.zeros(0, dtype=X.dtype), P, b, col_ptr,
                       col_order)


def _all_cells(X):
    """`_rule_view` of every cell of X (dense or CSR), a rule that holds nothing out."""
    p, q = X.shape
    none = np.zeros(0, dtype=np.int64)
    return _rule_view(X, np.zeros(p, dtype=np.int64), np.ones(q, dtype=np.int64), none, none)


# KL coordinate descent (Hsieh & Dhillon 2011): one row of A at a time, a Newton step per
# coordinate on the row's one-variable Poisson objective, with the row's predictions kept
# up to date over its positive cells (zeros enter only through the linear term). These
# kernels use numpy's error model: numba's default checks every division for a zero divisor
# (Python's ZeroDivisionError), which keeps its loops from vectorizing; every divisor here is
# guarded (floored at eps, or tested > 0) instead.
@_jit(fastmath=_FAST, error_model="numpy")
def _kl_cd_rows(A, B, R, linear, kept, l1, l2, shape, sweeps, tol, eps, want_loss):
    """Coordinate descent on each row of A (p x k) for the KL objective over its cells, read
    through the fold rule (R: `_RuleArrays`; `_rule_cells`, training cells) and followed by
    its kept cells (`_KeptCells`, empty for none; zero-valued cells, missing ones among them,
    enter the linear term alone). Row i's linear term (the sum of B's rows over its cells) is
    `_KLLinear`'s ``rows[i]`` when given, else ``total - groups[P[i]]``, or is summed over
    the row's cells when ``total`` is empty (cells listed explicitly, zeros among them).
    Returns the objective's data part over the cells after the update when asked (sweeps=0:
    no update)."""
    q_max = R.b.shape[0]
    lin_all, lin_groups, lin_rows = linear.total, linear.groups, linear.rows
    kptr, kidx, kval = kept.ptr, kept.idx, kept.values
    P = R.P
    k = A.shape[1]
    js = np.empty(q_max, dtype=np.int64)
    xs = np.empty(q_max, dtype=np.float64)
    scratch = np.empty(q_max * k, dtype=B.dtype)  # B's values exactly, in half the cache (float32)
    v = np.empty(q_max, dtype=np.float64)
    lin = np.empty(k, dtype=np.float64)
    listed = lin_all.shape[0] == 0
    total = 0.0
    for i in range(A.shape[0]):
        count = _rule_cells(i, np.int64(1), R, js, xs)
        if kptr.shape[0] > 0:
            for q in range(kptr[i], kptr[i + 1]):
                js[count] = kidx[q]
                xs[count] = kval[q]
                count += 1
        if listed:
            for t in range(k):
                lin[t] = 0.0
            for q in range(count):
                for t in range(k):
                    lin[t] += B[js[q], t]
        elif lin_rows.shape[0] > 0:
            for t in range(k):
                lin[t] = lin_rows[i, t]
        else:
            for t in range(k):
                lin[t] = lin_all[t] - lin_groups[P[i], t]
        c = np.int64(0)
        for q in range(count):  # positive cells only: a zero adds to the linear term alone
            x = xs[q]
            js[c] = js[q]
            xs[c] = x
            c += x > 0.0  # no branch: zeros of dense counts fall anywhere
        _gather_rows(B, js, np.int64(0), c, scratch)
        _predict_cells(A, i, scratch, c, v)
        _kl_newton_sweeps(A, i, scratch, xs, v, c, lin, l1, l2, shape, sweeps, tol, eps)
        if want_loss:
            for q in range(c):
                total += xs[q] * (math.log(xs[q] / max(v[q], eps)) - 1.0)
            for t in range(k):
                total += A[i, t] * lin[t]
    return total


@_jit(fastmath=_FAST, error_model="numpy", inline="always")
def _kl_newton_sweeps(A, i, scratch, xs, v, c, lin, l1, l2, shape, sweeps, tol, eps):
    """Sweeps over row i's coordinates. For coordinate t, with b_q the gathered B[:, t] and
    v_q the row's predictions, f(s) = (lin_t + l1) s + l2/2 s^2 - sum x_q log(v_q + (s - a) b_q)
    - shape log s is convex (``shape``: a Gamma prior's shape less 1, a cell of count
    ``shape`` with b = 1 and v = a). Its Newton step from a, projected on s >= 0, is taken
    when it cannot raise f: a step up always (f's curvature only falls along it, so the step
    stops short of the minimum). A step down always overshoots the minimum (the curvature
    grows along it), so it is taken only where it stops short of the majorizer's minimum
    (the Lee-Seung bound of f, whose minimum never raises f); beyond that, the step goes to
    the lower of that minimum and `_kl_safe_down`'s, both of which lie between the minimum
    and a. No step needs a second pass over the cells (`_kl_safe_down` takes any upper bound
    of the cells' b_q / v_q for their maximum: a larger one only shortens the step)."""
    k = A.shape[1]
    first = 0.0
    d_last, base_last = 0.0, np.int64(0)  # last step; the next coordinate's pass applies it to v
    for sweep in range(sweeps):
        moved = 0.0
        for t in range(k):
            base = t * c
            old = A[i, t]
            num, curv, r_max = _kl_coordinate_sums(scratch, base, xs, v, c, d_last, base_last,
                                                   eps, old)
            d_last = 0.0
            if shape > 0.0:
                inv = 1.0 / max(old, eps)
                num += shape * inv
                curv += shape * inv * inv
                r_max = max(r_max, inv)
            linear = lin[t] + l1
            grad = linear + l2 * old - num
            hess = curv + l2
            if hess > 0.0:
                new = max(old - grad / hess, 0.0)
            elif grad > 0.0:
                new = 0.0
            else:
                continue
            if new < old:
                bound = _kl_majorizer_min(old, num, linear, l2)
                if new < bound:
                    new = min(bound, _kl_safe_down(old, grad, hess, r_max))
            d = new - old
            if d == 0.0:
                continue
            A[i, t] = new
            d_last, base_last = d, base
            moved += d * d
        if sweep == 0:
            first = moved
        elif moved <= tol * tol * first:
            break
    if d_last != 0.0:
        for q in range(c):
            v[q] += d_last * scratch[base_last + q]


@_jit(error_model="numpy")
def _kl_safe_down(old, grad, hess, r_max):
    """A step down from ``old`` (f'(old) = grad > 0, f''(old) = hess) that stops short of
    f's minimum: old - grad / (hess + grad r_max), where r_max bounds b_q / v_q over the
    cells. Why: f' = linear + l2 s - sum w_q / (1 + (s - old) r_q), with w_q = x_q b_q / v_q
    and r_q = b_q / v_q; each 1 / (1 + d r) is convex in r in [0, r_max], so below its chord,
    which bounds the sum by one term in r_max whose root has this closed form and where f'
    is still >= 0. Never below 0 where a cell would reach v = 0 (then r_max >= 1 / old)."""
    return max(old - grad / (hess + grad * r_max), 0.0)


@_jit(fastmath=_FAST, error_model="numpy", inline="always")
def _kl_coordinate_sums(scratch, base, xs, v, c, d_last, base_last, eps, a):
    """(sum x_q b_q / v_q, sum x_q b_q^2 / v_q^2, a bound on max b_q / v_q) over the cells for
    the coordinate whose b_q start at ``base`` and whose value is ``a``, first adding the
    previous coordinate's step d_last to v (one pass over the cells instead of two). The
    bound is the 8-norm of the b_q / v_q, at most c^(1/8) times their maximum: a max in the
    loop would keep it from vectorizing (about twice as slow a sweep). It is summed
    over a b_q / v_q, which v_q >= a b_q keeps at most 1 (no overflow)."""
    num = 0.0
    curv = 0.0
    s8 = 0.0
    b = scratch[base:base + c]  # slices, not base + q: the loops then vectorize
    b_last = scratch[base_last:base_last + c]  # d_last = 0: v stays as it is
    for q in range(c):
        vq = v[q] + d_last * b_last[q]
        v[q] = vq
        r = b[q] / max(vq, eps)
        xr = xs[q] * r
        num += xr
        curv += xr * r
        z = a * r
        z *= z
        z *= z
        s8 += z * z
    return num, curv, s8 ** 0.125 / a if a > 0.0 else 0.0


# Kernels reading X through the fold rule (`_FoldTraining`; a fully observed X is a rule
# holding nothing out): X is dense, or empty with its rows' entries in idx and vals
# (`_RuleArrays`); row i's held-out cells are the columns j with b[j] == P[i].
@_jit(inline="always")
def _rule_cells(i, which, R, js, xs):
    """Row i's cells of one kind into js, xs; returns their number. which > 0: training
    cells, 0: all. Dense X: every cell; CSR: the stored entries (R: `_RuleArrays`). js and
    xs have room for all the row's cells: each is written, then kept or written over."""
    X, starts, ends, idx, vals, P, b = R.X, R.starts, R.ends, R.idx, R.vals, R.P, R.b
    c = P[i]
    count = 0
    every = which == 0
    if X.shape[0] > 0:  # no branch per cell: held-out cells fall at random
        for j in range(X.shape[1]):
            js[count] = j
            xs[count] = X[i, j]
            count += every | (b[j] != c)
    else:
        for q in range(starts[i], ends[i]):
            j = idx[q]
            js[count] = j
            xs[count] = vals[q]
            count += every | (b[j] != c)
    return count


@_jit()
def _rule_maxima(R, row_ptr):
    """(largest training value of each row, of each column) of X read through the rule R
    (a `_RuleArrays`; ``row_ptr``: where each row group starts among the rows ordered by
    group), in one pass over the rows. A sparse line with fewer stored training entries
    than training cells has an implicit zero among them; a line with no training cell
    gets -inf. For sparse X (`_FoldTraining.training_maxima`: dense X takes numpy's max,
    which compiles nothing on a first dense cross-validation)."""
    m, n = R.P.shape[0], R.b.shape[0]
    js = np.empty(n, dtype=np.int64)
    xs = np.empty(n, dtype=np.float64)
    rmax = np.empty(m, dtype=np.float64)
    cmax = np.empty(n, dtype=np.float64)
    stored = np.empty(n, dtype=np.int64)  # training entries listed in each column
    for j in range(n):
        cmax[j] = -np.inf
        stored[j] = 0
    for i in range(m):
        count = _rule_cells(i, np.int64(1), R, js, xs)
        top = -np.inf
        for q in range(count):
            x, j = xs[q], js[q]
            if x > top:
                top = x
            if x > cmax[j]:
                cmax[j] = x
            stored[j] += 1
        c = R.P[i]
        if count < n - (R.col_ptr[c + 1] - R.col_ptr[c]) and top < 0.0:
            top = 0.0
        rmax[i] = top
    for j in range(n):
        c = R.b[j]
        if stored[j] < m - (row_ptr[c + 1] - row_ptr[c]) and cmax[j] < 0.0:
            cmax[j] = 0.0
    return rmax, cmax


@_jit(fastmath=_FAST, kernels_only=True)
def _dot_rows(A, i, B, j):
    """A[i] . B[j], accumulated in float64."""
    total = 0.0
    for t in range(A.shape[1]):
        total += A[i, t] * B[j, t]
    return total


# =============================================================================================
# Fitting: cross-validation's training sets, through the fold rule
# =============================================================================================

class _FoldSolver(_TransposedW):
    """Frobenius loss over a `_FoldTraining`'s training cells, exactly, at about a dense
    fit's cost: a row group's Gram matrix is the full one minus its held-out column group's
    (a k x k subtraction), and the products with X are the full (BLAS or sparse) ones minus
    a pass over the held-out cells (about 1 / n_folds of them). Each group's update is then
    the dense kernel's. The same methods as `_DenseSolver`, and the same layout (W held
    transposed)."""

    accel = None  # an _Extrapolation (HALS fits with extrapolate=True)

    def __init__(self, train, W, H, method, penalty, update_H=True):
        self.t, self.method, self.pen, self.update_H = train, method, penalty, update_H
        self.Wt = np.ascontiguousarray(W.T)
        self.H = H
        m, n = train.shape
        k = H.shape[0]
        if method == "hals":
            self.sweeps_W, self.sweeps_H = _inner_sweeps(m, n, k), _inner_sweeps(n, m, k)
        else:
            self.sweeps_W = self.sweeps_H = 100  # gdcls: H by constrained least squares
        self.objective = self._objective(self._HXt(), *train.group_grams(self.H.T, train.b))

    def _HXt(self):
        """H X' over each row's training cells (k x m)."""
        X = self.t.X
        full = (X @ self.H.T).T if self.t.sparse else self.H @ X.T
        full -= self.t.held_XBt(self.H)
        return np.ascontiguousarray(full, dtype=self.H.dtype)

    def _WtX(self):
        """W' X over each column's training cells (k x n)."""
        X = self.t.X
        full = (X.T @ self.Wt.T).T if self.t.sparse else self.Wt @ X
        full -= self.t.held_AtX(self.Wt)
        return np.ascontiguousarray(full, dtype=self.H.dtype)

    def _objective(self, HXt, HHt, h_grams):
        _, w_grams = self.t.group_grams(self.Wt.T, self.t.P)
        model = float(np.einsum("gij,gij->", w_grams, HHt[None] - h_grams))
        half_rss = 0.5 * self.t.xx - _fdot(self.Wt, HXt) + 0.5 * model
        return max(half_rss, 0.0) + self.pen.value(self.Wt, self.H)

    def _update(self, A, side, G, grams, B, penalty, exact, sweeps):
        """Each group's columns of A (k x p; X's ``side``, "rows" or "columns") for the Gram
        matrix G - its group's part (``grams``); ``penalty``: (l1, l2)."""
        t, (l1, l2) = self.t, penalty
        if side == "rows":
            order, ptr, groups = t.row_order, t.row_ptr, t.row_groups
        else:
            order, ptr, groups = t.col_order, t.col_ptr, t.col_groups
        if exact:
            _hals_groups(A, G, grams, order, ptr, B, l1, l2, sweeps,
                         0.1 if self.method == "hals" else 1e-3)
            return
        for lines, Gg in zip(groups, grams, strict=True):
            if len(lines):
                Ac = np.ascontiguousarray(A[:, lines])
                _mu_apply(Ac, np.ascontiguousarray(B[:, lines]), (G - Gg).astype(A.dtype) @ Ac,
                          l1, l2)
                A[:, lines] = Ac

    def step(self, want_loss=True):
        p, t, x = self.pen, self.t, self.accel
        if x is not None:
            self.Wt = x.start(self.Wt)
        s = _balancing_scales(np.einsum("ij,ij->i", self.Wt, self.Wt),
                              np.einsum("ij,ij->i", self.H, self.H), p)
        if s is not None:
            self.Wt *= s[:, None].astype(self.Wt.dtype)
            self.H /= s[:, None].astype(self.H.dtype)
            if x is not None:
                x.rescale(s[:, None])
        # column group c's held-out rows are row group c (and row group c's columns group c)
        WtW, w_grams = t.group_grams(self.Wt.T, t.P)
        self._update(self.H, "columns", WtW, w_grams, self._WtX(), (p.l1_H, p.l2_H),
                     self.method != "mu", self.sweeps_H)
        if x is not None:
            self.H = x.middle(self.H)
        HHt, h_grams = t.group_grams(self.H.T, t.b)
        HXt = self._HXt()
        self._update(self.Wt, "rows", HHt, h_grams, HXt, (p.l1_W, p.l2_W),
                     self.method == "hals", self.sweeps_W)
        self.objective = self._objective(HXt, HHt, h_grams) if want_loss else math.nan
        if x is not None:
            self.H = x.end(self.objective, self.H)
        return self.objective


@_jit()
def _hals_groups(A, G, grams, order, ptr, B, l1, l2, max_sweeps, tol):
    """_hals_update on each group's columns of A (k x p), group g being the columns
    order[ptr[g]:ptr[g + 1]] (ascending), with Gram matrix G - grams[g]: a group's columns are
    gathered, updated together and put back."""
    k = A.shape[0]
    Gg = np.empty((k, k), dtype=A.dtype)
    for g in range(len(ptr) - 1):
        cols = order[ptr[g]:ptr[g + 1]]
        size = cols.shape[0]
        if size == 0:
            continue
        Ac = np.empty((k, size), dtype=A.dtype)
        Bc = np.empty((k, size), dtype=B.dtype)
        for t in range(k):
            for r in range(k):  # a loop, not an array expression: less to compile
                Gg[t, r] = G[t, r] - grams[g, t, r]
            for q in range(size):
                Ac[t, q] = A[t, cols[q]]
                Bc[t, q] = B[t, cols[q]]
        _hals_update(Ac, Gg, Bc, l1, l2, max_sweeps, tol)
        for t in range(k):
            for q in range(size):
                A[t, cols[q]] = Ac[t, q]


@_jit()
def _group_grams(A, labels, n_groups):
    """Gram matrices of the rows of A (p x k) in each group, float64 (n_groups x k x k)."""
    p, k = A.shape
    out = np.zeros((n_groups, k, k), dtype=np.float64)
    for i in range(p):
        g = out[labels[i]]
        for t in range(k):
            a = float(A[i, t])
            for r in range(t + 1):
                g[t, r] += a * A[i, r]
    for c in range(n_groups):
        for t in range(k):
            for r in range(t):
                out[c, r, t] = out[c, t, r]
    return out


class _CellSums(NamedTuple):
    """Sums over a set of cells, wh = W[i] . Ht[j] (`_rule_sums`'s, in its order)."""

    sq: float  # sum (x - wh)^2
    wh2: float  # sum wh^2
    log_part: float  # sum [x log(x / max(wh, eps)) - x]
    x_sum: float  # sum x
    xx: float  # sum x^2


@_jit()
def _rule_sums(which, R, W, Ht, eps):
    """Over the cells of one kind (see _rule_cells), with wh = W[i] . Ht[j]: the sums of
    `_CellSums`, in its order. W, Ht with no columns give the data's sums."""
    js = np.empty(R.b.shape[0], dtype=np.int64)
    xs = np.empty(R.b.shape[0], dtype=np.float64)
    k = W.shape[1]
    sq = wh2 = log_part = x_sum = xx = 0.0
    for i in range(R.P.shape[0]):
        count = _rule_cells(i, which, R, js, xs)
        for q in range(count):
            j = js[q]
            x = xs[q]
            wh = 0.0
            for t in range(k):
                wh += W[i, t] * Ht[j, t]
            sq += (x - wh) ** 2
            wh2 += wh * wh
            x_sum += x
            xx += x * x
            log_part -= x
            if x > 0.0:
                log_part += x * math.log(x / max(wh, eps))
    return sq, wh2, log_part, x_sum, xx


class _FoldKLSolver(_TransposedH):
    """KL multiplicative updates over a `_FoldTraining`'s training cells, exactly: the
    numerators stream over the training cells with a value (stored entries of a sparse X),
    and the denominators and the sum of WH over the training cells come from the factors'
    sums, all cells' less the held-out groups' ((sum W)(sum H) minus, per group, (sum of the
    row group's W)(sum of the column group's H)). Holds W (m x k) and H transposed."""

    def __init__(self, train, W, H, penalty):
        self.t, self.pen = train, penalty
        self.W, self.Ht = W, np.ascontiguousarray(H.T)
        self.eps = _kl_floor(train.dtype)
        s_log = _rule_kl_rows(train.cells(), self.W, self.Ht, np.zeros(0), np.zeros((0, 0)),
                              0.0, 0.0, self.eps, True)
        self.objective = self._total(s_log)

    def _group_sums(self, A, groups):
        A = A.astype(np.float64, copy=False)
        return A.sum(axis=0), np.array([A[g].sum(axis=0) for g in groups])

    def _total(self, s_log):
        w_all, w_groups = self._group_sums(self.W, self.t.row_groups)
        h_all, h_groups = self._group_sums(self.Ht, self.t.col_groups)
        wh = float(w_all @ h_all) - float(np.einsum("ij,ij->", w_groups, h_groups))
        return s_log + wh + self.pen.value(self.W, self.Ht)

    def step(self, want_loss=True):
        p, t = self.pen, self.t
        num = np.zeros(self.Ht.shape)
        _rule_kl_cols(t.cells(), self.W, self.Ht, self.eps, num)
        w_all, w_groups = self._group_sums(self.W, t.row_groups)
        den = w_all[None, :] - w_groups[t.b]  # column j's held-out rows: row group b[j]
        _kl_mu_apply(self.Ht, num, den, p.l1_H, p.l2_H)
        h_all, h_groups = self._group_sums(self.Ht, t.col_groups)
        s_log = _rule_kl_rows(t.cells(), self.W, self.Ht, h_all, h_groups, p.l1_W, p.l2_W,
                              self.eps, want_loss)
        self.objective = self._total(s_log) if want_loss else math.nan
        return self.objective


@_jit(fastmath=_FAST)
def _rule_kl_cols(R, W, Ht, eps, num):
    """num[j] += sum over column j's training cells of x / wh * W[i] (KL numerator of H)."""
    js = np.empty(R.b.shape[0], dtype=np.int64)
    xs = np.empty(R.b.shape[0], dtype=np.float64)
    k = W.shape[1]
    for i in range(W.shape[0]):
        count = _rule_cells(i, np.int64(1), R, js, xs)
        for q in range(count):
            x = xs[q]
            if x > 0.0:
                j = js[q]
                r = x / max(_dot_rows(W, i, Ht, j), eps)
                for t in range(k):
                    num[j, t] += r * W[i, t]


@_jit(fastmath=_FAST)
def _rule_kl_rows(R, W, Ht, h_all, h_groups, l1, l2, eps, want_loss):
    """KL multiplicative update of W's rows over their training cells, the denominator of
    row i being h_all - h_groups[P[i]] (no update when h_all is empty). Returns the sum over
    the training cells of x log(x / wh) - x after it if asked."""
    js = np.empty(R.b.shape[0], dtype=np.int64)
    xs = np.empty(R.b.shape[0], dtype=np.float64)
    k = W.shape[1]
    num = np.empty(k, dtype=np.float64)
    update = h_all.shape[0] > 0
    s_log = 0.0
    for i in range(W.shape[0]):
        count = _rule_cells(i, np.int64(1), R, js, xs)
        if update:
            for t in range(k):
                num[t] = 0.0
            for q in range(count):
                x = xs[q]
                if x > 0.0:
                    j = js[q]
                    r = x / max(_dot_rows(W, i, Ht, j), eps)
                    for t in range(k):
                        num[t] += r * Ht[j, t]
            for t in range(k):
                W[i, t] = _kl_majorizer_min(W[i, t], num[t], h_all[t] - h_groups[R.P[i], t] + l1,
                                            l2)
        if want_loss:
            for q in range(count):
                x = xs[q]
                if x > 0.0:
                    s_log += x * math.log(x / max(_dot_rows(W, i, Ht, js[q]), eps)) - x
    return s_log


# =============================================================================================
# Cross-validation: leave-cells-out PRESS
# =============================================================================================

# Rank selection compares fits across ranks, so each fit must be close to converged: an
# under-converged fit at the true rank looks worse than it is (tighter than fit_nmf's 1e-4).
_RANK_FIT_DEFAULTS = {"max_iter": 2000, "tol": 1e-6}
# KL coordinate descent takes steps many times larger than multiplicative updates, so its
# per-iteration tolerance is reached closer to the optimum: 1e-5 gives nearly the curves of
# 1e-6 in a fraction of the time.
_KL_RANK_TOL = 1e-5
_RIDGE = 0.1  # relative to the noise; see benchmarks/README.md, "bench_rank.py", parts-based
_N_RESTARTS = 1  # fits per rank and fold in rank selection (see cross_validate)
_STUCK_RESTARTS = 2  # extra fits for a stuck fold; see benchmarks/README.md, "bench_rank.py"


def _rank_fit_kwargs(method, loss, fit_kwargs):
    """`fit_nmf`'s options for the fits of `stability`, `randomized_rss` and
    `bicross_validate`: close to converged (`_RANK_FIT_DEFAULTS`) and extrapolated where the
    solver allows it (`_can_extrapolate`), as cross-validation's training fits are
    (`_FoldFits.fit`): the same tolerance sooner, the same picks (benchmarks/README.md,
    "bench_extrapolated_criteria.py"). ``fit_kwargs``, the caller's, win."""
    faster = {"extrapolate": True} if _can_extrapolate(_resolve_method(method, loss)) else {}
    return {**_RANK_FIT_DEFAULTS, **faster, **fit_kwargs}


@dataclass
class CVResult:
    """Outcome of `cross_validate` (and of `bicross_validate`).

    Attributes
    ----------
    ranks : ndarray (r,)
    press : ndarray (r, n_repeats, n_folds)
        Sum of squared errors over each fold's held-out cells (``loss="kl"``: their Poisson
        deviance), a cell that alone would carry more than half a fold with a prediction
        beyond its row's and column's training values scored at their largest (see
        `cross_validate`).
    train_rss : ndarray (r, n_repeats, n_folds)
        Sum of squared residuals over each fold's training cells (``loss="kl"``: deviance).
    press_median : ndarray (r,)
        Median PRESS over the ``n_repeats * n_folds`` folds: what the rank rules use.
    press_mad_se : ndarray (r,)
        Robust standard error of that median: ``1.2533 * 1.4826 * MAD / sqrt(folds)`` (the
        standard error of a median of normal data, with the spread taken from the median
        absolute deviation, so one wild fold cannot inflate it).
    press_mean, press_se : ndarray (r,)
        Mean PRESS per fold and its (classical) standard error, for reference.
    n_outlier_folds : ndarray of int (r,)
        Folds whose PRESS exceeds ``3 x`` their rank's median (a fit that blew up or stuck).
    best_rank : int
        The paired one-standard-error rule: the smallest rank not shown worse than
        ``min_rank`` on the same held-out cells. On each fold both were fitted on, ``d =
        PRESS_k / PRESS_min - 1``; rank k qualifies when ``median(d)`` is at most one standard
        error, that of the median (from the MAD of d, as ``press_mad_se``) combined with the
        variance from split to split of the ranks' per-split median ratios (`_paired_excess`).
        Where ranks are equally good this picks the simplest: a curve flat past its true
        rank has its minimum wherever the noise puts it. Equal to ``min_rank`` where the
        curve rises past it.
    min_rank : int
        The rank with the smallest median PRESS over folds (among the ranks fitted on every
        split). A median over folds, not the mean, so that one bad fold cannot decide it.
    best_rank_1se : int
        The smallest rank (among those fitted on every split) whose median PRESS is within
        one robust standard error of that minimum (``min_rank``'s ``press_mad_se``); unpaired.
    n_kept : int
        Observed cells never held out, because holding them out would leave a row or column of
        a training set without any observed cell.
    folds : Folds
        The rule that put each cell in its fold (small whatever the data's size):
        ``folds.fold_of(rows, cols, repeat)`` for given cells, ``folds[r]`` or
        ``np.asarray(folds)`` as (m, n) arrays for small inputs; -1 never held out, -2 missing.
    factors : dict or None
        ``(rank, repeat, fold) -> (W, H)`` when ``return_factors=True``.
    loss : str
        ``"frobenius"`` (squared error) or ``"kl"`` (Poisson deviance).
    alpha : ndarray (n_repeats, n_folds)
        The ridge ``alpha_W = alpha_H`` each fold's training fits used (see `cross_validate`).
    n_refitted : ndarray of int (r,)
        Folds of each rank refitted because they were stuck (``stuck_restarts``).
    repeat_best_ranks : ndarray of int (n_repeats,)
        Each split's own pick: ``best_rank``'s rule applied to that split's folds alone.
        How far these agree is how far the pick depends on the split
        (`pick_text`). Ranks a split did not fit (NaN in ``press``) are left out of it.

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=0)
    >>> cv = nmf_cv.cross_validate(X, [1, 2, 3], n_folds=3, random_state=0, progress=False)
    >>> cv.best_rank, cv.n_outlier_folds.tolist()
    (2, [0, 0, 0])
    """

    ranks: np.ndarray
    press: np.ndarray
    train_rss: np.ndarray
    n_kept: int = 0
    folds: np.ndarray = None
    factors: dict = None
    loss: str = "frobenius"
    alpha: np.ndarray = None
    n_refitted: np.ndarray = None
    press_median: np.ndarray = field(init=False)
    press_mad_se: np.ndarray = field(init=False)
    press_mean: np.ndarray = field(init=False)
    press_se: np.ndarray = field(init=False)
    n_outlier_folds: np.ndarray = field(init=False)
    best_rank: int = field(init=False)
    best_rank_1se: int = field(init=False)
    min_rank: int = field(init=False)
    repeat_best_ranks: np.ndarray = field(init=False)

    def __post_init__(self):
        per_fold = self.press.reshape(len(self.ranks), -1)
        n = np.sum(~np.isnan(per_fold), axis=1)  # folds fitted per rank
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # an unfinished run's unfitted ranks
            self.press_mean = np.nanmean(per_fold, axis=1)
            sd = np.array([np.nanstd(p, ddof=1) if c > 1 else 0.0
                           for p, c in zip(per_fold, n, strict=True)])
            self.press_se = sd / np.sqrt(n)
            self.press_median = np.nanmedian(per_fold, axis=1)
            mad = np.nanmedian(np.abs(per_fold - self.press_median[:, None]), axis=1)
            self.press_mad_se = _MEDIAN_SE * _MAD_SD * mad / np.sqrt(n)
        with np.errstate(invalid="ignore"):
            outlier = per_fold > _OUTLIER_FOLD * self.press_median[:, None]
        self.n_outlier_folds = np.sum(outlier, axis=1)
        pick, best = _parsimonious_pick(self.press)
        self.best_rank, self.min_rank = int(self.ranks[pick]), int(self.ranks[best])
        final = n == n.max()  # ranks left out of later splits compare on fewer folds
        with np.errstate(invalid="ignore"):
            close = self.press_median <= self.press_median[best] + self.press_mad_se[best]
        within = np.flatnonzero(final & close)  # none only before any fold is fitted
        self.best_rank_1se = int(self.ranks[within[0] if len(within) else best])
        self.repeat_best_ranks = np.array([
            self.ranks[_parsimonious_pick(self.press[:, r:r + 1])[0]]
            for r in range(self.press.shape[1])])

    def pick_counts(self):
        """(rank, number of splits picking it) pairs, the pooled ``best_rank`` first, then
        by count."""
        ranks, counts = np.unique(self.repeat_best_ranks, return_counts=True)
        tally = dict(zip(ranks.tolist(), counts.tolist(), strict=True))
        first = [(self.best_rank, tally.pop(self.best_rank, 0))]
        return first + sorted(tally.items(), key=lambda item: (-item[1], item[0]))

    def pick_text(self):
        """The pick with its spread over splits: ``"6 (5 of 5 splits)"``, ``"6 or 9 (3 and 2
        of 5 splits)"``; ``"6 (one split)"`` when there was only one."""
        n = len(self.repeat_best_ranks)
        if n == 1:
            return f"{self.best_rank} (one split)"
        picks = self.pick_counts()
        if picks[0][1] == 0:  # the pooled curve's minimum, which no split alone picks
            others = " or ".join(str(k) for k, _ in picks[1:])
            counts = " and ".join(str(c) for _, c in picks[1:])
            return (f"{self.best_rank} (pooled over {n} splits; alone they pick {others}: "
                    f"{counts} of {n})")
        ranks = " or ".join(str(k) for k, _ in picks)
        counts = " and ".join(str(c) for _, c in picks)
        return f"{ranks} ({counts} of {n} splits)"

    def __repr__(self):
        return (f"CVResult(ranks={self.ranks.tolist()}, best_rank={self.best_rank}, "
                f"best_rank_1se={self.best_rank_1se}, folds={self.press.shape[2]}, "
                f"repeats={self.press.shape[1]}, outlier folds={int(self.n_outlier_folds.sum())})")


_MEDIAN_SE = math.sqrt(math.pi / 2)  # se(median) / se(mean) for normal data
_MAD_SD = 1.4826  # standard deviation / median absolute deviation for normal data
_OUTLIER_FOLD = 3.0  # a fold above this multiple of its rank's median PRESS is an outlier


def cross_validate(X, ranks, *, n_folds=5, n_repeats="auto", mask=None, method=None,
                   loss="frobenius", ridge=_RIDGE, n_restarts=_N_RESTARTS,
                   stuck_restarts=_STUCK_RESTARTS, warm_start=False, random_state=None,
                   executor=None, progress=None, return_factors=False, allow_large_loo=False,
                   checkpoint=None, **fit_kwargs):
    """Leave-cells-out cross-validation of the rank: PRESS over held-out cells.

    The observed cells are split into ``n_folds`` folds by a rule on their coordinates (see
    `Folds`): rows and columns are each dealt out evenly at random into ``n_folds`` classes,
    and cell (i, j) is in fold ``(row class + column class) % n_folds``, so a fold holds out,
    from every row, the cells of one class of columns: ``1 / n_folds`` of each row, of each
    column and of the matrix, scattered over it. For each rank and fold, NMF is fitted on the
    other folds' cells only (the held-out cells are treated as missing, so nothing of them
    reaches the fit, inits included) and ``PRESS = sum over held-out cells of (X - WH)^2``,
    with one exception: a held-out cell whose error is more than half its fold's PRESS (more
    than all the fold's other cells together) and whose prediction is above every training
    value of its row and column is scored at the largest of those values, so that one
    prediction the training cells never supported cannot carry a fold (as one did on Golub's
    ALL/AML data: benchmarks/README.md, "bench_seeds.py"). Overshoots that do not carry a fold
    are scored as they are: they are how a rank that overfits shows (not with
    ``n_folds="loo"``, whose folds are single cells). A cell is never held out when it is the
    last observed cell of its row or column in a fold's training set (it stays in training for
    every fold; ``n_kept`` counts them), so every training set covers every row and column.

    Sparse input (scipy.sparse) is never densified, and its zeros, stored or not, are observed
    values: a held-out zero is scored like any other cell. Fully observed input, dense or
    sparse, is read through the fold rule: a training fit reads X itself (no per-fold copy,
    and the same folds whether X is dense or sparse), holding only its factors and the
    held-out cells' values (``1 / n_folds`` of X) beside it, at some cost per iteration
    over a dense fit (bench_rank.py, section ``scale``). Held-out values enter the fit only
    through products with X minus their own part, so they change it by rounding alone.
    Mostly observed input with missing cells (at least half of them observed; Frobenius
    loss, or KL by coordinate descent) is read the same way, X with zeros in its missing
    cells and each row's and column's missing cells shared by every fit (the Frobenius fits
    are then `fit_nmf`'s masked ones; no m x n copy per fit). Other input with missing
    cells, KL multiplicative updates on it, ``n_folds="loo"`` and ``warm_start`` use lists
    of cells and a dense m x n copy per fit.
    HALS and KL coordinate-descent training fits are extrapolated (``extrapolate=True``, see
    `fit_nmf`), which cuts the iterations to their tolerance.

    For counts (genes, words, spikes) use ``loss="kl"``: the folds are fitted by KL
    coordinate descent (Poisson likelihood, with weak Gamma priors: see ``ridge``) and scored
    by the held-out Poisson deviance ``2 sum [x log(x / mu) - x + mu]`` (``0 log 0 = 0``)
    instead of squared error.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix (m, n)
        Non-negative data, NaN = missing (dense input).
    ranks : iterable of int
    n_folds : int >= 2 or "loo"
        ``"loo"``: exact leave-one-cell-out, one fit per observed cell and rank, giving
        E(k) = sum of the held-out squared errors. Refused above 2000 observed cells unless
        ``allow_large_loo=True``.
    n_repeats : int or "auto"
        Independent splits into folds; an int fits every rank on that many splits.
        ``"auto"`` (default): every rank on two splits, then further splits, up to 5 in all,
        for the ranks still in contention: the best so far and every rank within 2 standard
        errors of it (the paired comparison of `CVResult.best_rank`); a rank back in
        contention is fitted on the splits it missed. One split with ``n_folds="loo"`` or
        ``warm_start``. Two splits for every rank because one split's folds understate the
        spread from split to split, so ranks would leave contention too early and the pick
        would follow the seed (benchmarks/README.md, "bench_seeds.py"). Ranks out of
        contention keep the PRESS of the splits they were fitted on (NaN for the others in
        ``press``); ``CVResult.repeat_best_ranks`` / ``pick_text()`` say how far the splits
        agree. Which ranks get more splits depends on the earlier splits' held-out errors
        (as the refits of ``stuck_restarts`` do); each fit still sees its training cells only.
    mask : array-like of bool, optional
        True = observed (as in `fit_nmf`).
    method : str, optional
        Passed to `fit_nmf`; ``"hals"`` for the Frobenius loss, ``"cd"`` for KL by default.
    loss : {"frobenius", "kl"}
        ``"frobenius"``: fits minimise squared error, ``press`` and ``train_rss`` are sums of
        squared errors. ``"kl"``: fits minimise the KL divergence, ``press`` and
        ``train_rss`` hold Poisson deviances of the held-out and training cells.
    ridge : float >= 0
        Ridge of the training fits, relative to the data's noise: ``alpha_W = alpha_H = ridge
        * sigma * (sqrt(m) + sqrt(n))``, where ``sigma`` is the noise level estimated from the
        median singular value of each training set (`noise_level`; held-out cells are not
        read) and ``sigma (sqrt(m) + sqrt(n))`` is the largest singular value of pure noise of
        that level. Default 0.1. Why: without it, a component whose support barely touches a
        row's training cells is almost free on that row, and the fit can send it far out on
        the row's held-out cells (wild folds). The ridge ``alpha/2 (|W|^2 + |H|^2)`` equals
        ``alpha * sum_c |w_c| |h_c|`` at its optimum, so it shrinks every component by about
        ``alpha`` in norm whatever its scale and does not reward splitting one in two: noise-level
        components are held back, strong ones barely move. Smaller values leave wild folds;
        near 1 the curve flattens past the true rank and picks drift up. 0.1: see
        benchmarks/README.md, "bench_rank.py", parts-based data (``--sections hard``).
        For ``loss="kl"`` (coordinate descent) the ridge sets Gamma priors on every entry
        of W and H instead (`fit_nmf`'s ``gamma_prior``): shape ``1 + ridge`` and rate
        ``(1 + ridge) / sqrt(mean count of the training set)`` (``CVResult.alpha`` holds the
        rate). Why: unpenalised Poisson fits put exact zeros in W and H, so some held-out
        cells are predicted to be exactly 0, a count there costs about 700 in deviance, and
        the curve climbs with k, picking too low a rank on sparse counts (with the priors:
        benchmarks/README.md, "bench_counts.py"). ``method="mu"`` fits are not penalised.
        Explicit ``alpha_W`` / ``alpha_H`` or ``gamma_prior`` in ``fit_kwargs`` replace it.
    n_restarts : int >= 1
        Fits per rank and fold: the first from ``init``, the others from random inits (each
        with its own seed spawned from the fit's), keeping the lowest *training* objective.
        Default 1: ``stuck_restarts`` spends extra fits only where they are needed. Whether
        ``init`` (default ``"nndsvda"``) or random inits fit better depends on the data, so
        the first fit keeps ``init`` and the refits of stuck folds try random ones.
    stuck_restarts : int >= 0
        Extra fits from random inits for a fold stuck in a poor local minimum, keeping the
        lowest training objective. Default 2: three fits for stuck folds only, rather than
        ``n_restarts=3`` tripling every fold's cost. A fold is stuck when its training error
        per training cell exceeds 1.1x the best of its rank's folds so far: the training sets
        share all but a fold's cells, so their errors per cell agree within a few percent
        unless a fit is stuck. 2: see benchmarks/README.md, "bench_rank.py", parts-based data.
        Refits see only the fold's training cells, but *whether* a fold is refitted depends on
        the other folds' training errors, so on its held-out cells at one remove
        (``stuck_restarts=0`` makes every fold's fit a function of its training cells alone).
        Not for ``n_folds="loo"``.
    warm_start : bool
        Fit each fold's ranks in increasing order, every rank starting from the previous
        rank's factors plus new components initialised (``"nndsvda"``) from the positive part
        of that fit's residual on the fold's *training* cells, so nothing crosses holdouts.
        One task per fold (and repeat) instead of one per rank and fold: fewer iterations,
        less parallelism. Results differ from independent fits (other local optima).
    random_state : None, int or SeedSequence
        Seeds the splits and every fit; each fit gets its own child seed
        (``SeedSequence.spawn``), so results do not depend on the executor.
    executor : concurrent.futures.Executor, optional
        Runs the independent fits (rank x repeat x fold), e.g. a ProcessPoolExecutor or a
        dask.distributed ``client.get_executor()``. Either receives the data once per call,
        not per fit: a ProcessPoolExecutor's workers map it from shared memory (a copy the
        call makes and frees), dask's get it scattered; other executors are sent it with
        every task.
    progress : bool or None
        Progress line on stderr; None shows it only when stderr is a terminal.
    return_factors : bool
        Keep every fold's (W, H) in ``CVResult.factors``.
    checkpoint : str or os.PathLike, optional
        A directory where every finished fit is recorded as it arrives (one small file per
        task, written to a temporary name and renamed, with a checksum), so that a run stopped
        by Ctrl-C, a killed process or a wall-time limit resumes: calling again with the same
        data, arguments and checkpoint reads the finished fits back, runs the others, and
        returns what an uninterrupted run returns, bit for bit. The checkpoint keeps a
        fingerprint of the data (values and missing cells) and of every argument that changes
        results; a call that differs raises a ValueError naming what differs. A damaged record
        (cut short, a flipped byte) is redone. Records are JSON and ``.npz`` read without
        pickle: loading a checkpoint cannot run code. With ``random_state=None`` the
        checkpoint keeps the seed it drew. Ctrl-C cancels the queued fits at once (fits
        already running in a pool's workers finish) and says how to resume. Whether or not
        there is a checkpoint, when a ProcessPoolExecutor's worker dies (say, killed for
        memory) its unfinished fits go to a new pool of the same size, up to 3 times.
    **fit_kwargs
        Passed to `fit_nmf` (``max_iter``, ``tol``, ``init``, penalties, ...); default
        ``max_iter=2000, tol=1e-6`` (``tol=1e-5`` for KL coordinate descent, whose steps are
        much longer than multiplicative updates'), and ``extrapolate=True`` for HALS and KL
        coordinate descent.

    Returns
    -------
    CVResult

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(40, 30, 3, noise=0.05, random_state=1)
    >>> nmf_cv.cross_validate(X, range(1, 6), random_state=0, progress=False).best_rank
    3
    """
    data = _validate_data(X, mask, signal=True)
    ranks = _check_ranks(ranks, data.shape)
    method = _resolve_method(method, loss)
    fixed = not (isinstance(n_repeats, str) and n_repeats == "auto")
    if fixed:
        _check_positive_int(n_repeats, "n_repeats")
    _check_positive_int(n_restarts, "n_restarts")
    _check_positive_int(stuck_restarts, "stuck_restarts", minimum=0)
    kl_cd = {"tol": _KL_RANK_TOL} if (loss, method) == ("kl", "cd") else {}
    fit_kwargs = {**_RANK_FIT_DEFAULTS, **kl_cd, **fit_kwargs}
    ridge = _cv_ridge(ridge, method, loss, fit_kwargs)
    m, n = data.shape
    n_cells = data.n_observed
    loo = isinstance(n_folds, str)
    if loo:
        _check_choice(n_folds, ("loo",), "n_folds")
        if n_cells > 2000 and not allow_large_loo:
            raise ValueError(f"n_folds='loo' fits every rank once per observed cell "
                             f"({n_cells} cells here); pass allow_large_loo=True to do it "
                             "anyway, or use k-fold")
    elif isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2 or 'loo'; got {n_folds!r}")
    ckpt, root = _open_checkpoint(
        checkpoint, "cross_validate", data, random_state, ranks=ranks, n_folds=n_folds,
        n_repeats=n_repeats, method=method, loss=loss, ridge=ridge, n_restarts=n_restarts,
        stuck_restarts=stuck_restarts, warm_start=warm_start, fit_options=fit_kwargs)
    seeds = root.spawn(2)
    source = _cv_source(data, loo or warm_start, loss, method)
    del data  # the source has what the fits read (the mask and any cell lists can go)
    n_fold_count = n_cells if loo else n_folds
    max_splits = n_repeats if fixed else (1 if loo or warm_start else _AUTO_SPLITS)
    split_seeds = seeds[0].spawn(max_splits)
    press = np.full((len(ranks), max_splits, n_fold_count), np.nan)
    train = np.full_like(press, np.nan)
    alpha = np.zeros((max_splits, n_fold_count))
    refitted = np.zeros(len(ranks), dtype=int)
    factors = {} if return_factors else None
    splits, per_cell, unfinished = [], {}, set()
    # "auto": every rank on the first splits, later ones for the ranks in contention
    first = n_repeats if fixed else min(_FIRST_SPLITS, max_splits)
    tasks = [(ki, r, f) for ki in range(len(ranks)) for r in range(first)
             for f in range(n_fold_count)]
    rounds = [_CVRound(tasks, _first_fit_seeds(seeds[1], tasks, ranks, fixed))]
    fits = _FoldFits(method, loss, n_restarts, ridge, fit_kwargs)
    with _shipped(_carried_source(source, fits), executor) as carried:
        cv = _CVCall(source, carried, fits, ranks, splits, alpha, _Run(executor, progress, ckpt),
                     return_factors)
        while rounds:
            round_ = rounds.pop()
            tasks = round_.tasks
            new = sorted({r for _, r, _ in tasks} - set(range(len(splits))))
            splits += [source.split(n_folds, np.random.default_rng(split_seeds[r]))
                       for r in new]
            alpha[new] = _fold_alphas(cv, [splits[r] for r in new], (m, n), round_.label)
            outputs = _cv_outputs(cv, round_, warm_start)
            if stuck_restarts and not loo:
                unfinished |= _refit_stuck(cv, round_, outputs, per_cell, refitted,
                                           stuck_restarts)
            unfinished |= {ki for (ki, _, _), out in zip(tasks, outputs, strict=True)
                           if out is None}
            for (ki, r, f), out in zip(tasks, outputs, strict=True):
                if ki in unfinished:
                    continue
                press[ki, r, f], train[ki, r, f] = out.held_out, out.training
                if return_factors:
                    factors[(int(ranks[ki]), r, f)] = (out.W, out.H)
            r = len(splits)
            if unfinished:  # a report from an unfinished run: no later round was run
                break
            if not fixed and r < max_splits:
                contenders = _contenders(press[:, :r])
                if len(contenders) > 1:  # the next split, and any split a contender missed
                    tasks = [(ki, q, f) for ki in contenders for q in range(1, r + 1)
                             if q == r or np.isnan(press[ki, q, 0])
                             for f in range(n_fold_count)]
                    rounds.append(_CVRound(tasks, [_split_seed(seeds[1], q, int(ranks[ki]), f)
                                                   for ki, q, f in tasks], f" (split {r + 1})"))
    r = len(splits)
    press, train, alpha = press[:, :r], train[:, :r], alpha[:r]
    folds = source.folds(splits, n_fold_count)
    if loo:  # E(k) is the sum over cells; one "fold" holding it keeps press_mean = E(k)
        press = press.sum(axis=2, keepdims=True)
        train = train.mean(axis=2, keepdims=True)
    if unfinished:
        press[sorted(unfinished)] = train[sorted(unfinished)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the unfinished ranks' NaN
            partial = CVResult(ranks, press, train, folds.n_kept, folds, factors, loss, alpha,
                               refitted)
        raise _Unfinished("cross_validate", None, None, partial,
                          [int(ranks[ki]) for ki in sorted(unfinished)])
    return CVResult(ranks, press, train, folds.n_kept, folds, factors, loss, alpha, refitted)


def _first_fit_seeds(seed, tasks, ranks, fixed):
    """The fit seeds of the first round's tasks: children of ``seed`` in task order for a
    fixed ``n_repeats``; with "auto" the first split's are n_repeats=1's (spawned) and the
    others' are those of splits added in contention (`_split_seed`)."""
    if fixed:
        return seed.spawn(len(tasks))
    spawned = iter(seed.spawn(sum(r == 0 for _, r, _ in tasks)))
    return [next(spawned) if r == 0 else _split_seed(seed, r, int(ranks[ki]), f)
            for ki, r, f in tasks]


def _split_seed(seed, split, k, f):
    """The fit seed of rank k, fold f of ``n_repeats="auto"``'s splits after the first (a path
    under seed, by the rank's value, so the ranks offered do not change it; 10**6 + split
    keeps clear of the children ``seed.spawn`` gave the first split's fits)."""
    for j in (10 ** 6 + split, k, f):
        seed = _child_seed(seed, j)
    return seed


@dataclass
class _CVCall:
    """What one `cross_validate` call's stages share: the fold source (and ``carried``, what
    its tasks carry of it: see `_shipped`), how folds are fitted, the ranks, the splits and
    every training set's ridge so far, how tasks run, and whether the caller keeps each
    fit's factors (else they are dropped as each fit arrives: at 10^6 cells and rank 10,
    40 MB a fit)."""

    source: object
    carried: object
    fits: "_FoldFits"
    ranks: np.ndarray
    splits: list
    alpha: np.ndarray
    run: "_Run"
    return_factors: bool = False

    def kept(self, out):
        """What the caller keeps of a fit (a `_FoldFit`, or the plain tuple a checkpoint
        gives back): its factors only if asked for."""
        out = _FoldFit._make(out)
        return out if self.return_factors else out._replace(W=None, H=None)


class _FoldFit(NamedTuple):
    """One (rank, split, fold) fit of cross-validation: its scores on the held-out cells
    and on the training cells (`_FoldTraining.scores`), its factors (None where the caller
    does not keep them), its final objective."""

    held_out: float
    training: float
    W: np.ndarray
    H: np.ndarray
    objective: float


@dataclass
class _CVRound:
    """One round of fits: its (rank index, split, fold) tasks, their seeds, and the label
    its progress line carries (" (split 3)" for splits added in contention)."""

    tasks: list
    seeds: list
    label: str = ""


def _refit_stuck(cv, round_, outputs, per_cell, refitted, stuck_restarts):
    """Refit the round's stuck tasks (see `cross_validate`), in place in ``outputs``; a
    task is judged against every fit of its rank so far (``per_cell``: (rank index, split,
    fold) -> training error per training cell); ``refitted`` counts refits per rank.

    Returns the rank indices left unfinished: none, unless this reads an unfinished run's
    checkpoint for a report (fits None in ``outputs``), where a rank is unfinished while a
    fit of it, or the refit of a stuck one, is missing."""
    tasks, splits = round_.tasks, cv.splits
    missing = {ki for (ki, _, _), out in zip(tasks, outputs, strict=True) if out is None}
    n_train = {(r, f): cv.source.n_train(splits[r], f) for _, r, f in tasks}
    for (ki, r, f), out in zip(tasks, outputs, strict=True):
        if out is not None:
            per_cell[ki, r, f] = out.training / n_train[r, f]
    best = {}
    for (ki, _, _), value in per_cell.items():
        best[ki] = min(best.get(ki, np.inf), value)
    stuck = [i for i, (ki, r, f) in enumerate(tasks) if ki not in missing
             and per_cell[ki, r, f] > _STUCK_TRAINING * best[ki]]
    if missing:  # the run had not come to its refits: the stuck ranks wait for theirs
        return missing | {tasks[i][0] for i in stuck}
    if not stuck:
        return set()
    args = [(cv.carried, cv.fits, splits[r], f, int(cv.ranks[ki]), round_.seeds[i],
             cv.alpha[r, f], stuck_restarts) for i in stuck for ki, r, f in [tasks[i]]]
    again = _map_tasks(_cv_refit_task, args, cv.run,
                       "cross_validate: refitting stuck folds" + round_.label, partial=True,
                       keep=cv.kept)
    missing = {tasks[i][0] for i, out in zip(stuck, again, strict=True) if out is None}
    for i, out in zip(stuck, again, strict=True):
        ki, r, f = tasks[i]
        if out is None:
            continue
        refitted[ki] += 1
        if out.objective < outputs[i].objective:
            outputs[i] = out
            per_cell[ki, r, f] = out.training / n_train[r, f]
    return missing


_STUCK_TRAINING = 1.1  # training error per cell over the rank's best fold's: a stuck fit
_AUTO_SPLITS = 5  # n_repeats="auto": most splits, the later ones for the ranks in contention
# n_repeats="auto": splits every rank is fitted on, so that the spread from split to split is
# estimated before any rank leaves contention (one split's folds alone understate it)
_FIRST_SPLITS = 2
_CONTENTION_Z = 2.0  # standard errors of the paired differences that show a rank worse
_PICK_Z = 1.0  # best_rank: the smallest rank within this many standard errors of the best


def _parsimonious_pick(press):
    """(index of the smallest rank within one standard error of the best, index of the best):
    see `CVResult.best_rank`."""
    best, excess, se = _paired_excess(press)
    return int(np.flatnonzero(excess <= _PICK_Z * se)[0]), best


def _contenders(press):
    """Indices of the ranks still in contention after the splits in ``press`` (r, splits,
    folds; NaN where a rank was not fitted): the best and every rank within _CONTENTION_Z
    standard errors of it (`_paired_excess`)."""
    best, excess, se = _paired_excess(press)
    return sorted(set(np.flatnonzero(excess <= _CONTENTION_Z * se).tolist()) | {best})


def _pooled_medians(press):
    """Median PRESS of each rank over all its folds; inf for ranks not fitted on every split
    that any rank was (they cannot be compared on the same footing)."""
    per_fold = press.reshape(len(press), -1)
    n = np.sum(~np.isnan(per_fold), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        medians = np.nanmedian(per_fold, axis=1)
    return np.where(n == n.max(), medians, np.inf)


def _paired_excess(press):
    """How much worse each rank is than the best, fold by fold: (best index, median relative
    excess (r,), its standard error (r,)).

    The best is the smallest pooled median among ranks fitted on every split. Each rank is
    compared with it on the folds both were fitted on (the same held-out cells):
    ``d = PRESS_k / PRESS_best - 1`` per fold, excess = median(d), and its standard error is
    ``sqrt(se_fold^2 + s^2 / splits)``: ``se_fold`` is the robust standard error of that
    median (from the median absolute deviation, as ``press_mad_se``), so that one wild fold
    of either rank cannot decide it; ``splits`` is the number of splits the two share; ``s^2``
    is the variance from split to split of the ratio of the two ranks' per-split medians,
    averaged over the ranks sharing two splits or more with the best. Folds of one split
    share that split's luck (which cells are held out together), which ``se_fold`` alone
    understates. ``excess`` is inf for ranks sharing no split with the best, 0 for the best."""
    R, S, F = press.shape
    fitted = ~np.isnan(press[:, :, 0])
    best = int(np.argmin(_pooled_medians(press)))
    split_var = []
    for k in range(R):
        both = fitted[k] & fitted[best]
        if k != best and both.sum() >= 2:
            ratio = np.median(press[k, both], axis=1) / np.median(press[best, both], axis=1)
            split_var.append(np.var(ratio, ddof=1))
    s2 = float(np.mean(split_var)) if split_var else None
    excess = np.full(R, np.inf)
    se = np.zeros(R)
    for k in range(R):
        both = fitted[k] & fitted[best]
        if not both.any():
            continue
        d = (press[k, both] / press[best, both] - 1.0).ravel()
        excess[k] = np.median(d)
        fold_se = _MEDIAN_SE * _MAD_SD * np.median(np.abs(d - excess[k])) / math.sqrt(len(d))
        se[k] = math.sqrt(fold_se ** 2 + (s2 / both.sum() if s2 is not None else 0.0))
    excess[best], se[best] = 0.0, 0.0
    return best, excess, se


def _cv_outputs(cv, round_, warm_start):
    """Every task's `_FoldFit`, in task order (None for a task not run: `_FinishedOnly`)."""
    splits, tasks = cv.splits, round_.tasks
    if not warm_start:
        args = [(cv.carried, cv.fits, splits[r], f, int(cv.ranks[ki]), round_.seeds[i],
                 cv.alpha[r, f]) for i, (ki, r, f) in enumerate(tasks)]
        return _map_tasks(_cv_task, args, cv.run, "cross_validate" + round_.label,
                          partial=True, keep=cv.kept)
    # one chain of ranks per (repeat, fold); tasks are ordered rank-major
    n_repeats, n_folds = cv.alpha.shape
    per_rank = n_repeats * n_folds
    chains = [(cv.carried, cv.fits, splits[r], f, [int(k) for k in cv.ranks],
               round_.seeds[j::per_rank], cv.alpha[r, f])
              for j, (r, f) in enumerate((r, f) for r in range(n_repeats)
                                         for f in range(n_folds))]
    chained = _map_tasks(_cv_chain_task, chains, cv.run, "cross_validate", partial=True,
                         keep=lambda chain: [cv.kept(out) for out in chain])
    return [None if chained[i % per_rank] is None else chained[i % per_rank][i // per_rank]
            for i in range(len(tasks))]


@dataclass
class Folds:
    """Which fold holds out each cell (`CVResult.folds`), as a rule rather than a list, so it
    stays small whatever the data's size.

    Repeat ``r`` puts cell ``(i, j)`` in fold ``(row_class[r, i] + col_class[r, j]) %
    n_folds``, where the classes deal the rows, and the columns, out evenly at random. So a fold
    holds out, from each row, every cell of one class of columns: about ``1 / n_folds`` of
    the row, and of each column, and of the matrix. Exceptions: cells in ``kept[r]`` are never
    held out (``-1``; only with missing cells, where holding one out would leave a row or column
    of a training set without any observed cell) and missing cells are in no fold (``-2``).
    With ``n_folds="loo"`` every observed cell is its own fold (``cell_fold``).

    The rule reads only a cell's coordinates and the seed, so a matrix gets the same folds
    whether it is passed dense or sparse, and a fold's training set of fully observed data is
    read straight from the data: only its held-out cells' values (1/n_folds of X) are copied.

    Attributes
    ----------
    n_folds : int
    shape : tuple (m, n)
    row_class : ndarray of int (n_repeats, m) or None
    col_class : ndarray of int (n_repeats, n) or None
    kept : list of (rows, cols) per repeat
    observed : ndarray of bool (m, n) or None
        The observed cells when some are missing; None when all are.
    cell_fold : list of ndarray or None
        ``n_folds="loo"``: the fold of each observed cell (row-major), per repeat.

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> cv = nmf_cv.cross_validate(np.ones((6, 4)), [1], n_folds=2, random_state=0,
    ...                            progress=False)
    >>> grid = cv.folds[0]  # repeat 0 as an (m, n) array, for small inputs
    >>> sorted(np.unique(grid).tolist()), bool((cv.folds.fold_of([0, 5], [1, 3]) ==
    ...                                         grid[[0, 5], [1, 3]]).all())
    ([0, 1], True)
    """

    n_folds: int
    shape: tuple
    row_class: np.ndarray = None
    col_class: np.ndarray = None
    kept: list = None
    observed: np.ndarray = None
    cell_fold: list = None

    def __len__(self):
        return len(self.kept)

    @property
    def n_kept(self):
        return int(len(self.kept[0][0]))

    def fold_of(self, rows, cols, repeat=0):
        """Fold of the cells (rows[q], cols[q]) in ``repeat``: -1 never held out, -2 missing."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        m, n = self.shape
        key = rows * n + cols
        if self.cell_fold is not None:
            cells = np.flatnonzero(self.observed.ravel()) if self.observed is not None \
                else np.arange(m * n)
            where = np.minimum(np.searchsorted(cells, key), len(cells) - 1)
            return np.where(cells[where] == key, self.cell_fold[repeat][where], -2)
        fold = (self.row_class[repeat][rows] + self.col_class[repeat][cols]) % self.n_folds
        kept_rows, kept_cols = self.kept[repeat]
        fold[np.isin(key, kept_rows.astype(np.int64) * n + kept_cols)] = -1
        if self.observed is not None:
            fold[~self.observed[rows, cols]] = -2
        return fold

    def __getitem__(self, repeat):
        """Repeat ``repeat`` as an (m, n) int array (refused above 10^8 cells)."""
        m, n = self.shape
        if m * n > 10 ** 8:
            raise ValueError(f"folds of {m} x {n} cells as an array would take "
                             f"{8 * m * n / 1e9:.1f} GB; use fold_of(rows, cols) instead")
        repeat = range(len(self))[repeat]
        rows, cols = np.divmod(np.arange(m * n), n)
        return self.fold_of(rows, cols, repeat).reshape(m, n)

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        return np.array([self[r] for r in range(len(self))], dtype=dtype)


def _cv_source(data, cells, loss="frobenius", method=None):
    """Where cross_validate's training sets come from: the fold rule read from X itself
    (fully observed input; or mostly observed input with missing cells, fitted by Frobenius
    loss or KL coordinate descent), or lists of observed cells (leave-one-out, warm starts,
    vectors, other data with missing cells)."""
    if cells or min(data.shape) < 2:
        return _CellSource(*_observed_cells(data), data.shape, data.masked)
    if data.masked:
        rule = loss == "frobenius" or _resolve_method(method, loss) == "cd"
        if rule and 2 * data.n_observed >= data.shape[0] * data.shape[1]:
            return _MissingRuleSource.of(data)
        return _CellSource(*_observed_cells(data), data.shape, data.masked)
    return _RuleSource(data.dense if data.sparse is None else data.sparse)


def _carried_source(source, fits):
    """The source as the fit tasks carry it: for KL coordinate descent on a `_RuleSource`,
    with X's transpose (``Xt``), made once per call rather than once per fit."""
    if not (isinstance(source, _RuleSource) and fits.loss == "kl"
            and _resolve_method(fits.method, fits.loss) == "cd"):
        return source
    return dataclasses.replace(source, Xt=_transposed(source.X))


def _transposed(X):
    """X's transpose in X's layout: CSR for CSR, C order for an ndarray (a copy)."""
    return X.T.tocsr() if sp.issparse(X) else np.ascontiguousarray(X.T)


def _observed_cells(data):
    if data.masked:
        return data.rows, data.cols, data.values
    dense = data.dense if data.sparse is None else data.sparse.toarray()
    rows, cols = np.nonzero(np.ones(data.shape, dtype=bool))
    return rows, cols, dense.ravel()


class _Split(NamedTuple):
    """One random division of the observed cells into folds, as a source makes it: the fold
    rule's classes, cell (i, j) being in fold (row_class[i] + col_class[j]) % n_folds; the
    cells that rule would hold out which every training set keeps (``kept_rows``,
    ``kept_cols``: `_MissingRuleSource`'s); and for listed cells (`_CellSource`) each one's
    fold, ``cell_fold`` (-1: kept), leave-one-out having no classes."""

    row_class: np.ndarray
    col_class: np.ndarray
    n_folds: int
    kept_rows: np.ndarray = None
    kept_cols: np.ndarray = None
    cell_fold: np.ndarray = None


def _fold_rule(shape, n_folds, rng):
    """A `_Split` of `Folds`' rule: each side's classes dealt out evenly at random."""
    rows, cols = ((rng.permutation(size) % n_folds).astype(np.int32) for size in shape)
    return _Split(rows, cols, n_folds)


@dataclass
class _RuleSource:
    """A fully observed X (ndarray or CSR) whose training sets are read through the fold
    rule (a `_Split` of its classes). ``Xt``: X's transpose in X's layout, which KL
    coordinate descent reads H's lines from (`_carried_source`), or None."""

    X: object
    Xt: object = None

    def split(self, n_folds, rng):
        return _fold_rule(self.X.shape, n_folds, rng)

    def training(self, split, f):
        return _FoldTraining(self.X, split, f, self.Xt)

    def n_train(self, split, f):
        n_folds = split.n_folds
        rows = np.bincount(split.row_class, minlength=n_folds)
        cols = np.bincount(split.col_class, minlength=n_folds)
        held = sum(int(rows[r]) * int(cols[(f - r) % n_folds]) for r in range(n_folds))
        return self.X.shape[0] * self.X.shape[1] - held

    def folds(self, splits, n_folds):
        empty = np.zeros(0, dtype=np.int64)
        return Folds(n_folds, self.X.shape, np.array([s.row_class for s in splits]),
                     np.array([s.col_class for s in splits]), [(empty, empty)] * len(splits))


@dataclass
class _MissingRuleSource:
    """Mostly observed data with missing cells whose training sets are read through the fold
    rule (`_MissingFoldTraining`): X with zeros in its missing cells, its squared norm, and
    each row's and column's cell set as `_mask_lines` makes them (its missing cells, or for
    a mostly missing line its observed ones), shared by every training set. A split
    (`_Split`) has kept cells, those the rule would hold out but `_keep_coverage` keeps in
    every training set: the same folds as `_CellSource`'s from the same generator."""

    X: np.ndarray
    xx: float
    row_ptr: np.ndarray
    row_idx: np.ndarray
    row_sign: np.ndarray
    col_ptr: np.ndarray
    col_idx: np.ndarray
    col_sign: np.ndarray

    @classmethod
    def of(cls, data):
        X = data.zeros_filled()
        lines = []  # each side's (ptr, idx, sign), as `_mask_lines` has them (no patterns)
        for ptr, idx, direct in _line_cell_sets(data.observed_mask()):
            lines += [ptr, idx, np.where(direct, 1.0, -1.0)]
        return cls(X, _sqnorm(X), *lines)

    @property
    def shape(self):
        return self.X.shape

    def row_lines(self):
        return _MaskedLines(self.row_ptr, self.row_idx, self.row_sign)

    def observed(self):
        """Boolean m x n of the observed cells."""
        direct = self.row_sign > 0
        observed = np.repeat(~direct[:, None], self.shape[1], axis=1)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.row_ptr))
        observed[rows, self.row_idx] = direct[rows]
        return observed

    def split(self, n_folds, rng):
        """`_CellSource.split`'s kept cells from the same generator calls (`_keep_coverage`
        on the observed cells in row-major order), found from the rows' cell sets: no array
        per observed cell but the order (int32 where it fits) and a flag."""
        rule = _fold_rule(self.shape, n_folds, rng)
        m, n = self.shape
        listed = np.diff(self.row_ptr)
        start = np.concatenate([[0], np.cumsum(np.where(self.row_sign > 0, listed, n - listed))])
        order = np.arange(start[-1], dtype=np.int32 if start[-1] < 2 ** 31 else np.int64)
        rng.shuffle(order)  # the values of rng.permutation(start[-1]), as _keep_coverage draws
        kept_rows, kept_cols = _rule_kept_cells(self.row_ptr, self.row_idx, self.row_sign, n,
                                                start, rule.row_class.astype(np.int64),
                                                rule.col_class.astype(np.int64), n_folds, order)
        return rule._replace(kept_rows=kept_rows, kept_cols=kept_cols)

    def training(self, split, f):
        return _MissingFoldTraining(self, split, f)

    def n_train(self, split, f):
        n_folds, col_class = split.n_folds, split.col_class
        P = (f - split.row_class.astype(np.int64)) % n_folds
        kept = np.bincount(split.kept_rows[P[split.kept_rows] == col_class[split.kept_cols]],
                           minlength=self.shape[0])
        return int(np.sum(_training_counts(self.row_ptr, self.row_idx, self.row_sign, P,
                                           col_class.astype(np.int64), n_folds, kept)))

    def folds(self, splits, n_folds):
        kept = [(s.kept_rows, s.kept_cols) for s in splits]
        return Folds(n_folds, self.shape, np.array([s.row_class for s in splits]),
                     np.array([s.col_class for s in splits]), kept, self.observed())


def _training_counts(ptr, idx, sign, group, cell_group, n_groups, kept):
    """Training cells per line: its observed cells less those in its held-out block (the
    other side's lines whose group is its own), plus its kept cells."""
    q = len(cell_group)
    listed = np.diff(ptr)
    in_block = _count_in_block(ptr, idx, group, cell_group)
    block = np.bincount(cell_group, minlength=n_groups)[group]
    direct = sign > 0
    observed = np.where(direct, listed, q - listed)
    observed_in_block = np.where(direct, in_block, block - in_block)
    return observed - observed_in_block + kept

@_jit()
def _count_in_block(ptr, idx, group, cell_group):
    """For each line, how many of its listed cells are in its held-out block."""
    out = np.zeros(len(ptr) - 1, dtype=np.int64)
    for a in range(len(ptr) - 1):
        for q in range(ptr[a], ptr[a + 1]):
            if cell_group[idx[q]] == group[a]:
                out[a] += 1
    return out


@dataclass
class _CellSource:
    """Observed cells (row-major) whose training sets are built by `fit_nmf`'s mask: a split
    (`_Split`) gives each cell's fold."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple
    masked: bool

    def split(self, n_folds, rng):
        if isinstance(n_folds, str):  # leave-one-out: one cell a fold, in random order
            n = len(self.rows)
            fold = _keep_coverage(rng.permutation(n), self.rows, self.cols, self.shape, n, rng)
            return _Split(None, None, n, cell_fold=fold)
        rule = _fold_rule(self.shape, n_folds, rng)
        fold = (rule.row_class[self.rows] + rule.col_class[self.cols]) % n_folds
        return rule._replace(cell_fold=_keep_coverage(fold, self.rows, self.cols, self.shape,
                                                      n_folds, rng))

    def training(self, split, f):
        return _CellTraining(self, split.cell_fold, f)

    def n_train(self, split, f):
        return int(np.sum(split.cell_fold != f))

    def folds(self, splits, n_folds):
        observed = None
        if self.masked:
            observed = np.zeros(self.shape, dtype=bool)
            observed[self.rows, self.cols] = True
        kept = [(self.rows[s.cell_fold < 0], self.cols[s.cell_fold < 0]) for s in splits]
        if splits[0].row_class is None:
            return Folds(n_folds, self.shape, kept=kept, observed=observed,
                         cell_fold=[s.cell_fold for s in splits])
        return Folds(n_folds, self.shape, np.array([s.row_class for s in splits]),
                     np.array([s.col_class for s in splits]), kept, observed)


def _keep_coverage(fold, rows, cols, shape, n_folds, rng):
    """``fold`` with cells set to -1 (never held out) where holding them out would leave a
    row or column of a training set without an observed cell: a line's only cell, then,
    where a fold holds all of a line's cells, the first of them in a random order of the
    cells. Rows first, then columns. Memory: the order and the folds, O(lines x folds)
    counts (sorting a key per cell would take many times the data's memory)."""
    fold = np.array(fold, dtype=np.int64)
    order = rng.permutation(len(rows))
    for index, size in ((rows, shape[0]), (cols, shape[1])):
        _keep_lines(fold, index, size, n_folds, order)
    return fold


@_jit()
def _rule_kept_cells(ptr, idx, sign, n, start, row_class, col_class, n_folds, order):
    """`_keep_coverage` of the observed cells of data whose rows list their observed cells
    (sign > 0) or their missing ones (sorted), cells numbered in row-major order (row i's
    from ``start[i]``), each in fold (row_class + col_class) % n_folds: (rows, columns) of
    the cells kept out of every fold."""
    m = len(ptr) - 1
    kept = np.zeros(start[m], dtype=np.bool_)
    cols = np.empty(n, dtype=np.int64)
    held = np.zeros(m * n_folds, dtype=np.int64)
    for i in range(m):  # rows: a row's only cell; a fold holding all of a row's cells
        c = _observed_columns(ptr, idx, sign, i, n, cols)
        if c == 1:
            kept[start[i]] = True
            continue
        for r in range(c):
            held[i * n_folds + (row_class[i] + col_class[cols[r]]) % n_folds] += 1
    for cell in order:
        i = np.searchsorted(start, cell, side="right") - 1
        j = _observed_column(ptr, idx, sign, i, cell - start[i])
        key = i * n_folds + (row_class[i] + col_class[j]) % n_folds
        if not kept[cell] and held[key] == start[i + 1] - start[i]:
            held[key] = -1
            kept[cell] = True
    total = np.zeros(n, dtype=np.int64)  # then the columns, the rows' choices standing
    for i in range(m):
        for r in range(_observed_columns(ptr, idx, sign, i, n, cols)):
            total[cols[r]] += 1
    held = np.zeros(n * n_folds, dtype=np.int64)
    for i in range(m):
        for r in range(_observed_columns(ptr, idx, sign, i, n, cols)):
            j = cols[r]
            if total[j] == 1:
                kept[start[i] + r] = True
            elif not kept[start[i] + r]:
                held[j * n_folds + (row_class[i] + col_class[j]) % n_folds] += 1
    for cell in order:
        if kept[cell]:
            continue
        i = np.searchsorted(start, cell, side="right") - 1
        j = _observed_column(ptr, idx, sign, i, cell - start[i])
        key = j * n_folds + (row_class[i] + col_class[j]) % n_folds
        if held[key] == total[j]:
            held[key] = -1
            kept[cell] = True
    cells = np.flatnonzero(kept)
    rows = np.searchsorted(start, cells, side="right") - 1
    out = np.empty(len(cells), dtype=np.int64)
    for q in range(len(cells)):
        out[q] = _observed_column(ptr, idx, sign, rows[q], cells[q] - start[rows[q]])
    return rows.astype(np.int64), out


@_jit(kernels_only=True)
def _observed_columns(ptr, idx, sign, i, n, out):
    """Row i's observed columns into ``out``, in order; returns their number."""
    if sign[i] > 0:
        c = ptr[i + 1] - ptr[i]
        out[:c] = idx[ptr[i]:ptr[i + 1]]
        return c
    c = 0
    q = ptr[i]
    for j in range(n):
        if q < ptr[i + 1] and idx[q] == j:
            q += 1
        else:
            out[c] = j
            c += 1
    return c


@_jit(kernels_only=True)
def _observed_column(ptr, idx, sign, i, r):
    """Row i's r-th observed column: for a row listing its missing columns L (sorted), r plus
    the number of t with L[t] - t <= r (a non-decreasing sequence: binary search)."""
    if sign[i] > 0:
        return idx[ptr[i] + r]
    lo, hi = ptr[i], ptr[i + 1]
    while lo < hi:
        mid = (lo + hi) // 2
        if idx[mid] - (mid - ptr[i]) <= r:
            lo = mid + 1
        else:
            hi = mid
    return r + (lo - ptr[i])


@_jit()
def _keep_lines(fold, index, size, n_folds, order):
    """One side's part of `_keep_coverage`, in place: cells alone in their line, and for
    each (line, fold) holding all of the line's cells, the first of them in ``order``."""
    total = np.zeros(size, dtype=np.int64)
    for c in range(len(index)):
        total[index[c]] += 1
    held = np.zeros(size * n_folds, dtype=np.int64)
    for c in range(len(index)):
        if total[index[c]] == 1:
            fold[c] = -1
        elif fold[c] >= 0:
            held[index[c] * n_folds + fold[c]] += 1
    for c in order:
        if fold[c] >= 0:
            key = index[c] * n_folds + fold[c]
            if held[key] == total[index[c]]:
                held[key] = -1  # done: its other cells stay held out
                fold[c] = -1


def _cv_ridge(ridge, method, loss, fit_kwargs):
    """The relative ridge the training fits use: 0 for KL multiplicative updates or given
    alphas or priors."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.number)) or not (
            math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}")
    given = {"alpha_W", "alpha_H", "gamma_prior"} & set(fit_kwargs)
    if given or (loss == "kl" and method != "cd"):
        return 0.0
    return float(ridge)


def _fold_alphas(cv, splits, shape, label=""):
    """The ridge of the training fits of every fold of ``splits`` (see `cross_validate`),
    from each training set's own noise level, so that no held-out value reaches the fit; one
    task per training set."""
    ridge, fit_kwargs, n_folds = cv.fits.ridge, cv.fits.fit_kwargs, cv.alpha.shape[1]
    if not ridge:
        alpha = max(fit_kwargs.get("alpha_W", 0.0), fit_kwargs.get("alpha_H", 0.0))
        return np.full((len(splits), n_folds), float(alpha))
    args = [(cv.carried, split, f) for split in splits for f in range(n_folds)]
    if cv.fits.loss == "kl":  # the Gamma priors' rate, from each training set's mean count
        means = _map_tasks(_mean_task, args, cv.run, "cross_validate: means" + label)
        return (1.0 + ridge) / np.sqrt(np.maximum(means, 1e-300)).reshape(len(splits), n_folds)
    sigma = _map_tasks(_noise_task, args, cv.run, "cross_validate: noise levels" + label)
    scale = ridge * (math.sqrt(shape[0]) + math.sqrt(shape[1]))
    return scale * np.array(sigma).reshape(len(splits), n_folds)


def _noise_task(source, split, f):
    return source.training(split, f).noise()


def _mean_task(source, split, f):
    return source.training(split, f).observed_mean()


@dataclass
class _FoldFits:
    """How cross-validation fits a training set: what each fit task carries besides the
    data (``ridge``: relative, see `cross_validate`; ``fit_kwargs``: `fit_nmf`'s)."""

    method: str
    loss: str
    n_restarts: int
    ridge: float
    fit_kwargs: dict

    def options(self, alpha):
        """`fit_nmf`'s keywords for a training set whose ridge is ``alpha``."""
        if not self.ridge:
            return self.fit_kwargs
        if self.loss == "kl":
            return {**self.fit_kwargs, "gamma_prior": (1.0 + self.ridge, alpha)}
        return {**self.fit_kwargs, "alpha_W": alpha, "alpha_H": alpha}

    def fit(self, train, k, seed, alpha, n_restarts, first_child=None, init=None):
        """The `_FoldFit` of the best of ``n_restarts`` fits of rank k to one training set."""
        kw = self.options(alpha)
        if _can_extrapolate(_resolve_method(self.method, self.loss)):
            kw = {"extrapolate": True, **kw}
        if init is not None:
            kw = {**kw, "init": init}
        res = _best_fit(train.fit_data(), k, seed, n_restarts, kw, first_child=first_child,
                        method=self.method, loss=self.loss)
        return _FoldFit(*train.scores(res.W, res.H, self.loss), res.W, res.H,
                        res.loss_history[-1])


def _best_fit(data, k, seed, n_restarts, fit_kwargs, first_child=None, **kwargs):
    """The fit with the lowest final objective of ``n_restarts`` `_fit` runs on ``data`` (a
    `_Data` or a training set): the first
    from ``fit_kwargs["init"]`` with ``seed``, the others from random inits with ``seed``'s
    children 0, 1, ...; with ``first_child=c`` (more restarts of the same fit), all from
    random inits with children c, c + 1, ..."""
    best = None
    for r in range(n_restarts):
        if first_child is None and r == 0:
            res = _fit(data, k, _FitOptions(random_state=seed, **fit_kwargs, **kwargs))
        else:
            child = r - 1 if first_child is None else first_child + r
            res = _fit(data, k, _FitOptions(random_state=_child_seed(seed, child),
                                            **{**fit_kwargs, "init": "random"}, **kwargs))
        if best is None or res.loss_history[-1] < best.loss_history[-1]:
            best = res
    return best


def _child_seed(seed, j):
    """The j-th child of a SeedSequence (what ``seed.spawn`` gives first time round), made
    explicitly: ``spawn`` counts the children it made, so calling it again in the caller's
    process and in a worker's copy would disagree."""
    seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key + (j,),
                                  pool_size=seed.pool_size)


def _cv_task(source, fits, split, f, k, seed, alpha):
    return fits.fit(source.training(split, f), k, seed, alpha, fits.n_restarts)


def _cv_refit_task(source, fits, split, f, k, seed, alpha, extra):
    """``extra`` more random restarts of a stuck fold's fit, after its ``fits.n_restarts``
    (which used ``seed`` and its children up to ``n_restarts - 2``)."""
    return fits.fit(source.training(split, f), k, seed, alpha, extra,
                    first_child=fits.n_restarts - 1)


def _cv_chain_task(source, fits, split, f, ranks, seeds, alpha):
    """warm_start: one fold's ranks in increasing order (see `cross_validate`)."""
    train = source.training(split, f)
    out, W, H = [], None, None
    for k, seed in zip(ranks, seeds, strict=True):
        init = None if W is None else _grow_factors(train.X, train.mask, W, H, k, seed)
        out.append(fits.fit(train, k, seed, alpha, fits.n_restarts, init=init))
        W, H = out[-1].W, out[-1].H
    return out


def noise_level(X, *, mask=None):
    """Noise standard deviation per cell, estimated from the median singular value of X
    (Gavish & Donoho 2014, "The optimal hard threshold for singular values is 4/sqrt(3)").

    For ``X = low rank + noise`` whose rank is small against ``min(m, n)``, the median
    singular value belongs to the noise, whose singular values follow the Marchenko-Pastur
    law: ``sigma = s_median / sqrt(max(m, n) * mu_beta)``, ``mu_beta`` being that law's median
    for aspect ratio ``beta = min(m, n) / max(m, n)``. At most 1000 lines of the smaller side
    and 10000 of the longer (drawn with a fixed seed) are used. Missing cells are filled by
    the rank-1 fit of the row and column means (as for the SVD inits), then three times by
    the projection on the singular vectors above the noise's edge ``sigma (sqrt(m) +
    sqrt(n))``; filled cells carry no noise, so the estimate is divided by the square root of
    the observed fraction. Biased up when the signal's rank approaches half of ``min(m, n)``;
    0 when the smaller side has fewer than 3 lines (the median singular value is then the
    signal's).

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((300, 4)) @ rng.random((4, 200)) + 0.1 * rng.standard_normal((300, 200))
    >>> round(nmf_cv.noise_level(np.abs(X)), 2)
    0.1
    """
    return _noise_level(_validate_data(X, mask))


def _noise_level(data):
    if min(data.shape) < 3:
        return 0.0
    return _noise_of(data.filled(), ~data.observed_mask() if data.masked else None)


def _noise_of(X, missing):
    """Noise level of X (dense or sparse) whose ``missing`` cells (a mask, or None) hold a
    mean fill; see `noise_level`. With ``missing``, a float64 X is refilled in place: pass
    a copy."""
    m, n = X.shape
    if m < n:
        X, m, n = X.T, n, m
        missing = None if missing is None else missing.T
    rng = np.random.default_rng(0)
    keep_cols = np.sort(rng.choice(n, 1000, replace=False)) if n > 1000 else slice(None)
    keep_rows = np.sort(rng.choice(m, _NOISE_LINES, replace=False)) if m > _NOISE_LINES \
        else slice(None)
    X = X[keep_rows][:, keep_cols]
    missing = None if missing is None else missing[keep_rows][:, keep_cols]
    m, n = X.shape
    if sp.issparse(X):
        return _median_noise(np.linalg.eigvalsh((X.T @ X).toarray().astype(np.float64)), m, n)
    X = np.asarray(X, dtype=np.float64)
    for _ in range(_NOISE_REFILLS if missing is not None else 0):
        # The mean fill of the missing cells misses the data's structure, and that error
        # would count as noise (several times the complete data's): refill them from the
        # components above the noise's edge.
        eig, V = np.linalg.eigh(X.T @ X)
        sigma = _median_noise(eig, m, n)
        V = V[:, np.sqrt(np.maximum(eig, 0.0)) > sigma * (math.sqrt(m) + math.sqrt(n))]
        _fill_by_rows(X, missing, lambda rows, V=V: X[rows] @ V @ V.T)
    sigma = _median_noise(np.linalg.eigvalsh(X.T @ X), m, n)
    if missing is not None:  # filled cells carry no noise
        sigma /= math.sqrt(1.0 - missing.mean())
    return sigma


def _mean_filled(X, missing):
    """Dense X in float64 (in place if it is float64 already), its missing cells set to the
    rank-1 fit of the observed row and column means (as `_Data.filled`)."""
    X = np.asarray(X, dtype=np.float64)
    X[missing] = 0.0
    n_row = X.shape[1] - np.count_nonzero(missing, axis=1)
    n_col = X.shape[0] - np.count_nonzero(missing, axis=0)
    row_mean = X.sum(axis=1) / np.maximum(n_row, 1)
    col_mean = X.sum(axis=0) / np.maximum(n_col, 1)
    grand = X.sum() / max(n_row.sum(), 1)
    scale = 1.0 / grand if grand > 0 else 0.0
    _fill_by_rows(X, missing, lambda rows: np.outer(row_mean[rows] * scale, col_mean))
    return X


def _fill_by_rows(X, missing, values):
    """``X[missing] = values(rows)[missing]``, a block of rows at a time (``values`` gets a
    slice of rows), so that no second m x n array is made."""
    for start in range(0, X.shape[0], 1024):
        rows = slice(start, start + 1024)
        block, holes = X[rows], missing[rows]
        block[holes] = values(rows)[holes]


_NOISE_REFILLS = 3  # refills of missing cells in noise_level
_NOISE_LINES = 10_000  # noise_level reads at most this many lines of the longer side


def _median_noise(eigenvalues, m, n):
    """Gavish & Donoho's noise level from the eigenvalues of X'X (X: m x n, n <= m)."""
    s = np.sqrt(np.maximum(eigenvalues, 0.0))
    return float(np.median(s)) / math.sqrt(m * _marchenko_pastur_median(n / m))


def _marchenko_pastur_median(beta):
    """Median of the Marchenko-Pastur law with aspect ratio 0 < beta <= 1 (unit variance)."""
    from scipy import integrate, optimize

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x):
        return math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * beta * x)

    def below(t):
        return integrate.quad(density, lo, t)[0] - 0.5

    return optimize.brentq(below, lo, hi, xtol=1e-10)


class _CellTraining:
    """Fold f's training set from a `_CellSource`: a dense copy of X and its mask, fitted by
    `fit_nmf`'s masked path (data with missing cells, leave-one-out, warm starts)."""

    def __init__(self, source, fold, f):
        self.source = source
        self.train = fold != f
        rows, cols = source.rows[self.train], source.cols[self.train]
        self.mask = np.zeros(source.shape, dtype=bool)
        self.mask[rows, cols] = True
        self.X = np.zeros(source.shape, dtype=source.values.dtype)
        self.X[rows, cols] = source.values[self.train]

    def fit_data(self):
        """What the fits fit: X with the training cells as its mask."""
        return _validate_data(self.X, self.mask)

    def noise(self):
        return _noise_level(_validate_data(self.X, self.mask))

    def observed_mean(self):
        return float(np.mean(self.X[self.mask], dtype=np.float64))

    def scores(self, W, H, loss):
        """(held-out score, training score): squared error or Poisson deviance; the held-out
        score with its dominant cell bounded (`_bound_dominant`)."""
        rows, cols, values = self.source.rows, self.source.cols, self.source.values
        score = _poisson_deviance if loss == "kl" else _squared_error
        held, train = ~self.train, self.train

        def predict(cells):
            return np.einsum("ij,ij->i", W[rows[cells]], H[:, cols[cells]].T)

        prediction = predict(held)
        press, train_score = score(values[held], prediction), score(values[train], predict(train))
        if np.count_nonzero(held) > 1:  # with n_folds="loo" a cell is its own fold: it carries it
            rmax = np.full(self.source.shape[0], -np.inf)
            cmax = np.full(self.source.shape[1], -np.inf)
            np.maximum.at(rmax, rows[train], values[train])
            np.maximum.at(cmax, cols[train], values[train])
            bound = np.maximum(rmax[rows[held]], cmax[cols[held]])
            press = _bound_dominant(press, _top_cell(_NO_CELL, values[held], prediction, bound,
                                                     loss), loss)
        return press, train_score


class _FoldTraining:
    """Fold f's training set of a fully observed X (ndarray or CSR; implicit zeros are observed
    zeros): every cell but those the fold rule puts in fold f, read from X through the rule;
    only the held-out cells' values are copied (1/n_folds of X). Row i's held-out cells are the
    columns of class ``P[i] = (f - row_class[i]) % n_folds``, so the rows fall into n_folds
    groups (by P) that share their held-out columns, and the columns into groups (by class)
    that share their held-out rows: row group c and column group c make up the held-out cells.
    The fits use this: a row group's Gram matrix over its training cells is the full one minus
    its held-out columns' part, and products with X are the full ones minus the held-out cells'
    part (`_FoldSolver`). Quacks like `_Data` for `fit_nmf`'s init and driver."""

    masked = False
    mask = None

    def __init__(self, X, split, f, Xt=None):
        n_folds = split.n_folds
        self.X, self.shape, self.dtype = X, X.shape, X.dtype
        self.Xt = Xt  # X's transpose, if the source has one (`transposed_cells`)
        self.sparse = sp.issparse(X)
        self.P = ((f - split.row_class.astype(np.int64)) % n_folds).astype(np.int64)
        self.b = split.col_class.astype(np.int64)
        self.col_order = np.argsort(self.b, kind="stable")
        self.col_ptr = _indptr(self.b[self.col_order], n_folds)
        self.col_groups = [self.col_order[self.col_ptr[c]:self.col_ptr[c + 1]]
                           for c in range(n_folds)]
        self.row_order = np.argsort(self.P, kind="stable")
        self.row_ptr = _indptr(self.P[self.row_order], n_folds)
        self.row_groups = [self.row_order[self.row_ptr[c]:self.row_ptr[c + 1]]
                           for c in range(n_folds)]
        m, n = self.shape
        self.n_held = sum(len(r) * len(c) for r, c in zip(self.row_groups, self.col_groups,
                                                          strict=True))
        self.n_train = m * n - self.n_held
        self._transposed = None  # `transposed_cells`, made on first use
        self._maxima = None  # `training_maxima`, made on first use
        # The held-out cells' values, read once: each row group's block of its held-out
        # columns (dense X), or the held-out stored entries (CSR). 1 / n_folds of X; the
        # products with them are then BLAS or sparse calls on contiguous data, where reading
        # them through X on every iteration would cost a full pass over X's memory.
        if self.sparse:
            self.held = _held_entries(X, self.P, self.b)
        else:
            self.blocks = [X[np.ix_(r, c)] for r, c in zip(self.row_groups, self.col_groups,
                                                           strict=True)]
        none = np.zeros((m, 0)), np.zeros((n, 0))
        held, every = self.held_sums(*none, 1.0), self.cell_sums(*none, 1.0)
        self.x_sum = every.x_sum - held.x_sum
        self.xx = every.xx - held.xx

    def fit_data(self):
        """What the fits fit: the training cells, read through the rule (a method, not an
        attribute: a reference to itself would keep every fold's copy of its held-out values
        alive until the garbage collector's next full pass)."""
        return self

    def solver(self, W, H, method, loss, penalty, update_H=True):
        """The training set's solver: through the fold rule (`_FoldSolver`, `_FoldKLSolver`,
        or KL coordinate descent on its lines)."""
        if loss == "kl" and method == "cd":
            return _KLCDSolver(*self.kl_lines(), W, H, penalty, update_H)
        if loss == "kl":
            return _FoldKLSolver(self, W, H, penalty)
        return _FoldSolver(self, W, H, method, penalty)

    def kl_lines(self):
        """(rows, columns) as `_KLLines` read through the rule."""
        return (_KLLines(self.cells(), self.col_groups),
                _KLLines(self.transposed_cells(), self.row_groups))

    def cells(self):
        """The kernels' view of X: (dense X or an empty one, CSR arrays or empty ones, the
        rule)."""
        return _rule_view(self.X, self.P, self.b, self.col_ptr, self.col_order)

    def transposed_cells(self):
        """`cells` of X's transpose, whose rule swaps the roles of P and b: KL coordinate
        descent reads H's lines (X's columns) from it: the source's (`_RuleSource`), or a
        copy of X in the other layout made on first use and kept with the training set."""
        if self._transposed is None:
            Xt = self.Xt if self.Xt is not None else _transposed(self.X)
            self._transposed = _rule_view(Xt, self.b, self.P, self.col_ptr, self.col_order)
        return self._transposed

    def held_XBt(self, Bt):
        """(X o held-out) @ Bt.T transposed: row i sums x_ij Bt[:, j] over its held-out
        cells (p x m)."""
        if self.sparse:
            return np.ascontiguousarray((self.held @ Bt.T).T)
        out = np.empty((Bt.shape[0], self.shape[0]), dtype=np.result_type(self.dtype, Bt))
        for rows, cols, block in zip(self.row_groups, self.col_groups, self.blocks,
                                     strict=True):
            out[:, rows] = Bt[:, cols] @ block.T
        return out

    def held_AtX(self, At):
        """At @ (X o held-out): column j sums x_ij At[:, i] over its held-out cells (p x n)."""
        if self.sparse:
            return np.ascontiguousarray((self.held.T @ At.T).T)
        out = np.empty((At.shape[0], self.shape[1]), dtype=np.result_type(self.dtype, At))
        for rows, cols, block in zip(self.row_groups, self.col_groups, self.blocks,
                                     strict=True):
            out[:, cols] = At[:, rows] @ block
        return out

    def cell_sums(self, W, Ht, eps):
        """`_CellSums` over every cell with a value (every stored entry of a sparse X)."""
        return _CellSums(*_rule_sums(0, self.cells(), W, Ht, eps))

    def held_sums(self, W, Ht, eps):
        """`_CellSums` over the held-out cells with a value (all of them for dense X)."""
        if self.sparse:
            rule = self.cells()
            held = _rule_view(self.held, rule.P, rule.b, rule.col_ptr, rule.col_order)
            return _CellSums(*_rule_sums(0, held, W, Ht, eps))
        empty_i, total = np.zeros(0, dtype=np.int32), np.zeros(5)
        for rows, cols, block in zip(self.row_groups, self.col_groups, self.blocks,
                                     strict=True):
            if block.size:
                every_cell = _RuleArrays(block, empty_i, empty_i, empty_i,
                                         np.zeros(0, self.dtype),
                                         np.zeros(len(rows), np.int64),
                                         np.zeros(len(cols), np.int64), self.col_ptr,
                                         self.col_order)
                total += _rule_sums(0, every_cell, W[rows], Ht[cols], eps)
        return _CellSums(*total)

    def group_grams(self, A, labels):
        """Gram matrix of A's rows (float64) and those of each group's rows (n_groups x k x
        k), row i being in group labels[i] (``P`` for X's rows, ``b`` for its columns)."""
        grams = _group_grams(np.ascontiguousarray(A), labels, len(self.row_groups))  # one layout
        return grams.sum(axis=0), grams

    def observed_mean(self):
        return self.x_sum / self.n_train

    def filled(self):
        """The training set with its held-out cells filled by the rank-1 fit of the training
        cells' row and column means (as `_Data.filled` fills missing cells), as a
        LinearOperator: for the SVD-based inits, without an m x n copy."""
        m, n = self.shape
        X = self.X
        # Products in X's dtype: a float64 factor would make numpy cast all of a float32 X
        # to float64 (twice the data) for every product; the SVD inits need no more digits.
        ones_n, ones_m = np.ones((n, 1), dtype=self.dtype), np.ones((m, 1), dtype=self.dtype)
        row_n = n - np.array([len(c) for c in self.col_groups])[self.P]
        col_n = m - np.array([len(r) for r in self.row_groups])[self.b]
        row_mean = (np.asarray(X @ ones_n)[:, 0] - self.held_XBt(ones_n.T)[0]) / row_n
        col_mean = (np.asarray(X.T @ ones_m)[:, 0] - self.held_AtX(ones_m.T)[0]) / col_n
        mean = self.observed_mean()
        u = row_mean / mean if mean > 0 else np.zeros(m)

        def matmat(V):
            V = np.asarray(V, dtype=np.float64).reshape(n, -1)
            S = np.array([col_mean[g] @ V[g] for g in self.col_groups])
            V = V.astype(self.dtype, copy=False)
            return np.asarray(X @ V) - self.held_XBt(V.T).T + u[:, None] * S[self.P]

        def rmatmat(U):
            U = np.asarray(U, dtype=np.float64).reshape(m, -1)
            T = np.array([u[g] @ U[g] for g in self.row_groups])
            U = U.astype(self.dtype, copy=False)
            return np.asarray(X.T @ U) - self.held_AtX(U.T).T + col_mean[:, None] * T[self.b]

        return LinearOperator((m, n), matvec=matmat, rmatvec=rmatmat, matmat=matmat,
                              rmatmat=rmatmat, dtype=np.float64)

    def noise(self):
        """`noise_level` of the training set, from at most _NOISE_LINES x 1000 of its cells
        copied densely (the cells it does not see missing)."""
        m, n = self.shape
        rng = np.random.default_rng(0)
        long_cap, short_cap = (_NOISE_LINES, 1000) if m >= n else (1000, _NOISE_LINES)
        rows = np.sort(rng.choice(m, long_cap, replace=False)) if m > long_cap else np.arange(m)
        cols = np.sort(rng.choice(n, short_cap, replace=False)) if n > short_cap else np.arange(n)
        if min(len(rows), len(cols)) < 3:
            return 0.0
        missing = self._unseen(rows, cols)
        sub = self.X[rows][:, cols].toarray() if self.sparse else self.X[np.ix_(rows, cols)]
        filled = _mean_filled(sub, missing)  # sub is a copy: filled in place
        del sub
        return _noise_of(filled, missing)

    def _unseen(self, rows, cols):
        """Boolean len(rows) x len(cols): the sub-matrix's cells the fits do not see (held
        out)."""
        return self.P[rows][:, None] == self.b[cols][None, :]

    def relative_error(self, W, H):
        """nan: not computed, as cross-validation scores each fit itself (`scores`) and this
        would be one more pass over X per fit."""
        return math.nan

    def sq_norm(self):
        return self.xx

    def training_maxima(self):
        """(largest training value of each row, of each column): row i's training cells
        are its columns outside group ``P[i]``, column j's its rows outside group ``b[j]``
        (`_rule_maxima`)."""
        if self._maxima is None and self.sparse:  # one kernel pass over the stored entries
            self._maxima = _rule_maxima(self.cells(), self.row_ptr)
        elif self._maxima is None:  # numpy, a group's columns (rows) at a time: no compile
            m, n = self.shape
            by_row = np.full((m, len(self.row_groups)), -np.inf)
            by_col = np.full((n, len(self.row_groups)), -np.inf)
            for g, (rows, cols) in enumerate(zip(self.row_groups, self.col_groups,
                                                 strict=True)):
                if len(cols):
                    by_row[:, g] = self.X[:, cols].max(axis=1)
                if len(rows):
                    by_col[:, g] = self.X[rows].max(axis=0)
            by_row[np.arange(m), self.P] = -np.inf
            by_col[np.arange(n), self.b] = -np.inf
            self._maxima = by_row.max(axis=1), by_col.max(axis=1)
        return self._maxima

    def held_top(self, W, Ht, loss, seen=None):
        """`_top_cell` over the held-out cells (``seen``: per row group, which cells of its
        block are held out; all of them by default), a block of rows at a time."""
        rmax, cmax = self.training_maxima()
        top = _NO_CELL
        position = np.empty(self.shape[1], dtype=np.int64)  # of a column in its group
        for g, (rows, cols) in enumerate(zip(self.row_groups, self.col_groups, strict=True)):
            step = max(1, (1 << 20) // max(len(cols), 1))
            position[cols] = np.arange(len(cols))
            for start in range(0, len(rows) if len(cols) else 0, step):
                r = rows[start:start + step]
                if self.sparse:  # the block from the held-out entries: no column slicing of X
                    held = self.held[r]
                    x = np.zeros((len(r), len(cols)), dtype=held.dtype)
                    x[np.repeat(np.arange(len(r)), np.diff(held.indptr)),
                      position[held.indices]] = held.data
                else:
                    x = self.blocks[g][start:start + step]
                bound = np.maximum(rmax[r][:, None], cmax[cols][None, :])
                top = _top_cell(top, x, W[r] @ Ht[cols].T, bound, loss,
                                None if seen is None else seen[g][start:start + step])
        return top

    def scores(self, W, H, loss):
        """(held-out score, training score): squared error or Poisson deviance, the held-out
        part summed over the held-out cells through the rule, the training part as the total
        minus it. Sparse X: the implicit zeros' part from Gram matrices."""
        W = np.ascontiguousarray(W, dtype=np.float64)
        Ht = np.ascontiguousarray(H.T, dtype=np.float64)
        eps = _kl_floor(np.float64)
        held, every = self.held_sums(W, Ht, eps), self.cell_sums(W, Ht, eps)
        if loss == "kl":
            w_sums = [W[g].sum(axis=0) for g in self.row_groups]
            h_sums = [Ht[g].sum(axis=0) for g in self.col_groups]
            held_mu = sum(float(a @ b) for a, b in zip(w_sums, h_sums, strict=True))
            total_mu = float(W.sum(axis=0) @ Ht.sum(axis=0))
            press = 2.0 * (held.log_part + held_mu)
            return (_bound_dominant(press, self.held_top(W, Ht, loss), loss),
                    2.0 * (every.log_part + total_mu) - press)
        press, total = held.sq, every.sq
        if self.sparse:  # cells not stored: (0 - wh)^2, all cells' wh^2 minus stored ones'
            _, w_grams = self.group_grams(W, self.P)
            _, h_grams = self.group_grams(Ht, self.b)
            held_wh2 = _fdot(w_grams, h_grams)
            press += max(held_wh2 - held.wh2, 0.0)
            total += max(_fdot(W.T @ W, Ht.T @ Ht) - every.wh2, 0.0)
        return (_bound_dominant(press, self.held_top(W, Ht, loss), loss),
                max(total - press, 0.0))


def _held_entries(X, P, b):
    """CSR of the stored entries of CSR X that the fold rule holds out (column class
    ``b[j]`` equal to the row's ``P[i]``): `_held_arrays`, no temporary the size of X."""
    indptr, indices, data = _held_arrays(X.indptr, X.indices, X.data, P, b)
    return sp.csr_matrix((data, indices, indptr), shape=X.shape)


@_jit()
def _held_arrays(indptr, indices, data, P, b):
    """(indptr, indices, data) of the entries of CSR (indptr, indices, data) whose column's
    class b[j] equals their row's P[i], in one count and one copy."""
    m = indptr.shape[0] - 1
    ptr = np.empty(m + 1, dtype=np.int64)
    ptr[0] = 0
    for i in range(m):
        c = 0
        for q in range(indptr[i], indptr[i + 1]):
            c += b[indices[q]] == P[i]
        ptr[i + 1] = ptr[i] + c
    n_held = ptr[m]
    out_idx = np.empty(n_held + 1, dtype=indices.dtype)  # one more: written, not kept
    out_val = np.empty(n_held + 1, dtype=data.dtype)
    c = 0
    for i in range(m):  # no branch per entry: held-out entries fall at random
        for q in range(indptr[i], indptr[i + 1]):
            out_idx[c] = indices[q]
            out_val[c] = data[q]
            c += b[indices[q]] == P[i]
    return ptr, out_idx[:n_held], out_val[:n_held]


class _MissingFoldTraining(_FoldTraining):
    """Fold f's training set of mostly observed data with missing cells
    (`_MissingRuleSource`), read through the fold rule as `_FoldTraining` reads fully
    observed data: X holds zeros in its missing cells, so the products with X and the
    held-out blocks are `_FoldTraining`'s, and `_MaskedSolver` fits it (`mask_layout`). A
    row's Gram matrix over its training cells is its group's base (the full Gram matrix less
    its held-out column group's part, as in `_FoldSolver`) less the part of its missing
    cells outside its held-out columns, or, for a mostly missing row, the sum over its
    training cells; the rows' cell sets are the source's, shared. Per fit: the held-out
    blocks (1 / n_folds of X) and which of their cells are observed, the kept cells, and the
    factors; no m x n array."""

    def __init__(self, source, split, f):
        super().__init__(source.X, split, f)
        kept_rows, kept_cols, n_folds = split.kept_rows, split.kept_cols, split.n_folds
        self.source = source
        in_fold = self.P[kept_rows] == self.b[kept_cols]
        kr, kc = kept_rows[in_fold], kept_cols[in_fold]
        kv = source.X[kr, kc]
        self.kept = sp.csr_matrix((kv, (kr, kc)), shape=self.shape)
        self.kept_ones = sp.csr_matrix((np.ones(len(kr)), (kr, kc)), shape=self.shape)
        self.x_sum += float(np.sum(kv, dtype=np.float64))
        self.xx += _sqnorm(kv)
        m, n = self.shape
        self.row_n = _training_counts(source.row_ptr, source.row_idx, source.row_sign, self.P,
                                      self.b, n_folds, np.bincount(kr, minlength=m))
        self.col_n = _training_counts(source.col_ptr, source.col_idx, source.col_sign, self.b,
                                      self.P, n_folds, np.bincount(kc, minlength=n))
        self.n_train = int(self.row_n.sum())
        self.held_observed = [~self._missing_in(r, c) for r, c in zip(self.row_groups,
                                                                       self.col_groups,
                                                                       strict=True)]
        self.n_held = int(sum(h.sum() for h in self.held_observed))
        self.rows = self._lines(source.row_ptr, source.row_idx, source.row_sign, self.P,
                                self.b, self.kept_ones)
        self.cols = self._lines(source.col_ptr, source.col_idx, source.col_sign, self.b,
                                self.P, self.kept_ones.T.tocsr())

    @staticmethod
    def _lines(ptr, idx, sign, group, cell_group, kept):
        """`_MaskedLines` of one side: the source's cell sets, this fold's groups and kept
        cells; lines share a pattern when their cells, direction and group agree and they
        have no kept cell."""
        kptr = kept.indptr.astype(np.int64)
        alone = np.where(np.diff(kptr) > 0, np.arange(len(sign)), -1)
        pattern = _line_patterns(ptr, idx, sign > 0, group, alone)
        return _MaskedLines(ptr, idx, sign, group, cell_group, kptr,
                            kept.indices.astype(np.int64), pattern)

    def _missing_in(self, rows, cols):
        """Boolean len(rows) x len(cols): which cells of the sub-matrix are missing or kept
        (not held out, among the held-out blocks' cells)."""
        s = self.source
        where = np.full(self.shape[1], -1)
        where[cols] = np.arange(len(cols))
        direct = s.row_sign[rows] > 0
        out = np.repeat(direct[:, None], len(cols), axis=1)
        counts = s.row_ptr[rows + 1] - s.row_ptr[rows]
        local = np.repeat(np.arange(len(rows)), counts)
        starts = np.repeat(s.row_ptr[rows] - (np.cumsum(counts) - counts), counts)
        listed = s.row_idx[starts + np.arange(len(local))]
        hit = where[listed] >= 0
        out[local[hit], where[listed[hit]]] = ~direct[local[hit]]
        kept = self.kept_ones[rows][:, cols].tocoo()
        out[kept.row, kept.col] = True
        return out

    def mask_layout(self):
        """This training set as `_MaskedSolver` reads it: itself."""
        return self

    def solver(self, W, H, method, loss, penalty, update_H=True):
        """KL coordinate descent on its lines, else the masked solver (Frobenius: see
        `_cv_source`)."""
        if loss == "kl" and method == "cd":
            return _KLCDSolver(*self.kl_lines(), W, H, penalty, update_H)
        return _MaskedSolver(self, W, H, method, penalty, update_H)

    def kl_lines(self, rows_only=False):
        """(rows, columns) as `_KLLines` for KL coordinate descent: the rule's cells of X (its
        missing cells hold zeros, which the kernel leaves to the linear terms), the linear
        terms corrected by each line's missing cells and kept cells (`_KLLines.args`)."""
        rows = _KLLines(self.cells(), self.col_groups, self.rows, _csr_arrays(self.kept),
                        self.kept_ones)
        if rows_only:
            return rows
        cols = _KLLines(self.transposed_cells(), self.row_groups, self.cols,
                        _csr_arrays(self.kept.T.tocsr()), self.kept_ones.T.tocsr())
        return rows, cols

    def products_W(self, Ht):
        """(X H' over each row's training cells, the rows' bases: the Gram matrix of H less
        each held-out column group's part), as `_MaskLayout.products_W`."""
        G0, grams = self.group_grams(Ht, self.b)
        XB = Ht.T @ self.X.T  # k x m, as BLAS and held_XBt make it; transposed once, last
        XB -= self.held_XBt(Ht.T)
        if self.kept.nnz:  # rarely: a fold holding all of a line's observed cells
            XB += (self.kept @ Ht).T
        return np.ascontiguousarray(XB.T, dtype=Ht.dtype), G0[None] - grams

    def products_H(self, W):
        G0, grams = self.group_grams(W, self.P)
        XB = W.T @ self.X
        XB -= self.held_AtX(W.T)
        if self.kept.nnz:
            XB += (self.kept.T @ W).T
        return np.ascontiguousarray(XB.T, dtype=W.dtype), G0[None] - grams

    def filled(self):
        """As `_FoldTraining.filled`, the cells filled being the held-out and missing ones."""
        m, n = self.shape
        X = self.X
        ones_n, ones_m = np.ones((n, 1), dtype=self.dtype), np.ones((m, 1), dtype=self.dtype)
        row_sum = np.asarray(X @ ones_n)[:, 0] - self.held_XBt(ones_n.T)[0] \
            + np.asarray(self.kept.sum(axis=1))[:, 0]
        col_sum = np.asarray(X.T @ ones_m)[:, 0] - self.held_AtX(ones_m.T)[0] \
            + np.asarray(self.kept.sum(axis=0))[0]
        row_mean, col_mean = row_sum / self.row_n, col_sum / self.col_n
        mean = self.observed_mean()
        u = row_mean / mean if mean > 0 else np.zeros(m)

        def fill(lines, groups, weights, V, kept):
            """Per line, the sum of weights * V over its filled cells: its held-out block's
            but the kept ones, and its missing cells outside the block."""
            wV = weights[:, None] * V
            S = np.array([wV[g].sum(axis=0) for g in groups])[lines.group]
            direct = (lines.sign > 0)[:, None]
            outside = (_outside_sums(lines.ptr, lines.idx, lines.sign, lines.group,
                                     lines.cell_group, wV)
                       + direct * (wV.sum(axis=0) - S))
            return S + outside - kept @ wV

        def matmat(V):
            V = np.asarray(V, dtype=np.float64).reshape(n, -1)
            Vd = V.astype(self.dtype, copy=False)
            return (np.asarray(X @ Vd) - self.held_XBt(Vd.T).T + self.kept @ V
                    + u[:, None] * fill(self.rows, self.col_groups, col_mean, V,
                                        self.kept_ones))

        def rmatmat(U):
            U = np.asarray(U, dtype=np.float64).reshape(m, -1)
            Ud = U.astype(self.dtype, copy=False)
            return (np.asarray(X.T @ Ud) - self.held_AtX(Ud.T).T + self.kept.T @ U
                    + col_mean[:, None] * fill(self.cols, self.row_groups, u, U,
                                               self.kept_ones.T))

        return LinearOperator((m, n), matvec=matmat, rmatvec=rmatmat, matmat=matmat,
                              rmatmat=rmatmat, dtype=np.float64)

    def training_maxima(self):
        """`_FoldTraining.training_maxima` with the kept cells (training cells inside the
        held-out blocks); missing cells hold zeros, below any observed value but 0."""
        if self._maxima is None:
            rmax, cmax = super().training_maxima()
            self._maxima = (np.maximum(rmax, _line_max(self.kept, axis=1)),
                            np.maximum(cmax, _line_max(self.kept, axis=0)))
        return self._maxima

    def _unseen(self, rows, cols):
        """The held-out cells but the kept ones, and the missing cells."""
        kept = self.kept_ones[rows][:, cols].toarray() > 0
        return (super()._unseen(rows, cols) | self._missing_in(rows, cols)) & ~kept

    def scores(self, W, H, loss):
        """(held-out, training) squared error: the held-out blocks' observed cells, and the
        observed cells' total (through the source's cell sets, as `_MaskedSolver`'s
        objective) less them; or Poisson deviance: the held-out blocks' observed cells, and
        the training cells through the KL kernel's objective."""
        W = np.ascontiguousarray(W, dtype=np.float64)
        Ht = np.ascontiguousarray(H.T, dtype=np.float64)
        if loss == "kl":
            press = sum(_poisson_deviance(block[seen], (W[rows] @ Ht[cols].T)[seen])
                        for rows, cols, block, seen in zip(
                            self.row_groups, self.col_groups, self.blocks,
                            self.held_observed, strict=True))
            half = _kl_cd_rows(W, Ht, *self.kl_lines(rows_only=True).args(Ht), 0.0, 0.0, 0.0, 0,
                               0.0, _kl_floor(np.float64), True)
            top = self.held_top(W, Ht, loss, self.held_observed)
            return _bound_dominant(press, top, loss), 2.0 * half
        press = 0.0
        for rows, cols, block, seen in zip(self.row_groups, self.col_groups, self.blocks,
                                           self.held_observed, strict=True):
            if seen.size:
                press += _sqnorm(np.where(seen, block - W[rows] @ Ht[cols].T, 0.0))
        model = _masked_model(W, Ht, _gram64(Ht)[None], self.source.row_lines().kernel(),
                              np.arange(self.shape[0]))
        total = self.source.xx - 2.0 * _fdot(W, _times_factor(self.X, Ht)) + model
        top = self.held_top(W, Ht, loss, self.held_observed)
        return _bound_dominant(press, top, loss), max(total - press, 0.0)


def _csr_arrays(A):
    """(indptr, indices, values as float64) of a CSR matrix, for the kernels."""
    return (A.indptr.astype(np.int64), A.indices.astype(np.int64),
            A.data.astype(np.float64))


def _grow_factors(X, mask, W, H, k, seed):
    """(W, H) of rank k: the given factors plus components fitted by nndsvda to the positive
    part of their residual on the masked (training) cells."""
    residual = np.where(mask, np.maximum(X - W @ H, 0.0), np.nan)
    W_new, H_new = _initialize(_validate_data(residual), k - W.shape[1], "nndsvda",
                               np.random.default_rng(seed))
    return np.hstack([W, W_new]), np.vstack([H, H_new])


def _squared_error(x, prediction):
    return float(np.sum(_cell_scores(x, prediction, "frobenius")))


# A held-out cell whose score is more than this share of its fold's carries the fold: see
# `_bound_dominant`.
_DOMINANT_CELL = 0.5
_NO_CELL = (-np.inf, 0.0, 0.0, 0.0)  # `_top_cell` before any cell


def _cell_scores(x, prediction, loss):
    """Each cell's squared error, or Poisson deviance ``2 [x log(x / mu) - x + mu]`` with
    ``0 log 0 = 0`` and mu floored as in the KL fits: what `_squared_error` and
    `_poisson_deviance` sum."""
    if loss != "kl":
        return (x - prediction) ** 2
    x = np.asarray(x, dtype=np.float64)
    mu = np.maximum(prediction, _kl_floor(np.float64))
    positive = x > 0
    log_term = np.where(positive, x * np.log(np.where(positive, x, 1.0) / mu), 0.0)
    return 2.0 * (log_term - x + mu)


def _top_cell(top, x, prediction, bound, loss, seen=None):
    """The (score, x, prediction, bound) of the highest-scoring cell, of ``top`` (such a
    tuple, or `_NO_CELL`) and the given cells (arrays of one shape; ``seen``: which of them
    count)."""
    s = _cell_scores(x, prediction, loss)
    if seen is not None:
        s = np.where(seen, s, -np.inf)
    if s.size:
        t = np.unravel_index(np.argmax(s), s.shape)
        if s[t] > top[0]:
            return float(s[t]), float(x[t]), float(prediction[t]), float(bound[t])
    return top


def _bound_dominant(press, top, loss):
    """A fold's held-out score, its dominant cell bounded: when the held-out cell ``top``
    (`_top_cell`: its score, value, prediction, and the largest training value of its row and
    column) scores more than half the fold (more than all its other cells together) and is
    predicted above that largest value, it is scored at that value instead. One cell then
    cannot carry a fold with a prediction its row's and column's training cells never
    reached (see `cross_validate`); overshoots that do not dominate a fold are left scored as
    they are, since they are how a rank that overfits shows."""
    score, x, prediction, bound = top
    if not (score > _DOMINANT_CELL * press and prediction > bound):
        return press
    return press - score + float(_cell_scores(np.array([x]), np.array([bound]), loss)[0])


def _line_max(A, axis):
    """Largest entry of each line of A (dense or sparse, whose implicit zeros count) as a
    float64 vector."""
    out = A.max(axis=axis)
    return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64).ravel()


def _poisson_deviance(x, mu):
    """2 sum [x log(x / mu) - x + mu], with 0 log 0 = 0 and mu floored as in the KL fits."""
    return float(np.sum(_cell_scores(x, mu, "kl")))


# =============================================================================================
# Running tasks: executors, shared data, checkpoints, worker faults
# =============================================================================================

class _Checkpoint:
    """One rank function's checkpoint: a directory with ``manifest.json`` (a fingerprint of
    the data and of every argument that changes results) and one ``.npz`` record per
    finished task.

    Each record is written to a temporary file and renamed into place, so a kill at any
    instant leaves a task's record whole or absent (one small file per task rather than an
    append-only log: no record can be half-written into another's, and damage to one file
    costs one task). Each record also holds a SHA-256 of its content, so a file that was cut
    short or changed in transit is detected, ignored and its task redone. Records are read
    with ``np.load(..., allow_pickle=False)`` and JSON: a checkpoint is data and loading it
    cannot run code."""

    def __init__(self, path, name, fingerprint, read_only=False):
        self.root = os.fspath(path)
        self.path = os.path.join(self.root, name)
        self.read_only = read_only
        manifest = os.path.join(self.path, "manifest.json")
        fingerprint = json.loads(json.dumps(fingerprint))
        old = _read_manifest(manifest)
        if old is None and read_only:
            raise _Unfinished(name, 0, None)
        if old is None:
            os.makedirs(self.path, exist_ok=True)
            _atomic_write(manifest, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
        else:
            differ = [key for key in sorted(set(old) | set(fingerprint))
                      if old.get(key) != fingerprint.get(key)]
            if differ:
                raise ValueError(f"the checkpoint {self.path} belongs to another run: its "
                                 f"{', '.join(differ)} differ from this call's; pass another "
                                 "checkpoint path, or delete this one to start over")

    def _file(self, label, index):
        return os.path.join(self.path, f"{label}-{index}.npz")

    def load(self, label, index):
        """The task's output, or None when it is not there or damaged."""
        try:
            with np.load(self._file(label, index), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                arrays = [npz[f"a{i}"] for i in range(int(meta["n_arrays"]))]
            if meta["key"] != [label, index] or meta["sha256"] != _record_digest(
                    meta["structure"], arrays):
                return None
            return _unpack(meta["structure"], arrays)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001  (any damage: cut short, a flipped byte, a crafted file)
            return None

    def save(self, label, index, output):
        arrays = []
        structure = _pack(output, arrays)
        meta = {"key": [label, index], "structure": structure, "n_arrays": len(arrays),
                "sha256": _record_digest(structure, arrays)}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"a{i}": a for i, a in enumerate(arrays)})
        _atomic_write(self._file(label, index), buffer.getvalue())


class _Unfinished(Exception):
    """Raised, reading a checkpoint for a report (`_FinishedOnly`), by a stage whose tasks
    are not all finished: ``done`` of ``total`` (None: the stage never started). ``partial``
    is a result holding the ranks that did finish (NaN for the others), ``ranks`` those
    that did not."""

    def __init__(self, label, done, total, partial=None, ranks=None):
        super().__init__(label, done, total)
        self.label, self.done, self.total = label, done, total
        self.partial, self.ranks = partial, ranks

    def __str__(self):
        if self.ranks is not None:
            return f"k = {', '.join(map(str, self.ranks))} not finished"
        if self.total is None:
            return f"not started ({self.label})"
        return f"{self.done} of {self.total} tasks of {self.label!r} finished"


class _FinishedOnly(os.PathLike):
    """A checkpoint path to read, never to run or write: `report_from_checkpoint`."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __fspath__(self):
        return self.path


def _open_checkpoint(checkpoint, name, data, random_state, **arguments):
    """(the `_Checkpoint` or None, the root SeedSequence). With ``random_state=None`` a
    checkpoint keeps the seed it drew, so that calling again resumes."""
    if checkpoint is None:
        return None, _seed_sequence(random_state)
    if random_state is None:
        old = _read_manifest(os.path.join(os.fspath(checkpoint), name, "manifest.json")) or {}
        entropy = old.get("random_state", [None])[0]
        random_state = np.random.SeedSequence(int(entropy) if entropy else None)
    seed = _seed_sequence(random_state)
    fingerprint = {"function": name, "random_state": [str(seed.entropy), list(seed.spawn_key)],
                   **_data_digests(data),
                   **{key: _fingerprint_value(value) for key, value in arguments.items()}}
    return _Checkpoint(checkpoint, name, fingerprint,
                       read_only=isinstance(checkpoint, _FinishedOnly)), seed


def _persistent_seed(path):
    """The entropy kept in ``path/random_state.json``, drawn and written the first time."""
    os.makedirs(os.fspath(path), exist_ok=True)
    file = os.path.join(os.fspath(path), "random_state.json")
    kept = _read_manifest(file)
    if kept is None:
        kept = {"entropy": str(np.random.SeedSequence().entropy)}
        _atomic_write(file, json.dumps(kept).encode())
    return np.random.SeedSequence(int(kept["entropy"]))


def _read_manifest(path):
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"the checkpoint manifest {path} cannot be read ({exc}); delete the "
                         "checkpoint to start over") from None


def _atomic_write(path, payload):
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def _data_digests(data):
    """Hashes of the data's values and of its missing cells, for a checkpoint's fingerprint."""
    shape = f"{data.shape[0]}x{data.shape[1]} {np.dtype(data.dtype).name}"
    if data.masked:
        values, pattern = [data.values], [data.rows, data.cols]
    elif data.sparse is not None:
        values, pattern = [data.sparse.data, data.sparse.indices, data.sparse.indptr], []
    else:
        values, pattern = [data.dense], []
    return {"data values": shape + " " + _digest(values),
            "missing cells": _digest(pattern) if pattern else "none"}


def _digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _fingerprint_value(value):
    """A JSON-able stand-in for an argument: arrays by their hash, the rest by value."""
    if isinstance(value, np.ndarray):
        return "array " + _digest([value])
    if isinstance(value, dict):
        return {str(k): _fingerprint_value(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple, range)):
        return [_fingerprint_value(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _pack(obj, arrays):
    """A task output as JSON (numbers exactly: JSON floats round-trip) plus its arrays."""
    if isinstance(obj, np.ndarray):
        arrays.append(obj)
        return {"a": len(arrays) - 1}
    if isinstance(obj, (bool, np.bool_)):
        return {"b": bool(obj)}
    if isinstance(obj, (int, np.integer)):
        return {"i": int(obj)}
    if isinstance(obj, (float, np.floating)):
        return {"f": float(obj)}
    if isinstance(obj, (tuple, list)):
        return {"t" if isinstance(obj, tuple) else "l": [_pack(v, arrays) for v in obj]}
    if obj is None:
        return None
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unpack(structure, arrays):
    if structure is None:
        return None
    (kind, value), = structure.items()
    if kind == "a":
        return arrays[value]
    if kind in ("t", "l"):
        items = [_unpack(v, arrays) for v in value]
        return tuple(items) if kind == "t" else items
    return {"b": bool, "i": int, "f": float}[kind](value)


def _record_digest(structure, arrays):
    return _digest([np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8), *arrays])


class _shipped:  # noqa: N801 (used as a function: ``with _shipped(obj, executor) as c``)
    """``obj`` as the tasks should carry it, so that workers receive its data once per call
    rather than once per task (pickled per task, a 10^8-cell X would cost 0.8 GB per fit):

    - ProcessPoolExecutor: its arrays are copied once into shared memory; the tasks carry the
      blocks' names, and each worker maps them once (`_Shared`);
    - dask.distributed (a ``Client``, or its ``get_executor()``): scattered to every worker
      once; the tasks carry a future, which dask resolves;
    - anything else as is (threads share the object; other executors pickle it per task).

    Once shipped, ``obj`` itself is not held: what a caller made for the tasks alone (X's
    transpose, `_carried_source`) is then freed in the caller's process.
    """

    def __init__(self, obj, executor):
        from concurrent.futures import ProcessPoolExecutor

        client = _dask_client(executor)
        if isinstance(executor, ProcessPoolExecutor):
            self.carried = _Shared(obj)
        elif client is not None:
            self.carried = client.scatter(obj, broadcast=True, hash=False)
        else:
            self.carried = obj
        self.release = getattr(self.carried, "release", None) if obj is not self.carried \
            else None

    def __enter__(self):
        return self.carried

    def __exit__(self, *exc_info):
        if self.release is not None:
            self.release()
        self.carried = self.release = None


class _Shared:
    """An object (array, sparse matrix, or a dataclass of them) whose arrays sit in shared
    memory: pickled, it is the blocks' names and shapes; a worker rebuilds it on read-only
    views of the blocks, once (`_attached`). An array that is already a block of this
    process's (`local`) is not copied again."""

    def __init__(self, obj):
        from multiprocessing import shared_memory

        self.template, arrays = _split_arrays(obj)
        self.specs, self.blocks = [], []
        for a in arrays:
            name = _SHARED_HERE.get(_address(a)) if a.nbytes else None
            if name is None:
                block = shared_memory.SharedMemory(create=True, size=max(a.nbytes, 1))
                self.blocks.append(block)
                view = np.ndarray(a.shape, a.dtype, buffer=block.buf)
                view[...] = a
                name = block.name
                if a.nbytes:
                    _SHARED_HERE[_address(view)] = name
            self.specs.append((name, a.shape, a.dtype.str))

    def __getstate__(self):
        return {"template": self.template, "specs": self.specs, "blocks": []}

    def local(self):
        """The object rebuilt on this process's read-only views of the blocks: a caller that
        keeps this instead of its own copy holds the data once, with its workers."""
        return _rebuilt(self.template, self.blocks, self.specs)

    def release(self):
        for block in self.blocks:
            for key in [key for key, name in _SHARED_HERE.items() if name == block.name]:
                del _SHARED_HERE[key]
            try:
                block.close()
            except BufferError:  # views of `local` still alive: closed at the process's end
                _STILL_MAPPED.append(block)
            block.unlink()
        self.blocks = []


_SHARED_HERE = {}  # this process's `_Shared` blocks: (address, bytes) -> name
_STILL_MAPPED = []


def _address(a):
    return a.__array_interface__["data"][0], a.nbytes


_ATTACHED = {}  # in a worker: names of a _Shared's blocks -> (blocks, rebuilt object)
_MAX_ATTACHED = 4


def _attached(shared):
    from multiprocessing import shared_memory

    key = tuple(name for name, _, _ in shared.specs)
    if key not in _ATTACHED:
        while len(_ATTACHED) >= _MAX_ATTACHED:  # the oldest call's data: done with it
            blocks, _ = _ATTACHED.pop(next(iter(_ATTACHED)))
            for block in blocks:
                with contextlib.suppress(BufferError):  # still referenced: closes with it
                    block.close()
        # Python >= 3.13: do not let this process's resource tracker unlink the caller's
        # blocks; on older Pythons a forked worker shares the caller's tracker, which does not.
        untracked = {"track": False} if sys.version_info >= (3, 13) else {}
        blocks = [shared_memory.SharedMemory(name=name, **untracked)
                  for name, _, _ in shared.specs]
        _ATTACHED[key] = (blocks, _rebuilt(shared.template, blocks, shared.specs))
    return _ATTACHED[key][1]


def _rebuilt(template, blocks, specs):
    """The object of ``template`` on read-only views of shared-memory ``blocks``."""
    arrays = []
    for block, (_, shape, dtype) in zip(blocks, specs, strict=True):
        a = np.ndarray(shape, np.dtype(dtype), buffer=block.buf)
        a.flags.writeable = False
        arrays.append(a)
    return _join_arrays(template, iter(arrays))


def _split_arrays(obj):
    """(template, arrays): obj's arrays in order, and how to put obj back together."""
    if isinstance(obj, np.ndarray):
        return ("array",), [obj]
    if sp.issparse(obj):
        obj = sp.csr_matrix(obj)
        return ("csr", obj.shape), [obj.data, obj.indices, obj.indptr]
    if isinstance(obj, tuple) and obj and all(isinstance(a, np.ndarray) for a in obj):
        return ("tuple", len(obj)), list(obj)  # `_Data.cells`
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        parts, arrays = [], []
        for f in dataclasses.fields(obj):
            template, more = _split_arrays(getattr(obj, f.name))
            parts.append((f.name, template))
            arrays += more
        return ("dataclass", type(obj), parts), arrays
    return ("value", obj), []


def _join_arrays(template, arrays):
    kind = template[0]
    if kind == "array":
        return next(arrays)
    if kind == "csr":
        data, indices, indptr = next(arrays), next(arrays), next(arrays)
        return sp.csr_matrix((data, indices, indptr), shape=template[1], copy=False)
    if kind == "tuple":
        return tuple(next(arrays) for _ in range(template[1]))
    if kind == "dataclass":
        return template[1](**{name: _join_arrays(t, arrays) for name, t in template[2]})
    return template[1]


def _resolve(value):
    """Task arguments with every `_Shared` (at any depth of tuples) rebuilt in this worker."""
    if isinstance(value, _Shared):
        return _attached(value)
    if isinstance(value, tuple):
        items = [_resolve(v) for v in value]
        return value._make(items) if hasattr(value, "_make") else tuple(items)  # a NamedTuple
    return value


_POOL_RESTARTS = 3  # new process pools one call may start after workers died
_REPLACEMENTS = weakref.WeakKeyDictionary()  # a broken ProcessPoolExecutor -> its replacement


@dataclass
class _Run:
    """How a call's tasks run: on ``executor`` (None: here, one after another), with a
    progress line (``progress``: True, False, or None for "when stderr is a terminal"), kept
    in ``checkpoint`` (a `_Checkpoint`, or None)."""

    executor: object = None
    progress: object = None
    checkpoint: object = None


def _map_tasks(function, args, run, label, partial=False, keep=None):
    """function(*a) for a in args, results in order, as ``run`` (a `_Run`) says; ``keep``:
    what to hold of each result as it arrives (all of it by default; the checkpoint records
    all of it).

    Reading a checkpoint for a report (read-only), nothing runs: a task not in it is None
    with ``partial``, else the stage raises `_Unfinished`.

    With a `_Checkpoint`, tasks it holds are read back instead of run and every finished task
    is recorded as it arrives. When a ProcessPoolExecutor's worker dies (the pool breaks),
    the unfinished tasks go to a new pool of the same size, up to _POOL_RESTARTS times;
    Ctrl-C cancels the queued tasks at once. Both then say how many tasks are done and how to
    resume. Progress goes to stderr (tqdm when installed, else one updating line);
    ``progress=None`` shows it only when stderr is a terminal."""
    from concurrent.futures.process import BrokenProcessPool

    executor, progress, checkpoint = run.executor, run.progress, run.checkpoint
    show = sys.stderr.isatty() if progress is None else bool(progress)
    name = re.sub(r"[^A-Za-z0-9]+", "_", label)
    results = [None] * len(args)
    todo = []
    for i in range(len(args)):
        out = None if checkpoint is None else checkpoint.load(name, i)
        if out is None:
            todo.append(i)
        else:
            results[i] = out if keep is None else keep(out)
    if checkpoint is not None and checkpoint.read_only:
        if todo and not partial:
            raise _Unfinished(label, len(args) - len(todo), len(args))
        return results
    bar = _Progress(label, len(args), len(args) - len(todo), show)
    try:
        for i, out in _run_tasks(function, args, todo, executor):
            if checkpoint is not None:
                checkpoint.save(name, i, out)
            results[i] = out if keep is None else keep(out)
            bar.update()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_stopped(label, "interrupted", bar, checkpoint)) from None
    except BrokenProcessPool as exc:
        raise RuntimeError(_stopped(label, f"worker processes died {_POOL_RESTARTS + 1} "
                                           f"times ({exc})", bar, checkpoint)) from None
    finally:
        bar.close()
    return results


def _run_tasks(function, args, todo, executor):
    """(index, output) of the tasks ``todo`` as they finish (see `_map_tasks`)."""
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    if executor is None:
        for i in todo:
            yield i, function(*args[i])
        return
    if _dask_client(executor) is executor:  # a Client: its concurrent.futures face
        executor = executor.get_executor()
    caller = os.getpid()
    pending, restarts = set(todo), 0
    while pending:
        current = _REPLACEMENTS.get(executor, executor) if _weakly(executor) else executor
        futures = {}
        try:
            for i in sorted(pending):
                futures[current.submit(_worker_task, function, args[i], caller)] = i
            for future in as_completed(futures):  # a finished task's future is let go:
                i = futures.pop(future)  # its result is the caller's to keep or drop
                out = future.result()
                pending.discard(i)
                yield i, out
        except BrokenProcessPool:
            restarts += 1
            if restarts > _POOL_RESTARTS:
                raise
            _replace_pool(executor, current)
        except BaseException:  # Ctrl-C, a failed task, the caller gone: drop the queue
            for future in futures:
                future.cancel()
            raise


def _weakly(executor):
    try:
        weakref.ref(executor)
    except TypeError:
        return False
    return True


def _replace_pool(executor, broken):
    """A new ProcessPoolExecutor of ``broken``'s size for the rest of ``executor``'s work,
    shut down when ``executor`` goes away."""
    from concurrent.futures import ProcessPoolExecutor

    fresh = ProcessPoolExecutor(*_pool_size_and_context(broken))
    if broken is not executor:
        broken.shutdown(wait=False, cancel_futures=True)
    _REPLACEMENTS[executor] = fresh
    weakref.finalize(executor, fresh.shutdown, False)


# Other libraries' internals, each read here only, with a fallback where it is missing.

def _pool_size_and_context(pool):
    """A ProcessPoolExecutor's worker count and multiprocessing context (private attributes:
    the pool has no public ones), else the CPU count and the default context."""
    return (getattr(pool, "_max_workers", None) or os.cpu_count() or 1,
            getattr(pool, "_mp_context", None))


def _terminate_workers(pool):
    """Stop a ProcessPoolExecutor's running tasks now: ``terminate_workers()`` (Python >=
    3.14), else each worker process (private ``_processes``); without either, they finish."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _dask_client(executor):
    """The dask.distributed Client behind ``executor`` (a Client, or its ``get_executor()``,
    which keeps its client private: ``_client``, else the current ``get_client()``), or
    None for any other executor."""
    distributed = sys.modules.get("distributed")
    if distributed is None or executor is None:
        return None
    if isinstance(executor, distributed.Client):
        return executor
    cfexecutor = sys.modules.get("distributed.cfexecutor")
    if cfexecutor is None or not isinstance(executor, cfexecutor.ClientExecutor):
        return None
    client = getattr(executor, "_client", None)
    return client if client is not None else distributed.get_client()


def _stopped(label, what, bar, checkpoint):
    text = f"{label}: {what}; {bar.done} of {bar.total} tasks of this stage are done"
    if checkpoint is None:
        return text + "; pass checkpoint=PATH (CLI: --checkpoint PATH) to keep finished tasks"
    return (text + f" and kept in the checkpoint {checkpoint.root}: call again with the same "
            "data, arguments and checkpoint to resume")


class _Progress:
    """Progress on stderr (tqdm when installed, else one updating line); tasks read back from
    a checkpoint count as done, and the label says how many. When stderr is not a terminal
    (a cluster job's log), a plain line each time another tenth of the fits is done or a
    minute has passed, never a redrawn bar."""

    def __init__(self, label, total, resumed, show):
        self.total, self.done, self.bar, self.show = total, resumed, None, show
        self.label = label + (f" ({resumed} resumed)" if resumed else "")
        self.lines = show and not sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.logged = resumed
        if not show:
            return
        if self.lines:
            self._log()
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._line()
            return
        self.bar = tqdm(total=total, initial=resumed, desc=self.label, unit="fit",
                        file=sys.stderr)

    def _line(self):
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} fits")
        sys.stderr.flush()

    def _log(self):
        self.last, self.logged = time.monotonic(), self.done
        sys.stderr.write(f"{self.label}: {self.done}/{self.total} fits "
                         f"({self.last - self.start:.0f} s)\n")
        sys.stderr.flush()

    def update(self):
        self.done += 1
        if self.lines:
            tenth = (self.done - self.logged) * 10 >= self.total
            if tenth or self.done == self.total or time.monotonic() - self.last >= 60:
                self._log()
        elif self.bar is not None:
            self.bar.update(1)
        elif self.show:
            self._line()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.show and not self.lines:
            sys.stderr.write("\n")


def _worker_task(function, args, caller_pid):
    """Run one task; in a worker process, first limit BLAS to one thread (once per process).

    Each worker runs one fit at a time, so BLAS threads in every worker only fight each other
    for the cores and a pool runs several times slower. The limit uses threadpoolctl, a
    dependency. Tasks run as threads of the caller's own process are left alone: a
    process-wide limit set from one thread would change the others'."""
    if os.getpid() != caller_pid:
        _limit_blas_threads()
    return function(*_resolve(args))


_BLAS_LIMITED = []


def _limit_blas_threads():
    if _BLAS_LIMITED:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a vendored copy without its dependency: run, but unlimited
        _BLAS_LIMITED.append(False)
        return
    threadpool_limits(limits=1, user_api="blas")
    _BLAS_LIMITED.append(True)


# =============================================================================================
# Consensus clustering: cophenetic correlation and dispersion
# =============================================================================================

@dataclass
class ConsensusResult:
    """Outcome of `consensus`.

    Attributes
    ----------
    ranks : ndarray (r,)
    consensus_matrices : dict
        rank -> (n, n) consensus matrix: the fraction of runs in which two samples share a
        cluster (each sample's cluster is the component with its largest loading).
    labels : dict
        rank -> (n_runs, n) cluster of every sample in every run.
    n_runs : ndarray (r,)
        Runs per rank (``n_runs="auto"`` gives more to the ranks that decide the pick).
    cophenetic : ndarray (r,)
        Cophenetic correlation of each consensus matrix (Brunet et al. 2004).
    cophenetic_se : ndarray (r,)
        Its standard error over the runs (`cophenetic_standard_error`): how far another
        ``random_state`` may move it. Ranks whose coefficients differ by less than about two
        of these are not told apart by the runs.
    dispersion : ndarray (r,)
        Dispersion coefficient of each consensus matrix (Kim & Park 2007).
    pac : ndarray (r,)
        Proportion of ambiguous clustering (Senbabaoglu et al. 2014): the share of consensus
        entries (pairs of distinct samples) strictly inside ``pac_interval``; lower is more
        stable. `proportion_ambiguous`.
    pac_interval : tuple
    best_rank : int
        See `best_cophenetic_rank` (``rule="first_drop"``).
    axis : str
        ``"columns"`` (samples are columns, clustered by H) or ``"rows"`` (by W).

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> res = nmf_cv.consensus(np.random.default_rng(0).random((30, 12)), [2, 3], n_runs=5,
    ...                        max_iter=50, random_state=0, progress=False)
    >>> res.consensus_matrices[2].shape, len(res.cophenetic)
    ((12, 12), 2)
    """

    ranks: np.ndarray
    consensus_matrices: dict
    labels: dict
    cophenetic: np.ndarray
    dispersion: np.ndarray
    best_rank: int
    axis: str = "columns"
    pac: np.ndarray = None
    pac_interval: tuple = (0.1, 0.9)
    cophenetic_se: np.ndarray = None
    n_runs: np.ndarray = None

    def __repr__(self):
        values = ", ".join(f"{k}: {c:.3f}" for k, c in zip(self.ranks, self.cophenetic,
                                                            strict=True))
        return f"ConsensusResult(cophenetic={{{values}}}, best_rank={self.best_rank})"


def consensus(X, ranks, *, n_runs=50, method="mu", loss="kl", axis="columns",
              stop=None, stable_iter=400, pac_interval=(0.1, 0.9), mask=None,
              random_state=None, executor=None, progress=None, checkpoint=None, **fit_kwargs):
    """Consensus clustering over random restarts (Brunet, Tamayo, Golub & Mesirov 2004).

    For each rank, ``n_runs`` fits from random inits each assign every sample to the component
    with its largest loading (column of H, or row of W with ``axis="rows"``); the consensus
    matrix is the mean of the runs' connectivity matrices. Its stability is summarised by
    the cophenetic correlation (`cophenetic_correlation`) and the dispersion coefficient
    (`dispersion_coefficient`).

    Parameters
    ----------
    X : array-like (m, n)
        Non-negative data, NaN = missing.
    ranks : iterable of int, each >= 2
    n_runs : int or "auto"
        Restarts per rank: default 50, Brunet et al.'s protocol. ``"auto"`` (`choose_rank`'s
        choice): 10 at every rank, then 10 more at a time, up to 50, at the ranks of each
        comparison that decides the pick (`best_cophenetic_rank`: whether consecutive
        coefficients differ by more than 0.001) and is within one standard error
        (``cophenetic_se``) of going the other way. Fewer runs give coefficients that err
        high at ranks where another clustering turns up now and then, so 10 runs alone move
        the pick on some seeds; "auto" gives the 50-run pick about as often as 50 runs do,
        in far less time (benchmarks/README.md,
        "bench_consensus_runs.py").
    method, loss : str
        Passed to `fit_nmf`; by default Brunet's choice, KL multiplicative updates.
        ``method="cd"`` fits the KL loss by coordinate descent instead (the CLI's choice with
        ``--loss kl``): similar coefficients on real data, but they can differ on small data,
        where it is also slower, so MU stays the default.
    axis : {"columns", "rows"}
        What is clustered: at most 20,000 samples, since a dense samples x samples matrix
        is kept per rank (more raise a ValueError before any fit).
    stop : {"connectivity", "objective", "max_iter"}, optional
        When a run ends; by default ``"connectivity"`` for ``method="mu"`` and
        ``"objective"`` otherwise (a coordinate-descent iteration does the work of many
        multiplicative ones, so counting 400 unchanged iterations would cost far more than
        convergence). ``"connectivity"`` (Brunet et al.'s rule): once its clustering has
        not changed for ``stable_iter`` iterations, checked every 10 iterations.
        ``"objective"``: `fit_nmf`'s rule (relative decrease below ``tol``). ``"max_iter"``:
        after exactly ``max_iter`` iterations. Only ``"objective"`` evaluates the objective,
        which for the KL loss costs a logarithm per cell and iteration (a large share of the
        iteration's time: bench_rank.py, section ``iteration``); the clustering is all that
        consensus keeps.
    stable_iter : int
        See ``stop``; a multiple of 10. Default 400, as Brunet et al.
    pac_interval : (float, float)
        The interval of ambiguous consensus values for ``pac`` (`proportion_ambiguous`).
    random_state, executor, progress, checkpoint
        As in `cross_validate`: each run has its own spawned seed; results do not depend on
        the executor; a checkpoint keeps finished runs across interruptions.
    **fit_kwargs
        Passed to `fit_nmf` (``init`` defaults to ``"random"``); ``max_iter`` defaults to
        2000, ``tol`` (used by ``stop="objective"`` only) to 1e-5.

    Returns
    -------
    ConsensusResult
    """
    data = _validate_data(X, mask, signal=True)
    _check_choice(axis, ("columns", "rows"), "axis")
    _check_consensus_size(data.shape, axis)
    ranks = _check_ranks(ranks, data.shape, minimum=2)
    if isinstance(n_runs, str):
        _check_choice(n_runs, ("auto",), "n_runs")
    else:
        _check_positive_int(n_runs, "n_runs")
    method = _resolve_method(method, loss)
    if stop is None:
        stop = "connectivity" if method == "mu" else "objective"
    _check_choice(stop, ("connectivity", "objective", "max_iter"), "stop")
    _check_positive_int(stable_iter, "stable_iter", minimum=10)
    if stable_iter % 10:
        raise ValueError(f"stable_iter must be a multiple of 10, got {stable_iter}")
    pac_interval = _check_interval(pac_interval)
    unknown = sorted(set(fit_kwargs) - {"init", "max_iter", "tol", "alpha_W", "alpha_H",
                                         "l1_ratio"})
    if unknown:
        raise TypeError(f"consensus() got unexpected keyword argument(s) {unknown}")
    fit_kwargs = {"init": "random", "max_iter": 2000, "tol": 1e-5, **fit_kwargs}
    Xc = _nan_copy(data)
    ckpt, root = _open_checkpoint(checkpoint, "consensus", data, random_state, ranks=ranks,
                                  n_runs=n_runs, method=method, loss=loss, axis=axis, stop=stop,
                                  stable_iter=stable_iter, fit_options=fit_kwargs)
    rule = {"connectivity": stable_iter, "objective": None, "max_iter": 0}[stop]
    run = _Run(executor, progress, ckpt)
    with _shipped(Xc, executor) as carried:
        def task(k, seed):
            return carried, int(k), seed, axis, method, loss, rule, fit_kwargs
        if n_runs == "auto":
            runs = _consensus_rounds(task, ranks, root, run)
        else:
            seeds = root.spawn(len(ranks) * n_runs)
            flat = _map_tasks(_consensus_task, [task(k, seeds[i * n_runs + r])
                                                for i, k in enumerate(ranks)
                                                for r in range(n_runs)], run, "consensus")
            runs = [np.array(flat[i * n_runs:(i + 1) * n_runs]) for i in range(len(ranks))]
    matrices = {int(k): _together(r) / len(r) for k, r in zip(ranks, runs, strict=True)}
    coph = np.array([cophenetic_correlation(matrices[int(k)]) for k in ranks])
    pac = np.array([proportion_ambiguous(matrices[int(k)], pac_interval) for k in ranks])
    return ConsensusResult(ranks, matrices, dict(zip(ranks.tolist(), runs, strict=True)), coph,
                           np.array([dispersion_coefficient(matrices[int(k)]) for k in ranks]),
                           best_cophenetic_rank(ranks, coph), axis, pac, pac_interval,
                           np.array([cophenetic_standard_error(r) for r in runs]),
                           np.array([len(r) for r in runs]))


_AUTO_RUNS = (10, 10, 50)  # consensus(n_runs="auto"): runs per rank first, per round, at most


def _consensus_rounds(task, ranks, root, run):
    """Each rank's runs (n_runs, n) for ``n_runs="auto"``: rounds of `_consensus_task`s,
    ``task(k, seed)`` giving one's arguments, until `_undecided_ranks` names none. Run r
    of rank i always has the seed root.spawn(len(ranks))[i].spawn(most)[r], whatever the
    rounds, and a round's runs depend only on the earlier rounds' clusterings, so a
    checkpoint resumes it round for round."""
    first, step, most = _AUTO_RUNS
    seeds = [s.spawn(most) for s in root.spawn(len(ranks))]
    runs, wanted, round_ = [[] for _ in ranks], np.full(len(ranks), first), 0
    coph, se = np.zeros(len(ranks)), np.zeros(len(ranks))  # of each rank's runs so far
    while True:
        todo = [(i, r) for i in range(len(ranks)) for r in range(len(runs[i]), wanted[i])]
        if not todo:
            return [np.array(r) for r in runs]
        round_ += 1
        done = _map_tasks(_consensus_task, [task(ranks[i], seeds[i][r]) for i, r in todo],
                          run, f"consensus round {round_}")
        for (i, _), labels in zip(todo, done, strict=True):
            runs[i].append(labels)
        for i in {i for i, _ in todo}:
            r = np.array(runs[i])
            coph[i] = cophenetic_correlation(_together(r) / len(r))
            se[i] = cophenetic_standard_error(r)
        more = _undecided_ranks(coph, se) & (wanted < most)
        wanted[more] += step


def _undecided_ranks(coph, se):
    """bool (r,): of consecutive ranks' cophenetic coefficients ``coph`` and their standard
    errors ``se`` (`cophenetic_standard_error`), the ranks of the comparisons the pick rests on
    (`best_cophenetic_rank`: each consecutive pair up to the first drop, every pair when none
    drops) that lie within one standard error (the two ranks' combined) of the rule's
    threshold, so that more runs could turn them."""
    drops = coph[:-1] - coph[1:]
    falling = np.flatnonzero(drops > _FIRST_DROP)
    last = falling[0] if len(falling) else len(drops) - 1
    near = np.abs(drops - _FIRST_DROP) <= np.hypot(se[:-1], se[1:])
    undecided = np.zeros(len(coph), dtype=bool)
    for i in np.flatnonzero(near[:last + 1]):
        undecided[i:i + 2] = True
    return undecided


def cophenetic_correlation(C):
    """Cophenetic correlation of a consensus matrix C (Brunet et al. 2004).

    Average-linkage hierarchical clustering of the distance ``1 - C``; the Pearson correlation
    between those distances and the dendrogram's cophenetic distances (the height at which two
    samples first join), over all pairs. 1 means a perfectly stable clustering; a matrix whose
    distances are all equal (nothing to correlate) also gives 1 when the dendrogram reproduces
    it exactly.

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> labels = np.array([0, 0, 1, 1, 1])
    >>> nmf_cv.cophenetic_correlation((labels[:, None] == labels).astype(float))
    1.0
    """
    from scipy.cluster.hierarchy import linkage

    d = _consensus_distances(C)
    if len(d) == 0:
        raise ValueError("a consensus matrix needs at least 2 samples")
    coph = _cophenetic_distances(linkage(d, method="average"), len(C))
    if np.allclose(d, coph, rtol=0, atol=1e-12):
        return 1.0
    if np.ptp(d) == 0 or np.ptp(coph) == 0:
        return 0.0
    return float(np.corrcoef(d, coph)[0, 1])


def cophenetic_standard_error(labels, n_groups=10):
    """Standard error of the cophenetic correlation of the runs' consensus matrix, over the
    runs: a grouped jackknife (Efron & Tibshirani 1993, ch. 11). The runs are dealt into
    ``n_groups`` groups (run r into group r mod n_groups; one group per run when there are
    fewer runs), each group is left out in turn, and the spread of the coefficients of the
    consensus matrices that remain gives the error. 0 when every run gives the same
    clustering; nan for fewer than 3 runs.

    Parameters
    ----------
    labels : array-like of int (n_runs, n)
        Each run's cluster of every sample (`ConsensusResult.labels`).
    n_groups : int
        Default 10: ten coefficients are enough for the spread, and each costs a
        hierarchical clustering.

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> same = np.tile([0, 0, 1, 1, 1], (12, 1))       # every run the same clustering
    >>> float(nmf_cv.cophenetic_standard_error(same))
    0.0
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (n_runs, n); got shape {labels.shape}")
    _check_positive_int(n_groups, "n_groups", minimum=2)
    R = len(labels)
    if R < 3:
        return math.nan
    G = min(n_groups, R)
    total = _together(labels)
    left_out = np.array([cophenetic_correlation((total - _together(labels[g::G]))
                                                / (R - len(labels[g::G]))) for g in range(G)])
    return float(np.sqrt((G - 1) / G * np.sum((left_out - left_out.mean()) ** 2)))


# Most samples `consensus` clusters: it keeps a dense samples x samples matrix per rank (at
# 20,000 samples, 3.2 GB each), as Brunet et al.'s consensus matrix is.
_CONSENSUS_MAX_SAMPLES = 20_000


def _check_consensus_size(shape, axis):
    """Refuse, in one line, a consensus over more samples than _CONSENSUS_MAX_SAMPLES."""
    n = shape[1 if axis == "columns" else 0]
    if n > _CONSENSUS_MAX_SAMPLES:
        raise ValueError(f"consensus clusters the {n} {axis} of X: a {n} x {n} matrix per "
                         f"rank ({8e-9 * n * n:.0f} GB); cluster a subsample of at most "
                         f"{_CONSENSUS_MAX_SAMPLES}, or leave it out (criteria without "
                         "'cophenetic')")


def _together(runs):
    """int32 (n, n): in how many of the runs (each a row of cluster labels) two samples
    share a cluster. One matrix at a time: a consensus over thousands of samples is large."""
    counts = np.zeros((runs.shape[1], runs.shape[1]), dtype=np.int32)
    for run in runs:
        counts += run[:, None] == run[None, :]
    return counts


def dispersion_coefficient(C):
    """Dispersion of a consensus matrix (Kim & Park 2007): ``sum 4 (C_ij - 1/2)^2 / n^2``.

    1 when every entry is 0 or 1 (perfectly stable); lower when entries sit near 1/2.

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> nmf_cv.dispersion_coefficient(np.eye(3))
    1.0
    """
    C = np.asarray(C, dtype=float)
    return float(np.sum(4.0 * (C - 0.5) ** 2) / C.size)


def proportion_ambiguous(C, interval=(0.1, 0.9)):
    """PAC of a consensus matrix (Senbabaoglu, Michailidis & Li 2014): the fraction of pairs
    of distinct samples whose consensus lies strictly inside ``interval``. 0 when every pair
    is always or never together; lower is more stable. Unlike the cophenetic coefficient it
    does not saturate near 1 when a few samples are ambiguous.

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> C = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.95], [0.0, 0.95, 1.0]])
    >>> nmf_cv.proportion_ambiguous(C)   # one pair of three at 0.5
    0.3333333333333333
    """
    lo, hi = _check_interval(interval)
    C = np.asarray(C, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or len(C) < 2:
        raise ValueError(f"a consensus matrix must be square with >= 2 samples; got shape "
                         f"{C.shape}")
    rows, cols = np.triu_indices(len(C), k=1)
    values = C[rows, cols]
    return float(np.mean((values > lo) & (values < hi)))


COPHENETIC_RULES = ("first_drop", "largest_drop", "pac")
_FIRST_DROP = 0.001  # best_cophenetic_rank's "first_drop": a fall above this is a drop


def best_cophenetic_rank(ranks, cophenetic, rule="first_drop", min_drop=None, pac=None):
    """The rank that consensus clustering suggests, by one of the rules in the literature.

    ``rule="first_drop"`` (default): the first rank after which the cophenetic coefficient
    starts to fall, i.e. the smallest k whose next rank's coefficient is lower by more than
    ``min_drop`` (default 0.001, above the run-to-run noise of a stable coefficient). This
    is Brunet et al. (2004) as R's NMF package reads it ("the first value of k for which the
    cophenetic coefficient starts decreasing"). When the coefficient decays steadily, as it
    usually does (more ranks, more local minima), this keeps the smallest stable rank.

    ``rule="largest_drop"``: the rank just before the largest drop between consecutive ranks
    (``min_drop`` default 0.01); it lands on the larger rank of a steadily decaying curve.

    ``rule="pac"``: the rank with the lowest ``pac`` (`proportion_ambiguous`; Senbabaoglu et
    al. 2014), the smallest on ties.

    For either drop rule, when no drop exceeds ``min_drop`` (a flat or rising curve), the
    rank with the highest coefficient (the smallest such rank on ties).

    Examples
    --------
    >>> import nmf_cv
    >>> coph = [0.9993, 0.9964, 0.9886, 0.9714]     # steadily decaying, k = 2..5
    >>> nmf_cv.best_cophenetic_rank([2, 3, 4, 5], coph)
    2
    >>> nmf_cv.best_cophenetic_rank([2, 3, 4, 5], coph, rule="largest_drop")
    4
    >>> nmf_cv.best_cophenetic_rank([2, 3, 4, 5], coph, rule="pac", pac=[0.2, 0.05, 0.1, 0.3])
    3
    """
    _check_choice(rule, COPHENETIC_RULES, "rule")
    ranks = np.asarray(ranks)
    if rule == "pac":
        if pac is None:
            raise ValueError("rule='pac' needs pac (ConsensusResult.pac)")
        pac = np.asarray(pac, dtype=float)
        if pac.shape != ranks.shape:
            raise ValueError(f"pac has shape {pac.shape}; ranks {ranks.shape}")
        return int(ranks[int(np.argmin(pac))])
    cophenetic = np.asarray(cophenetic, dtype=float)
    if cophenetic.shape != ranks.shape:
        raise ValueError(f"cophenetic has shape {cophenetic.shape}; ranks {ranks.shape}")
    if min_drop is None:
        min_drop = _FIRST_DROP if rule == "first_drop" else 0.01
    drops = cophenetic[:-1] - cophenetic[1:]
    falling = np.flatnonzero(drops > min_drop)
    if len(falling):
        at = falling[0] if rule == "first_drop" else int(np.argmax(drops))
        return int(ranks[at])
    return int(ranks[int(np.argmax(cophenetic))])


def _check_interval(interval):
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"pac_interval must be two numbers (lo, hi); got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"pac_interval must satisfy 0 <= lo < hi <= 1; got {interval!r}")
    return lo, hi


def _consensus_distances(C):
    """Condensed 1 - C, symmetrised and clipped to [0, 1]."""
    C = np.asarray(C, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"a consensus matrix must be square; got shape {C.shape}")
    rows, cols = np.triu_indices(len(C), k=1)
    return np.clip(1.0 - 0.5 * (C[rows, cols] + C[cols, rows]), 0.0, 1.0)


def _cophenetic_distances(Z, n):
    """Condensed cophenetic distances from a linkage matrix: every pair joined by merge i
    gets that merge's height."""
    members = [[i] for i in range(n)]
    out = np.zeros(n * (n - 1) // 2)
    for a, b, height, _ in Z:
        left, right = np.array(members[int(a)]), np.array(members[int(b)])
        i = np.minimum(left[:, None], right[None, :])
        j = np.maximum(left[:, None], right[None, :])
        out[(n * i - i * (i + 1) // 2 + j - i - 1).ravel()] = height
        members.append(members[int(a)] + members[int(b)])
    return out


def _consensus_task(X, k, seed, axis, method, loss, stable_iter, fit_kwargs):
    """One run's clustering. ``stable_iter``: None stops by the objective (`fit_nmf`), 0 runs
    ``max_iter`` iterations, else Brunet's rule (clustering unchanged that long)."""
    if stable_iter is None:
        res = fit_nmf(X, k, method=method, loss=loss, random_state=seed, **fit_kwargs)
        return _clusters(res.W, res.H, axis)
    solver = _setup_fit(_validate_data(X), k, _FitOptions(
        method=method, loss=loss, random_state=seed, **{**fit_kwargs, "tol": 0.0}))
    labels, unchanged = None, 0
    for n_iter in range(1, fit_kwargs["max_iter"] + 1):
        solver.step(want_loss=False)
        if stable_iter == 0 or n_iter % 10:
            continue
        current = _clusters(*solver.views(), axis)
        same = labels is not None and np.array_equal(current, labels)
        unchanged = unchanged + 10 if same else 0
        labels = current
        if unchanged >= stable_iter:
            break
    return _clusters(*solver.views(), axis)


def _clusters(W, H, axis):
    return np.argmax(H, axis=0) if axis == "columns" else np.argmax(W, axis=1)


# =============================================================================================
# Component stability across runs, and consensus components at one rank (as cNMF and NMFk)
# =============================================================================================

_STABLE_SILHOUETTE = 0.7  # stability's default threshold on the worst group's silhouette


@dataclass
class StabilityResult:
    """Outcome of `stability`.

    Attributes
    ----------
    ranks : ndarray (r,)
    silhouette : ndarray (r,)
        Mean silhouette (cosine distance) of all runs' unit-norm components, clustered into
        k groups with one component of every run in each group.
    min_silhouette : ndarray (r,)
        The worst group's mean silhouette: what the rule reads, since one component that
        does not reproduce is enough to make a rank unstable.
    cluster_silhouettes : dict
        rank -> (k,) mean silhouette of each group.
    similarity : ndarray (r,)
        Matched-component similarity: over every pair of runs, the mean cosine similarity of
        their components paired one to one (Hungarian matching), averaged over the pairs.
        ``1 - similarity`` is staNMF's instability index (with cosine for correlation).
    error : ndarray (r,)
        Mean relative reconstruction error ``|X - WH| / |X|`` (observed cells) of the runs.
    errors : ndarray (r, n_runs)
    components : dict
        rank -> (k, d) the groups' mean components (unit norm): the consensus components,
        over the rows of X (W's columns) for ``axis="columns"``, over its columns (H's rows)
        for ``axis="rows"``.
    labels : dict
        rank -> (n_runs, k) the group of each run's components.
    threshold : float
    best_rank : int
        The largest rank whose ``min_silhouette`` is at least ``threshold``; the smallest
        rank tried when none is.
    axis : str

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(60, 40, 3, noise=0.05, random_state=0)
    >>> res = nmf_cv.stability(X, [2, 3, 4], n_runs=6, random_state=0, progress=False)
    >>> res.best_rank, res.components[3].shape
    (3, (3, 60))
    """

    ranks: np.ndarray
    silhouette: np.ndarray
    min_silhouette: np.ndarray
    cluster_silhouettes: dict
    similarity: np.ndarray
    error: np.ndarray
    errors: np.ndarray
    components: dict
    labels: dict
    threshold: float
    best_rank: int
    axis: str = "columns"

    def __repr__(self):
        values = ", ".join(f"{k}: {s:.3f}" for k, s in zip(self.ranks, self.min_silhouette,
                                                           strict=True))
        return f"StabilityResult(min_silhouette={{{values}}}, best_rank={self.best_rank})"


def stability(X, ranks, *, n_runs=20, threshold=_STABLE_SILHOUETTE, axis="columns",
              bootstrap=True, method=None, loss="frobenius", mask=None, random_state=None,
              executor=None, progress=None, checkpoint=None, **fit_kwargs):
    """How reproducible the components are across runs, per rank (as cNMF and NMFk).

    For each rank, ``n_runs`` fits from random inits, each on a resample of the samples
    drawn with replacement (``bootstrap``), give ``k`` components each, scaled to unit
    norm. Each run's components are paired one to one with k groups (Hungarian matching to
    the groups' mean components, repeated until no pairing changes, starting from the run
    with the lowest error), and the silhouette of that clustering under the cosine distance
    says how well the groups separate: near 1 when every run finds the same k components,
    low or negative when some component comes out differently from run to run. Below the
    data's rank, components merge in different ways; above it, a component splits in
    different ways; both show as a group with a low silhouette. The rule takes the largest
    rank whose worst group still reproduces, as NMFk does; the reconstruction error per rank
    (``error``) is there to plot beside it, as cNMF users choose k from both.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix (m, n)
        Non-negative data, NaN = missing.
    ranks : iterable of int, each >= 2
    n_runs : int >= 2
        Fits per rank (default 20).
    threshold : float
        The rule's bound on the worst group's mean silhouette (default 0.7). With bootstrap
        on planted data the worst silhouette falls far below it past the true rank and stays
        above it at the true rank, unless there are too few samples to resample: the pick
        then falls short of the truth, not above it.
    axis : {"columns", "rows"}
        Where the samples are, as in `consensus`: ``"columns"`` (genes x samples) compares
        the columns of W, profiles over X's rows; ``"rows"`` (samples x features, as in
        scikit-learn and cNMF) compares the rows of H. Bootstrap resamples the samples.
    bootstrap : bool
        Fit each run to a resample (with replacement) of the samples, so that the
        components must reproduce across data as well as across inits. On by default
        because fixed data often have one optimum per rank whatever the rank: from random
        inits alone even uniform noise reproduces at several ranks (``False`` is what cNMF
        measures; expect it to read high).
    method, loss, mask
        As in `fit_nmf`.
    random_state, executor, progress, checkpoint
        As in `cross_validate`: each run has its own spawned seed; results do not depend on
        the executor; a checkpoint keeps finished runs across interruptions.
    **fit_kwargs
        Passed to `fit_nmf`: ``init`` defaults to ``"random"``, ``max_iter`` to 2000, ``tol``
        to 1e-6, and HALS and KL coordinate-descent runs are extrapolated (``extrapolate``).
        Runs stopped short of convergence differ for that reason alone and lower the
        silhouette, hence the tight tolerance (looser ones lower it at the true rank).

    Returns
    -------
    StabilityResult

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(60, 40, 3, noise=0.05, random_state=0)
    >>> nmf_cv.stability(X, [2, 3, 4], n_runs=6, random_state=0, progress=False).best_rank
    3
    """
    data = _validate_data(X, mask, signal=True)
    _check_choice(axis, ("columns", "rows"), "axis")
    ranks = _check_ranks(ranks, data.shape, minimum=2)
    _check_positive_int(n_runs, "n_runs", minimum=2)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    method = _resolve_method(method, loss)
    fit_kwargs = _rank_fit_kwargs(method, loss, {"init": "random", **fit_kwargs})
    Xc = _nan_copy(data)
    ckpt, root = _open_checkpoint(checkpoint, "stability", data, random_state, ranks=ranks,
                                  n_runs=n_runs, axis=axis, bootstrap=bootstrap,
                                  method=method, loss=loss, fit_options=fit_kwargs)
    seeds = root.spawn(len(ranks) * n_runs)
    groups, errors, similarity = [], [], []
    with _shipped(Xc, executor) as carried:
        for i, k in enumerate(ranks):  # rank by rank: only one rank's components at a time
            args = [(carried, int(k), seeds[i * n_runs + r], axis, bootstrap, method, loss,
                     fit_kwargs) for r in range(n_runs)]
            runs = _map_tasks(_stability_task, args, _Run(executor, progress, ckpt),
                              f"stability k={k}")
            comps = np.array([c for c, _ in runs])
            errors.append([e for _, e in runs])
            groups.append(_match_runs(comps, errors[-1]))
            similarity.append(_matched_similarity(comps))
    min_sil = np.array([g.silhouettes.min() for g in groups])
    stable = np.flatnonzero(min_sil >= threshold)
    best = int(ranks[stable[-1]]) if len(stable) else int(ranks[0])
    errors = np.array(errors)
    return StabilityResult(
        ranks, np.array([g.silhouette for g in groups]), min_sil,
        {int(k): g.silhouettes for k, g in zip(ranks, groups, strict=True)},
        np.array(similarity), errors.mean(axis=1), errors,
        {int(k): g.centres for k, g in zip(ranks, groups, strict=True)},
        {int(k): g.labels for k, g in zip(ranks, groups, strict=True)}, threshold, best, axis)


def silhouette_samples_cosine(points, labels):
    """Silhouette of every point under the cosine distance ``1 - cos(p, q)``.

    For point i in group c: ``a`` is its mean distance to the other points of c, ``b`` the
    smallest mean distance to the points of another group, and ``s = (b - a) / max(a, b)``
    (0 for a point alone in its group), as Rousseeuw (1987) defines it. Computed from the
    groups' sums of unit vectors, never forming the points' distance matrix.

    Parameters
    ----------
    points : ndarray (N, d)
    labels : ndarray of int (N,), values 0..g-1, at least two groups

    Returns
    -------
    ndarray (N,)

    Examples
    --------
    >>> import numpy as np, nmf_cv
    >>> P = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> nmf_cv.silhouette_samples_cosine(P, np.array([0, 0, 1, 1])).round(3)
    array([0.994, 0.993, 0.994, 0.993])
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or labels.shape != (len(points),):
        raise ValueError(f"points must be (N, d) and labels (N,); got {points.shape} and "
                         f"{labels.shape}")
    g = int(labels.max()) + 1
    if labels.min() < 0 or g < 2:
        raise ValueError("labels must be 0..g-1 with at least two groups")
    unit = _unit_rows(points)  # a zero vector stays 0: distance 1 to everything
    onehot = np.zeros((len(points), g))
    onehot[np.arange(len(points)), labels] = 1.0
    sizes = onehot.sum(axis=0)
    sums = np.maximum(sizes[None, :] - unit @ (onehot.T @ unit).T, 0.0)  # sum of distances
    own = np.arange(len(points)), labels
    sums[own] -= np.maximum(1.0 - np.einsum("ij,ij->i", unit, unit), 0.0)  # minus the self
    alone = sizes[labels] == 1
    a = sums[own] / np.maximum(sizes[labels] - 1, 1)
    others = sums / np.where(sizes > 0, sizes, np.inf)[None, :]
    others[own] = np.inf
    b = others.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    return np.where(alone | ~np.isfinite(s), 0.0, s)


def _stability_task(X, k, seed, axis, bootstrap, method, loss, fit_kwargs):
    """One run: its (k, d) unit-norm components and relative error."""
    res = None
    if bootstrap:
        rng = np.random.default_rng(_child_seed(seed, 0))
        seed = _child_seed(seed, 1)
        if _RowResample.serves(X, axis, method, loss, fit_kwargs):
            res = _RowResample(X, _bootstrap_pick(X.shape[0], rng)).fit(k, method, seed,
                                                                         fit_kwargs)
        else:
            X = _resample(X, axis, rng)
    if res is None:
        res = fit_nmf(X, k, method=method, loss=loss, random_state=seed, **fit_kwargs)
    comps = np.asarray(res.W.T if axis == "columns" else res.H, dtype=np.float64)
    return _unit_rows(comps), float(res.relative_error)


def _bootstrap_pick(n, rng):
    """n of range(n) drawn with replacement, sorted."""
    return np.sort(rng.integers(0, n, n))


def _resample(X, axis, rng):
    """X with its samples (columns or rows) drawn with replacement; drawn again (up to 20
    times) while some line would have no observed cell."""
    n = X.shape[1 if axis == "columns" else 0]
    for _ in range(20):
        pick = _bootstrap_pick(n, rng)
        Y = X[:, pick] if axis == "columns" else X[pick]
        if sp.issparse(Y) or not np.isnan(Y).all(axis=1 if axis == "columns" else 0).any():
            return Y
    raise ValueError("bootstrap resamples keep leaving a line with no observed cell: too "
                     "many missing cells for bootstrap=True")


class _RowResample:
    """A bootstrap resample of a sparse X's rows, X[pick], as KL coordinate descent fits it
    without copying those rows (the consensus runs of `fit_nmf` on counts): the row updates
    read them in X itself (a `_RuleArrays` whose row r is X's row pick[r]), and only the
    resample's transpose, which the column updates read, is made (`_picked_transpose`): one
    copy of its entries where X[pick] and its transpose were two. The fit is that of X[pick]
    step for step; its mean (the random init's scale) and relative error are summed in
    another order."""

    def __init__(self, X, pick):
        self.X, self.pick = X, pick
        self.shape, self.dtype = (len(pick), X.shape[1]), X.dtype
        self.Xt = _picked_transpose(X, pick)

    @staticmethod
    def serves(X, axis, method, loss, fit_kwargs):
        """Whether a run on X can be fitted this way: rows of sparse X, KL coordinate
        descent from a random init."""
        return (sp.issparse(X) and axis == "rows" and loss == "kl"
                and _resolve_method(method, loss) == "cd"
                and isinstance(fit_kwargs.get("init"), str) and fit_kwargs["init"] == "random"
                and X.nnz < 2 ** 31
                and set(fit_kwargs) <= {f.name for f in dataclasses.fields(_FitOptions)})

    def fit(self, k, method, random_state, fit_kwargs):
        """`fit_nmf` of X[pick] with these options."""
        kw = dict(fit_kwargs)
        max_iter, tol = _iterations(kw.pop("max_iter", None), kw.pop("tol", None), 1)
        return _fit(self, k, _FitOptions(method=method, loss="kl", max_iter=max_iter,
                                         tol=tol, random_state=random_state, **kw))

    def observed_mean(self):
        return float(self.Xt.sum(dtype=np.float64)) / (self.shape[0] * self.shape[1])

    def solver(self, W, H, method, loss, penalty, update_H=True):
        X, (p, q) = self.X, self.shape
        none = np.zeros(0, dtype=np.int64)
        rows = _RuleArrays(np.zeros((0, 0), dtype=self.dtype), X.indptr[self.pick],
                           X.indptr[self.pick + 1], X.indices, X.data,
                           np.zeros(p, dtype=np.int64), np.ones(q, dtype=np.int64), none, none)
        return _KLCDSolver(_KLLines(rows), _KLLines(_all_cells(self.Xt)), W, H, penalty,
                           update_H)

    def relative_error(self, W, H):
        return _Data(self.Xt.shape, self.dtype, sparse=self.Xt).relative_error(H.T, W.T)


def _picked_transpose(X, pick):
    """X[pick].T as CSR (int32 indices), made from X's rows without making X[pick]."""
    ptr, idx, vals = _picked_transpose_arrays(X.indptr, X.indices, X.data, pick, X.shape[1])
    return sp.csr_matrix((vals, idx, ptr.astype(np.int32)), shape=(X.shape[1], len(pick)))


@_jit()
def _picked_transpose_arrays(indptr, indices, data, pick, n):
    """CSR arrays (indptr, indices, values) of X[pick].T, each line's cells in row order."""
    ptr = np.zeros(n + 1, dtype=np.int64)
    for r in range(pick.shape[0]):
        for q in range(indptr[pick[r]], indptr[pick[r] + 1]):
            ptr[indices[q] + 1] += 1
    for j in range(n):
        ptr[j + 1] += ptr[j]
    idx = np.empty(ptr[n], dtype=np.int32)
    vals = np.empty(ptr[n], dtype=data.dtype)
    fill = ptr[:n].copy()
    for r in range(pick.shape[0]):
        for q in range(indptr[pick[r]], indptr[pick[r] + 1]):
            j = indices[q]
            idx[fill[j]] = r
            vals[fill[j]] = data[q]
            fill[j] += 1
    return ptr, idx, vals


@dataclass
class _Matching:
    """One rank's runs, their components paired one to one into k groups (`_match_runs`).

    ``order[r, g]`` is run r's component in group g; ``silhouettes`` (k,) each group's mean
    silhouette under the cosine distance, ``silhouette`` the mean over all components;
    ``centres`` (k, d) the groups' unit-norm mean components."""

    order: np.ndarray
    silhouettes: np.ndarray
    silhouette: float
    centres: np.ndarray

    @property
    def labels(self):
        """(R, k): the group of each run's components."""
        return np.argsort(self.order, axis=1)

    def matched(self, comps):
        """comps (R, k, d) reordered so that ``[r, g]`` is run r's component in group g."""
        return comps[np.arange(len(comps))[:, None], self.order]


def _match_runs(comps, errors):
    """Match the runs' unit-norm components comps (R, k, d), starting from the run with the
    lowest error, and measure how well the groups separate."""
    R, k, _ = comps.shape
    order = _match_to_groups(comps, int(np.argmin(errors)))
    labels = np.argsort(order, axis=1)
    s = silhouette_samples_cosine(comps.reshape(R * k, -1), labels.ravel())
    per_group = np.bincount(labels.ravel(), weights=s, minlength=k) / R
    centres = _unit_rows(comps[np.arange(R)[:, None], order].mean(axis=0))
    return _Matching(order, per_group, float(s.mean()), centres)


def _match_to_groups(comps, first):
    """order (R, k): order[r, g] = run r's component in group g, each run's components
    paired one to one with the groups' means by Hungarian matching until nothing moves."""
    from scipy.optimize import linear_sum_assignment

    R, k, _ = comps.shape
    centres = comps[first]
    order = np.full((R, k), -1)
    for _ in range(100):
        new = np.empty_like(order)
        for r in range(R):
            rows, cols = linear_sum_assignment(-(centres @ comps[r].T))
            new[r, rows] = cols
        if np.array_equal(new, order):
            break
        order = new
        centres = _unit_rows(comps[np.arange(R)[:, None], order].mean(axis=0))
    return order


def _matched_similarity(comps):
    """Mean over pairs of runs of the mean cosine of their components matched one to one."""
    from scipy.optimize import linear_sum_assignment

    R = len(comps)
    total = 0.0
    for r in range(R):
        for q in range(r + 1, R):
            cos = comps[r] @ comps[q].T
            rows, cols = linear_sum_assignment(-cos)
            total += cos[rows, cols].mean()
    return total / (R * (R - 1) / 2)


def _unit_rows(A):
    """A's rows scaled to unit length (zero rows left as they are)."""
    norms = np.linalg.norm(A, axis=1)
    return A / np.where(norms > 0, norms, 1.0)[:, None]


# consensus components: what fit_nmf(X, k, n_runs=R) returns ---------------------------------

# Consensus runs fit bootstrap resamples of the rows: on all of X, runs from random inits
# agree on components that the data do not determine (uniform noise, ranks above the data's
# on heavy-tailed data), so their stability reads high; see benchmarks/README.md,
# "bench_consensus.py".
_CONSENSUS_BOOTSTRAP = True
_OUTLIER_RUN_MADS = 3.0  # a run this many (scaled) MADs below the runs' median agreement ...
_OUTLIER_RUN_SLACK = 0.01  # ... and this far in cosine below it is an outlier


def _consensus_fit(data, k, options, n_runs, run, start=None):
    """Consensus components of ``n_runs`` runs (`fit_nmf` with ``n_runs > 1``)."""
    start = time.perf_counter() if start is None else start
    compiled = _COMPILING.seconds
    k = _check_n_components(k, data.shape)
    method = _check_options(options.method, options.loss, options.max_iter, options.tol,
                            options.alpha_W, options.alpha_H, options.l1_ratio)
    shape, rate = _check_gamma_prior(options.gamma_prior, method, options.loss)
    if not isinstance(options.init, str):
        raise ValueError("init=(W, H) starts a single fit; consensus runs (n_runs > 1) each "
                         "start from their own random init")
    fit_kwargs = {name: value for name, value in dataclasses.asdict(options).items()
                  if name not in ("method", "loss", "random_state")}
    fit_kwargs["init"] = "random"
    ckpt, root = _open_checkpoint(run.checkpoint, "fit", data, options.random_state, k=k,
                                  n_runs=n_runs, bootstrap=_CONSENSUS_BOOTSTRAP,
                                  method=method, loss=options.loss, fit_options=fit_kwargs)
    seeds = root.spawn(n_runs)
    with _shipped(_nan_copy(data), run.executor) as carried:
        args = [(carried, k, seeds[r], "rows", _CONSENSUS_BOOTSTRAP, method, options.loss,
                 fit_kwargs) for r in range(n_runs)]
        runs = _map_tasks(_stability_task, args, _Run(run.executor, run.progress, ckpt),
                          f"consensus k={k}")
    comps = np.array([c for c, _ in runs])
    errors = np.array([e for _, e in runs])
    keep = _typical_runs(_match_runs(comps, errors), comps)
    matching = _match_runs(comps[keep], errors[keep])
    H = np.median(matching.matched(comps[keep]), axis=0)
    W = _refit_W(data, H, method, options.loss, _penalty_of(options, shape, rate, False),
                 options.max_iter, min(options.tol, 1e-6)).W
    res = _fit(data, k, dataclasses.replace(options, init=(W, H)), start=start)  # the polish
    W, H = res.W, res.H
    scale = np.maximum(H.sum(axis=1), 1e-300)
    order = np.argsort(-W.sum(axis=0) * scale, kind="stable")  # the largest usage first
    res.W = np.ascontiguousarray(W[:, order] * scale[order])
    res.H = np.ascontiguousarray(H[order] / scale[order, None])
    res.component_stability = matching.silhouettes[order]
    res.n_runs, res.n_runs_kept = n_runs, int(keep.sum())
    res.time = time.perf_counter() - start
    res.compile_time = _COMPILING.seconds - compiled
    return res


def _typical_runs(matching, comps):
    """bool (R,): the runs kept for the consensus. A run's agreement is the mean cosine of
    its components to their groups' centres; a run far below the runs' median agreement
    (an init that fell into another optimum) is an outlier and dropped."""
    agreement = np.einsum("rgd,gd->r", matching.matched(comps), matching.centres) / comps.shape[1]
    median = np.median(agreement)
    spread = 1.4826 * np.median(np.abs(agreement - median))
    return agreement >= median - max(_OUTLIER_RUN_MADS * spread, _OUTLIER_RUN_SLACK)


# =============================================================================================
# RSS against randomized data (Frigyesi & Hoglund 2008)
# =============================================================================================

@dataclass
class RandomizedRSSResult:
    """Outcome of `randomized_rss`.

    Attributes
    ----------
    ranks : ndarray (r,)
    rss : ndarray (r,)
        Residual sum of squares of the data's fit at each rank (observed cells).
    rss_randomized : ndarray (r, n_permutations)
        The same for copies whose entries are permuted within each column.
    best_rank : int
        The smallest rank k after which the next rank removes less than ``margin`` times the
        fraction of RSS that it removes from the randomized data (mean over permutations);
        the largest rank offered if that never happens. See `randomized_rss`.

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(60, 40, 3, noise=0.05, random_state=0)
    >>> nmf_cv.randomized_rss(X, range(1, 7), random_state=0, progress=False).best_rank
    3
    """

    ranks: np.ndarray
    rss: np.ndarray
    rss_randomized: np.ndarray
    best_rank: int

    @property
    def rss_randomized_mean(self):
        return self.rss_randomized.mean(axis=1)


def randomized_rss(X, ranks, *, n_permutations=3, margin=1.5, mask=None, method="hals",
                   n_restarts=_N_RESTARTS, random_state=None, executor=None, progress=None,
                   checkpoint=None, **fit_kwargs):
    """RSS of the data against RSS of randomized data, per rank (Frigyesi & Hoglund 2008).

    The data are fitted at every rank, and so are ``n_permutations`` copies whose observed
    entries are permuted independently within each column (missing cells stay where they
    are), which destroys the structure shared across columns and keeps each column's
    distribution. Where the data's RSS stops falling faster than the randomized data's, the
    extra components fit noise.

    The curves are compared as the *fraction* of the current RSS that one more rank removes:
    absolute decreases mislead, since the randomized data's RSS is on a much larger scale.
    Past the true rank the data's residual is noise, which loses about the same fraction as
    structureless data, so the rule stops at the first rank whose fraction falls below
    ``margin`` times the randomized one (default 1.5: on planted data the ratio stays well
    below it past the true rank and well above it below).

    Parameters
    ----------
    X : array-like (m, n)
        Non-negative data, NaN = missing.
    ranks : iterable of int, increasing
    n_permutations : int
        Randomized copies (default 3).
    margin : float
        See above.
    mask, method, n_restarts, random_state, executor, progress, checkpoint
        As in `cross_validate`.
    **fit_kwargs
        Passed to `fit_nmf`; default ``max_iter=2000, tol=1e-6``, and ``extrapolate=True`` for
        HALS.

    Returns
    -------
    RandomizedRSSResult
    """
    data = _validate_data(X, mask, signal=True)
    ranks = _check_ranks(ranks, data.shape)
    _check_positive_int(n_permutations, "n_permutations")
    _check_positive_int(n_restarts, "n_restarts")
    fit_kwargs = _rank_fit_kwargs(method, "frobenius", fit_kwargs)
    Xc = _nan_copy(data)
    ckpt, root = _open_checkpoint(checkpoint, "randomized_rss", data, random_state,
                                  ranks=ranks, n_permutations=n_permutations, method=method,
                                  n_restarts=n_restarts, fit_options=fit_kwargs)
    seeds = root.spawn(n_permutations + 1)
    copies = [Xc] + [_permute_columns(Xc, np.random.default_rng(s)) for s in seeds[1:]]
    fit_seeds = seeds[0].spawn(len(copies) * len(ranks))
    with contextlib.ExitStack() as stack:
        carried = [stack.enter_context(_shipped(copy, executor)) for copy in copies]
        args = [(carried[c], int(k), method, fit_seeds[c * len(ranks) + i], n_restarts,
                 fit_kwargs) for c in range(len(copies)) for i, k in enumerate(ranks)]
        rss = np.array(_map_tasks(_rss_task, args, _Run(executor, progress, ckpt),
                                  "randomized_rss"))
    rss = rss.reshape(len(copies), len(ranks))
    data_rss, rand_rss = rss[0], rss[1:].T
    data_gain = -np.diff(data_rss) / np.maximum(data_rss[:-1], 1e-300)
    rand_mean = rand_rss.mean(axis=1)
    rand_gain = -np.diff(rand_mean) / np.maximum(rand_mean[:-1], 1e-300)
    stop = np.flatnonzero(data_gain < margin * rand_gain)
    best = int(ranks[stop[0]]) if len(stop) else int(ranks[-1])
    return RandomizedRSSResult(ranks, data_rss, rand_rss, best)


def _permute_columns(X, rng):
    """X with each column's observed cells in random order. Sparse X: each column's stored
    entries go to random rows (its zeros fill the rest), without densifying."""
    if sp.issparse(X):
        X = sp.csc_matrix(X)
        rows = np.concatenate([rng.choice(X.shape[0], X.indptr[j + 1] - X.indptr[j],
                                          replace=False) for j in range(X.shape[1])])
        cols = np.repeat(np.arange(X.shape[1]), np.diff(X.indptr))
        return sp.csr_matrix((X.data, (rows, cols)), shape=X.shape)
    out = X.copy()
    for j in range(X.shape[1]):
        rows = np.flatnonzero(~np.isnan(X[:, j]))
        out[rows, j] = X[rng.permutation(rows), j]
    return out


def _rss_task(X, k, method, seed, n_restarts, fit_kwargs):
    res = _best_fit(_validate_data(X), k, seed, n_restarts, fit_kwargs, method=method)
    return res.relative_error ** 2 * _sq_sum(X)


# =============================================================================================
# Bi-cross-validation (Owen & Perry 2009)
# =============================================================================================

def bicross_validate(X, ranks, *, n_row_folds=2, n_col_folds=2, n_repeats=1, mask=None,
                     method="hals", block_solver="lstsq", n_restarts=_N_RESTARTS,
                     random_state=None, executor=None, progress=None, checkpoint=None,
                     **fit_kwargs):
    """Bi-cross-validation of the rank (Owen & Perry 2009), adapted to NMF.

    Rows and columns are split at random into ``n_row_folds`` and ``n_col_folds`` groups.
    For every pair (I, J), with ``X = [[A, B], [C, D]]`` where A = X[I, J] is held out:
    NMF is fitted to D only; H_B is solved from B ~ W_D H_B and W_C from C ~ W_C H_D with D's
    factors fixed; A is predicted by W_C H_B. PRESS is the squared error over A's observed
    cells. One fit of D per block and rank, no masked fitting needed for complete data.

    ``block_solver="lstsq"`` (default) solves H_B and W_C by ordinary least squares, which
    makes the prediction Owen & Perry's ``C (W_D H_D)^+ B`` with D's rank-k NMF in place of
    its truncated SVD. ``"nnls"`` constrains them to be non-negative; because an NMF of D is
    not unique, W_D H_B >= 0 often cannot follow B, and the PRESS curve then keeps falling
    past the true rank, hence the default.

    Parameters
    ----------
    X : array-like (m, n)
        Non-negative data, NaN = missing.
    ranks : iterable of int
        Each at most the smaller dimension of D.
    n_row_folds, n_col_folds : int >= 2
    n_repeats : int
        Independent re-splits.
    block_solver : {"lstsq", "nnls"}
        How H_B and W_C are solved (see above).
    mask, method, n_restarts, random_state, executor, progress, checkpoint, **fit_kwargs
        As in `cross_validate` (same fit defaults, extrapolated HALS included; no ridge: D
        is fitted whole, so there is no held-out cell for a component to run away on).

    Returns
    -------
    CVResult
        ``press`` and ``train_rss`` (RSS of the fit to D) have shape
        (rank, repeat, n_row_folds * n_col_folds); ``folds`` and ``n_kept`` are not used.

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(60, 40, 3, noise=0.05, random_state=2)
    >>> nmf_cv.bicross_validate(X, range(1, 7), random_state=0, progress=False).best_rank
    3
    """
    data = _validate_data(X, mask, signal=True)
    _check_choice(block_solver, ("lstsq", "nnls"), "block_solver")
    _check_positive_int(n_repeats, "n_repeats")
    _check_positive_int(n_restarts, "n_restarts")
    for value, label in ((n_row_folds, "n_row_folds"), (n_col_folds, "n_col_folds")):
        _check_positive_int(value, label, minimum=2)
    m, n = data.shape
    smallest_d = min(m - -(-m // n_row_folds), n - -(-n // n_col_folds))
    ranks = _check_ranks(ranks, data.shape)
    if ranks.max() > smallest_d:
        raise ValueError(f"bi-cross-validation fits ranks up to {smallest_d} here (the "
                         f"smaller side of the retained block D); got {ranks.max()}")
    fit_kwargs = _rank_fit_kwargs(method, "frobenius", fit_kwargs)
    Xc = _nan_copy(data)
    ckpt, root = _open_checkpoint(checkpoint, "bicross_validate", data, random_state,
                                  ranks=ranks, n_row_folds=n_row_folds, n_col_folds=n_col_folds,
                                  n_repeats=n_repeats, method=method, block_solver=block_solver,
                                  n_restarts=n_restarts, fit_options=fit_kwargs)
    seeds = root.spawn(n_repeats + 1)
    splits = []
    for s in seeds[1:]:
        rng = np.random.default_rng(s)
        rows = np.array_split(rng.permutation(m), n_row_folds)
        cols = np.array_split(rng.permutation(n), n_col_folds)
        splits.append([(r, c) for r in rows for c in cols])
    n_blocks = n_row_folds * n_col_folds
    tasks = [(i, r, b) for i in range(len(ranks)) for r in range(n_repeats)
             for b in range(n_blocks)]
    fit_seeds = seeds[0].spawn(len(tasks))
    with _shipped(Xc, executor) as carried:
        args = [(carried, splits[r][b], int(ranks[i]), method, block_solver, fit_seeds[t],
                 n_restarts, fit_kwargs) for t, (i, r, b) in enumerate(tasks)]
        outputs = _map_tasks(_bicv_task, args, _Run(executor, progress, ckpt),
                             "bicross_validate")
    press = np.zeros((len(ranks), n_repeats, n_blocks))
    train = np.zeros_like(press)
    for (i, r, b), (p, t) in zip(tasks, outputs, strict=True):
        press[i, r, b], train[i, r, b] = p, t
    return CVResult(ranks, press, train)


def _bicv_task(X, block, k, method, block_solver, seed, n_restarts, fit_kwargs):
    held_rows, held_cols = block
    keep_rows = np.setdiff1d(np.arange(X.shape[0]), held_rows)
    keep_cols = np.setdiff1d(np.arange(X.shape[1]), held_cols)
    D = X[keep_rows][:, keep_cols]
    res = _best_fit(_validate_data(D), k, seed, n_restarts, fit_kwargs, method=method)
    B = X[keep_rows][:, held_cols]
    C = X[held_rows][:, keep_cols]
    try:
        if block_solver == "lstsq":
            H_B = _masked_lstsq(res.W, B)
            W_C = _masked_lstsq(res.H.T, C.T).T
        else:
            H_B = _solve_W(_validate_data(B.T), res.W.T).T
            W_C = _solve_W(_validate_data(C), res.H)
    except ValueError as exc:
        raise ValueError(f"a bi-cross-validation block cannot be predicted ({exc}); use "
                         "fewer folds") from None
    A = X[held_rows][:, held_cols]
    if sp.issparse(A):  # |A - W_C H_B|^2 without densifying A
        press = (_sqnorm(A.data) - 2.0 * _fdot(np.asarray(A @ H_B.T), W_C)
                 + _fdot(W_C.T @ W_C, H_B @ H_B.T))
    else:
        press = float(np.nansum((A - W_C @ H_B) ** 2))
    return max(press, 0.0), res.relative_error ** 2 * _sq_sum(D)


def _masked_lstsq(A, Y):
    """argmin_Z sum over non-NaN cells of (Y - A Z)^2, column by column where cells miss.
    Sparse Y (no missing cells): by the normal equations, without densifying Y."""
    if sp.issparse(Y):
        return np.linalg.lstsq(A.T @ A, np.asarray((Y.T @ A).T), rcond=None)[0]
    missing = np.isnan(Y)
    if not missing.any():
        return np.linalg.lstsq(A, Y, rcond=None)[0]
    Z = np.empty((A.shape[1], Y.shape[1]))
    for j in range(Y.shape[1]):
        rows = ~missing[:, j]
        if not rows.any():
            raise ValueError(f"column {j} of a block has no observed cell")
        Z[:, j] = np.linalg.lstsq(A[rows], Y[rows, j], rcond=None)[0]
    return Z


# =============================================================================================
# Rank selection: prior predictive matching
# =============================================================================================

LIKELIHOODS = ("poisson", "gaussian")


@dataclass
class PriorPredictiveResult:
    """Outcome of `prior_predictive_rank`.

    Attributes
    ----------
    rank : float or None
        The closed-form estimate of K (real-valued); None when K is not identifiable.
    rank_int : int or None
        ``rank`` rounded half up, at least 1 (not capped at ``min(X.shape)``); None when K is
        not identifiable.
    mean, var : float
        Mean and variance (divisor: number of observed cells) of the observed cells.
    rho_row, rho_col : float
        Correlation of two distinct observed cells in the same row (column), pooled over all
        such pairs; NaN when no row (column) has two observed cells.
    tau : float
        ``1 - rho_row - rho_col``.
    likelihood : str
    noise_var : float
        ``E[Var(Y | theta, beta)]`` used: ``mean`` for Poisson, the given value for Gaussian.
    n_observed : int
        Number of observed cells.
    identifiable : bool
        False when the moments leave the formula undefined or non-positive (only returned
        with ``strict=False``; ``strict=True`` raises instead).
    reason : str
        Why K is not identifiable, naming the offending quantity; "" when it is.
    misfit : str
        Why the likelihood does not fit these data, "" when nothing is wrong: Poisson on
        values that are not counts (non-integers), or on values whose noise is far beyond
        Poisson's (`noise_level` squared over 10x the mean, where Poisson noise has variance
        equal to the mean). The estimate is then still computed, but `choose_rank` does not
        suggest it.

    Examples
    --------
    >>> import numpy as np
    >>> res = prior_predictive_rank(np.ones((3, 4)), strict=False)
    >>> res.identifiable, res.rank
    (False, None)
    """

    rank: float | None
    rank_int: int | None
    mean: float
    var: float
    rho_row: float
    rho_col: float
    tau: float
    likelihood: str
    noise_var: float
    n_observed: int
    identifiable: bool = True
    reason: str = ""
    misfit: str = ""

    def __repr__(self):
        if self.identifiable:
            head = f"rank={self.rank:.4g} (rank_int={self.rank_int})"
        else:
            head = f"rank=None (not identifiable: {self.reason})"
        return (f"PriorPredictiveResult({head}, likelihood={self.likelihood!r}, "
                f"mean={self.mean:.4g}, var={self.var:.4g}, rho_row={self.rho_row:.4g}, "
                f"rho_col={self.rho_col:.4g}, tau={self.tau:.4g}, "
                f"noise_var={self.noise_var:.4g}, n_observed={self.n_observed})")


def prior_predictive_rank(X, *, likelihood="poisson", noise_var=None, mask=None, strict=True):
    """Closed-form estimate of the number of NMF factors from data moments alone.

    Prior predictive matching (Silva, Kusmierczyk, Hartmann & Klami, JMLR 2023, "Prior
    specification for Bayesian matrix factorization via prior predictive matching"): the
    mean, variance and the same-row and same-column correlations of the observed cells are
    matched to those the Bayesian NMF model implies, and the match is solved for K.

    **Model.** ``theta_ik`` (mean ``mu_t``, variance ``s_t^2``) and ``beta_jk`` (``mu_b``,
    ``s_b^2``) are all independent, ``E[Y_ij | theta, beta] = sum_k theta_ik beta_jk``, and the
    cells are independent given the factors, with ``v = E[Var(Y_ij | theta, beta)]``. The K
    terms of the sum are independent, each with variance
    ``E[theta^2] E[beta^2] - mu_t^2 mu_b^2 = s_t^2 s_b^2 + s_t^2 mu_b^2 + mu_t^2 s_b^2``;
    two cells of a row share ``theta_i`` only (covariance ``K (E[theta^2] - mu_t^2) mu_b^2``),
    two cells of a column share ``beta_j`` only, and cells in different rows and columns are
    independent. So::

        E[Y]              = K mu_t mu_b
        Var[Y]            = v + K (s_t^2 s_b^2 + s_t^2 mu_b^2 + mu_t^2 s_b^2)
        rho_1 = Corr(Y_ij, Y_ij') = K s_t^2 mu_b^2 / Var[Y]     (same row, j != j')
        rho_2 = Corr(Y_ij, Y_i'j) = K mu_t^2 s_b^2 / Var[Y]     (same column, i != i')

    **Solving for K.** Removing the two shared parts from ``Var[Y] - v`` leaves the
    interaction, ``tau Var[Y] - v = K s_t^2 s_b^2`` with ``tau = 1 - rho_1 - rho_2``. The
    product ``rho_1 rho_2 Var[Y]^2 = (K s_t^2 s_b^2) (K mu_t^2 mu_b^2)
    = (tau Var[Y] - v) E[Y]^2``, hence::

        K = (tau Var[Y] - v) / (rho_1 rho_2) * (E[Y] / Var[Y])^2

    with ``v = E[Y]`` for a Poisson likelihood (``Var(Y | .) = E[Y | .]``) and ``v = sigma^2``
    for a Gaussian one. The moments fix only K and the products above, not the individual
    prior parameters, and the priors' family (gamma or other) does not matter.

    **Estimates.** All moments are taken over the observed cells only, centred at their mean
    ``ybar``: ``var = sum z^2 / N`` with ``z = y - ybar`` over the N observed cells. In a row
    with ``c_i`` observed cells, whose ``z`` have sum ``S_i`` and sum of squares ``Q_i``, the
    mean of ``z_ij z_ij'`` over its ``c_i (c_i - 1)`` ordered pairs of distinct cells is
    ``r_i = (S_i^2 - Q_i) / (c_i (c_i - 1))``, and the same-row covariance is the average of
    the ``r_i`` weighted by ``c_i - 1``, i.e. ``sum_i (S_i^2 - Q_i) / c_i`` over
    ``sum_i (c_i - 1)``; ``rho_row`` is that over ``var``. Columns likewise. Why this pooling:
    ``r_i`` varies with the row's own factor draw (not reduced by more cells) and with noise
    (falling like ``1 / c_i^2``). Pooling every pair equally (weight ``c_i (c_i - 1)``) lets
    dense rows dominate although each holds one factor draw; equal weights let a row with two
    cells count as much as a full one. ``c_i - 1`` lies between, gives a one-cell row weight
    0, and is the same as pooling pairs when all rows have equal counts (complete data); on
    Poisson data from the model with uneven missingness it gives the same mean estimate of K
    with a smaller spread than pooling pairs. Time and memory are O(observed
    cells) (no pair tensor); sparse input stays sparse (its unstored zeros enter the line
    sums as counts), except that a sparse X with a ``mask`` is densified by validation, as
    in `fit_nmf`. Centring at ``ybar`` biases every second moment down by ``Var(ybar)``,
    relatively O(1/m + 1/n); missing cells are assumed missing at random.

    Parameters
    ----------
    X : array-like or scipy.sparse matrix, shape (m, n)
        Non-negative data (counts for Poisson); NaN marks a missing cell (dense input).
    likelihood : {"poisson", "gaussian"}
    noise_var : float, optional
        The Gaussian noise variance ``sigma^2 >= 0``; required for ``"gaussian"`` and refused
        for ``"poisson"``. It cannot be estimated from these moments: for every
        ``sigma^2 < tau var`` some K matches them exactly, so sigma^2 and K trade off.
        Estimate it from replicates or the residual of a trusted fit.
    mask : array-like of bool, shape (m, n), optional
        True where a cell is observed. Cells that are False (or NaN) are never read.
    strict : bool
        When the formula is undefined for these data (constant data, ``rho_row`` or
        ``rho_col`` <= 0 or undefined, ``tau var <= v``), True raises ValueError naming the
        quantity; False returns the moments with ``identifiable=False``, ``rank=None`` and
        the same message in ``reason`` (for reports). Invalid arguments always raise.

    Returns
    -------
    PriorPredictiveResult

    Examples
    --------
    Poisson counts from the model with K = 4 exponential (gamma, shape 1) factors:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> theta, beta = rng.gamma(1.0, 1.0, (1000, 4)), rng.gamma(1.0, 2.0, (800, 4))
    >>> res = prior_predictive_rank(rng.poisson(theta @ beta.T))
    >>> res.rank_int, round(res.rank, 1)
    (4, 4.2)
    """
    _check_choice(likelihood, LIKELIHOODS, "likelihood")
    noise_var = _check_noise_var(noise_var, likelihood)
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"strict must be True or False; got {strict!r}")
    data = _validate_data(X, mask)
    mean = data.observed_mean()
    rows, cols = _line_moments(data, mean)
    n_observed = int(np.sum(rows.counts))
    var = float(np.sum(rows.squares)) / n_observed
    rho_row, rho_col = (_pair_covariance(*line) / var if var > 0 else math.nan
                        for line in (rows, cols))
    v = mean if likelihood == "poisson" else noise_var
    rank, reason = _rank_from_moments(mean, var, rho_row, rho_col, v)
    if reason and strict:
        raise ValueError(f"the number of factors is not identifiable from these data: "
                         f"{reason} (strict=False returns the moments with this reason)")
    rank_int = None if reason else max(1, math.floor(rank + 0.5))
    misfit = _poisson_misfit(data, mean) if likelihood == "poisson" else ""
    return PriorPredictiveResult(rank, rank_int, mean, var, rho_row, rho_col,
                                 1.0 - rho_row - rho_col, likelihood, v, n_observed,
                                 identifiable=not reason, reason=reason, misfit=misfit)


_POISSON_SPREAD = 10.0  # noise variance over the mean beyond which Poisson does not fit


def _poisson_misfit(data, mean):
    """Why a Poisson likelihood does not fit the data, or "" (see PriorPredictiveResult)."""
    values = data.values if data.masked else (
        data.sparse.data if data.sparse is not None else data.dense)
    fractional = np.flatnonzero(np.ravel(values) % 1)
    if len(fractional):
        example = float(np.ravel(values)[fractional[0]])
        return (f"the Poisson likelihood needs counts, but {len(fractional)} values are not "
                f"integers (e.g. {example:g}); use likelihood='gaussian' with noise_var")
    noise_var = _noise_level(data) ** 2
    if mean > 0 and noise_var > _POISSON_SPREAD * mean:
        return (f"the Poisson likelihood does not fit: the noise variance ({noise_var:.3g}, "
                f"from the median singular value) is {noise_var / mean:.0f}x the mean "
                f"({mean:.3g}), where Poisson noise has variance equal to the mean; use "
                "likelihood='gaussian' with noise_var")
    return ""


def _check_noise_var(noise_var, likelihood):
    if likelihood == "poisson":
        if noise_var is not None:
            raise ValueError("noise_var is for likelihood='gaussian' only: the Poisson "
                             "likelihood fixes E[Var(Y | theta, beta)] = E[Y]")
        return None
    if noise_var is None:
        raise ValueError("likelihood='gaussian' needs noise_var (the noise variance sigma^2): "
                         "it cannot be estimated from the mean, variance and row/column "
                         "correlations, since every sigma^2 < tau * var matches them with "
                         "some K; estimate it from replicates or the residual of a fit")
    ok = isinstance(noise_var, (int, float, np.number)) and not isinstance(noise_var, bool)
    if not (ok and math.isfinite(noise_var) and noise_var >= 0):
        raise ValueError(f"noise_var must be a finite number >= 0; got {noise_var!r}")
    return float(noise_var)


def _rank_from_moments(mean, var, rho_row, rho_col, noise_var):
    """``(K, "")`` from the moments, or ``(None, reason)`` when the formula is undefined or
    not positive (see `prior_predictive_rank`)."""
    # Below this the "variance" is rounding error of the mean and the correlations are noise.
    if not var > (1e-8 * mean) ** 2:
        return None, (f"var = {var:.3g}: the observed cells are constant, so the correlations "
                      "are undefined")
    for rho, name, line in ((rho_row, "rho_row", "row"), (rho_col, "rho_col", "column")):
        if math.isnan(rho):
            return None, f"{name} is undefined: no {line} has two observed cells"
        if rho <= 0:
            return None, (f"{name} = {rho:.3g} <= 0: cells in the same {line} are not "
                          f"positively correlated, but the model makes {name} = K * (a "
                          f"positive prior variance) / Var[Y] > 0")
    tau = 1.0 - rho_row - rho_col
    excess = tau * var - noise_var
    if excess <= 0:
        return None, (f"tau * var - E[Var(Y | theta, beta)] = {tau:.3g} * {var:.4g} - "
                      f"{noise_var:.4g} = {excess:.3g} <= 0: the variance left after the row "
                      "and column correlations does not exceed the likelihood's noise, but "
                      "the model makes it K * s_t^2 * s_b^2 > 0 (too little overdispersion "
                      "for Poisson, or noise_var too large)")
    rank = excess / (rho_row * rho_col) * (mean / var) ** 2
    if not math.isfinite(rank):
        return None, f"the estimate overflows (rho_row * rho_col = {rho_row * rho_col:.3g})"
    return rank, ""


class _LineMoments(NamedTuple):
    """Each line's (row's, or column's) observed cells: how many, and the sum and the sum of
    squares of their deviations from the mean (float64)."""

    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray


def _line_moments(data, mean):
    """The rows' and the columns' `_LineMoments` of the deviations from ``mean``, in
    O(observed cells)."""
    m, n = data.shape
    if data.masked:
        z = np.subtract(data.values, mean, dtype=np.float64)
        return _bincount_moments(data.rows, z, m), _bincount_moments(data.cols, z, n)
    if data.sparse is not None:
        return _sparse_line_moments(data.sparse, mean)
    z = np.subtract(data.dense, mean, dtype=np.float64)
    return (_LineMoments(np.full(m, n), z.sum(axis=1), np.einsum("ij,ij->i", z, z)),
            _LineMoments(np.full(n, m), z.sum(axis=0), np.einsum("ij,ij->j", z, z)))


def _bincount_moments(index, z, size):
    return _LineMoments(np.bincount(index, minlength=size), np.bincount(index, z, size),
                        np.bincount(index, z * z, size))


def _sparse_line_moments(X, mean):
    # Unstored cells are zeros: each adds -mean to its line's sum and mean^2 to its squares,
    # so the sums come from the stored entries plus a count, without densifying.
    m, n = X.shape
    z = X.data.astype(np.float64) - mean
    rows = np.repeat(np.arange(m), np.diff(X.indptr))
    out = []
    for index, size, length in ((rows, m, n), (X.indices, n, m)):
        stored, sums, squares = _bincount_moments(index, z, size)
        zeros = length - stored
        out.append(_LineMoments(np.full(size, length), sums - zeros * mean,
                                squares + zeros * mean**2))
    return tuple(out)


def _pair_covariance(counts, sums, squares):
    """Same-line covariance: each line's mean of ``z_a z_b`` over its ordered pairs of distinct
    cells (``sum_{a != b} z_a z_b = S^2 - Q``), averaged with weights ``count - 1`` (see
    `prior_predictive_rank`); NaN when no line has two cells."""
    lines = counts > 1
    weight = float(np.sum(counts[lines] - 1.0))
    if weight == 0:
        return math.nan
    c, s, q = counts[lines], sums[lines], squares[lines]
    return float(np.sum((s * s - q) / c)) / weight


# =============================================================================================
# Rank selection: choose_rank, its report, and the registry of criteria
# =============================================================================================

@dataclass
class RankReport:
    """Every criterion's evidence on the rank, side by side (made by `choose_rank`).

    Attributes
    ----------
    ranks : ndarray (r,)
    results : dict
        criterion -> its result object (`PriorPredictiveResult` for ``"prior"``, `CVResult`,
        `ConsensusResult`, `RandomizedRSSResult`, `CVResult` for ``"bicv"``,
        `StabilityResult`).
    suggestions : dict
        suggestion -> suggested rank: one per criterion, and ``"cv_1se"`` (cross-validation's
        one-standard-error rule). ``"prior"`` is absent when the data do not identify it or
        its likelihood does not fit them (the reason is in ``results["prior"].reason`` or
        ``.misfit``).
    edges : dict
        suggestion -> ``">="`` when it is the largest rank tried and its curve was still
        improving there, ``"<="`` for the smallest rank tried (above 1); such a suggestion
        is a bound, not an answer: widen ``ranks``.
    agreement : str
        One line: whether the criteria agree, and if not, which ones pick what (and which
        ranks cross-validation cannot tell apart).
    recommended_rank : int or None
        The rank to use: the pick of the most direct criterion present that decides on
        these data, in the order cross-validation, bi-cross-validation, RSS against
        randomized data, component stability, prior predictive, consensus clustering (each
        answers a different question; the first ones ask how many components predict data
        held out). None when that criterion gives only a bound (widen the ranks) or none
        decides.
    recommendation : str
        Why: the recommended rank and the question its criterion answers, the criteria that
        support it, the ranks cross-validation cannot tell apart from it, and for each
        criterion that disagrees, why it may.
    near_ranks : list of int
        The ranks cross-validation cannot tell apart from its pick: within one standard
        error of the smallest median PRESS, or picked by one of the splits (empty without
        cross-validation).
    unfinished : dict
        A report from an unfinished run (`report_from_checkpoint`): criterion -> how far it
        got. Such criteria are in neither ``results`` nor ``suggestions``, and the
        recommendation rests on the finished ones only.
    partial : dict
        criterion -> a result holding its finished ranks (NaN for the others), for the
        unfinished criteria that have one (cross-validation): in the table and the
        dashboard, never in the suggestions.

    ``str(report)`` is a plain-text table; ``to_dict()`` gives JSON-ready numbers.
    """

    ranks: np.ndarray
    results: dict
    suggestions: dict
    edges: dict = field(default_factory=dict)
    agreement: str = ""
    recommended_rank: int = None
    recommendation: str = ""
    near_ranks: list = field(default_factory=list)
    unfinished: dict = field(default_factory=dict)
    partial: dict = field(default_factory=dict)

    def criteria(self):
        """The registered criteria present in ``results``, in the registry's order."""
        return [c for c in _CRITERIA.values() if c.name in self.results]

    def shown(self):
        """(criterion, result) for every criterion with numbers to show, finished or
        partial, in the registry's order."""
        return [(c, self.results.get(c.name, self.partial.get(c.name)))
                for c in _CRITERIA.values() if c.name in self.results or c.name in self.partial]

    def columns(self):
        """Column name -> {rank: value} for every number in the table."""
        cols = {}
        for criterion, result in self.shown():
            if criterion.columns is not None:
                cols.update(criterion.columns(result))
        return cols

    def table(self):
        """The report as a plain-text table (k x criteria) with each suggestion below."""
        cols = self.columns()
        names = ["k"] + list(cols)
        lines = []
        for k in self.ranks.tolist():
            cells = [str(k)] + [_format_number(cols[name].get(k)) for name in cols]
            lines.append(cells)
        widths = [max(len(name), *(len(row[i]) for row in lines)) for i, name in
                  enumerate(names)]
        out = ["  ".join(name.rjust(w) for name, w in zip(names, widths, strict=True))]
        out += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
                for row in lines]
        out.append("")
        for key in self.suggestions:
            out.append(f"suggested k by {_pick_of(key).label}: {_edge_text(self, key)}")
        for criterion in self.criteria():
            if criterion.notes is not None:
                out += criterion.notes(self.results[criterion.name])
        for name, how_far in self.unfinished.items():
            out.append(f"{name}: unfinished, no suggestion ({how_far})")
        if self.agreement:
            out.append(self.agreement)
        if self.recommendation:
            out += ["", textwrap.fill(self.recommendation, 100)]
        return "\n".join(out)

    def cv_outliers(self):
        """rank -> number of CV folds above 3x their rank's median PRESS (ranks with any)."""
        cv = self.results.get("cv")
        return {} if cv is None else _cv_outliers(cv)

    def __str__(self):
        return self.table()

    def to_dict(self):
        """JSON-ready dict: ranks, suggestions, and every column of the table."""
        out = {"ranks": self.ranks.tolist(), "recommended_rank": self.recommended_rank,
               "recommendation": self.recommendation, "near_ranks": list(self.near_ranks),
               "suggestions": dict(self.suggestions), "edges": dict(self.edges),
               "agreement": self.agreement, "unfinished": dict(self.unfinished),
               "columns": {name: {str(k): v for k, v in col.items()}
                           for name, col in self.columns().items()}}
        for criterion in self.criteria():
            if criterion.details is not None:
                out[criterion.name] = criterion.details(self.results[criterion.name])
        return out


def choose_rank(X, ranks, criteria=None, *, mask=None, n_restarts=_N_RESTARTS,
                random_state=None, executor=None, progress=None, checkpoint=None,
                **criterion_kwargs):
    """Run several rank-selection criteria and put them side by side.

    Parameters
    ----------
    X : array-like (m, n)
        Non-negative data, NaN = missing.
    ranks : iterable of int
    criteria : tuple of str, optional
        Any of ``"prior"`` (`prior_predictive_rank`, instant, Poisson likelihood unless
        ``prior_kwargs`` says otherwise), ``"cv"`` (`cross_validate`; suggests its
        ``best_rank``, and reports the one-standard-error rule as ``"cv_1se"``),
        ``"bicv"`` (`bicross_validate`), ``"randomized"`` (`randomized_rss`),
        ``"cophenetic"`` (`consensus` with ``n_runs="auto"``, ranks >= 2), ``"stability"``
        (`stability`, ranks >= 2). Default: all (`CRITERIA`).
    mask, random_state, executor, progress
        Shared by all criteria (each criterion draws from its own seed stream).
    checkpoint : str or os.PathLike, optional
        A directory for the criteria's checkpoints (a subdirectory each; see
        `cross_validate`): calling again with the same arguments resumes where a run stopped.
    n_restarts : int
        Fits per rank (and fold) for ``"cv"``, ``"randomized"`` and ``"bicv"`` (see
        `cross_validate`); a criterion's own kwargs override it.
    **criterion_kwargs : dict
        Extra arguments for each criterion's function: ``prior_kwargs``, ``cv_kwargs``,
        ``bicv_kwargs``, ``randomized_kwargs``, ``consensus_kwargs`` (for ``"cophenetic"``),
        ``stability_kwargs``.

    Returns
    -------
    RankReport

    Examples
    --------
    >>> import nmf_cv
    >>> X = nmf_cv.make_planted(60, 40, 3, noise=0.05, random_state=3)
    >>> report = nmf_cv.choose_rank(X, range(1, 6), criteria=("cv", "bicv"), random_state=0,
    ...                             progress=False)
    >>> report.suggestions["cv"], report.suggestions["bicv"]
    (3, 3)
    >>> report.table().splitlines()[0].split()   # then one line per rank, then suggestions
    ['k', 'PRESS', 'PRESS', 'se', 'BCV', 'PRESS']
    """
    chosen = _chosen_criteria(criteria, criterion_kwargs)
    data = _validate_data(X, mask, signal=True)
    ranks = _check_ranks(ranks, data.shape)
    if checkpoint is not None and random_state is None:
        random_state = _persistent_seed(checkpoint)
    root = _seed_sequence(random_state)
    if checkpoint is not None and not isinstance(checkpoint, _FinishedOnly):
        _save_settings(checkpoint, ranks, [c.name for c in chosen], n_restarts, root,
                       criterion_kwargs)
    streams = [c.stream for c in _CRITERIA.values() if c.stream is not None]
    seeds = root.spawn(max(streams) + 1 if streams else 0)
    _check_positive_int(n_restarts, "n_restarts")
    options = {c.name: {**c.defaults, **(criterion_kwargs.get(c.keyword) or {})}
               for c in chosen}
    for criterion in chosen:  # what cannot run stops the call before any fit
        if criterion.check is not None:
            criterion.check(data.shape, **options[criterion.name])
    Xc = _nan_copy(data)
    results, suggestions, unfinished, partial = {}, {}, {}, {}
    for criterion in chosen:
        tried = ranks[ranks >= criterion.min_rank]
        if len(tried) == 0:
            continue
        kwargs = options[criterion.name]
        if criterion.restarts:
            kwargs = {"n_restarts": n_restarts, **kwargs}
        seed = None if criterion.stream is None else seeds[criterion.stream]
        try:
            result = criterion.run(Xc, tried, random_state=seed, executor=executor,
                                   progress=progress, checkpoint=checkpoint, **kwargs)
        except _Unfinished as stop:  # only when reading a checkpoint for a report
            unfinished[criterion.name] = str(stop)
            if stop.partial is not None:
                partial[criterion.name] = stop.partial
            continue
        results[criterion.name] = result
        for pick in criterion.picks:
            k = pick.read(result)
            if k is not None:
                suggestions[pick.key] = k
    edges = _edges(ranks, results, suggestions)
    recommended = _recommend(results, suggestions, edges)
    text = recommended.text
    if unfinished:
        text = (f"From the criteria finished so far ({', '.join(unfinished)} unfinished): "
                + text[0].lower() + text[1:])
    return RankReport(ranks, results, suggestions, edges,
                      _agreement(results, suggestions, edges), recommended.rank,
                      text, recommended.near, unfinished, partial)


def report_from_checkpoint(checkpoint, X=None, *, mask=None):
    """The `choose_rank` report of a run from the fits its checkpoint holds, finished or not.

    Nothing is fitted: a criterion whose fits are all in the checkpoint is reported as the
    finished run would report it; the others are listed in ``RankReport.unfinished`` with
    how far they got, never guessed. The settings come from the checkpoint (``choose_rank``
    records them there); the data too when the command line made it (``rank --checkpoint``
    records its input file), else pass ``X`` (and ``mask``) as the run had them.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        The directory given to `choose_rank` (or the command line's ``--checkpoint``).
    X : array-like or sparse matrix, optional
        The run's data; default: read again from the file the command line recorded.
    mask : array-like of bool, optional

    Returns
    -------
    RankReport

    Examples
    --------
    >>> import tempfile, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> path = tempfile.mkdtemp()
    >>> done = nmf_cv.choose_rank(X, [1, 2, 3], ("cv",), random_state=0, progress=False,
    ...                           checkpoint=path)
    >>> nmf_cv.report_from_checkpoint(path, X).suggestions == done.suggestions
    True
    """
    path = os.fspath(checkpoint)
    settings = _read_manifest(os.path.join(path, "settings.json"))
    if settings is None:
        raise ValueError(f"{path}: no settings.json; not a choose_rank checkpoint, or one whose "
                         "options (arrays among them) could not be recorded")
    if X is None:
        source = _read_manifest(os.path.join(path, "source.json"))
        if source is None:
            raise ValueError(f"{path} does not say where its data came from: pass X")
        X, _, _ = read_matrix(source["file"], layer=source.get("layer"))
    entropy, spawn_key, spawned = settings["random_state"]
    seed = np.random.SeedSequence(int(entropy), spawn_key=tuple(spawn_key),
                                  n_children_spawned=spawned)
    return choose_rank(X, settings["ranks"], settings["criteria"], mask=mask,
                       n_restarts=settings["n_restarts"], random_state=seed,
                       checkpoint=_FinishedOnly(path), progress=False,
                       **settings["criterion_kwargs"])


def _save_settings(checkpoint, ranks, criteria, n_restarts, root, criterion_kwargs):
    """Record `choose_rank`'s settings in the checkpoint, for `report_from_checkpoint`."""
    settings = {"ranks": [int(k) for k in ranks], "criteria": criteria,
                "n_restarts": n_restarts,
                "random_state": [str(root.entropy), [int(i) for i in root.spawn_key],
                                 root.n_children_spawned],
                "criterion_kwargs": criterion_kwargs}
    try:
        payload = json.dumps(settings, indent=1, default=_json_default)
    except TypeError:  # an array among the options: the report then needs them again
        return
    os.makedirs(os.fspath(checkpoint), exist_ok=True)
    _atomic_write(os.path.join(os.fspath(checkpoint), "settings.json"), payload.encode())


def _chosen_criteria(criteria, criterion_kwargs):
    """The registered criteria named (all by default), in the registry's order; unknown
    names and unknown ``*_kwargs`` raise."""
    names = tuple(_CRITERIA) if criteria is None else tuple(criteria)
    for c in names:
        _check_choice(c, tuple(_CRITERIA), "criterion")
    known = {c.keyword for c in _CRITERIA.values()}
    for key in criterion_kwargs:
        if key not in known:
            raise TypeError(f"choose_rank() got an unexpected keyword argument {key!r}; "
                            f"criteria take {', '.join(sorted(known))}")
    return [c for c in _CRITERIA.values() if c.name in names]


def _edges(ranks, results, suggestions):
    """suggestion -> ">=" / "<=" where its pick is the range's edge and its curve says the
    answer may lie beyond it (see `RankReport`)."""
    edges = {}
    for key, k in suggestions.items():
        pick = _pick_of(key)
        if k is None or pick.edge is None:
            continue
        edge = pick.edge(results[_criterion_of(key).name], k, ranks)
        if edge is not None:
            edges[key] = edge
    return edges


def _edge_text(report, key):
    """The table's text for a suggestion: the rank, or the bound and why."""
    k, edge = report.suggestions[key], report.edges.get(key)
    pick, result = _pick_of(key), report.results.get(_criterion_of(key).name)
    if edge is None:
        return str(k) if pick.text is None else pick.text(result, k)
    bound = pick.bound(result, k, edge) if pick.bound is not None else None
    if bound is not None:
        return bound[0]
    where = "largest" if edge == ">=" else "smallest"
    return f"{'≥' if edge == '>=' else '≤'} {k} ({pick.still} at the {where} rank tried)"


def _edge_text_short(result, key, k, edge):
    """A bound in a few characters: ``"≥ 6"``, or the pick's own short text."""
    pick = _pick_of(key)
    bound = pick.bound(result, k, edge) if pick.bound is not None else None
    if bound is not None and bound[1] is not None:
        return bound[1]
    return f"{'≥' if edge == '>=' else '≤'} {k}"


def _agreement(results, suggestions, edges):
    """One line saying whether the criteria agree (see `RankReport`)."""
    answers = {c: k for c, k in suggestions.items() if c not in edges}
    bounds = [f"{_pick_of(c).short} "
              f"({_edge_text_short(results[_criterion_of(c).name], c, k, edges[c])})"
              for c, k in suggestions.items() if c in edges]
    picks = {}
    for c, k in answers.items():
        picks.setdefault(k, []).append(_pick_of(c).short)
    if not picks:
        head = "no criterion has an answer inside the ranks tried"
    elif len(picks) == 1:
        (k, names), = picks.items()
        head = f"criteria agree on k = {k} ({', '.join(names)})"
    else:
        head = "criteria disagree: " + "; ".join(
            f"k = {k} by {', '.join(names)}" for k, names in sorted(picks.items()))
    parts = [head]
    if bounds:
        parts.append("no answer inside the ranks tried by " + ", ".join(bounds))
    for criterion in _CRITERIA.values():
        if criterion.name in results and criterion.agreement is not None:
            parts += criterion.agreement(results[criterion.name])
    return "; ".join(parts) + "."


class _Recommended(NamedTuple):
    rank: int
    text: str
    near: list


def _recommend(results, suggestions, edges):
    """The recommended rank and why (see `RankReport.recommendation`): the pick of the most
    direct criterion that decides, not a vote; every other criterion's pick either
    supports it, lies within cross-validation's near-equal ranks, or dissents for the
    reason its criterion gives."""
    present = [c for c in _CRITERIA.values() if c.name in results]
    cv = results.get("cv")
    near = _cv_near(cv) if cv is not None and _cv_flat(cv) is None else []
    undecided, decider = [], None
    for c in sorted((c for c in present if c.precedence is not None),
                    key=lambda c: c.precedence):
        pick, result = c.picks[0], results[c.name]
        why = c.undecided(result) if c.undecided is not None else None
        if why is None and suggestions.get(pick.key) is None:
            why = "no pick"
        if why is not None:
            undecided.append(f"{pick.short}: {why}")
            continue
        decider = c
        break
    if decider is None:
        text = "No recommended k: no criterion decides on these data"
        return _Recommended(None, text + (f" ({'; '.join(undecided)})." if undecided
                                          else "."), near)
    pick, result = decider.picks[0], results[decider.name]
    rec = suggestions[pick.key]
    if pick.key in edges:
        bound = _edge_text_short(result, pick.key, rec, edges[pick.key])
        return _Recommended(None, f"No recommended k: {pick.short} gives only a bound "
                            f"({bound}), not a rank: widen the ranks tried.", near)
    lines = [f"Recommended k = {rec}: {pick.short}, {decider.question}."]
    if undecided:
        lines.append("Not deciding: " + "; ".join(undecided) + ".")
    support, close, dissent = [], [], []
    for c in present:
        if c is decider:
            continue
        key, other = c.picks[0].key, results[c.name]
        k, edge, short = suggestions.get(key), edges.get(key), c.picks[0].short
        if k is None:
            continue
        if edge is not None:
            bound = _edge_text_short(other, key, k, edge)
            if (edge == ">=" and rec >= k) or (edge == "<=" and rec <= k):
                support.append(f"{short} ({bound})")
            else:
                dissent.append(f"{short} gives {bound}: only a bound, widen the ranks tried")
        elif k == rec:
            support.append(short)
        else:
            reason = (c.dissent(other, k, rec) if c.dissent is not None else
                      "it answers another question" + (f", {c.question}" if c.question
                                                       else ""))
            (close if k in near else dissent).append(f"{short} picks {k}: {reason}")
    if support:
        lines.append("Supported by " + ", ".join(support) + ".")
    if len(near) > 1:
        lines.append("Cross-validation cannot tell k = " + ", ".join(map(str, near))
                     + " apart" + (": within them, " + "; ".join(close) if close else "")
                     + ".")
    lines += [d[0].upper() + d[1:] + "." for d in dissent]
    return _Recommended(rec, " ".join(lines), near)


# The rank criteria, each declared once. `choose_rank` runs them in this order, the report's
# table, JSON and dashboard show them in it, and the command line's --criteria names them.
# A new criterion is its own section (a function returning a result with ``ranks``) plus one
# `_register` call below.


@dataclass(frozen=True)
class _Pick:
    """One rank a criterion suggests (cross-validation suggests two).

    ``key`` names it in `RankReport.suggestions` and ``edges``; ``label`` in the table's
    "suggested k by ..." line; ``short`` in the agreement line and the dashboard's title.
    ``read(result)`` is the suggested rank, or None for no answer. ``edge(result, k,
    ranks)`` returns ``">="``/``"<="`` when the pick is a bound at the range's edge (None:
    never), ``still`` says why in the table. ``text(result, k)`` writes a pick inside the
    range (default ``str(k)``), ``brief(result, k, edge)`` its entry in the dashboard's title
    (None: none), ``bound(result, k, edge)`` a bound's (long, short) text where it is not the
    usual ``"≥ k (still ...)"``."""

    key: str
    label: str
    short: str
    read: Callable
    edge: Callable = None
    still: str = ""
    text: Callable = None
    brief: Callable = None
    bound: Callable = None


@dataclass(frozen=True)
class _Criterion:
    """A rank-selection criterion as `choose_rank` and its report use it.

    ``run(X, ranks, random_state=, executor=, progress=, checkpoint=, **kwargs)`` makes its
    result (X dense with NaN, or CSR); ``stream`` is its seed stream (each criterion draws
    from its own, so adding one moves no other; None: it draws none); ``min_rank`` drops
    smaller ranks (skipped when none is left); ``restarts``: it takes ``n_restarts``;
    ``options``: `choose_rank`'s keyword for its own arguments (default ``NAME_kwargs``),
    which override ``defaults``, the arguments `choose_rank` gives it where they differ from
    its function's. ``check(shape, **kwargs)`` raises before any criterion fits where it
    could not run on X of that shape (None: it always can).
    ``columns(result)`` gives its table columns (name -> {rank: value}), ``notes(result)``
    lines under the table, ``agreement(result)`` clauses after the agreement line,
    ``details(result)`` its own entry in ``to_dict()``; ``panel(ax, result, suggestions)``
    draws its dashboard panel titled ``title``, and ``mark(ax, result, ranks)`` draws on
    every panel.

    The recommendation (`_recommend`) reads ``question``, what the criterion's pick answers;
    ``precedence``, its place among the criteria whose pick can be the recommended rank
    (lowest first; None: never); ``undecided(result)``, a reason why its pick decides
    nothing on these data (None: it decides); and ``dissent(result, k, rec)``, why its pick
    k may differ from the recommended rank rec."""

    name: str
    run: Callable
    picks: tuple
    stream: int = None
    min_rank: int = 1
    restarts: bool = False
    options: str = ""
    defaults: dict = field(default_factory=dict)
    check: Callable = None
    columns: Callable = None
    notes: Callable = None
    agreement: Callable = None
    details: Callable = None
    panel: Callable = None
    title: str = ""
    mark: Callable = None
    question: str = ""
    precedence: int = None
    undecided: Callable = None
    dissent: Callable = None

    @property
    def keyword(self):
        """`choose_rank`'s keyword for this criterion's own arguments."""
        return self.options or f"{self.name}_kwargs"


_CRITERIA = {}


def _register(criterion):
    """Add a criterion to the registry (replacing one of the same name)."""
    _CRITERIA[criterion.name] = criterion
    return criterion


def _criterion_of(key):
    """The criterion that makes the suggestion ``key`` (``"cv_1se"`` -> cv's)."""
    for criterion in _CRITERIA.values():
        if any(pick.key == key for pick in criterion.picks):
            return criterion
    raise KeyError(key)


def _pick_of(key):
    return next(p for p in _criterion_of(key).picks if p.key == key)


def _by_rank(ranks, values):
    return dict(zip(np.asarray(ranks).tolist(), np.asarray(values).tolist(), strict=True))


def _edge_of_range(top=True, bottom=True, single=False):
    """Edge rule of a curve: its pick at the largest rank tried is a lower bound (``top``),
    at the smallest (above 1) an upper bound (``bottom``); ``single``: even when only one
    rank was tried."""
    def edge(result, k, ranks):
        tried = result.ranks
        if len(tried) < 2 and not single:
            return None
        if top and k == int(tried[-1]):
            return ">="
        if bottom and k == int(tried[0]) and k > 1:
            return "<="
        return None
    return edge


# prior predictive matching: instant, no fits, no seed ----------------------------------------

def _prior_run(X, ranks, *, random_state, executor, progress, checkpoint, **kwargs):
    return prior_predictive_rank(X, strict=False, **kwargs)


def _prior_read(prior):
    return prior.rank_int if prior.identifiable and not prior.misfit else None


def _prior_detail(prior):
    return f" (estimate {prior.rank:.2f}, no fits)"


def _prior_brief(prior, k, edge):
    rank = _prior_rank(prior)
    if getattr(prior, "misfit", ""):
        return "likelihood does not fit"
    return "not identifiable" if rank is None else f"{rank:.1f}"


def _prior_notes(prior):
    if not prior.identifiable:
        return [f"prior predictive matching: not identifiable ({prior.reason})"]
    if prior.misfit:
        return [f"prior predictive matching: no suggestion, {prior.misfit}"]
    return []


def _prior_undecided(prior):
    if not prior.identifiable:
        return f"not identifiable ({prior.reason})"
    return prior.misfit or None


def _prior_dissent(prior, k, rec):
    return (f"an estimate ({prior.rank:.2f}) from moments alone, no fits: it assumes its "
            "model (independent Gamma factors, equally strong components) and moves when "
            "components differ in strength")


def _prior_details(prior):
    return {"rank": prior.rank, "identifiable": prior.identifiable, "reason": prior.reason,
            "mean": prior.mean, "var": prior.var, "rho_row": prior.rho_row,
            "rho_col": prior.rho_col, "tau": prior.tau, "likelihood": prior.likelihood,
            "misfit": prior.misfit}


_register(_Criterion(
    "prior", _prior_run, (_Pick(
        "prior", "prior predictive matching (rounded)", "prior predictive", _prior_read,
        edge=lambda prior, k, ranks: ">=" if k > ranks[-1] else "<=" if k < ranks[0] else None,
        text=lambda prior, k: f"{k}{_prior_detail(prior)}", brief=_prior_brief,
        bound=lambda prior, k, edge: (f"{k} (outside the ranks tried){_prior_detail(prior)}",
                                      None)),),
    notes=_prior_notes, details=_prior_details, title="Prior predictive",
    mark=lambda ax, prior, ranks: _mark_prior(ax, prior, np.asarray(ranks)),
    question="the rank at which its model's prior predictive moments match the data's",
    precedence=4, undecided=_prior_undecided, dissent=_prior_dissent))


# cross-validation: its pick and the one-standard-error rule ----------------------------------

def _cv_columns(cv):
    cols = {"PRESS": _by_rank(cv.ranks, cv.press_median),
            "PRESS se": _by_rank(cv.ranks, cv.press_mad_se)}
    if cv.n_outlier_folds.any():
        cols["outlier folds"] = _by_rank(cv.ranks, cv.n_outlier_folds)
    return cols


def _cv_notes(cv):
    outliers = _cv_outliers(cv)
    if not outliers:
        return []
    return [f"CV outlier folds (> {_OUTLIER_FOLD:g}x their rank's median PRESS): "
            + ", ".join(f"k = {k}: {n}" for k, n in outliers.items())]


def _cv_outliers(cv):
    return {int(k): int(n) for k, n in zip(cv.ranks, cv.n_outlier_folds, strict=True) if n}


def _cv_agreement(cv):
    """Whether the splits agree, and which ranks PRESS cannot tell apart."""
    parts = []
    if len(cv.pick_counts()) > 1:
        parts.append(f"CV's splits disagree: {cv.pick_text()}")
    close = _cv_close(cv)
    if _cv_flat(cv) is not None:
        parts.append(f"{_cv_flat(cv)}: these data do not resolve the rank by "
                     "cross-validation")
    elif len(close) > 1:
        parts.append(f"PRESS at {', '.join(map(str, close))} within 1 SE")
    return parts


def _cv_close(cv):
    """The ranks (fitted on every split) whose median PRESS is within one standard error of
    the pick's."""
    if len(cv.ranks) < 2:
        return []
    best = int(np.flatnonzero(cv.ranks == cv.best_rank)[0])
    final = ~np.isnan(np.asarray(cv.press)[:, -1, 0])  # ranks fitted on every split
    close = final & (cv.press_median <= cv.press_median[best] + cv.press_mad_se[best])
    return [int(k) for k in cv.ranks[close]]


def _cv_flat(cv):
    """Why CV decides nothing (its PRESS is flat over every rank tried), or None."""
    if len(cv.ranks) > 1 and len(_cv_close(cv)) == len(cv.ranks):
        return "PRESS flat within 1 SE over every rank tried"
    return None


def _cv_near(cv):
    """The ranks CV cannot tell apart from its pick (see `RankReport.near_ranks`)."""
    near = {int(cv.best_rank), *_cv_close(cv), *(int(k) for k in cv.repeat_best_ranks)}
    return sorted(near)


def _cv_details(cv):
    """Every fold's numbers (null: a fold not fitted), each split's pick, the ridge."""
    out = {"press": _json_array(cv.press), "train": _json_array(cv.train_rss),
           "press_median": _json_array(cv.press_median),
           "press_mad_se": _json_array(cv.press_mad_se), "loss": cv.loss,
           "best_rank": cv.best_rank, "min_rank": cv.min_rank,
           "best_rank_1se": cv.best_rank_1se,
           "split_picks": _json_array(cv.repeat_best_ranks),
           "n_outlier_folds": _json_array(cv.n_outlier_folds)}
    if cv.alpha is not None:
        out["alpha"] = _json_array(cv.alpha)
    if cv.n_refitted is not None:
        out["n_refitted"] = _json_array(cv.n_refitted)
    return out


def _cv_brief(cv, k, edge):
    if edge is None and len(cv.pick_counts()) > 1:
        return cv.pick_text()  # the splits disagree: never one number
    return None


_register(_Criterion(
    "cv", cross_validate, (
        _Pick("cv", "cross-validated PRESS (smallest rank within 1 SE of the best)", "CV",
             lambda cv: cv.best_rank, edge=_edge_of_range(), still="PRESS still falling",
             text=lambda cv, k: cv.pick_text(), brief=_cv_brief),
        _Pick("cv_1se", "PRESS, one-SE rule", "CV one-SE rule", lambda cv: cv.best_rank_1se,
             edge=_edge_of_range(top=False), still="PRESS within 1 SE")),
    stream=0, restarts=True, columns=_cv_columns, notes=_cv_notes, agreement=_cv_agreement,
    details=_cv_details,
    panel=lambda ax, cv, picks: _draw_cv(ax, cv, picks.get("cv"), picks.get("cv_1se")),
    title="Cross-validation (held-out cells)",
    question="the fewest components that predict held-out cells as well as any rank tried",
    precedence=0, undecided=_cv_flat,
    dissent=lambda cv, k, rec: "cross-validation predicts held-out cells best there"))


# bi-cross-validation ------------------------------------------------------------------------

def _bicv_dissent(bi, k, rec):
    return ("bi-cross-validation holds out whole blocks of rows and columns, so each fit "
            f"sees a quarter of the data or less; its curve is noisier, and with few rows or "
            f"columns it lands {'low' if k < rec else 'high'}")


_register(_Criterion(
    "bicv", bicross_validate, (_Pick(
        "bicv", "bi-cross-validation (smallest rank within 1 SE of the best)", "BCV",
        lambda bi: bi.best_rank, edge=_edge_of_range(), still="BCV PRESS still falling"),),
    stream=3, restarts=True, details=_cv_details,
    columns=lambda bi: {"BCV PRESS": _by_rank(bi.ranks, bi.press_median)},
    panel=lambda ax, bi, picks: _draw_cv(ax, bi, picks.get("bicv"), None, bicv=True),
    title="Bi-cross-validation (held-out blocks)",
    question="the fewest components that predict held-out blocks as well as any rank tried",
    precedence=1, undecided=_cv_flat, dissent=_bicv_dissent))


# RSS against randomized data ----------------------------------------------------------------

def _randomized_dissent(ra, k, rec):
    if k < rec:
        return ("an elbow rule: weak components past the elbow improve the fit little more "
                "than on randomized data, yet still predict held-out cells")
    return ("structure in the noise that randomizing breaks (heavy tails, overdispersion, "
            "correlated errors) reads as signal, so it lands high")


_register(_Criterion(
    "randomized", randomized_rss, (_Pick(
        "randomized", "RSS vs randomized data", "RSS vs randomized", lambda ra: ra.best_rank,
        edge=_edge_of_range(bottom=False),
        still="RSS still falling faster than on randomized data"),),
    stream=2, restarts=True,
    details=lambda ra: {"rss": _json_array(ra.rss),
                        "rss_randomized": _json_array(ra.rss_randomized),
                        "best_rank": ra.best_rank},
    columns=lambda ra: {"RSS": _by_rank(ra.ranks, ra.rss),
                        "RSS randomized": _by_rank(ra.ranks, ra.rss_randomized_mean)},
    panel=lambda ax, ra, picks: _draw_randomized(ax, ra, picks.get("randomized")),
    title="RSS against randomized data",
    question="the last rank whose fit improves faster than on randomized data",
    precedence=2, dissent=_randomized_dissent))


# consensus clustering -----------------------------------------------------------------------

def _cophenetic_columns(co):
    cols = {"cophenetic": _by_rank(co.ranks, co.cophenetic)}
    se = getattr(co, "cophenetic_se", None)
    if se is not None:
        cols["coph se"] = _by_rank(co.ranks, se)
    if getattr(co, "n_runs", None) is not None:
        cols["coph runs"] = _by_rank(co.ranks, co.n_runs)
    cols["dispersion"] = _by_rank(co.ranks, co.dispersion)
    if co.pac is not None:
        cols["PAC"] = _by_rank(co.ranks, co.pac)
    return cols


def _cophenetic_dissent(co, k, rec):
    low = (", and lands low on data whose samples mix components rather than fall into "
           "clusters") if k < rec else ""
    noise, se = "", getattr(co, "cophenetic_se", None)
    if se is not None and rec in co.ranks:
        (i,), (j,) = np.flatnonzero(co.ranks == k), np.flatnonzero(co.ranks == rec)
        if abs(co.cophenetic[i] - co.cophenetic[j]) <= 2 * math.hypot(se[i], se[j]):
            noise = (f"; its coefficients at k = {k} and {rec} lie within two standard "
                     f"errors of each other, so the runs do not tell them apart")
    return (f"consensus clustering answers another question, how many clusters of samples "
            f"reproduce across runs{low}: use k = {k} to cluster the samples{noise}")


_register(_Criterion(
    "cophenetic", consensus, (_Pick(
        "cophenetic", "cophenetic correlation (Brunet)", "cophenetic (Brunet)",
        lambda co: co.best_rank, edge=_edge_of_range(bottom=False, single=True),
        still="coefficient highest"),),
    stream=1, min_rank=2, options="consensus_kwargs", defaults={"n_runs": "auto"},
    check=lambda shape, axis="columns", **_: _check_consensus_size(shape, axis),
    columns=_cophenetic_columns,
    details=lambda co: {"ranks": _json_array(co.ranks), "cophenetic": _json_array(co.cophenetic),
                        "cophenetic_se": None if getattr(co, "cophenetic_se", None) is None
                        else _json_array(co.cophenetic_se),
                        "n_runs": None if getattr(co, "n_runs", None) is None
                        else _json_array(co.n_runs),
                        "dispersion": _json_array(co.dispersion),
                        "pac": None if co.pac is None else _json_array(co.pac),
                        "best_rank": co.best_rank, "axis": co.axis},
    panel=lambda ax, co, picks: _draw_cophenetic(ax, co, picks.get("cophenetic")),
    title="Consensus stability",
    question="the number of clusters of samples that reproduce across runs",
    precedence=5, dissent=_cophenetic_dissent))


# component stability ------------------------------------------------------------------------

def _stability_edge(st, k, ranks):
    """A bound when the largest rank tried still reproduces, or when no rank does."""
    if st.min_silhouette[-1] >= st.threshold and len(st.ranks) > 1:
        return ">="
    if st.min_silhouette.max() < st.threshold:
        return "<="
    return None


def _stability_bound(st, k, edge):
    if edge == "<=":
        return (f"none (no rank tried has every component reproducing: worst silhouette "
                f"below {st.threshold:g})", "none")
    return None


def _stability_details(st):
    return {"ranks": _json_array(st.ranks), "min_silhouette": _json_array(st.min_silhouette),
            "silhouette": _json_array(st.silhouette),
            "component_silhouettes": {str(k): _json_array(v)
                                      for k, v in st.cluster_silhouettes.items()},
            "similarity": _json_array(st.similarity), "error": _json_array(st.error),
            "threshold": st.threshold, "best_rank": st.best_rank, "axis": st.axis}


def _stability_dissent(st, k, rec):
    if k < rec:
        return (f"past k = {k} some component does not reproduce from run to run: it helps "
                "predict held-out cells but is not uniquely determined; for programs to "
                f"interpret, compare the consensus components at k = {k}")
    return (f"components still reproduce at k = {k}, but held-out cells gain nothing past "
            f"k = {rec}: reproducible components are necessary, not sufficient")


_register(_Criterion(
    "stability", stability, (_Pick(
        "stability", "component stability (largest k whose components reproduce)",
        "component stability", lambda st: st.best_rank, edge=_stability_edge,
        still="components still reproduce", bound=_stability_bound),),
    stream=4, min_rank=2, details=_stability_details,
    columns=lambda st: {"stability": _by_rank(st.ranks, st.min_silhouette)},
    panel=lambda ax, st, picks: _draw_stability(ax, st, picks.get("stability")),
    title="Component stability across runs",
    question="the largest rank whose components all reproduce across runs",
    precedence=3, dissent=_stability_dissent))


CRITERIA = tuple(_CRITERIA)


def _json_array(a):
    """An array as nested lists for JSON, NaN as null."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return np.where(np.isnan(a), None, a.astype(object)).tolist()
    return a.tolist()


def _format_number(value):
    if value is None or value != value:  # none, or NaN: not fitted
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _check_ranks(ranks, shape, minimum=1):
    ranks = np.array([_check_n_components(k, shape) for k in ranks], dtype=int)
    if ranks.size == 0:
        raise ValueError("ranks is empty")
    if ranks.min() < minimum:
        raise ValueError(f"ranks must be >= {minimum} here; got {ranks.min()}")
    if np.any(np.diff(ranks) <= 0):
        raise ValueError(f"ranks must be strictly increasing; got {ranks.tolist()}")
    return ranks


def _check_positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _seed_sequence(random_state):
    """A SeedSequence from None, an int, a SeedSequence or a Generator."""
    if isinstance(random_state, np.random.SeedSequence):
        return random_state
    if isinstance(random_state, np.random.Generator):
        return np.random.SeedSequence(int(random_state.integers(2**63)))
    return np.random.SeedSequence(random_state)


def _nan_copy(data):
    """What the per-task fits receive: a dense float array with NaN at missing cells, or the
    validated CSR matrix of sparse input (never densified)."""
    if data.masked:
        out = np.full(data.shape, np.nan, dtype=data.dtype)
        out[data.rows, data.cols] = data.values
        return out
    return data.dense if data.sparse is None else data.sparse


def _sq_sum(X):
    """Sum of squares of the observed cells of a dense (NaN = missing) or sparse X."""
    if sp.issparse(X):
        return _sqnorm(X.data)
    return float(np.nansum(np.asarray(X, dtype=np.float64) ** 2))


# =============================================================================================
# Plotting (matplotlib is imported on first use: `import nmf_cv` does not need it)
# =============================================================================================

# One style per kind of rank mark, so a mark reads the same in every panel.
_MARK_STYLES = {"best_rank": {"color": "C3", "linestyle": "--"},
                "best_rank_1se": {"color": "C1", "linestyle": ":"},
                "prior": {"color": "0.35", "linestyle": "-."}}


def plot_loss(results, *, x="iteration", normalize=False, labels=None, ax=None):
    """Objective per iteration (or per second) of one or several fits, on a log scale.

    Parameters
    ----------
    results : NMFResult, list of NMFResult, or dict label -> NMFResult
        Fits to compare on one axes.
    x : {"iteration", "time"}
        Horizontal axis: iteration number, or seconds since the fit started
        (``time_history``).
    normalize : bool
        Divide each curve by its initial objective, so fits with different losses or data
        share a scale (the objective's relative decrease, which is what ``tol`` tests).
    labels : list of str, optional
        Legend entries for a list of results; default ``"method, loss"``.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        One line per fit: ``loss_history`` (the objective of the module docstring, penalties
        included), starting at the initial point.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, random_state=0)
    >>> fits = [nmf_cv.fit_nmf(X, 2, method=m, max_iter=20) for m in ("hals", "mu")]
    >>> ax = nmf_cv.plot_loss(fits, normalize=True)
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['hals, frobenius', 'mu, frobenius']
    >>> plt.close("all")
    """
    _check_choice(x, ("iteration", "time"), "x")
    named = _named_results(results, labels)
    ax = _new_axes(ax)
    for label, res in named:
        y = np.asarray(res.loss_history, dtype=float)
        if normalize:
            if not y[0] > 0:
                raise ValueError(f"cannot normalize {label!r}: its initial objective is {y[0]}")
            y = y / y[0]
        xs = np.arange(len(y)) if x == "iteration" else np.asarray(res.time_history)
        ax.plot(xs, y, label=label)
    if any(np.any(np.asarray(res.loss_history) > 0) for _, res in named):
        _log_y(ax)  # objectives fall by decades; a linear axis shows only the start
    ax.set_xlabel("iteration" if x == "iteration" else "time (s)")
    ax.set_ylabel("objective / initial objective" if normalize else "objective")
    if len(named) > 1 or labels is not None:
        ax.legend(fontsize="small")
    return ax


def plot_cv(cv_result, *, ax=None):
    """Median held-out error ± robust standard error against the rank, every fold as a faint
    point, and the training error.

    Works for `cross_validate` and `bicross_validate` results alike. All share one log-scale
    axis: past the best rank the training error keeps falling while the held-out error
    flattens or rises. Folds above 3x their rank's median (``n_outlier_folds``) are drawn as
    red crosses, so a fit that blew up or stuck is seen, not averaged in.

    Parameters
    ----------
    cv_result : CVResult
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        Marks ``best_rank`` (dashed, minimum) and ``best_rank_1se`` (dotted, one-SE rule) as
        vertical lines whose ``gid`` is the attribute's name.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> cv = nmf_cv.cross_validate(X, [1, 2, 3], n_folds=3, random_state=0, progress=False)
    >>> ax = nmf_cv.plot_cv(cv)
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('rank k', 'PRESS')
    >>> plt.close("all")
    """
    ax = _new_axes(ax)
    _draw_cv(ax, cv_result, cv_result.best_rank, cv_result.best_rank_1se)
    _rank_axis(ax, cv_result.ranks)
    _legend(ax)
    return ax


def plot_cophenetic(consensus_result, *, ax=None):
    """Cophenetic correlation and dispersion coefficient against the rank.

    Parameters
    ----------
    consensus_result : ConsensusResult
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        ``best_rank`` is marked by a vertical line with ``gid="best_rank"``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> co = nmf_cv.consensus(X, [2, 3], n_runs=4, max_iter=50, random_state=0,
    ...                       progress=False)
    >>> ax = nmf_cv.plot_cophenetic(co)
    >>> ax.get_ylabel()
    'coefficient (1 = stable)'
    >>> plt.close("all")
    """
    ax = _new_axes(ax)
    _draw_cophenetic(ax, consensus_result, consensus_result.best_rank)
    _rank_axis(ax, consensus_result.ranks)
    _legend(ax)
    return ax


def plot_randomized_rss(result, *, ax=None):
    """RSS of the data and of randomized copies against the rank (log scale).

    On a log axis the slope between two ranks is the fraction of RSS one more rank removes,
    which is what `randomized_rss` compares: the data's curve falls more steeply than the
    randomized one up to the suggested rank.

    Parameters
    ----------
    result : RandomizedRSSResult
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        The randomized curve is the mean over permutations with min-max bars; ``best_rank``
        is marked by a vertical line with ``gid="best_rank"``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> ra = nmf_cv.randomized_rss(X, [1, 2, 3], n_permutations=2, random_state=0,
    ...                            progress=False)
    >>> ax = nmf_cv.plot_randomized_rss(ra)
    >>> ax.get_yscale()
    'log'
    >>> plt.close("all")
    """
    ax = _new_axes(ax)
    _draw_randomized(ax, result, result.best_rank)
    _rank_axis(ax, result.ranks)
    _legend(ax)
    return ax


def plot_stability(result, *, ax=None):
    """Component stability and reconstruction error against the rank (as cNMF's k plot).

    The worst component's silhouette (the rule's curve) and the mean silhouette on the left
    axis with the rule's threshold; the runs' mean relative error on a second axis at the
    right. Choose the largest rank whose components all reproduce, where the error has
    mostly stopped falling.

    Parameters
    ----------
    result : StabilityResult
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        The silhouette axes; ``best_rank`` is a vertical line with ``gid="best_rank"`` when
        some rank is stable. The error axes is its twin (label ``"stability error"``).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> st = nmf_cv.stability(X, [2, 3], n_runs=4, random_state=0, progress=False)
    >>> ax = nmf_cv.plot_stability(st)
    >>> ax.get_ylabel()
    'silhouette (1 = reproducible)'
    >>> plt.close("all")
    """
    ax = _new_axes(ax)
    _draw_stability(ax, result, result.best_rank)
    _rank_axis(ax, result.ranks)
    _legend(ax)
    return ax


def plot_consensus(consensus_result, k, *, labels=None, fig=None, cmap="Blues"):
    """Consensus matrix at rank k, ordered by its average-linkage dendrogram.

    The samples are ordered by the leaves of the average-linkage tree on ``1 - C`` (the tree
    behind the cophenetic correlation), drawn above the heatmap; stable clusters show as
    dark diagonal blocks.

    Parameters
    ----------
    consensus_result : ConsensusResult
    k : int
        One of ``consensus_result.ranks``.
    labels : sequence of length n, optional
        A known class per sample (any hashable values), drawn as a colour strip between the
        dendrogram and the heatmap, one colour per class, with a legend.
    fig : matplotlib Figure or SubFigure, optional
        An empty (sub)figure to draw in.
    cmap : str or Colormap

    Returns
    -------
    matplotlib Figure
        Its Axes carry labels (``Axes.get_label()``): ``"dendrogram k=<k>"``,
        ``"classes k=<k>"`` (only with ``labels``), ``"consensus k=<k>"`` (the heatmap; its
        image is ``C[leaves][:, leaves]``) and ``"colorbar k=<k>"``, in that order in
        ``fig.axes``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> co = nmf_cv.consensus(X, [2, 3], n_runs=4, max_iter=50, random_state=0,
    ...                       progress=False)
    >>> fig = nmf_cv.plot_consensus(co, 2, labels=["a"] * 10 + ["b"] * 10)
    >>> [ax.get_label() for ax in fig.axes]
    ['dendrogram k=2', 'classes k=2', 'consensus k=2', 'colorbar k=2']
    >>> plt.close("all")
    """
    C = _consensus_matrix(consensus_result, k)
    fig = _new_figure(fig, (5.5, 6.0))
    _draw_consensus(fig, C, int(k), labels, cmap, _cophenetic_at(consensus_result, k))
    return fig


def plot_consensus_grid(consensus_result, ranks=None, *, labels=None, fig=None, cmap="Blues"):
    """`plot_consensus` for several ranks side by side, one subfigure each.

    Parameters
    ----------
    consensus_result : ConsensusResult
    ranks : iterable of int, optional
        Default: every rank of the result.
    labels, cmap
        As in `plot_consensus`.
    fig : matplotlib Figure, optional
        An empty figure to draw in.

    Returns
    -------
    matplotlib Figure
        ``fig.subfigs`` holds one subfigure per rank; the Axes are labelled as in
        `plot_consensus` (``"consensus k=3"`` is the heatmap at rank 3).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> co = nmf_cv.consensus(X, [2, 3], n_runs=4, max_iter=50, random_state=0,
    ...                       progress=False)
    >>> fig = nmf_cv.plot_consensus_grid(co)
    >>> [ax.get_label() for ax in fig.axes if ax.get_label().startswith("consensus")]
    ['consensus k=2', 'consensus k=3']
    >>> plt.close("all")
    """
    ranks = [int(k) for k in (consensus_result.ranks if ranks is None else ranks)]
    matrices = [_consensus_matrix(consensus_result, k) for k in ranks]  # fail before drawing
    fig = _new_figure(fig, (4.2 * len(ranks), 5.0))
    for sub, k, C in zip(fig.subfigures(1, len(ranks), squeeze=False).ravel(), ranks, matrices,
                         strict=True):
        _draw_consensus(sub, C, k, labels, cmap, _cophenetic_at(consensus_result, k))
    return fig


def plot_components(F, *, kind="columns", shape=None, true=None, match=True, x=None, ax=None,
                    fig=None, cmap="viridis"):
    """Components of a factor as curves on one axes, or as images in a grid.

    Parameters
    ----------
    F : array-like
        A factor: ``W`` (m x k) with ``kind="columns"``, or ``H`` (k x n) with
        ``kind="rows"``.
    kind : {"columns", "rows"}
        Whether the components are the columns (W) or the rows (H) of ``F``.
    shape : (h, w), optional
        Draw each component reshaped (C order) to an ``h x w`` image instead of a curve.
    true : array-like, optional
        Planted components, laid out like ``F`` and as many: drawn dashed (curves) or in a
        second row of images, for comparison.
    match : bool
        With ``true``: NMF's components come in any order and scale, so pair each true
        component with a fitted one (largest total cosine similarity) and rescale it by least
        squares onto its partner. False draws ``true`` as given.
    x : array-like, optional
        Horizontal coordinates of the curves (e.g. wavelengths); default ``0, 1, ...``.
    ax : matplotlib Axes, optional
        For curves.
    fig : matplotlib Figure or SubFigure, optional
        For images (an empty one), or to hold the curves' Axes.
    cmap : str or Colormap
        For images.

    Returns
    -------
    matplotlib Axes (curves) or Figure (images)
        Curves have ``gid`` ``"component"`` or ``"true"``; image Axes are labelled
        ``"component <i>"`` and ``"true <i>"`` (from 1).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> res = nmf_cv.fit_nmf(nmf_cv.make_planted(30, 20, 2, random_state=0), 2, max_iter=50)
    >>> ax = nmf_cv.plot_components(res.W)
    >>> len(ax.lines)
    2
    >>> fig = nmf_cv.plot_components(res.H, kind="rows", shape=(4, 5))
    >>> [a.get_label() for a in fig.axes]
    ['component 1', 'component 2']
    >>> plt.close("all")
    """
    comps = _components(F, kind, "F")
    ref = None
    if true is not None:
        ref = _components(true, kind, "true")
        if ref.shape != comps.shape:
            raise ValueError(f"true holds {ref.shape[0]} components of length {ref.shape[1]}; "
                             f"F holds {comps.shape[0]} of length {comps.shape[1]}")
        if match:
            ref = _match_components(comps, ref)
    if shape is None:
        return _draw_curves(comps, ref, x, kind, ax, fig)
    if ax is not None:
        raise ValueError("images are drawn in a grid of Axes: pass fig, not ax")
    return _draw_images(comps, ref, tuple(shape), fig, cmap)


def plot_rank_report(report, *, fig=None):
    """Every criterion of a `RankReport` in one figure, each suggestion marked.

    One panel per criterion present, in the registry's order (`CRITERIA`); a ``"prior"``
    result (attributes ``rank`` and ``rank_int``, None when not identifiable) is a dash-dot
    vertical line at ``rank`` in every panel. When the report holds a recommendation, a last
    panel (label ``"recommendation"``) shows what it rests on: each criterion's pick on one
    line (a bound as an arrow), the ranks cross-validation cannot tell apart shaded, the
    recommended rank marked. The title gives the recommended rank and every suggestion.

    Parameters
    ----------
    report : RankReport
    fig : matplotlib Figure, optional
        An empty figure to draw in.

    Returns
    -------
    matplotlib Figure
        Each panel's Axes is labelled with its criterion (``ax.get_label() == "cv"``); marks
        have ``gid`` ``"best_rank"``, ``"best_rank_1se"`` or ``"prior"``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, nmf_cv
    >>> X = nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)
    >>> report = nmf_cv.choose_rank(X, [1, 2, 3], criteria=("cv", "randomized"),
    ...                             random_state=0, progress=False)
    >>> fig = nmf_cv.plot_rank_report(report)
    >>> [ax.get_label() for ax in fig.axes]
    ['cv', 'randomized', 'recommendation']
    >>> fig.savefig("rank_report.png")  # doctest: +SKIP
    >>> plt.close("all")
    """
    present = report.criteria()
    shown = dict((c.name, result) for c, result in report.shown())
    panels = [c for c, _ in report.shown() if c.panel is not None]
    marks = [c for c in present if c.mark is not None]
    if not panels and not marks:
        raise ValueError(f"the report holds no criterion to plot: {list(report.results)}")
    n_panels = max(1, len(panels)) + bool(report.recommendation)
    ncols = max(1, n_panels) if n_panels <= 3 else 2
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = _new_figure(fig, (4.8 * ncols, 3.6 * nrows + 0.7))
    grid = fig.add_gridspec(nrows, ncols)
    for i, criterion in enumerate(panels or [None]):
        if criterion is None:  # a report holding only marks (a prior) still gets an axes
            ax = fig.add_subplot(grid[0, 0], label=marks[0].name)
            ax.set_title(marks[0].title)
            ax.set_yticks([])
        else:
            ax = fig.add_subplot(grid[i // ncols, i % ncols], label=criterion.name)
            criterion.panel(ax, shown[criterion.name], report.suggestions)
            ax.set_title(criterion.title + (" (unfinished)" if criterion.name in
                                            report.partial else ""))
        for marker in marks:
            marker.mark(ax, report.results[marker.name], report.ranks)
        _rank_axis(ax, report.ranks)
        _legend(ax)
    if report.recommendation:
        i = max(1, len(panels))
        ax = fig.add_subplot(grid[i // ncols, i % ncols], label="recommendation")
        _draw_recommendation(ax, report)
        _rank_axis(ax, report.ranks)
    fig.suptitle(_summary(report, fig.bbox.width / fig.dpi))
    return fig


def _new_axes(ax, fig=None, figsize=(5.5, 4.0)):
    """The caller's Axes, else one in the caller's figure, else in a new figure."""
    if ax is not None:
        return ax
    return _new_figure(fig, figsize).add_subplot()


def _new_figure(fig, figsize):
    if fig is not None:
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained")


def _rank_axis(ax, ranks):
    """Integer ticks on the rank axis, half a rank of room either side."""
    from matplotlib.ticker import MaxNLocator

    ranks = np.asarray(ranks)
    ax.set_xlim(ranks.min() - 0.5, ranks.max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank k")


def _log_scale_if_positive(ax, *arrays):
    """Log y when every value is positive (NaN, a rank not fitted on a split, is left out):
    rank-selection errors span decades."""
    values = [np.asarray(a, dtype=float) for a in arrays]
    if all(np.all(v[~np.isnan(v)] > 0) for v in values):
        _log_y(ax)


def _log_y(ax):
    """Log y axis with plain tick labels (3, 10, 0.01), not mathtext (3 x 10^0)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _legend(ax):
    """Legend with the curves first and the rank marks after them."""
    handles, labels = ax.get_legend_handles_labels()
    marks = [getattr(h, "get_gid", lambda: None)() in _MARK_STYLES for h in handles]
    order = sorted(range(len(handles)), key=lambda i: marks[i])
    place = {}
    if any(line.get_gid() == "cophenetic" for line in ax.lines):
        # Both coefficients are at most 1: room above 1 holds the legend off the curves.
        ax.set_ylim(top=1.12)
        place = {"loc": "upper center", "ncols": 2}
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="small",
              **place)


def _mark_rank(ax, k, rule, gid):
    if k is not None:
        ax.axvline(k, label=f"{rule}: k = {k}", gid=gid, linewidth=1.5, **_MARK_STYLES[gid])


def _mark_prior(ax, prior, ranks):
    rank = _prior_rank(prior)
    if rank is None:  # not identifiable, or a misfit: the title says so
        return
    off = not ranks.min() - 0.5 <= rank <= ranks.max() + 0.5
    ax.axvline(rank, label=f"prior predictive k ≈ {rank:.1f}" + (" (off the axis)" if off else ""),
               gid="prior", linewidth=1.5, **_MARK_STYLES["prior"])


def _prior_rank(prior):
    """The prior's float estimate, else its integer one; None when it is not identifiable or
    its likelihood does not fit the data."""
    if getattr(prior, "misfit", ""):
        return None
    rank = getattr(prior, "rank", None)
    if rank is None:
        rank = getattr(prior, "rank_int", None)
    return None if rank is None else float(rank)


def _draw_cv(ax, cv, best, best_1se, bicv=False):
    kl = getattr(cv, "loss", "frobenius") == "kl"
    held = "held-out Poisson deviance" if kl else "PRESS"
    train_name = "deviance" if kl else "RSS"
    train_label = f"{train_name} of the fit to D" if bicv else f"training {train_name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a rank not fitted (unfinished run)
        train = np.nanmedian(np.asarray(cv.train_rss).reshape(len(cv.ranks), -1), axis=1)
    per_fold = np.asarray(cv.press).reshape(len(cv.ranks), -1)
    ranks = np.repeat(cv.ranks, per_fold.shape[1])
    outlier = (per_fold > _OUTLIER_FOLD * cv.press_median[:, None]).ravel()
    if per_fold.shape[1] > 1:
        ax.plot(ranks[~outlier], per_fold.ravel()[~outlier], ".", color="C0", alpha=0.3,
                markersize=5, gid="folds", label="each fold")
    if outlier.any():
        ax.plot(ranks[outlier], per_fold.ravel()[outlier], "x", color="C3", gid="outlier_folds",
                label=f"fold > {_OUTLIER_FOLD:g}x its median")
    bars = ax.errorbar(cv.ranks, cv.press_median, yerr=cv.press_mad_se, fmt="o-", color="C0",
                       capsize=3, label=f"{'BCV ' if bicv else ''}{held} (median ± robust SE)")
    bars.lines[0].set_gid("press")
    ax.plot(cv.ranks, train, "s--", color="C7", markersize=4, gid="train",
            label=f"{train_label} (median)")
    _log_scale_if_positive(ax, per_fold, train)
    ax.set_ylabel(held)
    _mark_rank(ax, best, "pick", "best_rank")
    _mark_rank(ax, best_1se, "one-SE rule", "best_rank_1se")


def _draw_cophenetic(ax, co, best):
    se = getattr(co, "cophenetic_se", None)
    if se is None:
        ax.plot(co.ranks, co.cophenetic, "o-", color="C0", gid="cophenetic",
                label="cophenetic correlation")
    else:
        bars = ax.errorbar(co.ranks, co.cophenetic, yerr=np.nan_to_num(se), fmt="o-",
                           color="C0", capsize=3, label="cophenetic correlation (± se)")
        bars.lines[0].set_gid("cophenetic")
    ax.plot(co.ranks, co.dispersion, "s--", color="C2", gid="dispersion", label="dispersion")
    if getattr(co, "pac", None) is not None:
        lo, hi = co.pac_interval
        ax.plot(co.ranks, 1.0 - np.asarray(co.pac), "^:", color="C1", gid="pac",
                label=f"1 - PAC({lo:g}, {hi:g})")
    ax.set_ylabel("coefficient (1 = stable)")
    _mark_rank(ax, best, "Brunet's rule", "best_rank")


def _draw_randomized(ax, ra, best):
    rand = np.asarray(ra.rss_randomized, dtype=float)
    mean = ra.rss_randomized_mean
    ax.plot(ra.ranks, ra.rss, "o-", color="C0", gid="rss", label="data")
    bars = ax.errorbar(ra.ranks, mean, yerr=[mean - rand.min(axis=1), rand.max(axis=1) - mean],
                       fmt="s--", color="C7", markersize=4, capsize=3,
                       label=f"randomized (mean, min-max of {rand.shape[1]})")
    bars.lines[0].set_gid("rss_randomized")
    _log_scale_if_positive(ax, ra.rss, mean)
    ax.set_ylabel("RSS")
    _mark_rank(ax, best, "randomized rule", "best_rank")


def _draw_stability(ax, st, best):
    ax.plot(st.ranks, st.min_silhouette, "o-", color="C0", gid="min_silhouette",
            label="silhouette, worst component")
    ax.plot(st.ranks, st.silhouette, "s--", color="C2", markersize=4, gid="silhouette",
            label="silhouette, mean")
    ax.axhline(st.threshold, color="C7", linewidth=0.8, linestyle=":", gid="threshold",
               label=f"threshold {st.threshold:g}")
    ax.set_ylabel("silhouette (1 = reproducible)")
    ax.set_ylim(min(-0.05, float(np.min(st.min_silhouette)) - 0.05), 1.05)
    if best is not None and st.min_silhouette.max() >= st.threshold:
        _mark_rank(ax, best, "largest stable", "best_rank")
    err = ax.twinx()  # the error on its own scale, so one panel shows both as cNMF's does
    err.set_label("stability error")
    err.plot(st.ranks, st.error, "^:", color="C3", gid="error")
    err.set_ylabel("relative error", color="C3")
    err.tick_params(axis="y", colors="C3")
    ax.plot([], [], "^:", color="C3", label="relative error, mean (right)")


def _draw_recommendation(ax, report):
    """What the recommendation rests on: one line per criterion's pick (a bound as an
    arrow), cross-validation's near-equal ranks shaded, the recommended rank marked."""
    rows = []
    for criterion in report.criteria():
        pick = criterion.picks[0]
        k, edge = report.suggestions.get(pick.key), report.edges.get(pick.key)
        if k is not None:
            rows.append((pick.short, k, edge))
    rec = report.recommended_rank
    if report.near_ranks:
        ax.axvspan(min(report.near_ranks) - 0.3, max(report.near_ranks) + 0.3, color="C0",
                   alpha=0.12, gid="near_ranks", label="CV cannot tell apart")
    if rec is not None:
        ax.axvline(rec, color="C3", linewidth=2, gid="recommended", label=f"recommended: {rec}")
    for y, (name, k, edge) in enumerate(rows):
        agrees = k == rec or (edge == ">=" and rec is not None and rec >= k) or (
            edge == "<=" and rec is not None and rec <= k)
        marker = {">=": ">", "<=": "<"}.get(edge, "o")
        ax.plot([k], [y], marker, markersize=9, color="C2" if agrees else "C1",
                gid=f"pick {name}")
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_title("Recommended k = " + (str(rec) if rec is not None else "none"))
    _legend(ax)


def _summary(report, width):
    """Title text: the recommended rank, then every suggestion, wrapped to the figure's width
    (in inches)."""
    items = []
    for criterion in report.criteria():
        result = report.results[criterion.name]
        for pick in criterion.picks:
            k, edge = report.suggestions.get(pick.key), report.edges.get(pick.key)
            text = pick.brief(result, k, edge) if pick.brief is not None else None
            if text is None and k is not None:
                text = str(k) if edge is None else _edge_text_short(result, pick.key, k, edge)
            if text is not None:
                items.append(f"{pick.short}: {text}")
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 3 + len(item) > 9 * width:  # ~9 characters an inch
            lines.append("")
        lines[-1] += ("   " if lines[-1] else "") + item
    head = ["Suggested rank"]
    if report.recommendation:
        rec = report.recommended_rank
        head = [f"Recommended k = {rec}" if rec is not None else "No recommended k"]
        head[0] += "   |   suggested rank by each criterion:"
    return "\n".join(head + lines)


def _named_results(results, labels):
    """(label, NMFResult) pairs from one result, a list or a dict."""
    if isinstance(results, dict):
        if labels is not None:
            raise ValueError("labels are the dict's keys; do not pass both")
        return [(str(name), res) for name, res in results.items()]
    if hasattr(results, "loss_history"):
        results = [results]
    results = list(results)
    if labels is None:
        labels = [f"{res.method}, {res.loss}" for res in results]
    elif len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    return list(zip(labels, results, strict=True))


def _consensus_matrix(result, k):
    try:
        return np.asarray(result.consensus_matrices[int(k)], dtype=float)
    except KeyError:
        raise ValueError(f"no consensus matrix at rank {k}; ranks: "
                         f"{sorted(result.consensus_matrices)}") from None


def _cophenetic_at(result, k):
    return float(np.asarray(result.cophenetic)[list(np.asarray(result.ranks)).index(int(k))])


def _draw_consensus(fig, C, k, labels, cmap, cophenetic):
    """Dendrogram, optional class strip, heatmap and colour bar in one (sub)figure."""
    from scipy.cluster.hierarchy import dendrogram, linkage

    n = len(C)
    classes = None if labels is None else _class_codes(labels, n)
    heights = [1.0] + ([0.12] if classes else []) + [4.0]
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[20, 1])
    tree = fig.add_subplot(grid[0, 0], label=f"dendrogram k={k}")
    Z = linkage(_consensus_distances(C), method="average")
    order = np.asarray(dendrogram(Z, ax=tree, no_labels=True,
                                  link_color_func=lambda _: "0.3")["leaves"])
    edge = 10.0 * n  # dendrogram draws leaf i of its order at 10 i + 5
    tree.set_xlim(0, edge)
    tree.set_axis_off()
    tree.set_title(f"k = {k}   cophenetic {cophenetic:.3f}")
    if classes:
        _draw_classes(fig, fig.add_subplot(grid[1, 0], label=f"classes k={k}"), *classes,
                      order, edge)
    heat = fig.add_subplot(grid[-1, 0], label=f"consensus k={k}")
    image = heat.imshow(C[np.ix_(order, order)], cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                        interpolation="nearest", extent=(0, edge, edge, 0))
    _sample_ticks(heat, order, edge)
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[-1, 1], label=f"colorbar k={k}"))
    bar.set_ticks([0.0, 0.5, 1.0])
    bar.set_label("fraction of runs together")


def _sample_ticks(ax, order, edge):
    """Sample numbers along the heatmap when they are few enough to read."""
    ticks = np.arange(5.0, edge, 10.0)
    if len(order) > 30:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xticks(ticks, [str(i) for i in order], rotation=90, fontsize="x-small")
    ax.set_yticks(ticks, [str(i) for i in order], fontsize="x-small")


def _class_codes(labels, n):
    """Code of each sample's class and the classes in order of first appearance (labels need
    only be hashable, not sortable)."""
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} samples")
    classes = list(dict.fromkeys(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in labels]), classes


def _class_colors(n):
    from matplotlib import colormaps

    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    return [tuple(c) for c in colormaps["turbo"](np.linspace(0.0, 1.0, n))]


def _draw_classes(fig, ax, codes, classes, order, edge):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = _class_colors(len(classes))
    ax.imshow(codes[order][None, :], cmap=ListedColormap(colors), vmin=-0.5,
              vmax=len(classes) - 0.5, aspect="auto", interpolation="nearest",
              extent=(0, edge, 1, 0))
    ax.set_axis_off()
    handles = [Patch(color=c, label=str(name)) for c, name in zip(colors, classes, strict=True)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(classes), 5),
               fontsize="small", frameon=False)


def _components(F, kind, name):
    """Components as the rows of a 2-D float array."""
    _check_choice(kind, ("columns", "rows"), "kind")
    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {F.shape}")
    return F.T if kind == "columns" else F


def _match_components(comps, ref):
    """ref reordered to pair with comps (maximum total cosine similarity), each row rescaled
    by least squares onto its partner (NMF fixes neither order nor scale)."""
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(_unit_rows(comps) @ _unit_rows(ref).T, maximize=True)
    ref = ref[cols]
    sq = np.einsum("ij,ij->i", ref, ref)
    scale = np.einsum("ij,ij->i", comps, ref) / np.where(sq > 0, sq, 1.0)
    return ref * scale[:, None]


def _draw_curves(comps, ref, x, kind, ax, fig):
    from matplotlib.lines import Line2D

    ax = _new_axes(ax, fig)
    x = np.arange(comps.shape[1]) if x is None else np.asarray(x)
    for i, comp in enumerate(comps):
        ax.plot(x, comp, color=f"C{i % 10}", gid="component", label=f"component {i + 1}")
    handles = ax.get_legend_handles_labels()[0]
    if ref is not None:
        for i, comp in enumerate(ref):
            ax.plot(x, comp, color=f"C{i % 10}", linestyle="--", gid="true")
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="true (dashed)"))
    ax.set_xlabel("row" if kind == "columns" else "column")
    ax.set_ylabel("loading")
    ax.legend(handles=handles, fontsize="small", ncols=1 + len(handles) // 9)
    return ax


def _draw_images(comps, ref, shape, fig, cmap):
    if math.prod(shape) != comps.shape[1]:
        raise ValueError(f"shape {shape} holds {math.prod(shape)} values; each component has "
                         f"{comps.shape[1]}")
    k = len(comps)
    ncols = math.ceil(math.sqrt(k))
    per_row = 1 if ref is None else 2  # a row of true images under each row of components
    nrows = math.ceil(k / ncols) * per_row
    fig = _new_figure(fig, (2.0 * ncols, 2.1 * nrows))
    grid = fig.add_gridspec(nrows, ncols)
    sets = [("component", comps)] + ([] if ref is None else [("true", ref)])
    for offset, (name, rows) in enumerate(sets):
        for i, comp in enumerate(rows):
            ax = fig.add_subplot(grid[(i // ncols) * per_row + offset, i % ncols],
                                 label=f"{name} {i + 1}")
            ax.imshow(comp.reshape(shape), cmap=cmap, interpolation="nearest")
            ax.set_title(f"{name} {i + 1}", fontsize="small")
            ax.set_axis_off()
    return fig


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    """Command line: ``python -m nmf_cv {fit,rank,report,demo} ...`` (``--help`` on each).

    User errors (unreadable files, bad ranges, negative data...) print one line on stderr and
    return 2.

    Examples
    --------
    >>> import nmf_cv
    >>> nmf_cv.main(["demo", "--rows", "60", "--cols", "40", "--no-ranks"])  # doctest: +ELLIPSIS
    planted rank 3...
    0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"nmf_cv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        why = str(stop)  # what a stage says when stopped inside it; between stages, nothing
        if not why and getattr(args, "checkpoint", None):
            why = (f"finished tasks are kept in the checkpoint {args.checkpoint}: run the "
                   "same command again to resume")
        print(f"nmf_cv {args.command}: stopped{': ' + why if why else ''}", file=sys.stderr)
        return 130


def _parser():
    parser = argparse.ArgumentParser(
        prog="nmf_cv", description="Non-negative matrix factorization with exact missing "
        "values, and the evidence on which rank k to use.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit X ~ W H and write W, H and a summary",
                         description="Fit X ~ W H (missing cells left out) and write "
                         "PREFIX_W.csv (rows x components), PREFIX_H.csv (components x "
                         "columns) and PREFIX_fit.json; with --runs, consensus components "
                         "over resamples of the samples (--samples) and "
                         "PREFIX_stability.csv.")
    _add_input(fit)
    fit.add_argument("-k", "--n-components", type=int, required=True, help="rank k")
    fit.add_argument("--method", choices=METHODS, default=None,
                     help="default: hals for the Frobenius loss, cd for kl")
    fit.add_argument("--loss", choices=LOSSES, default="frobenius",
                     help="kl: Poisson (counts), fitted by --method cd or mu "
                     "(default: %(default)s)")
    fit.add_argument("--init", choices=INITS, default="nndsvda")
    fit.add_argument("--max-iter", type=int, default=2000)
    fit.add_argument("--tol", type=float, default=1e-6)
    fit.add_argument("--seed", type=int, default=0, help="random_state (default: 0)")
    fit.add_argument("--runs", type=int, default=1,
                     help="consensus of this many runs from random inits, as cNMF's (default: "
                     "1, a single fit); writes each component's stability")
    _add_samples(fit, "that --runs resamples (their usages are the matched components' "
                 "weights)")
    fit.add_argument("--jobs", type=int, default=1,
                     help="worker processes for --runs (default: 1)")
    _add_dask(fit)
    fit.add_argument("--normalize-usage", action="store_true",
                     help="write each sample's usages scaled to sum to 1 (cNMF's usage): "
                     "W's rows, or H's columns with samples in columns")
    fit.add_argument("--format", choices=("csv", "tsv"), default="csv",
                     help="W and H files (default: %(default)s)")
    fit.add_argument("--write-h5ad", action="store_true",
                     help=".h5ad input: also write PREFIX_nmf.h5ad, a copy with W in "
                     "obsm['X_nmf'] and H in varm['nmf_components']")
    fit.set_defaults(run=_cli_fit)

    rank = sub.add_parser("rank", help="compare rank-selection criteria over a range of k",
                          description="Run choose_rank: print the table, write "
                          "PREFIX_rank.json and the dashboard figure.")
    _add_input(rank)
    rank.add_argument("--ranks", required=True, type=_parse_ranks,
                      help="e.g. 2:10 (inclusive), 2:10:2 or 2,3,5")
    _add_rank_options(rank)
    rank.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    rank.add_argument("--runs", type=_parse_int_or_auto, default="auto",
                      help="consensus restarts per rank, or auto: 10, and more where the pick "
                      "needs them (Brunet's protocol: 50)")
    rank.add_argument("--stability-runs", type=int, default=20,
                      help="component-stability fits per rank (default: %(default)s)")
    _add_samples(rank, "that consensus clusters and stability resamples")
    rank.add_argument("--repeats", type=_parse_int_or_auto, default="auto",
                      help="cross-validation fold splits, or auto: two for every rank, up "
                      "to five for the ranks still in contention (default: %(default)s)")
    rank.add_argument("--restarts", type=int, default=_N_RESTARTS,
                      help="fits per rank (and fold) for cv, randomized and bicv "
                      "(default: %(default)s)")
    rank.add_argument("--ridge", type=float, default=_RIDGE,
                      help="cross-validation's ridge, relative to the noise (default: "
                      "%(default)s)")
    rank.add_argument("--max-iter", type=int, default=_RANK_FIT_DEFAULTS["max_iter"],
                      help="iterations per fit, every criterion (default: %(default)s)")
    rank.add_argument("--loss", choices=LOSSES, default="frobenius",
                      help="cross-validation loss; kl (counts) fits by KL coordinate descent "
                      "and scores Poisson deviance; consensus then fits KL by coordinate "
                      "descent too (else Brunet's multiplicative updates)")
    rank.add_argument("--report", help="dashboard figure path (default: PREFIX_rank.png)")
    _add_dask(rank)
    rank.add_argument("--checkpoint", metavar="PATH",
                      help="directory keeping every finished fit: rerun the same command to "
                      "resume after an interruption")
    rank.set_defaults(run=_cli_rank)

    report = sub.add_parser("report", help="the rank report of a checkpoint, finished or not",
                            description="Print the report of a `rank --checkpoint DIR` run "
                            "from the fits it holds (nothing is fitted; unfinished criteria "
                            "are marked), and write PREFIX_rank.json and the dashboard.")
    report.add_argument("checkpoint", help="the directory given to rank --checkpoint")
    report.add_argument("--out", help="output prefix (default: the directory's name, here)")
    report.add_argument("--report", help="dashboard figure path (default: PREFIX_rank.png)")
    report.set_defaults(run=_cli_report)

    demo = sub.add_parser("demo", help="rank selection on a built-in planted matrix",
                          description="Fit a planted rank-3 matrix with 10%% of its cells "
                          "missing, compare rank-selection criteria, save the dashboard.")
    demo.add_argument("--rows", type=int, default=150)
    demo.add_argument("--cols", type=int, default=80)
    demo.add_argument("--rank", type=int, default=3)
    demo.add_argument("--missing", type=float, default=0.1)
    demo.add_argument("--no-ranks", dest="ranks", action="store_false",
                      help="skip rank selection (fits only)")
    demo.add_argument("--out", default=".", help="directory for demo_rank.png/.json")
    _add_rank_options(demo)
    demo.set_defaults(run=_demo)
    return parser


def _add_input(parser):
    parser.add_argument("file", help="CSV/TSV/whitespace text (header and row labels "
                        "detected; empty, NA or NaN cells are missing), .npy, a sparse "
                        ".mtx (Matrix Market) or .npz (scipy.sparse.save_npz) file, a 10x "
                        "Genomics folder (matrix.mtx, features.tsv, barcodes.tsv), or an "
                        "AnnData .h5ad file (cells x genes; needs anndata)")
    parser.add_argument("--layer", help=".h5ad input: the layer to read (default: X)")
    parser.add_argument("--out", help="output prefix (default: the input's name, here)")


def _add_samples(parser, what):
    parser.add_argument("--samples", choices=("rows", "columns"), default=None,
                        help=f"the axis of the samples (cells) {what}; default: rows for "
                        ".h5ad (cells x genes), else columns (genes x samples, as Brunet et "
                        "al. and 10x folders)")


def _sample_axis(args):
    """--samples, or its default for the input file (see `_add_samples`)."""
    if args.samples is None:
        return "rows" if args.file.endswith(".h5ad") else "columns"
    return args.samples


def _add_dask(parser):
    parser.add_argument("--dask", metavar="ADDRESS",
                        help="run the fits on a dask.distributed scheduler's workers: its "
                        "address (tcp://node1:8786) or scheduler file (sched.json); needs the "
                        "distributed package; instead of --jobs")


def _add_rank_options(parser):
    parser.add_argument("--criteria", type=_parse_criteria, default=tuple(_CRITERIA),
                        help=f"comma-separated, any of {','.join(_CRITERIA)} "
                        "(default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random_state (default: 0)")


def _parse_ranks(text):
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            return list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST:LAST[:STEP] or a comma-separated list, got {text!r}") from None


def _parse_int_or_auto(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _parse_criteria(text):
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in _CRITERIA]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown criteria {unknown}; choose from "
                                         f"{','.join(_CRITERIA)}")
    return names


def _cli_fit(args):
    X, row_labels, col_labels = read_matrix(args.file, layer=args.layer)
    if args.write_h5ad and not args.file.endswith(".h5ad"):
        raise ValueError("--write-h5ad needs an .h5ad input")
    _check_positive_int(args.runs, "--runs")
    args.samples = _sample_axis(args)
    # fit_nmf's runs resample rows: samples in columns are fitted as X' and written back
    flip = args.runs > 1 and args.samples == "columns"
    if flip and args.write_h5ad:
        raise ValueError("--write-h5ad needs --samples rows (an .h5ad file's cells)")
    kwargs = {"method": args.method, "loss": args.loss, "init": args.init,
              "max_iter": args.max_iter, "tol": args.tol, "random_state": args.seed}
    shape = X.shape
    missing = 0.0 if sp.issparse(X) else float(np.isnan(X).mean())
    if args.runs > 1:
        if flip:
            X = X.T.tocsr() if sp.issparse(X) else X.T
        with _cli_data(X, args) as X, _cli_executor(args.jobs, args.dask) as pool:
            res = fit_nmf(X, args.n_components, n_runs=args.runs, executor=pool,
                          progress=True, **kwargs)
    else:
        res = fit_nmf(X, args.n_components, **kwargs)
    del X
    prefix = _prefix(args)
    names = [f"component_{t + 1}" for t in range(res.n_components)]
    W, H = (res.H.T, res.W.T) if flip else (res.W, res.H)
    if args.normalize_usage:  # each sample's usages: W's rows, or H's columns
        if args.samples == "columns":
            H = H / _nonzero(H.sum(axis=0, keepdims=True))
        else:
            W = W / _nonzero(W.sum(axis=1, keepdims=True))
    sep = "\t" if args.format == "tsv" else ","
    files = [f"{prefix}_W.{args.format}", f"{prefix}_H.{args.format}"]
    _write_csv(files[0], W, row_labels, names, sep)
    _write_csv(files[1], H, names, col_labels, sep)
    summary = {"file": args.file, "layer": args.layer, "shape": list(shape),
               "samples": args.samples, "missing_fraction": missing,
               "n_components": res.n_components, "method": res.method, "loss": res.loss,
               "relative_error": res.relative_error, "n_iter": res.n_iter,
               "converged": res.converged, "objective": float(res.loss_history[-1]),
               "usage_normalized": args.normalize_usage, "time_s": res.time,
               "compile_time_s": res.compile_time}
    if res.component_stability is not None:
        summary.update(n_runs=res.n_runs, n_runs_kept=res.n_runs_kept,
                       component_stability=dict(zip(names, res.component_stability.tolist(),
                                                    strict=True)))
        files.append(f"{prefix}_stability.{args.format}")
        _write_csv(files[-1], np.column_stack([res.component_stability, res.W.sum(axis=0)]),
                   names, ["stability", "total_usage"], sep)
    if args.write_h5ad:
        files.append(f"{prefix}_nmf.h5ad")
        _write_h5ad(args.file, args.layer, files[-1], res, names)
    files.append(f"{prefix}_fit.json")
    _write_json(files[-1], summary)
    print(f"{res!r}\nwrote {', '.join(files)}")
    return 0


def _nonzero(sums):
    """Sums to divide by, a sample with no usage (all zeros) left as it is."""
    return np.where(sums > 0, sums, 1.0)


@contextlib.contextmanager
def _cli_data(X, args):
    """X as the command holds it while its fits run: with a local pool (``--jobs`` > 1), the
    copy in shared memory that the workers map, instead of the command's own (the data held
    once, not twice); else X itself."""
    if args.jobs == 1 or args.dask is not None:
        yield X
        return
    shared = _Shared(X)
    X = shared.local()
    try:
        yield X
    finally:
        del X
        shared.release()


@contextlib.contextmanager
def _cli_executor(jobs, dask=None):
    """Where the command's fits run: a dask.distributed scheduler at ``dask`` (an address),
    else a process pool of ``jobs`` workers (None for one), its fits stopped on Ctrl-C."""
    _check_positive_int(jobs, "--jobs")
    if dask is not None:
        if jobs != 1:
            raise ValueError("--dask and --jobs exclude each other: the scheduler's workers "
                             "run the fits")
        try:
            from distributed import Client
        except ImportError:
            raise ImportError("--dask needs the distributed package: pip install "
                              "distributed") from None
        try:
            client = (Client(scheduler_file=dask, timeout="20s") if dask.endswith(".json")
                      else Client(dask, timeout="20s"))
        except OSError as exc:
            raise OSError(f"--dask {dask}: no scheduler answers there ({exc})") from None
        with client:
            yield client
        return
    if jobs == 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        try:
            yield pool
        except KeyboardInterrupt:  # our own pool: stop its running fits too
            _terminate_workers(pool)
            raise


def _cli_rank(args):
    X, row_labels, col_labels = read_matrix(args.file, layer=args.layer)
    args.samples = _sample_axis(args)
    prefix = _prefix(args)
    if args.checkpoint is not None:  # where the data are, for `report` before the end
        os.makedirs(args.checkpoint, exist_ok=True)
        _atomic_write(os.path.join(args.checkpoint, "source.json"), json.dumps(
            {"file": os.path.abspath(args.file), "layer": args.layer,
             "arguments": {name: getattr(args, name) for name in _RANK_ARGUMENTS}}).encode())
    iterations = {"max_iter": args.max_iter}
    with _cli_data(X, args) as X:
        report = _rank_report(X, args.ranks, args, n_restarts=args.restarts,
                              cv_kwargs={"n_folds": args.folds, "n_repeats": args.repeats,
                                         "loss": args.loss, "ridge": args.ridge, **iterations},
                              consensus_kwargs={"n_runs": args.runs,
                                                "method": "cd" if args.loss == "kl" else "mu",
                                                "axis": args.samples, **iterations},
                              randomized_kwargs=iterations, bicv_kwargs=iterations,
                              stability_kwargs={"n_runs": args.stability_runs, "loss": args.loss,
                                                "axis": args.samples, **iterations},
                              checkpoint=args.checkpoint, progress=True)
    arguments = {name: getattr(args, name) for name in _RANK_ARGUMENTS}
    _save_report(report, f"{prefix}_rank.json", args.report or f"{prefix}_rank.png",
                 {"row_labels": row_labels, "col_labels": col_labels,
                  "arguments": {"file": args.file, **arguments}})
    return 0


def _cli_report(args):
    report = report_from_checkpoint(args.checkpoint)
    print(report)
    source = _read_manifest(os.path.join(args.checkpoint, "source.json")) or {}
    prefix = args.out or os.path.basename(os.path.normpath(args.checkpoint))
    labels = {"arguments": {"file": source.get("file"), **source.get("arguments", {})}}
    if report.results:
        _save_report(report, f"{prefix}_rank.json", args.report or f"{prefix}_rank.png",
                     labels)
    else:  # nothing finished: nothing to draw
        _write_json(f"{prefix}_rank.json", {**report.to_dict(), **labels})
        print(f"wrote {prefix}_rank.json")
    return 0


# what the rank command's JSON records, so that a run can be repeated
_RANK_ARGUMENTS = ("layer", "ranks", "criteria", "folds", "repeats", "restarts", "ridge",
                   "max_iter", "runs", "stability_runs", "samples", "loss", "seed", "jobs")


def _rank_report(X, ranks, args, **kwargs):
    start, compiled = time.perf_counter(), _COMPILING.seconds
    with _cli_executor(args.jobs, getattr(args, "dask", None)) as pool:
        report = choose_rank(X, ranks, args.criteria, random_state=args.seed, executor=pool,
                             **kwargs)
    print(report)
    note = _compiling_note(_COMPILING.seconds - compiled)  # this process's compiles
    print(f"({time.perf_counter() - start:.1f} s{note})")
    return report


def _save_report(report, json_path, figure_path, labels=None):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    fig = plot_rank_report(report)
    fig.savefig(figure_path, dpi=120)
    _write_json(json_path, {**report.to_dict(), **{k: v for k, v in (labels or {}).items()
                                                   if v is not None}})
    print(f"wrote {figure_path}, {json_path}")


def _demo(args):
    X = make_planted(args.rows, args.cols, args.rank, noise=0.05, missing=args.missing,
                     random_state=0)
    print(f"planted rank {args.rank}, {args.rows} x {args.cols}, noise 5%, "
          f"{np.isnan(X).mean():.0%} of cells missing")
    for method in ("hals", "mu", "gdcls"):
        res = fit_nmf(X, args.rank, method=method, random_state=0, max_iter=2000, tol=1e-6)
        print(f"  {method:6s} relative error {res.relative_error:.4f} on observed cells, "
              f"{res.n_iter} iterations, {res.time - res.compile_time:.2f} s"
              + (f" (and {res.compile_time:.1f} s compiling numba kernels, first use only)"
                 if res.compile_time >= 0.05 else ""))
    if args.ranks:
        ranks = range(1, 2 * args.rank + 1)
        print(f"\nchoose_rank over k = 1..{2 * args.rank}:")
        report = _rank_report(X, ranks, args, progress=None,
                              prior_kwargs={"likelihood": "gaussian",
                                            "noise_var": (0.05 * np.nanmean(X)) ** 2},
                              consensus_kwargs={"n_runs": 10, "max_iter": 200},
                              stability_kwargs={"n_runs": 10, "max_iter": 200})
        os.makedirs(args.out, exist_ok=True)
        _save_report(report, os.path.join(args.out, "demo_rank.json"),
                     os.path.join(args.out, "demo_rank.png"))
    return 0


def read_matrix(path, *, layer=None):
    """Read a matrix from a text table (CSV, TSV or whitespace), a ``.npy`` file, a sparse
    matrix: Matrix Market ``.mtx`` (also ``.mtx.gz``, via ``scipy.io.mmread``) or ``.npz``
    from ``scipy.sparse.save_npz``, a 10x Genomics folder (``matrix.mtx[.gz]``, genes x
    cells, with ``features.tsv[.gz]`` or ``genes.tsv[.gz]`` and ``barcodes.tsv[.gz]``, whose
    first columns, the gene ids and the cell barcodes, become the row and column labels),
    or an AnnData ``.h5ad`` file (cells x genes: its ``X``, or the layer named ``layer``;
    ``obs_names`` and ``var_names`` become the labels; needs the ``anndata`` package).
    Sparse files stay sparse (CSR): every cell is observed, the ones not stored are zeros.

    A first row with any non-numeric cell is a header of column labels; then a first column
    with any non-numeric cell holds row labels. Empty cells and ``NA``, ``NaN``, ``N/A``,
    ``null``, ``?`` (any case) are missing (NaN). Anything else that is not a number is an
    error naming its line and column.

    Returns
    -------
    X : ndarray (m, n) of float64, NaN where missing; or a scipy.sparse CSR matrix
    row_labels, col_labels : list of str or None

    Examples
    --------
    >>> import io, nmf_cv
    >>> X, rows, cols = nmf_cv.read_matrix(io.StringIO("gene,s1,s2\\ng1,1,NA\\ng2,3,4\\n"))
    >>> X.tolist(), rows, cols
    ([[1.0, nan], [3.0, 4.0]], ['g1', 'g2'], ['s1', 's2'])
    """
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(path, str) and path.endswith(".h5ad"):
        return _read_h5ad(path, layer)
    if layer is not None:
        raise ValueError(f"{path}: layer={layer!r} applies to .h5ad files only")
    if isinstance(path, str) and os.path.isdir(path):
        return _read_10x(path)
    if isinstance(path, str) and path.endswith(".npy"):
        X = np.load(path, allow_pickle=False)
        return _as_float_array(X, path), None, None
    if isinstance(path, str) and path.endswith((".mtx", ".mtx.gz", ".npz")):
        return _read_sparse(path), None, None
    if isinstance(path, str):
        with open(path, newline="") as handle:
            text = handle.read()
        name = path
    else:
        text, name = path.read(), "<stream>"
    rows = _split_table(text)
    if not rows:
        raise ValueError(f"{name}: no data")
    col_labels = None
    if any(_number(cell) is None for cell in rows[0][1:]) or (
            len(rows) > 1 and len(rows[0]) == len(rows[1]) - 1):
        col_labels, rows = rows[0], rows[1:]
    row_labels = None
    if rows and any(_number(row[0]) is None for row in rows):
        row_labels = [row[0] for row in rows]
        rows = [row[1:] for row in rows]
        if col_labels is not None and len(col_labels) == len(rows[0]) + 1:
            col_labels = col_labels[1:]  # the header's corner cell names the row labels
    first_line = 2 if col_labels is not None else 1
    X = _parse_cells(rows, name, first_line, 1 + (row_labels is not None))
    if col_labels is not None and len(col_labels) != X.shape[1]:
        raise ValueError(f"{name}: the header has {len(col_labels)} labels for "
                         f"{X.shape[1]} columns")
    return X, row_labels, col_labels


def _anndata():
    """The anndata module, or a one-line error naming it."""
    try:
        import anndata
    except ImportError:
        raise ImportError(".h5ad files need the anndata package: pip install anndata") from None
    return anndata


def _read_h5ad(path, layer):
    """(X, obs names, var names) of an AnnData file (see `read_matrix`)."""
    anndata = _anndata()
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .h5ad file ({exc})") from None
    if layer is None:
        X = adata.X
        if X is None:
            raise ValueError(f"{path}: X is empty; name a layer ({', '.join(adata.layers)})")
    elif layer not in adata.layers:
        raise ValueError(f"{path}: no layer {layer!r}; its layers: "
                         f"{', '.join(adata.layers) or 'none'}")
    else:
        X = adata.layers[layer]
    where = f"{path} ({'X' if layer is None else 'layer ' + repr(layer)})"
    if sp.issparse(X):
        if X.dtype.kind not in "biuf":
            raise TypeError(f"{where}: must hold real numbers; got dtype {X.dtype}")
        X = sp.csr_matrix(X, dtype=np.float32 if X.dtype == np.float32 else np.float64)
    else:
        X = _as_float_array(np.asarray(X), where)
    return X, [str(n) for n in adata.obs_names], [str(n) for n in adata.var_names]


def _write_h5ad(source, layer, path, res, names):
    """A copy of the .h5ad file ``source`` with the fit: usages W in ``obsm["X_nmf"]``,
    components H in ``varm["nmf_components"]`` (genes x k), the settings in ``uns["nmf"]``."""
    anndata = _anndata()
    adata = anndata.read_h5ad(source)
    adata.obsm["X_nmf"] = np.asarray(res.W)
    adata.varm["nmf_components"] = np.asarray(res.H.T)
    info = {"n_components": res.n_components, "loss": res.loss, "method": res.method,
            "layer": layer or "X", "components": list(names),
            "relative_error": res.relative_error}
    if res.component_stability is not None:
        info.update(component_stability=np.asarray(res.component_stability),
                    n_runs=res.n_runs, n_runs_kept=res.n_runs_kept)
    adata.uns["nmf"] = info
    adata.write_h5ad(path)


def _read_10x(folder):
    """(X, gene ids, barcodes) from a 10x Genomics matrix folder (see `read_matrix`)."""
    def first(*names):
        found = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
        return found[0] if found else None

    matrix = first("matrix.mtx.gz", "matrix.mtx")
    if matrix is None:
        raise ValueError(f"{folder}: a folder without matrix.mtx or matrix.mtx.gz (a 10x "
                         "Genomics folder holds matrix.mtx, features.tsv or genes.tsv, and "
                         "barcodes.tsv)")
    X = _read_sparse(matrix)
    genes = _read_labels(first("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    cells = _read_labels(first("barcodes.tsv.gz", "barcodes.tsv"))
    for labels, size, what in ((genes, X.shape[0], "genes"), (cells, X.shape[1], "barcodes")):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{folder}: {len(labels)} {what} listed for a matrix of shape "
                             f"{X.shape} (genes x cells)")
    return X, genes, cells


def _read_labels(path):
    """The first tab-separated field of each non-empty line (None for no file)."""
    if path is None:
        return None
    import gzip

    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as handle:
            return [line.rstrip("\n").split("\t")[0] for line in handle if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable list of labels ({exc})") from None


def _read_sparse(path):
    import scipy.io

    try:
        X = sp.load_npz(path) if path.endswith(".npz") else scipy.io.mmread(path)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable sparse matrix ({exc})") from None
    if not sp.issparse(X):  # a dense ("array") Matrix Market file
        return _as_float_array(X, path)
    if X.dtype.kind not in "biuf":
        raise TypeError(f"{path}: must hold real numbers; got dtype {X.dtype}")
    return sp.csr_matrix(X, dtype=np.float32 if X.dtype == np.float32 else np.float64)


_MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "?"}


def _split_table(text):
    import csv

    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    if "\t" in lines[0]:
        return [[c.strip() for c in line.split("\t")] for line in lines]
    for delimiter in ",;":
        if delimiter in lines[0]:
            return [[c.strip() for c in row] for row in csv.reader(lines, delimiter=delimiter)]
    return [line.split() for line in lines]


def _number(cell):
    """float value of a cell, NaN when missing, None when not a number."""
    if cell.strip().lower() in _MISSING_TOKENS:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return None


def _parse_cells(rows, name, first_line, first_column):
    width = len(rows[0]) if rows else 0
    X = np.empty((len(rows), width))
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{name} line {first_line + i}: {len(row)} cells, expected "
                             f"{width}")
        for j, cell in enumerate(row):
            value = _number(cell)
            if value is None:
                raise ValueError(f"{name} line {first_line + i}, column {first_column + j}: "
                                 f"{cell!r} is not a number")
            X[i, j] = value
    return X


def _prefix(args):
    if args.out:
        return args.out
    name = os.path.basename(args.file)
    return os.path.splitext(name[:-3] if name.endswith(".gz") else name)[0]


def _write_csv(path, A, row_labels, col_labels, sep=","):
    import csv

    rows = row_labels if row_labels is not None else [str(i) for i in range(A.shape[0])]
    cols = col_labels if col_labels is not None else [str(j) for j in range(A.shape[1])]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=sep)
        writer.writerow([""] + list(cols))
        for label, values in zip(rows, A, strict=True):
            writer.writerow([label] + [repr(float(v)) for v in values])


def _write_json(path, obj):
    import json

    with open(path, "w") as handle:
        json.dump(obj, handle, indent=2, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    # `python -m nmf_cv`: run the imported module's main, whose kernels numba caches on disk
    # (kernels of a module run as __main__ are compiled again on every run).
    import nmf_cv

    sys.exit(nmf_cv.main())

"""Tests for nmf_cv. References are independent: plain numpy updates written here,
scipy.optimize.nnls, planted factors, scikit-learn."""

import contextlib
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numpy.testing import assert_allclose, assert_array_equal  # noqa: E402
from scipy.cluster.hierarchy import leaves_list, linkage  # noqa: E402
from scipy.optimize import nnls  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

import nmf_cv  # noqa: E402

# =============================================================================================
# Shared helpers
# =============================================================================================

# =============================================================================================
# Shared helpers
# =============================================================================================

COMBOS = [("hals", "frobenius"), ("mu", "frobenius"), ("mu", "kl"), ("cd", "kl"),
          ("gdcls", "frobenius")]


def lkr(seed):
    """The 50 x 100 exact rank-5 integer matrix L @ K @ R with entries of L, K, R in 0..10."""
    rng = np.random.default_rng(seed)
    L = rng.integers(0, 11, (50, 5))
    K = rng.integers(0, 11, (5, 5))
    R = rng.integers(0, 11, (5, 100))
    return (L @ K @ R).astype(float)


def random_mask(shape, missing, rng):
    """Boolean mask (True = observed) keeping at least one cell in every row and column."""
    m, n = shape
    mask = rng.random(shape) >= missing
    mask[np.arange(m), rng.integers(0, n, m)] = True
    mask[rng.integers(0, m, n), np.arange(n)] = True
    return mask


def objective(X, M, W, H, loss):
    """Independent objective over observed cells (no penalties). KL: predictions floored at
    sqrt(smallest normal float64), as the module documents, so that a count under a
    prediction of exactly 0 (both factors' entries 0, a fixed point) scores finitely."""
    WH = W @ H
    if loss == "frobenius":
        return 0.5 * np.sum(M * (np.where(M, X, 0) - WH) ** 2)
    WH = np.maximum(WH, np.sqrt(np.finfo(np.float64).tiny))
    x = np.where(M, X, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xlog = np.where(x > 0, x * np.log(x / WH), 0.0)
    return np.sum(M * (xlog - x + WH))


def fit(X, k, **kw):
    kw.setdefault("random_state", 0)
    return nmf_cv.fit_nmf(X, k, **kw)


def _problem(missing, seed=0, m=30, n=20, k=4):
    rng = np.random.default_rng(seed)
    X = rng.random((m, k)) @ rng.random((k, n)) + 0.05 * rng.random((m, n))
    mask = random_mask((m, n), missing, rng)
    W = rng.random((m, k)) + 0.1
    H = rng.random((k, n)) + 0.1
    return X, mask, W, H


def _solver(X, mask, W, H, method, loss, sweeps=1):
    data = nmf_cv._validate_data(X, mask)
    pen = nmf_cv._Penalty(0.0, 0.0, 0.0, 0.0)
    if loss == "kl":
        return nmf_cv._make_solver(data, W.copy(), H.copy(), method, loss, pen)
    if data.masked:
        return nmf_cv._MaskedSolver(data, W.copy(), H.copy(), method, pen, True, sweeps=sweeps)
    return nmf_cv._DenseSolver(data.dense, W.copy(), H.copy(), method, pen, True, sweeps=sweeps)


def ref_penalised_cd_rows(A, B, XB, M, l1, l2, sweeps):
    """Plain numpy: ``sweeps`` coordinate-descent sweeps on each row a of A >= 0 for
    1/2 a'G a - XB_a . a + l1 sum a + l2/2 |a|^2, G = B' B over the row's observed cells."""
    A = A.copy()
    for a in range(A.shape[0]):
        Bo = B[M[a]]
        G = Bo.T @ Bo
        for _ in range(sweeps):
            for t in range(A.shape[1]):
                hess = G[t, t] + l2
                if hess > 0:
                    grad = G[t] @ A[a] - XB[a, t] + l1 + l2 * A[a, t]
                    A[a, t] = max(A[a, t] - grad / hess, 0.0)
    return A


def poisson_planted(m, n, k, seed, mean=5.0):
    """Poisson counts whose rate W H (gamma factors, rank k) has the given mean."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(1.0, 1.0, (m, k)) @ rng.gamma(1.0, 1.0, (k, n))
    return rng.poisson(rate * (mean / rate.mean())).astype(float)


def sparse_counts(m, n, k, seed, density_mean=0.3):
    """Poisson counts from a Gamma(0.3) factor model: mostly zeros, as single-cell data."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.3, 1.0, (m, k)) @ rng.gamma(0.3, 1.0, (k, n))
    return rng.poisson(rate * density_mean / rate.mean()).astype(float)


def bars(seed, n=400, size=8, p=0.2, noise=0.05):
    """Hoyer's bars: 8 horizontal and 8 vertical bars on an 8 x 8 grid, each present in an
    image with probability p and weight U(0.5, 1.5), plus |N(0, noise^2)| noise. Linear rank
    15, non-negative rank 16."""
    rng = np.random.default_rng(seed)
    grid = np.zeros((2 * size, size, size))
    for i in range(size):
        grid[i, i, :] = 1.0
        grid[size + i, :, i] = 1.0
    H = grid.reshape(2 * size, -1)
    present = rng.random((n, 2 * size)) < p
    X0 = (present * rng.uniform(0.5, 1.5, (n, 2 * size))) @ H
    return np.abs(X0 + noise * rng.standard_normal(X0.shape))


def record_fits(monkeypatch):
    """Make nmf_cv._fit, which every fit goes through, record its calls: returns the list of
    (the fit's options as a dict, result)."""
    seen = []
    real_fit = nmf_cv._fit

    def recording_fit(data, k, options, *args, **kwargs):
        res = real_fit(data, k, options, *args, **kwargs)
        seen.append((dataclasses.asdict(options), res))
        return res

    monkeypatch.setattr(nmf_cv, "_fit", recording_fit)
    return seen


# Cross-validation's fits take a fifth of the iterations they did (extrapolated HALS), so its
# data are larger: a stop must land while the run is still going.
CKPT_SHAPES = {"cv": (360, 144), "consensus": (300, 120), "cli": (450, 180)}


def ckpt_data(what="cv"):
    return nmf_cv.make_planted(*CKPT_SHAPES[what], 4, noise=0.1, random_state=3)


def interruptible():
    """In a child before it starts: Ctrl-C (SIGINT) back to its default, so that Python
    raises KeyboardInterrupt on it even when the tests run as a background job (whose
    shell ignores SIGINT, and children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@functools.lru_cache(maxsize=1)
def ckpt_reference():
    """The uninterrupted serial run that interrupted and resumed ones must equal (made once,
    read by several tests)."""
    return nmf_cv.cross_validate(ckpt_data(), range(1, 8), random_state=0, progress=False)


def records(path):
    return sorted(str(p) for p in path.rglob("*.npz"))


# =============================================================================================
# Validation
# =============================================================================================

def test_validated_data_with_missing_cells_holds_its_own_copies_and_lists_cells_on_demand():
    """Data with missing cells are held as X with zeros in the missing cells and a boolean
    mask, both copies (changing the caller's X or mask afterwards changes nothing); the
    observed cells' lists, made on first use, are numpy's row-major ones. Validation
    allocates no cell lists (measured 1.38x the data at its peak; 2.52x with them)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    X = rng.random((300, 200))
    mask = rng.random(X.shape) > 0.2
    data = nmf_cv._validate_data(X, mask)
    X_before, mask_before = X.copy(), mask.copy()
    X[:] = 7.0
    mask[:] = True
    rows, cols = np.nonzero(mask_before)
    assert_array_equal(data.rows, rows)
    assert_array_equal(data.cols, cols)
    assert_array_equal(data.values, X_before[rows, cols])
    assert data.n_observed == len(rows) and data.masked
    assert data.observed_mean() == pytest.approx(X_before[mask_before].mean(), rel=1e-12)
    filled = data.filled()
    assert_array_equal(filled[mask_before], X_before[mask_before])
    Y = np.where(rng.random((400, 300)) < 0.2, np.nan, rng.random((400, 300)))
    nmf_cv._validate_data(Y[:5, :5])
    tracemalloc.start()
    nmf_cv._validate_data(Y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.7 * Y.nbytes, peak / Y.nbytes


def test_mostly_missing_data_are_held_as_cell_lists():
    """Below half observed (ratings, surveys) the lists of observed cells are smaller than a
    dense copy: validation keeps them (measured 0.28x the data at its peak for 5% observed,
    where X with zeros alone would be 1x), and everything reads them as before."""
    import tracemalloc

    rng = np.random.default_rng(4)
    X = rng.random((400, 300))
    observed = rng.random(X.shape) < 0.05
    observed[np.arange(400), np.arange(400) % 300] = True
    Y = np.where(observed, X, np.nan)
    nmf_cv._validate_data(Y[:5, :5])
    tracemalloc.start()
    data = nmf_cv._validate_data(Y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.6 * Y.nbytes, peak / Y.nbytes
    assert data.zeros is None and data.masked
    rows, cols = np.nonzero(observed)
    assert_array_equal(data.rows, rows)
    assert_array_equal(data.values, X[rows, cols])
    assert data.n_observed == len(rows)
    assert_array_equal(data.observed_mask(), observed)
    assert_array_equal(data.filled()[observed], X[observed])
    res = nmf_cv.fit_nmf(Y, 3, max_iter=50, random_state=0)
    direct = np.sum((X - res.W @ res.H)[observed] ** 2) / np.sum(X[observed] ** 2)
    assert res.relative_error == pytest.approx(np.sqrt(direct), rel=1e-9)


def test_nan_is_missing_same_as_mask():
    X, mask, _, _ = _problem(0.2, seed=6)
    Xn = np.where(mask, X, np.nan)
    a = fit(Xn, 3, max_iter=20)
    b = fit(X, 3, mask=mask, max_iter=20)
    assert np.array_equal(a.W, b.W) and np.array_equal(a.H, b.H)


@pytest.mark.parametrize("method,loss", COMBOS)
def test_all_true_mask_equals_no_mask(method, loss):
    X, _, _, _ = _problem(0.0, seed=7)
    a = fit(X, 3, method=method, loss=loss, max_iter=50)
    b = fit(X, 3, mask=np.ones(X.shape, dtype=bool), method=method, loss=loss, max_iter=50)
    np.testing.assert_allclose(a.W, b.W, rtol=1e-12)
    np.testing.assert_allclose(a.H, b.H, rtol=1e-12)


def test_negative_or_inf_under_mask_is_fine():
    X = np.array([[1.0, -5.0], [np.inf, 2.0], [1.0, 1.0]])
    mask = np.array([[True, False], [False, True], [True, True]])
    res = fit(X, 1, mask=mask, max_iter=10)
    assert np.isfinite(res.relative_error)


def test_sparse_input_is_shared_not_copied_unless_it_must_be_put_right():
    """A CSR matrix of float32 or float64 with sorted, summed indices is used as given (atlas
    data are not copied once per validation); one with duplicates or unsorted indices, or
    another dtype, is copied and put right, the caller's left as it was."""
    S = sp.random(30, 20, density=0.3, random_state=0, format="csr", dtype=np.float32)
    data = nmf_cv._validate_data(S)
    assert np.shares_memory(data.sparse.data, S.data) and data.sparse.dtype == np.float32
    assert np.shares_memory(nmf_cv._validate_data(data.sparse).sparse.data, S.data)  # again
    messy = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 2]), np.array([0, 3, 3])),
                          shape=(2, 3))
    before = (messy.data.copy(), messy.indices.copy())
    fixed = nmf_cv._validate_data(messy).sparse
    assert fixed.indices.tolist() == [0, 2] and fixed.data.tolist() == [2.0, 4.0]
    assert np.array_equal(messy.data, before[0]) and np.array_equal(messy.indices, before[1])
    as_int = sp.csr_matrix(np.array([[1, 0], [0, 2]]))
    assert not np.shares_memory(nmf_cv._validate_data(as_int).sparse.data, as_int.data)


def test_callers_arrays_are_never_modified():
    X, mask, W, H = _problem(0.2, seed=16)
    X[~mask] = np.nan
    copies = [a.copy() for a in (X, mask, W, H)]
    for method, loss in COMBOS:
        fit(X, 4, mask=mask, method=method, loss=loss, max_iter=5)
        fit(X, 4, method=method, loss=loss, init=(W, H), max_iter=5)
        Xd = np.nan_to_num(X)
        Xd_copy = Xd.copy()
        fit(Xd, 4, method=method, loss=loss, init=(W, H), max_iter=5)
        assert np.array_equal(Xd, Xd_copy)
    for a, b in zip((X, mask, W, H), copies):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    S = sp.csr_matrix(np.nan_to_num(X))
    data = S.data.copy()
    fit(S, 4, max_iter=5)
    assert np.array_equal(S.data, data)


@pytest.mark.parametrize("X,kwargs,exc,match", [
    ([[1.0, -2.0], [-3.0, 4.0]], {}, ValueError, r"2 negative entries.*first at \[0, 1\]"),
    ([[1.0, np.inf], [3.0, 4.0]], {}, ValueError, r"non-finite.*infinite.*\[0, 1\]"),
    ([[1.0, 2.0], [3.0, -np.inf]], {}, ValueError, r"non-finite.*\[1, 1\]"),
    ([["a", "b"], ["c", "d"]], {}, TypeError, "must hold numbers"),
    (np.array([[1, "x"], [2, 3]], dtype=object), {}, TypeError, "non-numeric objects"),
    ([[1 + 1j, 2], [3, 4]], {}, TypeError, "complex"),
    ([1.0, 2.0, 3.0], {}, ValueError, "2-D"),
    (np.ones((2, 2, 2)), {}, ValueError, "2-D"),
    (np.ones((0, 3)), {}, ValueError, "empty"),
    (np.ones((3, 3)), {"mask": np.ones((3, 2), bool)}, ValueError, "mask has shape"),
    (np.ones((3, 3)), {"mask": np.full((3, 3), 0.5)}, TypeError, "mask must be boolean"),
    (np.ones((3, 3)), {"n_components": 0}, ValueError, r"n_components must be in 1\.\.3"),
    (np.ones((3, 3)), {"n_components": 4}, ValueError, r"n_components must be in 1\.\.3"),
    (np.ones((3, 3)), {"n_components": 2.0}, TypeError, "positive int"),
    (np.ones((3, 3)), {"n_components": True}, TypeError, "positive int"),
    ([[1, np.nan], [np.nan, np.nan]], {}, ValueError, r"1 row\(s\) with no observed.*row 1"),
    ([[1, np.nan], [2, np.nan]], {}, ValueError, r"column\(s\) with no observed.*column 1"),
    (np.ones((3, 3)), {"method": "als"}, ValueError, "method must be one of"),
    (np.ones((3, 3)), {"loss": "l2"}, ValueError, "loss must be one of"),
    (np.ones((3, 3)), {"init": "svd"}, ValueError, "init must be one of"),
    (np.ones((3, 3)), {"loss": "kl", "method": "hals"}, ValueError, "takes method='cd'"),
    (np.ones((3, 3)), {"max_iter": -1}, ValueError, "max_iter"),
    (np.ones((3, 3)), {"tol": np.nan}, ValueError, "tol"),
    (np.ones((3, 3)), {"alpha_W": -1}, ValueError, "alpha_W"),
    (np.ones((3, 3)), {"l1_ratio": 2}, ValueError, "l1_ratio"),
    (np.ones((3, 3)), {"init": (np.ones((3, 2)), np.ones((1, 3)))}, ValueError, "shapes"),
    (np.ones((3, 3)), {"init": (-np.ones((3, 1)), np.ones((1, 3)))}, ValueError, "non-negative"),
    (np.ones((3, 3)), {"callback": 3}, TypeError, "callable"),
    (sp.csr_matrix(-np.eye(3)), {}, ValueError, r"3 negative entries.*first at \[0, 0\]"),
    (sp.csr_matrix(np.array([[np.nan, 1], [1, 1]])), {}, ValueError, "non-finite"),
])
def test_bad_input_raises_clear_error(X, kwargs, exc, match):
    kwargs = dict(kwargs)
    k = kwargs.pop("n_components", 1)
    with pytest.raises(exc, match=match):
        nmf_cv.fit_nmf(X, k, **kwargs)


def test_gamma_prior_is_checked():
    X = poisson_planted(10, 8, 2, seed=0)
    with pytest.raises(ValueError, match="needs loss='kl' with method='cd'"):
        nmf_cv.fit_nmf(X, 2, gamma_prior=(1.5, 1.0))
    with pytest.raises(ValueError, match="needs loss='kl' with method='cd'"):
        nmf_cv.fit_nmf(X, 2, loss="kl", method="mu", gamma_prior=(1.5, 1.0))
    with pytest.raises(ValueError, match="shape >= 1"):
        nmf_cv.fit_nmf(X, 2, loss="kl", gamma_prior=(0.5, 1.0))
    with pytest.raises(TypeError, match="gamma_prior must be"):
        nmf_cv.fit_nmf(X, 2, loss="kl", gamma_prior=1.5)


# =============================================================================================
# Initialization
# =============================================================================================

def test_random_init_scaled_to_data_mean():
    X = 1000 * lkr(2)
    res = fit(X, 5, init="random", max_iter=0)
    assert 0.5 < (res.W @ res.H).mean() / X.mean() < 2


def test_nndsvda_fits_scale_with_the_data():
    """Scaling X by c scales W and H by sqrt(c), so the fit is the same: nndsvda fills its
    zeros at sqrt(mean / k), which scales so; the mean itself (Boutsidis & Gallopoulos,
    scikit-learn) does not, and took 1548, 1217 and 578 iterations on one planted matrix
    at scales 1e-3, 1 and 1e3."""
    X = nmf_cv.make_planted(200, 100, 5, noise=0.1, random_state=1)
    fits = [fit(c * X, 5, tol=1e-6, max_iter=3000) for c in (1e-3, 1.0, 1e3)]
    assert len({f.n_iter for f in fits}) == 1
    for c, f in zip((1e-3, 1e3), (fits[0], fits[2]), strict=True):
        np.testing.assert_allclose(f.W @ f.H, c * (fits[1].W @ fits[1].H), rtol=1e-6,
                                   atol=1e-9 * c * X.max())


def test_ridge_fits_of_large_valued_data_improve_with_rank():
    """Expression-like data with a mean in the hundreds, 20% of cells missing and a ridge as
    cross-validation sets one: each extra rank lowers the objective. With nndsvda's zeros
    filled with the mean, the first updates of such fits overshoot; here rank 10 ended at
    1.76x rank 8's objective and rank 12 at 6x (on expression data, whole components died)."""
    rng = np.random.default_rng(0)
    X = rng.poisson(50 * rng.lognormal(0, 1.5, (400, 4)) @ rng.gamma(0.5, 1, (4, 30)))
    mask = rng.random(X.shape) > 0.2
    objectives = []
    for k in (6, 8, 10, 12):
        res = fit(X.astype(float), k, mask=mask, alpha_W=45.0, alpha_H=45.0, max_iter=500)
        assert np.all(res.W.max(axis=0) > 0) and np.all(res.H.max(axis=1) > 0)
        objectives.append(res.loss_history[-1])
    assert np.all(np.diff(objectives) < 0), objectives


def test_user_init_is_used_and_not_modified():
    X = lkr(3)
    rng = np.random.default_rng(0)
    W0, H0 = rng.random((50, 5)), rng.random((5, 100))
    W0c, H0c = W0.copy(), H0.copy()
    res = fit(X, 5, init=(W0, H0), max_iter=0)
    assert np.array_equal(res.W, W0) and np.array_equal(res.H, H0)
    fit(X, 5, init=(W0, H0), max_iter=10)
    assert np.array_equal(W0, W0c) and np.array_equal(H0, H0c)


def test_nndsvd_recovers_rank_one_exactly():
    rng = np.random.default_rng(14)
    X = np.outer(rng.random(20) + 0.1, rng.random(15) + 0.1)
    res = fit(X, 1, init="nndsvd", max_iter=0)
    np.testing.assert_allclose(res.W @ res.H, X, rtol=1e-10)


def test_nndsvd_on_large_input_uses_randomized_svd_well():
    X = nmf_cv.make_planted(700, 500, 6, random_state=15)
    res = fit(X, 6, init="nndsvd", max_iter=0)
    exact = fit(X, 6, init="nndsvd", max_iter=0)
    assert res.relative_error < 0.3 and res.relative_error == exact.relative_error


# =============================================================================================
# Fitting: public API
# =============================================================================================

@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_relative_error_and_history(missing):
    X, mask, _, _ = _problem(missing, seed=13)
    res = fit(X, 3, mask=mask, max_iter=40, tol=0)
    R = np.where(mask, X - res.W @ res.H, 0.0)
    expected = np.linalg.norm(R) / np.linalg.norm(np.where(mask, X, 0.0))
    assert res.relative_error == pytest.approx(expected, rel=1e-10)
    assert len(res.loss_history) == len(res.time_history) == res.n_iter + 1 == 41
    assert np.all(np.diff(res.time_history) >= 0)
    assert not res.converged


def test_relative_error_of_sparse_float32_reads_blocks_and_copies_nothing_whole(monkeypatch):
    """Sparse X: the stored cells a block of rows at a time (the same sums as one pass, bit
    for bit), |X|^2 of float32 values a block at a time; no temporary the size of X."""
    import tracemalloc

    rng = np.random.default_rng(3)
    X = sp.random(400, 300, density=0.4, random_state=4, format="csr", dtype=np.float32)
    W, H = rng.random((400, 3)), rng.random((3, 300))
    data = nmf_cv._validate_data(X)
    rss, xx = nmf_cv._observed_rss(data, W, H), nmf_cv._observed_sq_norm(data)
    dense = X.toarray().astype(np.float64)
    assert rss == pytest.approx(np.sum((dense - W @ H) ** 2), rel=1e-12)
    monkeypatch.setattr(nmf_cv, "_BLOCK", 1000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        error = data.relative_error(W, H)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 2 * X.nnz, (peak, X.nnz)  # a whole copy: 8 bytes an entry
    assert nmf_cv._observed_rss(data, W, H) == rss  # rows in order: the same additions
    assert nmf_cv._observed_sq_norm(data) == pytest.approx(xx, rel=1e-13)
    assert error == pytest.approx(np.sqrt(rss / xx), rel=1e-13)


@pytest.mark.parametrize("method,loss", COMBOS)
@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_same_seed_same_result(method, loss, init):
    X = nmf_cv.make_planted(300, 150, 4, noise=0.1, missing=0.1, random_state=9)
    a = fit(X, 4, method=method, loss=loss, init=init, random_state=11, max_iter=30)
    b = fit(X, 4, method=method, loss=loss, init=init, random_state=11, max_iter=30)
    c = fit(X, 4, method=method, loss=loss, init="random", random_state=12, max_iter=30)
    assert np.array_equal(a.W, b.W) and np.array_equal(a.H, b.H)
    if init == "random":
        assert not np.array_equal(a.W, c.W)


def test_comparable_to_scikit_learn():
    sklearn_nmf = pytest.importorskip("sklearn.decomposition").NMF
    X = nmf_cv.make_planted(120, 80, 5, noise=0.1, random_state=19)
    res = fit(X, 5, max_iter=2000, tol=1e-10)
    ref = sklearn_nmf(5, init="nndsvda", max_iter=2000, tol=1e-10, random_state=0)
    Wr = ref.fit_transform(X)
    ref_error = np.linalg.norm(X - Wr @ ref.components_) / np.linalg.norm(X)
    assert res.relative_error <= ref_error * 1.001


def test_extrapolate_needs_hals_or_kl_cd():
    X = nmf_cv.make_planted(20, 10, 2, random_state=0)
    for method, loss in (("mu", "frobenius"), ("gdcls", "frobenius"), ("mu", "kl")):
        with pytest.raises(ValueError, match="extrapolate=True needs method='hals'"):
            nmf_cv.fit_nmf(X, 2, method=method, loss=loss, extrapolate=True)


def test_estimator_api():
    X = nmf_cv.make_planted(80, 40, 3, noise=0.02, random_state=17)
    model = nmf_cv.NMF(3, random_state=0, max_iter=1000, tol=1e-8)
    W = model.fit_transform(X)
    assert W.shape == (80, 3) and model.components_.shape == (3, 40)
    assert model.reconstruction_err_ == pytest.approx(np.linalg.norm(X - W @ model.components_))
    assert model.n_iter_ == model.result_.n_iter
    W2 = model.transform(X)
    np.testing.assert_allclose(W2 @ model.components_, W @ model.components_, rtol=1e-3,
                               atol=1e-3 * X.mean())
    np.testing.assert_allclose(model.inverse_transform(W), W @ model.components_)
    assert model.get_params()["n_components"] == 3
    assert model.set_params(max_iter=5).max_iter == 5
    with pytest.raises(ValueError, match="unknown parameter"):
        model.set_params(bogus=1)
    with pytest.raises(ValueError, match="not fitted"):
        nmf_cv.NMF(2).transform(X)


def test_nmf_passes_scikit_learns_estimator_checks():
    """scikit-learn >= 1.6 asks estimators for __sklearn_tags__: every check of
    check_estimator passes (it raises on the first that fails), and GridSearchCV searches
    n_components."""
    sklearn = pytest.importorskip("sklearn")
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 6):
        pytest.skip("estimator tags are scikit-learn >= 1.6")
    from sklearn.model_selection import GridSearchCV
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(nmf_cv.NMF())
    tags = nmf_cv.NMF().__sklearn_tags__()
    assert tags.input_tags.allow_nan and tags.input_tags.sparse and tags.input_tags.positive_only

    def held_error(model, X, y=None):
        return -float(np.sum((X - model.inverse_transform(model.transform(X))) ** 2))

    X = nmf_cv.make_planted(40, 30, 3, noise=0.02, random_state=0)
    search = GridSearchCV(nmf_cv.NMF(random_state=0), {"n_components": [1, 3]},
                          scoring=held_error, cv=3).fit(X)
    assert search.best_params_ == {"n_components": 3}
    with pytest.raises(ValueError, match="X has 29 features, but NMF is expecting 30"):
        search.best_estimator_.transform(X[:, 1:])


@pytest.mark.parametrize("method,loss", COMBOS)
def test_transform_with_missing_cells_uses_observed_only(method, loss):
    X = nmf_cv.make_planted(100, 30, 3, random_state=18)
    model = nmf_cv.NMF(3, method=method, loss=loss, random_state=0, max_iter=3000, tol=1e-10)
    model.fit(X)
    mask = random_mask(X.shape, 0.3, np.random.default_rng(1))
    Xm = np.where(mask, X, 1e6)  # garbage under the mask
    W = model.transform(Xm, mask=mask)
    np.testing.assert_allclose(W @ model.components_, X, rtol=0.05, atol=0.05 * X.mean())


def test_nmf_estimator_with_gamma_priors_transforms_to_its_fitted_w():
    """With H fixed, the fit's W is the posterior mode of the W-subproblem, which transform
    solves again from scratch (W's prior included)."""
    X = sparse_counts(50, 30, 3, seed=11, density_mean=1.0)
    model = nmf_cv.NMF(3, loss="kl", gamma_prior=(1.2, 0.5), random_state=0, max_iter=5000,
                       tol=0)
    W = model.fit_transform(X)
    assert model.get_params()["gamma_prior"] == (1.2, 0.5) and W.min() > 0
    assert_allclose(model.transform(X), W, rtol=1e-4, atol=1e-8)
    bare = nmf_cv.NMF(3, loss="kl", random_state=0, max_iter=5000, tol=0).fit(X)
    assert not np.allclose(bare.transform(X), W, rtol=1e-2)  # the prior changes the answer


def test_fit_nmf_takes_public_inputs_only():
    """A cross-validation training set is fitted through _fit; fit_nmf refuses it in one
    line, as any other non-numeric X."""
    X = nmf_cv.make_planted(20, 10, 2, random_state=0)
    split = nmf_cv._fold_rule(X.shape, 3, np.random.default_rng(0))
    with pytest.raises(TypeError, match="X must hold numbers"):
        nmf_cv.fit_nmf(nmf_cv._FoldTraining(X, split, 1), 2)


# =============================================================================================
# Fitting: the driver, and which solver fits which data
# =============================================================================================

def ref_hals_step(X, M, W, H, mm_rows=(), mm_cols=()):
    """One masked HALS iteration (H then W), coordinate by coordinate, plain numpy. The
    lines listed in mm_rows / mm_cols take a majorize-minimize step instead: their missing
    cells count as observed, holding the model's predictions from before the half-step."""
    X0 = np.where(M, X, 0.0)
    k = W.shape[1]
    Mc = M.copy()
    Mc[:, list(mm_cols)] = True
    Xc = np.where(M, X0, W @ H)
    for t in range(k):
        R = Mc * (Xc - W @ H)
        num = W[:, t] @ R
        den = (Mc * W[:, t][:, None] ** 2).sum(axis=0)
        H[t] = np.maximum(0.0, H[t] + num / den)
    Mr = M.copy()
    Mr[list(mm_rows)] = True
    Xr = np.where(M, X0, W @ H)
    for t in range(k):
        R = Mr * (Xr - W @ H)
        num = R @ H[t]
        den = (Mr * H[t][None, :] ** 2).sum(axis=1)
        W[:, t] = np.maximum(0.0, W[:, t] + num / den)


def ref_mu_step(X, M, W, H, loss):
    X0 = np.where(M, X, 0.0)
    if loss == "frobenius":
        H *= (W.T @ X0) / (W.T @ (M * (W @ H)))
        W *= (X0 @ H.T) / ((M * (W @ H)) @ H.T)
    else:
        H *= (W.T @ (X0 / (W @ H))) / (W.T @ M)
        W *= ((X0 / (W @ H)) @ H.T) / (M @ H.T)


@st.composite
def problems(draw):
    m = draw(st.integers(2, 14))
    n = draw(st.integers(2, 14))
    k = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    missing = draw(st.sampled_from([0.0, 0.1, 0.4, 0.75]))
    rng = np.random.default_rng(seed)
    X = rng.random((m, k + 1)) @ rng.random((k + 1, n)) + 0.1 * rng.random((m, n))
    X[rng.random((m, n)) < 0.2] = 0.0
    mask = random_mask((m, n), missing, rng)
    return X, mask, k, seed


def _check_monotone(res, X, mask, loss, penalised):
    f = res.loss_history
    assert np.all(np.isfinite(f))
    # The objective is evaluated through terms as large as |WH|^2, which exceeds |X|^2 when an
    # underdetermined fit (k = n, rows of one observed cell) lets W grow along a missing cell.
    rounding = 1e-14 * (np.sum((res.W @ res.H) ** 2) + np.sum(X ** 2))
    assert np.all(np.diff(f) <= 1e-9 * f[0] + rounding), np.diff(f).max()
    assert np.all(res.W >= 0) and np.all(res.H >= 0)
    if not penalised:  # the recorded objective is the true one, not a running estimate
        scale = np.sum(X[mask] ** 2)  # float64 cancellation in |X|^2 - 2<W, XH'> + |WH|^2
        assert f[-1] == pytest.approx(objective(X, mask, res.W, res.H, loss), rel=1e-7,
                                      abs=max(1e-12 * scale, rounding))


@pytest.mark.parametrize("method,loss", COMBOS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), init=st.sampled_from(["nndsvda", "random", "nndsvd"]),
       penalised=st.booleans())
def test_objective_never_increases(method, loss, problem, init, penalised):
    X, mask, k, seed = problem
    if init == "nndsvd" and method in ("mu", "gdcls"):
        init = "nndsvda"  # exact zeros are fixed points of multiplicative updates
    pen = dict(alpha_W=0.05, alpha_H=0.1, l1_ratio=0.3) if penalised else {}
    res = nmf_cv.fit_nmf(X, k, mask=mask, method=method, loss=loss, init=init, tol=0,
                         max_iter=30, random_state=seed, **pen)
    _check_monotone(res, X, mask, loss, penalised)


@pytest.mark.parametrize("method,loss", COMBOS)
def test_objective_never_increases_sparse(method, loss):
    rng = np.random.default_rng(3)
    X = sp.random(40, 30, density=0.3, random_state=3, format="csr") * 5
    res = nmf_cv.fit_nmf(X, 4, method=method, loss=loss, tol=0, max_iter=60, random_state=rng)
    f = res.loss_history
    assert np.all(np.diff(f) <= 1e-9 * f[0])
    assert f[-1] == pytest.approx(objective(X.toarray(), np.ones(X.shape, bool), res.W, res.H,
                                            loss), rel=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_planted_rank5_hals(seed):
    res = fit(lkr(seed), 5, method="hals", max_iter=1000, tol=0)
    assert res.relative_error < 2e-3


@pytest.mark.parametrize("method", ["mu", "gdcls"])
@pytest.mark.parametrize("seed", range(5))
def test_planted_rank5_mu_gdcls(method, seed):
    res = fit(lkr(seed), 5, method=method, max_iter=5000, tol=0)
    assert res.relative_error < 1e-2


@pytest.mark.parametrize("method,loss", COMBOS)
@pytest.mark.parametrize("kind", ["dense", "masked", "sparse"])
def test_float32_stays_float32(method, loss, kind):
    X = nmf_cv.make_planted(60, 40, 3, noise=0.01, random_state=10, dtype=np.float32)
    mask = None
    if kind == "masked":
        mask = random_mask(X.shape, 0.2, np.random.default_rng(0))
    if kind == "sparse":
        X = sp.csr_matrix(np.where(X > np.median(X), X, 0))
    res = fit(X, 3, mask=mask, method=method, loss=loss, max_iter=200)
    assert res.W.dtype == np.float32 and res.H.dtype == np.float32
    assert res.relative_error < 0.3
    f = res.loss_history
    assert np.all(np.diff(f) <= 1e-5 * f[0])  # float32 rounding only


@pytest.mark.parametrize("method", ["hals", "mu", "gdcls"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), alphas=st.sampled_from([(0.05, 0.1), (0.3, 0.3), (1.0, 0.02)]))
def test_ridge_fits_with_balanced_scales_never_increase_the_objective(method, problem, alphas):
    """A ridge on both factors (as cross_validate's) rebalances the factors' scales every
    iteration: the objective still never increases, and the recorded value is the true
    penalised objective (computed here independently)."""
    X, mask, k, seed = problem
    a_W, a_H = alphas
    res = nmf_cv.fit_nmf(X, k, mask=mask, method=method, tol=0, max_iter=30,
                         random_state=seed, alpha_W=a_W, alpha_H=a_H)
    _check_monotone(res, X, mask, "frobenius", True)
    penalty = 0.5 * a_W * np.sum(res.W ** 2) + 0.5 * a_H * np.sum(res.H ** 2)
    expected = objective(X, mask, res.W, res.H, "frobenius") + penalty
    assert res.loss_history[-1] == pytest.approx(expected, rel=1e-7, abs=1e-10)


# balancing under a pure two-sided ridge, dense and masked
@pytest.mark.parametrize("alphas", [(0.5, 0.5), (0.05, 0.5), (0.5, 0.05)])
@pytest.mark.parametrize("missing", [False, True])
def test_objective_never_increases_with_a_two_sided_ridge(alphas, missing):
    rng = np.random.default_rng(0)
    X = nmf_cv.make_planted(40, 30, 3, noise=0.1, random_state=1)
    mask = rng.random(X.shape) > 0.2 if missing else None
    W0 = 100.0 * rng.random((40, 4))   # far from balanced: the first balancing step is large
    H0 = 0.01 * rng.random((4, 30))
    res = nmf_cv.fit_nmf(X, 4, mask=mask, init=(W0, H0), alpha_W=alphas[0],
                         alpha_H=alphas[1], l1_ratio=0.0, tol=0, max_iter=60)
    f = np.asarray(res.loss_history)
    assert np.all(np.diff(f) <= 1e-9 * f[0]), np.diff(f).max()
    M = np.ones(X.shape, bool) if mask is None else mask
    exact = (0.5 * np.sum((M * (X - res.W @ res.H)) ** 2) + 0.5 * alphas[0] * np.sum(res.W ** 2)
             + 0.5 * alphas[1] * np.sum(res.H ** 2))
    assert f[-1] == pytest.approx(exact, rel=1e-6)


def test_balancing_scales_minimise_the_ridge_at_fixed_product():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(0)
    pen = nmf_cv._Penalty(0.0, 0.7, 0.0, 0.2)
    w_sq, h_sq = rng.uniform(0.1, 5.0, 6), rng.uniform(0.1, 5.0, 6)
    w_sq[5] = 0.0  # an empty component stays as it is
    s = nmf_cv._balancing_scales(w_sq, h_sq, pen)
    for c in range(5):
        def ridge(t, w=w_sq[c], h=h_sq[c]):  # l2_W/2 t^2 |w|^2 + l2_H/2 |h|^2 / t^2
            return 0.35 * t * t * w + 0.1 * h / (t * t)

        best = minimize_scalar(ridge, bounds=(1e-3, 1e3), method="bounded",
                               options={"xatol": 1e-10})
        assert s[c] == pytest.approx(best.x, rel=1e-5)
    assert s[5] == 1.0
    assert nmf_cv._balancing_scales(w_sq, h_sq, nmf_cv._Penalty(0.1, 0.7, 0.0, 0.2)) is None
    assert nmf_cv._balancing_scales(w_sq, h_sq, nmf_cv._Penalty(0.0, 0.7, 0.0, 0.0)) is None


def test_gamma_balancing_scales_minimise_the_priors_at_fixed_product():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    pen = nmf_cv._Penalty(0.4, 0.0, 1.3, 0.0, 0.1, 0.3)
    w_sum, h_sum = rng.uniform(0.1, 5.0, 5), rng.uniform(0.1, 5.0, 5)
    w_sum[4] = 0.0  # an empty component stays as it is
    m, n = 50, 20
    d = nmf_cv._gamma_balancing_scales(w_sum, h_sum, m, n, pen)
    for c in range(4):
        def prior(t, w=w_sum[c], h=h_sum[c]):  # the priors' terms that depend on the scale t
            return 0.4 * t * w + 1.3 * h / t - (0.1 * m - 0.3 * n) * math.log(t)

        best = minimize_scalar(prior, bounds=(1e-4, 1e4), method="bounded",
                               options={"xatol": 1e-12})
        assert d[c] == pytest.approx(best.x, rel=1e-5)
    assert d[4] == 1.0
    flat = nmf_cv._Penalty(0.4, 0.0, 1.3, 0.0)  # no log terms: nothing to balance
    assert nmf_cv._gamma_balancing_scales(w_sum, h_sum, m, n, flat) is None
    ridged = nmf_cv._Penalty(0.4, 0.1, 1.3, 0.0, 0.1, 0.3)
    assert nmf_cv._gamma_balancing_scales(w_sum, h_sum, m, n, ridged) is None


@pytest.mark.parametrize("missing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extrapolated_hals_returns_its_best_iterate_and_gets_there_sooner(missing, dtype):
    """extrapolate=True (HER): the returned factors are the iterate with the lowest objective
    in the history (an independent numpy objective with the penalties), which is below the
    plain HALS fit's at the same tol, reached in at most half as many iterations; the
    objective may rise on undone steps, never the best one."""
    X = nmf_cv.make_planted(150, 90, 5, noise=0.1, missing=missing, random_state=3)
    X = X.astype(dtype)
    M = ~np.isnan(X)
    # tol 1e-7 let the extrapolated fit stop 2.6e-5 above the plain one's objective (both stop
    # on one small step); at 1e-8 it ends below it in 82 iterations against 503
    kw = dict(random_state=0, max_iter=3000, tol=1e-8, alpha_W=0.2, alpha_H=0.2)
    plain = nmf_cv.fit_nmf(X, 5, **kw)
    fast = nmf_cv.fit_nmf(X, 5, extrapolate=True, **kw)
    W, H = fast.W.astype(np.float64), fast.H.astype(np.float64)
    direct = objective(X.astype(np.float64), M, W, H, "frobenius") + 0.1 * (
        np.sum(W ** 2) + np.sum(H ** 2))
    rtol = 1e-9 if dtype == np.float64 else 1e-4
    assert fast.loss_history.min() == pytest.approx(direct, rel=rtol)
    assert fast.loss_history.min() <= plain.loss_history[-1] * (1 + rtol)
    reached = np.flatnonzero(fast.loss_history <= plain.loss_history[-1] * (1 + rtol))[0]
    assert reached <= 0.5 * plain.n_iter, (reached, plain.n_iter)
    assert fast.converged and fast.W.dtype == dtype


def test_tolerance_stops_and_reports_convergence():
    X = lkr(0)
    res = fit(X, 5, tol=1e-3, max_iter=1000)
    assert res.converged and res.n_iter < 1000
    f = res.loss_history
    assert f[-2] - f[-1] <= 1e-3 * f[-2]
    assert np.all(f[:-2] - f[1:-1] > 1e-3 * f[:-2])  # it did not stop earlier than it should


def test_callback_can_stop():
    seen = []

    def callback(n_iter, W, H, obj):
        seen.append((n_iter, obj, W.shape, H.shape))
        return n_iter == 7

    res = fit(lkr(1), 5, tol=0, max_iter=100, callback=callback)
    assert res.n_iter == 7 and len(seen) == 7 and not res.converged
    assert seen[-1][1] == res.loss_history[-1] and seen[-1][2:] == ((50, 5), (5, 100))


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_hals_revives_a_dead_component(missing):
    """A component whose W column and H row are zero stays so under HALS; the fit restarts
    it, and ends where a fit from a live init ends, not at rank k - 1's objective."""
    rng = np.random.default_rng(2)
    X = nmf_cv.make_planted(60, 40, 3, noise=0.02, random_state=2)
    mask = random_mask(X.shape, missing, rng)
    live = fit(X, 3, mask=mask, tol=1e-9, max_iter=2000)
    W0, H0 = live.W.copy(), live.H.copy()
    W0[:, 1], H0[1] = 0.0, 0.0
    res = fit(X, 3, mask=mask, init=(W0, H0), tol=1e-9, max_iter=2000)
    assert np.all(np.diff(res.loss_history) <= 1e-12 * res.loss_history[0])
    assert res.W[:, 1].max() > 0 and res.H[1].max() > 0
    assert res.loss_history[-1] == pytest.approx(live.loss_history[-1], rel=1e-3)
    rank_2 = fit(X, 2, mask=mask, tol=1e-9, max_iter=2000)
    assert res.loss_history[-1] < 0.2 * rank_2.loss_history[-1]


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_revival_that_raises_the_objective_is_undone(alpha):
    """Where the ridge outweighs what an extra component explains, the restarted step raises
    the objective: it is undone (a flat step in the history) and the component stays dead."""
    X = nmf_cv.make_planted(60, 40, 2, noise=0.05, random_state=1)
    two = fit(X, 2, alpha_W=alpha, alpha_H=alpha, tol=1e-12, max_iter=5000)
    W0, H0 = np.c_[two.W, np.zeros(60)], np.r_[two.H, np.zeros((1, 40))]
    res = fit(X, 3, init=(W0, H0), alpha_W=alpha, alpha_H=alpha, tol=0, max_iter=6)
    f = res.loss_history
    assert np.all(np.diff(f) <= 0) and np.any(np.diff(f) == 0)
    assert res.W[:, 2].max() == 0 and res.H[2].max() == 0
    assert f[-1] <= two.loss_history[-1]


# =============================================================================================
# Fitting: a fully observed X, dense or sparse
# =============================================================================================

def test_no_kernel_is_compiled_for_a_literal_argument():
    """Kernels pass integers to other kernels as np.int64: a bare literal would make numba
    compile the callee once more, for Literal[int] (first-use compile time for nothing).
    After a first run's fits of each kind (and whatever ran before in this process), no
    kernel has a signature with a literal type."""
    from numba.core import types
    from numba.core.registry import CPUDispatcher

    X = nmf_cv.make_planted(40, 30, 3, noise=0.05, missing=0.1, random_state=0)
    counts = sp.random(60, 40, density=0.3, random_state=0, format="csr")
    counts.data = np.round(counts.data * 9) + 1
    nmf_cv.fit_nmf(np.nan_to_num(X), 3, max_iter=5)
    nmf_cv.fit_nmf(X, 3, max_iter=5)
    nmf_cv.fit_nmf(counts, 3, loss="kl", max_iter=5)
    nmf_cv.cross_validate(np.nan_to_num(X), [1, 2], n_folds=3, progress=False, max_iter=5)
    literal = [(name, sig) for name, f in vars(nmf_cv).items()
               if isinstance(f, CPUDispatcher) for sig in f.signatures
               if any(isinstance(a, types.Literal) for a in sig)]
    assert literal == []


@pytest.mark.parametrize("k", [3, 4, 7])  # four Gram entries per pass, and the rest
def test_dense_hals_update_solves_nnls_like_scipy(k):
    rng = np.random.default_rng(5)
    W = rng.random((25, k))
    X = rng.random((25, 7))
    H = np.full((k, 7), 0.5)
    nmf_cv._hals_update(H, W.T @ W, W.T @ X, 0.0, 0.0, 5000, 0.0)
    for j in range(7):
        np.testing.assert_allclose(H[:, j], nnls(W, X[:, j])[0], atol=1e-8)


@pytest.mark.parametrize("mm_missing", [-1.0, 0.2, 1.0])  # exact, mixed, all majorized
@pytest.mark.parametrize("pairs_bytes", [2 ** 21, 0])  # Gram matrices from a table, or not
@pytest.mark.parametrize("missing", [0.0, 0.2, 0.7])  # dense, complement mode, direct mode
def test_hals_iterates_match_numpy_reference(missing, pairs_bytes, mm_missing, monkeypatch):
    monkeypatch.setattr(nmf_cv, "_PAIRS_BYTES", pairs_bytes)
    monkeypatch.setattr(nmf_cv, "_majorized_fraction", lambda k: mm_missing)
    X, mask, W, H = _problem(missing)
    solver = _solver(X, mask, W, H, "hals", "frobenius")
    if missing:  # mostly observed lines go through their missing cells, and vice versa
        n_obs = mask.sum(axis=1)
        np.testing.assert_array_equal(solver.rows.sign, np.where(2 * n_obs < X.shape[1], 1, -1))
        assert ((solver.rows.sign < 0).mean() > 0.5) == (missing < 0.5)
    # Majorized: mostly observed lines with at most mm_missing of their cells missing.
    mm_rows = np.flatnonzero((2 * mask.sum(axis=1) >= X.shape[1])
                             & ((~mask).sum(axis=1) <= mm_missing * X.shape[1]))
    mm_cols = np.flatnonzero((2 * mask.sum(axis=0) >= X.shape[0])
                             & ((~mask).sum(axis=0) <= mm_missing * X.shape[0]))
    if missing == 0.2 and mm_missing == 0.2:
        assert 0 < len(mm_rows) < X.shape[0] and 0 < len(mm_cols) < X.shape[1]
    if missing:
        np.testing.assert_array_equal(solver.rows.mm, mm_rows)
        np.testing.assert_array_equal(solver.cols.mm, mm_cols)
    Wr, Hr = W.copy(), H.copy()
    for _ in range(4):
        solver.step()
        ref_hals_step(X, mask, Wr, Hr, mm_rows, mm_cols)
        Ws, Hs = solver.factors()
        np.testing.assert_allclose(Ws, Wr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Hs, Hr, rtol=1e-10, atol=1e-12)
        assert solver.objective == pytest.approx(objective(X, mask, Wr, Hr, "frobenius"),
                                                 rel=1e-10)


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
@pytest.mark.parametrize("missing", [0.0, 0.2, 0.7])
def test_mu_iterates_match_numpy_reference(loss, missing):
    X, mask, W, H = _problem(missing, seed=1)
    solver = _solver(X, mask, W, H, "mu", loss)
    Wr, Hr = W.copy(), H.copy()
    for _ in range(5):
        solver.step()
        ref_mu_step(X, mask, Wr, Hr, loss)
        Ws, Hs = solver.factors()
        np.testing.assert_allclose(Ws, Wr, rtol=1e-10)
        np.testing.assert_allclose(Hs, Hr, rtol=1e-10)
        assert solver.objective == pytest.approx(objective(X, mask, Wr, Hr, loss), rel=1e-10)


@pytest.mark.parametrize("k", [1, 3, 4, 7, 9])
def test_dense_kl_mu_with_nearly_empty_lines_matches_numpy_reference(k):
    """The dense KL solver's one pass per factor (`_kl_mu_lines`: four components per pass,
    then the rest) takes a line's denominators as the whole sums less its missing cells':
    exact to rounding even where a line keeps one observed cell of many."""
    X, mask, W, H = _problem(0.1, seed=3, m=40, n=25, k=k)
    mask[0, 1:] = False   # a row with one observed cell
    mask[2:, 3] = False   # a column with two
    assert mask.mean() > 0.5  # mostly observed: the dense solver, missing cells listed
    solver = _solver(X, mask, W, H, "mu", "kl")
    assert isinstance(solver, nmf_cv._DenseKLSolver)
    Wr, Hr = W.copy(), H.copy()
    for _ in range(4):
        solver.step()
        ref_mu_step(X, mask, Wr, Hr, "kl")
    Ws, Hs = solver.factors()
    np.testing.assert_allclose(Ws, Wr, rtol=1e-10)
    np.testing.assert_allclose(Hs, Hr, rtol=1e-10)
    assert solver.objective == pytest.approx(objective(X, mask, Wr, Hr, "kl"), rel=1e-10)
    X32 = np.where(mask, X, np.nan).astype(np.float32)
    res = nmf_cv.fit_nmf(X32, k, method="mu", loss="kl", init=(W.astype(np.float32),
                         H.astype(np.float32)), max_iter=4, tol=0)
    assert res.W.dtype == np.float32
    np.testing.assert_allclose(res.W, Wr, rtol=1e-4)


@pytest.mark.parametrize("storage", ["dense", "masked", "sparse"])
def test_penalised_kl_mu_moves_to_the_bound_minimum_and_never_raises_the_objective(storage):
    """KL multiplicative updates with a ridge take the minimum of each entry's Lee-Seung bound
    (a quadratic's root). The Frobenius form A num / (den + l1 + l2 A) overshoots it: from
    this init (found by hypothesis) its first step raised the objective 4.236 -> 4.357."""
    X = np.array([[0.1079467, 0.12355084], [0.0, 1.3066168]])
    W0, H0 = np.array([[0.01608367], [0.02971528]]), np.array([[0.7364416, 0.88797215]])
    data = {"dense": X, "masked": np.array([[0.1079467, 0.12355084], [0.0, 1.3066168]]),
            "sparse": sp.csr_matrix(X)}[storage]
    mask = np.ones(X.shape, dtype=bool) if storage == "masked" else None
    pen = dict(alpha_W=0.05, alpha_H=0.1, l1_ratio=0.3)
    res = nmf_cv.fit_nmf(data, 1, mask=mask, method="mu", loss="kl", init=(W0, H0), tol=0,
                         max_iter=30, **pen)
    assert np.all(np.diff(res.loss_history) <= 1e-12), res.loss_history[:3]
    # H's first update against numpy: the bound's minimum solves l2 h^2 + c h - h0 r = 0
    l1, l2 = 0.1 * 0.3, 0.1 * 0.7
    r = W0.T @ (X / np.maximum(W0 @ H0, 1e-300))
    c = W0.sum() + l1
    h1 = (np.sqrt(c ** 2 + 4 * l2 * H0 * r) - c) / (2 * l2)
    one = nmf_cv.fit_nmf(data, 1, mask=mask, method="mu", loss="kl", init=(W0, H0), tol=0,
                         max_iter=1, **pen)
    w_r = W0 * ((X / (W0 @ h1)) @ h1.T)  # W's bound, then its minimum
    cw, l2w = h1.sum() + 0.05 * 0.3, 0.05 * 0.7
    W1 = (np.sqrt(cw ** 2 + 4 * l2w * w_r) - cw) / (2 * l2w)
    assert_allclose(one.H, h1, rtol=1e-10)
    assert_allclose(one.W, W1, rtol=1e-10)


@pytest.mark.parametrize("method,loss", COMBOS)
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_matches_dense(method, loss, fmt, monkeypatch):
    rng = np.random.default_rng(12)
    D = rng.random((50, 35)) @ rng.random((35, 35))
    D[rng.random(D.shape) < 0.5] = 0
    S = sp.csr_matrix(D) if fmt == "csr" else sp.csc_matrix(D)
    dense = fit(D, 4, method=method, loss=loss, init="random", max_iter=40, tol=0)

    def no_densify(*args, **kwargs):
        raise AssertionError("sparse X was densified")

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        monkeypatch.setattr(cls, "toarray", no_densify)
        monkeypatch.setattr(cls, "todense", no_densify)
    sparse = fit(S, 4, method=method, loss=loss, init="random", max_iter=40, tol=0)
    np.testing.assert_allclose(sparse.W @ sparse.H, dense.W @ dense.H, rtol=1e-6, atol=1e-9)
    assert sparse.relative_error == pytest.approx(dense.relative_error, rel=1e-6)
    svd_init = fit(S, 4, method=method, loss=loss, max_iter=40, tol=0)  # randomized SVD
    assert svd_init.relative_error < 1.1 * dense.relative_error


# =============================================================================================
# Fitting: data with missing cells (exact masked steps)
# =============================================================================================

NO_PAIRS = None  # _masked_cd_rows: gather cells rather than sum a table


def _batch_problem(seed=0, m=40, n=24, k=4):
    """Batches of rows missing their own sets of columns (as in proteomics): rows of a
    batch share their missing cells, and so do some columns; one row differs by a cell."""
    rng = np.random.default_rng(seed)
    X = rng.random((m, k)) @ rng.random((k, n)) + 0.05 * rng.random((m, n))
    mask = np.ones((m, n), dtype=bool)
    for batch in np.array_split(np.arange(m), 4):
        mask[np.ix_(batch, rng.choice(n, 5, replace=False))] = False
    mask[3, np.flatnonzero(mask[3])[0]] = False
    return X, mask, rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1


def _two_batches(seed, m=64, n=20, k=3):
    """Two batches of 32 rows, each missing its own 6 columns: each batch one pattern of 32
    rows (at least _SHARED_LINES), given by its missing cells."""
    rng = np.random.default_rng(seed)
    X = rng.random((m, k)) @ rng.random((k, n)) + 0.05 * rng.random((m, n))
    mask = np.ones((m, n), dtype=bool)
    mask[:32, :6] = False
    mask[32:, 6:12] = False
    return X, mask, rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1


@pytest.mark.parametrize("method,loss", COMBOS)
@pytest.mark.parametrize("init", ["nndsvda", "random"])
@pytest.mark.parametrize("missing", [0.15, 0.7])
def test_values_under_mask_change_nothing(method, loss, init, missing):
    X, mask, _, _ = _problem(missing, seed=4)
    results = []
    for fill in [None, np.nan, np.inf, 1e300, -5.0]:
        Xf = X.copy()
        if fill is not None:
            Xf[~mask] = fill
        res = fit(Xf, 3, mask=mask, method=method, loss=loss, init=init, max_iter=25, tol=0)
        results.append(res)
    for res in results[1:]:
        assert np.array_equal(res.W, results[0].W) and np.array_equal(res.H, results[0].H)
        assert np.array_equal(res.loss_history, results[0].loss_history)


@pytest.mark.parametrize("majorized", [-1.0, 1.0])  # exact steps, majorize-minimize steps
def test_masked_hals_solves_the_masked_problem(majorized, monkeypatch):
    """Both kinds of HALS step converge to a stationary point of the masked objective: the
    projected gradient over observed cells vanishes (KKT). Filling the missing cells with
    the observed mean and fitting densely, the imputation a masked fit must not be, does not
    get there (projected gradient 0.03), nor to the masked objective's value."""
    monkeypatch.setattr(nmf_cv, "_majorized_fraction", lambda k: majorized)
    rng = np.random.default_rng(11)
    m, n, k = 60, 40, 3
    X = rng.random((m, k)) @ rng.random((k, n)) + 0.05 * rng.random((m, n))
    mask = rng.random((m, n)) >= 0.1
    res = fit(np.where(mask, X, np.nan), k, max_iter=400, tol=0)
    R = np.where(mask, X - res.W @ res.H, 0.0)
    grad_W, grad_H = -R @ res.H.T, -res.W.T @ R
    projected = [np.where(A > 0, g, np.minimum(g, 0.0))
                 for A, g in ((res.W, grad_W), (res.H, grad_H))]
    X0 = np.where(mask, X, 0.0)
    scale = np.linalg.norm(X0 @ res.H.T) + np.linalg.norm(res.W.T @ X0)
    assert sum(np.linalg.norm(p) for p in projected) < 1e-4 * scale
    assert objective(X, mask, res.W, res.H, "frobenius") < 0.2013


@pytest.mark.parametrize("method", ["hals", "mu", "gdcls"])
def test_held_out_cells_predicted_to_noise_level(method):
    rng = np.random.default_rng(8)
    m, n, k = 200, 120, 4
    clean = rng.random((m, k)) @ rng.random((k, n))
    noise = 0.01 * clean.mean() * rng.standard_normal((m, n))
    X = clean + noise
    hidden = ~random_mask((m, n), 0.2, rng)
    max_iter = 10000 if method == "mu" else 3000  # MU converges slowly (known)
    res = fit(np.where(hidden, np.nan, X), k, method=method, max_iter=max_iter, tol=1e-9)
    pred = (res.W @ res.H)[hidden]
    held_out_error = np.linalg.norm(pred - X[hidden]) / np.linalg.norm(X[hidden])
    noise_level = np.linalg.norm(noise[hidden]) / np.linalg.norm(X[hidden])
    assert held_out_error < 1.5 * noise_level, (held_out_error, noise_level)
    # and the truth behind the noise is recovered better than the noise itself
    assert np.linalg.norm(pred - clean[hidden]) < np.linalg.norm(noise[hidden])


def test_masked_hals_rows_in_small_units_converge():
    """Rows that observe only features in small units (1e-3 against 1e3) still converge:
    neither their tiny curvature nor the large rows' stopping may starve them."""
    rng = np.random.default_rng(0)
    m, n, k = 40, 20, 3
    X = rng.random((m, k)) @ rng.random((k, n)) * np.r_[np.full(10, 1e-3), np.full(10, 1e3)]
    mask = np.ones((m, n), bool)
    mask[:5, 10:] = False
    res = fit(X, k, mask=mask, max_iter=1000, tol=0)
    R = np.where(mask, X - res.W @ res.H, 0.0)
    X0 = np.where(mask, X, 0.0)
    assert np.linalg.norm(R[:5]) < 0.05 * np.linalg.norm(X0[:5])
    assert np.linalg.norm(R[5:]) < 1e-6 * np.linalg.norm(X0[5:])


def test_underdetermined_rows_stay_accurate():
    """Regression (found by hypothesis): k = n with rows of 1-2 observed cells. Curvatures of
    mostly missing rows must not come from cancellation (full Gram minus missing part)."""
    rng = np.random.default_rng(26)
    X = rng.random((13, 4)) + 1.0
    mask = random_mask((13, 4), 0.45, rng)
    mask[6] = [True, False, False, False]
    mask[11] = [True, False, False, False]
    res = nmf_cv.fit_nmf(X, 4, mask=mask, init="nndsvd", tol=0, max_iter=60, random_state=4)
    f = res.loss_history
    assert np.all(np.diff(f) <= 1e-12 * f[0])
    truth = objective(X, mask, res.W, res.H, "frobenius")
    assert f[-1] == pytest.approx(truth, rel=1e-6, abs=1e-12 * np.sum(X[mask] ** 2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), majorized=st.sampled_from([0.1, 0.3, 1.0]), penalised=st.booleans())
def test_majorized_hals_objective_never_increases(problem, majorized, penalised):
    """HALS with majorize-minimize steps on every mostly observed line, not only on those
    with few missing cells as fits choose by default."""
    X, mask, k, seed = problem
    pen = dict(alpha_W=0.05, alpha_H=0.1, l1_ratio=0.3) if penalised else {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nmf_cv, "_majorized_fraction", lambda k: majorized)
        res = nmf_cv.fit_nmf(X, k, mask=mask, tol=0, max_iter=30, random_state=seed, **pen)
    _check_monotone(res, X, mask, "frobenius", penalised)


def test_only_hals_fits_majorize():
    """GDCLS's H step and transform's W step are exact least-squares solves: no majorized
    lines there, nor at k <= 5 (no saving). A HALS fit at k = 10 majorizes mostly observed
    lines with at most 15% missing, and only those."""
    X, mask, W, H = _problem(0.1, m=80, n=60, k=10)
    mask[0] = mask[:, 0] = True  # fully observed lines, majorized at k = 10 only
    data = nmf_cv._validate_data(X, mask)
    pen = nmf_cv._Penalty(0.0, 0.0, 0.0, 0.0)
    for method, update_H in [("gdcls", True), ("hals", False)]:
        solver = nmf_cv._MaskedSolver(data, W.copy(), H.copy(), method, pen, update_H)
        assert len(solver.rows.mm) == len(solver.cols.mm) == 0
    solver = nmf_cv._MaskedSolver(data, W[:, :5].copy(), H[:5].copy(), "hals", pen, True)
    assert len(solver.rows.mm) == len(solver.cols.mm) == 0
    solver = nmf_cv._MaskedSolver(data, W.copy(), H.copy(), "hals", pen, True)
    for axis, found in ((1, solver.rows.mm), (0, solver.cols.mm)):
        expected = np.flatnonzero((~mask).sum(axis=axis) <= 0.15 * X.shape[axis])
        assert 0 < len(expected) < X.shape[1 - axis]
        np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_majorized_rows_match_filled_dense_reference(dtype):
    """A majorize-minimize step with penalties equals exact penalised coordinate descent on
    the row with its missing cells filled by the current predictions and counted as
    observed (numpy reference), over several sweeps; the model term is the sum
    over observed cells of the new predictions squared."""
    rng = np.random.default_rng(12)
    m, n, k = 150, 40, 7
    B = rng.random((n, k)) + 0.05
    M = rng.random((m, n)) >= 0.1
    M[:2] = True  # no missing cell: a plain dense step
    X = rng.random((m, n)) * 2
    A = (rng.random((m, k)) + 0.05).astype(dtype)
    rows, cols = np.nonzero(~M)
    indptr = nmf_cv._indptr(rows, m)
    signs = np.full(m, -1.0)
    Bd = B.astype(dtype)
    B64 = Bd.astype(np.float64)
    filled = np.where(M, X, A.astype(np.float64) @ B64.T)
    expected = ref_penalised_cd_rows(A.astype(np.float64), B64, filled @ B64,
                                     np.ones((m, n), bool), 0.05, 0.3, 3)
    XB = np.ascontiguousarray(np.where(M, X, 0.0) @ B64)
    lines = nmf_cv._MaskedLines(indptr, cols.astype(np.int64), signs, mm=np.arange(m),
                                exact=np.arange(0))
    model = nmf_cv._cd_lines(A, Bd, (XB, nmf_cv._gram64(Bd)[None]), lines, (0.05, 0.3),
                             (3, 0.0), np.empty(n * (k + 4)), True)
    assert A.dtype == dtype
    tol = 1e-10 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(A, expected, rtol=tol, atol=tol)
    A64 = A.astype(np.float64)
    assert model == pytest.approx(np.sum(np.where(M, A64 @ B64.T, 0.0) ** 2), rel=tol)


@pytest.mark.parametrize("collide", [False, True])
def test_lines_with_the_same_cells_share_a_pattern(collide, monkeypatch):
    """Rows (columns) share a pattern exactly when their masks agree (numpy's unique rows),
    numbered by their first line. With every cell's code equal (every hash colliding), the
    cell-by-cell check still keeps lines with different cells apart (sharing less: only
    with the first line of their length)."""
    if collide:
        monkeypatch.setattr(nmf_cv, "_cell_codes", lambda size: np.zeros(size, np.uint64))
    X, mask, W, H = _batch_problem()
    solver = _solver(X, mask, W, H, "hals", "frobenius")
    for lines, M in ((solver.rows, mask), (solver.cols, mask.T)):
        _, first, inverse = np.unique(M, axis=0, return_index=True, return_inverse=True)
        expected = first[inverse.ravel()]
        if collide:  # a line shares only with the first line of the same length and kind
            listed = np.where(2 * M.sum(axis=1) < M.shape[1], M.sum(axis=1),
                              M.shape[1] - M.sum(axis=1))
            kind = 2 * M.sum(axis=1) < M.shape[1]
            for a in range(len(M)):
                b = np.flatnonzero((listed == listed[a]) & (kind == kind[a]))[0]
                expected[a] = b if np.array_equal(M[a], M[b]) else a
        assert_array_equal(lines.pattern, expected)
        for a, p in enumerate(lines.pattern):
            assert p <= a and np.array_equal(M[a], M[p])
    n_patterns = len(np.unique(solver.rows.pattern))
    assert n_patterns > 5 if collide else n_patterns == 5


@pytest.mark.parametrize("shared_lines", [2, 10 ** 9])  # patterns swept together, or not
@pytest.mark.parametrize("mm_missing", [-1.0, 1.0])
def test_hals_iterates_with_shared_patterns_match_numpy_reference(mm_missing, shared_lines,
                                                                  monkeypatch):
    """Lines sharing a pattern take one Gram matrix (formed once) and are solved exactly,
    whatever the majorizing threshold, as are the columns, whose Gram matrices come from
    the row patterns' (units); a pattern's lines are swept together (given by their missing
    cells, or by units) from _SHARED_LINES lines on. Iterates and objective equal the numpy
    reference's."""
    monkeypatch.setattr(nmf_cv, "_majorized_fraction", lambda k: mm_missing)
    monkeypatch.setattr(nmf_cv, "_SHARED_LINES", shared_lines)
    X, mask, W, H = _batch_problem(seed=1)
    solver = _solver(X, mask, W, H, "hals", "frobenius")
    assert solver.cols.units is not None  # columns' Gram matrices from the row batches'
    mm = []
    for lines, M in ((solver.rows, mask), (solver.cols, mask.T)):
        size = np.bincount(lines.pattern, minlength=len(M))[lines.pattern]
        cells = lines.units is None  # by units (the other side's patterns): never majorized
        mm.append(np.flatnonzero((size == 1) & (lines.sign < 0) & (mm_missing > 0) & cells))
        assert_array_equal(lines.mm, mm[-1])
        together = (size >= shared_lines) & ((lines.sign < 0) | (not cells))
        assert_array_equal(np.sort(lines.shared), np.flatnonzero(together))
        assert_array_equal(np.sort(np.r_[lines.exact, lines.shared, lines.mm]), np.arange(len(M)))
        runs = [lines.shared[a:b] for a, b in zip(lines.shared_ptr, lines.shared_ptr[1:])]
        assert lines.shared_ptr[0] == 0 and lines.shared_ptr[-1] == len(lines.shared)
        assert all(len(np.unique(lines.pattern[r])) == 1 for r in runs)
        assert len(np.unique([lines.pattern[r[0]] for r in runs])) == len(runs)
    assert len(solver.rows.shared) > 0 and len(solver.cols.shared) > 0 or shared_lines > 2
    Wr, Hr = W.copy(), H.copy()
    for _ in range(4):
        solver.step()
        ref_hals_step(X, mask, Wr, Hr, *mm)
        Ws, Hs = solver.factors()
        np.testing.assert_allclose(Ws, Wr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Hs, Hr, rtol=1e-10, atol=1e-12)
        assert solver.objective == pytest.approx(objective(X, mask, Wr, Hr, "frobenius"),
                                                 rel=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method,alphas", [("hals", (0.0, 0.0)), ("hals", (0.3, 0.1)),
                                           ("gdcls", (0.0, 0.2))])
def test_fits_with_patterns_swept_together_descend_and_ignore_masked_values(method, alphas,
                                                                            dtype):
    """Fits whose rows go through the pattern kernel (two batches of 32 rows): the masked,
    penalised objective never increases, the last one is the exact one, and the values under
    the mask change nothing (bit for bit)."""
    X, mask, _, _ = _two_batches(3)
    X = X.astype(dtype)
    kw = dict(method=method, alpha_W=alphas[0], alpha_H=alphas[1], l1_ratio=0.5, tol=0,
              max_iter=40, random_state=0)
    res = nmf_cv.fit_nmf(np.where(mask, X, np.nan), 3, **kw)
    solver = nmf_cv._setup_fit(nmf_cv._validate_data(np.where(mask, X, np.nan)), 3,
                               nmf_cv._FitOptions(**kw))
    assert len(solver.rows.shared) == 64
    f = np.asarray(res.loss_history)
    assert np.all(np.diff(f) <= 1e-9 * f[0]) if method == "hals" else f[-1] < f[0]
    other = np.where(mask, X, dtype(1e6))
    again = nmf_cv.fit_nmf(other, 3, mask=mask, **kw)
    assert np.array_equal(res.W, again.W) and np.array_equal(res.H, again.H)
    W, H = res.W.astype(np.float64), res.H.astype(np.float64)
    exact = 0.5 * np.sum((mask * (X - W @ H)) ** 2)  # l1_ratio 0.5: half l1, half ridge
    for alpha, A in zip(alphas, (W, H), strict=True):
        exact += alpha * (0.5 * A.sum() + 0.25 * np.sum(A ** 2))
    # float32: the objective comes from float32 products, |X|^2 - 2 <W, X H'> + ..., which
    # cancel down to the residual: rounding of |X|^2 times float32's precision
    slack = 1e-6 * np.sum(mask * X.astype(np.float64) ** 2) if dtype == np.float32 else 0.0
    assert f[-1] == pytest.approx(exact, rel=1e-9, abs=slack)


@pytest.mark.parametrize("penalties", [(0.0, 0.0), (0.05, 0.3)])
def test_shared_patterns_solve_nnls_like_scipy(penalties):
    """Run to convergence, rows swept together by pattern solve each row's ridge-regularised
    NNLS over its observed cells exactly (scipy.optimize.nnls, l1 folded into the target),
    and the model term is the sum over observed cells of (WH)^2."""
    l1, l2 = penalties
    X, mask, W, H = _two_batches(0)
    solver = _solver(X, mask, W, H, "gdcls", "frobenius")
    rows = solver.rows
    assert len(rows.shared) == 64 and len(rows.shared_ptr) == 3 and not len(rows.exact)
    XHt, bases = solver.lay.products_W(solver.Ht)
    A = W.copy()
    model = nmf_cv._cd_lines(A, solver.Ht, (XHt, bases), rows, (l1, l2), (5000, 0.0),
                             solver.scratch, True)
    Bt = H.T
    k = W.shape[1]
    for i in range(X.shape[0]):
        seen = mask[i]
        G = Bt[seen].T @ Bt[seen] + l2 * np.eye(k)
        L = np.linalg.cholesky(G)  # min 1/2 a'G a - (y - l1) . a  ==  nnls(L', L^-1 (y - l1))
        y = Bt[seen].T @ X[i, seen] - l1
        expected = nnls(L.T, np.linalg.solve(L, y))[0]
        np.testing.assert_allclose(A[i], expected, rtol=1e-7, atol=1e-9)
    assert model == pytest.approx(np.sum(np.where(mask, A @ H, 0.0) ** 2), rel=1e-10)


@pytest.mark.parametrize("sweeps", [1, 5])
def test_shared_pattern_with_an_unseen_component_matches_the_one_by_one_kernel(sweeps,
                                                                                monkeypatch):
    """A pattern's lines whose missing cells hold nearly all of a component (G0 - S is then
    mostly rounding noise there): swept together, they move exactly as _masked_cd_rows
    moves them one by one (the same sums, the same curvature rule)."""
    results = []
    for shared_lines in (16, 10 ** 9):
        monkeypatch.setattr(nmf_cv, "_SHARED_LINES", shared_lines)
        X, mask, W, H = _two_batches(1)
        H[1] = 0.0
        H[1, :6] = 1.0  # batch 0's missing columns
        H[1, 6] = 2.0 ** -30
        solver = _solver(X, mask, W, H, "hals", "frobenius")
        assert len(solver.rows.shared) == (64 if shared_lines == 16 else 0)
        XHt, bases = solver.lay.products_W(solver.Ht)
        A = W.copy()
        model = nmf_cv._cd_lines(A, solver.Ht, (XHt, bases), solver.rows, (0.0, 0.0),
                                 (sweeps, 0.0), solver.scratch, True)
        results.append((A, model))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-9)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-9)


def test_extrapolated_hals_on_missing_cells_never_reads_them():
    X = nmf_cv.make_planted(60, 40, 3, noise=0.1, missing=0.2, random_state=5)
    filled = np.where(np.isnan(X), 1e3, X)
    kw = dict(random_state=1, max_iter=300, extrapolate=True)
    a = nmf_cv.fit_nmf(X, 3, **kw)
    b = nmf_cv.fit_nmf(filled, 3, mask=~np.isnan(X), **kw)
    assert_array_equal(a.W, b.W)
    assert_array_equal(a.loss_history, b.loss_history)


def test_hals_lines_stop_line_by_line():
    """Column 0 (scale 1e3) is solved in one sweep, column 1 (scale 1e-3, two coupled
    coordinates) converges slowly: the dense kernel's stop on the total move ends after the
    second sweep with column 1 far off; _hals_lines, stopping line by line (each column
    relative to its own first sweep, as _cd_block), goes on until column 1 too has settled,
    and otherwise takes the same steps."""
    G = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]])
    solution = np.array([[1e3, 0.0], [0.0, 1e-3], [0.0, 2e-3]])
    Y = G @ solution
    dense, lines = np.zeros((3, 2)), np.zeros((3, 2))
    n_dense = nmf_cv._hals_update(dense, G, Y, 0.0, 0.0, 100, 0.01)
    n_lines = nmf_cv._hals_lines(lines, G, np.diag(G).copy(), Y, 0.0, 0.0, 100, 0.01)
    assert n_dense == 2 and np.abs(dense[:, 1] - solution[:, 1]).max() > 0.5 * 2e-3
    assert n_lines > 10 and np.abs(lines[:, 1] - solution[:, 1]).max() < 0.1 * 2e-3
    np.testing.assert_allclose(lines[:, 0], solution[:, 0])
    again = np.zeros((3, 2))
    nmf_cv._hals_lines(again, G, np.diag(G).copy(), Y, 0.0, 0.0, 2, 0.01)
    np.testing.assert_allclose(again, dense, rtol=1e-14)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
def test_pair_table_rows_lie_on_cache_lines(k):
    """Each row of the Gram table is b b''s lower triangle, then zeros; the table starts on a
    64-byte line and a row is 4 doubles (half a line) or whole lines of 8."""
    B = np.random.default_rng(k).random((37, k))
    table = nmf_cv._pair_products(B)
    width = table.shape[1]
    assert table.ctypes.data % 64 == 0 and (width == 4 or width % 8 == 0)
    assert width >= k * (k + 1) // 2 > width - 8
    rows, cols = np.tril_indices(k)
    lower = np.einsum("bt,br->btr", B, B)[:, rows, cols]
    assert_array_equal(table[:, :len(rows)], lower)
    assert not table[:, len(rows):].any()


@pytest.mark.parametrize("use_pairs", [True, False])  # the two ways to form Gram matrices
@pytest.mark.parametrize("missing", [0.2, 0.7])
def test_masked_cd_solves_nnls_like_scipy(missing, use_pairs):
    """Run to convergence, the masked coordinate-descent kernel (GDCLS's H step) is exact
    ridge-regularised NNLS per column: compare with scipy.optimize.nnls."""
    X, mask, W, H = _problem(missing, seed=2)
    lam = 0.3
    solver = _solver(X, mask, W, H, "gdcls", "frobenius")
    XtW, bases = solver.lay.products_H(solver.W)
    Ht = np.ascontiguousarray(H.T)
    c = solver.cols
    pairs = nmf_cv._pair_products(solver.W) if use_pairs else NO_PAIRS
    nmf_cv._masked_cd_rows(Ht, solver.W, bases, c.kernel(), XtW, np.arange(Ht.shape[0]),
                           0.0, lam, 5000, 0.0, pairs, solver.scratch, False)
    k = W.shape[1]
    for j in range(X.shape[1]):
        rows = mask[:, j]
        A = np.vstack([W[rows], math.sqrt(lam) * np.eye(k)])
        b = np.concatenate([X[rows, j], np.zeros(k)])
        np.testing.assert_allclose(Ht[j], nnls(A, b)[0], atol=1e-8)


@pytest.mark.parametrize("use_pairs", [True, False])
@pytest.mark.parametrize("k", [1, 3, 4, 7])  # odd k: the 2 x 4 tiles' padding
def test_masked_cd_rows_match_numpy_with_penalties(k, use_pairs):
    """Several 64-row blocks, direct and complement rows, empty cell sets, penalties and
    several sweeps (tol=0), against a per-row numpy reference."""
    rng = np.random.default_rng(k)
    m, n = 150, 23
    B = rng.random((n, k)) + 0.05
    M = rng.random((m, n)) >= rng.choice([0.1, 0.8], size=(m, 1))  # mostly seen / mostly missing
    M[:3] = True  # rows with no missing cell: an empty cell set in complement mode
    X = rng.random((m, n)) * 2
    XB = np.where(M, X, 0.0) @ B
    A = rng.random((m, k)) + 0.05
    direct = 2 * M.sum(axis=1) < n
    rows, cols = np.nonzero(M == direct[:, None])
    indptr = nmf_cv._indptr(rows, m)
    scratch = np.empty(n * (k + 4))
    ours = A.copy()
    lines = nmf_cv._MaskedLines(indptr, cols.astype(np.int64), np.where(direct, 1.0, -1.0))
    pairs = nmf_cv._pair_products(B) if use_pairs else NO_PAIRS
    model = nmf_cv._masked_cd_rows(ours, B, (B.T @ B)[None], lines.kernel(), XB, np.arange(m),
                                   0.05, 0.3, 3, 0.0, pairs, scratch, True)
    expected = ref_penalised_cd_rows(A, B, XB, M, 0.05, 0.3, 3)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    assert model == pytest.approx(np.sum(np.where(M, ours @ B.T, 0.0) ** 2), rel=1e-10)


def test_masked_cd_rows_small_curvature_never_overshoots():
    """A row that sees a component only through one tiny value: with a tiny ridge the step
    must use the true curvature (1e-6 + l2), not the ridge alone."""
    B = np.array([[1e-3], [1e3], [1e3]])
    A = np.zeros((1, 1))
    XB = np.array([[1e-3]])  # the row observes cell 0 only, where x = 1
    lines = nmf_cv._MaskedLines(np.array([0, 1]), np.array([0]), np.array([1.0]))
    nmf_cv._masked_cd_rows(A, B, (B.T @ B)[None], lines.kernel(), XB, np.array([0]), 0.0, 1e-8,
                           1, 0.0, NO_PAIRS, np.empty(5), False)

    def row_objective(a):
        return 0.5 * (1.0 - 1e-3 * a) ** 2 + 0.5e-8 * a ** 2
    assert row_objective(A[0, 0]) <= row_objective(0.0)
    assert A[0, 0] == pytest.approx(1e-3 / (1e-6 + 1e-8), rel=1e-9)


def test_masked_cd_rows_float32_component_unseen_stays():
    """float32 factors: a row whose observed cells all have b_t = 0 leaves a_t alone (the
    Gram matrix is float64, so G0 - S is not float32 rounding noise)."""
    rng = np.random.default_rng(3)
    B = (rng.random((12, 2)) + 0.1).astype(np.float32)
    B[4:, 1] = 0.0  # component 1 only in the row's four missing cells
    XB = (rng.random(12) * (np.arange(12) >= 4)) @ B.astype(np.float64)
    A = np.array([[0.5, 0.5]], dtype=np.float32)
    lines = nmf_cv._MaskedLines(np.array([0, 4]), np.arange(4), np.array([-1.0]))
    nmf_cv._masked_cd_rows(A, B, nmf_cv._gram64(B)[None], lines.kernel(),
                           XB[None, :].astype(np.float32), np.array([0]), 0.0,
                           0.0, 1, 0.0,
                           NO_PAIRS, np.empty(4 * 6), False)
    assert A[0, 1] == pytest.approx(0.5, rel=1e-6)


# =============================================================================================
# Fitting: KL on listed cells, and KL coordinate descent
# =============================================================================================

def kl_gradients(X, M, W, H, rate=0.0, shape=1.0):
    """Gradients in W and H of the KL objective over observed cells M, plus Gamma(shape, rate)
    priors on every entry (plain numpy)."""
    ratio = np.divide(X, W @ H, out=np.zeros(X.shape), where=M & (X > 0))
    R = np.where(M, 1.0 - ratio, 0.0)
    gW, gH = R @ H.T + rate, W.T @ R + rate
    if shape > 1:
        gW, gH = gW - (shape - 1) / W, gH - (shape - 1) / H
    return gW, gH


@pytest.mark.parametrize("kind", ["dense", "masked", "sparse"])
def test_kl_cd_converges_to_a_kkt_point(kind):
    """At convergence, every positive entry has zero gradient and every zero entry a
    non-negative one (the KKT conditions of min KL over W, H >= 0), checked against an
    independent numpy gradient."""
    X = poisson_planted(30, 20, 3, seed=1)
    M = np.ones(X.shape, dtype=bool)
    if kind == "masked":
        M = random_mask(X.shape, 0.2, np.random.default_rng(2))
    data = sp.csr_matrix(X) if kind == "sparse" else np.where(M, X, np.nan)
    res = fit(data, 3, loss="kl", method="cd", max_iter=3000, tol=0)
    gW, gH = kl_gradients(X, M, res.W, res.H)
    for A, g in ((res.W, gW), (res.H, gH)):
        scale = np.abs(g).max() + 1.0
        assert np.all(np.abs(g[A > 1e-12]) < 1e-5 * scale)
        assert np.all(g[A <= 1e-12] > -1e-5 * scale)
    assert (res.W == 0).any() or (res.H == 0).any()  # CD reaches exact zeros; MU cannot


@pytest.mark.parametrize("kind", ["dense", "masked", "sparse"])
def test_kl_gamma_prior_fit_is_the_posterior_mode(kind):
    X = sparse_counts(30, 20, 3, seed=4, density_mean=1.0)
    M = np.ones(X.shape, dtype=bool)
    if kind == "masked":
        M = random_mask(X.shape, 0.2, np.random.default_rng(5))
    data = sp.csr_matrix(X) if kind == "sparse" else np.where(M, X, np.nan)
    res = fit(data, 4, loss="kl", gamma_prior=(1.3, 0.5), max_iter=3000, tol=0)
    assert res.W.min() > 0 and res.H.min() > 0  # shape > 1: no entry, no prediction at 0
    gW, gH = kl_gradients(X, M, res.W, res.H, rate=0.5, shape=1.3)
    for g in (gW, gH):
        assert np.abs(g).max() < 1e-5 * (np.abs(kl_gradients(X, M, res.W, res.H)[0]).max() + 1)
    f = res.loss_history
    prior = 0.5 * (res.W.sum() + res.H.sum()) - 0.3 * (np.log(res.W).sum() + np.log(res.H).sum())
    assert f[-1] == pytest.approx(objective(X, M, res.W, res.H, "kl") + prior, rel=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), shape=st.sampled_from([1.0, 1.1, 2.0]),
       rate=st.sampled_from([0.0, 0.2, 3.0]), init=st.sampled_from(["nndsvda", "random"]))
def test_kl_cd_with_gamma_priors_never_increases_the_objective(problem, shape, rate, init):
    X, mask, k, seed = problem
    res = nmf_cv.fit_nmf(X, k, mask=mask, loss="kl", init=init, tol=0, max_iter=30,
                         random_state=seed, gamma_prior=(shape, rate))
    f = res.loss_history
    assert np.all(np.isfinite(f)) and np.all(np.diff(f) <= 1e-9 * abs(f[0]) + 1e-12)
    assert np.all(res.W >= 0) and np.all(res.H >= 0)
    W, H = res.W, res.H
    prior = rate * (W.sum() + H.sum())
    if shape > 1:
        assert W.min() > 0 and H.min() > 0
        prior -= (shape - 1) * (np.log(W).sum() + np.log(H).sum())
    assert f[-1] == pytest.approx(objective(X, mask, W, H, "kl") + prior, rel=1e-7, abs=1e-9)


def test_kl_cd_gets_further_in_50_iterations_than_mu_in_500():
    X = poisson_planted(200, 150, 5, seed=6)
    cd = fit(X, 5, loss="kl", method="cd", max_iter=50, tol=0, init="random")
    mu = fit(X, 5, loss="kl", method="mu", max_iter=500, tol=0, init="random")
    assert cd.loss_history[0] == pytest.approx(mu.loss_history[0], rel=1e-12)  # same init
    assert cd.loss_history[-1] < mu.loss_history[-1]


@pytest.mark.parametrize("storage", ["dense", "missing", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extrapolated_kl_cd_returns_its_best_iterate_and_gets_there_sooner(storage, dtype):
    """extrapolate=True with KL coordinate descent: the returned factors are the iterate with
    the lowest objective in the history (an independent numpy objective with the Gamma
    priors), at or below the plain fit's final objective at the same tol, reached in at most
    0.7 times as many iterations."""
    X = poisson_planted(150, 90, 5, 3)
    M = np.ones(X.shape, dtype=bool)
    if storage == "missing":
        M = np.random.default_rng(0).random(X.shape) > 0.2
        X[~M] = np.nan
    data = sp.csr_matrix(X.astype(dtype)) if storage == "sparse" else X.astype(dtype)
    shape, rate = 1.1, 0.3
    kw = dict(random_state=0, max_iter=3000, tol=1e-7, loss="kl", gamma_prior=(shape, rate))
    plain = nmf_cv.fit_nmf(data, 5, **kw)
    fast = nmf_cv.fit_nmf(data, 5, extrapolate=True, **kw)
    W, H = fast.W.astype(np.float64), fast.H.astype(np.float64)
    direct = objective(X, M, W, H, "kl") + rate * (W.sum() + H.sum()) - (shape - 1) * (
        np.log(W).sum() + np.log(H).sum())
    assert fast.loss_history.min() == pytest.approx(
        direct, rel=1e-9 if dtype == np.float64 else 1e-4)
    # both stop within tol of the same minimum: count iterations to a level both reach
    assert fast.loss_history.min() <= plain.loss_history[-1] * (1 + 1e-5)
    target = max(fast.loss_history.min(), plain.loss_history[-1]) * (1 + 1e-6)
    reached = [np.flatnonzero(res.loss_history <= target)[0] for res in (fast, plain)]
    assert reached[0] <= 0.7 * reached[1], reached
    assert fast.converged and fast.W.dtype == dtype


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 30), shape=st.sampled_from([0.0, 0.1, 2.0]),
       l2=st.sampled_from([0.0, 0.5, 20.0]), spread=st.sampled_from([0.01, 1.0, 100.0]))
def test_kl_safe_step_down_stops_short_of_the_minimum(seed, c, shape, l2, spread):
    """`_kl_safe_down`: from a coordinate whose derivative is positive, the step moves down
    and lands where the derivative (numpy, from its definition) is still >= 0, so between the
    minimum and the start, where the convex objective is below its start."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, c) + 1.0
    b = rng.gamma(0.5, 1.0, c) * rng.choice([1.0, spread], c)
    old = rng.gamma(1.0, 1.0) + 0.01
    rest = rng.gamma(0.5, 1.0, c) * rng.choice([0.0, 1.0], c)  # the other coordinates' part
    v = rest + old * b
    num_cells = np.sum(x * b / v)

    def slope(s, linear):
        out = linear + l2 * s - np.sum(x * b / (v + (s - old) * b))
        return out - shape / s if shape else out

    num = num_cells + (shape / old if shape else 0.0)
    curv = np.sum(x * b * b / v ** 2) + (shape / old ** 2 if shape else 0.0)
    r_max = max(np.max(b / v), 1.0 / old if shape else 0.0)
    linear = num - l2 * old + rng.gamma(1.0, 1.0) * num  # f'(old) > 0
    grad = linear + l2 * old - num
    assert grad > 0 and slope(old, linear) == pytest.approx(grad)
    new = nmf_cv._kl_safe_down(old, grad, curv + l2, r_max)
    assert 0 <= new < old
    if new == 0:  # projected: only without the prior's barrier, every prediction still > 0
        assert shape == 0 and np.all(v - old * b > 0)
    assert slope(new, linear) >= -1e-9 * (abs(linear) + num)


@pytest.mark.parametrize("d_last", [0.0, 0.3, -0.05])
@pytest.mark.parametrize("seed", range(5))
def test_kl_coordinate_sums_against_numpy(seed, d_last):
    """One pass gives the coordinate's two sums and an upper bound of max b / v within
    c^(1/8) of it (what `_kl_safe_down` needs), after applying the previous step to v."""
    rng = np.random.default_rng(seed)
    c, k = 37, 3
    B = rng.gamma(0.5, 1.0, (k, c)) * rng.choice([1.0, 1e-3, 1e3], (k, c))
    a = rng.gamma(1.0, 1.0, k)
    x = rng.poisson(2.0, c) + 1.0
    v = a @ B - d_last * B[0]  # the step d_last on coordinate 0 is not in v yet
    scratch, vk = B.ravel().copy(), v.copy()
    num, curv, r_bound = nmf_cv._kl_coordinate_sums(scratch, c, x, vk, c, d_last, 0, 1e-300,
                                                    a[1])
    v_now = v + d_last * B[0]
    np.testing.assert_allclose(vk, v_now, rtol=1e-12)
    r = B[1] / v_now
    assert num == pytest.approx(np.sum(x * r), rel=1e-12)
    assert curv == pytest.approx(np.sum(x * r * r), rel=1e-12)
    assert r.max() <= r_bound <= c ** 0.125 * r.max() * (1 + 1e-12)


# =============================================================================================
# Fitting: cross-validation's training sets, through the fold rule
# =============================================================================================

@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_rule_training_objectives_equal_direct_sums_over_training_cells(storage):
    """The KL objective's sum of WH over training cells comes from the factors' sums (all
    cells' minus the held-out groups'), the squared error's model term from group Gram
    matrices; both against numpy sums over the training cells of a densified copy."""
    X = sparse_counts(50, 30, 3, 2)
    S = X if storage == "dense" else sp.csr_matrix(X)
    train, held = _rule_training(S)
    rng = np.random.default_rng(1)
    W, H = rng.random((50, 3)), rng.random((3, 30))
    pen = nmf_cv._Penalty(0.0, 0.3, 0.0, 0.2)
    WH = W @ H
    tr = ~held
    kl = nmf_cv._FoldKLSolver(train, W.copy(), H.copy(), pen)
    pos = tr & (X > 0)
    direct_kl = (np.sum(X[pos] * np.log(X[pos] / WH[pos])) - X[tr].sum() + WH[tr].sum()
                 + 0.15 * (W ** 2).sum() + 0.1 * (H ** 2).sum())
    assert kl.objective == pytest.approx(direct_kl, rel=1e-12)
    fro = nmf_cv._FoldSolver(train, W.copy(), H.copy(), "hals", pen)
    direct_fro = (0.5 * np.sum((X - WH)[tr] ** 2) + 0.15 * (W ** 2).sum()
                  + 0.1 * (H ** 2).sum())
    assert fro.objective == pytest.approx(direct_fro, rel=1e-10)
    press, train_err = train.scores(W, H, "frobenius")
    assert press == pytest.approx(np.sum((X - WH)[held] ** 2), rel=1e-12)
    assert train_err == pytest.approx(np.sum((X - WH)[tr] ** 2), rel=1e-12)
    press, train_dev = train.scores(W, H, "kl")
    assert press == pytest.approx(nmf_cv._poisson_deviance(X[held], WH[held]), rel=1e-12)
    assert train_dev == pytest.approx(nmf_cv._poisson_deviance(X[tr], WH[tr]), rel=1e-12)
    assert train.observed_mean() == pytest.approx(X[tr].mean(), rel=1e-12)
    # the init's fill equals the masked data's (rank-1 fit of the training means)
    filled = nmf_cv._validate_data(np.where(tr, X, np.nan)).filled()
    op = train.filled()
    assert_allclose(op @ np.eye(30), filled, atol=1e-12)
    assert_allclose((op.T @ np.eye(50)).T, filled, atol=1e-12)


@pytest.mark.parametrize("method,loss", COMBOS)
def test_rule_training_fits_match_the_masked_fit(method, loss):
    """From the same init, a fit through the fold rule and fit_nmf with the training cells
    as its mask: MU (Frobenius and KL) and KL coordinate descent take identical steps; HALS
    and GDCLS reach the same objective (their sweeps stop per group rather than per line)
    and never go up."""
    X = sparse_counts(60, 40, 3, 3) + nmf_cv.make_planted(60, 40, 3, random_state=3)
    for S in (X, sp.csr_matrix(X)):
        train, held = _rule_training(S, n_folds=5, f=2)
        rng = np.random.default_rng(0)
        init = (rng.random((60, 4)), rng.random((4, 40)))
        kw = dict(init=init, method=method, loss=loss, alpha_W=0.1, alpha_H=0.1)
        a = fit_training(train, 4, max_iter=30, tol=0, **kw)
        b = nmf_cv.fit_nmf(np.where(held, np.nan, X), 4, max_iter=30, tol=0, **kw)
        assert np.all(np.diff(a.loss_history) <= 1e-12 * a.loss_history[0])
        if method == "mu" or loss == "kl":
            assert_allclose(a.loss_history, b.loss_history, rtol=1e-10)
            assert_allclose(a.W @ a.H, b.W @ b.H, rtol=1e-8)
        else:
            a = fit_training(train, 4, max_iter=3000, tol=1e-12, **kw)
            b = nmf_cv.fit_nmf(np.where(held, np.nan, X), 4, max_iter=3000, tol=1e-12, **kw)
            assert a.loss_history[-1] == pytest.approx(b.loss_history[-1], rel=1e-4)


# =============================================================================================
# Cross-validation: leave-cells-out PRESS
# =============================================================================================

def fit_training(train, k, **kw):
    """A fit of a cross-validation training set, as cross_validate's tasks make it (fit_nmf
    takes public inputs only)."""
    return nmf_cv._fit(train, k, nmf_cv._FitOptions(**kw))


def _rule_training(X, n_folds=4, f=1, seed=0):
    split = nmf_cv._fold_rule(X.shape, n_folds, np.random.default_rng(seed))
    held = (split.row_class[:, None] + split.col_class[None, :]) % n_folds == f
    return nmf_cv._FoldTraining(X, split, f), held


def _barely_touching_problem():
    """Component 0 lives on columns 0..9 (weight 1) and, barely, on 10..19 (weights ~1e-3);
    component 1 on 10..19. Row 0's cells in 0..9 are held out, so only its cells in 10..19,
    where component 0 is almost free, say anything about its weight."""
    rng = np.random.default_rng(3)
    H = np.zeros((2, 20))
    H[0, :10] = 1.0
    H[0, 10:] = 1e-3 * rng.uniform(0.5, 1.5, 10)
    H[1, 10:] = 1.0
    W = rng.uniform(0.5, 1.5, (60, 2))
    X = np.abs(W @ H + 0.05 * rng.standard_normal((60, 20)))
    tiny = H[0, 10:] - H[0, 10:].mean()
    X[0, 10:] = 1.0 + 0.05 * tiny / tiny.std()  # noise that happens to follow component 0
    mask = np.ones(X.shape, dtype=bool)
    mask[0, :10] = False
    return X, mask, H


def swimmer(noise, seed=0):
    """Swimmer-like parts data: 20 x 20 images of a torso and four limbs, each limb in one of
    four positions (non-overlapping segments), all 256 combinations: 16 limb parts plus the
    torso in every image (linear rank 13, non-negative rank 16), |N(0, noise^2)| noise."""
    size = 20
    torso = np.zeros((size, size))
    torso[6:14, 9:11] = 1.0
    parts = []
    for r, c in ((4, 4), (4, 13), (15, 4), (15, 13)):
        segments = [(slice(r - 3, r), slice(c, c + 2)), (slice(r, r + 2), slice(c - 3, c)),
                    (slice(r + 1, r + 4), slice(c + 1, c + 3)),
                    (slice(r - 2, r), slice(c + 2, c + 5))]
        limb = []
        for rows, cols in segments:
            img = np.zeros((size, size))
            img[rows, cols] = 1.0
            limb.append(img.ravel())
        parts.append(limb)
    X = np.array([torso.ravel() + sum(parts[limb][p] for limb, p in enumerate(combo))
                  for combo in itertools.product(range(4), repeat=4)])
    X = X[:, X.sum(axis=0) > 0]
    rng = np.random.default_rng(seed)
    return np.abs(X + noise * rng.standard_normal(X.shape))


def _missing_patterns(m=60, n=40, seed=0):
    """Planted data with cells missing at random, and in whole blocks (batches of rows each
    missing their own set of columns, as in proteomics), plus the hard lines: a row with one
    observed cell, a mostly missing row and column (their cells kept or listed directly)."""
    rng = np.random.default_rng(seed)
    X = nmf_cv.make_planted(m, n, 3, noise=0.1, random_state=seed)
    at_random = np.where(rng.random(X.shape) < 0.2, np.nan, X)
    blocks = X.copy()
    for batch in np.array_split(rng.permutation(m), 4):
        blocks[np.ix_(batch, rng.choice(n, n // 4, replace=False))] = np.nan
    for Y in (at_random, blocks):
        Y[0, 1:] = np.nan
        Y[1, : int(0.7 * n)] = np.nan
        Y[: int(0.6 * m), 2] = np.nan
    return {"random": at_random, "blocks": blocks}


def _cell_source(data, cells, loss="frobenius", method=None):
    return nmf_cv._CellSource(*nmf_cv._observed_cells(data), data.shape, data.masked)


def _missing_training(X, f=1, n_folds=4, seed=0):
    data = nmf_cv._validate_data(X)
    source = nmf_cv._MissingRuleSource.of(data)
    split = source.split(n_folds, np.random.default_rng(seed))
    cell_split = _cell_source(data, False).split(n_folds, np.random.default_rng(seed))
    train = source.training(split, f)
    return data, source, split, train, cell_split.cell_fold != f, cell_split.cell_fold == f


def ref_keep_coverage(fold, rows, cols, shape, n_folds, rng):
    """The numpy version of _keep_coverage (sorting keys of every cell)."""
    fold = np.array(fold, dtype=np.int64)
    order = rng.permutation(len(rows))
    for index, size in ((rows, shape[0]), (cols, shape[1])):
        total = np.bincount(index, minlength=size)
        fold[total[index] == 1] = -1
        held = order[fold[order] >= 0]
        keys = index[held] * n_folds + fold[held]
        unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
        emptied = counts == total[unique // n_folds]
        fold[held[first[emptied]]] = -1
    return fold


def test_cv_summaries_are_robust_to_one_wild_fold():
    press = np.array([[[10.0, 11.0, 9.0, 10.5, 9.5]],
                      [[8.0, 8.2, 7.9, 8.1, 5000.0]],   # the true rank, one fold blew up
                      [[9.0, 9.1, 8.9, 9.2, 9.05]]])
    cv = nmf_cv.CVResult(np.array([2, 3, 4]), press, press / 2)
    assert cv.best_rank == 3  # the mean would say 4
    assert int(np.argmin(cv.press_mean)) == 2
    assert_allclose(cv.press_median, [10.0, 8.1, 9.05])
    mad = np.median(np.abs(press[1, 0] - 8.1))
    assert cv.press_mad_se[1] == pytest.approx(1.2533 * 1.4826 * mad / math.sqrt(5), rel=1e-4)
    assert cv.n_outlier_folds.tolist() == [0, 1, 0]
    assert cv.best_rank_1se == 3
    flat = nmf_cv.CVResult(np.array([2, 3]), np.array([[[10.0, 10.2, 9.8]], [[9.9, 10.0,
                                                                              9.7]]]),
                           np.ones((2, 1, 3)))
    assert (flat.best_rank, flat.best_rank_1se) == (3, 2)


def test_unfinished_cv_with_no_fold_fitted_yet_is_still_a_result():
    """An interrupted run (report_from_checkpoint) may stop before any fold is fitted: every
    PRESS is NaN, and the result holds its place rather than failing on the one-SE rule."""
    press = np.full((3, 1, 5), np.nan)
    cv = nmf_cv.CVResult(np.array([2, 3, 4]), press, press)
    assert np.isnan(cv.press_median).all() and cv.best_rank_1se == cv.best_rank == 2


# outlier folds against the median, not the mean
def test_outlier_fold_counted_against_the_median_with_three_folds():
    press = np.array([[[10.0, 11.0, 9.0]], [[8.0, 8.2, 500.0]]])
    cv = nmf_cv.CVResult(np.array([2, 3]), press, press / 2)
    assert cv.n_outlier_folds.tolist() == [0, 1]  # 500 > 3 x 8.2, though < 3 x mean (172)


def test_contenders_and_the_pick_follow_the_paired_rule():
    """Against hand-made folds: a rank leaves contention when the median of its fold-by-fold
    relative excess over the best exceeds 2 robust standard errors (one wild fold cannot
    keep it in); with two splits, their spread widens the error and brings close ranks
    back; best_rank is the smallest rank within one standard error."""
    best = np.array([10.0, 11.0, 9.0, 10.5, 9.5])
    rows = {2: best * 1.3,  # worse on every fold
            3: best,  # the best
            4: best * np.array([1.01, 0.99, 1.02, 0.995, 1.0]),  # a tie
            5: best * np.array([1.2, 1.25, 1.22, 1.18, 0.01]),  # far worse, one wild fold
            6: best * np.array([1.08, 1.07, 1.09, 1.08, 1.075])}  # clearly worse
    press = np.array([rows[k] for k in range(2, 7)])[:, None, :]
    assert nmf_cv._contenders(press) == [1, 2]  # the best and the tie
    rows[4] = best * 1.05
    press = np.array([rows[k] for k in range(2, 7)])[:, None, :]
    assert nmf_cv._contenders(press) == [1]  # 4 is out by the rule
    cv = nmf_cv.CVResult(np.arange(2, 7), press, press)
    assert (cv.best_rank, cv.min_rank) == (3, 3)
    # a second split where 4 beats 3 by as much: the split-to-split spread brings 6 back
    second = press.copy()
    second[2, 0], second[4, 0] = best * 0.95, best * 1.0
    two = np.concatenate([press, second], axis=1)
    assert nmf_cv._contenders(two) == [1, 2, 4]
    two[[0, 3], 1] = np.nan  # 2 and 5 not fitted on the second split: the same
    assert nmf_cv._contenders(two) == [1, 2, 4]
    cv = nmf_cv.CVResult(np.arange(2, 7), two, two)
    assert cv.best_rank == 3 and cv.repeat_best_ranks.tolist() == [3, 4]


def test_pick_text_states_the_spread_over_splits():
    ranks = np.array([5, 6, 7, 9])

    def result(picks):
        press = np.full((4, len(picks), 3), 10.0)
        for r, k in enumerate(picks):
            press[list(ranks).index(k), r] = 9.0
        return nmf_cv.CVResult(ranks, press, press)

    assert result([6] * 5).pick_text() == "6 (5 of 5 splits)"
    mixed = result([6, 9, 6, 9, 6])
    assert mixed.best_rank == 6 and mixed.pick_text() == "6 or 9 (3 and 2 of 5 splits)"
    assert mixed.pick_counts() == [(6, 3), (9, 2)]
    assert result([6]).pick_text() == "6 (one split)"
    pooled = result([6, 9])
    pooled.press[0] = 9.3  # 5 is second on both splits: the smallest pooled, never alone
    pooled = nmf_cv.CVResult(ranks, pooled.press, pooled.press)
    assert pooled.pick_text() == "5 (pooled over 2 splits; alone they pick 6 or 9: 1 and 1 of 2)"


def test_cv_folds_cover_rows_and_columns_and_partition_cells():
    X = nmf_cv.make_planted(25, 18, 2, missing=0.6, random_state=20)
    cv = nmf_cv.cross_validate(X, [1, 2], n_folds=4, n_repeats=2, random_state=0,
                               progress=False, max_iter=5)
    observed = ~np.isnan(X)
    assert np.array_equal(cv.folds[0] != -2, observed)
    for grid in cv.folds:
        for f in range(4):
            train = observed & (grid != f)
            assert train.any(axis=1).all() and train.any(axis=0).all()
        held = np.isin(grid, range(4))
        sizes = np.bincount(grid[held], minlength=4)
        # the rule deals rows and columns out evenly, not the observed cells
        assert sizes.max() - sizes.min() <= 0.4 * sizes.mean()
    assert not np.array_equal(cv.folds[0], cv.folds[1])
    assert cv.n_kept == int((cv.folds[0] == -1).sum())


@pytest.mark.parametrize("case", ["rule", "missing", "warm"])
def test_cv_no_information_from_held_out_cells(case):
    """Changing fold 0's held-out values leaves fold 0's fits alone. Fully observed data
    ("rule") and data with missing cells read the training sets through the fold rule, where
    held-out values enter X H' and cancel: rounding only (1e-9 here, on values changed
    10x); the cell lists (warm starts) never read them at all."""
    X = nmf_cv.make_planted(30, 20, 3, noise=0.05, random_state=21)
    if case == "missing":
        X[0, 0] = np.nan
    # stuck_restarts=0 and n_repeats=1: whether a fold is refitted, and which ranks get more
    # splits, depend on other folds' errors (see cross_validate); the fits themselves only
    # ever see training cells
    kw = dict(n_folds=3, random_state=5, progress=False, return_factors=True, max_iter=50,
              init="random", warm_start=case == "warm", stuck_restarts=0, n_repeats=1)
    a = nmf_cv.cross_validate(X, [2, 3], **kw)
    fold0 = a.folds[0] == 0
    X2 = X.copy()
    X2[fold0] = X2[fold0] * 10 + 1  # change only fold 0's held-out values
    b = nmf_cv.cross_validate(X2, [2, 3], **kw)
    assert np.array_equal(a.folds, b.folds)
    rtol = 0.0 if case == "warm" else 1e-9
    for k in (2, 3):
        for Wa, Wb in zip(a.factors[(k, 0, 0)], b.factors[(k, 0, 0)]):
            assert_allclose(Wb, Wa, rtol=rtol, atol=rtol * Wa.max())
        assert not np.allclose(a.factors[(k, 0, 1)][0], b.factors[(k, 0, 1)][0])
    assert np.all(b.press[:, 0, 0] > a.press[:, 0, 0])
    assert_allclose(b.train_rss[:, 0, 0], a.train_rss[:, 0, 0], rtol=rtol)


def test_cv_press_matches_independent_computation():
    X = nmf_cv.make_planted(20, 15, 2, noise=0.1, random_state=22)
    cv = nmf_cv.cross_validate(X, [2], n_folds=3, random_state=1, progress=False,
                               return_factors=True, max_iter=30)
    assert cv.press.shape == (1, 2, 3)  # "auto": two splits for every rank
    for r, f in itertools.product(range(2), range(3)):
        W, H = cv.factors[(2, r, f)]
        held = cv.folds[r] == f
        train = ~held
        assert cv.press[0, r, f] == pytest.approx(np.sum((X - W @ H)[held] ** 2), rel=1e-12)
        assert cv.train_rss[0, r, f] == pytest.approx(np.sum((X - W @ H)[train] ** 2),
                                                      rel=1e-12)
    assert cv.press_mean[0] == pytest.approx(cv.press[0].mean())
    assert cv.press_se[0] == pytest.approx(cv.press[0].std(ddof=1) / np.sqrt(6))


def test_cv_leave_one_out_is_exact():
    X = nmf_cv.make_planted(8, 6, 2, noise=0.1, random_state=23)
    cv = nmf_cv.cross_validate(X, [1, 2], n_folds="loo", random_state=0, progress=False,
                               max_iter=40, tol=0, ridge=0)
    for i, k in enumerate((1, 2)):
        total = 0.0
        for a in range(8):
            for b in range(6):
                mask = np.ones(X.shape, dtype=bool)
                mask[a, b] = False
                res = nmf_cv.fit_nmf(X, k, mask=mask, max_iter=40, tol=0,  # exact-SVD init
                                     extrapolate=True)
                total += (X[a, b] - res.W[a] @ res.H[:, b]) ** 2
        assert cv.press_mean[i] == pytest.approx(total, rel=1e-9)
    with pytest.raises(ValueError, match="allow_large_loo"):
        nmf_cv.cross_validate(np.ones((50, 50)), [1], n_folds="loo")


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
@pytest.mark.parametrize("sparse", [False, True])
def test_one_held_out_cell_cannot_carry_a_fold(loss, sparse):
    """A held-out cell scoring more than half its fold, predicted above every training value
    of its row and column, is scored at the largest of them; every other fold's score is
    the plain sum over its cells (numpy reference)."""
    from scipy.special import xlogy

    X = poisson_planted(30, 20, 2, seed=4)
    train, held = _rule_training(sp.csr_matrix(X) if sparse else X, n_folds=4, f=1)
    i, j = map(int, np.argwhere(held)[5])
    rng = np.random.default_rng(1)
    W, H = rng.random((30, 3)), rng.random((3, 20))
    W[:, 2], H[2] = 0.0, 0.0

    def score(x, mu):
        if loss == "kl":
            return 2 * (xlogy(x, x) - xlogy(x, mu) - x + mu)
        return (x - mu) ** 2

    plain = score(X, W @ H)[held].sum()
    assert train.scores(W, H, loss)[0] == pytest.approx(plain, rel=1e-10)
    W[i, 2], H[2, j] = 100.0, 100.0  # one cell predicted 1e4: far above its row and column
    WH = W @ H
    cells = score(X, WH)
    assert cells[i, j] > 0.5 * cells[held].sum()
    bound = max(X[i][~held[i]].max(), X[:, j][~held[:, j]].max())
    expected = cells[held].sum() - cells[i, j] + score(X[i, j], bound)
    assert train.scores(W, H, loss)[0] == pytest.approx(expected, rel=1e-10)
    assert train.scores(W, H, loss)[1] == pytest.approx(cells[~held].sum(), rel=1e-10)


@pytest.mark.parametrize("method", ["cd", "mu"])
def test_cv_kl_scores_poisson_deviance_of_held_out_cells(method):
    from scipy.special import xlogy

    X = poisson_planted(25, 18, 2, seed=3)
    X[0, :4] = 0.0  # zeros: 0 log 0 = 0
    cv = nmf_cv.cross_validate(X, [2], n_folds=3, loss="kl", method=method, random_state=1,
                               progress=False, return_factors=True, max_iter=40,
                               stuck_restarts=0)
    assert cv.loss == "kl"
    for f in range(3):
        W, H = cv.factors[(2, 0, f)]
        mu = np.maximum(W @ H, np.sqrt(np.finfo(float).tiny))  # the documented floor
        deviance = 2 * (xlogy(X, X) - xlogy(X, mu) - X + mu)
        held = cv.folds[0] == f
        assert cv.press[0, 0, f] == pytest.approx(deviance[held].sum(), rel=1e-10)
        assert cv.train_rss[0, 0, f] == pytest.approx(deviance[~held].sum(), rel=1e-10)
        # the fold was fitted by KL updates on its training cells only
        mask = ~held & (cv.folds[0] != -2)
        # CV's defaults for KL CD: Gamma priors from the ridge (0.1), tol=1e-5, extrapolated
        cd = {"gamma_prior": (1.1, cv.alpha[0, f]), "tol": 1e-5,
              "extrapolate": True} if method == "cd" else {}
        ref = nmf_cv.fit_nmf(np.where(mask, X, np.nan), 2, method=method, loss="kl",
                             max_iter=40, **{"tol": 1e-6, **cd},
                             random_state=np.random.SeedSequence(1).spawn(2)[1].spawn(3)[f])
        np.testing.assert_allclose(W @ H, ref.W @ ref.H, rtol=1e-10)


def test_cv_warm_start_chains_ranks_within_each_fold():
    """Each rank of a fold starts from the previous rank's factors plus new components; its
    first iteration is no worse than the previous rank's end point; the warm chains pick
    the planted rank, serially and on a pool alike."""
    from concurrent.futures import ProcessPoolExecutor

    X = nmf_cv.make_planted(50, 35, 3, noise=0.05, missing=0.05, random_state=8)
    kw = dict(n_folds=3, random_state=2, progress=False, return_factors=True, warm_start=True)
    warm = nmf_cv.cross_validate(X, [1, 2, 3, 4, 5], **kw)
    assert warm.best_rank == 3
    with ProcessPoolExecutor(2) as pool:
        pooled = nmf_cv.cross_validate(X, [1, 2, 3, 4, 5], executor=pool, **kw)
    np.testing.assert_array_equal(warm.press, pooled.press)
    seeds = np.random.SeedSequence(2).spawn(2)[1].spawn(5 * 3)  # rank-major tasks
    for f in range(3):  # rank k's fit, redone from rank k-1's factors plus new components
        mask = (warm.folds[0] != f) & (warm.folds[0] != -2)
        train = np.where(mask, X, np.nan)
        for k in (2, 3):
            W0, H0 = warm.factors[(k - 1, 0, f)]
            seed = seeds[(k - 1) * 3 + f]
            init = nmf_cv._grow_factors(np.where(mask, X, 0.0), mask, W0, H0, k, seed)
            np.testing.assert_array_equal(init[0][:, :k - 1], W0)
            alpha = warm.alpha[0, f]  # the fold's ridge, from its training cells alone
            assert alpha == pytest.approx(
                0.1 * nmf_cv.noise_level(train) * (math.sqrt(50) + math.sqrt(35)), rel=1e-12)
            ref = nmf_cv.fit_nmf(train, k, init=init, max_iter=2000, tol=1e-6,
                                 random_state=seed, alpha_W=alpha, alpha_H=alpha,
                                 extrapolate=True)
            np.testing.assert_allclose(warm.factors[(k, 0, f)][0], ref.W, rtol=1e-12)
            np.testing.assert_allclose(warm.factors[(k, 0, f)][1], ref.H, rtol=1e-12)
            # the warm start is no worse than the previous rank's end point
            end = nmf_cv.fit_nmf(train, k - 1, init=(W0, H0), max_iter=0, alpha_W=alpha,
                                 alpha_H=alpha)
            assert ref.loss_history[1] <= end.loss_history[0] * (1 + 1e-12)


def test_cv_holds_no_factors_unless_asked_and_its_checkpoint_keeps_them(tmp_path,
                                                                       monkeypatch):
    """The caller drops each fit's W and H as it arrives unless return_factors=True (at 10^6
    cells they add up to gigabytes); the checkpoint records them, so a resumed call with
    return_factors=True has every fold's."""
    X = nmf_cv.make_planted(60, 40, 2, noise=0.05, random_state=3)
    kw = dict(n_folds=3, random_state=0, progress=False, max_iter=20,
              checkpoint=str(tmp_path / "ck"))
    held, kept = [], nmf_cv._CVCall.kept

    def recorded(self, out):
        held.append(kept(self, out))
        return held[-1]

    monkeypatch.setattr(nmf_cv._CVCall, "kept", recorded)
    cv = nmf_cv.cross_validate(X, [1, 2], **kw)
    assert len(held) >= 12 and all(out[2] is None and out[3] is None for out in held)
    again = nmf_cv.cross_validate(X, [1, 2], return_factors=True, **kw)
    assert_array_equal(again.press, cv.press)
    n_fits = np.count_nonzero(~np.isnan(cv.press))
    assert len(again.factors) == n_fits
    assert all(W.shape == (60, k) and H.shape == (k, 40)
               for (k, _, _), (W, H) in again.factors.items())


def test_cv_same_results_with_process_pool():
    from concurrent.futures import ProcessPoolExecutor

    X = nmf_cv.make_planted(40, 25, 3, noise=0.05, missing=0.1, random_state=24)
    kw = dict(n_folds=3, n_repeats=2, random_state=7, progress=False, max_iter=60,
              init="random")
    serial = nmf_cv.cross_validate(X, [2, 3, 4], **kw)
    with ProcessPoolExecutor(2) as pool:
        parallel = nmf_cv.cross_validate(X, [2, 3, 4], executor=pool, **kw)
    np.testing.assert_array_equal(serial.press, parallel.press)
    np.testing.assert_array_equal(serial.train_rss, parallel.train_rss)


def test_cv_recovers_planted_rank_in_90_percent_of_runs():
    """k_true in {2, 4, 6}, 4 seeds each, shapes 60 x 40 and 120 x 80 and noise 5% or 10%
    (of the mean) alternating with the seed; ranks k_true - 2 .. k_true + 3. Seen: 30/30
    with 10 seeds each."""
    from concurrent.futures import ProcessPoolExecutor

    hits, runs = 0, 0
    with ProcessPoolExecutor(2) as pool:
        for k_true in (2, 4, 6):
            for seed in range(4):
                shape = (60, 40) if seed % 2 else (120, 80)
                noise = 0.05 if seed % 4 < 2 else 0.1
                X = nmf_cv.make_planted(*shape, k_true, noise=noise, random_state=seed)
                ranks = range(max(1, k_true - 2), k_true + 4)
                cv = nmf_cv.cross_validate(X, ranks, random_state=seed, executor=pool,
                                           progress=False)
                hits += cv.best_rank == k_true
                runs += 1
    print(f"cross_validate recovered k_true in {hits}/{runs} runs")
    assert hits >= 0.9 * runs


def test_cv_kl_recovers_poisson_rank_in_80_percent_of_runs():
    """Poisson counts, 300 x 200, mean 5, k_true in {3, 5}, 6 seeds each; ranks
    1 .. k_true + 2, 3 folds, KL fits with max_iter=300, tol=1e-4. Seen: 11/12 (k_true = 5,
    seed 0 picks 4 pooled while its splits pick 5 or 6); held-out deviance at k_true + 1 is
    1-2% above the minimum, at k_true - 1 8-30%."""
    from concurrent.futures import ProcessPoolExecutor

    hits, runs = 0, 0
    with ProcessPoolExecutor(2) as pool:
        for k_true in (3, 5):
            for seed in range(6):
                X = poisson_planted(300, 200, k_true, seed)
                cv = nmf_cv.cross_validate(X, range(1, k_true + 3), n_folds=3, loss="kl",
                                           random_state=seed, executor=pool, progress=False,
                                           max_iter=300, tol=1e-4)
                hits += cv.best_rank == k_true
                runs += 1
    print(f"cross_validate(loss='kl') recovered k_true in {hits}/{runs} runs")
    assert hits >= 0.8 * runs, f"recovered k_true in only {hits}/{runs} runs"


def test_cv_on_pure_noise_does_not_pick_the_largest_rank():
    X = np.random.default_rng(25).random((80, 60))
    cv = nmf_cv.cross_validate(X, range(1, 8), random_state=0, progress=False, max_iter=200)
    assert cv.best_rank < 7 and cv.best_rank_1se <= cv.best_rank


def test_cv_on_bars_picks_16_with_no_fold_blowing_up():
    """The issue's failure: with no ridge, folds reached 10^4 x their rank's median PRESS and
    the mean picked 15 on one seed in three. Defaults, 5 seeds, ranks 13..19."""
    from concurrent.futures import ProcessPoolExecutor

    picks = []
    with ProcessPoolExecutor(2) as pool:
        for seed in range(5):
            cv = nmf_cv.cross_validate(bars(seed), range(13, 20), random_state=seed,
                                       executor=pool, progress=False)
            per_fold = np.nan_to_num(cv.press.reshape(len(cv.ranks), -1))  # NaN: not fitted
            assert (per_fold <= 3.0 * cv.press_median[:, None]).all(), (seed, per_fold)
            assert not cv.n_outlier_folds.any()
            picks.append(cv.best_rank)
    assert sum(k == 16 for k in picks) >= 4, picks


def test_rule_cv_picks_planted_rank_sparse_counts_and_float32():
    X = nmf_cv.make_planted(120, 80, 4, noise=0.1, random_state=4)
    kw = dict(random_state=0, progress=False)
    assert nmf_cv.cross_validate(X, range(2, 7), **kw).best_rank == 4
    assert nmf_cv.cross_validate(X.astype(np.float32), range(2, 7), **kw).best_rank == 4
    rng = np.random.default_rng(5)
    rate = rng.gamma(0.5, 1.0, (150, 3)) @ rng.gamma(0.5, 1.0, (3, 100))
    counts = sp.csr_matrix(rng.poisson(2.0 * rate / rate.mean()).astype(float))
    assert counts.nnz < 0.8 * 150 * 100
    cv = nmf_cv.cross_validate(counts, range(1, 6), loss="kl", **kw)
    assert cv.best_rank == 3


def test_cv_bad_arguments():
    X = np.ones((5, 4))
    with pytest.raises(ValueError, match="n_folds"):
        nmf_cv.cross_validate(X, [1], n_folds=1)
    with pytest.raises(ValueError, match="n_components must be in"):
        nmf_cv.cross_validate(X, [1, 5])
    with pytest.raises(ValueError, match="empty"):
        nmf_cv.cross_validate(X, [])
    with pytest.raises(ValueError, match="takes method='cd'"):
        nmf_cv.cross_validate(X, [1], loss="kl", method="hals")
    with pytest.raises(ValueError, match="loss"):
        nmf_cv.cross_validate(X, [1], loss="poisson")
    with pytest.raises(ValueError, match="n_repeats"):
        nmf_cv.cross_validate(X, [1], n_repeats=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        nmf_cv.cross_validate(X, [2, 1])


def test_auto_repeats_add_splits_only_where_ranks_are_close():
    """n_repeats="auto": every rank is fitted on two splits, the first being n_repeats=1's bit
    for bit and both being n_repeats=2's splits; later splits fit only the ranks still in
    contention (ranks far worse on every fold are out), and the result says how far the
    splits agree."""
    X = nmf_cv.make_planted(80, 50, 3, noise=0.05, random_state=4)
    one = nmf_cv.cross_validate(X, range(1, 6), n_repeats=1, random_state=0, progress=False)
    auto = nmf_cv.cross_validate(X, range(1, 6), random_state=0, progress=False)
    assert_array_equal(auto.press[:, 0], one.press[:, 0])
    assert not np.isnan(auto.press[:, :2]).any()
    assert np.isnan(auto.press[:2, 2:]).all()  # ranks 1 and 2: 4 and 9 times rank 3's PRESS
    assert auto.best_rank == 3 and set(auto.repeat_best_ranks) == {3}
    fixed = nmf_cv.cross_validate(X, range(1, 6), n_repeats=2, random_state=0, progress=False)
    assert_array_equal(auto.folds.row_class[:2], fixed.folds.row_class)  # the same splits
    assert_array_equal(auto.folds.col_class[:2], fixed.folds.col_class)
    noisy = nmf_cv.make_planted(60, 40, 3, noise=0.5, random_state=2)  # 1 and 2 close
    cv = nmf_cv.cross_validate(noisy, range(1, 7), random_state=1, progress=False)
    fitted = ~np.isnan(cv.press[:, :, 0])  # (ranks, splits)
    assert 1 < cv.press.shape[1] <= 5
    assert fitted[:, :2].all()
    assert (fitted[:, 2:] <= fitted[:, 1:-1]).all()  # once out, out for good
    assert fitted[:, -1].sum() >= 2  # the last split was run for the ranks still close
    assert len(cv.repeat_best_ranks) == cv.press.shape[1]
    assert cv.best_rank in cv.ranks[fitted[:, -1]]
    assert not np.isnan(cv.press_median).any()
    again = nmf_cv.cross_validate(noisy, range(1, 7), random_state=1, progress=False)
    assert_array_equal(again.press, cv.press)
    with pytest.raises(ValueError, match="n_repeats"):
        nmf_cv.cross_validate(X, [1, 2], n_repeats="many")


def test_restarts_keep_the_fit_with_the_lowest_training_objective(monkeypatch):
    X = nmf_cv.make_planted(30, 20, 3, noise=0.2, random_state=5)
    seen = record_fits(monkeypatch)
    cv = nmf_cv.cross_validate(X, [4], n_folds=2, n_repeats=1, n_restarts=3, random_state=0,
                               progress=False, max_iter=40, return_factors=True,
                               stuck_restarts=0)
    assert [kw.get("init", "nndsvda") for kw, _ in seen] == ["nndsvda", "random", "random"] * 2
    for f in range(2):
        runs = [res for _, res in seen[3 * f:3 * f + 3]]
        objectives = [res.loss_history[-1] for res in runs]
        assert len(set(objectives)) == 3  # three different fits
        kept = runs[int(np.argmin(objectives))]
        W, H = cv.factors[(4, 0, f)]
        assert_array_equal(W, kept.W)
        assert_array_equal(H, kept.H)


def test_restarts_same_result_with_process_pool():
    from concurrent.futures import ProcessPoolExecutor

    X = nmf_cv.make_planted(40, 25, 3, noise=0.05, missing=0.1, random_state=24)
    kw = dict(n_folds=3, n_restarts=2, random_state=7, progress=False, max_iter=60)
    serial = nmf_cv.cross_validate(X, [2, 3], **kw)
    with ProcessPoolExecutor(2) as pool:
        parallel = nmf_cv.cross_validate(X, [2, 3], executor=pool, **kw)
        bicv = [nmf_cv.bicross_validate(X, [2, 3], random_state=1, n_restarts=2,
                                        max_iter=60, progress=False, executor=e)
                for e in (None, pool)]
        rss = [nmf_cv.randomized_rss(X, [2, 3], random_state=1, n_restarts=2, max_iter=60,
                                     progress=False, executor=e) for e in (None, pool)]
    assert_array_equal(serial.press, parallel.press)
    assert_array_equal(serial.train_rss, parallel.train_rss)
    assert_array_equal(bicv[0].press, bicv[1].press)
    assert_array_equal(rss[0].rss, rss[1].rss)
    with pytest.raises(ValueError, match="n_restarts"):
        nmf_cv.cross_validate(X, [2], n_restarts=0)


def test_cv_refits_folds_stuck_in_a_local_minimum():
    """On swimmer-like data the nndsvda fits of some folds stop in a poor local minimum at
    the true rank (training error 5x the other folds', PRESS 4-5x their median)."""
    from concurrent.futures import ProcessPoolExecutor

    X = swimmer(0.05)
    assert np.linalg.matrix_rank(np.where(X > 0.5, 1.0, 0.0)) == 13
    kw = dict(n_repeats=1, random_state=0, progress=False)
    plain = nmf_cv.cross_validate(X, [16], stuck_restarts=0, **kw)
    assert plain.n_outlier_folds[0] >= 1 and not plain.n_refitted.any()
    refit = nmf_cv.cross_validate(X, [16], **kw)
    per_cell = plain.train_rss[0, 0] / plain.train_rss[0, 0].min()
    stuck = per_cell > 1.1  # 5-6x where stuck, 1.0-1.03 elsewhere
    assert stuck.any() and not stuck.all() and per_cell[stuck].min() > 4
    assert refit.n_refitted.tolist() == [int(stuck.sum())]
    assert (refit.train_rss[0, 0, stuck] < plain.train_rss[0, 0, stuck] / 2).all()
    assert_array_equal(refit.press[0, 0, ~stuck], plain.press[0, 0, ~stuck])
    assert (refit.press[0, 0] <= 3 * refit.press_median[0]).all()
    with ProcessPoolExecutor(2) as pool:
        pooled = nmf_cv.cross_validate(X, [16], executor=pool, **kw)
    assert_array_equal(pooled.press, refit.press)
    with pytest.raises(ValueError, match="stuck_restarts"):
        nmf_cv.cross_validate(X, [16], stuck_restarts=-1)


# restarts use the seed's children 0, 1, ...; a stuck fold's refits carry on
def test_refits_continue_the_restart_seeds(monkeypatch):
    X = nmf_cv.make_planted(30, 20, 3, noise=0.2, random_state=5)
    monkeypatch.setattr(nmf_cv, "_STUCK_TRAINING", 0.0)  # every fold counts as stuck
    seen = record_fits(monkeypatch)
    cv = nmf_cv.cross_validate(X, [4], n_folds=2, n_repeats=1, n_restarts=2,
                               stuck_restarts=2, random_state=0, progress=False, max_iter=40)
    assert cv.n_refitted.tolist() == [2]
    fit_seeds = np.random.SeedSequence(0).spawn(2)[1].spawn(2)
    keys = [kw["random_state"].spawn_key for kw, _ in seen]
    first = [fit_seeds[0].spawn_key, fit_seeds[0].spawn_key + (0,),
             fit_seeds[1].spawn_key, fit_seeds[1].spawn_key + (0,)]
    refits = [fit_seeds[f].spawn_key + (j,) for f in range(2) for j in (1, 2)]
    assert keys == first + refits  # no fit repeated, refits after the first pass's children


# a refit is kept only when its training objective is lower
def test_a_worse_refit_is_not_kept(monkeypatch):
    X = nmf_cv.make_planted(30, 20, 3, noise=0.2, random_state=5)
    kw = dict(n_folds=3, random_state=0, progress=False, max_iter=40)
    plain = nmf_cv.cross_validate(X, [3], stuck_restarts=0, **kw)
    real = nmf_cv._cv_refit_task

    def worse_refit(*args):
        p, t, W, H, _ = real(*args)
        return (np.inf, np.inf, W, H, np.inf)  # a refit that ended higher

    monkeypatch.setattr(nmf_cv, "_STUCK_TRAINING", 0.0)
    monkeypatch.setattr(nmf_cv, "_cv_refit_task", worse_refit)
    cv = nmf_cv.cross_validate(X, [3], **kw)
    assert cv.n_refitted.tolist() == [6]  # 2 splits x 3 folds
    assert_array_equal(cv.press, plain.press)
    assert_array_equal(cv.train_rss, plain.train_rss)


def test_folds_are_a_rule_identical_for_dense_and_sparse_storage():
    X = sparse_counts(70, 45, 3, 0)
    kw = dict(n_folds=4, n_repeats=2, random_state=3, progress=False, max_iter=5)
    dense = nmf_cv.cross_validate(X, [2], **kw)
    for S in (sp.csr_matrix(X), sp.csc_matrix(X), sp.coo_matrix(X)):
        assert_array_equal(np.asarray(nmf_cv.cross_validate(S, [2], **kw).folds),
                           np.asarray(dense.folds))
    folds = dense.folds
    # small: two class vectors per repeat, no per-cell array
    assert folds.row_class.shape == (2, 70) and folds.col_class.shape == (2, 45)
    assert folds.observed is None and folds.cell_fold is None and folds.n_kept == 0
    for r, grid in enumerate(folds):
        # every cell in exactly one fold; each fold leaves every row and column cells
        assert grid.min() == 0 and grid.max() == 3
        for f in range(4):
            assert (grid != f).any(axis=1).all() and (grid != f).any(axis=0).all()
            # each row holds out one class of columns: its share is 1/4 within rounding
            assert np.abs((grid == f).sum(axis=1) - 45 / 4).max() <= 1
        rows, cols = np.nonzero(np.ones(X.shape, dtype=bool))
        assert_array_equal(folds.fold_of(rows, cols, r), grid.ravel())
    assert not np.array_equal(folds[0], folds[1])


def test_folds_with_missing_cells_and_leave_one_out():
    """With missing cells the rule still decides, missing cells are -2 and kept cells -1;
    leave-one-out lists a fold per observed cell. Arrays are refused for huge shapes."""
    X = nmf_cv.make_planted(12, 9, 2, noise=0.05, missing=0.3, random_state=2)
    observed = ~np.isnan(X)
    cv = nmf_cv.cross_validate(X, [1], n_folds=3, random_state=1, progress=False, max_iter=5)
    grid = cv.folds[0]
    rule = (cv.folds.row_class[0][:, None] + cv.folds.col_class[0][None, :]) % 3
    assert np.array_equal(grid == -2, ~observed)
    held = grid >= 0
    assert_array_equal(grid[held], rule[held])
    assert cv.n_kept == int((grid == -1).sum())
    rows, cols = np.nonzero(np.ones(X.shape, dtype=bool))
    assert_array_equal(cv.folds.fold_of(rows, cols), grid.ravel())
    Y = nmf_cv.make_planted(6, 5, 1, missing=0.2, random_state=3)
    loo = nmf_cv.cross_validate(Y, [1], n_folds="loo", random_state=0, progress=False,
                                max_iter=5)
    g = loo.folds[0]
    assert np.array_equal(g == -2, np.isnan(Y))
    ids = g[g >= 0]
    assert len(np.unique(ids)) == len(ids)  # one cell a fold
    big = nmf_cv.Folds(2, (100_000, 2000), np.zeros((1, 100_000), int), np.zeros((1, 2000), int),
                       [(np.zeros(0, int), np.zeros(0, int))])
    with pytest.raises(ValueError, match="fold_of"):
        big[0]
    assert big.fold_of([99_999], [1999]).tolist() == [0]


def test_sparse_cv_equals_dense_cv():
    """Same folds, same fits up to rounding: PRESS and training error agree to 1e-8, for
    squared error (HALS) and Poisson deviance (KL); 1e-6 for extrapolated HALS (the
    default), whose undo decisions compare objectives and so carry rounding further."""
    X = sparse_counts(60, 40, 3, 1)
    for loss, extra, rtol in (("frobenius", {"extrapolate": False}, 1e-8),
                              ("frobenius", {}, 1e-6), ("kl", {}, 1e-8)):
        kw = dict(n_folds=3, random_state=0, progress=False, loss=loss, max_iter=60, tol=0,
                  **extra)
        dense = nmf_cv.cross_validate(X, [1, 2, 4], **kw)
        sparse = nmf_cv.cross_validate(sp.csr_matrix(X), [1, 2, 4], **kw)
        assert_allclose(sparse.press, dense.press, rtol=rtol)
        assert_allclose(sparse.train_rss, dense.train_rss, rtol=rtol)
        assert_allclose(sparse.alpha, dense.alpha, rtol=1e-8)


def test_held_out_entries_equal_one_numpy_mask():
    """`_held_entries`: the same CSR as one numpy mask over every entry (empty rows, float32
    and float64 values)."""
    X = sparse_counts(40, 30, 3, 5)
    X[3] = 0.0
    X[-1] = 0.0
    rng = np.random.default_rng(0)
    P, b = rng.integers(0, 4, 40), rng.integers(0, 4, 30)
    for dtype in (np.float64, np.float32):
        S = sp.csr_matrix(X.astype(dtype))
        rows = np.repeat(np.arange(40), np.diff(S.indptr))
        held = b[S.indices] == P[rows]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[held], minlength=40))])
        got = nmf_cv._held_entries(S, P, b)
        assert_array_equal(got.indptr, indptr)
        assert_array_equal(got.indices, S.indices[held])
        assert_array_equal(got.data, S.data[held])
        assert got.data.dtype == S.data.dtype and got.shape == S.shape


def test_training_maxima_equal_numpy():
    """Each row's and column's largest training value (implicit zeros counting): numpy's
    over the training cells of a dense copy, for sparse X and for dense X; lines with no
    stored entry, and lines stored in full (no implicit zero), included."""
    X = sparse_counts(50, 30, 3, 4)
    X[7] = 0.0
    X[:, 2] = 0.0
    X[9] += 0.5
    X[:, 5] += 0.25
    for S in (X, sp.csr_matrix(X)):
        train, held = _rule_training(S, n_folds=3)
        rmax, cmax = train.training_maxima()
        assert_array_equal(rmax, np.where(held, -np.inf, X).max(axis=1))
        assert_array_equal(cmax, np.where(held, -np.inf, X).max(axis=0))


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_kl_cv_reads_one_transposed_copy_per_call(storage, monkeypatch):
    """KL coordinate descent reads X's columns from X's transpose: made once per call and
    read by every fit (a process pool's workers map it from shared memory), with the PRESS
    of a copy made per fit, bit for bit."""
    from concurrent.futures import ProcessPoolExecutor

    X = sparse_counts(60, 40, 3, 1)
    S = X if storage == "dense" else sp.csr_matrix(X)
    kw = dict(n_folds=3, random_state=0, progress=False, loss="kl", max_iter=20)
    seen, training = [], nmf_cv._RuleSource.training

    def recorded(self, split, f):
        seen.append(self.Xt)
        return training(self, split, f)

    monkeypatch.setattr(nmf_cv._RuleSource, "training", recorded)
    shared = nmf_cv.cross_validate(S, [2, 3], **kw)
    assert len(seen) >= 6 and all(t is seen[0] for t in seen)
    assert_array_equal(seen[0] if storage == "dense" else seen[0].toarray(), X.T)
    monkeypatch.setattr(nmf_cv, "_carried_source", lambda source, fits: source)
    per_fit = nmf_cv.cross_validate(S, [2, 3], **kw)
    assert_array_equal(shared.press, per_fit.press)
    monkeypatch.undo()
    if storage == "sparse":
        with ProcessPoolExecutor(2) as pool:
            pooled = nmf_cv.cross_validate(S, [2, 3], executor=pool, **kw)
        assert_array_equal(pooled.press, shared.press)


@pytest.mark.parametrize("loss", ["frobenius", "kl"])
@pytest.mark.parametrize("pattern", ["random", "blocks"])
def test_rule_cv_with_missing_cells_matches_the_cell_lists(pattern, loss, monkeypatch):
    """Data with missing cells go through the fold rule (no m x n copy per fit): the same
    folds, kept cells, training sizes and ridges as the cell-list path, and the same PRESS
    and training error (squared error, or Poisson deviance from KL coordinate descent) once
    the fits have converged. KL multiplicative updates keep the cell lists."""
    X = _missing_patterns()[pattern]
    data = nmf_cv._validate_data(X)
    assert isinstance(nmf_cv._cv_source(data, False, loss), nmf_cv._MissingRuleSource)
    assert isinstance(nmf_cv._cv_source(data, False, "kl", "mu"), nmf_cv._CellSource)
    kw = dict(n_folds=4, n_repeats=2, random_state=0, progress=False, tol=1e-11, max_iter=4000,
              loss=loss)
    rule = nmf_cv.cross_validate(X, [2, 3, 4], **kw)
    monkeypatch.setattr(nmf_cv, "_cv_source", _cell_source)
    cells = nmf_cv.cross_validate(X, [2, 3, 4], **kw)
    assert rule.n_kept == cells.n_kept > 0
    for r in range(2):
        assert_array_equal(rule.folds[r], cells.folds[r])
    assert_allclose(rule.alpha, cells.alpha, rtol=1e-10)
    assert_allclose(rule.press, cells.press, rtol=1e-5)
    assert_allclose(rule.train_rss, cells.train_rss, rtol=1e-5)
    assert rule.best_rank == cells.best_rank
    if loss == "frobenius":  # (Poisson deviance scores Gaussian noise: KL picks 2 here)
        assert rule.best_rank == 3


def test_fold_training_sets_are_freed_without_the_garbage_collector(monkeypatch):
    # Each holds 1/n_folds of X; a reference cycle kept every fold's alive in pool workers
    # until a full collection (measured: +16 MB per task at 20000 x 500).
    import gc
    import weakref

    made, training = [], nmf_cv._RuleSource.training

    def recorded(self, split, f):
        t = training(self, split, f)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(nmf_cv._RuleSource, "training", recorded)
    X = nmf_cv.make_planted(60, 40, 2, noise=0.1, random_state=0)
    gc.disable()
    try:
        nmf_cv.cross_validate(X, [1, 2], n_folds=3, random_state=0, progress=False, max_iter=20)
        alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert len(made) >= 9 and alive == 0


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6, 0.9])
def test_missing_rule_split_keeps_the_reference_cells(density):
    """The rule source's split finds its kept cells from the rows' cell sets (observed or
    missing ones listed, read by position): the same cells as the numpy reference on the
    observed cells in row-major order, from the same generator."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        mask = rng.random((40, 25)) < density
        mask[np.arange(40), 2 + np.arange(40) % 23] = True  # no empty row or column
        mask[0, :] = False
        mask[0, 3] = True
        mask[:, 1] = False
        mask[5:8, 1] = True
        mask[9, :] = True
        X = np.where(mask, rng.random(mask.shape), np.nan)
        source = nmf_cv._MissingRuleSource.of(nmf_cv._validate_data(X))
        split = source.split(4, np.random.default_rng(seed + 10))
        ref_rng = np.random.default_rng(seed + 10)
        rule = nmf_cv._fold_rule(mask.shape, 4, ref_rng)
        row_class, col_class = rule.row_class, rule.col_class
        rows, cols = np.nonzero(mask)
        fold = (row_class[rows] + col_class[cols]) % 4
        kept = ref_keep_coverage(fold, rows, cols, mask.shape, 4, ref_rng) < 0
        assert_array_equal(split.row_class, row_class)
        assert_array_equal(split.col_class, col_class)
        assert_array_equal(split.kept_rows, rows[kept])
        assert_array_equal(split.kept_cols, cols[kept])
        assert kept.any()


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_keep_coverage_equals_the_numpy_reference(density):
    """Same kept cells as the sorting version, on masks whose lines have one cell, all
    their cells in one fold, or many cells."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        mask = rng.random((40, 25)) < density
        mask[0, :] = False
        mask[0, 3] = True
        mask[:, 1] = False
        mask[5:8, 1] = True
        rows, cols = np.nonzero(mask)
        rule = nmf_cv._fold_rule(mask.shape, 4, rng)
        fold = (rule.row_class[rows] + rule.col_class[cols]) % 4
        ours = nmf_cv._keep_coverage(fold, rows, cols, mask.shape, 4,
                                     np.random.default_rng(seed + 10))
        ref = ref_keep_coverage(fold, rows, cols, mask.shape, 4,
                                np.random.default_rng(seed + 10))
        assert_array_equal(ours, ref)
        assert (ours < 0).any()


def test_ridge_keeps_a_barely_determined_held_out_prediction_bounded():
    X, mask, H = _barely_touching_problem()
    m, n = X.shape
    alpha = 0.1 * nmf_cv.noise_level(X, mask=mask) * (math.sqrt(m) + math.sqrt(n))

    def row0_prediction(alpha_W):
        est = nmf_cv.NMF(2, alpha_W=alpha_W)
        est.components_ = H
        return (est.transform(X, mask=mask) @ H)[0]

    # Without a ridge, row 0's weight on component 0 follows the noise in 10..19 through
    # weights of 1e-3: the held-out cells (values about 1) are predicted at about 190.
    assert row0_prediction(0.0)[:10].max() > 50 * X.max()
    ridged = row0_prediction(alpha)
    assert ridged[:10].max() <= X.max()
    assert_allclose(ridged[10:], X[0, 10:], atol=0.1)  # its training cells still fitted


def test_cv_ridge_is_scaled_to_the_noise_and_can_be_turned_off():
    X = nmf_cv.make_planted(60, 40, 3, noise=0.1, random_state=0)
    kw = dict(n_folds=3, random_state=0, progress=False, max_iter=50, init="random")
    cv = nmf_cv.cross_validate(X, [3], **kw)
    assert cv.alpha.shape == (2, 3)  # two splits ("auto")
    for r, f in itertools.product(range(2), range(3)):  # each fold's ridge from its own cells
        train = np.where(cv.folds[r] == f, np.nan, X)
        expected = 0.1 * nmf_cv.noise_level(train) * (math.sqrt(60) + math.sqrt(40))
        assert cv.alpha[r, f] == pytest.approx(expected, rel=1e-12)
    assert (cv.alpha > 0).all()
    scaled = nmf_cv.cross_validate(10 * X, [3], **kw)  # unit-free: PRESS scales as X^2
    assert_allclose(scaled.alpha, 10 * cv.alpha, rtol=1e-9)
    assert_allclose(scaled.press, 100 * cv.press, rtol=1e-6)
    assert (nmf_cv.cross_validate(X, [3], ridge=0, **kw).alpha == 0.0).all()
    given = nmf_cv.cross_validate(X, [3], alpha_W=0.5, alpha_H=0.5, **kw)
    assert (given.alpha == 0.5).all()
    assert (nmf_cv.cross_validate(X, [3], loss="kl", method="mu", **kw).alpha == 0.0).all()
    kl = nmf_cv.cross_validate(X, [3], loss="kl", **kw)  # Gamma priors' rate (1 + ridge) / sqrt
    for r, f in itertools.product(range(2), range(3)):
        train = X[cv.folds[r] != f]
        assert kl.alpha[r, f] == pytest.approx(1.1 / math.sqrt(train.mean()), rel=1e-12)
    for bad in (-1.0, math.nan, "0.1", True):
        with pytest.raises(ValueError, match="ridge"):
            nmf_cv.cross_validate(X, [3], ridge=bad, **kw)


def test_kl_cv_priors_keep_every_held_out_prediction_positive():
    """Why CV's KL fits carry Gamma priors: unpenalised coordinate descent reaches exact zeros,
    so some held-out cells are predicted to be exactly 0, and a count there costs the whole
    deviance scale (here it moved the pick from the planted 3 to 2)."""
    rng = np.random.default_rng(5)
    rate = rng.gamma(0.5, 1.0, (150, 3)) @ rng.gamma(0.5, 1.0, (3, 100))
    counts = sp.csr_matrix(rng.poisson(2.0 * rate / rate.mean()).astype(float))
    kw = dict(loss="kl", random_state=0, progress=False, return_factors=True)
    bare = nmf_cv.cross_validate(counts, [3, 4], ridge=0, **kw)
    assert min((W @ H).min() for W, H in bare.factors.values()) == 0.0
    cv = nmf_cv.cross_validate(counts, range(1, 7), **kw)
    assert min((W @ H).min() for W, H in cv.factors.values()) > 0.0
    assert cv.best_rank == 3


def test_cv_fits_counts_with_gamma_priors_and_their_own_tolerance(monkeypatch):
    X = poisson_planted(40, 30, 2, seed=9)
    seen = record_fits(monkeypatch)
    cv = nmf_cv.cross_validate(X, [2], n_folds=3, loss="kl", random_state=0, progress=False,
                               stuck_restarts=0)
    assert [kw["tol"] for kw, _ in seen] == [1e-5] * 6 and cv.loss == "kl"  # 2 splits
    assert [kw["gamma_prior"] for kw, _ in seen] == [(1.1, a) for a in cv.alpha.ravel()]
    seen.clear()
    nmf_cv.cross_validate(X, [2], n_folds=3, loss="kl", method="mu", random_state=0,
                          progress=False, stuck_restarts=0)
    assert [kw["tol"] for kw, _ in seen] == [1e-6] * 6
    assert all(kw["gamma_prior"] is None for kw, _ in seen)  # no prior given
    seen.clear()
    nmf_cv.cross_validate(X, [2], n_folds=3, loss="kl", random_state=0, progress=False,
                          stuck_restarts=0, tol=1e-7, ridge=0)
    assert [kw["tol"] for kw, _ in seen] == [1e-7] * 6
    assert all(kw["gamma_prior"] is None for kw, _ in seen)  # no prior given


def test_rank_selection_fits_are_extrapolated_where_the_solver_allows_it(monkeypatch):
    X = nmf_cv.make_planted(30, 20, 2, noise=0.1, random_state=0)
    counts = poisson_planted(30, 20, 2, seed=1)
    seen = record_fits(monkeypatch)
    calls = [(nmf_cv.stability, X, {}, True), (nmf_cv.stability, counts, {"loss": "kl"}, True),
             (nmf_cv.stability, counts, {"loss": "kl", "method": "mu"}, False),
             (nmf_cv.randomized_rss, X, {}, True),
             (nmf_cv.randomized_rss, X, {"method": "mu"}, False),
             (nmf_cv.bicross_validate, X, {}, True),
             (nmf_cv.stability, X, {"extrapolate": False}, False)]  # the caller's word wins
    for function, data, kw, expected in calls:
        seen.clear()
        n_runs = {"n_runs": 2} if function is nmf_cv.stability else {}
        function(data, [2], random_state=0, progress=False, max_iter=30, **n_runs, **kw)
        assert seen and all(options["extrapolate"] is expected for options, _ in seen)
        assert all(options["tol"] == 1e-6 for options, _ in seen)


# restart seeds are a function of the seed, not of how often it was spawned from
def test_best_fit_seeds_do_not_depend_on_the_seed_objects_history(monkeypatch):
    data = nmf_cv._validate_data(nmf_cv.make_planted(20, 15, 2, noise=0.1, random_state=0))
    seen = record_fits(monkeypatch)
    seed = np.random.SeedSequence(3)
    for _ in range(2):  # a serial run reuses the caller's object; a pool gets fresh copies
        nmf_cv._best_fit(data, 2, seed, 3, {"max_iter": 5})
        nmf_cv._best_fit(data, 2, seed, 2, {"max_iter": 5}, first_child=2)
    keys = [kw["random_state"].spawn_key for kw, _ in seen]
    assert keys == [(), (0,), (1,), (2,), (3,)] * 2
    kids = np.random.SeedSequence(3).spawn(4)
    for j in range(4):
        assert_array_equal(nmf_cv._child_seed(np.random.SeedSequence(3), j).generate_state(4),
                           kids[j].generate_state(4))


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_noise_level_matches_the_planted_noise(missing):
    rng = np.random.default_rng(1)
    signal = rng.random((400, 5)) @ rng.random((5, 150))
    X = np.abs(signal + 0.2 * rng.standard_normal(signal.shape))
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    assert nmf_cv.noise_level(X) == pytest.approx(0.2, rel=0.1)
    assert nmf_cv.noise_level(np.abs(X.T)) == pytest.approx(0.2, rel=0.15)


# the observed-fraction correction of noise_level
def test_noise_level_with_half_the_cells_missing():
    rng = np.random.default_rng(2)
    X = 5.0 + 0.2 * rng.standard_normal((400, 150))  # rank 1: the fill carries it exactly
    X[rng.random(X.shape) < 0.5] = np.nan
    assert nmf_cv.noise_level(X) == pytest.approx(0.2, rel=0.05)


def test_marchenko_pastur_median_against_sampled_eigenvalues():
    rng = np.random.default_rng(0)
    for m, n in ((2000, 2000), (4000, 400)):
        Z = rng.standard_normal((m, n))
        eig = np.linalg.eigvalsh(Z.T @ Z / m)
        assert nmf_cv._marchenko_pastur_median(n / m) == pytest.approx(np.median(eig),
                                                                       rel=0.01)


@pytest.mark.parametrize("pattern", ["random", "blocks"])
def test_missing_rule_training_sums_equal_numpy_over_training_cells(pattern):
    """Objective, scores, means, the init's fill, the noise level and the training-cell
    count of a training set read through the rule, against numpy over the cell-list path's
    training cells (observed, not held out) of a dense copy."""
    X = _missing_patterns()[pattern]
    data, source, split, train, in_train, held = _missing_training(X)
    tr = np.zeros(X.shape, bool)
    tr[data.rows[in_train], data.cols[in_train]] = True
    ho = np.zeros(X.shape, bool)
    ho[data.rows[held], data.cols[held]] = True
    assert train.n_train == tr.sum() == source.n_train(split, 1)
    X0 = np.nan_to_num(X)
    rng = np.random.default_rng(1)
    W, H = rng.random((60, 3)), rng.random((3, 40))
    WH = W @ H
    pen = nmf_cv._Penalty(0.0, 0.3, 0.0, 0.2)
    for method in ("hals", "mu", "gdcls"):
        solver = nmf_cv._MaskedSolver(train, W.copy(), H.copy(), method, pen, True)
        direct = (0.5 * np.sum((X0 - WH)[tr] ** 2) + 0.15 * (W ** 2).sum()
                  + 0.1 * (H ** 2).sum())
        assert solver.objective == pytest.approx(direct, rel=1e-10)
    press, train_err = train.scores(W, H, "frobenius")
    assert press == pytest.approx(np.sum((X0 - WH)[ho] ** 2), rel=1e-12)
    assert train_err == pytest.approx(np.sum((X0 - WH)[tr] ** 2), rel=1e-10)
    assert train.observed_mean() == pytest.approx(X0[tr].mean(), rel=1e-12)
    assert train.sq_norm() == pytest.approx(np.sum(X0[tr] ** 2), rel=1e-12)
    masked = nmf_cv._validate_data(np.where(tr, X0, np.nan))
    op = train.filled()
    assert_allclose(op @ np.eye(40), masked.filled(), atol=1e-12)
    assert_allclose((op.T @ np.eye(60)).T, masked.filled(), atol=1e-12)
    assert train.noise() == pytest.approx(nmf_cv._noise_level(masked), rel=1e-10)


@pytest.mark.parametrize("pattern", ["random", "blocks"])
def test_missing_rule_kl_scores_and_fits_match_numpy_and_the_masked_fit(pattern):
    """KL through the rule on data with missing cells: held-out and training Poisson
    deviance against numpy over the cell-list path's cells; from the same init, coordinate
    descent (Gamma priors) takes the masked fit's steps (rounding: the cells come in
    another order); values under missing or held-out cells cannot change the fit."""
    X = _missing_patterns()[pattern]
    data, source, split, train, in_train, held = _missing_training(X, f=2)
    tr = np.zeros(X.shape, bool)
    tr[data.rows[in_train], data.cols[in_train]] = True
    ho = np.zeros(X.shape, bool)
    ho[data.rows[held], data.cols[held]] = True
    rng = np.random.default_rng(0)
    W, H = rng.random((60, 3)), rng.random((3, 40))
    X0, WH = np.nan_to_num(X), W @ H

    def deviance(cells):
        x, mu = X0[cells], WH[cells]
        return 2 * np.sum(np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / mu), 0) - x + mu)

    press, train_dev = train.scores(W, H, "kl")
    assert press == pytest.approx(deviance(ho), rel=1e-12)
    assert train_dev == pytest.approx(deviance(tr), rel=1e-10)
    init = (rng.random((60, 4)), rng.random((4, 40)))
    kw = dict(init=init, loss="kl", gamma_prior=(1.1, 0.2), max_iter=30, tol=0)
    a = fit_training(train, 4, **kw)
    b = nmf_cv.fit_nmf(np.where(tr, X, np.nan), 4, **kw)
    assert_allclose(a.loss_history, b.loss_history, rtol=1e-10)
    assert_allclose(a.W @ a.H, b.W @ b.H, rtol=1e-8)
    Y = np.where(tr, X, 1e3 * rng.random(X.shape))
    other = nmf_cv._MissingFoldTraining(
        nmf_cv._MissingRuleSource(np.where(np.isnan(X), 0.0, Y), *list(vars(source).values())[1:]),
        split, 2)
    assert_allclose(fit_training(other, 4, **kw).W, a.W, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["mu", "hals", "gdcls"])
def test_missing_rule_fits_match_the_masked_fit(method):
    """From the same init, a fit through the rule and fit_nmf with the training cells as its
    mask: MU takes the same steps; HALS and GDCLS reach the same objective; neither goes
    up; values under the mask (missing or held out) cannot change the fit."""
    X = _missing_patterns()["random"]
    data, source, split, train, in_train, held = _missing_training(X, f=2)
    tr = np.zeros(X.shape, bool)
    tr[data.rows[in_train], data.cols[in_train]] = True
    rng = np.random.default_rng(0)
    init = (rng.random((60, 4)), rng.random((4, 40)))
    kw = dict(init=init, method=method, alpha_W=0.1, alpha_H=0.1)
    a = fit_training(train, 4, max_iter=30, tol=0, **kw)
    b = nmf_cv.fit_nmf(np.where(tr, X, np.nan), 4, max_iter=30, tol=0, **kw)
    assert np.all(np.diff(a.loss_history) <= 1e-12 * a.loss_history[0])
    if method == "mu":
        assert_allclose(a.loss_history, b.loss_history, rtol=1e-10)
        assert_allclose(a.W @ a.H, b.W @ b.H, rtol=1e-8)
    else:
        a = fit_training(train, 4, max_iter=3000, tol=1e-12, **kw)
        b = nmf_cv.fit_nmf(np.where(tr, X, np.nan), 4, max_iter=3000, tol=1e-12, **kw)
        assert a.loss_history[-1] == pytest.approx(b.loss_history[-1], rel=1e-6)
    # other values in the missing and held-out cells: the same source arrays but for them
    Y = np.where(tr, X, 1e3 * rng.random(X.shape))
    other = nmf_cv._MissingFoldTraining(
        nmf_cv._MissingRuleSource(np.where(np.isnan(X), 0.0, Y), *list(vars(source).values())[1:]),
        split, 2)
    c = fit_training(other, 4, max_iter=30, tol=0, **kw)
    d = fit_training(train, 4, max_iter=30, tol=0, **kw)
    assert_allclose(c.W, d.W, rtol=1e-9, atol=1e-12)


def test_missing_rule_training_allocates_no_matrix_sized_array():
    """A fold's training set and a fit on it hold the held-out values and index lists, not
    an m x n copy (the cell-list path made a dense copy and a mask per fit)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    X = nmf_cv.make_planted(2000, 300, 4, noise=0.1, random_state=0)
    X[rng.random(X.shape) < 0.2] = np.nan
    data = nmf_cv._validate_data(X)
    source = nmf_cv._MissingRuleSource.of(data)
    split = source.split(5, np.random.default_rng(0))

    def fold_fit():
        train = source.training(split, 0)
        res = fit_training(train, 4, max_iter=5)
        return train.scores(res.W, res.H, "frobenius")

    fold_fit()  # numba compiles first (which allocates)
    tracemalloc.start()
    fold_fit()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.8 * X.nbytes, (peak, X.nbytes)  # measured 0.55


# =============================================================================================
# Running tasks: executors, shared data, checkpoints, worker faults
# =============================================================================================

CKPT_SCRIPT = f"""
import sys, numpy as np, nmf_cv
what, path = sys.argv[1], sys.argv[2]
shape = {CKPT_SHAPES!r}.get(what, {CKPT_SHAPES["cv"]!r})
X = nmf_cv.make_planted(*shape, 4, noise=0.1, random_state=3)
if what == "cv":
    nmf_cv.cross_validate(X, range(1, 8), random_state=0, checkpoint=path, progress=False)
elif what == "cv_pool":
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2) as pool:
        nmf_cv.cross_validate(X, range(1, 8), random_state=0, checkpoint=path, executor=pool,
                              progress=False)
else:
    nmf_cv.consensus(X, [2, 3], n_runs=12, random_state=0, checkpoint=path, progress=False)
print("finished")
"""


def start_then_stop(tmp_path, what, path, n_records, sig):
    """Run CKPT_SCRIPT in a subprocess, send ``sig`` once ``n_records`` tasks are recorded;
    returns (records at that point, the process's stderr)."""
    import time

    script = tmp_path / "run.py"
    script.write_text(CKPT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), what, str(path)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(nmf_cv.__file__), preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while len(records(path)) < n_records and proc.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be stopped: make it longer"
    proc.send_signal(sig)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert "finished" not in out
    return len(records(path)), err, time.monotonic() - start, proc.returncode


def _die(*args):
    os._exit(1)  # a worker killed on every task


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("what", ["cv", "consensus"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, what, capsys):
    import signal

    path = tmp_path / "ck"
    kept, _, _, _ = start_then_stop(tmp_path, what, path, 6, signal.SIGKILL)
    if what == "cv":
        ref = ckpt_reference()
        cv = nmf_cv.cross_validate(ckpt_data(), range(1, 8), random_state=0, checkpoint=path,
                                   progress=True)
        assert_array_equal(cv.press, ref.press)
        assert_array_equal(cv.train_rss, ref.train_rss)
        assert cv.best_rank == ref.best_rank
    else:
        ref = nmf_cv.consensus(ckpt_data("consensus"), [2, 3], n_runs=12, random_state=0,
                               progress=False)
        co = nmf_cv.consensus(ckpt_data("consensus"), [2, 3], n_runs=12, random_state=0,
                              checkpoint=path, progress=True)
        assert_array_equal(co.cophenetic, ref.cophenetic)
        for k in (2, 3):
            assert_array_equal(co.consensus_matrices[k], ref.consensus_matrices[k])
    err = capsys.readouterr().err
    resumed = [int(n) for n in re.findall(r"\((\d+) resumed\)", err)]
    assert resumed and sum(resumed) >= kept - 1  # the killed write may be the one missing


def test_changed_data_or_arguments_are_refused_naming_the_difference(tmp_path):
    X = nmf_cv.make_planted(30, 20, 2, noise=0.1, missing=0.1, random_state=0)
    kw = dict(n_folds=3, random_state=0, progress=False, max_iter=20)
    nmf_cv.cross_validate(X, [1, 2], checkpoint=tmp_path, **kw)
    nmf_cv.cross_validate(X, [1, 2], checkpoint=tmp_path, **kw)  # the same call resumes
    one_value = X.copy()
    one_value[~np.isnan(X)] *= 1.0
    one_value[0, np.flatnonzero(~np.isnan(X[0]))[0]] += 1e-9
    pattern = X.copy()
    pattern[np.isnan(X)] = 0.5
    pattern[1, np.flatnonzero(~np.isnan(X[1]))[0]] = np.nan
    cases = [(one_value, [1, 2], {}, r"data values differ"),
             (pattern, [1, 2], {}, r"missing cells"),
             (X, [1, 3], {}, r"ranks differ"),
             (X, [1, 2], {"n_folds": 4}, r"n_folds differ"),
             (X, [1, 2], {"random_state": 1}, r"random_state differ"),
             (X, [1, 2], {"max_iter": 30}, r"fit_options differ")]
    for data, ranks, change, message in cases:
        with pytest.raises(ValueError, match=message):
            nmf_cv.cross_validate(data, ranks, checkpoint=tmp_path, **{**kw, **change})


def test_damaged_records_are_redone_and_the_result_stays_exact(tmp_path, monkeypatch):
    X = nmf_cv.make_planted(40, 30, 3, noise=0.1, random_state=1)
    kw = dict(n_folds=3, random_state=0, progress=False, stuck_restarts=0, ridge=0.0,
              n_repeats=1)
    ref = nmf_cv.cross_validate(X, [2, 3], checkpoint=tmp_path, **kw)
    files = [p for p in records(tmp_path)]
    assert len(files) == 6
    with open(files[0], "r+b") as fh:  # a copy cut short
        size = os.path.getsize(files[0])
        fh.truncate(size // 2)
    with open(files[1], "r+b") as fh:  # one flipped byte inside the payload
        data = bytearray(fh.read())
        data[len(data) // 2] ^= 0x01
        fh.seek(0)
        fh.write(data)
    seen = record_fits(monkeypatch)
    again = nmf_cv.cross_validate(X, [2, 3], checkpoint=tmp_path, **kw)
    assert len(seen) == 2  # only the damaged tasks ran again
    assert_array_equal(again.press, ref.press)
    assert_array_equal(again.train_rss, ref.train_rss)


def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    """A record whose array holds a pickle that would create a file when unpickled is
    treated as damaged: nothing runs, the task is redone."""
    X = nmf_cv.make_planted(30, 20, 2, noise=0.1, random_state=2)
    kw = dict(n_folds=2, random_state=0, progress=False, stuck_restarts=0, ridge=0.0)
    ref = nmf_cv.cross_validate(X, [2], checkpoint=tmp_path, **kw)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    victim = records(tmp_path)[0]
    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    meta = np.frombuffer(json.dumps({"key": ["cross_validate", 0], "structure": {"a": 0},
                                     "n_arrays": 1, "sha256": "x"}).encode(), np.uint8)
    with open(victim, "wb") as fh:
        np.savez(fh, meta=meta, a0=evil, allow_pickle=True)
    assert b"pwned" in Path(victim).read_bytes()  # the payload is in the file
    again = nmf_cv.cross_validate(X, [2], checkpoint=tmp_path, **kw)
    assert not marker.exists()
    assert_array_equal(again.press, ref.press)


def test_ctrl_c_stops_a_pooled_run_promptly_and_it_resumes_exactly(tmp_path):
    import signal

    path = tmp_path / "ck"
    kept, err, seconds, code = start_then_stop(tmp_path, "cv_pool", path, 6, signal.SIGINT)
    assert code != 0 and "resume" in err and str(path) in err, err
    assert seconds < 15
    ref = ckpt_reference()
    cv = nmf_cv.cross_validate(ckpt_data(), range(1, 8), random_state=0, checkpoint=path,
                               progress=False)
    assert_allclose(cv.press, ref.press, rtol=1e-9)  # pooled fits: one BLAS thread


class _Payload:
    """A task's result that can be watched (weakref) once the runner has handed it over."""

    def __init__(self, i):
        self.i = i


def _payload_task(i):
    return _Payload(i)


def test_task_runner_lets_each_result_go_once_handed_over():
    """`_run_tasks` holds no finished task's result (through its future) after yielding it:
    the caller decides what to keep (cross-validation drops each fit's factors, 6 MB a fit
    at 200,000 cells, which the finished futures used to keep to the end of the stage)."""
    import gc
    import weakref
    from concurrent.futures import ProcessPoolExecutor

    refs = []
    gc.disable()
    try:
        with ProcessPoolExecutor(2) as pool:
            for i, out in nmf_cv._run_tasks(_payload_task, [(j,) for j in range(8)],
                                            list(range(8)), pool):
                assert out.i == i
                refs.append(weakref.ref(out))
                del out
                assert all(ref() is None for ref in refs[:-1])
    finally:
        gc.enable()
    assert len(refs) == 8


@contextlib.contextmanager
def _blocks_unlinked_after():
    """Records the shared-memory blocks this process creates in the block; after it, checks
    that some were made and that none is left in /dev/shm (only this process's blocks count:
    tests running beside this one make their own)."""
    from multiprocessing import shared_memory

    made, original = [], shared_memory.SharedMemory.__init__

    def recording(self, name=None, create=False, size=0, **kwargs):
        original(self, name, create, size, **kwargs)
        if create:
            made.append(self.name)

    shared_memory.SharedMemory.__init__ = recording
    try:
        yield made
    finally:
        shared_memory.SharedMemory.__init__ = original
    assert made
    if os.path.isdir("/dev/shm"):
        assert [n for n in made if os.path.exists(os.path.join("/dev/shm", n.lstrip("/")))] == []


def test_process_pool_receives_the_data_once_through_shared_memory():
    """With a ProcessPoolExecutor the tasks carry the data's shared-memory names, not the
    data (which the workers map once); results equal the serial ones; the blocks are
    unlinked when the call returns."""
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    class Recording(ProcessPoolExecutor):
        sizes = []

        def submit(self, fn, /, *args, **kwargs):
            self.sizes.append(len(pickle.dumps(args)))
            return super().submit(fn, *args, **kwargs)

    X = nmf_cv.make_planted(400, 150, 3, noise=0.1, random_state=0)  # 480 kB
    S = sp.csr_matrix(np.round(3 * X))
    kw = dict(random_state=0, progress=False, max_iter=50)
    with _blocks_unlinked_after(), Recording(2) as pool:
        for Y, loss in ((X, "frobenius"), (S, "kl")):
            serial = nmf_cv.cross_validate(Y, [2, 3], loss=loss, **kw)
            pooled = nmf_cv.cross_validate(Y, [2, 3], loss=loss, executor=pool, **kw)
            # equal up to BLAS rounding (1 thread in the workers, several here)
            assert_allclose(pooled.press, serial.press, rtol=1e-9)
        assert max(pool.sizes) < 20_000, max(pool.sizes)
        pool.sizes.clear()
        serial = nmf_cv.consensus(S, [2, 3], n_runs=3, **kw)
        pooled = nmf_cv.consensus(S, [2, 3], n_runs=3, executor=pool, **kw)
        assert_array_equal(pooled.cophenetic, serial.cophenetic)
        assert max(pool.sizes) < 20_000
    # the rebuilt object equals the original, read-only
    shared = nmf_cv._Shared(nmf_cv._RuleSource(S))
    try:
        copy = nmf_cv._attached(pickle.loads(pickle.dumps(shared)))
        assert (copy.X != S).nnz == 0 and not copy.X.data.flags.writeable
    finally:
        shared.release()


def test_data_already_in_shared_memory_are_not_copied_again(tmp_path, capsys, monkeypatch):
    """`_Shared.local` is the object on this process's views of its blocks (what the
    command line keeps of X with --jobs): shipping it again reuses the blocks, and the
    workers read the same data. rank --jobs 2 and fit --runs --jobs 2 on sparse counts
    write a serial run's results, put X in shared memory once and leave no block behind."""
    import pickle

    S = sp.csr_matrix(sparse_counts(60, 40, 2, 3))
    with _blocks_unlinked_after():
        outer = nmf_cv._Shared(S)
        X = outer.local()
        inner = nmf_cv._Shared(nmf_cv._RuleSource(X, X.T.tocsr()))
        try:
            assert [spec[0] for spec in inner.specs[:3]] == [spec[0] for spec in outer.specs]
            assert len(inner.blocks) == 3  # the transpose's, new
            copy = nmf_cv._attached(pickle.loads(pickle.dumps(inner)))
            assert (copy.X != S).nnz == 0 and (copy.Xt != S.T).nnz == 0
            assert not X.data.flags.writeable
        finally:
            inner.release()
            del X
            outer.release()
        sp.save_npz(tmp_path / "x.npz", S)
        rank = ["rank", str(tmp_path / "x.npz"), "--ranks", "1:3", "--criteria", "cv",
                "--folds", "3", "--loss", "kl"]
        for name, extra in (("pool", ["--jobs", "2"]), ("serial", [])):
            assert nmf_cv.main(rank + extra + ["--out", str(tmp_path / name)]) == 0
        created, init = [], nmf_cv._Shared.__init__

        def counting(self, obj):
            init(self, obj)
            created.append(len(self.blocks))

        monkeypatch.setattr(nmf_cv._Shared, "__init__", counting)
        fit = ["fit", str(tmp_path / "x.npz"), "-k", "2", "--runs", "3", "--loss", "kl",
               "--max-iter", "300"]
        for name, extra in (("fit_pool", ["--jobs", "2"]), ("fit_serial", [])):
            assert nmf_cv.main(fit + extra + ["--out", str(tmp_path / name)]) == 0
        assert created == [3, 0]  # X's three CSR arrays, by the command; the runs reuse them
    pool, serial = (json.loads((tmp_path / f"{name}_rank.json").read_text())
                    for name in ("pool", "serial"))
    assert_allclose(np.array(pool["cv"]["press"], dtype=float),  # BLAS threads differ
                    np.array(serial["cv"]["press"], dtype=float), rtol=1e-9)
    pool, serial = (nmf_cv.read_matrix(str(tmp_path / f"fit_{name}_H.csv"))[0]
                    for name in ("pool", "serial"))
    assert_allclose(pool, serial, rtol=1e-6)
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("observed_share", [0.05, 0.8])
def test_validated_data_travel_to_shared_memory_and_back_whole(observed_share):
    """Process pools carry the validated data through `_split_arrays` / `_join_arrays`: both
    forms of data with missing cells (cell lists; X with zeros and a mask, cached lists
    included) come back with the same arrays."""
    rng = np.random.default_rng(5)
    X = rng.random((60, 40))
    observed = rng.random(X.shape) < observed_share
    observed[np.arange(60), np.arange(60) % 40] = True
    data = nmf_cv._validate_data(np.where(observed, X, np.nan))
    assert len(data.rows) == observed.sum()  # the lists: made on first use if mostly observed
    template, arrays = nmf_cv._split_arrays(data)
    assert any(a is data.values for a in arrays)  # in shared memory, not pickled per task
    back = nmf_cv._join_arrays(template, iter([a.copy() for a in arrays]))
    assert back.masked and back.n_observed == data.n_observed
    for name in ("rows", "cols", "values"):
        assert_array_equal(getattr(back, name), getattr(data, name))
    assert_array_equal(back.observed_mask(), observed)
    assert_array_equal(back.zeros_filled(), np.where(observed, X, 0.0))


def test_choose_rank_with_dask_matches_serial():
    distributed = pytest.importorskip("dask.distributed")
    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=30)
    kw = dict(criteria=("cv", "bicv"), random_state=1, progress=False,
              cv_kwargs={"n_folds": 3, "max_iter": 100})
    serial = nmf_cv.choose_rank(X, [1, 2, 3], **kw)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = nmf_cv.choose_rank(X, [1, 2, 3], executor=client.get_executor(), **kw)
        direct = nmf_cv.choose_rank(X, [1, 2, 3], executor=client, **kw)  # the Client itself
        hidden = client.get_executor()
        assert nmf_cv._dask_client(hidden) is client and nmf_cv._dask_client(client) is client
        hidden._client = None  # a ClientExecutor without its private attribute
        assert nmf_cv._dask_client(hidden) is client  # the current client instead
    np.testing.assert_array_equal(serial.results["cv"].press, direct.results["cv"].press)
    np.testing.assert_array_equal(serial.results["cv"].press, remote.results["cv"].press)
    np.testing.assert_array_equal(serial.results["bicv"].press, remote.results["bicv"].press)


def test_pool_worker_killed_mid_run_still_completes():
    """SIGKILL one worker of the caller's ProcessPoolExecutor (as the OOM killer would): the
    pool breaks, its unfinished fits go to a new pool, and the result is the uninterrupted
    one."""
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor

    X = ckpt_data("cli")
    kw = dict(random_state=0, progress=False)
    with ProcessPoolExecutor(2) as pool:
        ref = nmf_cv.cross_validate(X, range(1, 6), executor=pool, **kw)
    with ProcessPoolExecutor(2) as pool:
        def kill_one():
            os.kill(next(iter(pool._processes)), signal.SIGKILL)

        timer = threading.Timer(0.5, kill_one)
        timer.start()
        cv = nmf_cv.cross_validate(X, range(1, 6), executor=pool, **kw)
        timer.join()
        assert pool in nmf_cv._REPLACEMENTS  # it did break and was replaced
    assert_array_equal(cv.press, ref.press)
    assert cv.best_rank == ref.best_rank


def test_pool_that_keeps_dying_raises_with_the_count_and_how_to_resume(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.setattr(nmf_cv, "_POOL_RESTARTS", 1)
    monkeypatch.setattr(nmf_cv, "_rss_task", _die)  # forked workers see the patch
    X = nmf_cv.make_planted(30, 20, 2, random_state=0)
    with ProcessPoolExecutor(2) as pool, pytest.raises(RuntimeError) as info:
        nmf_cv.randomized_rss(X, [1, 2], n_permutations=1, random_state=0, executor=pool,
                              progress=False, checkpoint=tmp_path / "ck")
    message = str(info.value)
    assert "died 2 times" in message and "0 of 4 tasks" in message, message
    assert str(tmp_path / "ck") in message and "resume" in message


def test_progress_goes_to_stderr(capsys):
    X = nmf_cv.make_planted(20, 10, 2, random_state=31)
    nmf_cv.cross_validate(X, [1, 2], n_folds=2, progress=True, max_iter=5)
    assert "cross_validate" in capsys.readouterr().err
    nmf_cv.cross_validate(X, [1, 2], n_folds=2, progress=False, max_iter=5)
    assert capsys.readouterr().err == ""


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    """A cluster job's log gets a line per tenth of the fits (or minute), never a redrawn
    bar (carriage returns)."""
    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=5)
    nmf_cv.cross_validate(X, range(1, 5), random_state=0, progress=True, max_iter=20)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("cross_validate: ")]
    fits = [line for line in lines if "/40 fits" in line]  # 4 ranks x 2 splits x 5 folds
    assert fits[0].startswith("cross_validate: 0/40 fits") and "40/40 fits" in fits[-1]
    assert 3 <= len(fits) <= 12


def test_pool_workers_run_blas_single_threaded_in_a_plain_install():
    """threadpoolctl is a runtime dependency (not an extra), and a pool worker that ran a task
    has every BLAS pool at one thread."""
    from concurrent.futures import ProcessPoolExecutor

    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "pyproject.toml"), "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    assert any(d.startswith("threadpoolctl") for d in deps)
    with ProcessPoolExecutor(1) as pool:
        before = pool.submit(_blas_threads).result()
        after = pool.submit(nmf_cv._worker_task, _blas_threads, (), os.getpid()).result()
    assert after and all(t == 1 for t in after)
    if os.cpu_count() > 1:  # the limit is what set it
        assert max(before) > 1


def test_other_libraries_internals_are_read_in_one_place_with_fallbacks():
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        size, context = nmf_cv._pool_size_and_context(pool)
        assert size == 2 and context is not None
    bare = SimpleNamespace()  # a pool without the private attributes
    assert nmf_cv._pool_size_and_context(bare) == (os.cpu_count() or 1, None)
    nmf_cv._terminate_workers(bare)  # nothing to stop: no error
    stopped = []
    old = SimpleNamespace(_processes={7: SimpleNamespace(terminate=lambda: stopped.append(7))})
    nmf_cv._terminate_workers(old)
    new = SimpleNamespace(terminate_workers=lambda: stopped.append("all"), _processes={})
    nmf_cv._terminate_workers(new)
    assert stopped == [7, "all"]
    with ThreadPoolExecutor(1) as threads:
        assert nmf_cv._dask_client(threads) is None
    assert nmf_cv._dask_client(None) is None


# =============================================================================================
# Consensus clustering: cophenetic correlation and dispersion
# =============================================================================================

def _runs_consensus(labels_runs):
    C = np.mean([(lab[:, None] == lab[None, :]) for lab in labels_runs], axis=0)
    return C.astype(float)


def _clustered(n_per_group, k, m=80, seed=0, noise=0.05):
    """Samples (columns) from k groups: each group loads on its own metagene."""
    rng = np.random.default_rng(seed)
    W = rng.random((m, k)) * (rng.random((m, k)) < 0.4) + 0.01
    groups = np.repeat(np.arange(k), n_per_group)
    H = 0.05 * rng.random((k, len(groups)))
    H[groups, np.arange(len(groups))] += 1.0 + rng.random(len(groups))
    X = W @ H
    return X * (1 + noise * rng.standard_normal(X.shape)).clip(0.5), groups


def _brunet_reference(X, k, seed, stable_iter, max_iter, method="mu"):
    """Brunet's stopping rule through fit_nmf's callback: stop once the clustering has not
    changed for stable_iter iterations, checked every 10."""
    state = {"labels": None, "unchanged": 0}

    def callback(n_iter, W, H, objective):
        if n_iter % 10:
            return False
        labels = np.argmax(H, axis=0)
        same = state["labels"] is not None and np.array_equal(labels, state["labels"])
        state["unchanged"] = state["unchanged"] + 10 if same else 0
        state["labels"] = labels
        return state["unchanged"] >= stable_iter

    res = nmf_cv.fit_nmf(X, k, method=method, loss="kl", init="random", tol=0,
                         max_iter=max_iter, random_state=seed, callback=callback)
    return np.argmax(res.H, axis=0)


@pytest.mark.parametrize("axis", ["columns", "rows"])
def test_consensus_finds_planted_clusters(axis):
    X, groups = _clustered(8, 3, seed=1)
    if axis == "rows":
        X = X.T
    res = nmf_cv.consensus(X, [2, 3, 4, 5], n_runs=12, axis=axis, random_state=0,
                           progress=False, max_iter=300)
    i3 = list(res.ranks).index(3)
    assert res.cophenetic[i3] > 0.99 and res.dispersion[i3] > 0.99
    assert res.dispersion[i3] == res.dispersion.max()  # extra ranks split groups at times
    C = res.consensus_matrices[3]
    same = groups[:, None] == groups[None, :]
    assert C[same].min() > 0.9 and C[~same].max() < 0.1
    assert res.labels[3].shape == (12, len(groups))
    for k in (2, 3, 4, 5):  # recomputed from the reported labels
        np.testing.assert_allclose(res.consensus_matrices[k], _runs_consensus(res.labels[k]))
        assert res.cophenetic_se[k - 2] == nmf_cv.cophenetic_standard_error(res.labels[k])
    assert res.cophenetic_se[i3] < 0.01  # the planted clusters in (nearly) every run


def test_consensus_on_medulloblastoma_if_available():
    """Brunet et al. (2004) data set: a stable clustering for k=2 (they report high
    cophenetic correlation at k=2 and 3). Skipped where ../shared/data is absent."""
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "shared/data/medulloblastoma"
    if not (path / "Medulloblastoma_data.txt").exists():
        pytest.skip("../shared/data/medulloblastoma not present")
    X = np.loadtxt(path / "Medulloblastoma_data.txt")
    res = nmf_cv.consensus(X, [2, 3], n_runs=10, random_state=0, progress=False,
                           max_iter=200)
    assert res.consensus_matrices[2].shape == (34, 34)
    assert res.cophenetic[0] > 0.9


@pytest.mark.parametrize("method", ["mu", "cd"])
@pytest.mark.parametrize("stop", ["max_iter", "connectivity"])
def test_consensus_stopping_rules_match_fit_nmf(stop, method):
    """The objective-free loop consensus runs gives the iterates fit_nmf gives."""
    X, _ = _clustered(6, 3, seed=4, noise=0.3)
    ranks, n_runs = [2, 3], 3
    res = nmf_cv.consensus(X, ranks, n_runs=n_runs, stop=stop, stable_iter=30, max_iter=400,
                           random_state=5, progress=False, method=method)
    seeds = np.random.SeedSequence(5).spawn(len(ranks) * n_runs)
    for i, k in enumerate(ranks):
        for r in range(n_runs):
            seed = seeds[i * n_runs + r]
            if stop == "max_iter":
                fit = nmf_cv.fit_nmf(X, k, method=method, loss="kl", init="random", tol=0,
                                     max_iter=400, random_state=seed)
                expected = np.argmax(fit.H, axis=0)
            else:
                expected = _brunet_reference(X, k, seed, 30, 400, method)
            np.testing.assert_array_equal(res.labels[k][r], expected)


def test_consensus_rejects_bad_stopping_options():
    X, _ = _clustered(5, 2, seed=2)
    with pytest.raises(ValueError, match="stop"):
        nmf_cv.consensus(X, [2], stop="never")
    with pytest.raises(ValueError, match="multiple of 10"):
        nmf_cv.consensus(X, [2], stable_iter=25)
    with pytest.raises(TypeError, match="max_iters"):
        nmf_cv.consensus(X, [2], max_iters=10)


def test_consensus_refuses_too_many_samples_before_fitting(monkeypatch):
    """A consensus over more samples than its cap (a dense samples x samples matrix per rank)
    is refused in one line, by `consensus` and by `choose_rank` before any criterion fits;
    the other axis, under the cap, runs."""
    X = nmf_cv.make_planted(30, 12, 2, noise=0.05, random_state=0)
    monkeypatch.setattr(nmf_cv, "_CONSENSUS_MAX_SAMPLES", 20)
    with pytest.raises(ValueError, match=r"^consensus clusters the 30 rows of X: a 30 x 30 "):
        nmf_cv.consensus(X, [2], axis="rows", n_runs=2)
    assert nmf_cv.consensus(X, [2], n_runs=2, max_iter=20).ranks.tolist() == [2]
    fits = []
    monkeypatch.setattr(nmf_cv, "_fit", lambda *a, **k: fits.append(a))
    with pytest.raises(ValueError, match="leave it out"):
        nmf_cv.choose_rank(X, [1, 2], ("cv", "cophenetic"), progress=False,
                           consensus_kwargs={"axis": "rows"})
    assert fits == []


def test_consensus_same_with_executor_and_bad_input():
    from concurrent.futures import ThreadPoolExecutor

    X, _ = _clustered(5, 2, seed=2)
    kw = dict(n_runs=4, random_state=3, progress=False, max_iter=50)
    a = nmf_cv.consensus(X, [2, 3], **kw)
    with ThreadPoolExecutor(2) as pool:
        b = nmf_cv.consensus(X, [2, 3], executor=pool, **kw)
    for k in (2, 3):
        np.testing.assert_array_equal(a.labels[k], b.labels[k])
    with pytest.raises(ValueError, match=">= 2"):
        nmf_cv.consensus(X, [1, 2])
    with pytest.raises(ValueError, match="axis"):
        nmf_cv.consensus(X, [2], axis="samples")
    with pytest.raises(ValueError, match="n_runs"):
        nmf_cv.consensus(X, [2], n_runs=0)


def test_consensus_reports_pac_of_its_matrices():
    X, _ = _clustered(8, 3)
    res = nmf_cv.consensus(X, [2, 3, 4], n_runs=6, random_state=0, progress=False,
                           max_iter=200, pac_interval=(0.2, 0.8))
    assert res.pac_interval == (0.2, 0.8)
    for i, k in enumerate(res.ranks):
        C = res.consensus_matrices[int(k)]
        upper = C[np.triu_indices(len(C), k=1)]
        assert res.pac[i] == pytest.approx(np.mean((upper > 0.2) & (upper < 0.8)))
    assert res.pac[1] == 0.0  # three planted groups: every pair always or never together


def _ambiguous_runs(rng, n_runs, n=30, flip=0.3):
    """Runs of a clustering into 3 groups in which each sample takes a random group with
    probability ``flip``."""
    truth = np.arange(n) % 3
    return np.array([np.where(rng.random(n) < flip, rng.integers(0, 3, n), truth)
                     for _ in range(n_runs)])


@pytest.mark.parametrize("n_runs", [7, 25])
def test_cophenetic_standard_error_is_a_grouped_jackknife(n_runs):
    """Against the jackknife written out with scipy's cophenet, groups of runs r mod 10."""
    from scipy.cluster.hierarchy import cophenet

    runs = _ambiguous_runs(np.random.default_rng(n_runs), n_runs)
    G = min(10, n_runs)
    values = []
    for g in range(G):
        C = _runs_consensus(runs[np.arange(n_runs) % G != g])
        d = squareform(1 - C, checks=False)
        values.append(cophenet(linkage(d, "average"), d)[0])
    expected = np.sqrt((G - 1) / G * np.sum((np.array(values) - np.mean(values)) ** 2))
    assert nmf_cv.cophenetic_standard_error(runs) == pytest.approx(expected, rel=1e-9)


def test_cophenetic_standard_error_follows_the_spread_over_seeds():
    """Independent sets of runs: the coefficient's spread over sets is what the error of one
    set says it is (jackknife errors are a little conservative: within 0.7 to 2 times)."""
    rng = np.random.default_rng(0)
    sets = [_ambiguous_runs(rng, 40) for _ in range(40)]
    coph = [nmf_cv.cophenetic_correlation(_runs_consensus(runs)) for runs in sets]
    se = [nmf_cv.cophenetic_standard_error(runs) for runs in sets]
    ratio = np.mean(se) / np.std(coph, ddof=1)
    assert 0.7 < ratio < 2.0, ratio


def test_cophenetic_standard_error_edge_cases():
    same = np.tile([0, 1, 1, 2, 2, 0], (5, 1))
    assert nmf_cv.cophenetic_standard_error(same) == 0.0
    assert np.isnan(nmf_cv.cophenetic_standard_error(same[:2]))
    with pytest.raises(ValueError, match="labels"):
        nmf_cv.cophenetic_standard_error(same[0])
    with pytest.raises(ValueError, match="n_groups"):
        nmf_cv.cophenetic_standard_error(same, n_groups=1)


def test_undecided_ranks_are_those_of_the_picks_comparisons_within_one_error():
    """The rule written out with the public coefficient and error, on runs whose coefficients
    differ clearly (decided) or by less than their errors (undecided)."""
    rng = np.random.default_rng(0)
    same = np.tile(np.arange(30) % 3, (10, 1))  # coefficient 1, error 0

    def stats(runs):
        return (np.array([nmf_cv.cophenetic_correlation(_runs_consensus(r)) for r in runs]),
                np.array([nmf_cv.cophenetic_standard_error(r) for r in runs]))

    def rule(runs):
        coph, se = stats(runs)
        return np.diff(coph) * -1, np.hypot(se[:-1], se[1:])

    flat = [same, same, same]  # no drop: every pair counts, none near 0.001
    assert not nmf_cv._undecided_ranks(*stats(flat)).any()
    clear = [same, _ambiguous_runs(rng, 10, flip=0.6), same]
    drops, spread = rule(clear)
    assert drops[0] - spread[0] > 0.001  # a drop beyond doubt at k = 2, then nothing counts
    assert not nmf_cv._undecided_ranks(*stats(clear)).any()
    close = [_ambiguous_runs(rng, 10, flip=0.3), _ambiguous_runs(rng, 10, flip=0.32), same]
    drops, spread = rule(close)
    assert abs(drops[0] - 0.001) <= spread[0]  # 2 against 3 within one error
    assert drops[1] < 0  # k = 4 rises, and is compared only after a drop
    assert nmf_cv._undecided_ranks(*stats(close)).tolist() == [True, True, False]
    later = [same, close[0], close[1]]  # first drop 2 -> 3 is clear, so 3 against 4 is moot
    assert not nmf_cv._undecided_ranks(*stats(later)).any()


def test_consensus_auto_runs_rounds_with_seeds_fixed_per_rank_and_run(monkeypatch, tmp_path):
    X, _ = _clustered(6, 3)
    kw = {"random_state": 3, "progress": False, "max_iter": 60}
    seen = []
    real = nmf_cv._consensus_task

    def recording(X, k, seed, *args):
        seen.append((k, seed.spawn_key))
        return real(X, k, seed, *args)

    monkeypatch.setattr(nmf_cv, "_consensus_task", recording)
    decided = iter([np.array([True, False, True]), np.array([True, False, False])]
                   + [np.zeros(3, dtype=bool)] * 3)
    monkeypatch.setattr(nmf_cv, "_undecided_ranks", lambda coph, se: next(decided))
    res = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", **kw)
    assert res.n_runs.tolist() == [30, 10, 20]
    assert [len(res.labels[k]) for k in (2, 3, 4)] == [30, 10, 20]
    root = np.random.SeedSequence(3).spawn(3)[0].spawn_key  # rank 2's: root.spawn(3)[0]
    assert [key for k, key in seen if k == 2] == [root + (r,) for r in range(30)]
    assert [k for k, _ in seen] == [2] * 10 + [3] * 10 + [4] * 10 + [2] * 10 + [4] * 10 + [2] * 10
    monkeypatch.setattr(nmf_cv, "_undecided_ranks", lambda coph, se: np.ones(3, bool))
    capped = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", **{**kw, "max_iter": 10})
    assert capped.n_runs.tolist() == [50, 50, 50]  # never decided: 50 runs, then it stops
    monkeypatch.undo()
    again = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", **kw)  # the real rule, twice
    same = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", **kw)
    assert all(n % 10 == 0 and 10 <= n <= 50 for n in again.n_runs)
    for k in (2, 3, 4):
        assert_array_equal(again.labels[k], same.labels[k])
    assert_allclose(again.cophenetic, same.cophenetic)
    path = tmp_path / "ckpt"
    first = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", checkpoint=path, **kw)
    monkeypatch.setattr(nmf_cv, "_consensus_task", None)  # resumed round by round: no fit
    resumed = nmf_cv.consensus(X, [2, 3, 4], n_runs="auto", checkpoint=path, **kw)
    assert resumed.n_runs.tolist() == first.n_runs.tolist() == again.n_runs.tolist()
    assert_allclose(resumed.cophenetic, first.cophenetic)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="n_runs"):
        nmf_cv.consensus(X, [2], n_runs="many")


def test_perfect_block_consensus_has_cophenetic_and_dispersion_one():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    C = _runs_consensus([labels] * 5)
    assert nmf_cv.cophenetic_correlation(C) == 1.0
    assert nmf_cv.dispersion_coefficient(C) == 1.0
    assert nmf_cv.dispersion_coefficient(np.full((4, 4), 0.5)) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_cophenetic_agrees_with_scipy(seed):
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    truth = rng.integers(0, 3, n)
    runs = [np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), truth) for _ in range(20)]
    C = _runs_consensus(runs)
    d = squareform(1 - C, checks=False)
    expected = cophenet(linkage(d, "average"), d)[0]
    assert nmf_cv.cophenetic_correlation(C) == pytest.approx(expected, abs=1e-12)
    assert nmf_cv.dispersion_coefficient(C) == pytest.approx(
        np.sum(4 * (C - 0.5) ** 2) / n ** 2)


def test_pac_equals_a_direct_count():
    labels = np.array([0, 0, 1, 1, 2])
    C = (labels[:, None] == labels).astype(float)
    C[0, 2] = C[2, 0] = 0.5      # inside (0.1, 0.9)
    C[1, 4] = C[4, 1] = 0.1      # on the boundary: not inside
    C[3, 4] = C[4, 3] = 0.85     # inside
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    direct = sum(0.1 < C[i, j] < 0.9 for i, j in pairs) / len(pairs)
    assert direct == pytest.approx(0.2)
    assert nmf_cv.proportion_ambiguous(C) == pytest.approx(direct)
    assert nmf_cv.proportion_ambiguous(C, (0.05, 0.95)) == pytest.approx(0.3)
    for bad in ((0.9, 0.1), (0.1,), (-0.1, 0.5), "ab"):
        with pytest.raises(ValueError, match="pac_interval"):
            nmf_cv.proportion_ambiguous(C, bad)


# an empty interval is refused
def test_pac_interval_must_not_be_empty():
    with pytest.raises(ValueError, match="pac_interval"):
        nmf_cv.proportion_ambiguous(np.eye(3), (0.5, 0.5))


def test_best_cophenetic_rank_rule():
    assert nmf_cv.best_cophenetic_rank([2, 3, 4, 5], [1.0, 1.0, 0.8, 0.79]) == 3
    assert nmf_cv.best_cophenetic_rank([2, 3, 4], [0.9, 0.95, 0.97]) == 4  # no drop: maximum
    assert nmf_cv.best_cophenetic_rank([2, 3, 4], [0.99, 0.7, 0.95]) == 2


@pytest.mark.parametrize("rule,curve,pac,expected", [
    ("first_drop", [0.9993, 0.9964, 0.9886, 0.9714], None, 2),  # the leukemia curve
    ("largest_drop", [0.9993, 0.9964, 0.9886, 0.9714], None, 4),
    ("first_drop", [1.0, 1.0, 0.9995, 0.95], None, 4),  # 0.0005 is noise, not a fall
    ("first_drop", [0.97, 0.99, 0.999, 0.93], None, 4),  # rises, then falls
    ("largest_drop", [0.99, 0.98, 0.80, 0.78], None, 3),
    ("first_drop", [0.90, 0.95, 0.97, 0.98], None, 5),  # never falls: the maximum
    ("pac", [0.99, 0.98, 0.97, 0.96], [0.30, 0.05, 0.05, 0.20], 3),
])
def test_best_cophenetic_rank_rules(rule, curve, pac, expected):
    assert nmf_cv.best_cophenetic_rank([2, 3, 4, 5], curve, rule=rule, pac=pac) == expected


# the fallback of the drop rules is the highest coefficient, not the largest rank
@pytest.mark.parametrize("rule,curve,expected", [
    ("first_drop", [0.95, 0.999, 0.9985, 0.9984], 3),   # rises, then flat within noise
    ("largest_drop", [0.95, 0.999, 0.995, 0.994], 3),
    ("first_drop", [0.95, 0.999, 0.999, 0.9985], 3),    # ties: the smallest rank
])
def test_best_cophenetic_rank_without_a_drop_takes_the_highest(rule, curve, expected):
    assert nmf_cv.best_cophenetic_rank([2, 3, 4, 5], curve, rule=rule) == expected


def test_best_cophenetic_rank_rejects_bad_rules():
    with pytest.raises(ValueError, match="rule"):
        nmf_cv.best_cophenetic_rank([2, 3], [1.0, 0.9], rule="knee")
    with pytest.raises(ValueError, match="pac"):
        nmf_cv.best_cophenetic_rank([2, 3], [1.0, 0.9], rule="pac")


# =============================================================================================
# Component stability across runs, and consensus components at one rank (as cNMF and NMFk)
# =============================================================================================

@pytest.mark.parametrize("k_true,seed", [(3, 0), (4, 1), (5, 2)])
def test_stability_stable_at_the_planted_rank_and_not_above(k_true, seed):
    X = nmf_cv.make_planted(300, 100, k_true, noise=0.1, random_state=seed)
    res = nmf_cv.stability(X, range(2, k_true + 3), n_runs=12, random_state=seed,
                           progress=False)
    at = {int(k): s for k, s in zip(res.ranks, res.min_silhouette, strict=True)}
    assert res.best_rank == k_true, res
    assert at[k_true] >= 0.9 and at[k_true + 1] < 0.3 and at[k_true + 2] < 0.3, at
    assert np.all(np.diff(res.error) < 0)  # more components, smaller error
    assert res.similarity[k_true - 2] > res.similarity[k_true - 1]


def test_stability_on_bars_is_stable_at_16():
    """Hoyer's bars, samples in rows (components are H's rows): 16 bars reproduce in every
    run, 17 components do not."""
    res = nmf_cv.stability(bars(0), [14, 15, 16, 17, 18], n_runs=12, axis="rows",
                           random_state=0, progress=False)
    assert res.best_rank == 16, res
    assert res.min_silhouette[2] > 0.95 and res.min_silhouette[3] < 0.5
    grid = res.components[16].reshape(16, 8, 8)
    assert all(np.sort(c.ravel())[-8:].min() > 5 * np.sort(c.ravel())[-9] for c in grid)


def test_stability_same_with_executor_sparse_and_float32():
    from concurrent.futures import ProcessPoolExecutor

    X = nmf_cv.make_planted(60, 30, 3, noise=0.05, random_state=3)
    kw = {"n_runs": 6, "random_state": 5, "progress": False}
    serial = nmf_cv.stability(X, [2, 3, 4], **kw)
    with ProcessPoolExecutor(2) as pool:
        pooled = nmf_cv.stability(X, [2, 3, 4], executor=pool, **kw)
    for name in ("min_silhouette", "silhouette", "similarity", "errors"):
        assert_array_equal(getattr(pooled, name), getattr(serial, name))
    assert_array_equal(pooled.components[3], serial.components[3])
    sparse = nmf_cv.stability(sp.csr_matrix(X), [2, 3, 4], **kw)
    assert_allclose(sparse.min_silhouette, serial.min_silhouette, atol=1e-6)
    single = nmf_cv.stability(X.astype(np.float32), [2, 3, 4], **kw)
    assert serial.best_rank == 3 and abs(single.min_silhouette[0] - serial.min_silhouette[0]) < 0.02
    assert_allclose(single.errors[:2], serial.errors[:2], rtol=1e-2)  # up to the true rank


def test_stability_with_bootstrap_and_missing_cells():
    X = nmf_cv.make_planted(120, 50, 3, noise=0.05, missing=0.1, random_state=4)
    kw = {"n_runs": 8, "random_state": 1, "progress": False}
    res = nmf_cv.stability(X, [2, 3, 4], **kw)
    again = nmf_cv.stability(X, [2, 3, 4], **kw)
    assert_array_equal(res.errors, again.errors)
    plain = nmf_cv.stability(X, [2, 3, 4], **{**kw, "bootstrap": False})
    assert not np.array_equal(res.errors, plain.errors)
    assert res.best_rank == 3 and res.components[3].shape == (3, 120)


def test_stability_resumes_from_its_checkpoint_without_fitting(tmp_path, monkeypatch):
    X = nmf_cv.make_planted(40, 20, 2, noise=0.05, random_state=6)
    kw = {"n_runs": 4, "random_state": 2, "progress": False, "checkpoint": tmp_path}
    first = nmf_cv.stability(X, [2, 3], **kw)

    def no_fits(*args, **kwargs):
        raise AssertionError("fitted again")
    monkeypatch.setattr(nmf_cv, "fit_nmf", no_fits)
    again = nmf_cv.stability(X, [2, 3], **kw)
    assert_array_equal(again.errors, first.errors)
    assert_array_equal(again.min_silhouette, first.min_silhouette)


def test_stability_rejects_bad_arguments():
    X = nmf_cv.make_planted(20, 10, 2, random_state=0)
    with pytest.raises(ValueError, match=">= 2"):
        nmf_cv.stability(X, [1, 2])
    with pytest.raises(ValueError, match="n_runs"):
        nmf_cv.stability(X, [2], n_runs=1)
    with pytest.raises(ValueError, match="threshold"):
        nmf_cv.stability(X, [2], threshold=1.5)
    with pytest.raises(ValueError, match="axis"):
        nmf_cv.stability(X, [2], axis="cols")
    with pytest.raises(ValueError, match="negative"):
        nmf_cv.stability(-X, [2])


def test_silhouette_matches_scikit_learn():
    """Against scikit-learn's silhouette_samples (cosine), with a zero vector and a group of
    one point (silhouette 0 there by convention)."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    P = rng.random((61, 7))
    labels = rng.integers(0, 4, 61)
    P[3] = 0.0
    labels[60] = 4  # alone in its group
    ours = nmf_cv.silhouette_samples_cosine(P, labels)
    assert_allclose(ours, metrics.silhouette_samples(P, labels, metric="cosine"), atol=1e-12)
    assert ours[60] == 0.0
    with pytest.raises(ValueError, match="two groups"):
        nmf_cv.silhouette_samples_cosine(P, np.zeros(61, dtype=int))


def test_stability_scores_clustered_components_as_scikit_learn_does():
    """One rank's runs of planted data: every run gives one component to each group, and
    the groups' silhouettes are scikit-learn's silhouette_score of the same components."""
    metrics = pytest.importorskip("sklearn.metrics")
    X = nmf_cv.make_planted(80, 40, 3, noise=0.3, random_state=2)
    runs = [nmf_cv._stability_task(X, 4, np.random.SeedSequence(s), "columns", False, "hals",
                                   "frobenius", {"init": "random", "max_iter": 300,
                                                 "tol": 1e-5})
            for s in range(8)]
    comps = np.array([c for c, _ in runs])
    matching = nmf_cv._match_runs(comps, [e for _, e in runs])
    per_group, mean, means, labels = (matching.silhouettes, matching.silhouette,
                                      matching.centres, matching.labels)
    assert_array_equal(np.sort(labels, axis=1), np.tile(np.arange(4), (8, 1)))
    points, flat = comps.reshape(32, -1), labels.ravel()
    assert mean == pytest.approx(metrics.silhouette_score(points, flat, metric="cosine"),
                                 abs=1e-12)
    samples = metrics.silhouette_samples(points, flat, metric="cosine")
    assert_allclose(per_group, [samples[flat == g].mean() for g in range(4)], atol=1e-12)
    assert_allclose(np.linalg.norm(means, axis=1), 1.0)


def test_matched_similarity_against_every_pairing():
    """staNMF-style similarity: the best one-to-one pairing of two runs' components, checked
    against all k! pairings."""
    import itertools

    rng = np.random.default_rng(1)
    comps = rng.random((4, 3, 10))
    comps /= np.linalg.norm(comps, axis=2, keepdims=True)
    best = []
    for r, q in itertools.combinations(range(4), 2):
        cos = comps[r] @ comps[q].T
        best.append(max(np.mean([cos[i, p[i]] for i in range(3)])
                        for p in itertools.permutations(range(3))))
    assert nmf_cv._matched_similarity(comps) == pytest.approx(np.mean(best), rel=1e-12)


# consensus components at one rank: fit_nmf(X, k, n_runs=R) -------------------------------

def matched_cosines(A, B):
    """Cosines of A's and B's rows paired one to one (the best pairing, by brute force)."""
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    cos = A @ B.T
    best = max(itertools.permutations(range(len(B))),
               key=lambda p: sum(cos[i, p[i]] for i in range(len(A))))
    return np.array([cos[i, best[i]] for i in range(len(A))])


def test_consensus_components_reproduce_and_flag_a_rank_too_high():
    """Planted rank 3: two seeds give the same consensus, it matches the planted rows of H at
    least as well as a single run does, every component reproduces; at rank 6 some component
    does not (below stability's threshold)."""
    rng = np.random.default_rng(7)
    W0, H0 = rng.random((90, 3)), rng.random((3, 40)) ** 3
    X = np.maximum(W0 @ H0 + 0.03 * rng.standard_normal((90, 40)), 0.0)
    a = nmf_cv.fit_nmf(X, 3, n_runs=8, random_state=1, tol=1e-6, max_iter=2000)
    b = nmf_cv.fit_nmf(X, 3, n_runs=8, random_state=2, tol=1e-6, max_iter=2000)
    assert matched_cosines(a.H, b.H).min() >= 0.995
    single = nmf_cv.fit_nmf(X, 3, tol=1e-6, max_iter=2000)
    assert matched_cosines(a.H, H0).mean() >= matched_cosines(single.H, H0).mean() - 1e-4
    assert a.component_stability.shape == (3,) and a.component_stability.min() >= 0.8
    assert (a.n_runs, a.W.shape, a.H.shape) == (8, (90, 3), (3, 40)) and 4 <= a.n_runs_kept <= 8
    assert_allclose(a.H.sum(axis=1), 1.0)
    assert np.all(np.diff(a.W.sum(axis=0)) <= 0)  # the largest usage first
    high = nmf_cv.fit_nmf(X, 6, n_runs=8, random_state=1, tol=1e-6, max_iter=2000)
    assert high.component_stability.min() < nmf_cv._STABLE_SILHOUETTE
    assert "consensus of" in repr(a)


def test_consensus_w_is_the_least_squares_fit_to_its_components():
    """The consensus is polished to a stationary point on all of X: W is, row by row, scipy's
    nnls fit to its H over each row's observed cells (the hidden values never matter)."""
    X = nmf_cv.make_planted(30, 20, 2, noise=0.05, missing=0.15, random_state=3)
    res = nmf_cv.fit_nmf(X, 2, n_runs=4, random_state=0, tol=1e-9, max_iter=5000)
    for i in range(30):
        seen = ~np.isnan(X[i])
        w, _ = nnls(res.H[:, seen].T, X[i, seen])
        assert_allclose(res.W[i], w, rtol=1e-4, atol=1e-6)
    other = np.where(np.isnan(X), 1e6, X)
    again = nmf_cv.fit_nmf(other, 2, n_runs=4, random_state=0, mask=~np.isnan(X), tol=1e-9,
                           max_iter=5000)
    assert_array_equal(again.H, res.H)
    assert_array_equal(again.W, res.W)


def test_consensus_counts_sparse_as_dense_executor_and_checkpoint(tmp_path, monkeypatch):
    """KL on counts: sparse input gives the dense result; runs on an executor give the
    serial result; a checkpoint keeps the runs, so calling again fits only W."""
    from concurrent.futures import ThreadPoolExecutor

    X = sparse_counts(60, 40, 3, seed=2, density_mean=1.0)
    kw = {"loss": "kl", "n_runs": 4, "random_state": 3}
    dense = nmf_cv.fit_nmf(X, 3, **kw)
    sparse = nmf_cv.fit_nmf(sp.csr_matrix(X), 3, **kw)
    assert_allclose(sparse.H, dense.H, rtol=1e-6, atol=1e-12)
    assert_allclose(sparse.W, dense.W, rtol=1e-5, atol=1e-9)
    with ThreadPoolExecutor(2) as pool:
        pooled = nmf_cv.fit_nmf(X, 3, executor=pool, **kw)
    assert_array_equal(pooled.H, dense.H)
    first = nmf_cv.fit_nmf(X, 3, checkpoint=tmp_path, **kw)

    def no_fits(*args, **kwargs):
        raise AssertionError("fitted again")
    monkeypatch.setattr(nmf_cv, "fit_nmf", no_fits)
    again = nmf_cv._consensus_fit(nmf_cv._validate_data(X), 3, nmf_cv._FitOptions(
        loss="kl", random_state=3, max_iter=2000, tol=1e-6), 4,
        nmf_cv._Run(checkpoint=tmp_path))  # consensus runs' defaults
    assert_array_equal(again.H, first.H)
    assert_array_equal(first.H, dense.H)


def test_sparse_kl_resample_fits_from_x_rows_as_from_a_copy(monkeypatch):
    """Consensus runs on sparse counts fit a bootstrap resample of X's rows reading them in X
    (`_RowResample`): its transpose equals scipy's, the fit from one init is that of X[pick]
    step for step (float64 and float32), and a run's components equal those of the copied
    resample (integer counts: the random init's scale is summed exactly either way)."""
    X = sp.csr_matrix(sparse_counts(80, 50, 3, seed=4, density_mean=1.0))
    rng = np.random.default_rng(0)
    pick = np.sort(rng.integers(0, 80, 80))
    assert len(np.unique(pick)) < 70  # rows drawn twice or more, and rows left out
    for dtype in (np.float64, np.float32):
        Xd = X.astype(dtype)
        resample = nmf_cv._RowResample(Xd, pick)
        expected = Xd[pick].T.tocsr()
        for name in ("indptr", "indices", "data"):
            assert_array_equal(getattr(resample.Xt, name), getattr(expected, name))
        init = rng.random((80, 3)), rng.random((3, 50))
        options = nmf_cv._FitOptions(loss="kl", init=init, max_iter=40, tol=0.0,
                                     extrapolate=True)
        ours = nmf_cv._fit(resample, 3, options)
        copied = nmf_cv._fit(nmf_cv._validate_data(Xd[pick]), 3, options)
        assert ours.W.dtype == dtype
        assert_array_equal(ours.W, copied.W)
        assert_array_equal(ours.H, copied.H)
        assert_array_equal(ours.loss_history, copied.loss_history)
        assert ours.relative_error == pytest.approx(copied.relative_error, rel=1e-6)
    kw = {"init": "random", "max_iter": 300, "tol": 1e-6}
    seed = np.random.SeedSequence(7)
    run = nmf_cv._stability_task(X, 3, seed, "rows", True, "cd", "kl", kw)
    monkeypatch.setattr(nmf_cv._RowResample, "serves", staticmethod(lambda *args: False))
    copied = nmf_cv._stability_task(X, 3, seed, "rows", True, "cd", "kl", kw)
    assert_array_equal(run[0], copied[0])
    assert run[1] == pytest.approx(copied[1], rel=1e-10)


def test_consensus_drops_a_run_from_another_optimum():
    """Nine runs find the same three components, one finds a mixture: it is dropped."""
    rng = np.random.default_rng(0)
    base = rng.random((3, 12)) ** 4
    comps = np.array([base + 0.01 * rng.random((3, 12)) for _ in range(10)])
    comps[4] = [base[0] + base[1], base[1], base[2]]
    comps = comps / np.linalg.norm(comps, axis=2, keepdims=True)
    comps[1] = comps[1][[2, 0, 1]]  # runs list their components in any order
    matching = nmf_cv._match_runs(comps, np.arange(10.0))
    keep = nmf_cv._typical_runs(matching, comps)
    assert_array_equal(np.flatnonzero(~keep), [4])


def test_nmf_estimator_with_consensus_runs_and_bad_arguments():
    X = nmf_cv.make_planted(40, 25, 2, noise=0.05, random_state=5)
    model = nmf_cv.NMF(2, n_runs=4, random_state=0)
    W = model.fit_transform(X)
    assert W.shape == (40, 2) and model.component_stability_.shape == (2,)
    assert_array_equal(model.components_, nmf_cv.fit_nmf(X, 2, n_runs=4, random_state=0).H)
    with pytest.raises(ValueError, match="callback"):
        nmf_cv.fit_nmf(X, 2, n_runs=3, callback=lambda *a: False)
    with pytest.raises(ValueError, match="random init"):
        nmf_cv.fit_nmf(X, 2, n_runs=3, init=(np.ones((40, 2)), np.ones((2, 25))))
    with pytest.raises(ValueError, match="n_runs"):
        nmf_cv.fit_nmf(X, 2, n_runs=0)


# =============================================================================================
# RSS against randomized data (Frigyesi & Hoglund 2008)
# =============================================================================================

@pytest.mark.parametrize("k_true,seed", [(2, 0), (3, 1), (4, 2), (5, 3)])
def test_randomized_rss_finds_planted_rank(k_true, seed):
    X = nmf_cv.make_planted(80, 50, k_true, noise=0.05, random_state=seed)
    res = nmf_cv.randomized_rss(X, range(1, k_true + 4), random_state=seed, progress=False)
    assert res.best_rank == k_true
    assert np.all(np.diff(res.rss) <= 1e-9 * res.rss[0])
    assert np.all(res.rss < res.rss_randomized_mean)  # structure beats shuffled columns
    assert res.rss_randomized.shape == (k_true + 3, 3)


def test_sparse_input_to_every_rank_criterion_matches_dense():
    """consensus, randomized_rss and bicross_validate take sparse input without densifying
    it; the same matrix dense gives the same answer (randomized copies differ: a sparse
    column's values are dealt to random rows rather than permuted, the same law)."""
    X = sparse_counts(80, 50, 3, 7)
    S = sp.csr_matrix(X)
    kw = dict(random_state=0, progress=False)
    a, b = (nmf_cv.bicross_validate(Y, [1, 2, 3, 4], **kw) for Y in (X, S))
    assert_allclose(b.press, a.press, rtol=1e-6)
    a, b = (nmf_cv.consensus(Y, [2, 3], n_runs=4, **kw) for Y in (X, S))
    assert_allclose(b.cophenetic, a.cophenetic, rtol=1e-6)
    a, b = (nmf_cv.randomized_rss(Y, [1, 2, 3], **kw) for Y in (X, S))
    assert_allclose(b.rss, a.rss, rtol=1e-6)
    assert_allclose(b.rss_randomized, a.rss_randomized, rtol=0.05)
    shuffled = nmf_cv._permute_columns(S, np.random.default_rng(0))
    assert sp.issparse(shuffled)
    assert_allclose(np.sort(shuffled.toarray(), axis=0), np.sort(X, axis=0))


def test_permute_columns_keeps_each_columns_values_and_missing_cells():
    X = nmf_cv.make_planted(30, 10, 2, missing=0.3, random_state=27)
    P = nmf_cv._permute_columns(X, np.random.default_rng(0))
    assert np.array_equal(np.isnan(P), np.isnan(X))
    for j in range(10):
        assert np.array_equal(np.sort(P[:, j][~np.isnan(P[:, j])]),
                              np.sort(X[:, j][~np.isnan(X[:, j])]))
    assert not np.array_equal(np.nan_to_num(P), np.nan_to_num(X))


# =============================================================================================
# Bi-cross-validation (Owen & Perry 2009)
# =============================================================================================

@pytest.mark.parametrize("k_true,seed", [(2, 0), (3, 1), (4, 2), (5, 3)])
def test_bicross_validate_finds_planted_rank(k_true, seed):
    X = nmf_cv.make_planted(80, 60, k_true, noise=0.05, random_state=seed)
    res = nmf_cv.bicross_validate(X, range(1, k_true + 4), random_state=seed, progress=False)
    assert res.best_rank == k_true
    assert res.press.shape == (k_true + 3, 1, 4)


def test_bicross_validate_with_missing_cells_and_errors():
    X = nmf_cv.make_planted(60, 40, 3, noise=0.05, missing=0.1, random_state=29)
    res = nmf_cv.bicross_validate(X, [2, 3, 4, 5], random_state=0, progress=False)
    assert res.best_rank == 3
    nnls = nmf_cv.bicross_validate(X, [2, 3], block_solver="nnls", random_state=0,
                                   progress=False)
    assert np.all(np.isfinite(nnls.press))
    with pytest.raises(ValueError, match="ranks up to 20"):
        nmf_cv.bicross_validate(X, [21])
    with pytest.raises(ValueError, match="block_solver"):
        nmf_cv.bicross_validate(X, [2], block_solver="svd")
    with pytest.raises(ValueError, match="n_row_folds"):
        nmf_cv.bicross_validate(X, [2], n_row_folds=1)


def test_bicross_validate_block_prediction_matches_owen_perry_formula():
    X = nmf_cv.make_planted(30, 20, 3, noise=0.05, random_state=28)
    rows, cols = np.arange(10), np.arange(7)
    press, _ = nmf_cv._bicv_task(X, (rows, cols), 3, "hals", "lstsq", 0, 1, {"tol": 1e-8})
    keep_r, keep_c = np.arange(10, 30), np.arange(7, 20)
    res = nmf_cv.fit_nmf(X[np.ix_(keep_r, keep_c)], 3, random_state=0, tol=1e-8)
    A_hat = X[np.ix_(rows, keep_c)] @ np.linalg.pinv(res.W @ res.H) @ X[np.ix_(keep_r, cols)]
    assert press == pytest.approx(np.sum((X[np.ix_(rows, cols)] - A_hat) ** 2), rel=1e-8)


# =============================================================================================
# Rank selection: prior predictive matching
# =============================================================================================

ppr = nmf_cv.prior_predictive_rank


# Poisson simulations: theta ~ Gamma(shape 1, scale 1), beta ~ Gamma(shape 1, scale 2), so
# mu_t = s_t^2 = 1, mu_b = 2, s_b^2 = 4 and E[Y] = 2K counts (6 to 40 for K = 3..20).
SHAPE = (1000, 800)
KS = (3, 5, 10, 20)
SEEDS = range(5)


def model_moments(k, mu_t, var_t, mu_b, var_b, noise):
    """(E[Y], Var[Y], rho_row, rho_col) implied by the model, written out term by term."""
    mean = k * mu_t * mu_b
    e_t2, e_b2 = var_t + mu_t**2, var_b + mu_b**2
    var = noise + k * (e_t2 * e_b2 - mu_t**2 * mu_b**2)
    cov_row = k * (e_t2 - mu_t**2) * mu_b**2   # shared theta_i
    cov_col = k * mu_t**2 * (e_b2 - mu_b**2)   # shared beta_j
    return mean, var, cov_row / var, cov_col / var


@functools.cache
def poisson_counts(k, seed):
    rng = np.random.default_rng(seed)
    theta = rng.gamma(1.0, 1.0, (SHAPE[0], k))
    beta = rng.gamma(1.0, 2.0, (SHAPE[1], k))
    return rng.poisson(theta @ beta.T).astype(float)


def with_missing(X, fraction, seed):
    X = X.copy()
    X[np.random.default_rng(seed + 1000).random(X.shape) < fraction] = np.nan
    return X


def gaussian_data(k, seed, sd):
    """Gamma(shape 4, scale 1/4) factors (mean 1) plus N(0, sd^2) noise; shape 4 keeps the
    signal far enough from 0 that no cell is negative (nmf_cv requires X >= 0)."""
    rng = np.random.default_rng(seed)
    theta = rng.gamma(4.0, 0.25, (SHAPE[0], k))
    beta = rng.gamma(4.0, 0.25, (SHAPE[1], k))
    S = theta @ beta.T
    return S + sd * rng.standard_normal(S.shape)


def small_matrix_with_holes():
    rng = np.random.default_rng(7)
    X = rng.poisson(5.0, (7, 6)).astype(float)
    X[rng.random(X.shape) < 0.35] = np.nan
    X[0, 1:] = np.nan   # row 0 and column 0 have a single observed cell (no pair, weight 0)
    X[1:, 0] = np.nan
    X[0, 0], X[2, 3] = 4.0, 0.0
    assert (~np.isnan(X)).any(axis=0).all() and (~np.isnan(X)).any(axis=1).all()
    return X


def fields(res):
    return dataclasses.astuple(res)


def brute_force_pair_covariance(Z):
    """Per line, the mean of z_a * z_b over its ordered pairs of distinct observed cells;
    then the average over lines with >= 2 cells, weighted by (cells - 1)."""
    means, weights = [], []
    for line in Z:
        observed = [z for z in line if not np.isnan(z)]
        products = [a * b for a, b in itertools.permutations(observed, 2)]
        if products:
            means.append(sum(products) / len(products))
            weights.append(len(observed) - 1)
    return sum(w * r for w, r in zip(means, weights, strict=True)) / sum(weights)


def additive(m, n):
    """a_i + b_j: row and column effects but no interaction, so tau * var is ~0."""
    return np.add.outer(np.arange(m) % 5, np.arange(n) % 3).astype(float) + 1.0


UNDEFINED = {
    "constant": (np.full((6, 5), 3.0), {}, "var ="),
    "all zeros": (np.zeros((6, 5)), {}, "var ="),
    "rows anti-correlated": (np.tile([[0.0, 2.0], [2.0, 0.0]], (3, 3)), {}, "rho_row ="),
    "columns anti-correlated": (np.repeat([[1.0], [3.0]] * 4, 5, axis=1), {}, "rho_col ="),
    "one column": (np.arange(1.0, 7.0)[:, None], {}, "rho_row is undefined"),
    "no interaction": (additive(20, 12), {}, "tau * var"),
    "noise too large": (poisson_counts(3, 0)[:100, :80], {"likelihood": "gaussian",
                                                         "noise_var": 1e3}, "tau * var"),
}


@pytest.mark.parametrize("k, mu_t, var_t, mu_b, var_b", [
    (3, 1.0, 1.0, 2.0, 4.0), (7, 0.3, 0.05, 5.0, 1.0), (50, 2.0, 9.0, 0.1, 0.002)])
@pytest.mark.parametrize("likelihood", ["poisson", "gaussian"])
def test_formula_recovers_k_from_the_model_moments(k, mu_t, var_t, mu_b, var_b, likelihood):
    noise = k * mu_t * mu_b if likelihood == "poisson" else 0.7
    mean, var, rho_row, rho_col = model_moments(k, mu_t, var_t, mu_b, var_b, noise)
    rank, reason = nmf_cv._rank_from_moments(mean, var, rho_row, rho_col, noise)
    assert reason == ""
    assert rank == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize("k", [3, 10])
def test_simulated_moments_match_the_model(k):
    # Checks the moment equations themselves (not only the algebra): mean, variance and both
    # correlations of simulated counts against the model's values.
    mean, var, rho_row, rho_col = model_moments(k, 1.0, 1.0, 2.0, 4.0, noise=2.0 * k)
    res = ppr(poisson_counts(k, 0))
    assert res.mean == pytest.approx(mean, rel=0.05)
    assert res.var == pytest.approx(var, rel=0.10)
    assert res.rho_row == pytest.approx(rho_row, rel=0.10)
    assert res.rho_col == pytest.approx(rho_col, rel=0.10)
    assert res.tau == pytest.approx(1 - res.rho_row - res.rho_col, abs=1e-15)
    assert res.noise_var == res.mean and res.n_observed == SHAPE[0] * SHAPE[1]


@pytest.mark.parametrize("k", KS)
def test_poisson_estimate_within_15_percent(k):
    estimates = [ppr(poisson_counts(k, s)).rank for s in SEEDS]
    assert np.mean(estimates) == pytest.approx(k, rel=0.15)


@pytest.mark.parametrize("k", KS)
def test_poisson_with_20_percent_missing_within_20_percent(k):
    estimates = [ppr(with_missing(poisson_counts(k, s), 0.2, s)).rank for s in SEEDS]
    assert np.mean(estimates) == pytest.approx(k, rel=0.20)


@pytest.mark.parametrize("k", [10, 20])
def test_gaussian_with_known_noise_within_15_percent(k):
    sd = 0.1 * k   # 10% of E[Y] = k
    data = [gaussian_data(k, s, sd) for s in SEEDS]
    assert min(X.min() for X in data) >= 0
    estimates = [ppr(X, likelihood="gaussian", noise_var=sd**2).rank for X in data]
    assert np.mean(estimates) == pytest.approx(k, rel=0.15)
    # the noise term matters here: ignoring it overestimates K by far more than 15%
    assert ppr(data[0], likelihood="gaussian", noise_var=0.0).rank > 1.5 * k


def test_line_moments_agree_with_pair_enumeration():
    X = small_matrix_with_holes()
    res = ppr(X, strict=False)
    mean = np.nanmean(X)
    Z = X - mean
    assert res.mean == pytest.approx(mean, rel=1e-14)
    assert res.var == pytest.approx(np.nanmean(Z**2), rel=1e-13)
    assert res.rho_row * res.var == pytest.approx(brute_force_pair_covariance(Z), rel=1e-12)
    assert res.rho_col * res.var == pytest.approx(brute_force_pair_covariance(Z.T), rel=1e-12)
    assert res.n_observed == np.sum(~np.isnan(X))


def test_complete_data_pools_every_pair_equally():
    # With equal line counts the (cells - 1) weights are pair pooling: mean over all pairs.
    X = np.random.default_rng(3).poisson(4.0, (5, 4)).astype(float)
    Z = X - X.mean()
    pairs = [Z[i, a] * Z[i, b] for i in range(5) for a in range(4) for b in range(4) if a != b]
    res = ppr(X, strict=False)
    assert res.rho_row * res.var == pytest.approx(np.mean(pairs), rel=1e-12)


def test_sparse_input_matches_dense_and_is_not_densified(monkeypatch):
    X = poisson_counts(3, 0)[:300, :200].copy()
    X[X < 5] = 0   # make it actually sparse
    dense = ppr(X)

    def refuse(*args, **kwargs):
        raise AssertionError("sparse input was densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
    monkeypatch.setattr(sp.csr_matrix, "todense", refuse)
    for S in (sp.csr_matrix(X), sp.csc_matrix(X), sp.coo_array(X)):
        res = ppr(S)
        for a, b in zip(fields(res), fields(dense), strict=True):
            assert a == (pytest.approx(b, rel=1e-10) if isinstance(a, float) else b)


def test_large_sparse_shape_runs_in_observed_cells():
    # 10^5 x 2*10^4 cells would be 16 GB dense; 2*10^5 stored entries take milliseconds.
    rng = np.random.default_rng(0)
    m, n, nnz = 100_000, 20_000, 200_000
    S = sp.csr_matrix((rng.poisson(3.0, nnz) + 1.0, (rng.integers(0, m, nnz),
                                                      rng.integers(0, n, nnz))), shape=(m, n))
    res = ppr(S, strict=False)
    assert res.n_observed == m * n
    assert res.mean == pytest.approx(S.sum() / (m * n), rel=1e-12)


def test_float32_input_is_computed_in_float64():
    X = poisson_counts(5, 1)
    assert ppr(X.astype(np.float32)).rank == pytest.approx(ppr(X).rank, rel=1e-9)


def test_values_under_the_mask_are_never_read():
    X = poisson_counts(5, 2)[:200, :150].copy()
    mask = np.random.default_rng(0).random(X.shape) >= 0.3
    reference = fields(ppr(X, mask=mask))
    for fill in (np.nan, np.inf, -1e300, 7.0):
        Y = X.copy()
        Y[~mask] = fill
        assert fields(ppr(Y, mask=mask)) == reference


def test_mask_and_nan_are_equivalent():
    X = poisson_counts(5, 3)[:200, :150].copy()
    mask = np.random.default_rng(1).random(X.shape) >= 0.3
    with_nan = X.copy()
    with_nan[~mask] = np.nan
    assert fields(ppr(with_nan)) == fields(ppr(X, mask=mask))
    assert fields(ppr(with_nan, mask=mask)) == fields(ppr(X, mask=mask))


def test_callers_arrays_are_not_modified():
    X = small_matrix_with_holes()
    mask = ~np.isnan(X)
    X_before, mask_before = X.copy(), mask.copy()
    ppr(X, strict=False)
    ppr(np.where(mask, X, 3.0), mask=mask, strict=False)
    assert np.array_equal(X, X_before, equal_nan=True) and np.array_equal(mask, mask_before)
    S = sp.csr_matrix(np.nan_to_num(X))
    data_before = S.data.copy()
    ppr(S, likelihood="gaussian", noise_var=0.1, strict=False)
    assert np.array_equal(S.data, data_before)


@pytest.mark.parametrize("case", list(UNDEFINED))
def test_undefined_cases_raise_naming_the_quantity(case):
    X, kwargs, quantity = UNDEFINED[case]
    with pytest.raises(ValueError, match="not identifiable") as info:
        ppr(X, **kwargs)
    assert quantity in str(info.value)
    res = ppr(X, **kwargs, strict=False)
    assert not res.identifiable and res.rank is None and res.rank_int is None
    assert quantity in res.reason and res.reason in str(info.value)
    assert "not identifiable" in repr(res)


def test_identifiable_result_and_its_repr():
    res = ppr(poisson_counts(5, 0))
    assert res.identifiable and res.reason == ""
    assert math.isfinite(res.rank) and res.rank > 0 and res.rank_int == math.floor(res.rank + .5)
    text = repr(res)
    assert text.startswith(f"PriorPredictiveResult(rank={res.rank:.4g} (rank_int=")
    assert "likelihood='poisson'" in text and "rho_row=" in text and "tau=" in text


def test_rank_int_is_at_least_one():
    X = gaussian_data(10, 0, 1.0)[:300, :200]
    first = ppr(X, likelihood="gaussian", noise_var=0.0)
    res = ppr(X, likelihood="gaussian", noise_var=0.999 * first.tau * first.var)
    assert 0 < res.rank < 0.5 and res.rank_int == 1


def test_prior_predictive_flags_a_poisson_misfit():
    rng = np.random.default_rng(0)
    theta, beta = rng.gamma(1.0, 1.0, (300, 3)), rng.gamma(1.0, 2.0, (200, 3))
    counts = rng.poisson(theta @ beta.T).astype(float)
    assert nmf_cv.prior_predictive_rank(counts).misfit == ""
    fractional = nmf_cv.prior_predictive_rank(counts + 0.5)
    assert "not integers" in fractional.misfit and fractional.rank is not None
    spread = nmf_cv.prior_predictive_rank(np.round(counts * 1000))  # same counts, x1000
    assert "noise variance" in spread.misfit
    assert nmf_cv.prior_predictive_rank(counts + 0.5, likelihood="gaussian",
                                        noise_var=1.0).misfit == ""
    report = nmf_cv.choose_rank(counts + 0.5, [2, 3], criteria=("prior",))
    assert "prior" not in report.suggestions
    assert "no suggestion, the Poisson likelihood needs counts" in report.table()
    fig = nmf_cv.plot_rank_report(report)
    assert not [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "prior"]
    plt.close("all")


@pytest.mark.parametrize("kwargs, exc, text", [
    ({"likelihood": "normal"}, ValueError, "likelihood must be one of"),
    ({"likelihood": "gaussian"}, ValueError, "needs noise_var"),
    ({"noise_var": 1.0}, ValueError, "likelihood='gaussian' only"),
    ({"likelihood": "gaussian", "noise_var": -1.0}, ValueError, "noise_var must be"),
    ({"likelihood": "gaussian", "noise_var": math.inf}, ValueError, "noise_var must be"),
    ({"likelihood": "gaussian", "noise_var": True}, ValueError, "noise_var must be"),
    ({"likelihood": "gaussian", "noise_var": "1"}, ValueError, "noise_var must be"),
    ({"strict": "yes"}, TypeError, "strict"),
])
def test_bad_arguments_raise(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        ppr(poisson_counts(3, 0)[:50, :40], **kwargs)


def test_invalid_data_is_refused_as_everywhere_in_nmf_cv():
    with pytest.raises(ValueError, match="negative"):
        ppr(-np.ones((4, 3)))
    with pytest.raises(ValueError, match="no observed cell"):
        ppr(np.array([[1.0, np.nan], [2.0, np.nan]]))


# =============================================================================================
# Rank selection: choose_rank, its report, and the registry of criteria
# =============================================================================================

def _report(suggestions, ranks=(2, 3, 4, 5, 6), cv_press=None):
    """A RankReport built by hand, for the agreement line and the edges."""
    ranks = np.array(ranks)
    results = {}
    if cv_press is not None:
        press = np.asarray(cv_press, dtype=float)[:, None, :]
        results["cv"] = nmf_cv.CVResult(ranks, press, press)
    for c in suggestions:
        if c == "bicv":
            falling = np.linspace(9.0, 5.0, len(ranks))[:, None, None] * np.ones((1, 1, 4))
            results[c] = nmf_cv.CVResult(ranks, falling, falling)
        elif c == "cophenetic":
            curve = np.linspace(1.0, 0.9, len(ranks))
            results[c] = SimpleNamespace(ranks=ranks, cophenetic=curve, dispersion=curve,
                                         pac=1 - curve, best_rank=suggestions[c],
                                         axis="columns")
        elif c == "randomized":
            results[c] = nmf_cv.RandomizedRSSResult(
                ranks, np.linspace(9.0, 5.0, len(ranks)), np.full((len(ranks), 2), 10.0),
                int(ranks[-1]))
        elif c == "stability":
            sil = np.linspace(0.99, 0.2, len(ranks))
            results[c] = SimpleNamespace(
                ranks=ranks, min_silhouette=sil, silhouette=sil, similarity=sil,
                cluster_silhouettes={int(k): np.array([v]) for k, v in zip(ranks, sil)},
                error=sil, threshold=0.7, best_rank=suggestions[c], axis="columns")
    edges = nmf_cv._edges(ranks, results, suggestions)
    recommended = nmf_cv._recommend(results, suggestions, edges)
    return nmf_cv.RankReport(ranks, results, suggestions, edges,
                             nmf_cv._agreement(results, suggestions, edges), *recommended)


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


EDGE_PRESS = [[9.0, 9.1, 8.9], [5.0, 5.1, 4.9], [5.05, 5.1, 5.0], [6.0, 6.1, 5.9], [7.0, 7.0, 7.0]]


def test_choose_rank_report():
    import json

    X = nmf_cv.make_planted(80, 50, 3, noise=0.05, random_state=4)
    prior_kwargs = {"likelihood": "gaussian", "noise_var": (0.05 * X.mean()) ** 2}
    report = nmf_cv.choose_rank(X, range(1, 6), random_state=0, progress=False,
                                prior_kwargs=prior_kwargs,
                                consensus_kwargs={"n_runs": 8, "max_iter": 200},
                                stability_kwargs={"n_runs": 8})
    assert set(report.suggestions) == {"prior", "cv", "cv_1se", "cophenetic", "randomized",
                                       "bicv", "stability"}
    assert list(report.suggestions)[0] == "prior"  # instant, listed first
    prior = nmf_cv.prior_predictive_rank(X, **prior_kwargs)
    assert report.suggestions["prior"] == prior.rank_int
    assert report.suggestions["cv"] == report.results["cv"].best_rank
    assert report.suggestions["cophenetic"] == report.results["cophenetic"].best_rank
    text = str(report)
    assert text.splitlines()[0].split()[:3] == ["k", "PRESS", "PRESS"]
    lines = text.splitlines()
    assert lines[1 + 5 + 1 + 7] == report.agreement  # after the table and the suggestions
    assert " ".join(lines[1 + 5 + 1 + 7 + 2:]) == report.recommendation
    assert report.recommended_rank == 3 and report.recommendation.startswith(
        "Recommended k = 3: CV")
    assert f"(estimate {prior.rank:.2f}, no fits)" in text
    assert "-" in text.splitlines()[1]  # no cophenetic at k = 1
    data = json.loads(json.dumps(report.to_dict()))
    assert data["prior"]["rank"] == pytest.approx(prior.rank)
    cv = report.results["cv"]
    assert data["columns"]["PRESS"]["3"] == pytest.approx(cv.press_median[2])
    assert data["agreement"] == report.agreement
    assert data["suggestions"] == report.suggestions
    assert data["columns"]["stability"]["3"] == pytest.approx(
        report.results["stability"].min_silhouette[1])
    assert data["recommended_rank"] == 3 and data["recommendation"] == report.recommendation
    strict = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # every number, no NaN
    assert np.array(strict["cv"]["press"]).shape == cv.press.shape
    assert_allclose(np.array(strict["cv"]["press"], dtype=float), cv.press)
    assert strict["cv"]["split_picks"] == cv.repeat_best_ranks.tolist()
    assert_allclose(strict["randomized"]["rss_randomized"],
                    report.results["randomized"].rss_randomized)
    assert_allclose(strict["stability"]["component_silhouettes"]["3"],
                    report.results["stability"].cluster_silhouettes[3])
    assert strict["cophenetic"]["best_rank"] == report.suggestions["cophenetic"]
    co = report.results["cophenetic"]
    assert_allclose(strict["cophenetic"]["cophenetic_se"], co.cophenetic_se)
    assert data["columns"]["coph se"]["2"] == pytest.approx(co.cophenetic_se[0])
    assert set(strict["bicv"]) >= {"press", "train", "best_rank"}
    for criterion in ("cv", "randomized", "bicv", "stability"):
        assert report.suggestions[criterion] == 3, (criterion, report)


def test_cophenetic_dissent_says_when_the_runs_do_not_tell_the_ranks_apart():
    def co(se):
        return nmf_cv.ConsensusResult(np.array([2, 3, 4]), {}, {}, np.array([0.96, 0.955, 0.9]),
                                      np.array([0.9, 0.9, 0.8]), 2,
                                      cophenetic_se=np.array([se, se, se]))

    noisy, sure = co(0.004), co(0.001)
    assert "within two standard errors" in nmf_cv._cophenetic_dissent(noisy, 2, 3)
    assert "within two standard errors" not in nmf_cv._cophenetic_dissent(sure, 2, 3)
    assert "within two standard errors" not in nmf_cv._cophenetic_dissent(noisy, 2, 4)


def test_choose_rank_reports_an_unidentifiable_prior_without_failing():
    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=6)  # too smooth for Poisson
    report = nmf_cv.choose_rank(X, [1, 2, 3], criteria=("prior", "bicv"), random_state=0,
                                progress=False)
    assert "prior" not in report.suggestions and report.suggestions["bicv"] == 2
    assert not report.results["prior"].identifiable
    assert "prior predictive matching: not identifiable (" in str(report)
    assert report.to_dict()["prior"]["rank"] is None


def test_medulloblastoma_report_if_available():
    """Ranks 2..6 on Brunet et al.'s medulloblastoma data: no CV fold above 3x its rank's
    median (with no ridge folds reached 10^2-10^3 x), BCV and randomized RSS flagged at the
    edge (their curves still fall at 6), and an agreement line naming the criteria."""
    import pathlib
    from concurrent.futures import ProcessPoolExecutor

    path = pathlib.Path(__file__).parent.parent / "shared/data/medulloblastoma"
    if not (path / "Medulloblastoma_data.txt").exists():
        pytest.skip("../shared/data/medulloblastoma not present")
    X = np.loadtxt(path / "Medulloblastoma_data.txt")
    with ProcessPoolExecutor(2) as pool:
        report = nmf_cv.choose_rank(X, range(2, 7), ("prior", "cv", "randomized", "bicv"),
                                    random_state=0, executor=pool, progress=False)
    cv = report.results["cv"]
    per_fold = np.nan_to_num(cv.press.reshape(len(cv.ranks), -1))  # NaN: not fitted
    assert (per_fold <= 3.0 * cv.press_median[:, None]).all(), per_fold / cv.press_median[:, None]
    assert report.edges.get("randomized") == ">=" and report.edges.get("bicv") == ">="
    assert "no answer inside the ranks tried by" in report.agreement
    assert "RSS vs randomized (≥ 6)" in report.agreement and "BCV (≥ 6)" in report.agreement
    assert "by CV" in report.agreement or "(CV" in report.agreement
    assert "prior" not in report.suggestions and report.results["prior"].misfit


def test_report_says_when_criteria_agree_disagree_or_hit_the_edge():
    press = [[9.0, 9.1, 8.9], [5.0, 5.1, 4.9], [5.05, 5.1, 5.0], [6.0, 6.1, 5.9],
             [7.0, 7.0, 7.0]]
    agree = _report({"cv": 3, "cv_1se": 3, "bicv": 3}, cv_press=press)
    assert agree.agreement.startswith("criteria agree on k = 3 (CV, CV one-SE rule, BCV)")
    assert agree.edges == {}
    split = _report({"cv": 3, "cv_1se": 3, "cophenetic": 4, "randomized": 6, "bicv": 6},
                    cv_press=press)
    assert split.edges == {"randomized": ">=", "bicv": ">="}
    line = split.agreement
    assert "criteria disagree: k = 3 by CV, CV one-SE rule; k = 4 by cophenetic" in line
    assert "no answer inside the ranks tried by RSS vs randomized (≥ 6), BCV (≥ 6)" in line
    assert "PRESS at 3, 4 within 1 SE" in line
    flat = _report({"cv": 4}, cv_press=[[5.0, 5.6, 4.4]] * 4 + [[5.1, 5.7, 4.5]])
    assert "PRESS flat within 1 SE over every rank tried" in flat.agreement
    assert "PRESS flat" not in line
    text = split.table()
    assert "suggested k by RSS vs randomized data: ≥ 6 (RSS still falling faster" in text
    assert line in text.splitlines()
    low = _report({"cv": 2}, cv_press=[[1.0, 1.1, 0.9]] + press[1:])
    assert low.edges == {"cv": "<="} and "≤ 2" in low.agreement
    assert _report({"cv": 2}, ranks=(1, 2, 3), cv_press=press[:3]).edges == {}
    assert json_roundtrip(split.to_dict())["edges"] == {"randomized": ">=", "bicv": ">="}


def test_recommendation_rests_on_what_each_criterion_measures():
    """Cross-validation decides where it can; the others support, fall within its near-equal
    ranks, or dissent with their criterion's reason; a bound or no decider gives no rank."""
    agree = _report({"cv": 3, "cv_1se": 3, "bicv": 3}, cv_press=EDGE_PRESS)
    assert agree.recommended_rank == 3
    assert agree.recommendation.startswith("Recommended k = 3: CV, the fewest components "
                                           "that predict held-out cells")
    assert "Supported by BCV." in agree.recommendation
    split = _report({"cv": 3, "cv_1se": 3, "cophenetic": 4, "randomized": 6, "bicv": 6,
                     "stability": 2}, cv_press=EDGE_PRESS)
    text = split.recommendation
    assert split.recommended_rank == 3 and split.near_ranks == [3, 4]
    assert ("Cross-validation cannot tell k = 3, 4 apart: within them, cophenetic (Brunet) "
            "picks 4: consensus clustering answers another question, how many clusters of "
            "samples reproduce across runs: use k = 4 to cluster the samples.") in text
    assert "RSS vs randomized gives ≥ 6: only a bound, widen the ranks tried" in text
    assert "Component stability picks 2: past k = 2 some component does not reproduce" in text
    low = _report({"cv": 5, "cophenetic": 2}, cv_press=[[9.0, 9.1, 8.9], [7.0, 7.1, 6.9],
                                                         [5.0, 5.1, 4.9], [3.0, 3.1, 2.9],
                                                         [3.3, 3.4, 3.2]])
    assert low.recommended_rank == 5 and low.near_ranks == [5]
    assert ("Cophenetic (Brunet) picks 2: consensus clustering answers another question, how "
            "many clusters of samples reproduce across runs, and lands low") in \
        low.recommendation
    top = _report({"cv": 6}, cv_press=[[9.0, 9.1, 8.9], [7.0, 7.1, 6.9], [5.0, 5.1, 4.9],
                                       [4.0, 4.1, 3.9], [3.0, 3.1, 2.9]])
    assert top.recommended_rank is None
    assert top.recommendation == ("No recommended k: CV gives only a bound (≥ 6), not a "
                                  "rank: widen the ranks tried.")
    flat = _report({"cv": 2, "randomized": 4}, cv_press=[[5.0, 5.6, 4.4]] * 5)
    assert flat.recommended_rank == 4 and flat.near_ranks == []
    assert "Not deciding: CV: PRESS flat within 1 SE over every rank tried." in \
        flat.recommendation
    alone = _report({"cophenetic": 3})
    assert alone.recommended_rank == 3 and "clusters of samples" in alone.recommendation
    none = _report({"cv": 2}, cv_press=[[5.0, 5.6, 4.4]] * 5)
    assert none.recommended_rank is None and none.recommendation.startswith(
        "No recommended k: no criterion decides on these data (CV: PRESS flat")
    assert json_roundtrip(split.to_dict())["near_ranks"] == [3, 4]


def test_report_from_a_checkpoint_finished_or_not(tmp_path):
    """Finished: the report equals the run's. Unfinished (records removed): nothing is
    fitted, the ranks and criteria not finished are marked, the finished ranks' numbers are
    the run's, and no suggestion comes from an unfinished criterion."""
    X = nmf_cv.make_planted(40, 30, 3, noise=0.05, random_state=2)
    kw = {"random_state": 4, "progress": False, "cv_kwargs": {"n_folds": 3, "n_repeats": 2},
          "stability_kwargs": {"n_runs": 4, "max_iter": 300}}
    run = nmf_cv.choose_rank(X, range(1, 6), ("cv", "stability"), checkpoint=tmp_path, **kw)
    done = nmf_cv.report_from_checkpoint(tmp_path, X)
    assert done.to_dict() == run.to_dict() and done.unfinished == {}
    (tmp_path / "cross_validate" / "cross_validate-13.npz").unlink()  # rank 3, split 1
    (tmp_path / "stability" / "stability_k_3-1.npz").unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nmf_cv, "fit_nmf", None)  # nothing may be fitted
        patch.setattr(nmf_cv, "_fit", None)
        part = nmf_cv.report_from_checkpoint(tmp_path, X)
    assert part.unfinished["stability"] == "3 of 4 tasks of 'stability k=3' finished"
    assert part.unfinished["cv"].startswith("k = 3")
    assert part.suggestions == {} and part.recommended_rank is None
    cv, full = part.partial["cv"], run.results["cv"]
    finished = [i for i, k in enumerate(cv.ranks) if str(k) not in part.unfinished["cv"]]
    # unfinished: rank 3 (a fit missing), and the ranks whose stuck folds wait for refits
    assert [int(k) for k in np.delete(cv.ranks, finished)] == sorted(
        {3} | {int(k) for k, n in zip(full.ranks, full.n_refitted) if n})
    assert finished[:2] == [0, 1]
    assert_array_equal(cv.press[finished], full.press[finished])
    assert np.isnan(cv.press[2]).all()
    table = part.table()
    assert "cv: unfinished, no suggestion (k = 3" in table
    assert table.splitlines()[3].split()[1] == "-"  # k = 3's PRESS
    assert part.recommendation.startswith("From the criteria finished so far (cv, "
                                          "stability unfinished): no recommended k")
    fig = nmf_cv.plot_rank_report(part)
    assert [ax.get_label() for ax in fig.axes][:1] == ["cv"]
    assert fig.axes[0].get_title().endswith("(unfinished)")
    with pytest.raises(ValueError, match="belongs to another run"):
        nmf_cv.report_from_checkpoint(tmp_path, X + 1.0)
    with pytest.raises(ValueError, match="pass X"):
        nmf_cv.report_from_checkpoint(tmp_path)


# rank 1 has nothing below it, so it is an answer, not a bound
def test_rank_one_at_the_bottom_is_not_an_edge():
    rep = _report({"cv": 1, "cv_1se": 1}, ranks=(1, 2, 3),
                  cv_press=[[1.0, 1.1, 0.9], [5.0, 5.1, 4.9], [6.0, 6.1, 5.9]])
    assert rep.edges == {}
    assert rep.agreement.startswith("criteria agree on k = 1")


# the one-SE pick at the smallest rank is a bound too; no 1-SE clause for one rank
def test_one_se_rule_at_the_smallest_rank_is_an_edge():
    rep = _report({"cv": 2, "cv_1se": 2}, cv_press=[[1.0, 1.1, 0.9]] + EDGE_PRESS[1:])
    assert rep.edges == {"cv": "<=", "cv_1se": "<="}
    assert ("suggested k by PRESS, one-SE rule: ≤ 2 (PRESS within 1 SE at the smallest rank "
            "tried)") in rep.table()
    assert "within 1 SE" not in rep.agreement  # only rank 2 is within 1 SE: no such clause


def test_stability_report_says_when_no_rank_reproduces():
    """Pure noise: no rank's components all reproduce across resamples (from inits alone
    they do, at ranks 4 and 5); the report says so instead of giving the smallest rank as
    an answer."""
    X = np.random.default_rng(0).random((60, 40))
    fixed = nmf_cv.stability(X, [4, 5], n_runs=6, bootstrap=False, random_state=0,
                             progress=False)
    assert fixed.min_silhouette.min() > 0.9
    report = nmf_cv.choose_rank(X, [3, 4, 5], ("stability",), random_state=0, progress=False,
                                stability_kwargs={"n_runs": 6})
    st = report.results["stability"]
    assert st.min_silhouette.max() < st.threshold
    assert report.edges["stability"] == "<="
    assert ("suggested k by component stability (largest k whose components reproduce): none "
            "(no rank tried has every component reproducing") in str(report)
    assert "no answer inside the ranks tried by component stability (none)" in report.agreement


def test_report_never_shows_a_split_dependent_pick_as_one_number():
    import matplotlib
    matplotlib.use("Agg")
    ranks = np.array([4, 5, 6, 7])
    press = np.full((4, 5, 3), 10.0)
    press[2, [0, 2, 4]] = 9.0
    press[1, [1, 3]] = 9.0
    press[1, [0, 2, 4]] = 9.5
    press[2, [1, 3]] = 9.2  # 6 best pooled: 3 splits pick it, 2 pick 5
    cv = nmf_cv.CVResult(ranks, press, press)
    report = nmf_cv.RankReport(ranks, {"cv": cv}, {"cv": 6, "cv_1se": cv.best_rank_1se},
                               {}, nmf_cv._agreement({"cv": cv}, {"cv": 6}, {}))
    assert ("suggested k by cross-validated PRESS (smallest rank within 1 SE of the best): "
            "6 or 5 (3 and 2 of 5 splits)") in str(report)
    assert "CV's splits disagree: 6 or 5 (3 and 2 of 5 splits)" in report.agreement
    fig = nmf_cv.plot_rank_report(report)
    assert "CV: 6 or 5 (3 and 2 of 5 splits)" in fig.get_suptitle()
    import matplotlib.pyplot as plt
    plt.close(fig)


def _toy_criterion():
    """A criterion of our own: the distance of each rank from a target, smallest at it."""

    @dataclasses.dataclass
    class ToyResult:
        ranks: np.ndarray
        score: np.ndarray

    def run(X, ranks, *, random_state, executor, progress, checkpoint, target=2):
        draw = np.random.default_rng(random_state).random()  # draws from its own stream
        return ToyResult(np.asarray(ranks), np.abs(np.asarray(ranks) - target) + draw)

    def panel(ax, result, picks):
        ax.plot(result.ranks, result.score, "o-", gid="toy_score", label="toy score")

    pick = nmf_cv._Pick("toy", "the toy rule (closest to its target)", "toy",
                        lambda r: int(r.ranks[np.argmin(r.score)]),
                        edge=nmf_cv._edge_of_range(), still="toy score still falling")
    return nmf_cv._Criterion(
        "toy", run, (pick,), stream=7,
        columns=lambda r: {"toy score": nmf_cv._by_rank(r.ranks, r.score)},
        panel=panel, title="A toy criterion")


def test_a_registered_criterion_reaches_the_table_agreement_json_and_dashboard(monkeypatch):
    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=0)
    kw = dict(random_state=0, progress=False, cv_kwargs={"n_folds": 3, "max_iter": 200})
    alone = nmf_cv.choose_rank(X, [1, 2, 3, 4], criteria=("cv",), **kw)
    monkeypatch.setitem(nmf_cv._CRITERIA, "toy", _toy_criterion())
    report = nmf_cv.choose_rank(X, [1, 2, 3, 4], criteria=("cv", "toy"),
                                toy_kwargs={"target": 3}, **kw)
    assert report.suggestions["toy"] == 3
    # its own seed stream: cross-validation's fits are those of a run without it
    assert_array_equal(report.results["cv"].press, alone.results["cv"].press)
    table = report.table()
    assert "toy score" in table.splitlines()[0]
    assert "suggested k by the toy rule (closest to its target): 3" in table
    assert "toy" in report.agreement and "k = 3 by" in report.agreement
    data = json.loads(json.dumps(report.to_dict()))
    assert data["suggestions"]["toy"] == 3
    assert set(data["columns"]["toy score"]) == {"1", "2", "3", "4"}
    fig = nmf_cv.plot_rank_report(report)
    panels = {ax.get_label(): ax for ax in fig.axes}
    assert list(panels) == ["cv", "toy", "recommendation"]
    assert panels["toy"].get_title() == "A toy criterion"
    rec = report.recommended_rank
    assert marks(panels["recommendation"], "recommended") == [rec]
    assert [ln.get_xdata()[0] for ln in panels["recommendation"].lines
            if ln.get_gid() == "pick toy"] == [3]
    assert f"Recommended k = {rec}" in fig.get_suptitle()
    if rec != 3:
        assert "Toy picks 3: it answers another question." in report.recommendation
    assert [ln.get_gid() for ln in panels["toy"].lines].count("toy_score") == 1
    assert "toy: 3" in fig.get_suptitle()
    plt.close(fig)
    # at the range's edge its pick is a bound, said in its own words
    edge = nmf_cv.choose_rank(X, [1, 2], criteria=("toy",), toy_kwargs={"target": 5}, **kw)
    assert edge.edges == {"toy": ">="}
    assert "≥ 2 (toy score still falling at the largest rank tried)" in edge.table()
    with pytest.raises(TypeError, match="toy_kwarg"):
        nmf_cv.choose_rank(X, [1, 2], criteria=("toy",), toy_kwarg={}, **kw)
    with pytest.raises(ValueError, match="criterion"):
        nmf_cv.choose_rank(X, [1, 2], criteria=("nope",), **kw)


# =============================================================================================
# Plotting (matplotlib is imported on first use: `import nmf_cv` does not need it)
# =============================================================================================

@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def X():
    return nmf_cv.make_planted(30, 20, 2, noise=0.05, random_state=0)


@pytest.fixture(scope="module")
def report(X):
    return nmf_cv.choose_rank(X, [1, 2, 3], random_state=0, progress=False,
                              cv_kwargs={"n_folds": 3, "max_iter": 100},
                              consensus_kwargs={"n_runs": 4, "max_iter": 50},
                              randomized_kwargs={"n_permutations": 2, "max_iter": 100},
                              bicv_kwargs={"max_iter": 100})


@pytest.fixture
def cv():
    """A CVResult whose pick (k=3: better than k=2 on every fold) and unpaired one-SE rank
    (k=2: the folds differ much more than the ranks) differ."""
    press = np.array([[9.0, 10.0, 11.0], [3.0, 4.0, 5.0], [2.5, 3.4, 4.4], [3.5, 3.5, 3.5]])
    train = np.array([[20.0, 21.0, 22.0], [8.0, 8.0, 9.0], [6.0, 6.5, 7.0], [4.0, 5.0, 6.0]])
    res = nmf_cv.CVResult(np.array([1, 2, 3, 4]), press[:, None, :], train[:, None, :])
    assert (res.best_rank, res.best_rank_1se) == (3, 2)
    return res


def block_consensus(groups, rng):
    """A consensus matrix of shuffled, planted groups: 0.9 within, 0.1 across, plus noise."""
    C = np.where(groups[:, None] == groups[None, :], 0.9, 0.1)
    noise = rng.uniform(-0.05, 0.05, C.shape)
    C = np.clip(C + (noise + noise.T) / 2, 0, 1)
    np.fill_diagonal(C, 1.0)
    return C


def consensus_result(matrices):
    ranks = np.array(sorted(matrices))
    return nmf_cv.ConsensusResult(ranks, matrices, {}, np.linspace(0.9, 0.8, len(ranks)),
                                  np.linspace(0.7, 0.6, len(ranks)), int(ranks[0]))


def reference_leaves(C):
    return leaves_list(linkage(squareform(1.0 - C, checks=False), method="average"))


def marks(ax, gid):
    """x positions of the vertical lines with this gid."""
    return [line.get_xdata()[0] for line in ax.lines if line.get_gid() == gid]


def lines(ax, gid):
    return [line for line in ax.lines if line.get_gid() == gid]


def axes_by_label(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def render(fig):
    """Draw the figure, failing on any warning (layout collapse, log of non-positive...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png", dpi=50)


def test_plot_loss_draws_loss_history_per_iteration(X):
    res = nmf_cv.fit_nmf(X, 2, max_iter=15, tol=0)
    ax = nmf_cv.plot_loss(res)
    (line,) = ax.lines
    assert_array_equal(line.get_ydata(), res.loss_history)
    assert_array_equal(line.get_xdata(), np.arange(res.n_iter + 1))
    assert ax.get_yscale() == "log" and ax.get_legend() is None
    render(ax.figure)


def test_plot_loss_against_time_normalized_from_a_dict(X):
    fits = {"hals": nmf_cv.fit_nmf(X, 2, max_iter=10, tol=0),
            "kl": nmf_cv.fit_nmf(X, 2, method="mu", loss="kl", max_iter=10, tol=0)}
    ax = nmf_cv.plot_loss(fits, x="time", normalize=True)
    for line, res in zip(ax.lines, fits.values(), strict=True):
        assert_array_equal(line.get_xdata(), res.time_history)
        assert_allclose(line.get_ydata(), res.loss_history / res.loss_history[0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["hals", "kl"]
    assert ax.get_xlabel() == "time (s)"
    assert ax.get_ylabel() == "objective / initial objective"


def test_plot_loss_labels_and_errors(X):
    fits = [nmf_cv.fit_nmf(X, 2, method=m, max_iter=5) for m in ("hals", "mu")]
    ax = nmf_cv.plot_loss(fits)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["hals, frobenius",
                                                                   "mu, frobenius"]
    with pytest.raises(ValueError, match="labels"):
        nmf_cv.plot_loss(fits, labels=["one"])
    with pytest.raises(ValueError, match="x"):
        nmf_cv.plot_loss(fits, x="seconds")
    with pytest.raises(ValueError, match="keys"):
        nmf_cv.plot_loss({"a": fits[0]}, labels=["b"])


def test_plot_cv_draws_press_with_standard_errors_and_training_rss(cv):
    ax = nmf_cv.plot_cv(cv)
    data, _, (bars,) = ax.containers[0].lines
    assert_array_equal(data.get_xdata(), cv.ranks)
    assert_array_equal(data.get_ydata(), cv.press_median)
    expected = [[[k, m - s], [k, m + s]] for k, m, s in zip(cv.ranks, cv.press_median,
                                                            cv.press_mad_se, strict=True)]
    assert_allclose(np.array(bars.get_segments()), expected)
    (train,) = lines(ax, "train")
    assert_allclose(train.get_ydata(), np.median(cv.train_rss, axis=(1, 2)))
    assert ax.get_ylabel() == "PRESS" and ax.get_yscale() == "log"
    render(ax.figure)


def test_plot_cv_marks_best_rank_and_one_se_rank(cv):
    ax = nmf_cv.plot_cv(cv)
    assert marks(ax, "best_rank") == [3]
    assert marks(ax, "best_rank_1se") == [2]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pick: k = 3" in labels and "one-SE rule: k = 2" in labels


def test_plot_cv_names_poisson_deviance_for_kl(cv):
    cv.loss = "kl"
    assert nmf_cv.plot_cv(cv).get_ylabel() == "held-out Poisson deviance"


def test_plot_cv_uses_the_given_axes_and_integer_rank_ticks(report):
    _, ax = plt.subplots()
    cv = report.results["cv"]
    assert nmf_cv.plot_cv(cv, ax=ax) is ax
    assert_array_equal(ax.containers[0].lines[0].get_ydata(), cv.press_median)
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == [1, 2, 3]


def test_plot_cv_shows_every_fold_and_marks_outliers():
    press = np.array([[[10.0, 11.0, 9.0]], [[8.0, 8.2, 500.0]]])
    cv = nmf_cv.CVResult(np.array([2, 3]), press, press / 2)
    ax = nmf_cv.plot_cv(cv)
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert sorted(lines["folds"].get_ydata().tolist()) == [8.0, 8.2, 9.0, 10.0, 11.0]
    assert lines["outlier_folds"].get_xdata().tolist() == [3]
    assert lines["outlier_folds"].get_ydata().tolist() == [500.0]
    assert_array_equal(lines["press"].get_ydata(), cv.press_median)
    plt.close("all")


def test_plot_cophenetic_draws_both_coefficients_and_marks_best_rank(report):
    co = report.results["cophenetic"]
    ax = nmf_cv.plot_cophenetic(co)
    assert_array_equal(lines(ax, "cophenetic")[0].get_ydata(), co.cophenetic)
    assert_array_equal(lines(ax, "dispersion")[0].get_ydata(), co.dispersion)
    assert_array_equal(lines(ax, "cophenetic")[0].get_xdata(), co.ranks)
    assert marks(ax, "best_rank") == [co.best_rank]


def test_plot_randomized_rss_draws_data_mean_and_permutation_range():
    ra = nmf_cv.RandomizedRSSResult(np.array([1, 2, 3]), np.array([10.0, 2.0, 1.5]),
                                    np.array([[20.0, 22.0], [15.0, 16.0], [12.0, 14.0]]), 2)
    ax = nmf_cv.plot_randomized_rss(ra)
    assert_array_equal(lines(ax, "rss")[0].get_ydata(), ra.rss)
    data, _, (bars,) = ax.containers[0].lines
    assert_array_equal(data.get_ydata(), [21.0, 15.5, 13.0])
    assert_allclose(np.array(bars.get_segments()),
                    [[[1, 20], [1, 22]], [[2, 15], [2, 16]], [[3, 12], [3, 14]]])
    assert marks(ax, "best_rank") == [2]
    assert ax.get_yscale() == "log"


def test_plot_consensus_heatmap_is_the_matrix_in_dendrogram_order(report):
    co = report.results["cophenetic"]
    C = co.consensus_matrices[2]
    fig = nmf_cv.plot_consensus(co, 2)
    assert [ax.get_label() for ax in fig.axes] == ["dendrogram k=2", "consensus k=2",
                                                   "colorbar k=2"]
    heat = axes_by_label(fig)["consensus k=2"]
    leaves = reference_leaves(C)
    assert_allclose(heat.images[0].get_array(), C[np.ix_(leaves, leaves)])
    assert [t.get_text() for t in heat.get_xticklabels()] == [str(i) for i in leaves]
    render(fig)


def test_plot_consensus_order_gathers_planted_groups():
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat([0, 1, 2], [5, 7, 6]))
    C = block_consensus(groups, rng)
    fig = nmf_cv.plot_consensus(consensus_result({3: C}), 3)
    image = axes_by_label(fig)["consensus k=3"].images[0].get_array()
    leaves = reference_leaves(C)
    assert_allclose(image, C[np.ix_(leaves, leaves)])
    assert np.count_nonzero(np.diff(groups[leaves])) == 2  # each group is one block


def test_plot_consensus_label_strip_has_one_colour_per_class():
    rng = np.random.default_rng(1)
    groups = rng.permutation(np.repeat([0, 1, 2], 6))
    names = np.array(["tumour", "normal", "other"])[groups]
    C = block_consensus(groups, rng)
    fig = nmf_cv.plot_consensus(consensus_result({3: C}), 3, labels=list(names))
    strip = axes_by_label(fig)["classes k=3"].images[0]
    colours = [tuple(c) for c in strip.to_rgba(strip.get_array())[0]]
    leaves = reference_leaves(C)
    by_class = {}
    for name, colour in zip(names[leaves], colours, strict=True):
        by_class.setdefault(name, set()).add(colour)
    assert all(len(c) == 1 for c in by_class.values())  # one colour per class...
    assert len(set(colours)) == 3  # ...and a different one for each
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == list(dict.fromkeys(names))
    render(fig)


def test_plot_consensus_rejects_unknown_rank_and_wrong_label_count():
    res = consensus_result({2: np.eye(4)})
    with pytest.raises(ValueError, match="rank 5"):
        nmf_cv.plot_consensus(res, 5)
    with pytest.raises(ValueError, match="3 entries for 4 samples"):
        nmf_cv.plot_consensus(res, 2, labels=["a", "b", "c"])


def test_plot_consensus_grid_draws_each_rank(report):
    co = report.results["cophenetic"]
    fig = nmf_cv.plot_consensus_grid(co, labels=["x"] * 10 + ["y"] * 10)
    assert len(fig.subfigs) == len(co.ranks)
    panels = axes_by_label(fig)
    for k in co.ranks:
        C = co.consensus_matrices[k]
        leaves = reference_leaves(C)
        assert_allclose(panels[f"consensus k={k}"].images[0].get_array(),
                        C[np.ix_(leaves, leaves)])
    render(fig)


def test_plot_components_curves_are_the_columns_of_W():
    W = np.random.default_rng(0).random((20, 3))
    ax = nmf_cv.plot_components(W)
    curves = lines(ax, "component")
    assert len(curves) == 3
    for i, line in enumerate(curves):
        assert_array_equal(line.get_ydata(), W[:, i])
        assert_array_equal(line.get_xdata(), np.arange(20))


def test_plot_components_curves_are_the_rows_of_H_at_given_x():
    H = np.random.default_rng(1).random((2, 15))
    x = np.linspace(400, 700, 15)
    ax = nmf_cv.plot_components(H, kind="rows", x=x)
    for i, line in enumerate(lines(ax, "component")):
        assert_array_equal(line.get_ydata(), H[i])
        assert_array_equal(line.get_xdata(), x)


def test_plot_components_matches_true_components_in_order_and_scale():
    W = np.random.default_rng(2).random((25, 3))
    true = W[:, [2, 0, 1]] * np.array([2.0, 0.5, 3.0])
    ax = nmf_cv.plot_components(W, true=true)
    dashed = lines(ax, "true")
    assert [line.get_linestyle() for line in dashed] == ["--"] * 3
    for i, line in enumerate(dashed):
        assert_allclose(line.get_ydata(), W[:, i])
    ax = nmf_cv.plot_components(W, true=true, match=False)
    for i, line in enumerate(lines(ax, "true")):
        assert_array_equal(line.get_ydata(), true[:, i])


def test_plot_components_images_are_the_reshaped_components():
    H = np.random.default_rng(3).random((4, 12))
    true = H[::-1] * 2.0
    fig = nmf_cv.plot_components(H, kind="rows", shape=(3, 4), true=true)
    panels = axes_by_label(fig)
    assert len(panels) == 8
    for i in range(4):
        assert_array_equal(panels[f"component {i + 1}"].images[0].get_array(),
                           H[i].reshape(3, 4))
        assert_allclose(panels[f"true {i + 1}"].images[0].get_array(), H[i].reshape(3, 4))
    render(fig)


def test_plot_components_rejects_bad_input():
    W = np.ones((6, 2))
    with pytest.raises(ValueError, match="shape"):
        nmf_cv.plot_components(W, shape=(2, 2))
    with pytest.raises(ValueError, match="fig, not ax"):
        nmf_cv.plot_components(W, shape=(2, 3), ax=plt.subplots()[1])
    with pytest.raises(ValueError, match="true holds"):
        nmf_cv.plot_components(W, true=np.ones((6, 3)))
    with pytest.raises(ValueError, match="kind"):
        nmf_cv.plot_components(W, kind="cols")


def test_plot_rank_report_has_a_panel_per_criterion_with_suggestions_marked(report):
    prior = SimpleNamespace(rank=2.4, rank_int=2)
    full = nmf_cv.RankReport(report.ranks, {**report.results, "prior": prior},
                             {**report.suggestions, "prior": 2})
    fig = nmf_cv.plot_rank_report(full)
    panels = axes_by_label(fig)
    error_axes = panels.pop("stability error")  # the stability panel's twin (right axis)
    assert list(panels) == ["cv", "bicv", "randomized", "cophenetic", "stability"]
    s = report.suggestions
    assert s["stability"] == 2
    expected = {"cv": {"best_rank": [s["cv"]], "best_rank_1se": [s["cv_1se"]]},
                "bicv": {"best_rank": [s["bicv"]], "best_rank_1se": []},
                "randomized": {"best_rank": [s["randomized"]]},
                "cophenetic": {"best_rank": [s["cophenetic"]]},
                "stability": {"best_rank": [2]}}
    for name, ax in panels.items():
        for gid, xs in expected[name].items():
            assert marks(ax, gid) == xs, (name, gid)
        assert marks(ax, "prior") == [2.4]
        assert ax.get_xlim() == (0.5, 3.5)
    assert_array_equal(panels["cv"].containers[0].lines[0].get_ydata(),
                       report.results["cv"].press_median)
    assert_array_equal(panels["bicv"].containers[0].lines[0].get_ydata(),
                       report.results["bicv"].press_median)
    st = report.results["stability"]
    (line,) = [ln for ln in panels["stability"].lines if ln.get_gid() == "min_silhouette"]
    assert_array_equal(line.get_ydata(), st.min_silhouette)
    (line,) = [ln for ln in error_axes.lines if ln.get_gid() == "error"]
    assert_array_equal(line.get_ydata(), st.error)
    title = fig.get_suptitle()
    for text in (f"CV: {s['cv']}", f"CV one-SE rule: {s['cv_1se']}",
                 f"BCV: {s['bicv']}", f"RSS vs randomized: {s['randomized']}",
                 f"cophenetic (Brunet): {s['cophenetic']}", "prior predictive: 2.4",
                 "component stability: 2"):
        assert text in title
    render(fig)


def test_plot_rank_report_with_one_criterion_and_an_unidentifiable_prior(cv):
    prior = SimpleNamespace(rank=None, rank_int=None)
    report = nmf_cv.RankReport(cv.ranks, {"cv": cv, "prior": prior},
                               {"cv": 3, "cv_1se": 2, "prior": None})
    fig = nmf_cv.plot_rank_report(report)
    (ax,) = fig.axes
    assert ax.get_label() == "cv" and marks(ax, "prior") == []
    assert marks(ax, "best_rank") == [3] and marks(ax, "best_rank_1se") == [2]
    assert "prior predictive: not identifiable" in fig.get_suptitle()
    render(fig)


def test_plot_rank_report_with_only_a_prior_off_the_tried_ranks():
    report = nmf_cv.RankReport(np.array([1, 2, 3]),
                               {"prior": SimpleNamespace(rank=7.2, rank_int=7)}, {})
    fig = nmf_cv.plot_rank_report(report)
    (ax,) = fig.axes
    (line,) = lines(ax, "prior")
    assert line.get_xdata()[0] == 7.2 and "off the axis" in line.get_label()
    render(fig)
    with pytest.raises(ValueError, match="no criterion"):
        nmf_cv.plot_rank_report(nmf_cv.RankReport(np.array([1, 2]), {}, {}))


def test_importing_the_module_does_not_import_matplotlib():
    path = [os.path.dirname(nmf_cv.__file__)]
    code = (f"import sys; sys.path[:0] = {path!r}; import nmf_cv; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# =============================================================================================
# Command line
# =============================================================================================

def run_cli(*argv):
    """(exit code, stdout, stderr) of the command line ``nmf_cv argv``, run in this process
    (`nmf_cv.main`, which ``python -m nmf_cv`` calls) to spare an interpreter's start per
    call; argparse's exits give their code. Tests that need a fresh interpreter (the entry
    point, compiling, signals) start one themselves."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = nmf_cv.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def write_10x(folder, S, genes, cells, compressed=True):
    """A 10x Genomics folder: matrix.mtx (genes x cells), features/genes and barcodes."""
    import gzip

    import scipy.io

    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", S)
    if compressed:
        data = (folder / "matrix.mtx").read_bytes()
        (folder / "matrix.mtx").unlink()
        (folder / "matrix.mtx.gz").write_bytes(gzip.compress(data))
    features = "".join(f"{g}\tSYMBOL{i}\tGene Expression\n" for i, g in enumerate(genes))
    barcodes = "".join(f"{c}\n" for c in cells)
    for name, text in (("features.tsv" if compressed else "genes.tsv", features),
                       ("barcodes.tsv", barcodes)):
        if compressed:
            (folder / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
        else:
            (folder / name).write_text(text)


def test_cli_help_for_every_subcommand():
    for argv in ([], ["fit"], ["rank"], ["demo"]):
        code, out, err = run_cli(*argv, "--help")
        assert code == 0 and "usage: nmf_cv" in out
    script = subprocess.run([sys.executable, "nmf_cv.py", "--help"], text=True,
                            capture_output=True, cwd=os.path.dirname(nmf_cv.__file__))
    assert script.returncode == 0 and "fit" in script.stdout and "rank" in script.stdout


def test_cli_compiles_once_says_so_and_reports_compile_time_apart(tmp_path):
    """With an empty numba cache, the first `python -m nmf_cv fit` compiles its kernels,
    says so once on stderr and reports the compile time apart from the fit's; the second
    run loads them from the cache (run as a module, the kernels are still the imported
    module's, which numba caches)."""
    np.savetxt(tmp_path / "x.csv", nmf_cv.make_planted(30, 20, 2, random_state=0),
               delimiter=",")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def fit(out):
        run = subprocess.run([sys.executable, "-m", "nmf_cv", "fit", str(tmp_path / "x.csv"),
                              "-k", "2", "--out", str(tmp_path / out)], env=env, text=True,
                             capture_output=True, cwd=os.path.dirname(nmf_cv.__file__))
        assert run.returncode == 0, run.stderr
        return run.stdout, run.stderr, json.loads((tmp_path / f"{out}_fit.json").read_text())

    out, err, first = fit("one")
    assert err.count("compiling numba kernels") == 1
    assert first["compile_time_s"] > 0 and "compiling" in out
    out, err, second = fit("two")
    assert "compiling" not in err + out and second["compile_time_s"] == 0.0


def test_cli_fit_writes_labelled_factors_and_summary(tmp_path):
    import csv
    import json

    X = nmf_cv.make_planted(12, 8, 2, noise=0.05, missing=0.1, random_state=3)
    lines = ["id," + ",".join(f"s{j}" for j in range(8))]
    lines += [f"g{i}," + ",".join("NA" if np.isnan(v) else repr(float(v)) for v in row)
              for i, row in enumerate(X)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli("fit", path, "-k", 2, "--out", tmp_path / "res", "--seed", 4)
    assert code == 0, err
    ref = nmf_cv.fit_nmf(X, 2, max_iter=2000, tol=1e-6, random_state=4)
    with open(tmp_path / "res_W.csv") as handle:
        W_rows = list(csv.reader(handle))
    with open(tmp_path / "res_H.csv") as handle:
        H_rows = list(csv.reader(handle))
    assert W_rows[0] == ["", "component_1", "component_2"]
    assert [r[0] for r in W_rows[1:]] == [f"g{i}" for i in range(12)]
    assert H_rows[0] == [""] + [f"s{j}" for j in range(8)]
    np.testing.assert_allclose(np.array([r[1:] for r in W_rows[1:]], float), ref.W,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.array([r[1:] for r in H_rows[1:]], float), ref.H,
                               rtol=1e-12, atol=1e-14)
    summary = json.loads((tmp_path / "res_fit.json").read_text())
    assert summary["relative_error"] == pytest.approx(ref.relative_error, rel=1e-12)
    assert summary["n_iter"] == ref.n_iter and summary["shape"] == [12, 8]
    assert summary["missing_fraction"] == pytest.approx(np.isnan(X).mean())


def test_cli_fit_runs_resample_the_samples_axis_and_write_in_the_input_orientation(tmp_path):
    """fit --runs resamples the samples: by default the columns of a text file (genes x
    samples, as rank's consensus and stability read it), fitted as X' and written back as
    W (rows x k) and H (k x columns); --samples rows fits X itself. --normalize-usage scales
    each sample's usages (here H's columns), with --runs or without."""
    X = nmf_cv.make_planted(30, 12, 2, noise=0.05, random_state=6)
    path = tmp_path / "genes.csv"
    path.write_text("\n".join(["id," + ",".join(f"s{j}" for j in range(12))]
                              + [f"g{i}," + ",".join(map(repr, row.tolist()))
                                 for i, row in enumerate(X)]) + "\n")
    kw = dict(n_runs=3, init="nndsvda", max_iter=200, tol=1e-6, random_state=0)
    fit = ["fit", path, "-k", 2, "--runs", 3, "--max-iter", 200]

    def written(prefix):
        W, rows, names = nmf_cv.read_matrix(str(tmp_path / f"{prefix}_W.csv"))
        H, names_h, cols = nmf_cv.read_matrix(str(tmp_path / f"{prefix}_H.csv"))
        assert list(rows) == [f"g{i}" for i in range(30)] and list(names) == list(names_h)
        assert list(cols) == [f"s{j}" for j in range(12)]
        summary = json.loads((tmp_path / f"{prefix}_fit.json").read_text())
        return W, H, summary

    for prefix, extra, ref in (
            ("columns", [], nmf_cv.fit_nmf(X.T, 2, **kw)),
            ("rows", ["--samples", "rows"], nmf_cv.fit_nmf(X, 2, **kw))):
        code, _, err = run_cli(*fit, *extra, "--out", tmp_path / prefix)
        assert code == 0, err
        W, H, summary = written(prefix)
        W_ref, H_ref = (ref.H.T, ref.W.T) if prefix == "columns" else (ref.W, ref.H)
        assert_allclose(W, W_ref, rtol=1e-12, atol=1e-14)
        assert_allclose(H, H_ref, rtol=1e-12, atol=1e-14)
        assert summary["samples"] == prefix and summary["shape"] == [30, 12]
        stability = nmf_cv.read_matrix(str(tmp_path / f"{prefix}_stability.csv"))[0]
        assert_allclose(stability[:, 0], ref.component_stability, rtol=1e-12)
    code, _, err = run_cli(*fit, "--normalize-usage", "--out", tmp_path / "usage")
    assert code == 0, err
    W, H, _ = written("usage")
    assert_allclose(H.sum(axis=0), 1.0, rtol=1e-12)
    assert_allclose(W, written("columns")[0], rtol=1e-12, atol=1e-14)
    code, _, err = run_cli("fit", path, "-k", 2, "--normalize-usage", "--out", tmp_path / "one")
    assert code == 0, err
    W, H, _ = written("one")  # a single fit: of X, each sample's usages scaled all the same
    ref = nmf_cv.fit_nmf(X, 2, init="nndsvda", max_iter=2000, tol=1e-6, random_state=0)
    assert_allclose(H, ref.H / ref.H.sum(axis=0), rtol=1e-12)
    assert_allclose(W, ref.W, rtol=1e-12, atol=1e-14)


def test_cli_rank_prints_table_and_saves_report(tmp_path):
    import json

    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=5)
    np.save(tmp_path / "x.npy", X)
    code, out, err = run_cli("rank", tmp_path / "x.npy", "--ranks", "1:4", "--folds", 3,
                             "--criteria", "prior,cv,bicv", "--out", tmp_path / "x")
    assert code == 0, err
    report = json.loads((tmp_path / "x_rank.json").read_text())
    ref = nmf_cv.choose_rank(X, [1, 2, 3, 4], ("prior", "cv", "bicv"), random_state=0,
                             progress=False, cv_kwargs={"n_folds": 3})
    assert report["suggestions"] == json.loads(json.dumps(ref.suggestions))
    assert report["columns"]["PRESS"] == pytest.approx(
        {str(k): v for k, v in ref.columns()["PRESS"].items()}, rel=1e-12)
    assert "suggested k by cross-validated PRESS (smallest rank within 1 SE of the best): 2" in out
    assert (tmp_path / "x_rank.png").stat().st_size > 10_000


def test_cli_rank_options_reach_the_criteria_and_the_json(tmp_path):
    """--repeats, --restarts, --ridge and --max-iter change the fits as the same arguments
    to choose_rank do, and the JSON records every argument needed to repeat the run."""
    import json

    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=5)
    np.save(tmp_path / "x.npy", X)
    code, out, err = run_cli("rank", tmp_path / "x.npy", "--ranks", "1:3", "--folds", 3,
                             "--criteria", "cv,randomized", "--repeats", 2, "--restarts", 2,
                             "--ridge", 0.05, "--max-iter", 300, "--seed", 4,
                             "--out", tmp_path / "x")
    assert code == 0, err
    report = json.loads((tmp_path / "x_rank.json").read_text())
    fit = {"max_iter": 300}
    ref = nmf_cv.choose_rank(X, [1, 2, 3], ("cv", "randomized"), random_state=4,
                             n_restarts=2, progress=False, randomized_kwargs=fit,
                             cv_kwargs={"n_folds": 3, "n_repeats": 2, "ridge": 0.05, **fit})
    default = nmf_cv.choose_rank(X, [1, 2, 3], ("cv",), random_state=4, progress=False,
                                 cv_kwargs={"n_folds": 3})
    for name in ("PRESS", "RSS"):
        assert report["columns"][name] == pytest.approx(
            {str(k): v for k, v in ref.columns()[name].items()}, rel=1e-12)
    assert report["columns"]["PRESS"] != pytest.approx(
        {str(k): v for k, v in default.columns()["PRESS"].items()}, rel=1e-6)
    assert report["arguments"] == {
        "file": str(tmp_path / "x.npy"), "layer": None, "ranks": [1, 2, 3],
        "criteria": ["cv", "randomized"], "folds": 3, "repeats": 2, "restarts": 2,
        "ridge": 0.05, "max_iter": 300, "runs": "auto",
        "stability_runs": 20, "samples": "columns", "loss": "frobenius", "seed": 4, "jobs": 1}


def test_cli_rank_with_the_stability_criterion(tmp_path):
    import json

    X = nmf_cv.make_planted(120, 60, 3, noise=0.05, random_state=1)
    np.save(tmp_path / "x.npy", X)
    code, out, err = run_cli("rank", tmp_path / "x.npy", "--ranks", "2:4", "--criteria",
                             "stability", "--stability-runs", 6, "--out", tmp_path / "x")
    assert code == 0, err
    report = json.loads((tmp_path / "x_rank.json").read_text())
    ref = nmf_cv.stability(X, [2, 3, 4], n_runs=6, progress=False,
                           random_state=np.random.SeedSequence(0).spawn(5)[4])
    assert report["suggestions"] == {"stability": ref.best_rank} == {"stability": 3}
    assert report["columns"]["stability"] == pytest.approx(
        dict(zip(["2", "3", "4"], ref.min_silhouette.tolist())), rel=1e-12)
    assert report["arguments"]["stability_runs"] == 6
    assert "suggested k by component stability (largest k whose components reproduce): 3" \
        in out


def test_cli_rank_samples_in_rows_are_what_consensus_clusters_and_stability_resamples(
        tmp_path):
    """--samples rows: consensus clusters X's rows and stability resamples them (its
    components are H's rows), as the library's axis="rows"; by default (columns) the
    stability numbers of the same data differ."""
    import json

    X = nmf_cv.make_planted(36, 90, 3, noise=0.05, random_state=2)
    np.save(tmp_path / "x.npy", X)
    kw = dict(random_state=0, progress=False, consensus_kwargs={"n_runs": 4, "axis": "rows"},
              stability_kwargs={"n_runs": 4, "axis": "rows"})
    ref = nmf_cv.choose_rank(X, [2, 3, 4], ("cophenetic", "stability"), **kw)
    code, out, err = run_cli("rank", tmp_path / "x.npy", "--ranks", "2:4", "--criteria",
                             "cophenetic,stability", "--runs", 4, "--stability-runs", 4,
                             "--samples", "rows", "--out", tmp_path / "x")
    assert code == 0, err
    report = json.loads((tmp_path / "x_rank.json").read_text())
    assert report["arguments"]["samples"] == "rows"
    for name in ("cophenetic", "stability"):
        assert report["columns"][name] == pytest.approx(
            {str(k): v for k, v in ref.columns()[name].items()}, rel=1e-12)
    code, out, err = run_cli("rank", tmp_path / "x.npy", "--ranks", "2:4", "--criteria",
                             "stability", "--stability-runs", 4, "--out", tmp_path / "y")
    assert code == 0, err
    default = json.loads((tmp_path / "y_rank.json").read_text())
    assert default["arguments"]["samples"] == "columns"
    assert default["columns"]["stability"] != pytest.approx(report["columns"]["stability"])


def test_cli_rank_checkpoint_interrupted_and_rerun_gives_the_same_json(tmp_path):
    import signal
    import time

    X = ckpt_data("cli")
    np.savetxt(tmp_path / "data.csv", X, delimiter=",")
    argv = ["rank", tmp_path / "data.csv", "--ranks", "1:6", "--criteria", "cv,bicv"]
    code, _, err = run_cli(*argv, "--out", tmp_path / "one")
    assert code == 0, err
    proc = subprocess.Popen([sys.executable, "-m", "nmf_cv", *map(str, argv), "--out",
                             tmp_path / "two", "--checkpoint", tmp_path / "ck"],
                            cwd=os.path.dirname(nmf_cv.__file__), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while len(records(tmp_path / "ck")) < 8:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume" in err, err
    code, out, err = run_cli("report", tmp_path / "ck", "--out", tmp_path / "part")
    assert code == 0, err
    assert out.splitlines()[0].split()[0] == "k" and "unfinished, no suggestion" in out
    assert json.loads((tmp_path / "part_rank.json").read_text())["unfinished"]
    code, _, err = run_cli(*argv, "--out", tmp_path / "two", "--checkpoint", tmp_path / "ck")
    assert code == 0, err
    one = json.loads((tmp_path / "one_rank.json").read_text())
    two = json.loads((tmp_path / "two_rank.json").read_text())
    assert one == two
    after = json_roundtrip(nmf_cv.report_from_checkpoint(tmp_path / "ck").to_dict())
    assert after["unfinished"] == {}  # in this process: the CLI's report ran above
    for key in ("suggestions", "columns", "recommendation", "cv", "bicv"):
        assert after[key] == two[key], key


def test_cli_stopped_between_stages_still_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C between two stages (no stage to explain itself) with --checkpoint: the line
    still names the checkpoint and says to resume; without one it just says stopped."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(nmf_cv, "_cli_rank", interrupted)
    np.savetxt(tmp_path / "x.csv", np.ones((4, 3)), delimiter=",")
    argv = ["rank", str(tmp_path / "x.csv"), "--ranks", "1:2"]
    assert nmf_cv.main([*argv, "--checkpoint", str(tmp_path / "ck")]) == 130
    err = capsys.readouterr().err
    assert "resume" in err and str(tmp_path / "ck") in err and len(err.splitlines()) == 1
    assert nmf_cv.main(argv) == 130
    assert capsys.readouterr().err.strip() == "nmf_cv rank: stopped"


def test_cli_demo_saves_its_dashboard(tmp_path):
    import json

    code, out, err = run_cli("demo", "--rows", 50, "--cols", 30, "--rank", 2, "--criteria",
                             "prior,cv,bicv", "--out", tmp_path)
    assert code == 0, err
    assert "hals" in out and "relative error" in out and "suggested k by" in out
    report = json.loads((tmp_path / "demo_rank.json").read_text())
    assert report["suggestions"]["cv"] == 2 and report["ranks"] == [1, 2, 3, 4]
    assert (tmp_path / "demo_rank.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["fit", "no_such_file.csv", "-k", "2"], "No such file"),
    (["fit", "{neg}", "-k", "1"], "negative"),
    (["fit", "{good}", "-k", "9"], "n_components"),
    (["rank", "{good}", "--ranks", "0:3"], "n_components must be in 1..3"),
    (["rank", "{good}", "--ranks", "2:x"], "FIRST:LAST"),
    (["rank", "{good}", "--ranks", "1:2", "--criteria", "cv,magic"], "unknown criteria"),
    (["fit", "{text}", "-k", "1"], "is not a number"),
    (["rank", "{damaged}", "--ranks", "1:2"], "not a readable sparse matrix"),
    (["rank", "{zeros}", "--ranks", "1:2"], "nothing to factor"),
    (["rank", "{folder}", "--ranks", "1:2"], "without matrix.mtx"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, argv, message):
    (tmp_path / "neg.csv").write_text("1,2\n3,-4\n")
    (tmp_path / "good.csv").write_text("1,2,3\n3,4,5\n6,7,9\n")
    (tmp_path / "text.csv").write_text("a,b\n1,2\n3,oops\n")
    (tmp_path / "zeros.csv").write_text("0,0,0\n0,0,0\n0,0,0\n")
    sp.save_npz(tmp_path / "whole.npz", sp.random(30, 20, density=0.3, format="csr"))
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "damaged.npz").write_bytes(whole[:len(whole) // 2])  # a zip cut short
    (tmp_path / "folder").mkdir()
    argv = [a.format(neg=tmp_path / "neg.csv", good=tmp_path / "good.csv",
                     text=tmp_path / "text.csv", damaged=tmp_path / "damaged.npz",
                     zeros=tmp_path / "zeros.csv", folder=tmp_path / "folder") for a in argv]
    code, out, err = run_cli(*argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_read_matrix_detects_labels_and_missing_cells(tmp_path):
    cases = {
        "labelled.csv": "gene,s1,s2,s3\ng1,1,NA,3\ng2,4,5,\ng3,7,8,9\n",
        "r_style.csv": '"s1","s2","s3"\n"g1",1,NaN,3\n"g2",4,5,?\n"g3",7,8,9\n',
        "plain.tsv": "1\t\t3\n4\t5\tnan\n7\t8\t9\n",
        "spaces.txt": "1 NA 3\n4 5 null\n7 8 9\n",
        "semicolons.csv": "s1;s2;s3\n1;N/A;3\n4;5;\n7;8;9\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        X, rows, cols = nmf_cv.read_matrix(str(tmp_path / name))
        assert X.shape == (3, 3), name
        assert np.isnan(X[0, 1]) and X[2, 2] == 9.0 and X[1, 0] == 4.0, name
        labelled = name in ("labelled.csv", "r_style.csv")
        assert rows == (["g1", "g2", "g3"] if labelled else None), name
        assert cols == (["s1", "s2", "s3"] if name != "plain.tsv" and name != "spaces.txt"
                        else None), name
    np.save(tmp_path / "m.npy", np.arange(6.0).reshape(2, 3))
    X, rows, cols = nmf_cv.read_matrix(str(tmp_path / "m.npy"))
    np.testing.assert_array_equal(X, np.arange(6.0).reshape(2, 3))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x4\n")
    with pytest.raises(ValueError, match=r"line 3, column 2: 'x4' is not a number"):
        nmf_cv.read_matrix(str(tmp_path / "bad.csv"))
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(ValueError, match="line 2: 2 cells, expected 3"):
        nmf_cv.read_matrix(str(tmp_path / "ragged.csv"))


def test_cli_rank_reads_sparse_mtx_and_npz(tmp_path):
    """Matrix Market and scipy .npz files are read sparse (CSR) and give the report Python
    gives for the same matrix."""
    import json

    import scipy.io

    S = sp.csr_matrix(sparse_counts(60, 40, 2, 6))
    scipy.io.mmwrite(tmp_path / "m.mtx", S)
    sp.save_npz(tmp_path / "m.npz", S)
    ref = nmf_cv.choose_rank(S, [1, 2, 3], ("cv",), random_state=0, progress=False,
                             cv_kwargs={"n_folds": 3, "loss": "kl"})
    for name in ("m.mtx", "m.npz"):
        X, rows, cols = nmf_cv.read_matrix(str(tmp_path / name))
        assert sp.issparse(X) and (X != S).nnz == 0 and rows is None and cols is None
        code, out, err = run_cli("rank", tmp_path / name, "--ranks", "1:3", "--folds", 3,
                                 "--loss", "kl", "--criteria", "cv", "--out",
                                 tmp_path / name.replace(".", "_"))
        assert code == 0, err
        report = json.loads((tmp_path / f"{name.replace('.', '_')}_rank.json").read_text())
        assert report["columns"]["PRESS"] == pytest.approx(
            {str(k): v for k, v in ref.columns()["PRESS"].items()}, rel=1e-12)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        nmf_cv.read_matrix(str(tmp_path / "bad.npz"))


def write_h5ad(path, X, counts):
    """An AnnData file: X dense (log counts), the counts as a sparse layer, named cells and
    genes."""
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    adata = anndata.AnnData(
        X=np.log1p(counts).astype(np.float32),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(counts.shape[1])]))
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.write_h5ad(path)
    return adata


def test_read_matrix_reads_h5ad_x_or_a_layer_with_names(tmp_path):
    counts = sparse_counts(30, 20, 2, seed=4, density_mean=1.0)
    write_h5ad(tmp_path / "cells.h5ad", None, counts)
    X, rows, cols = nmf_cv.read_matrix(tmp_path / "cells.h5ad", layer="counts")
    assert sp.isspmatrix_csr(X) and X.dtype == np.float64
    assert_array_equal(X.toarray(), counts)
    assert rows == [f"cell{i}" for i in range(30)] and cols == [f"gene{j}" for j in range(20)]
    X, _, _ = nmf_cv.read_matrix(tmp_path / "cells.h5ad")
    assert isinstance(X, np.ndarray) and X.dtype == np.float32
    assert_allclose(X, np.log1p(counts), rtol=1e-6)
    with pytest.raises(ValueError, match="no layer 'raw'; its layers: counts"):
        nmf_cv.read_matrix(tmp_path / "cells.h5ad", layer="raw")
    with pytest.raises(ValueError, match="applies to .h5ad files only"):
        nmf_cv.read_matrix(tmp_path / "x.npy", layer="counts")


def test_cli_h5ad_rank_and_consensus_fit_write_named_outputs(tmp_path, capsys, monkeypatch):
    """rank and fit on an .h5ad layer; fit --runs writes the consensus (W named by cell, rows
    summing to 1 with --normalize-usage, H's rows the consensus components), each
    component's stability, and a copy of the file with obsm/varm; without anndata, one line
    naming it."""
    anndata = pytest.importorskip("anndata")
    counts = sparse_counts(60, 40, 3, seed=5, density_mean=1.5)
    write_h5ad(tmp_path / "cells.h5ad", None, counts)
    path, out = tmp_path / "cells.h5ad", tmp_path / "o"
    assert nmf_cv.main(["rank", str(path), "--layer", "counts", "--ranks", "1:3", "--criteria",
                        "cv", "--loss", "kl", "--folds", "3", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "o_rank.json").read_text())
    assert report["row_labels"][0] == "cell0" and report["arguments"]["layer"] == "counts"
    assert report["arguments"]["samples"] == "rows"  # cells x genes: the cells are the samples
    assert report["recommended_rank"] == (None if "cv" in report["edges"] else
                                          report["suggestions"]["cv"])
    assert report["recommendation"].startswith(("Recommended k", "No recommended k"))
    assert nmf_cv.main(["fit", str(path), "--layer", "counts", "-k", "3", "--loss", "kl",
                        "--runs", "4", "--normalize-usage", "--format", "tsv",
                        "--write-h5ad", "--out", str(out)]) == 0
    ref = nmf_cv.fit_nmf(sp.csr_matrix(counts), 3, loss="kl", n_runs=4, random_state=0,
                         max_iter=2000, tol=1e-6)
    W = np.loadtxt(tmp_path / "o_W.tsv", delimiter="\t", skiprows=1, usecols=(1, 2, 3))
    assert (tmp_path / "o_W.tsv").read_text().splitlines()[1].startswith("cell0\t")
    sums = ref.W.sum(axis=1, keepdims=True)  # a cell without counts has no usage: zeros
    assert_allclose(W, ref.W / np.where(sums > 0, sums, 1.0), rtol=1e-10)
    assert_allclose(W.sum(axis=1)[sums[:, 0] > 0], 1.0)
    H = np.loadtxt(tmp_path / "o_H.tsv", delimiter="\t", skiprows=1, usecols=range(1, 41))
    assert_allclose(H, ref.H, rtol=1e-10)
    stab = (tmp_path / "o_stability.tsv").read_text().splitlines()
    assert stab[0] == "\tstability\ttotal_usage" and len(stab) == 4
    assert float(stab[1].split("\t")[1]) == pytest.approx(ref.component_stability[0])
    summary = json.loads((tmp_path / "o_fit.json").read_text())
    assert summary["n_runs"] == 4 and summary["usage_normalized"] is True
    copy = anndata.read_h5ad(tmp_path / "o_nmf.h5ad")
    assert_allclose(copy.obsm["X_nmf"], ref.W, rtol=1e-10)
    assert copy.varm["nmf_components"].shape == (40, 3)
    assert copy.uns["nmf"]["n_runs"] == 4 and list(copy.obs_names[:1]) == ["cell0"]
    capsys.readouterr()
    assert nmf_cv.main(["fit", str(path), "-k", "2", "--runs", "2", "--samples", "columns",
                        "--write-h5ad"]) == 2
    assert capsys.readouterr().err == ("nmf_cv fit: error: --write-h5ad needs --samples rows "
                                       "(an .h5ad file's cells)\n")
    monkeypatch.setitem(sys.modules, "anndata", None)  # as if not installed
    assert nmf_cv.main(["fit", str(path), "-k", "2"]) == 2
    err = capsys.readouterr().err
    assert err == ("nmf_cv fit: error: .h5ad files need the anndata package: pip install "
                   "anndata\n")


def test_cli_dask_scheduler_runs_rank_and_fit_runs_as_a_serial_run_does(tmp_path, capsys,
                                                                         monkeypatch):
    """rank and fit --runs on a LocalCluster of two worker processes, through --dask ADDRESS:
    the JSON and the factors equal a serial run's (up to rounding: BLAS threads differ; a
    process pool's equal the serial ones elsewhere); --dask with --jobs, or without the
    distributed package, is one line."""
    distributed = pytest.importorskip("distributed")
    X = nmf_cv.make_planted(40, 30, 2, noise=0.05, random_state=7)
    np.save(tmp_path / "x.npy", X)
    rank = ["rank", str(tmp_path / "x.npy"), "--ranks", "1:3", "--criteria", "cv,bicv",
            "--folds", "3"]
    fit = ["fit", str(tmp_path / "x.npy"), "-k", "2", "--runs", "4"]
    out = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        sched = tmp_path / "sched.json"  # a scheduler file, as `dask scheduler` writes one
        sched.write_text(json.dumps({"address": cluster.scheduler_address}))
        for name, extra, extra_fit in (
                ("dask", ["--dask", cluster.scheduler_address], ["--dask", str(sched)]),
                ("serial", [], [])):
            assert nmf_cv.main(rank + extra + ["--out", str(tmp_path / name)]) == 0
            assert nmf_cv.main(fit + extra_fit + ["--out", str(tmp_path / name)]) == 0
            out[name] = (json.loads((tmp_path / f"{name}_rank.json").read_text()),
                         np.loadtxt(tmp_path / f"{name}_H.csv", delimiter=",", skiprows=1,
                                    usecols=range(1, 31)))
    assert out["dask"][0]["suggestions"] == out["serial"][0]["suggestions"]
    assert_allclose(np.array(out["dask"][0]["cv"]["press"], dtype=float),
                    np.array(out["serial"][0]["cv"]["press"], dtype=float), rtol=1e-9)
    assert_allclose(out["dask"][1], out["serial"][1], rtol=1e-7, atol=1e-12)
    capsys.readouterr()
    assert nmf_cv.main(rank + ["--dask", "tcp://127.0.0.1:1", "--jobs", "2"]) == 2
    assert "--dask and --jobs exclude each other" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert nmf_cv.main(fit + ["--dask", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == ("nmf_cv fit: error: --dask needs the distributed "
                                       "package: pip install distributed\n")


def test_cli_reads_a_10x_folder_keeping_gene_and_cell_labels(tmp_path):
    import json

    S = sp.csr_matrix(sparse_counts(40, 30, 2, 8))
    genes = [f"ENSG{i:05d}" for i in range(40)]
    cells = [f"AAAC{j:04d}-1" for j in range(30)]
    write_10x(tmp_path / "v3", S, genes, cells)
    write_10x(tmp_path / "v2", S, genes, cells, compressed=False)
    for folder in ("v2", "v3"):
        X, rows, cols = nmf_cv.read_matrix(tmp_path / folder)
        assert sp.issparse(X) and (X != S).nnz == 0 and rows == genes and cols == cells
    code, out, err = run_cli("rank", tmp_path / "v3", "--ranks", "1:3", "--folds", 3,
                             "--loss", "kl", "--criteria", "cv", "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r_rank.json").read_text())
    assert report["row_labels"] == genes and report["col_labels"] == cells
    code, out, err = run_cli("fit", tmp_path / "v3", "-k", "2", "--loss", "kl", "--out",
                             tmp_path / "f")
    assert code == 0, err
    assert (tmp_path / "f_W.csv").read_text().splitlines()[1].startswith("ENSG00000,")
    (tmp_path / "v3" / "barcodes.tsv.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 8)
    with pytest.raises(ValueError, match="barcodes.tsv.gz"):
        nmf_cv.read_matrix(tmp_path / "v3")

"""The bf16 kNN mode (bf16 candidate search, exact fp32 re-rank) against float64 brute force.

The reference answer is a float64 brute force (difference form) on the inputs as knn sees them: the
float32-rounded arrays (``brute`` takes the same float32 arrays and only widens them), so "exact" means
equal to the float64 distances of the float32 data, up to the float32 rounding of the output.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from safe_train.detection.knn import knn

K = importlib.import_module("safe_train.detection.knn")  # the module (the package re-exports the function)
B = importlib.import_module("safe_train.detection.knn_bf16")  # the bf16 path's internals


def brute(q: np.ndarray, r: np.ndarray, k: int, metric: str, excl: list[set[int]] | None):
    """Sorted admissible distances (float64, difference form) and the full distance matrix."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        r64 = r64 / np.linalg.norm(r64, axis=1, keepdims=True)
    full = np.concatenate([((q64[s:s + 128, None, :] - r64[None, :, :]) ** 2).sum(-1)
                           for s in range(0, len(q64), 128)])
    full = full / 2 if metric == "cosine" else np.sqrt(full)
    if excl is not None:
        for i, e in enumerate(excl):
            full[i, [j for j in e if j >= 0]] = np.inf
    dist = np.sort(full, axis=1)[:, :k]
    dist = np.pad(dist, ((0, 0), (0, k - dist.shape[1])), constant_values=np.inf)  # k > len(r)
    return dist, full


def assert_exact(d: torch.Tensor, i: torch.Tensor, q, r, k, metric, excl=None, rtol=1e-5, atol=1e-6):
    """Distances equal the brute-force ones; every index is admissible, unique, at its reported distance;
    without ties (distinct distances) the index lists equal brute force's order too."""
    exp, full = brute(q, r, k, metric, excl)
    d, i = d.numpy().astype(np.float64), i.numpy()
    finite = np.isfinite(exp)
    assert (np.isfinite(d) == finite).all() and ((i >= 0) == finite).all()
    np.testing.assert_allclose(d[finite], exp[finite], rtol=rtol, atol=atol)
    rows = np.nonzero(finite)[0]
    at = full[rows, i[finite]]
    np.testing.assert_allclose(at, exp[finite], rtol=rtol, atol=atol)  # also: never an excluded index
    for row, idx in zip(i, finite, strict=True):
        assert len(set(row[idx].tolist())) == idx.sum()


def run(q, r, k, metric, **kwargs):
    return knn(q, r, k, metric=metric, precision="bf16", **kwargs)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def clustered(rng, n, d, n_clusters=8, scale=3.0, spread=1.0, offset=0.0):
    centers = rng.normal(scale=scale, size=(n_clusters, d))
    x = offset + centers[rng.integers(0, n_clusters, n)] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_self_join_with_symmetric_exclusions(metric, rng):
    x = clustered(rng, 1000, 24)
    partner = np.where(np.arange(1000) < 500, np.arange(1000) + 500, np.arange(1000) - 500)[:, None]
    excl = [{i, int(partner[i, 0])} for i in range(1000)]
    for tile in (50_000, 1 << 23):  # several tiles (with tails) and a single block
        d, i = run(x, x, 10, metric, exclude_self=True, exclude=partner, max_tile_elements=tile)
        assert_exact(d, i, x, x, 10, metric, excl)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_general_path_with_exclusions(metric, rng):
    r = clustered(rng, 1500, 16, offset=50.0)  # a large common offset: centring must take care of it
    q = clustered(rng, 300, 16, offset=50.0)
    ex = rng.integers(-1, 1500, size=(300, 3))  # asymmetric, with -1 = none
    excl = [set(row.tolist()) for row in ex]
    for tile in (20_000, 1 << 23):
        d, i = run(q, r, 7, metric, exclude=ex, max_tile_elements=tile)
        assert_exact(d, i, q, r, 7, metric, excl)


def count_fallback_rows(monkeypatch) -> list[int]:
    """Record the number of rows of every call of the bf16 path's exact fallback."""
    calls = []
    fallback = B._bf16_fallback
    monkeypatch.setattr(B, "_bf16_fallback", lambda *a, **kw: calls.append(len(a[2])) or fallback(*a, **kw))
    return calls


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_near_ties_and_duplicates(metric, rng, monkeypatch):
    """Near-duplicates (the fp32 expansion |q|^2 + |r|^2 - 2 q.r cancels there), exact duplicates, and a
    group of copies larger than the candidate list (the check must reject it: retries, then the exact
    fallback)."""
    calls = count_fallback_rows(monkeypatch)
    base = clustered(rng, 300, 32, spread=0.2)
    near = base[:100] + 1e-4 * rng.normal(size=(100, 32)).astype(np.float32)
    copies = np.repeat(base[100:101], 320, axis=0)  # > the widest list (k + 128): fallback
    dups = np.repeat(base[101:106], 12, axis=0)
    x = np.concatenate([base, near, copies, dups])
    d, i = run(x, x, 5, metric, exclude_self=True)
    assert_exact(d, i, x, x, 5, metric, [{j} for j in range(len(x))], atol=1e-5)
    assert calls and calls[0] < 400  # the copies (and their close neighbours) only
    q = x[::7] + 1e-3
    d, i = run(q, x, 5, metric)
    assert_exact(d, i, q, x, 5, metric, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_fallback_is_exact_with_an_offset(offset, rng, monkeypatch):
    """300 references at nearly the same distance (squared: 1 + [0, 4e-3]) from the query: more
    near-ties than the widest list, so the row goes to the fallback, which must stay exact under a large
    common offset (an |q|^2 + |r|^2 - 2 q.r expansion of uncentred data cancels there)."""
    calls = count_fallback_rows(monkeypatch)
    d = 16
    dirs = rng.normal(size=(300, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    near = dirs * np.sqrt(1 + rng.uniform(0, 4e-3, 300))[:, None]
    far = rng.normal(size=(300, d)) * 3 + 10
    r = (np.concatenate([near, far]) + offset).astype(np.float32)
    q = np.full((2, d), offset, dtype=np.float32)
    ex = np.array([[-1], [int(np.argmin(((r - q[1]) ** 2).sum(1)))]])  # the second query drops its nearest
    d_, i = run(q, r, 5, "l2", exclude=ex)
    assert calls == [2]
    assert_exact(d_, i, q, r, 5, "l2", [set(row.tolist()) for row in ex], rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_fallback_alone_is_exact(metric, rng, monkeypatch):
    """Every row rejected by the check: the fallback alone gives the exact answer (general path and
    self-join, with exclusions)."""
    rerank = B._rerank
    monkeypatch.setattr(B, "_rerank", lambda *a, **kw: rerank(*a, **kw)._replace(exact=torch.zeros(
        len(a[2]), dtype=torch.bool)))
    calls = count_fallback_rows(monkeypatch)
    r = clustered(rng, 700, 12, offset=30.0)
    q = clustered(rng, 90, 12, offset=30.0)
    ex = rng.integers(-1, 700, size=(90, 2))
    for tile in (5_000, 1 << 23):
        d, i = run(q, r, 6, metric, exclude=ex, max_tile_elements=tile)
        assert_exact(d, i, q, r, 6, metric, [set(row.tolist()) for row in ex])
        d, i = run(r, r, 6, metric, exclude_self=True, max_tile_elements=tile)
        assert_exact(d, i, r, r, 6, metric, [{j} for j in range(700)])
    assert calls == [90, 700] * 2


def test_near_duplicates_are_accurate(rng):
    x = clustered(rng, 400, 64, offset=20.0)
    x[200:] = x[:200] + 1e-3 * rng.normal(size=(200, 64)).astype(np.float32)
    exp, _ = brute(x, x, 3, "l2", [{j} for j in range(400)])
    d16, _ = knn(x, x, 3, exclude_self=True, precision="bf16")
    assert d16.dtype == torch.float32
    assert (np.abs(d16.numpy() - exp) / exp).max() < 1e-6  # difference-form re-rank: no cancellation


@pytest.mark.parametrize("scale", [1e-20, 3e-20, 1e17, 1e19])
def test_tiny_and_huge_scales(scale, rng, monkeypatch):
    """Data far from 1 in magnitude: bf16 / AMX flush subnormals to zero and squared norms overflow
    unless the search runs in a power-of-two scaled frame (1e19: even the squared distances exceed fp32;
    the distances themselves do not)."""
    calls = count_fallback_rows(monkeypatch)
    x = (clustered(rng, 400, 32, offset=2.0).astype(np.float64) * scale).astype(np.float32)
    d, i = run(x, x, 4, "l2", exclude_self=True)
    assert_exact(d, i, x, x, 4, "l2", [{j} for j in range(400)], atol=0)
    q = x[::9] * np.float32(0.75)
    d, i = run(q, x, 4, "l2")
    assert_exact(d, i, q, x, 4, "l2", atol=0)
    assert not calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_inputs_raise(precision):
    x = np.random.default_rng(2).normal(size=(60, 4)).astype(np.float32)
    for bad, where in ((np.nan, "query"), (np.inf, "reference"), (-np.inf, "self")):
        q, r = x.copy(), x.copy()
        (r if where == "reference" else q)[7, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            if where == "self":
                knn(q, q, 3, exclude_self=True, precision=precision)
            else:
                knn(q, r, 3, precision=precision, metric="cosine")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exclusions_out_of_range_raise(precision):
    rng = np.random.default_rng(3)
    r = rng.normal(size=(50, 4)).astype(np.float32)
    q = r[:10] + 0.1
    for bad in (50, -2):
        ex = np.full((10, 1), -1)
        ex[4] = bad
        with pytest.raises(ValueError, match="exclude"):
            knn(q, r, 3, exclude=ex, precision=precision)
    ex = np.full((10, 1), 49)
    d, i = knn(q, r, 3, exclude=ex, precision=precision)
    assert_exact(d, i, q, r, 3, "l2", [{49}] * 10, atol=1e-4)  # (fp32's expansion: not exact)


def test_tiny_tiles_tails_and_padding(rng):
    x = rng.normal(size=(83, 5)).astype(np.float32)  # not a multiple of the group size
    for tile in (1, 7, 64, 4096):
        d, i = run(x, x, 6, "l2", exclude_self=True, max_tile_elements=tile)
        assert_exact(d, i, x, x, 6, "l2", [{j} for j in range(83)])
        q = x[:9] * 0.5
        d, i = run(q, x, 6, "l2", max_tile_elements=tile)
        assert_exact(d, i, q, x, 6, "l2")
    r = np.eye(3, dtype=np.float32)
    d, i = run(r, r, 4, "l2", exclude_self=True)
    assert (i[:, 2:] == -1).all() and torch.isinf(d[:, 2:]).all() and (i[:, :2] >= 0).all()


def test_error_bound_holds(rng):
    """The inequality the exactness rests on: |v - d2| <= E_q + RHO |v| for every pair of a bf16 block,
    in the centred and scaled frame of the search."""
    for scale, offset in ((1.0, 0.0), (1e3, 0.0), (1e-3, 5e-3), (1e-20, 0.0), (1e19, 3e19)):
        x = torch.from_numpy((clustered(rng, 600, 48, spread=0.05) * scale + offset).astype(np.float32))
        frame = B._frame(x, x, True)
        xc = frame.apply(x)
        assert float(torch.linalg.vector_norm(xc, dim=1).max()) <= 1
        sp = B._split(xc)
        v = B._bf16_gemm(B._form(sp, 0, 600, True), B._form(sp, 0, 600, False)).double()
        xd = xc.double()
        d2 = ((xd[:, None, :] - xd[None, :, :]) ** 2).sum(-1)
        e = B._error_bound(sp.norms, sp.norms, 48).double()[:, None]
        assert ((v - d2).abs() <= e + B.RHO * v.abs()).all()
        assert (e < 1e-4 * d2.max()).all()  # and it is not vacuous: the final bf16 rounding dominates


def test_bf16_search_needs_no_fallback_on_ordinary_data(rng, monkeypatch):
    """Blocks wide enough for 64+ groups (tile 2880 and a tail), no fallback."""
    calls = count_fallback_rows(monkeypatch)
    x = clustered(rng, 3000, 8)
    d, i = run(x, x, 10, "l2", exclude_self=True)
    assert not calls
    assert_exact(d, i, x, x, 10, "l2", [{j} for j in range(3000)])


@pytest.mark.parametrize("kp", [6, 72])
@pytest.mark.parametrize("shape", [(100, 130), (700, 2900)])
def test_prune_keeps_every_entry_that_can_enter(shape, kp):
    """Warm rows: exactly the entries below the threshold; cold rows: at least their kp smallest entries
    (with fewer than kp groups, e.g. kp = 72 at 2880 columns = 64 groups: exactly the entries up to the
    kp-th smallest); never an excluded (+inf) entry. Both block directions, negative keys, tails."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(-300, 3000, shape, dtype=torch.int16, generator=gen)
    keys[torch.rand(shape, generator=gen) < 0.05] = B.KEY_INF
    for dim in (1, 0):
        view = keys if dim == 1 else keys.T  # [queries, references]
        tau = torch.randint(-200, 300, (view.shape[0],), dtype=torch.int16, generator=gen)
        tau[::3] = B.KEY_EMPTY
        q, ref, key, grouped, lowest = B._prune(keys, tau, kp, dim)
        assert lowest == int(keys.min())
        assert not grouped or bool((q[1:] >= q[:-1]).all())
        assert torch.equal(view[q, ref], key) and (key < B.KEY_INF).all()
        got = torch.zeros(view.shape, dtype=torch.bool)
        got[q, ref] = True
        assert int(got.sum()) == q.numel()  # no duplicates
        warm = tau != B.KEY_EMPTY
        assert torch.equal(got[warm], view[warm] < tau[warm, None])
        kth = torch.kthvalue(view[~warm].int(), kp, dim=1).values[:, None]
        assert (got[~warm] | (view[~warm] >= kth)).all()  # every entry below the kp-th smallest
        assert ((got[~warm] & (view[~warm] <= kth)).sum(1) >= kp).all()  # and kp entries up to it
        if view.shape[1] // B.GROUP < kp:
            assert torch.equal(got[~warm], view[~warm] <= kth)


def test_precision_argument(monkeypatch):
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="precision"):
        knn(x, x, 3, precision="fp16")
    assert isinstance(K.bf16_is_fast("cpu"), bool) and not K.bf16_is_fast("cuda")
    d32, i32 = knn(x, x, 3, exclude_self=True, precision="fp32")
    ran = []

    def spy(name: str):
        real = getattr(K, name)
        return lambda *a, **kw: ran.append(name) or real(*a, **kw)

    for name in ("torch_knn_bf16", "_torch_knn_self"):
        monkeypatch.setattr(K, name, spy(name))

    def path(fast: bool, min_pairs: int, **kwargs) -> str:
        monkeypatch.setattr(K, "bf16_is_fast", lambda device=None: fast)
        monkeypatch.setattr(K, "AUTO_BF16_MIN_PAIRS", min_pairs)
        ran.clear()
        d, i = knn(x, x, 3, exclude_self=True, backend="torch", **kwargs)  # (backend="auto": test_knn_backend.py)
        np.testing.assert_array_equal(i.numpy(), i32.numpy())  # every path gives the exact neighbours
        np.testing.assert_allclose(d.numpy(), d32.numpy(), rtol=1e-5, atol=1e-6)
        return ran[0]

    assert path(True, 50 * 50) == "torch_knn_bf16"  # "auto": bf16 on a fast CPU for a large enough search
    assert path(True, 50 * 50 + 1) == "_torch_knn_self"  # smaller searches stay on fp32 (bf16 is slower there)
    assert path(False, 1) == "_torch_knn_self"  # no native bf16
    assert path(False, 10**12, precision="bf16") == "torch_knn_bf16"  # asked for explicitly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_brute_force(rng):
    x = clustered(rng, 800, 32)
    d, i = run(x, x, 8, "l2", exclude_self=True, device="cuda")
    assert_exact(d, i, x, x, 8, "l2", [{j} for j in range(800)])

"""k-nearest-neighbour search with two interchangeable backends.

``knn(query, reference, k, ...)`` returns, for every query row, the ``k`` smallest distances to the
rows of ``reference`` (ascending) and their reference indices. Distances are

- ``metric="l2"``: Euclidean, ``||q - r||`` (not squared);
- ``metric="cosine"``: ``1 - cos(q, r)``.

Excluding points: ``exclude`` is an ``[n, e]`` int64 array of reference indices that query ``i``
must never return (``-1`` = no exclusion); e.g. the query itself and its own caption when the query
is part of the reference. ``exclude_self=True`` is the shorthand ``exclude[i] = [i]``. Exclusion is
by index, never by distance, so exact duplicates of the query still count as neighbours.

If fewer than ``k`` admissible reference points exist, the missing entries are ``inf`` / ``-1``.

Backends:

- ``torch``: exact, tiled. Query and reference are processed in tiles whose distance block holds at
  most ``max_tile_elements`` entries, keeping a running top-k, so memory is O(tile + n·k), never
  O(n·m). Runs on CPU or CUDA (``device``). A self-join (the same tensor as query and reference with
  ``exclude_self`` and symmetric exclusions) computes each pair of tiles once and uses the block for
  both; the per-block top-k is a two-stage exact selection (see ``_block_topk``).
- ``faiss``: ``flat`` (exact, IndexFlatL2 / IndexFlatIP) or ``ivf`` (IndexIVFFlat, approximate:
  ``nlist`` inverted lists, ``nprobe`` visited per query). Uses faiss-gpu when it is importable and
  ``device`` is CUDA. Searches ``k + e`` neighbours and removes the excluded ones afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

METRICS = ("l2", "cosine")
BACKENDS = ("torch", "faiss")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_TILE_ELEMENTS = 1 << 23  # 8M distances = 32 MB of float32 per tile
REFERENCE_TILE = 8192


def _as_tensor(x: Array) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.detach().float()


def _exclusions(n: int, exclude: Array | None, exclude_self: bool) -> torch.Tensor | None:
    """The ``[n, e]`` exclusion matrix (or None)."""
    parts = []
    if exclude is not None:
        ex = torch.as_tensor(np.asarray(exclude) if isinstance(exclude, np.ndarray) else exclude).long()
        if ex.ndim == 1:
            ex = ex[:, None]
        if ex.shape[0] != n:
            raise ValueError(f"exclude has {ex.shape[0]} rows for {n} queries")
        parts.append(ex.cpu())
    if exclude_self:
        parts.append(torch.arange(n)[:, None])
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def knn(query: Array, reference: Array, k: int, *, metric: str = "l2", exclude: Array | None = None,
        exclude_self: bool = False, backend: str = "torch", device: str | torch.device | None = None,
        max_tile_elements: int = DEFAULT_TILE_ELEMENTS, index: str = "flat", nlist: int | None = None,
        nprobe: int = 8, seed: int = 0, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference rows of every query row: ``(distances [n, k] float32, indices [n, k] int64)``.

    Both outputs are on the CPU. See the module docstring for metrics, exclusion and backends.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose from {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown kNN precision {precision!r}; choose from {PRECISIONS}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, r = _as_tensor(query), _as_tensor(reference)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"query {tuple(q.shape)} and reference {tuple(r.shape)} must be 2-D with equal width")
    if exclude_self and q.shape[0] != r.shape[0]:
        raise ValueError("exclude_self needs the query to be the reference (same number of rows)")
    same = exclude_self and q.data_ptr() == r.data_ptr() and q.shape == r.shape and q.stride() == r.stride()
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        r = q if same else torch.nn.functional.normalize(r, dim=1)
    ex = _exclusions(q.shape[0], exclude, exclude_self)
    dev = torch.device(device) if device is not None else q.device
    bf16 = backend == "torch" and (precision == "bf16" or (precision == "auto" and bf16_is_fast(dev)))
    if bf16:
        sq_dist, idx = _torch_knn_bf16(q, r, k, ex, same and _is_symmetric(ex), device, max_tile_elements)
    elif backend == "torch" and same and _is_symmetric(ex):
        sq_dist, idx = _torch_knn_self(q, k, ex, device, max_tile_elements)
    elif backend == "torch":
        sq_dist, idx = _torch_knn(q, r, k, ex, device, max_tile_elements)
    else:
        sq_dist, idx = _faiss_knn(q, r, k, ex, device, index, nlist, nprobe, seed)
    sq_dist = sq_dist.clamp_min(0)
    dist = sq_dist / 2 if metric == "cosine" else sq_dist.sqrt()  # unit vectors: ||q-r||^2 = 2 (1 - cos)
    dist[idx < 0] = math.inf
    return dist, idx


def _torch_knn(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None,
               device: str | torch.device | None, max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared-L2 top-k by tiles: ``d2 = |q|^2 + |r|^2 - 2 q.r``, one tile of distances at a time."""
    device = torch.device(device) if device is not None else q.device
    n, m = q.shape[0], r.shape[0]
    kk = min(k, m)
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    if n == 0 or m == 0:
        return out_d, out_i
    r_tile = max(1, min(m, REFERENCE_TILE, max_tile_elements))
    q_tile = max(1, min(n, max_tile_elements // r_tile))
    r_dev = r.to(device)
    r_sq = (r_dev * r_dev).sum(1)
    for qs in range(0, n, q_tile):
        qe = min(n, qs + q_tile)
        qt = q[qs:qe].to(device)
        q_sq = (qt * qt).sum(1, keepdim=True)
        best_d = torch.full((qe - qs, kk), math.inf, device=device)
        best_i = torch.full((qe - qs, kk), -1, dtype=torch.long, device=device)
        for rs in range(0, m, r_tile):
            re_ = min(m, rs + r_tile)
            # -2 q.r + |r|^2 in one GEMM; |q|^2 is added to the k survivors only
            block = torch.addmm(r_sq[rs:re_].unsqueeze(0), qt, r_dev[rs:re_].T, alpha=-2.0)
            if ex is not None:
                _mask_exclusions(block, ex[qs:qe], 0, rs)
            best_d, best_i = _merge_topk(best_d, best_i, block, rs, kk)
        best_d = best_d + q_sq
        best_i[torch.isinf(best_d)] = -1
        out_d[qs:qe, :kk] = best_d.cpu()
        out_i[qs:qe, :kk] = best_i.cpu()
    return out_d, out_i


def _is_symmetric(ex: torch.Tensor | None) -> bool:
    """Whether "j is excluded for i" implies "i is excluded for j" (the self-join may then share blocks)."""
    if ex is None:
        return True
    rows = torch.arange(ex.shape[0])[:, None].expand_as(ex)
    valid = ex >= 0
    i, j = rows[valid], ex[valid]
    return bool((ex[j] == i[:, None]).any(dim=1).all())


def _mask_exclusions(block: torch.Tensor, ex: torch.Tensor | None, row_start: int, col_start: int) -> None:
    """Set ``block[i, j] = inf`` where reference ``col_start + j`` is excluded for query ``row_start + i``."""
    if ex is None:
        return
    local = ex[row_start:row_start + block.shape[0]].to(block.device) - col_start
    valid = (local >= 0) & (local < block.shape[1])
    rows = torch.arange(local.shape[0], device=block.device)[:, None].expand_as(local)
    block[rows[valid], local[valid]] = math.inf


def _torch_knn_self(x: torch.Tensor, k: int, ex: torch.Tensor | None, device: str | torch.device | None,
                    max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-join (query = reference, symmetric exclusions): each pair of tiles is multiplied once and
    its distance block serves both the rows (queries of tile I) and the columns (queries of tile J),
    halving the GEMM work of :func:`_torch_knn`."""
    device = torch.device(device) if device is not None else x.device
    n = x.shape[0]
    kk = min(k, n)
    tile = max(1, min(n, math.isqrt(max_tile_elements)))
    xd = x.to(device)
    sq = (xd * xd).sum(1)
    best_d = torch.full((n, kk), math.inf, device=device)
    best_i = torch.full((n, kk), -1, dtype=torch.long, device=device)
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        for j0 in range(i0, n, tile):
            j1 = min(n, j0 + tile)
            block = torch.addmm(sq[j0:j1].unsqueeze(0), xd[i0:i1], xd[j0:j1].T, alpha=-2.0)
            block += sq[i0:i1, None]
            _mask_exclusions(block, ex, i0, j0)
            best_d[i0:i1], best_i[i0:i1] = _merge_topk(best_d[i0:i1], best_i[i0:i1], block, j0, kk)
            if j0 != i0:
                best_d[j0:j1], best_i[j0:j1] = _merge_topk(best_d[j0:j1], best_i[j0:j1], block, i0, kk, dim=0)
    best_i[torch.isinf(best_d)] = -1
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    out_d[:, :kk], out_i[:, :kk] = best_d.cpu(), best_i.cpu()
    return out_d, out_i


GROUP = 32  # columns per group in the two-stage selection of _block_topk


def _block_topk(block: torch.Tensor, kk: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates that include the ``kk`` smallest entries along ``dim`` of ``block``, and their positions.

    Returns ``[other, c]`` tensors, ``c >= kk`` (for ``dim=0``: per column); the caller's top-k
    picks the final ``kk``. Two stages, because a top-k over the
    whole block costs as much as the GEMM that made it: the positions along ``dim`` are cut into
    ``size // GROUP`` strided groups (group g = {g, g + n_groups, g + 2 n_groups, ...}, so each
    group minimum is an element-wise minimum of contiguous slices, which vectorises). Fewer than
    ``kk`` groups can have a minimum below the kk-th smallest value, so the ``kk`` groups with the
    smallest minima contain all the ``kk`` smallest entries; the final top-k runs over
    ``kk * GROUP`` candidates only (done by the caller, merged with its running best). Along ``dim=0`` this needs no transposed copy of the block.
    """
    size, other = block.shape[dim], block.shape[1 - dim]
    n_groups = size // GROUP
    if n_groups < 4 * kk:
        d, i = torch.topk(block, min(kk, size), dim=dim, largest=False, sorted=False)
        return (d, i) if dim == 1 else (d.T, i.T)
    main = n_groups * GROUP
    if dim == 1:
        minima = block[:, :main].reshape(other, GROUP, n_groups).amin(dim=1)
    else:
        minima = block[:main].view(GROUP, n_groups, other).amin(dim=0).T
    _, groups = torch.topk(minima, kk, dim=1, largest=False, sorted=False)
    step = torch.arange(GROUP, device=block.device) * n_groups
    candidates = (groups[:, :, None] + step).reshape(other, -1)
    if main < size:
        tail = torch.arange(main, size, device=block.device).expand(other, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    if dim == 1:
        values = torch.gather(block, 1, candidates)
    else:
        values = torch.take(block, candidates * other + torch.arange(other, device=block.device)[:, None])
    return values, candidates


def _merge_topk(best_d: torch.Tensor, best_i: torch.Tensor, block: torch.Tensor, offset: int,
                kk: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k update: the block's own top-k along ``dim`` merged with the current best (kept sorted)."""
    d, i = _block_topk(block, min(kk, block.shape[dim]), dim)
    merged_d = torch.cat([best_d, d], dim=1)
    merged_i = torch.cat([best_i, i + offset], dim=1)
    best_d, pos = torch.topk(merged_d, kk, dim=1, largest=False, sorted=True)
    return best_d, torch.gather(merged_i, 1, pos)


# ------------------------------------------------------------------ bf16 candidate search + exact re-rank

KEY_INF = 0x7F80  # bfloat16 +inf read as int16: excluded entries; finite values stay below it
KEY_EMPTY = 0x7FFF  # an empty slot of a running candidate list (a NaN pattern, above KEY_INF)
RHO = 2.0**-8  # round-to-nearest to bfloat16: |x - bf16(x)| <= 2^-8 |bf16(x)|
CANDIDATE_MARGIN = 16  # candidates kept beyond k (grows x4 per retry for the rows the check rejects)
RETRIES = 2  # bf16 retries with a wider candidate list before the remaining rows go to the fp32 path


def bf16_is_fast(device: str | torch.device | None = None) -> bool:
    """Whether bfloat16 GEMMs are native on ``device``: AMX / AVX512-BF16 CPUs, CUDA GPUs with bf16.

    What ``precision="auto"`` switches on (CUDA only when asked for explicitly: its fp32 GEMM is not the
    bottleneck there and the speed-up is unmeasured)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _split3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x = hi + lo + res`` with ``hi, lo`` bfloat16 and the fp32 residual ``res`` (all subtractions exact)."""
    hi = x.bfloat16()
    rest = x - hi.float()
    lo = rest.bfloat16()
    return hi, lo, rest - lo.float()


def _augment(x: torch.Tensor, as_query: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The bf16 rows whose products are approximate squared distances, and the norms for the error bound.

    ``Q(q) . R(r) = -2 (qh.rh + qh.rl + ql.rh) + (sqh + sql) + (srh + srl)`` with ``s = |x|^2`` split
    into two bf16 numbers too; ``-2 qh`` is exact in bf16."""
    hi, lo, res = _split3(x)
    sq = (x * x).sum(1)
    s_hi = sq.bfloat16()
    s_lo = (sq - s_hi.float()).bfloat16()
    one = torch.ones_like(s_hi)[:, None]
    if as_query:
        cols = [-2 * hi, -2 * hi, -2 * lo, s_hi[:, None], s_lo[:, None], one, one]
    else:
        cols = [hi, lo, hi, one, one, s_hi[:, None], s_lo[:, None]]
    norms = {"x": x.norm(dim=1), "hi": hi.float().norm(dim=1), "lo": lo.float().norm(dim=1),
             "res": res.norm(dim=1), "sq": sq}
    return torch.cat(cols, dim=1).contiguous(), norms


def _error_bound(nq: dict[str, torch.Tensor], nr: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    """Per query, ``E_q >= |v - d2| - RHO |v|`` for every reference (``v``: the bf16 block value).

    With ``q = qh + ql + qe`` (and ``r`` alike), ``q.r - (qh.rh + qh.rl + ql.rh) = qh.re + ql.(r - rh) + qe.r``,
    bounded by Cauchy-Schwarz; the squared norms enter with ``gamma_d + 2^-16`` relative error (fp32 sum,
    two-term bf16 split); the fp32 accumulation of the ``D = 3d + 4`` products adds ``gamma_D`` times
    their absolute sum. The reference side is taken at its maximum; a factor ``1 + 2^-10`` covers the
    fp32 rounding of the bound itself. The last rounding (fp32 sum to bf16) is the ``RHO |v|`` term."""
    unit = 2.0**-24
    gamma_d, gamma_dd = d * unit / (1 - d * unit), (3 * d + 4) * unit / (1 - (3 * d + 4) * unit)
    r_res, r_x, r_sq = nr["res"].max(), nr["x"].max(), nr["sq"].max()
    r_lo_res = (nr["lo"] + nr["res"]).max()  # >= |r - rh|
    r_hl = (nr["hi"] + nr["lo"]).max()
    products = 2 * (nq["hi"] * r_res + nq["lo"] * r_lo_res + nq["res"] * r_x)
    norms = (gamma_d + 2.0**-16) * (1 + gamma_d) * (nq["sq"] + r_sq)
    accumulation = gamma_dd * (2 * (nq["hi"] + nq["lo"]) * r_hl + (1 + 2.0**-7) * (nq["sq"] + r_sq))
    return (products + norms + accumulation) * (1 + 2.0**-10)


def _bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in bf16, accumulated in fp32 (on CUDA, cuBLAS' reduced-precision split-K is switched off)."""
    if a.device.type != "cuda":
        return a @ b.T
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return a @ b.T
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def _prune(keys: torch.Tensor, tau: torch.Tensor, kp: int, dim: int) -> tuple[torch.Tensor, ...]:
    """The entries of an int16 key block that can enter the queries' running top-``kp``.

    ``dim`` is the reference axis (1: queries are rows; 0: queries are columns). Keys are bf16 bit
    patterns: for values >= 0 their int16 order is the float order, negative values sort below all of
    them. Group minima (strided groups of ``GROUP``, as in :func:`_block_topk`) are compared with the
    query's threshold ``tau`` (its current kp-th key, strict); only groups below it are read. A query
    whose list is not full yet takes the kp-th smallest group minimum of this block as its threshold
    (inclusive): at least kp entries lie at or below it. Returns local (query, reference, key) triples."""
    nq, size = keys.shape[1 - dim], keys.shape[dim]
    n_groups = size // GROUP
    main = n_groups * GROUP
    th = tau.to(torch.int32)
    cold = tau == KEY_EMPTY
    minima = None
    if n_groups:
        if dim == 1:
            minima = keys[:, :main].reshape(nq, GROUP, n_groups).amin(dim=1)
        else:
            minima = keys[:main].view(GROUP, n_groups, nq).amin(dim=0).T
        if n_groups >= kp and bool(cold.any()):
            cold_th = torch.kthvalue(minima[cold], kp, dim=1).values.to(torch.int32) + 1
            th = th.masked_scatter(cold, cold_th)
    th = th.clamp(max=KEY_INF).to(torch.int16)  # excluded (+inf) entries never pass
    out = []
    if minima is not None:
        q, g = (minima < th[:, None]).nonzero(as_tuple=True)
        if dim == 1:  # the hit groups' entries, [hits, GROUP] / [GROUP, hits], without an index tensor
            vals = keys[:, :main].view(nq, GROUP, n_groups)[q, :, g]
            h, t = (vals < th[q][:, None]).nonzero(as_tuple=True)
            vals = vals[h, t]
        else:
            vals = keys[:main].view(GROUP, n_groups, nq)[:, g, q]
            t, h = (vals < th[q][None, :]).nonzero(as_tuple=True)
            vals = vals[t, h]
        out.append((q[h], g[h] + t * n_groups, vals))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))


def _merge_candidates(best_k: torch.Tensor, best_i: torch.Tensor, q: torch.Tensor, ref: torch.Tensor,
                      key: torch.Tensor) -> None:
    """Merge (query, reference, key) triples into the sorted running lists ``best_k / best_i`` in place."""
    if q.numel() == 0:
        return
    kp = best_k.shape[1]
    order = torch.argsort(q * 65536 + (key.long() + 32768))  # by query, then key
    q, ref, key = q[order], ref[order], key[order]
    rows, counts = torch.unique_consecutive(q, return_counts=True)
    slot = torch.repeat_interleave(torch.arange(rows.numel(), device=q.device), counts)
    rank = torch.arange(q.numel(), device=q.device) - (torch.cumsum(counts, 0) - counts)[slot]
    width = min(int(counts.max()), kp)
    keep = rank < width
    new_k = torch.full((rows.numel(), width), KEY_EMPTY, dtype=torch.int16, device=q.device)
    new_i = torch.full((rows.numel(), width), -1, dtype=torch.long, device=q.device)
    new_k[slot[keep], rank[keep]] = key[keep]
    new_i[slot[keep], rank[keep]] = ref[keep]
    merged_k = torch.cat([best_k[rows], new_k], dim=1)
    merged_i = torch.cat([best_i[rows], new_i], dim=1)
    top, pos = torch.topk(merged_k, kp, dim=1, largest=False, sorted=True)
    best_k[rows] = top
    best_i[rows] = torch.gather(merged_i, 1, pos)


def _update(best_k: torch.Tensor, best_i: torch.Tensor, keys: torch.Tensor, dim: int, offset: int) -> None:
    """Running top-kp update of the queries along ``1 - dim`` of a key block."""
    q, ref, key = _prune(keys, best_k[:, -1], best_k.shape[1], dim)
    _merge_candidates(best_k, best_i, q, ref + offset, key)


def _bf16_candidates(xq: torch.Tensor, xr: torch.Tensor, kp: int, ex: torch.Tensor | None, self_join: bool,
                     max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kp smallest bf16 keys per query (sorted) and their reference indices, tiled like the fp32 paths."""
    n, m = xq.shape[0], xr.shape[0]
    best_k = torch.full((n, kp), KEY_EMPTY, dtype=torch.int16, device=xq.device)
    best_i = torch.full((n, kp), -1, dtype=torch.long, device=xq.device)
    if self_join:
        tile = max(1, min(n, math.isqrt(max_tile_elements)))
        if tile > GROUP:
            tile -= tile % GROUP
        for i0 in range(0, n, tile):
            i1 = min(n, i0 + tile)
            for j0 in range(i0, n, tile):
                j1 = min(n, j0 + tile)
                block = _bf16_gemm(xq[i0:i1], xr[j0:j1])
                _mask_exclusions(block, ex, i0, j0)
                keys = block.view(torch.int16)
                _update(best_k[i0:i1], best_i[i0:i1], keys, 1, j0)
                if j0 != i0:
                    _update(best_k[j0:j1], best_i[j0:j1], keys, 0, i0)
        return best_k, best_i
    r_tile = max(1, min(m, REFERENCE_TILE, max_tile_elements))
    q_tile = max(1, min(n, max_tile_elements // r_tile))
    for qs in range(0, n, q_tile):
        qe = min(n, qs + q_tile)
        for rs in range(0, m, r_tile):
            re_ = min(m, rs + r_tile)
            block = _bf16_gemm(xq[qs:qe], xr[rs:re_])
            if ex is not None:
                _mask_exclusions(block, ex[qs:qe], 0, rs)
            _update(best_k[qs:qe], best_i[qs:qe], block.view(torch.int16), 1, rs)
    return best_k, best_i


def _rerank(qc: torch.Tensor, rc: torch.Tensor, best_k: torch.Tensor, best_i: torch.Tensor, k: int,
            bound: torch.Tensor, m: int, max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact fp32 ``|q - r|^2`` of the candidates, their top-k, and whether each row is provably exact."""
    n, kp = best_i.shape
    kk = min(k, kp)
    approx = best_k.view(torch.bfloat16).float().masked_fill(best_k >= KEY_INF, math.inf)
    out_d = torch.empty((n, kk), device=qc.device)
    out_i = torch.empty((n, kk), dtype=torch.long, device=qc.device)
    chunk = max(1, max_tile_elements // (kp * qc.shape[1]))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        idx = best_i[s:e]
        d2 = ((rc[idx.clamp_min(0)] - qc[s:e, None]) ** 2).sum(-1).masked_fill(idx < 0, math.inf)
        out_d[s:e], pos = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
        out_i[s:e] = torch.gather(idx, 1, pos)
    out_i[torch.isinf(out_d)] = -1
    # every reference outside the list has v >= v_kp, so d2 >= v_kp - E - RHO v_kp > (exact k-th of the list)
    v_last = approx[:, -1]
    kth = out_d[:, -1] * (1 + (qc.shape[1] + 4) * 2.0**-23)  # covers the fp32 rounding of the re-ranked d2
    exact = (best_i[:, -1] < 0) | ((v_last >= 0) & (v_last * (1 - RHO) - bound > kth))
    if kp >= m:
        exact[:] = True
    return out_d, out_i, exact


def _torch_knn_bf16(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None, self_join: bool,
                    device: str | torch.device | None, max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared-L2 top-k: bf16 candidate search, exact fp32 re-rank, checked (see the module docstring)."""
    device = torch.device(device) if device is not None else q.device
    n, m, d = q.shape[0], r.shape[0], q.shape[1]
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    if n == 0 or m == 0:
        return out_d, out_i
    r_dev = r.to(device)
    center = r_dev.mean(0)  # distances are translation invariant; centring shrinks |q| |r| in the bound
    rc = r_dev - center
    qc = rc if self_join else q.to(device) - center
    xr, nr = _augment(rc, as_query=False)
    xq, nq = _augment(qc, as_query=True)
    bound = _error_bound(nq, nr, d)
    todo = torch.arange(n, device=device)
    margin = CANDIDATE_MARGIN
    for attempt in range(RETRIES + 1):
        kp = min(k + margin, m)
        if attempt == 0:  # all rows, shared blocks when a self-join; retries: the rejected rows only
            rows_ex, rows_xq, rows_qc, rows_bound = ex, xq, qc, bound
        else:
            rows_ex = None if ex is None else ex[todo.cpu()]
            rows_xq, rows_qc, rows_bound = xq[todo], qc[todo], bound[todo]
        best_k, best_i = _bf16_candidates(rows_xq, xr, kp, rows_ex, self_join and attempt == 0, max_tile_elements)
        d2, idx, exact = _rerank(rows_qc, rc, best_k, best_i, k, rows_bound, m, max_tile_elements)
        done = todo[exact].cpu()
        out_d[done, :d2.shape[1]] = d2[exact].cpu()
        out_i[done, :d2.shape[1]] = idx[exact].cpu()
        todo = todo[~exact]
        if todo.numel() == 0:
            return out_d, out_i
        margin *= 4
    rest = todo.cpu()
    rest_d, rest_i = _torch_knn(qc[todo], rc, k, None if ex is None else ex[rest], device, max_tile_elements)
    out_d[rest], out_i[rest] = rest_d, rest_i
    return out_d, out_i


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_knn(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None, device, index: str,
               nlist: int | None, nprobe: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-L2 top-(k+e) with faiss, then the excluded indices removed per row."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss kNN backend needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    if index not in ("flat", "ivf"):
        raise ValueError(f"unknown faiss index {index!r}; choose flat or ivf")
    n, m = q.shape[0], r.shape[0]
    d = q.shape[1]
    xq = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
    xr = np.ascontiguousarray(r.cpu().numpy(), dtype=np.float32)
    if index == "flat":
        idx = faiss.IndexFlatL2(d)
    else:
        nlist = nlist or max(1, int(round(math.sqrt(m))))
        nlist = min(nlist, m)
        quantizer = faiss.IndexFlatL2(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        idx.cp.seed = seed
        idx.train(xr)
        idx.nprobe = min(nprobe, nlist)
    use_gpu = (device is not None and torch.device(device).type == "cuda" and hasattr(faiss, "StandardGpuResources")
               and faiss.get_num_gpus() > 0)
    if use_gpu:
        resources = faiss.StandardGpuResources()
        idx = faiss.index_cpu_to_gpu(resources, torch.device(device).index or 0, idx)
    idx.add(xr)
    e = 0 if ex is None else ex.shape[1]
    search_k = min(m, k + e)
    dist, ind = idx.search(xq, search_k)
    dist_t, ind_t = torch.from_numpy(dist).float(), torch.from_numpy(ind).long()
    if ex is not None:
        drop = (ind_t[:, :, None] == ex[:, None, :]).any(dim=2) | (ind_t < 0)
        dist_t = dist_t.masked_fill(drop, math.inf)
        # stable sort keeps faiss' order among ties and moves dropped entries to the end
        order = torch.argsort(dist_t, dim=1, stable=True)
        dist_t, ind_t = torch.gather(dist_t, 1, order), torch.gather(ind_t, 1, order)
        ind_t = ind_t.masked_fill(torch.isinf(dist_t), -1)
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    kk = min(k, dist_t.shape[1])
    out_d[:, :kk], out_i[:, :kk] = dist_t[:, :kk], ind_t[:, :kk]
    out_d[out_i < 0] = math.inf
    return out_d, out_i

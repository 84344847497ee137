"""The exact bf16 path of :func:`safe_train.detection.knn.knn` (``backend="torch"``, ``precision="bf16"``).

:mod:`safe_train.detection.knn` validates the inputs, normalises them for the cosine metric, builds the
exclusions and calls :func:`torch_knn_bf16`, which returns the exact squared-L2 top-k. This module also
holds the tiling primitives that the fp32 path shares (``REFERENCE_TILE``, ``GROUP``,
:func:`mask_exclusions`), so it imports nothing from ``knn`` and ``knn`` imports it.

Method. A bfloat16 GEMM (AMX / AVX512-BF16 / tensor cores) finds candidates, which are re-ranked in
float32 in difference form, ``|q - r|^2`` (no cancellation: relative error ``<= (d + 4) 2^-23`` against
float64 on the same float32 inputs), and checked; the result is the exact k nearest up to that rounding
(ties and near-ties within it: any of them), so this mode is *more* accurate than ``"fp32"``.

- Frame: data are centred (c = mean of the reference; distances are translation invariant) and
  multiplied by a power of two (exact) that brings every centred query and reference row to norm <= 1,
  so tiny (1e-20) or huge (1e19) data neither flush to zero in bf16 / AMX nor overflow the squared
  norms; the re-rank uses the same scale, the output undoes it.
- Split: rows are split as ``x = xh + xl + xe`` (``xh, xl`` bf16), ``|x|^2 = sh + sl``; one GEMM of
  ``3d + 4`` columns, accumulated in fp32, gives ``v = bf16(-2 (qh.rh + qh.rl + ql.rh) + sq + sr) = d2 + err``
  with ``|err| <= E_q + 2^-8 |v|``, where ``E_q`` (:func:`_error_bound`: Cauchy-Schwarz on the dropped
  terms ``qh.re + ql.(r - rh) + qe.r``, the norm split, gamma_{3d+4} for the fp32 accumulation, and an
  absolute ``(12d + 16) 2^-126`` for subnormals flushed to zero) is about ``2^-12.6 |q||r|`` at d = 128
  (``2^-11`` at d = 512; mostly the worst-case accumulation term), next to the final rounding of ``v`` to
  bf16, ``2^-8 |v|``.
- Candidates: per query the ``kp = k + 8`` smallest ``v`` are kept (int16 bit patterns of ``v`` are
  compared; group minima prune blocks against the running kp-th ``v``; rows are visited in a locality
  order (nearest of 256 pivots) so that threshold is tight early).
- Check, per row: with ``D`` the exact k-th distance of the re-ranked list, every reference left out has
  ``v >= v_kp``, hence ``d >= sqrt(v_kp (1 - 2^-8) - E_q) - s_q`` (``s_q`` bounds the fp32 centring
  error); if that is ``> D`` (with the fp32 rounding of the re-rank), no left-out reference can be among
  the k nearest, and the re-ranked list is the exact answer.
- Retries and fallback: rows that fail (more ties or near-ties within ~2^-7 of the k-th squared distance
  than the list holds) are retried with margins of 32 and 128; rows failing those (more than ``k + 128``
  near-equal candidates, e.g. a large group of duplicates) get an exact brute force
  (:func:`_bf16_fallback`): their bf16 blocks are recomputed and every reference with
  ``v <= ((D + s_q)^2 + E_q) / (1 - 2^-8)`` (all others are provably farther than ``D``) is re-ranked in
  difference form, streamed tile by tile (memory: one block). The guarantee is the same for every row.

It assumes finite inputs (``knn`` enforces them) and a GEMM that accumulates in fp32 and rounds to
nearest (oneDNN on CPU; cuBLAS with reduced-precision reduction switched off during the call). On CUDA,
tensor cores may truncate the accumulation: there the accumulation term of ``E_q`` uses twice the unit
roundoff, and ``"auto"`` never picks bf16 on CUDA (:func:`bf16_is_fast`; the bf16 path is neither timed
nor tested on GPUs). Extra memory: the bf16 split (about one fp32 copy of query and reference) and up to
``FORM_CACHE_BYTES`` of GEMM operands.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# ------------------------------------------------------------------ tiling shared with the fp32 path

REFERENCE_TILE = 8192  # reference rows per tile of the general (not self-join) paths
GROUP = 32  # columns per group in the two-stage selections (knn._block_topk, _prune)


def mask_exclusions(block: torch.Tensor, ex: torch.Tensor | None, row_start: int, col_start: int) -> None:
    """Set ``block[i, j] = inf`` where reference ``col_start + j`` is excluded for query ``row_start + i``."""
    if ex is None or block.numel() == 0:
        return
    local = ex[row_start:row_start + block.shape[0]].to(block.device, non_blocking=True) - col_start
    valid = (local >= 0) & (local < block.shape[1])
    # a scatter-max instead of boolean indexing: no nonzero(), so no host-device sync per tile on CUDA;
    # entries outside this block write -inf into column 0, which max() leaves unchanged
    fill = torch.full(local.shape, math.inf, dtype=block.dtype, device=block.device).masked_fill_(~valid, -math.inf)
    block.scatter_reduce_(1, local.masked_fill(~valid, 0), fill, reduce="amax")


# ------------------------------------------------------------------ bf16 candidate search + exact re-rank

KEY_INF = 0x7F80  # bfloat16 +inf read as int16: excluded entries; finite values stay below it
KEY_MAX = 0x7F7F  # the largest finite bfloat16 read as int16
KEY_EMPTY = 0x7FFF  # an empty slot of a running candidate list (a NaN pattern, above KEY_INF)
RHO = 2.0**-8  # round-to-nearest to bfloat16: |x - bf16(x)| <= 2^-8 |bf16(x)|
CANDIDATE_MARGINS = (8, 32, 128)  # candidates kept beyond k: first attempt, then the retries of rejected rows
LOCALITY_PIVOTS = 256  # cells of the visiting order of the bf16 search
FORM_CACHE_BYTES = 1 << 28  # augmented rows of both sides built once up to this size, else per tile
SPLIT_ELEMENTS = 1 << 22  # rows x columns per chunk when splitting the inputs into bf16
RERANK_ELEMENTS = 1 << 18  # gathered candidate coordinates per re-rank chunk (1 MB of fp32: stays in cache)
TINY = 2.0**-126  # the smallest normal float32 (and bfloat16): below it, AMX / oneDNN flush to zero


def bf16_is_fast(device: str | torch.device | None = None) -> bool:
    """Whether ``precision="auto"`` picks bf16: on CPUs with AMX or AVX512-BF16 (native bf16 GEMMs).

    CUDA stays on fp32 under "auto": the bf16 path runs there when asked for explicitly (with the
    accumulation bound doubled for tensor cores that truncate), but it has been neither timed nor tested
    on a GPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


class _Frame(NamedTuple):
    """Coordinates of the bf16 search: ``(x - center) * scale``, ``scale`` a power of two that brings the
    centred rows to norms <= 1 (no bf16 / fp32 underflow or overflow; exact, so the re-rank may use it)."""

    center: torch.Tensor
    scale: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - center) * scale`` (a new tensor)."""
        x = x - self.center
        return x if self.scale == 1.0 else x.mul_(self.scale)


def _frame(q: torch.Tensor, r: torch.Tensor, self_join: bool) -> _Frame:
    """The centre (mean of the reference, or the midpoint of the bounding box if the mean overflows) and the
    scale ``2^-e`` with ``sqrt(d) max |x - center|_inf <= 2^e`` over query and reference rows."""
    lo, hi = torch.aminmax(r, dim=0)
    if not self_join and q.shape[0]:
        q_lo, q_hi = torch.aminmax(q, dim=0)
        lo, hi = torch.minimum(lo, q_lo), torch.maximum(hi, q_hi)
    center = r.mean(0)
    if not bool(torch.isfinite(center).all()):
        center = lo / 2 + hi / 2
    c = center.double()
    reach = float(torch.maximum(hi.double() - c, c - lo.double()).max()) * math.sqrt(r.shape[1])
    if not 0 < reach < math.inf:
        return _Frame(center, 1.0)
    exponent = math.frexp(reach * (1 + 2.0**-20))[1]  # reach (1 + 2^-20) <= 2^exponent
    return _Frame(center, math.ldexp(1.0, -max(-120, min(120, exponent))))


class _Split(NamedTuple):
    """Rows ``x = hi + lo + res`` (``hi, lo`` bf16, all subtractions exact in fp32) and
    ``|x|^2 = s_hi + s_lo`` (+ error), with the norms that enter the error bound."""

    hi: torch.Tensor
    lo: torch.Tensor
    s_hi: torch.Tensor
    s_lo: torch.Tensor
    norms: dict[str, torch.Tensor]

    def take(self, rows: torch.Tensor) -> _Split:
        """The split of the rows ``rows`` (a copy)."""
        return _Split(self.hi[rows], self.lo[rows], self.s_hi[rows], self.s_lo[rows],
                      {name: v[rows] for name, v in self.norms.items()})


def _split(x: torch.Tensor) -> _Split:
    """Split the fp32 rows ``x`` (already centred and scaled) into ``hi + lo + res`` and their norms."""
    hi = x.bfloat16()
    res = x - hi  # fp32, exact; then minus lo, in place (few large temporaries: they cost page faults)
    lo = res.bfloat16()
    res.sub_(lo)
    sq = torch.linalg.vecdot(x, x)
    s_hi = sq.bfloat16()
    s_lo = (sq - s_hi).bfloat16()
    norm = torch.linalg.vector_norm
    norms = {"x": norm(x, dim=1), "hi": norm(hi, dim=1, dtype=torch.float32),
             "lo": norm(lo, dim=1, dtype=torch.float32), "res": norm(res, dim=1), "sq": sq}
    return _Split(hi, lo, s_hi, s_lo, norms)


def _split_rows(x: torch.Tensor, frame: _Frame, rows: torch.Tensor) -> _Split:
    """``_split(frame.apply(x[rows]))``, by chunks (no full-size fp32 temporaries)."""
    n, d = rows.numel(), x.shape[1]
    kw = {"dtype": torch.bfloat16, "device": x.device}
    norms = {name: torch.empty(n, device=x.device) for name in ("x", "hi", "lo", "res", "sq")}
    out = _Split(torch.empty((n, d), **kw), torch.empty((n, d), **kw), torch.empty(n, **kw),
                 torch.empty(n, **kw), norms)
    chunk = max(1, SPLIT_ELEMENTS // max(1, d))
    for s in range(0, n, chunk):
        part = _split(frame.apply(x[rows[s:s + chunk]]))
        for dst, src in zip(out[:4], part[:4], strict=True):
            dst[s:s + chunk] = src
        for name, v in part.norms.items():
            out.norms[name][s:s + chunk] = v
    return out


def _cells(x: torch.Tensor, frame: _Frame, pivots: torch.Tensor, query: bool) -> torch.Tensor:
    """Each row's pivot with the smallest bf16 key (``pivots``: augmented rows of the other form), by
    chunks. Only an ordering: its precision does not matter."""
    n, d = x.shape
    chunk = max(1, SPLIT_ELEMENTS // max(d, pivots.shape[0]))
    cells = []
    for s in range(0, n, chunk):
        part = _split(frame.apply(x[s:s + chunk]))
        keys = _bf16_gemm(_form(part, 0, part.hi.shape[0], query), pivots)
        cells.append(keys.view(torch.int16).argmin(dim=1))
    return torch.cat(cells)


def _form(sp: _Split, start: int, end: int, query: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Augmented bf16 rows whose products approximate squared distances, built per tile (memory: only
    ``hi, lo`` are stored): ``Q(q) . R(r) = -2 (qh.rh + qh.rl + ql.rh) + (sq_hi + sq_lo) + (sr_hi + sr_lo)``,
    ``-2 qh`` being exact in bf16. ``out``: a reused buffer (fresh large tensors cost page faults)."""
    hi, lo = sp.hi[start:end], sp.lo[start:end]
    s_hi, s_lo = sp.s_hi[start:end, None], sp.s_lo[start:end, None]
    one = torch.ones_like(s_hi)
    parts = [-2 * hi, -2 * hi, -2 * lo, s_hi, s_lo, one, one] if query else [hi, lo, hi, one, one, s_hi, s_lo]
    if out is None:
        return torch.cat(parts, dim=1)
    return torch.cat(parts, dim=1, out=out[:end - start])


def _error_bound(nq: dict[str, torch.Tensor], nr: dict[str, torch.Tensor], d: int,
                 truncating: bool = False) -> torch.Tensor:
    """Per query, ``E_q >= |v - d2| - RHO |v|`` for every reference (``v``: the bf16 block value).

    With ``q = qh + ql + qe`` (``r`` alike), ``q.r - (qh.rh + qh.rl + ql.rh) = qh.re + ql.(r - rh) + qe.r``,
    bounded by Cauchy-Schwarz; the squared norms carry ``gamma_d + 2^-16`` relative error (fp32 sum,
    two-term bf16 split); the fp32 accumulation of the ``3d + 4`` exact products adds ``gamma_{3d+4}``
    times their absolute sum (``truncating``: an accumulator that truncates instead of rounding, e.g.
    tensor cores, doubles the unit roundoff). Flushing subnormal operands, products, partial sums and the
    output to zero costs at most ``(3d + 4) (2.02 + 1) 2^-126 + 2^-126``, here ``(12d + 16) 2^-126``, for
    rows of norm <= 1 (augmented entries <= 2.02; see :class:`_Frame`). The reference side is taken at
    its maximum; ``1 + 2^-10`` covers the fp32 rounding of the bound itself. The final rounding of the
    sum to bf16 is the ``RHO |v|`` term."""
    unit, acc_unit = 2.0**-24, 2.0**-23 if truncating else 2.0**-24
    gamma_d, gamma_dd = d * unit / (1 - d * unit), (3 * d + 4) * acc_unit / (1 - (3 * d + 4) * acc_unit)
    r_sq = nr["sq"].max()
    products = 2 * (nq["hi"] * nr["res"].max() + nq["lo"] * (nr["lo"] + nr["res"]).max()
                    + nq["res"] * nr["x"].max())
    norms = (gamma_d + 2.0**-16) * (1 + gamma_d) * (nq["sq"] + r_sq)
    accumulation = gamma_dd * (2 * (nq["hi"] + nq["lo"]) * (nr["hi"] + nr["lo"]).max()
                               + (1 + 2.0**-7) * (nq["sq"] + r_sq))
    flush = (12 * d + 16) * TINY
    return (products + norms + accumulation + flush) * (1 + 2.0**-10)


def _bf16_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` with bf16 output, accumulated in fp32 (on CUDA, cuBLAS' reduced-precision split-K is off).

    ``out``: a flat reused buffer of at least ``len(a) * len(b)`` entries."""
    if out is not None:
        out = out[:a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
    if a.device.type != "cuda":
        return torch.mm(a, b.T, out=out)
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return torch.mm(a, b.T, out=out)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


class _Hits(NamedTuple):
    """The entries of a key block that :func:`_prune` keeps, as local (query, reference, key) triples."""

    q: torch.Tensor
    ref: torch.Tensor
    key: torch.Tensor
    grouped: bool  # the triples of each query are consecutive
    lowest: int  # the block's smallest key


def _prune(keys: torch.Tensor, tau: torch.Tensor, kp: int, dim: int, floor: int | None = None) -> _Hits:
    """The entries of an int16 key block that can enter the queries' running top-``kp``.

    ``dim`` is the reference axis (1: queries are rows; 0: queries are columns). Keys are bf16 bit
    patterns: for values >= 0 their int16 order is the float order; negative values sort below all of
    them. Group minima (strided groups of about ``GROUP``, as in ``knn._block_topk``) are compared with the
    query's threshold ``tau`` (its current kp-th key, strict); only groups below it are read. A query
    whose list is not full yet takes the kp-th smallest group minimum of this block as its threshold
    (inclusive; with fewer than kp groups, the kp-th smallest key of its row): at least kp entries lie
    at or below it. Returns the local (query, reference, key) triples, whether they come ordered by query
    (then :func:`_merge_candidates` needs no sort), and the block's smallest key. ``floor``: a known
    smallest key of the block (from the other direction); when no threshold is above it, the block is
    not read at all."""
    nq, size = keys.shape[1 - dim], keys.shape[dim]
    empty = torch.empty(0, dtype=torch.long, device=keys.device)
    if floor is not None and floor >= int(tau.clamp(max=KEY_INF).max()):  # (cold lists: threshold KEY_INF)
        return _Hits(empty, empty, empty.to(torch.int16), True, floor)
    n_groups = size // GROUP
    if n_groups >= 64:  # a multiple of 64 groups: the strided minimum vectorises (2x faster at 2880)
        n_groups -= n_groups % 64
    members = size // n_groups if n_groups else 0
    main = n_groups * members
    th = tau.to(torch.int32)
    cold = tau == KEY_EMPTY
    minima = None
    if n_groups:
        if dim == 1:
            minima = keys[:, :main].reshape(nq, members, n_groups).amin(dim=1)
        else:
            minima = keys[:main].view(members, n_groups, nq).amin(dim=0).T
    if bool(cold.any()) and size >= kp:
        if minima is not None and n_groups >= kp:
            cold_th = torch.kthvalue(minima[cold], kp, dim=1).values
        else:  # few groups (k >= 57 at the usual tile): the kp-th smallest key of each cold row itself
            cold_th = torch.kthvalue(keys[cold] if dim == 1 else keys[:, cold].T, kp, dim=1).values
        th = th.masked_scatter(cold, cold_th.to(torch.int32) + 1)
    th = th.clamp(max=KEY_INF).to(torch.int16)  # excluded (+inf) entries never pass
    out = []
    lowest = KEY_EMPTY
    if minima is not None:
        lowest = int(minima.amin())
        q, g = (minima < th[:, None]).nonzero(as_tuple=True) if lowest < int(th.max()) else (empty, empty)
        if dim == 1:  # the hit groups' entries, [hits, members] / [members, hits], without an index tensor
            vals = keys[:, :main].view(nq, members, n_groups)[q, :, g]
            h, t = (vals < th[q][:, None]).nonzero(as_tuple=True)
            vals = vals[h, t]
        else:
            vals = keys[:main].view(members, n_groups, nq)[:, g, q]
            t, h = (vals < th[q][None, :]).nonzero(as_tuple=True)
            vals = vals[t, h]
        out.append((q[h], g[h] + t * n_groups, vals))
    if main < size:
        tail = keys[:, main:] if dim == 1 else keys[main:].T
        lowest = min(lowest, int(tail.amin()))
        q, j = (tail < th[:, None]).nonzero(as_tuple=True)
        out.append((q, j + main, tail[q, j]))
    q, ref, key = (torch.cat(parts) for parts in zip(*out, strict=True))
    # nonzero is row-major: with one part, a row's hits are consecutive
    return _Hits(q, ref, key, dim == 1 and len(out) == 1, lowest)


def _merge_candidates(best_k: torch.Tensor, best_i: torch.Tensor, q: torch.Tensor, ref: torch.Tensor,
                      key: torch.Tensor, grouped: bool = False) -> None:
    """Merge (query, reference, key) triples into the sorted running lists ``best_k / best_i`` in place.

    ``grouped``: the triples of each query are consecutive (a sort is needed only if some query has
    more than kp of them)."""
    if q.numel() == 0:
        return
    kp = best_k.shape[1]
    if grouped:
        rows, counts = torch.unique_consecutive(q, return_counts=True)
    if not grouped or int(counts.max()) > kp:
        order = torch.argsort(q * 65536 + (key.long() + 32768))  # by query, then key
        q, ref, key = q[order], ref[order], key[order]
        rows, counts = torch.unique_consecutive(q, return_counts=True)
    slot, rank = _group_ranks(counts)
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


def _update(best_k: torch.Tensor, best_i: torch.Tensor, block: torch.Tensor, dim: int, offset: int,
            floor: int | None = None) -> int:
    """Running top-kp update, from a bf16 block, of the queries along ``1 - dim``; returns the block's
    smallest key (see :func:`_prune`)."""
    hits = _prune(block.view(torch.int16), best_k[:, -1], best_k.shape[1], dim, floor)
    _merge_candidates(best_k, best_i, hits.q, hits.ref + offset, hits.key, hits.grouped)
    return hits.lowest


class _Forms:
    """Tiles of augmented rows (:func:`_form`): all built once when they fit in ``FORM_CACHE_BYTES``,
    else per tile into a reused buffer."""

    def __init__(self, sp: _Split, query: bool, tile: int, cached: bool) -> None:
        self.sp, self.query = sp, query
        self.all = _form(sp, 0, sp.hi.shape[0], query) if cached else None
        width = 3 * sp.hi.shape[1] + 4
        self.buf = None if cached else torch.empty((tile, width), dtype=torch.bfloat16, device=sp.hi.device)

    def __call__(self, start: int, end: int) -> torch.Tensor:
        """The augmented rows ``start:end`` (a view of the cache or of the reused buffer)."""
        if self.all is not None:
            return self.all[start:end]
        return _form(self.sp, start, end, self.query, self.buf)


def _general_tiles(n: int, m: int, max_tile_elements: int) -> tuple[int, int]:
    """Query and reference tile sizes of the general (not self-join) paths."""
    r_tile = max(1, min(m, REFERENCE_TILE, max_tile_elements))
    return max(1, min(n, max_tile_elements // r_tile)), r_tile


def _bf16_candidates(sq: _Split, sr: _Split, kp: int, ex: torch.Tensor | None, self_join: bool,
                     max_tile_elements: int, cells_q: torch.Tensor,
                     cells_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kp smallest bf16 keys per query (sorted) and their reference indices, tiled like the fp32 paths.

    Rows come sorted by cell (nearest pivot); a self-join visits its blocks by distance from the
    diagonal, and each query tile of the general path starts at the reference tile of its cell, so that
    the thresholds of :func:`_prune` are tight early and few entries are read. The visiting order never
    changes the result."""
    n, m = sq.hi.shape[0], sr.hi.shape[0]
    device, width = sq.hi.device, 3 * sq.hi.shape[1] + 4
    cached = (n + m) * width * 2 <= FORM_CACHE_BYTES
    best_k = torch.full((n, kp), KEY_EMPTY, dtype=torch.int16, device=device)
    best_i = torch.full((n, kp), -1, dtype=torch.long, device=device)
    if self_join:
        tile = max(1, min(n, math.isqrt(max_tile_elements)))
        if tile > GROUP:
            tile -= tile % GROUP
        buf = torch.empty(tile * tile, dtype=torch.bfloat16, device=device)
        form_q, form_r = _Forms(sq, True, tile, cached), _Forms(sr, False, tile, cached)
        starts = range(0, n, tile)
        for i0, j0 in sorted(((i, j) for i in starts for j in starts if j >= i), key=lambda p: p[1] - p[0]):
            i1, j1 = min(n, i0 + tile), min(n, j0 + tile)
            block = _bf16_gemm(form_q(i0, i1), form_r(j0, j1), buf)
            mask_exclusions(block, ex, i0, j0)
            lowest = _update(best_k[i0:i1], best_i[i0:i1], block, 1, j0)
            if j0 != i0:
                _update(best_k[j0:j1], best_i[j0:j1], block, 0, i0, lowest)
        return best_k, best_i
    q_tile, r_tile = _general_tiles(n, m, max_tile_elements)
    n_tiles = math.ceil(m / r_tile)
    buf = torch.empty(q_tile * r_tile, dtype=torch.bfloat16, device=device)
    form_q, form_r = _Forms(sq, True, q_tile, cached), _Forms(sr, False, r_tile, cached)
    for qs in range(0, n, q_tile):
        qe = min(n, qs + q_tile)
        xq = form_q(qs, qe)
        first = int(torch.searchsorted(cells_r, cells_q[(qs + qe) // 2])) // r_tile
        for t in range(n_tiles):
            rs = ((first + t) % n_tiles) * r_tile
            block = _bf16_gemm(xq, form_r(rs, min(m, rs + r_tile)), buf)
            if ex is not None:
                mask_exclusions(block, ex[qs:qe], 0, rs)
            _update(best_k[qs:qe], best_i[qs:qe], block, 1, rs)
    return best_k, best_i


def _exact_d2(q: torch.Tensor, r: torch.Tensor, rows: torch.Tensor, refs: torch.Tensor,
              scale: float) -> torch.Tensor:
    """``|(r[refs] - q[rows]) * scale|^2`` in fp32, difference form (no cancellation; the exact power-of-two
    scale keeps tiny and huge data clear of underflow and overflow). ``rows, refs``: same shape ``[..., c]``
    (``rows`` may broadcast), valid indices."""
    diff = r.index_select(0, refs.reshape(-1)).view(*refs.shape, -1).sub_(q[rows])
    if scale != 1.0:
        diff.mul_(scale)
    return diff.mul_(diff).sum(-1)


def _exact_topk(q: torch.Tensor, r: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, k: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For queries ``q[rows]``: the ``k`` smallest exact :func:`_exact_d2` among their candidate reference
    indices ``cand`` (``-1`` = none), sorted, and the indices."""
    n, kp = cand.shape
    kk = min(k, kp)
    out_d = torch.empty((n, kk), device=q.device)
    out_i = torch.empty((n, kk), dtype=torch.long, device=q.device)
    chunk = max(1, RERANK_ELEMENTS // (kp * q.shape[1]))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        idx = cand[s:e]
        d2 = _exact_d2(q, r, rows[s:e, None], idx.clamp_min(0), scale).masked_fill_(idx < 0, math.inf)
        out_d[s:e], pos = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
        out_i[s:e] = torch.gather(idx, 1, pos)
    out_i[torch.isinf(out_d)] = -1
    return out_d, out_i


class _Checked(NamedTuple):
    """The re-ranked lists of :func:`_rerank` and the outcome of the exactness check."""

    dist: torch.Tensor  # [rows, min(k, kp)] exact squared distances (scaled frame), ascending
    idx: torch.Tensor  # their reference indices
    exact: torch.Tensor  # [rows] bool: provably the exact top-k of all references
    limit: torch.Tensor  # [rows]: every reference among the exact top-k has a bf16 value v <= limit


def _rerank(q: torch.Tensor, r: torch.Tensor, rows: torch.Tensor, best_k: torch.Tensor, cand: torch.Tensor,
            k: int, bound: torch.Tensor, shift: torch.Tensor, m: int, scale: float) -> _Checked:
    """Exact top-k of the candidates (from the inputs ``q[rows], r``), and whether each row is provably
    the exact top-k of all references (the bound is on centred distances; ``shift`` bounds what centring
    in fp32 moved them by). All squared distances are in the scaled frame (:class:`_Frame`)."""
    kp, d = cand.shape[1], q.shape[1]
    out_d, out_i = _exact_topk(q, r, rows, cand, k, scale)
    # a reference outside the list has v >= v_kp, so its centred d2 >= v_kp - E - RHO v_kp, and its
    # distance >= sqrt(that) - shift, which must exceed the list's exact k-th distance
    v_last = best_k[:, -1].view(torch.bfloat16).float()
    low = (v_last * (1 - RHO) - bound).clamp_min(0).sqrt() - shift
    # the k-th distance, up to the fp32 rounding (and flushed subnormal squares) of the re-rank
    kth = (out_d[:, -1] * (1 + (d + 4) * 2.0**-23) + (d + 4) * TINY).sqrt() * (1 + 2.0**-20)  # + rounding
    exact = (cand[:, -1] < 0) | ((v_last >= 0) & (low > kth * (1 + 2.0**-20)))  # + rounding of low
    if kp >= m:  # the list holds every admissible reference
        exact[:] = True
    # conversely, a reference at distance <= kth has centred d2 <= (kth + shift)^2, so v <= limit
    limit = ((kth + shift).square() * (1 + 2.0**-20) + bound) / (1 - RHO) * (1 + 2.0**-20)
    return _Checked(out_d, out_i, exact, limit)


def _upper_key(limit: torch.Tensor) -> torch.Tensor:
    """The int16 key of the smallest bf16 value >= ``limit`` (>= 0), at most the largest finite key."""
    rounded = limit.bfloat16()
    key = rounded.view(torch.int16).to(torch.int32) + (rounded.float() < limit).to(torch.int32)
    return key.clamp(max=KEY_MAX).to(torch.int16)


def _group_ranks(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries sorted into consecutive groups of ``counts``: each entry's group and its rank in it."""
    slot = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    rank = torch.arange(slot.numel(), device=counts.device) - (torch.cumsum(counts, 0) - counts)[slot]
    return slot, rank


def _merge_exact(best_d: torch.Tensor, best_i: torch.Tensor, row: torch.Tensor, ref: torch.Tensor,
                 d2: torch.Tensor) -> None:
    """Merge (row, reference, squared distance) triples into the sorted running lists in place."""
    kk = best_d.shape[1]
    order = torch.argsort(d2, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by row, then distance
    row, ref, d2 = row[order], ref[order], d2[order]
    rows, counts = torch.unique_consecutive(row, return_counts=True)
    slot, rank = _group_ranks(counts)
    width = min(int(counts.max()), kk)
    keep = rank < width
    new_d = torch.full((rows.numel(), width), math.inf, device=row.device)
    new_i = torch.full((rows.numel(), width), -1, dtype=torch.long, device=row.device)
    new_d[slot[keep], rank[keep]] = d2[keep]
    new_i[slot[keep], rank[keep]] = ref[keep]
    top, pos = torch.topk(torch.cat([best_d[rows], new_d], dim=1), kk, dim=1, largest=False, sorted=True)
    best_d[rows] = top
    best_i[rows] = torch.gather(torch.cat([best_i[rows], new_i], dim=1), 1, pos)


def _bf16_fallback(q: torch.Tensor, r: torch.Tensor, rows: torch.Tensor, sq: _Split, sr: _Split,
                   ex: torch.Tensor | None, limit: torch.Tensor, order_r: torch.Tensor, k: int, scale: float,
                   max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k for the rows the check rejected (more near-ties than the widest list holds): a brute
    force in difference form over every reference whose bf16 value is <= the row's ``limit`` (all others
    are provably farther than a known k-th distance, see :func:`_rerank`), streamed tile by tile.

    ``rows``: the queries' original indices; ``sq`` their split and ``ex`` their exclusions (in the
    reference locality order ``order_r`` of ``sr``). Memory: one block and its re-ranked entries."""
    n, m = sq.hi.shape[0], sr.hi.shape[0]
    device, width = sq.hi.device, 3 * sq.hi.shape[1] + 4
    kk = min(k, m)
    best_d = torch.full((n, kk), math.inf, device=device)
    best_i = torch.full((n, kk), -1, dtype=torch.long, device=device)
    key_limit = _upper_key(limit)
    q_tile, r_tile = _general_tiles(n, m, max_tile_elements)
    cached = (n + m) * width * 2 <= FORM_CACHE_BYTES
    buf = torch.empty(q_tile * r_tile, dtype=torch.bfloat16, device=device)
    form_q, form_r = _Forms(sq, True, q_tile, cached), _Forms(sr, False, r_tile, cached)
    chunk = max(1, RERANK_ELEMENTS // q.shape[1])
    for qs in range(0, n, q_tile):
        qe = min(n, qs + q_tile)
        xq = form_q(qs, qe)
        for rs in range(0, m, r_tile):
            block = _bf16_gemm(xq, form_r(rs, min(m, rs + r_tile)), buf)
            if ex is not None:
                mask_exclusions(block, ex[qs:qe], 0, rs)  # excluded: +inf, above every limit
            hit_q, hit_r = (block.view(torch.int16) <= key_limit[qs:qe, None]).nonzero(as_tuple=True)
            for s in range(0, hit_q.numel(), chunk):
                local, ref = hit_q[s:s + chunk] + qs, order_r[hit_r[s:s + chunk] + rs]
                d2 = _exact_d2(q, r, rows[local], ref, scale)
                _merge_exact(best_d, best_i, local, ref, d2)
    best_i[torch.isinf(best_d)] = -1
    return best_d, best_i


def torch_knn_bf16(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None, self_join: bool,
                    device: str | torch.device | None,
                    max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared-L2 top-k: bf16 candidate search, exact fp32 re-rank, checked (see the module docstring).

    The search runs in a locality order (rows sorted by nearest pivot); ``q, r`` themselves are not
    permuted (the re-rank maps indices), so the extra memory is the bf16 split, about one fp32 copy.
    Returns float64 squared distances (the scaled frame undone: they may lie outside fp32's range)."""
    device = torch.device(device) if device is not None else q.device
    n, m, d = q.shape[0], r.shape[0], q.shape[1]
    out_d = torch.full((n, k), math.inf, dtype=torch.float64)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    if n == 0 or m == 0:
        return out_d, out_i
    r = r.to(device)
    q = r if self_join else q.to(device)
    frame = _frame(q, r, self_join)  # distances are translation invariant; centring shrinks the bound
    pivots = _split(frame.apply(r[torch.linspace(0, m - 1, min(m, LOCALITY_PIVOTS), device=device).long()]))
    n_piv = pivots.hi.shape[0]
    # pivots themselves in a locality order (by nearest of 16 coarse pivots): neighbouring cells are adjacent
    coarse = torch.linspace(0, n_piv - 1, min(n_piv, 16), device=device).long()
    piv_keys = _bf16_gemm(_form(pivots, 0, n_piv, True), _form(pivots, 0, n_piv, False)[coarse])
    rank = torch.empty(n_piv, dtype=torch.long, device=device)
    coarse_cell = piv_keys.view(torch.int16).argmin(dim=1)
    rank[torch.argsort(coarse_cell, stable=True)] = torch.arange(n_piv, device=device)
    cells_r = rank[_cells(r, frame, _form(pivots, 0, n_piv, True), query=False)]
    order_r = torch.argsort(cells_r, stable=True)
    cells_r, sr = cells_r[order_r], _split_rows(r, frame, order_r)
    if self_join:
        order_q, cells_q, sq = order_r, cells_r, sr
    else:
        cells_q = rank[_cells(q, frame, _form(pivots, 0, n_piv, False), query=True)]
        order_q = torch.argsort(cells_q, stable=True)
        cells_q, sq = cells_q[order_q], _split_rows(q, frame, order_q)
    inverse_r = torch.empty_like(order_r)
    inverse_r[order_r] = torch.arange(m, device=device)
    ex_sorted = None  # the exclusions in the locality order
    if ex is not None:
        ex_sorted = ex[order_q.cpu()]
        ex_sorted = torch.where(ex_sorted >= 0, inverse_r.cpu()[ex_sorted.clamp_min(0)], ex_sorted)
    bound = _error_bound(sq.norms, sr.norms, d, truncating=device.type == "cuda")
    # >= |(q_c - r_c) - (q - r) scale|: the fp32 centring, and subnormals of the scaled rows (d 2^-126)
    shift = (sq.norms["x"] + sr.norms["x"].max()) * 2.0**-23 + d * TINY
    res_d = torch.full((n, k), math.inf, device=device)  # rows in the original order
    res_i = torch.full((n, k), -1, dtype=torch.long, device=device)
    todo = torch.arange(n, device=device)  # positions in the locality order
    for attempt, margin in enumerate(CANDIDATE_MARGINS):
        kp = min(k + margin, m)
        first = attempt == 0  # all rows (sharing blocks in a self-join); then the rows the check rejected
        todo_ex = ex_sorted if first or ex_sorted is None else ex_sorted[todo.cpu()]
        todo_split = sq if first else sq.take(todo)
        best_k, best_i = _bf16_candidates(todo_split, sr, kp, todo_ex, self_join and first, max_tile_elements,
                                          cells_q[todo], cells_r)
        cand = torch.where(best_i >= 0, order_r[best_i.clamp_min(0)], best_i)
        rows = order_q[todo]
        checked = _rerank(q, r, rows, best_k, cand, k, bound[todo], shift[todo], m, frame.scale)
        done, width = checked.exact, checked.dist.shape[1]
        res_d[rows[done], :width], res_i[rows[done], :width] = checked.dist[done], checked.idx[done]
        todo, limit = todo[~done], checked.limit[~done]
        if todo.numel() == 0:
            break
    if todo.numel():  # near-ties beyond the widest list: exact brute force over the possible references
        rows = order_q[todo]
        todo_ex = None if ex_sorted is None else ex_sorted[todo.cpu()]
        rest_d, rest_i = _bf16_fallback(q, r, rows, sq.take(todo), sr, todo_ex, limit, order_r, k,
                                        frame.scale, max_tile_elements)
        res_d[rows, :rest_d.shape[1]], res_i[rows, :rest_d.shape[1]] = rest_d, rest_i
    return res_d.double().cpu() / frame.scale**2, res_i.cpu()

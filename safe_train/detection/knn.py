"""k-nearest-neighbour search with two interchangeable backends and a rule that picks between them.

``knn(query, reference, k, ...)`` returns, for every query row, the ``k`` smallest distances to the
rows of ``reference`` (ascending) and their reference indices. Distances are

- ``metric="l2"``: Euclidean, ``||q - r||`` (not squared);
- ``metric="cosine"``: ``1 - cos(q, r)``.

Excluding points: ``exclude`` is an ``[n, e]`` int64 array of reference indices that query ``i``
must never return (``-1`` = no exclusion); e.g. the query itself and its own caption when the query
is part of the reference. ``exclude_self=True`` is the shorthand ``exclude[i] = [i]``. Exclusion is
by index, never by distance, so exact duplicates of the query still count as neighbours.

If fewer than ``k`` admissible reference points exist, the missing entries are ``inf`` / ``-1``.
Inputs must be finite and exclusions must be ``-1`` or in ``[0, m)``: anything else raises ValueError
(for every backend and precision; a NaN embedding is a bug upstream, not a point to skip).

Backends:

- ``auto`` (the default): one of the two below, by a fixed rule from the device, the CPU's capabilities and
  the search's size and shape (:func:`auto_backend`; never a timing taken at run time), always an exact
  search: torch fp32 on CUDA; on a CPU faiss flat from ``AUTO_FAISS_MIN_PAIRS`` query-reference pairs on,
  torch fp32 below (faiss' per-call set-up does not pay there), torch bf16 with AMX, and torch for the
  largest self-joins (bf16 up to a width of 384 where the CPU has native bf16, else fp32 from a width of 384 on).
- ``torch``: exhaustive, tiled. Query and reference are processed in tiles whose distance block holds
  at most ``max_tile_elements`` entries, keeping a running top-k, so memory is O(tile + n·k), never
  O(n·m). Runs on CPU or CUDA (``device``). A self-join (the same tensor as query and reference with
  ``exclude_self`` and symmetric exclusions) computes each pair of tiles once and uses the block for
  both. ``precision`` picks how the blocks are computed (both compare every pair; they differ in
  rounding):

  - ``"fp32"`` (this module): ``d2 = |q|^2 + |r|^2 - 2 q.r`` by float32 GEMM, per-block two-stage exact
    top-k (``_block_topk``). The expansion cancels for near-duplicates: distances much smaller than
    ``|q|`` carry an absolute error of about ``2^-22 (|q|^2 + |r|^2)``.
  - ``"bf16"`` (:mod:`safe_train.detection.knn_bf16`, which describes the method and its proof): a
    bfloat16 GEMM (AMX / AVX512-BF16 / tensor cores) finds candidates, which are re-ranked in float32 in
    difference form, ``|q - r|^2``, and checked against a proven error bound (retries, then an exact
    brute force, for the rows the check rejects); the result is the exact k nearest up to the float32
    rounding of the re-rank, so this mode is *more* accurate than ``"fp32"``. Extra memory: about one
    fp32 copy of query and reference, plus up to ``knn_bf16.FORM_CACHE_BYTES`` of GEMM operands.

  ``precision="auto"`` (default) is ``"bf16"`` on CPUs with native bf16 GEMMs (``bf16_is_fast``) for searches
  of at least ``AUTO_BF16_MIN_PAIRS`` query-reference pairs, else ``"fp32"``: below that the split and
  re-rank cost more than the faster GEMM saves (a 1,024-sample batch reference is 3-4x slower in bf16).
  ``"auto"`` never picks bf16 on CUDA (neither timed nor proven exact on GPUs): there it is always ``"fp32"``.
- ``faiss``: ``flat`` (exact, IndexFlatL2 / IndexFlatIP) or ``ivf`` (IndexIVFFlat, approximate:
  ``nlist`` inverted lists, ``nprobe`` visited per query). Uses faiss-gpu when it is importable and
  ``device`` is CUDA (one ``StandardGpuResources`` per GPU, cached for the process: building it allocates
  scratch memory and streams). Searches ``k + e`` neighbours and removes the excluded ones afterwards.
  faiss flat computes the same ``|q|^2 + |r|^2 - 2 q.r`` expansion in fp32 as torch's ``"fp32"`` (same
  accuracy; tested against float64 brute force) and runs with ``torch.get_num_threads()`` threads.

Precision of the GEMMs: OpenCLIP sets ``torch.backends.cuda.matmul.allow_tf32 = True`` whenever CUDA is
available, and ``torch.set_float32_matmul_precision("high" / "medium")`` lets oneDNN use bf16 for fp32
matrix products on CPUs too. TF32 keeps 10 mantissa bits: a near-duplicate pair at distance 0.011 gets
~24% relative error instead of 0.03%, and near-duplicate clusters are exactly what poisons form. So every
:func:`knn` call runs under :func:`exact_fp32_matmul` (IEEE fp32 GEMMs, the caller's settings restored
afterwards, also on exceptions): in-loop scores then equal those of ``safe-train detect``.

Tiles on CUDA: with the default ``max_tile_elements=None`` a CPU search uses ``DEFAULT_TILE_ELEMENTS``
(32 MB of distances per tile, cache-friendly), a CUDA search :func:`tile_elements`: a distance block of
up to ``CUDA_TILE_FRACTION`` of the device's free memory, between ``DEFAULT_TILE_ELEMENTS`` and
``CUDA_MAX_TILE_ELEMENTS`` (small GEMMs leave a GPU idle). The exclusion matrix is copied to the device
once per call and masked without host synchronisation; results are copied back once per call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from safe_train.detection.knn_bf16 import GROUP, REFERENCE_TILE, bf16_is_fast, mask_exclusions, torch_knn_bf16

__all__ = ["AUTO_BF16_MAX_DIM", "AUTO_BF16_MIN_PAIRS", "AUTO_FAISS_MIN_PAIRS", "AUTO_LARGE_PAIRS",
           "AUTO_SELF_JOIN_FP32_MIN_DIM", "BACKENDS", "CUDA_MAX_TILE_ELEMENTS", "CUDA_TILE_FRACTION",
           "DEFAULT_TILE_ELEMENTS", "METRICS", "PRECISIONS", "amx_is_available", "auto_backend", "bf16_is_fast",
           "exact_fp32_matmul", "faiss_available", "knn", "tile_elements"]

Array = np.ndarray | torch.Tensor

METRICS = ("l2", "cosine")
BACKENDS = ("auto", "torch", "faiss")
PRECISIONS = ("auto", "fp32", "bf16")
# "auto" uses bf16 from this many query x reference pairs on (measured on a 2-core Sapphire Rapids, one
# thread, self-joins with k = 16: bf16 / fp32 time 3.5-4 at 1,024 rows, 0.9-1.6 at 2,048-4,096, 0.8-0.97
# at 8,192, 0.5-0.8 at 16,384; d = 128 and 512)
AUTO_BF16_MIN_PAIRS = 8192 * 8192
# backend="auto" on a CPU (auto_backend, which gives the measurements): faiss flat from this many query x
# reference pairs on (a 1,024-image in-loop batch against its 2,048 images and captions); self-joins from
# AUTO_LARGE_PAIRS on stay on torch, fp32 from AUTO_SELF_JOIN_FP32_MIN_DIM columns, bf16 (native bf16 without
# AMX) up to AUTO_BF16_MAX_DIM
AUTO_FAISS_MIN_PAIRS = 1024 * 2048
AUTO_LARGE_PAIRS = 32768 * 32768
AUTO_SELF_JOIN_FP32_MIN_DIM = 384
AUTO_BF16_MAX_DIM = 384
DEFAULT_TILE_ELEMENTS = 1 << 23  # 8M distances = 32 MB of float32 per tile
CUDA_MAX_TILE_ELEMENTS = 1 << 28  # 1 GB of float32 distances per tile at most on a GPU
CUDA_TILE_FRACTION = 16  # a CUDA tile's distance block takes at most 1/16 of the free device memory: the
# two-stage top-k and the merge add about as much again, and training's activations must still fit

# legacy switches and the per-backend ``fp32_precision`` settings (torch >= 2.9) that choose how fp32
# matrix products are computed; ``exact_fp32_matmul`` saves and restores all of them
_PRECISION_PATHS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                    "mkldnn.rnn")


def _backend(path: str) -> Any:
    node: Any = torch.backends
    for part in filter(None, path.split(".")):
        node = getattr(node, part, None)
    return node


def _legacy_precision() -> tuple[Any, Any, Any]:
    """``(cuda.matmul.allow_tf32, cudnn.allow_tf32, get_float32_matmul_precision())``; None where torch >= 2.9
    refuses to answer (the caller mixed the legacy and the per-backend settings)."""
    values: list[Any] = []
    for read in (lambda: torch.backends.cuda.matmul.allow_tf32, lambda: torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            values.append(read())
        except RuntimeError:
            values.append(None)
    return values[0], values[1], values[2]


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """IEEE float32 matrix products inside (no TF32 on CUDA, no bf16 passes in oneDNN), whatever the caller
    (OpenCLIP: ``allow_tf32 = True``) set; every setting restored on exit, also after an exception.

    Restores the legacy switches first, then any per-backend ``fp32_precision`` that differs: that order
    leaves both the settings and the readability of the legacy getters as they were (torch 2.9+ raises on a
    legacy read after a mix of both APIs)."""
    legacy = _legacy_precision()
    per_backend = [(path, getattr(_backend(path), "fp32_precision", None)) for path in _PRECISION_PATHS]
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        matmul_tf32, cudnn_tf32, matmul_precision = legacy
        if matmul_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        for path, value in per_backend:
            node = _backend(path)
            if value is not None and getattr(node, "fp32_precision", value) != value:
                node.fp32_precision = value


def tile_elements(device: str | torch.device | None) -> int:
    """Distances per tile for ``device``: ``DEFAULT_TILE_ELEMENTS`` on the CPU; on CUDA 1/``CUDA_TILE_FRACTION``
    of the free device memory, clamped to ``[DEFAULT_TILE_ELEMENTS, CUDA_MAX_TILE_ELEMENTS]``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return DEFAULT_TILE_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    budget = free // (CUDA_TILE_FRACTION * 4)  # float32 distances
    return int(min(CUDA_MAX_TILE_ELEMENTS, max(DEFAULT_TILE_ELEMENTS, budget)))


def amx_is_available(device: str | torch.device | None = None) -> bool:
    """Whether ``device`` is a CPU with AMX tiles, where the bf16 path is the fastest from ``AUTO_BF16_MIN_PAIRS``
    on. Native bf16 without AMX (AVX512-BF16: AMD Zen 4, Cooper Lake) runs its ``3d + 4``-wide bf16 GEMM at
    only twice the fp32 rate, and wins there only for large, narrow self-joins (:func:`auto_backend`)."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bf16_is_fast(device) and is_amx is not None and bool(is_amx())


def auto_backend(n: int, m: int, d: int, device: str | torch.device | None = None, *, self_join: bool = False,
                 precision: str = "auto") -> tuple[str, str]:
    """The ``(backend, precision)`` that ``backend="auto"`` runs for ``n`` queries x ``m`` references of width ``d``.

    ``self_join``: the query is the reference with ``exclude_self`` and symmetric exclusions (torch then
    multiplies each pair of tiles once). One fixed rule (never a timing taken at run time, so a search's
    backend, result and speed are reproducible); ``pairs = n * m``; the first match wins:

    1. ``precision`` "fp32" or "bf16" (a torch-only option): ``("torch", precision)``;
    2. not a CPU (CUDA): ``("torch", "fp32")`` with TF32 off (faiss-gpu and the bf16 path are untimed on GPUs);
    3. a CPU with AMX (:func:`amx_is_available`) and ``pairs >= AUTO_BF16_MIN_PAIRS``: ``("torch", "bf16")``;
    4. a self-join of ``pairs >= AUTO_LARGE_PAIRS``: ``("torch", "bf16")`` if the CPU has native bf16
       (``bf16_is_fast``; AVX512-BF16 without AMX here) and ``d <= AUTO_BF16_MAX_DIM``, else ``("torch",
       "fp32")`` if ``d >= AUTO_SELF_JOIN_FP32_MIN_DIM``;
    5. faiss importable and ``pairs >= AUTO_FAISS_MIN_PAIRS``: ``("faiss", "fp32")``, i.e. faiss flat;
    6. otherwise ``("torch", "fp32")``.

    Every choice is exact (bf16 after its proven re-rank). Measured on an AMD EPYC (Zen 4: AVX512-BF16, no
    AMX; 2 vCPUs shared with a training job), clustered float32, k = 16, d = 128-512, CPU time of faiss
    flat / torch fp32 on 1 and 2 threads:

    - in-loop batch shapes (b image queries against 2b images and captions, excluding self and own caption;
      the 2b x 2b reference self-join): 0.8-1.4 up to 512 x 1,024, mixed at 1,024 x 1,024 (0.8-0.9 on 1
      thread, 1.1-1.2 at d = 128 on 2 with twice the wall time), 0.53-0.9 from 1,024 x 2,048 on: hence
      ``AUTO_FAISS_MIN_PAIRS``;
    - general searches (query != reference), 4,096-20,000 squared: 0.42-0.78 at every d; torch bf16 / faiss
      1.3-1.6 at 20,000 x 20,000;
    - self-joins up to 20,000 rows: 0.53-0.68 at d = 128 (from 2,048 rows), 0.7-1.03 at d = 256, 0.8-0.95
      at d = 512; torch bf16 / faiss 1.5 at 8,192 x 128, 0.96-1.05 at 20,000 rows (d = 128, 256);
    - self-joins of 32,768 and 50,000 rows (rule 4; 2 threads, one run each unless noted), CPU seconds
      torch fp32 / torch bf16 / faiss: d = 128: 18.4 / 9.6 / 12.0 at 50,000 (best of 2; 1 thread: 17.2 / 8.3
      / 9.4), bf16 / faiss 0.84 at 32,768; d = 256: 24.7 / 16.6 / 20.5; d = 384: 12.2 / 10.8 / 12.3 and
      25.0 / 24.1 / 28.2; d = 512: 14.4 / 15.7 / 15.9 and 31.0 / 35.0 / 32.3 (1 thread: 28.6 / 33.1 / 33.4).
      Torch's self-join multiplies each pair of tiles once, which wins once the GEMM dominates; bf16's
      ``3d + 4``-wide GEMM runs at only twice the fp32 rate without AMX, which stops paying beyond d = 384.

    With AMX (Sapphire Rapids) bf16 took 0.44x faiss' time at 50,000 x 128 (benchmarks/RESULTS.md). Reproduce
    the self-joins with ``benchmarks/knn_vs_sklearn.py --n N --dim D`` (it prints what auto resolved to).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown kNN precision {precision!r}; choose from {PRECISIONS}")
    if precision != "auto":
        return "torch", precision
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        return "torch", "fp32"
    pairs = n * m
    if pairs >= AUTO_BF16_MIN_PAIRS and amx_is_available(dev):
        return "torch", "bf16"
    if self_join and pairs >= AUTO_LARGE_PAIRS:
        if d <= AUTO_BF16_MAX_DIM and bf16_is_fast(dev):
            return "torch", "bf16"
        if d >= AUTO_SELF_JOIN_FP32_MIN_DIM:
            return "torch", "fp32"
    if pairs >= AUTO_FAISS_MIN_PAIRS and faiss_available():
        return "faiss", "fp32"
    return "torch", "fp32"


def _as_tensor(x: Array) -> torch.Tensor:
    """``x`` as a float32 tensor without autograd history (NumPy arrays: shared memory where possible)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.detach().float()


def _exclusions(n: int, m: int, exclude: Array | None, exclude_self: bool) -> torch.Tensor | None:
    """The ``[n, e]`` exclusion matrix (or None); entries must be -1 or a reference index in ``[0, m)``."""
    parts = []
    if exclude is not None:
        ex = torch.as_tensor(np.asarray(exclude) if isinstance(exclude, np.ndarray) else exclude).long()
        if ex.ndim == 1:
            ex = ex[:, None]
        if ex.shape[0] != n:
            raise ValueError(f"exclude has {ex.shape[0]} rows for {n} queries")
        ex = ex.cpu()
        if ex.numel() and bool(((ex < -1) | (ex >= m)).any()):
            raise ValueError(f"knn: exclude holds indices other than -1 and the reference indices [0, {m})")
        parts.append(ex)
    if exclude_self:
        parts.append(torch.arange(n)[:, None])
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def _check_finite(x: torch.Tensor) -> None:
    """Raise ValueError if ``x`` holds NaN or +-inf (column minima / maxima propagate both: no temporary)."""
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x, dim=0))).all()):
        raise ValueError("knn: query/reference contain non-finite values")


def knn(query: Array, reference: Array, k: int, *, metric: str = "l2", exclude: Array | None = None,
        exclude_self: bool = False, backend: str = "auto", device: str | torch.device | None = None,
        max_tile_elements: int | None = None, index: str = "flat", nlist: int | None = None,
        nprobe: int = 8, seed: int = 0, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference rows of every query row.

    Returns ``(distances [n, k] float32, indices [n, k] int64)``, both on the CPU. See the module
    docstring for metrics, exclusion, backends and ``precision`` ("auto", "fp32", "bf16"; torch backend
    only, faiss ignores it). ``backend="auto"`` (default) runs :func:`auto_backend`'s choice, always an exact
    one (``index`` must stay "flat"). ``max_tile_elements=None``: :func:`tile_elements` of the compute device. The
    GEMMs run in IEEE fp32 whatever the global TF32 settings (:func:`exact_fp32_matmul`). Raises ValueError
    for non-finite inputs and out-of-range exclusions.
    """
    with exact_fp32_matmul():
        return _knn(query, reference, k, metric=metric, exclude=exclude, exclude_self=exclude_self, backend=backend,
                    device=device, max_tile_elements=max_tile_elements, index=index, nlist=nlist, nprobe=nprobe,
                    seed=seed, precision=precision)


def _knn(query: Array, reference: Array, k: int, *, metric: str, exclude: Array | None, exclude_self: bool,
         backend: str, device: str | torch.device | None, max_tile_elements: int | None, index: str,
         nlist: int | None, nprobe: int, seed: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` under the precision it sets."""
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
        raise ValueError(f"query {tuple(q.shape)} and reference {tuple(r.shape)} must be 2-D with equal "
                         "width")
    if exclude_self and q.shape[0] != r.shape[0]:
        raise ValueError("exclude_self needs the query to be the reference (same number of rows)")
    same = exclude_self and q.data_ptr() == r.data_ptr() and q.shape == r.shape and q.stride() == r.stride()
    _check_finite(q)
    if not same:
        _check_finite(r)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        r = q if same else torch.nn.functional.normalize(r, dim=1)
    ex = _exclusions(q.shape[0], r.shape[0], exclude, exclude_self)
    dev = torch.device(device) if device is not None else q.device
    symmetric = same and _is_symmetric(ex)  # on the CPU copy: before the move below
    if backend == "auto":
        if index != "flat":
            raise ValueError(f"index={index!r} needs backend='faiss': backend='auto' picks exact searches only")
        backend, precision = auto_backend(q.shape[0], r.shape[0], q.shape[1], dev, self_join=symmetric,
                                          precision=precision)
    if max_tile_elements is None:  # (faiss tiles itself)
        max_tile_elements = tile_elements(dev) if backend == "torch" else DEFAULT_TILE_ELEMENTS
    large = q.shape[0] * r.shape[0] >= AUTO_BF16_MIN_PAIRS
    auto_bf16 = precision == "auto" and large and dev.type == "cpu" and bf16_is_fast(dev)  # never on CUDA
    bf16 = backend == "torch" and (precision == "bf16" or auto_bf16)
    if bf16:
        sq_dist, idx = torch_knn_bf16(q, r, k, ex, symmetric, device, max_tile_elements)
    elif backend == "torch":
        ex = None if ex is None else ex.to(dev, non_blocking=True)  # once per call, not once per tile
        if symmetric:
            sq_dist, idx = _torch_knn_self(q, k, ex, device, max_tile_elements)
        else:
            sq_dist, idx = _torch_knn(q, r, k, ex, device, max_tile_elements)
    else:
        sq_dist, idx = _faiss_knn(q, r, k, ex, device, index, nlist, nprobe, seed)
    sq_dist = sq_dist.clamp_min(0)  # float64 from the bf16 path (squared distances may exceed fp32's range)
    dist = sq_dist / 2 if metric == "cosine" else sq_dist.sqrt()  # unit vectors: ||q-r||^2 = 2 (1 - cos)
    dist = dist.float()
    dist[idx < 0] = math.inf
    return dist, idx


def _torch_knn(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None,
               device: str | torch.device | None,
               max_tile_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared-L2 top-k by tiles: ``d2 = |q|^2 + |r|^2 - 2 q.r``, one tile of distances at a time."""
    device = torch.device(device) if device is not None else q.device
    n, m = q.shape[0], r.shape[0]
    kk = min(k, m)
    out_d = torch.full((n, k), math.inf, device=device)  # on the device: one copy back per call
    out_i = torch.full((n, k), -1, dtype=torch.long, device=device)
    if n == 0 or m == 0:
        return out_d.cpu(), out_i.cpu()
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
                mask_exclusions(block, ex[qs:qe], 0, rs)
            best_d, best_i = _merge_topk(best_d, best_i, block, rs, kk)
        best_d = best_d + q_sq
        best_i.masked_fill_(torch.isinf(best_d), -1)
        out_d[qs:qe, :kk] = best_d
        out_i[qs:qe, :kk] = best_i
    return out_d.cpu(), out_i.cpu()


def _is_symmetric(ex: torch.Tensor | None) -> bool:
    """Whether "j is excluded for i" implies "i is excluded for j" (the self-join may then share blocks)."""
    if ex is None:
        return True
    rows = torch.arange(ex.shape[0])[:, None].expand_as(ex)
    valid = ex >= 0
    i, j = rows[valid], ex[valid]
    return bool((ex[j] == i[:, None]).any(dim=1).all())


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
            mask_exclusions(block, ex, i0, j0)
            best_d[i0:i1], best_i[i0:i1] = _merge_topk(best_d[i0:i1], best_i[i0:i1], block, j0, kk)
            if j0 != i0:
                best_d[j0:j1], best_i[j0:j1] = _merge_topk(best_d[j0:j1], best_i[j0:j1], block, i0, kk, dim=0)
    best_i.masked_fill_(torch.isinf(best_d), -1)
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.long)
    out_d[:, :kk], out_i[:, :kk] = best_d.cpu(), best_i.cpu()
    return out_d, out_i


def _block_topk(block: torch.Tensor, kk: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates that include the ``kk`` smallest entries along ``dim`` of ``block``, and their positions.

    Returns ``[other, c]`` tensors, ``c >= kk`` (for ``dim=0``: per column); the caller's top-k
    picks the final ``kk``. Two stages, because a top-k over the
    whole block costs as much as the GEMM that made it: the positions along ``dim`` are cut into
    ``size // GROUP`` strided groups (group g = {g, g + n_groups, g + 2 n_groups, ...}, so each
    group minimum is an element-wise minimum of contiguous slices, which vectorises). Fewer than
    ``kk`` groups can have a minimum below the kk-th smallest value, so the ``kk`` groups with the
    smallest minima contain all the ``kk`` smallest entries; the final top-k runs over
    ``kk * GROUP`` candidates only (done by the caller, merged with its running best). Along ``dim=0``
    this needs no transposed copy of the block.
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
    """Running top-k update: the block's own top-k along ``dim`` merged with the current best (sorted)."""
    d, i = _block_topk(block, min(kk, block.shape[dim]), dim)
    merged_d = torch.cat([best_d, d], dim=1)
    merged_i = torch.cat([best_i, i + offset], dim=1)
    best_d, pos = torch.topk(merged_d, kk, dim=1, largest=False, sorted=True)
    return best_d, torch.gather(merged_i, 1, pos)


def faiss_available() -> bool:
    """Whether the faiss backend can run (faiss importable)."""
    try:
        import faiss  # noqa: F401  # deferred: an optional dependency, only probed for here
    except ImportError:
        return False
    return True


_FAISS_GPU_RESOURCES: dict[int, Any] = {}  # GPU index -> faiss.StandardGpuResources, for the process


def _faiss_gpu_resources(faiss: Any, gpu: int) -> Any:
    """One ``StandardGpuResources`` per GPU, built on first use: each holds scratch memory and streams, and
    rebuilding it per call (once per training step with the batch reference) costs an allocation each time."""
    if gpu not in _FAISS_GPU_RESOURCES:
        _FAISS_GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _FAISS_GPU_RESOURCES[gpu]


@contextlib.contextmanager
def _faiss_threads(faiss: Any) -> Iterator[None]:
    """faiss' OpenMP threads set to ``torch.get_num_threads()`` inside, restored on exit: faiss-cpu wheels bundle
    their own OpenMP runtime, which ``torch.set_num_threads`` does not reach when faiss is imported first, and a
    faiss search (e.g. one that ``backend="auto"`` picked in the training loop) would then take every core."""
    before, threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    if threads != before:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        if threads != before:
            faiss.omp_set_num_threads(before)


def _faiss_knn(q: torch.Tensor, r: torch.Tensor, k: int, ex: torch.Tensor | None,
               device: str | torch.device | None, index: str, nlist: int | None, nprobe: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-L2 top-(k+e) with faiss, then the excluded indices removed per row."""
    try:
        import faiss  # deferred: an optional dependency (faiss-cpu or faiss-gpu), needed by this backend only
    except ImportError:
        raise ImportError("the faiss kNN backend needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    if index not in ("flat", "ivf"):
        raise ValueError(f"unknown faiss index {index!r}; choose flat or ivf")
    n, m = q.shape[0], r.shape[0]
    d = q.shape[1]
    xq = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
    xr = np.ascontiguousarray(r.cpu().numpy(), dtype=np.float32)
    with _faiss_threads(faiss):
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
        use_gpu = (device is not None and torch.device(device).type == "cuda"
                   and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        if use_gpu:
            gpu = torch.device(device).index
            gpu = torch.cuda.current_device() if gpu is None else gpu
            idx = faiss.index_cpu_to_gpu(_faiss_gpu_resources(faiss, gpu), gpu, idx)
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

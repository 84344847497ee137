"""Small torch.distributed helpers that are correct on one process too."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


_COMM_DEVICE: torch.device | None = None  # the run's device (set by the engine)
_CONTROL_GROUP: Any = None  # a gloo group for small control messages when the default backend is NCCL


def set_comm_device(device: torch.device | str) -> None:
    """Tell the helpers which CUDA device NCCL must use: the run's, which with ``--no-set-device-rank`` (one
    visible GPU per task) or a caller's own ``torch.cuda.set_device`` need not be ``current_device()``."""
    global _COMM_DEVICE
    _COMM_DEVICE = torch.device(device)


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors."""
    if is_initialized() and dist.get_backend() == "nccl":
        if _COMM_DEVICE is not None and _COMM_DEVICE.type == "cuda":
            return _COMM_DEVICE
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_control_group(timeout: timedelta | None = None) -> None:
    """Create the gloo side group that carries control integers and small objects, so that they neither
    copy to the GPU nor wait for the CUDA stream (NCCL would). Collective: every rank calls it, once, at
    the same point (the engine does when training starts).

    ``timeout``: how long a rank waits in this group (e.g. while rank 0 alone scores a global detection
    reference, :func:`gather_to_rank0`); pass the run's ``--dist-timeout-minutes``. None: torch's default
    for a new gloo group (30 minutes), which does not follow the default group's timeout."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is not None or not is_initialized() or dist.get_world_size() == 1:
        return
    if dist.get_backend() != "gloo":
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout)


def _control() -> Any:
    """The group for control messages (None: the default group, already gloo)."""
    return _CONTROL_GROUP if is_initialized() and dist.get_backend() != "gloo" else None


def _control_device() -> torch.device:
    return torch.device("cpu") if _control() is not None else _comm_device()


def gather_arrays(array: np.ndarray) -> list[np.ndarray]:
    """All-gather a 1-D numpy array of any length from every rank (rank order)."""
    array = np.ascontiguousarray(array).reshape(-1)
    if not is_initialized() or dist.get_world_size() == 1:
        return [array]
    device = _comm_device()
    world = dist.get_world_size()
    length = torch.tensor([len(array)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    lengths = [int(n.item()) for n in lengths]
    longest = max(lengths)
    if longest == 0:
        return [array[:0].copy() for _ in range(world)]
    # move raw bytes so every numpy dtype (int64, float32, bool) travels unchanged
    raw = np.zeros(longest * array.dtype.itemsize, dtype=np.uint8)
    raw[: array.nbytes] = array.view(np.uint8)
    tensor = torch.from_numpy(raw).to(device)
    received = [torch.zeros_like(tensor) for _ in range(world)]
    dist.all_gather(received, tensor)
    return [r.cpu().numpy()[: n * array.dtype.itemsize].view(array.dtype).copy()
            for r, n in zip(received, lengths, strict=True)]


def all_gather_objects(obj: Any) -> list[Any]:
    """All-gather small picklable objects (rank order)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control())
    return out


def all_reduce_ints(values: list[int], op: str = "sum") -> list[int]:
    """Element-wise reduction of a few integers across ranks ("sum", "min" or "max")."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.int64, device=_control_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=_control())
    return [int(v) for v in tensor.tolist()]


def all_reduce_int(value: int, op: str = "sum") -> int:
    return all_reduce_ints([value], op)[0]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_control())
    return holder[0]


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a detached tensor of the same shape from every rank along dim 0 (rank order)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    device = _comm_device()
    local = tensor.detach().to(device).contiguous()
    received = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(received, local)
    return torch.cat(received).to(tensor.device)


# ---- bulk transfers that bypass NCCL (detection) ------------------------------------------------------
GATHER_CHUNK_BYTES = 1 << 26
"""Bytes each rank sends per round of :func:`gather_to_rank0` / :func:`broadcast_array` (64 MB): rank 0
holds ``world_size`` such chunks at a time on top of the result."""


def _bulk() -> tuple[Any, torch.device]:
    """Group and device for bulk host arrays: the gloo control group when there is one (no GPU memory, no
    NCCL collective held open), else the default group on its device."""
    group = _control()
    return group, (torch.device("cpu") if group is not None else _comm_device())


def all_gather_counts(count: int) -> list[int]:
    """One integer from every rank (rank order), through the control group: no CUDA synchronisation."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [int(count)]
    local = torch.tensor([int(count)], dtype=torch.int64, device=_control_device())
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local, group=_control())
    return [int(t.item()) for t in out]


def all_gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """All-gather a detached 2-D tensor with any number of rows per rank, on ``x``'s device (rank order).

    With NCCL the rows never leave the GPU; ``counts`` (rows per rank, e.g. from :func:`all_gather_counts`)
    saves the exchange of the row counts. Pads every rank to the longest, gathers, strips the padding."""
    x = x.detach()
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    counts = all_gather_counts(x.shape[0]) if counts is None else counts
    device = _comm_device()
    longest = max(counts)
    local = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    local[: x.shape[0]] = x.to(device, non_blocking=True)
    received = [torch.empty_like(local) for _ in counts]
    dist.all_gather(received, local)
    return torch.cat([r[:n] for r, n in zip(received, counts, strict=True)]).to(x.device, non_blocking=True)


def _rounds(rows: list[int], row_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(rows per round, number of rounds) for moving ``rows`` rows per rank in chunks of ``chunk_bytes``."""
    per_round = max(1, chunk_bytes // max(1, row_bytes))
    return per_round, -(-max(rows) // per_round) if max(rows) else 0


def gather_to_rank0(array: np.ndarray, chunk_bytes: int = GATHER_CHUNK_BYTES) -> np.ndarray | None:
    """Concatenate every rank's rows (first axis; the other axes and the dtype must agree) on rank 0 only.

    Rank 0 returns the array in rank order, the other ranks None: they never hold the whole array. Moves raw
    bytes through the gloo control group (when the default backend is NCCL and :func:`init_control_group`
    ran; else the default group) in rounds of at most ``chunk_bytes`` per rank, so neither the GPUs nor a
    sender's host ever hold more than one chunk extra. Collective: every rank calls it."""
    array = np.ascontiguousarray(array)
    if not is_initialized() or dist.get_world_size() == 1:
        return array
    group, device = _bulk()
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = all_gather_counts(array.shape[0])
    row_shape, dtype = array.shape[1:], array.dtype
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    per_round, rounds = _rounds(rows, row_bytes, chunk_bytes)
    raw = array.reshape(array.shape[0], row_bytes // dtype.itemsize).view(np.uint8)
    out = np.empty((sum(rows), row_bytes), np.uint8) if rank == 0 else None
    starts = np.concatenate([[0], np.cumsum(rows)])
    for r in range(rounds):
        lo = r * per_round
        send = torch.zeros((per_round, row_bytes), dtype=torch.uint8)
        mine = raw[lo: lo + per_round]
        send[: len(mine)] = torch.from_numpy(mine)
        send = send.to(device)
        bufs = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
        dist.gather(send, gather_list=bufs, dst=0, group=group)
        if rank == 0:
            for src, buf in enumerate(bufs):
                n = max(0, min(per_round, rows[src] - lo))
                out[starts[src] + lo: starts[src] + lo + n] = buf[:n].cpu().numpy()
    if rank != 0:
        return None
    return out.view(dtype).reshape(sum(rows), *row_shape)


def broadcast_array(array: np.ndarray | None, src: int = 0, chunk_bytes: int = GATHER_CHUNK_BYTES) -> np.ndarray:
    """Rank ``src``'s array on every rank (the others pass None), in chunks through the control group (no
    pickling; waiting ranks wait in gloo, not in an NCCL collective). Collective: every rank calls it."""
    if not is_initialized() or dist.get_world_size() == 1:
        assert array is not None, "broadcast_array: the source rank must pass an array"
        return array
    header = broadcast_object(None if array is None else (array.shape, array.dtype.str), src=src)
    shape, dtype = tuple(header[0]), np.dtype(header[1])
    group, device = _bulk()
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8) if dist.get_rank() == src else None
    total = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    out = np.empty(total, np.uint8)
    for lo in range(0, total, max(1, chunk_bytes)):
        hi = min(total, lo + chunk_bytes)
        buf = torch.from_numpy(flat[lo:hi].copy()) if flat is not None else torch.empty(hi - lo, dtype=torch.uint8)
        buf = buf.to(device)
        dist.broadcast(buf, src=src, group=group)
        out[lo:hi] = buf.cpu().numpy()
    return out.view(dtype).reshape(shape)

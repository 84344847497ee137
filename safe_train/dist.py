"""Small torch.distributed helpers that are correct on one process too."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    dist.all_gather_object(out, obj)
    return out


def all_reduce_ints(values: list[int], op: str = "sum") -> list[int]:
    """Element-wise reduction of a few integers across ranks ("sum", "min" or "max")."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [int(v) for v in tensor.tolist()]


def all_reduce_int(value: int, op: str = "sum") -> int:
    return all_reduce_ints([value], op)[0]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
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

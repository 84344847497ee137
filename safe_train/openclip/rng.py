"""Every RNG stream the training loop draws from, captured as plain data (checkpoints, evaluation that must
not consume the training stream)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (python, numpy, torch CPU and CUDA), as plain Python data.

    Plain types (bytes, ints, lists) so the state can be all-gathered and loaded with weights_only=True.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, key.astype(np.int64).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the current device's generator only: a job resumed with fewer visible GPUs per task (one per task
        # under srun, all of them under torchrun) has no generator for the others, and a task only draws from
        # its own device anyway
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device()).numpy().tobytes()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    saved = state.get("cuda")
    if saved is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(saved, list):  # written before the current-device format: one state per visible GPU
        if not saved:
            return
        saved = saved[device] if device < len(saved) else saved[0]
    torch.cuda.set_rng_state(torch.frombuffer(bytearray(saved), dtype=torch.uint8), device)

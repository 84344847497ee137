"""Stable per-sample identity, the key of every per-sample decision.

- CSV datasets: the 0-based data row of the file (header excluded).
- webdataset shards: a 63-bit hash of ``"<shard file name>/<__key__>"`` so the id survives shard
  shuffling, resampling, workers and ranks, and does not depend on where the shards are mounted.

Ids are non-negative int64 so they travel in torch tensors (torch has no uint64 arithmetic);
-1 is reserved for "no sample" (padding).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

NO_SAMPLE = -1
_MASK_63 = (1 << 63) - 1


def shard_name(url: str) -> str:
    """The part of a shard url that identifies it: its file name (e.g. ``00012.tar``)."""
    return os.path.basename(url.rstrip("/"))


def webdataset_sample_id(shard_url: str, key: str) -> int:
    """The id of the sample ``key`` in shard ``shard_url``."""
    digest = hashlib.blake2b(f"{shard_name(shard_url)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def csv_sample_ids(num_rows: int) -> np.ndarray:
    """Ids of a CSV file's rows: their 0-based index."""
    return np.arange(num_rows, dtype=np.int64)

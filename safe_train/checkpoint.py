"""Checkpoints as one unit: OpenCLIP's ``.pt`` plus its ``.safe_train/`` sidecar, written atomically,
stamped with a shared token, and found again by ``--resume latest`` only when both halves agree.

Why: OpenCLIP writes ``epoch_N.pt`` in place (a kill leaves a 0-byte file that ``--resume latest``
then picks on every retry), and the sidecar and the model are two writes (a kill between them pairs
an old model with new state). Here every ``.pt`` goes through :func:`atomic_save`; the checkpoint
dict carries ``{"safe_train": stamp}`` and the sidecar's ``meta.json`` the same ``token``; the
resolver skips (and, for unreadable files, sets aside as ``*.corrupt``) whatever does not pair up,
and picks the newest consistent checkpoint, an epoch's or a step's.

Step checkpoints are ``step_<global step>.pt`` with ``step_<global step>.safe_train/``; the last
``--keep-step-checkpoints`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safe_train.errors import CheckpointError

log = logging.getLogger(__name__)

STAMP_KEY = "safe_train"
SIDECAR_SUFFIX = ".safe_train"
STEP_PREFIX = "step_"
META_FILE = "meta.json"
CORRUPT_SUFFIX = ".corrupt"
_EPOCH_RE = re.compile(r"^epoch_(\d+|latest)\.pt$")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def new_token() -> str:
    return uuid.uuid4().hex


def sidecar_path(checkpoint_path: str | os.PathLike) -> Path:
    """``epoch_3.pt`` → ``epoch_3.safe_train/`` (the safe-train state of that checkpoint)."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def step_checkpoint_path(checkpoint_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(checkpoint_dir) / f"{STEP_PREFIX}{global_step:09d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike, pattern: str = "**/*") -> None:
    """Flush the files under ``directory`` to disk before the folder is published (renamed into place)."""
    for path in Path(directory).glob(pattern):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(Path(directory))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: write beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with one clear :class:`CheckpointError` for every way it fails."""
    path = str(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a checkpoint safe-train can load with weights_only=True: "
                              f"{unpickling_reason(e)}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None


def unpickling_reason(error: BaseException) -> str:
    """What torch's weights_only unpickler refused, in a few words (its own message is a page long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it contains the Python object {found.group(1)}, which could run arbitrary code"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


PREVIOUS_SUFFIX = ".prev"


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_sidecar_meta(checkpoint_path: str | os.PathLike) -> dict[str, Any] | None:
    return _read_meta(sidecar_path(checkpoint_path))


def matching_sidecar(checkpoint_path: str | os.PathLike, token: str | None) -> Path | None:
    """The sidecar written with ``checkpoint_path``'s token: the current one, or the one it replaced (a
    sidecar is published before its checkpoint, so until the new ``.pt`` lands the old pair is the previous
    sidecar and the current ``.pt``)."""
    current = sidecar_path(checkpoint_path)
    for directory in (current, current.with_name(current.name + PREVIOUS_SUFFIX)):
        meta = _read_meta(directory)
        if meta is not None and meta.get("token") == token:
            return directory
    return None


def publish_sidecar(tmp: Path, directory: Path) -> None:
    """Move a finished sidecar into place, keeping the one it replaces as ``NAME.prev`` (still paired with
    the checkpoint file until that is replaced too)."""
    previous = directory.with_name(directory.name + PREVIOUS_SUFFIX)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)


def retire_previous_sidecar(checkpoint_path: str | os.PathLike) -> None:
    """Drop ``NAME.safe_train.prev`` once the checkpoint it paired with has been replaced."""
    current = sidecar_path(checkpoint_path)
    shutil.rmtree(current.with_name(current.name + PREVIOUS_SUFFIX), ignore_errors=True)


def retire_replaced_sidecars(checkpoint_dir: str | os.PathLike) -> None:
    """Drop every ``.prev`` sidecar whose checkpoint now carries the current sidecar's token: OpenCLIP moves
    ``tmp.pt`` over ``epoch_latest.pt`` itself, so that replacement is only seen afterwards."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return
    for previous in directory.glob(f"*{SIDECAR_SUFFIX}{PREVIOUS_SUFFIX}"):
        model = previous.with_name(previous.name[: -len(SIDECAR_SUFFIX + PREVIOUS_SUFFIX)] + ".pt")
        current = _read_meta(previous.with_name(previous.name[: -len(PREVIOUS_SUFFIX)]))
        try:
            stamp = load_checkpoint_file(model, mmap=True).get(STAMP_KEY)
        except (CheckpointError, OSError, AttributeError):
            continue  # unreadable or missing: leave it to the resolver
        if current is not None and isinstance(stamp, dict) and stamp.get("token") == current.get("token"):
            shutil.rmtree(previous, ignore_errors=True)


@dataclass
class Candidate:
    """One ``.pt`` in the checkpoint folder and what the resolver found out about it."""

    path: Path
    kind: str  # "epoch" or "step"
    stamp: dict[str, Any] | None
    epoch: int
    problem: str | None = None
    unreadable: bool = False

    @property
    def progress(self) -> tuple[int, int, int]:
        """Newer is larger: optimizer steps done, then epoch checkpoints before step checkpoints."""
        if self.stamp is not None:
            return (1, int(self.stamp.get("global_step", 0)), 1 if self.kind == "epoch" else 0)
        return (0, self.epoch, 1 if self.kind == "epoch" else 0)


def _candidate(path: Path, needs_sidecar: bool) -> Candidate:
    kind = "step" if _STEP_RE.match(path.name) else "epoch"
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes)")
        checkpoint = load_checkpoint_file(path, mmap=True)
    except CheckpointError as e:
        return Candidate(path, kind, None, -1, problem=str(e), unreadable=True)
    except OSError as e:  # gone meanwhile (another process set it aside)
        return Candidate(path, kind, None, -1, problem=f"{path}: {e}")
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint or "state_dict" not in checkpoint:
        return Candidate(path, kind, None, -1, problem=f"{path} is not a training checkpoint (no epoch/state_dict)")
    stamp = checkpoint.get(STAMP_KEY)
    candidate = Candidate(path, kind, stamp if isinstance(stamp, dict) else None, int(checkpoint["epoch"]))
    meta = read_sidecar_meta(path)
    if candidate.stamp is not None:
        matching = matching_sidecar(path, candidate.stamp.get("token"))
        if matching is not None:
            meta = _read_meta(matching)
        if meta is None:
            if needs_sidecar:
                candidate.problem = f"{path} has no complete safe-train state ({sidecar_path(path).name} missing)"
        elif matching is None:
            candidate.problem = (f"{path} (step {candidate.stamp.get('global_step')}) and {sidecar_path(path).name} "
                                 f"(step {meta.get('global_step')}) come from different saves")
        elif kind == "step":
            missing = [r for r in range(int(meta.get("world_size", 1)))
                       if not (matching / f"rank{r}.state").exists()]
            if missing:
                candidate.problem = f"{path}: its state lacks ranks {missing} (were the ranks' folders not shared?)"
    elif needs_sidecar and meta is None:
        candidate.problem = f"{path} has no safe-train state ({sidecar_path(path).name} missing)"
    return candidate


def scan_checkpoints(checkpoint_dir: str | os.PathLike, needs_sidecar: bool) -> list[Candidate]:
    """Every epoch and step checkpoint in ``checkpoint_dir``, newest first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    paths = [p for p in directory.iterdir() if p.is_file() and (_EPOCH_RE.match(p.name) or _STEP_RE.match(p.name))]
    candidates = [_candidate(p, needs_sidecar) for p in paths]
    return sorted(candidates, key=lambda c: (c.progress, c.path.name), reverse=True)


def resolve_latest(checkpoint_dir: str | os.PathLike, needs_sidecar: bool, set_aside: bool = False) -> Path | None:
    """The newest checkpoint whose model and safe-train state belong together (None: start afresh).

    Every skipped checkpoint is named in a warning; with ``set_aside`` (one process only), unreadable
    files are renamed ``*.corrupt`` so no later resume trips on them.
    """
    chosen = None
    for candidate in scan_checkpoints(checkpoint_dir, needs_sidecar):
        if candidate.unreadable:  # its progress is unknown: likely the newest, killed while it was written
            log.warning(f"--resume latest: skipping {candidate.problem}")
            if set_aside:
                target = candidate.path.with_name(candidate.path.name + CORRUPT_SUFFIX)
                os.replace(candidate.path, target)
                log.warning(f"--resume latest: set {candidate.path.name} aside as {target.name}")
        elif chosen is None:
            if candidate.problem is None:
                chosen = candidate.path
            else:
                log.warning(f"--resume latest: skipping {candidate.problem}")
    return chosen


def prune_step_checkpoints(checkpoint_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (the model file first, then its sidecar)."""
    directory = Path(checkpoint_dir)
    steps = sorted((p for p in directory.glob(f"{STEP_PREFIX}*.pt") if _STEP_RE.match(p.name)), key=lambda p: p.name)
    for path in steps[: max(len(steps) - keep, 0)]:
        path.unlink(missing_ok=True)
        side = sidecar_path(path)
        shutil.rmtree(side, ignore_errors=True)
        shutil.rmtree(side.with_name(side.name + PREVIOUS_SUFFIX), ignore_errors=True)


def remove_orphan_sidecars(checkpoint_dir: str | os.PathLike) -> None:
    """Sidecars whose checkpoint is gone (``--delete-previous-checkpoint``, pruning) and unfinished writes."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if not path.is_dir():
            continue
        if path.name.endswith(".writing"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.endswith(SIDECAR_SUFFIX):
            model = path.with_name(path.name[: -len(SIDECAR_SUFFIX)] + ".pt")
            if not model.exists() and not model.name.startswith("epoch_latest"):
                shutil.rmtree(path, ignore_errors=True)

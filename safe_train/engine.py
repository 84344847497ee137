"""The training loop: an epoch is the defense's passes, each a run of OpenCLIP steps, driven by events.

The step itself is OpenCLIP 3.3's (:class:`safe_train.openclip.TrainStep`, the one place that mirrors
upstream code). With ``--defense none`` and no callbacks every step does exactly what OpenCLIP 3.3 does
(same batches, forward, loss, backward, optimizer, scheduler and logging), so losses match to float
tolerance. What the engine adds: sample ids on every batch, passes chosen by the defense, per-sample
state synced at epoch boundaries and saved next to each checkpoint, and resumable RNG streams.

A pass over all data drops its last partial batch, as OpenCLIP does (a different few samples every epoch).
A training pass over a selection (SafeCLIP's risky and safe sets, any ``TrainPass(selection=...)``) on a
CSV keeps it as a smaller last step instead: a selection smaller than a batch would otherwise never be
trained, and a small one would lose a large share of itself every epoch. Every rank takes the same number
of steps (:meth:`safe_train.data.EpochSeededSampler.batch_sizes` gives the layout across ranks and
``--accum-freq`` micro-batches), and the learning-rate schedule counts the steps actually taken
(:meth:`Engine._lr_step`). Webdataset selection passes complete each worker's last batch with that
worker's first samples instead (:class:`safe_train.data._PaddedBatches`).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safe_train import dist
from safe_train import openclip as oc
from safe_train.checkpoint import (
    STAMP_KEY,
    atomic_save,
    fsync_tree,
    load_checkpoint_file,
    matching_sidecar,
    new_token,
    prune_step_checkpoints,
    publish_sidecar,
    remove_orphan_sidecars,
    resolve_latest,
    retire_previous_sidecar,
    retire_replaced_sidecars,
    sidecar_path,
    step_checkpoint_path,
)
from safe_train.data import (
    IdSyntheticDataset,
    LoaderInfo,
    OpenClipTransform,
    SkipCounter,
    csv_loader,
    wds_loader,
)
from safe_train.errors import CheckpointError, ConfigError, Preempted
from safe_train.interface import (
    Callback,
    Defense,
    SampleTransform,
    Selection,
    StepOutput,
    TrainContext,
    TrainPass,
)
from safe_train.openclip.step import synthetic_source
from safe_train.preemption import StopFlag
from safe_train.resume import PassPosition, ResumeSkip, is_consumed
from safe_train.state import SampleTable

log = logging.getLogger(__name__)

ENGINE_STATE_FILE = "engine.ckpt"  # not *.pt: OpenCLIP's --resume latest globs *.pt
MAP_STYLE_KINDS = ("csv", "synthetic")  # indexable datasets: csv_loader's samplers, selections and resume


@dataclass
class StepCheckpointPolicy:
    """When to write a mid-epoch checkpoint (``--save-every-n-steps``, ``--save-every-minutes``) and how
    many to keep (``--keep-step-checkpoints``). A stop signal always writes one."""

    every_n_steps: int = 0
    every_minutes: float = 0.0
    keep: int = 2

    def validate(self) -> None:
        if self.every_n_steps < 0 or self.every_minutes < 0:
            raise ConfigError("--save-every-n-steps and --save-every-minutes must be >= 0")
        if self.keep < 1:
            raise ConfigError("--keep-step-checkpoints must be >= 1")


class Engine:
    """Owns the defense, the callbacks, the sample table and the training data of one run."""

    def __init__(self, defense: Defense, callbacks: Iterable[Callback] = (), blocklist: np.ndarray | None = None,
                 track_samples: bool = False, step_checkpoints: StepCheckpointPolicy | None = None) -> None:
        self.defense = defense
        self.callbacks = list(callbacks)
        self.blocklist = np.unique(blocklist.astype(np.int64)) if blocklist is not None else None
        self.track_samples = track_samples or defense.needs_sample_tracking
        self.ctx: TrainContext | None = None
        self.main_data: LoaderInfo | None = None
        self.data_kind: str | None = None
        self._transform = None
        self._csv_dataset = None
        self._started = False
        self._seen_this_epoch: list[np.ndarray] = []
        self.step_checkpoints = step_checkpoints or StepCheckpointPolicy()
        self.step_checkpoints.validate()
        self.stop = StopFlag()
        self.dist_timeout: datetime.timedelta | None = None  # --dist-timeout-minutes (process group and side group)
        self._pending_stamp: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # this rank's state of a step checkpoint being resumed
        self._iter_rng: dict[str, Any] | None = None  # RNG right before the current pass iterator was created
        self._main_worker_rng: dict[int, dict[str, Any]] = {}  # persistent workers' RNG across epochs
        self._main_iter_rng: dict[str, Any] | None = None  # RNG when the persistent main loader first started
        self._main_iterator_started = False
        self._epoch_position: dict[str, int] = {}
        self._steps_since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()

    @property
    def hooks(self) -> list[Callback]:
        return [self.defense, *self.callbacks]

    # ---- wiring from safe_train.openclip.patch ----------------------------------------------------
    def on_parsed_args(self, args) -> None:
        if getattr(args, "horovod", False):
            raise ConfigError("--horovod is not supported; use torchrun or srun (DDP)")
        if getattr(args, "dataset_type", None) == "synthetic" and getattr(args, "train_data", None) is None:
            self._check_synthetic(args)
        self.stop.install()

    def _check_synthetic(self, args) -> None:
        """``--dataset-type synthetic`` is one constant image and caption (a smoke test): sample ids are the
        indices, so the plain loop and callbacks run on it; a defense that makes views and splits the data by
        per-sample content needs real samples."""
        if self.defense.name != "none":
            raise ConfigError(f"--dataset-type synthetic (one constant image and caption) runs only with "
                              f"--defense none; --defense {self.defense.name} needs real samples: use a small "
                              f"CSV or webdataset")
        if not getattr(args, "train_num_samples", None):
            raise ConfigError("--dataset-type synthetic needs --train-num-samples N (how many samples an epoch has)")

    @property
    def needs_sidecar(self) -> bool:
        """Whether a checkpoint without safe-train state would lose something on resume."""
        return self.track_samples or bool(self.callbacks) or self.defense.name != "none"

    def resolve_latest(self, checkpoint_dir: str, set_aside: bool) -> str | None:
        """``--resume latest``: the newest checkpoint whose model and state belong together."""
        chosen = resolve_latest(checkpoint_dir, self.needs_sidecar, set_aside=set_aside)
        return None if chosen is None else str(chosen)

    def retire_replaced_sidecars(self) -> None:
        """Rank 0 drops sidecars kept for a checkpoint OpenCLIP has since replaced (epoch_latest.pt)."""
        args = self.ctx.args if self.ctx is not None else None
        if args is not None and self.ctx.is_master and getattr(args, "checkpoint_path", None):
            retire_replaced_sidecars(args.checkpoint_path)

    def save_checkpoint_file(self, obj: Any, path: str | os.PathLike) -> None:
        """OpenCLIP's ``torch.save`` of a checkpoint: atomic, stamped with its sidecar's token."""
        if isinstance(obj, dict) and "epoch" in obj and self._pending_stamp is not None:
            obj = {**obj, STAMP_KEY: dict(self._pending_stamp)}
        atomic_save(obj, path)
        retire_previous_sidecar(path)
        name = Path(path).name
        args = self.ctx.args if self.ctx is not None else None
        if args is not None and args.delete_previous_checkpoint and name.startswith("epoch_") and name[6:-3].isdigit():
            # the new pair is complete, so the previous epoch's state can go (OpenCLIP deletes its .pt next)
            shutil.rmtree(sidecar_path(Path(path).with_name(f"epoch_{int(name[6:-3]) - 1}.pt")), ignore_errors=True)

    def _context(self, args) -> TrainContext:
        if self.ctx is None:
            self.ctx = TrainContext(args=args, table=SampleTable(), rank=args.rank, world_size=args.world_size,
                                    device=torch.device(args.device))
            dist.set_comm_device(self.ctx.device)
            # collective: every rank creates the context in its first epoch; the side group gets the run's
            # --dist-timeout-minutes (rank 0's global detection scoring waits in it)
            dist.init_control_group(timeout=self.dist_timeout)
            if self.track_samples:
                self.ctx.table.add_column("times_seen", np.int32, 0)
                self.ctx.table.add_column("last_epoch", np.int32, -1)
            for hook in self.hooks:
                hook.setup(self.ctx)
        return self.ctx

    def get_train_data(self, args, preprocess_fns, epoch: int, tokenizer, kind: str) -> LoaderInfo:
        """The run's main training loader (called by OpenCLIP's get_data)."""
        ctx = self._context(args)
        ctx.preprocess_train, ctx.preprocess_val = preprocess_fns
        ctx.tokenizer = tokenizer
        self.data_kind = kind
        self._transform = self.defense.sample_transform(ctx) or OpenClipTransform(preprocess_fns[0], tokenizer)
        self.main_data = self._build_loader(args, epoch, self._run_selection(), salt=0, main=True)
        return self.main_data

    def _adopt_synthetic(self, args, upstream: Any, epoch: int) -> None:
        """``--dataset-type synthetic``: OpenCLIP's get_data built its SyntheticDataset (the engine is not asked
        for it); train on the same image, caption, preprocessing and sampling, with the index as sample id."""
        source = synthetic_source(upstream, args)
        if source is None:
            raise ConfigError(f"safe-train trains on --dataset-type csv, webdataset or synthetic; OpenCLIP's get_data "
                              f"gave {type(getattr(upstream, 'dataloader', None)).__name__}")
        ctx = self.ctx
        ctx.preprocess_train, ctx.tokenizer = source.preprocess, source.tokenizer
        self.data_kind = "synthetic"
        self._transform = OpenClipTransform(source.preprocess, source.tokenizer)
        self._csv_dataset = IdSyntheticDataset(source.num_samples, source.image.size, self._transform,
                                               caption=source.caption)
        self.main_data = self._build_loader(args, epoch, self._run_selection(), salt=0, main=True)

    def _build_loader(self, args, epoch: int, selection: Selection | None, salt: int, main: bool = False,
                      expected: int | None = None, complete: bool = False,
                      transform: SampleTransform | None = None, keep_partial: bool = False) -> LoaderInfo:
        counter = self.main_data.skip_counter if self.main_data is not None else SkipCounter()
        transform = transform or self._transform
        if self.data_kind in MAP_STYLE_KINDS:
            info = csv_loader(args, transform, selection=selection, upstream_order=main, salt=salt,
                              skip_counter=counter, dataset=self._csv_dataset, complete=complete,
                              keep_partial=keep_partial)
            if self._csv_dataset is None:
                self._csv_dataset = info.dataloader.dataset
            if self.track_samples and len(self.ctx.table) == 0:
                self.ctx.table.register(self._csv_dataset.ids)
            return info
        return wds_loader(args, transform, epoch=epoch, selection=selection, skip_counter=counter,
                          expected_samples=expected, persistent=main)

    def _run_selection(self) -> Selection | None:
        """Samples excluded from every epoch: the blocklist plus ids the table marks as dropped."""
        excluded = [] if self.blocklist is None else [self.blocklist]
        table = self.ctx.table
        if table.has_column("dropped") and len(table):
            excluded.append(table.ids[table["dropped"].astype(bool)])
        if not excluded or sum(len(e) for e in excluded) == 0:
            return None
        return Selection.excluding(np.concatenate(excluded))

    def _pass_data(self, args, epoch: int, pass_: TrainPass, index: int) -> LoaderInfo:
        run_selection = self._run_selection()
        transform = self.defense.pass_transform(self.ctx, pass_)
        if pass_.selection is None and run_selection is None and pass_.train and transform is None:
            return self.main_data
        selection = _intersect(pass_.selection, run_selection)
        if not pass_.train:
            # an inference pass sees every selected sample (at least once): no dropped last batch
            selection = selection if selection is not None else Selection.excluding(np.zeros(0, np.int64))
            if self.data_kind in MAP_STYLE_KINDS:
                return self._build_loader(args, epoch, selection, salt=1 + index, complete=True, transform=transform)
        expected = None
        if self.data_kind == "webdataset" and selection is not None:
            base = self.main_data.dataloader.num_samples
            expected = len(selection.ids) if not selection.exclude else max(
                base - int(self.ctx.table.contains(selection.ids).sum() if len(self.ctx.table) else len(selection.ids)),
                0)
        # a training pass over a selection keeps its last partial batch (module docstring)
        info = self._build_loader(args, epoch, selection, salt=1 + index, expected=expected, transform=transform,
                                  keep_partial=pass_.selection is not None)
        untrained = getattr(info.sampler, "untrained", 0)
        if untrained and self.ctx.is_master:
            logging.info(f"Epoch {epoch} [{pass_.name}]: {untrained} of {len(info.sampler.positions)} selected "
                         f"samples are left out this epoch (every rank trains equal rows per step; see "
                         f"EpochSeededSampler.batch_sizes)")
        return info

    # ---- the epoch ----------------------------------------------------------------------------
    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None) -> None:
        """Drop-in replacement for ``open_clip_train.train.train_one_epoch``."""
        ctx = self._context(args)
        ctx.model, ctx.optimizer, ctx.scaler, ctx.scheduler, ctx.tb_writer = model, optimizer, scaler, scheduler, tb_writer
        if self.main_data is None:
            self._adopt_synthetic(args, data["train"], epoch)
        ctx.epoch = epoch
        ctx.epoch_metrics = {}
        self._pending_stamp = None
        self.retire_replaced_sidecars()
        base_steps = data["train"].dataloader.num_batches // args.accum_freq
        if not self._started:
            ctx.global_step = base_steps * epoch
            if args.resume:
                self._restore(args.resume)
            for hook in self.hooks:
                hook.on_train_start(ctx)
            self._started = True
            self._last_checkpoint_time = time.monotonic()

        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] != epoch:
            raise CheckpointError(f"the step checkpoint is from epoch {resume['epoch']}, OpenCLIP resumed epoch {epoch}")
        passes = self.defense.plan_epoch(ctx, epoch)
        for hook in self.hooks:
            hook.on_epoch_start(ctx)
        if resume is not None:
            self._load_mid_epoch(ctx, resume)
        infos = [self._pass_data(args, epoch, p, i) for i, p in enumerate(passes)]
        train_steps = [info.dataloader.num_batches // args.accum_freq for p, info in zip(passes, infos, strict=True)
                       if p.train]
        epoch_steps = max(sum(train_steps), 1)
        offset = resume["offset"] if resume is not None else 0
        for index, (pass_, info) in enumerate(zip(passes, infos, strict=True)):
            if resume is not None and index < resume["pass_index"]:
                continue  # finished before the step checkpoint
            pass_resume = resume if resume is not None and index == resume["pass_index"] else None
            self._epoch_position = {"pass_index": index, "offset": offset}
            if pass_.train:
                steps = self._train_pass(ctx, pass_, info, loss, dist_model, base_steps, epoch_steps, offset,
                                         pass_resume)
                offset += steps
            else:
                self._inference_pass(ctx, pass_, info, pass_resume)
        self._end_epoch(ctx, args)

    def _lr_step(self, base_steps: int, epoch: int, position: int, epoch_steps: int) -> int:
        """Scheduler step for the ``position``-th optimizer step of an epoch.

        An epoch of exactly OpenCLIP's length maps 1:1 (upstream behaviour); passes over subsets are
        spread over the epoch's share of the schedule so the LR curve keeps its shape.
        """
        if epoch_steps == base_steps:
            return base_steps * epoch + position
        return base_steps * epoch + (base_steps * position) // epoch_steps

    def _start_iterator(self, info: LoaderInfo, position: PassPosition, resume: dict[str, Any] | None) -> Iterator:
        """A new iterator over ``info``; on resume, re-created as the checkpointed one was and armed to skip
        what was consumed, with the RNG streams of the checkpoint's step."""
        persistent = info.persistent_workers
        armed = False
        if resume is not None:
            oc.restore_rng_state(resume["iter_rng"])
            info.arm_resume(position.skip(), self.ctx.epoch)
            armed = True
        else:
            position.new_iterator(keep_worker_rng=persistent)
            if persistent and info is self.main_data and self._main_worker_rng:
                if not position.worker_rng:
                    position.worker_rng = dict(self._main_worker_rng)
                    info.arm_resume(ResumeSkip(worker_rng=dict(self._main_worker_rng)), self.ctx.epoch)
                    armed = True
                self._main_worker_rng = {}
        self._iter_rng = oc.capture_rng_state()
        taken: list[Any] | None = None  # batches already pulled from the new iterator
        if persistent and info is self.main_data and not self._main_iterator_started:
            # Persistent workers draw their base seed (which seeds e.g. --dataset-resampled shard sampling)
            # once, when the first iterator starts; a resumed run draws it from the same RNG state and
            # leaves the current stream where it is, as the uninterrupted run's later epochs do. (A WebLoader
            # starts its DataLoader at the first next(), hence the pull.)
            self._main_iterator_started = True
            if self._main_iter_rng is not None:
                oc.restore_rng_state(self._main_iter_rng)
                iterator = iter(info.dataloader)
                taken = [b for b in [next(iterator, None)] if b is not None]
                oc.restore_rng_state(self._iter_rng)
            else:
                self._main_iter_rng = self._iter_rng
                iterator = iter(info.dataloader)
        else:
            iterator = iter(info.dataloader)
        if resume is not None:
            # Samplers draw their seed at the first next() (RandomSampler is a generator), after iter(): take
            # the first placeholder with the iterator's RNG, then continue with the RNG of the checkpoint's step.
            if taken is None and position.batches:
                taken = [b for b in [next(iterator, None)] if b is not None]
            oc.restore_rng_state(resume["rng"])
        if armed and info.workers > 0:  # (without workers the armed objects are the live ones: keep them)
            if taken is None:  # a WebLoader starts its workers at the first next()
                taken = [b for b in [next(iterator, None)] if b is not None]
            info.disarm()  # the workers took their copies; the next epoch's new workers must start afresh
        return iterator if taken is None else itertools.chain(taken, iterator)

    def _batches(self, ctx: TrainContext, info: LoaderInfo, position: PassPosition,
                 resume: dict[str, Any] | None = None) -> Iterator[tuple[int, Any]]:
        """``(index in pass, batch)`` for the loader's batches, with every rank taking the same number of steps.

        Streams whose per-rank lengths differ (webdataset selections) are equalised like
        DistributedSampler pads: a rank that has delivered its whole share starts over (repeats)
        until every rank has delivered its share; nothing selected is skipped. Batches the run
        trained on before a step checkpoint come back as placeholders and are dropped here.
        """
        rank_sync = info.needs_rank_sync and ctx.distributed
        iterator = self._start_iterator(info, position, resume)
        finished = position.restarts > 0
        while True:
            batch = _next_real(iterator)
            if batch is None:
                if not rank_sync:
                    break
                finished = True
                position.restarts += 1
                iterator = self._start_iterator(info, position, None)
                batch = _next_real(iterator)
            if rank_sync:
                empty_somewhere, unfinished_somewhere = dist.all_reduce_ints(
                    [int(batch is None), int(not finished)], op="max")
                if empty_somewhere or not unfinished_somewhere:
                    break
            position.consumed(batch)
            yield position.total - 1, batch
        if info is self.main_data and position.worker_rng:
            self._main_worker_rng = dict(position.worker_rng)

    def _train_pass(self, ctx: TrainContext, pass_: TrainPass, info: LoaderInfo, loss, dist_model,
                    base_steps: int, epoch_steps: int, offset: int, resume: dict[str, Any] | None = None) -> int:
        """One training pass: OpenCLIP's step (:class:`safe_train.openclip.TrainStep`) plus our events.
        Returns the optimizer steps the pass took (including those before a resumed step checkpoint)."""
        args = ctx.args
        ctx.model.train()
        if args.distill:
            dist_model.eval()
        info.set_epoch(ctx.epoch)
        runner = oc.TrainStep(ctx, self.defense, pass_, loss, dist_model, info.dataloader)
        position = PassPosition.from_state(resume["position"]) if resume is not None else PassPosition()
        if resume is not None:
            runner.load_meters(resume["meters"])
        notify = len(self.hooks) > 1 or type(self.defense).on_step_end is not Callback.on_step_end
        for i, batch in self._batches(ctx, info, position, resume):
            i_accum = i // args.accum_freq
            step = self._lr_step(base_steps, ctx.epoch, offset + i_accum, epoch_steps)
            if pass_.lr_override is not None:
                for group in ctx.optimizer.param_groups:
                    group["lr"] = pass_.lr_override
            elif not args.skip_scheduler:
                ctx.scheduler(step)
            result = runner.step(i, batch)
            if result is None:  # accumulating (--accum-freq)
                continue
            ctx.global_step += 1
            position.steps += 1
            if self.track_samples:
                ids = result.sample_ids.cpu().numpy()
                ctx.table.observe(ids)
                ctx.table.record("last_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))
                self._seen_this_epoch.append(ids)
            if notify:
                # device tensors: converting here would sync with the GPU every step (hooks convert lazily)
                out = StepOutput(pass_, result.sample_ids, result.features,
                                 {k: v.detach() for k, v in result.losses.items()}, i_accum)
                for hook in self.hooks:
                    hook.on_step_end(ctx, out)
            runner.log(i_accum, result, step)
            self._after_unit(ctx, position, runner, optimizer_step=True)
        return position.steps

    @torch.no_grad()
    def _inference_pass(self, ctx: TrainContext, pass_: TrainPass, info: LoaderInfo,
                        resume: dict[str, Any] | None = None) -> None:
        args, model = ctx.args, ctx.model
        device = torch.device(args.device)
        autocast = oc.get_autocast(args.precision, device_type=device.type)
        input_dtype = oc.get_input_dtype(args.precision)
        was_training = model.training
        model.eval()
        info.set_epoch(ctx.epoch)
        started = time.time()
        position = PassPosition.from_state(resume["position"]) if resume is not None else PassPosition()
        n = 0
        for _, batch in self._batches(ctx, info, position, resume):
            batch = oc.to_device(batch, device, input_dtype)
            with autocast():
                features = self.defense.forward(ctx, model, batch, pass_)
            features = {k: v.detach() for k, v in features.items() if isinstance(v, torch.Tensor)}
            for hook in self.hooks:
                hook.on_inference_batch(ctx, pass_, batch["sample_id"], features)
            n += len(batch["sample_id"])
            self._after_unit(ctx, position, None, optimizer_step=False)
        model.train(was_training)
        if ctx.is_master:
            logging.info(f"Epoch {ctx.epoch} [{pass_.name}] inference over {n * ctx.world_size} samples "
                         f"in {time.time() - started:.1f}s")

    # ---- step checkpoints and stop signals ----------------------------------------------------
    def _after_unit(self, ctx: TrainContext, position: PassPosition, runner: Any, optimizer_step: bool) -> None:
        """After an optimizer step or an inference batch: write a step checkpoint when one is due or a stop
        signal arrived (every rank decides the same), then stop if asked to."""
        policy = self.step_checkpoints
        if optimizer_step:
            self._steps_since_checkpoint += 1
        due_steps = bool(policy.every_n_steps) and self._steps_since_checkpoint >= policy.every_n_steps
        due_time = bool(policy.every_minutes) and (
            time.monotonic() - self._last_checkpoint_time >= 60.0 * policy.every_minutes)
        stop = self.stop.requested
        if ctx.distributed:
            due_time, stop = (bool(v) for v in dist.all_reduce_ints([int(due_time), int(stop)], op="max"))
        if not (due_steps or due_time or stop):
            return
        path = self._save_step_checkpoint(ctx, position, runner)
        if stop:
            where = f"step checkpoint {path}" if path else "no checkpoint (logging is off)"
            raise Preempted(f"stopped by {self.stop.signal_name or 'a stop signal on another rank'} at global step "
                            f"{ctx.global_step} (epoch {ctx.epoch}), {where}; rerun with --resume latest")

    def _save_step_checkpoint(self, ctx: TrainContext, position: PassPosition, runner: Any) -> Path | None:
        """Every rank's part of a mid-epoch checkpoint, then the model: the sidecar first, the ``.pt`` last,
        both stamped with one token, so a kill at any moment leaves the previous pair the newest consistent one."""
        args = ctx.args
        self._steps_since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        save_logs = bool(args.logs) and str(args.logs).lower() != "none" and getattr(args, "checkpoint_path", None)
        if not save_logs:
            return None
        started = time.monotonic()
        self._flush_hooks(ctx)
        token = dist.broadcast_object(new_token() if ctx.is_master else None)
        path = step_checkpoint_path(args.checkpoint_path, ctx.global_step)
        directory = sidecar_path(path)
        tmp = directory.with_name(directory.name + ".writing")
        if ctx.is_master:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        rank_state = {
            "epoch": ctx.epoch, **self._epoch_position,
            "position": position.state_dict(),
            "rng": oc.capture_rng_state(),
            "iter_rng": self._iter_rng,
            "meters": runner.meters_state() if runner is not None else {},
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
            "epoch_metrics": dict(ctx.epoch_metrics),
            "seen_this_epoch": torch.from_numpy(np.concatenate(self._seen_this_epoch)
                                                if self._seen_this_epoch else np.zeros(0, np.int64)),
            "main_worker_rng": dict(self._main_worker_rng),
            "main_iter_rng": self._main_iter_rng,
            "skipped": ([self.main_data.skip_counter.value, self.main_data.skip_counter.shards]
                        if self.main_data and self.main_data.skip_counter else [0, 0]),
        }
        torch.save(rank_state, tmp / f"rank{ctx.rank}.state")
        np.savez(tmp / f"rank{ctx.rank}.pending.npz", **ctx.table.pending_state())
        fsync_tree(tmp, f"rank{ctx.rank}.*")
        dist.barrier()
        if ctx.is_master:
            stamp = {"token": token, "run": args.name, "epoch": ctx.epoch, "global_step": ctx.global_step,
                     "kind": "step"}
            ctx.table.save(tmp / "table")
            torch.save({"epoch": ctx.epoch, "global_step": ctx.global_step, "world_size": ctx.world_size,
                        "defense": self.defense.name, "kind": "step", "token": token}, tmp / ENGINE_STATE_FILE)
            (tmp / "meta.json").write_text(json.dumps({
                **stamp, "defense": self.defense.name, "callbacks": [c.name for c in self.callbacks],
                "num_samples": len(ctx.table), "columns": ctx.table.columns, "world_size": ctx.world_size},
                indent=1))
            fsync_tree(tmp)
            publish_sidecar(tmp, directory)
            checkpoint = {"epoch": ctx.epoch, "name": args.name,
                          # what OpenCLIP saves: the model before torch.compile, DDP-wrapped when distributed
                          "state_dict": getattr(ctx.model, "_orig_mod", ctx.model).state_dict(),
                          "optimizer": ctx.optimizer.state_dict(), STAMP_KEY: stamp}
            if ctx.scaler is not None:
                checkpoint["scaler"] = ctx.scaler.state_dict()
            atomic_save(checkpoint, path)
            retire_previous_sidecar(path)
            prune_step_checkpoints(args.checkpoint_path, self.step_checkpoints.keep)
            logging.info(f"step checkpoint {path.name} (epoch {ctx.epoch}, global step {ctx.global_step}) "
                         f"in {time.monotonic() - started:.2f}s")
        dist.barrier()
        self._last_checkpoint_time = time.monotonic()
        return path

    def _load_mid_epoch(self, ctx: TrainContext, resume: dict[str, Any]) -> None:
        """After ``on_epoch_start`` of the resumed epoch: what the hooks and the epoch held at the checkpoint."""
        for hook in self.hooks:
            hook.load_state_dict(resume["hooks"].get(hook.name, {}))
        ctx.epoch_metrics = dict(resume["epoch_metrics"])
        seen = resume["seen_this_epoch"].numpy()
        self._seen_this_epoch = [seen] if len(seen) else []
        self._main_worker_rng = {int(k): v for k, v in resume.get("main_worker_rng", {}).items()}
        self._main_iter_rng = resume.get("main_iter_rng")
        counter = self.main_data.skip_counter if self.main_data is not None else None
        if counter is not None and resume.get("skipped"):
            samples, shards = resume["skipped"]
            counter.add(int(samples) - counter.value)
            counter.add_shard(int(shards) - counter.shards)

    # ---- epoch end, state and checkpoints -------------------------------------------------------
    def _flush_hooks(self, ctx: TrainContext) -> None:
        """Hooks move what they kept on the device into the table / their state (see ``Callback.flush``)."""
        for hook in self.hooks:
            hook.flush(ctx)

    def _end_epoch(self, ctx: TrainContext, args) -> None:
        self._flush_hooks(ctx)
        if self.track_samples:
            seen = np.concatenate(self._seen_this_epoch) if self._seen_this_epoch else np.zeros(0, np.int64)
            ids, counts = np.unique(seen, return_counts=True)
            self._seen_this_epoch = []
            ctx.table.sync(dist.gather_arrays)
            all_ids = np.concatenate(dist.gather_arrays(ids))
            all_counts = np.concatenate(dist.gather_arrays(counts.astype(np.int64)))
            if len(all_ids):
                np.add.at(ctx.table["times_seen"], ctx.table.rows(all_ids), all_counts.astype(np.int32))
        else:
            ctx.table.sync(dist.gather_arrays)
        if ctx.distributed:
            _verify_rank_consistency(ctx)
        counter = self.main_data.skip_counter if self.main_data else None
        skipped, skipped_shards = dist.all_reduce_ints([counter.value, counter.shards] if counter else [0, 0])
        if skipped:
            ctx.log_metric("skipped_samples_total", skipped)
        if skipped_shards:
            ctx.log_metric("skipped_shards_total", skipped_shards)
        for hook in self.hooks:
            hook.on_epoch_end(ctx)
        if ctx.is_master and ctx.epoch_metrics:
            logging.info(f"Epoch {ctx.epoch} safe-train: " + " ".join(
                f"{k}: {v:.6g}" for k, v in sorted(ctx.epoch_metrics.items())))
            oc.report({"safe_train/" + k: v for k, v in ctx.epoch_metrics.items()}, ctx, ctx.global_step)
        self._save_sidecars(ctx, args, completed_epoch=ctx.epoch + 1)

    def _save_sidecars(self, ctx: TrainContext, args, completed_epoch: int) -> None:
        """Write the state next to every checkpoint OpenCLIP is about to write for this epoch, and the stamp
        that :meth:`save_checkpoint_file` puts into those checkpoints."""
        rng_states = dist.all_gather_objects(oc.capture_rng_state())
        worker_rng = dist.all_gather_objects(dict(self._main_worker_rng))
        main_iter_rng = dist.all_gather_objects(self._main_iter_rng)
        token = dist.broadcast_object(new_token() if ctx.is_master else None)
        self._pending_stamp = {"token": token, "run": args.name, "epoch": completed_epoch,
                               "global_step": ctx.global_step, "kind": "epoch"}
        save_logs = args.logs and str(args.logs).lower() != "none" and ctx.is_master
        if not save_logs or not getattr(args, "checkpoint_path", None):
            return
        remove_orphan_sidecars(args.checkpoint_path)  # e.g. of a checkpoint --delete-previous-checkpoint removed
        targets = []
        if completed_epoch == args.epochs or (args.save_frequency > 0 and completed_epoch % args.save_frequency == 0):
            targets.append(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch}.pt"))
        if args.save_most_recent:
            targets.append(os.path.join(args.checkpoint_path, oc.LATEST_CHECKPOINT_NAME))
        state = {
            "epoch": completed_epoch,
            "global_step": ctx.global_step,
            "world_size": ctx.world_size,
            "defense": self.defense.name,
            "kind": "epoch",
            "token": token,
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
            "rng": rng_states,
            "worker_rng": worker_rng,
            "main_iter_rng": main_iter_rng,
        }
        for target in targets:
            directory = sidecar_path(target)
            tmp = directory.with_name(directory.name + ".writing")
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.table.save(tmp / "table")
            torch.save(state, tmp / ENGINE_STATE_FILE)
            (tmp / "meta.json").write_text(json.dumps({
                **self._pending_stamp, "defense": self.defense.name,
                "callbacks": [c.name for c in self.callbacks], "num_samples": len(ctx.table),
                "columns": ctx.table.columns, "world_size": ctx.world_size}, indent=1))
            fsync_tree(tmp)
            publish_sidecar(tmp, directory)

    def _restore(self, checkpoint: str) -> None:
        """Load the sidecar of the checkpoint OpenCLIP resumed from (every rank reads it) after checking that
        the two belong together; a step checkpoint also brings this rank's mid-epoch position."""
        ctx = self.ctx
        directory = sidecar_path(checkpoint)
        stamp = load_checkpoint_file(checkpoint, mmap=True).get(STAMP_KEY)
        if stamp is not None:
            directory = matching_sidecar(checkpoint, stamp.get("token")) or directory
        if not directory.exists():
            if self.needs_sidecar:
                logging.warning(f"resuming from {checkpoint} without safe-train state ({directory} not found): "
                                f"per-sample state starts empty")
            return
        state = load_checkpoint_file(directory / ENGINE_STATE_FILE)
        if stamp is not None and state.get("token") != stamp.get("token"):
            raise CheckpointError(f"{checkpoint} (global step {stamp.get('global_step')}) and its state {directory} "
                                  f"(global step {state.get('global_step')}) come from different saves; resume "
                                  f"with --resume latest to use the newest consistent checkpoint")
        if state.get("defense") != self.defense.name:
            raise CheckpointError(f"{checkpoint} was trained with --defense {state.get('defense')}, "
                                  f"not --defense {self.defense.name}")
        same_world = state.get("world_size") == ctx.world_size
        if state.get("kind") == "step":
            if not same_world:
                raise CheckpointError(f"{checkpoint} is a mid-epoch checkpoint of {state.get('world_size')} ranks and "
                                      f"cannot resume on {ctx.world_size}: each rank's data position and RNG streams "
                                      f"are its own. Resume from an epoch checkpoint (epoch_N.pt) to change the "
                                      f"world size")
            rank_file = directory / f"rank{ctx.rank}.state"
            pending_file = directory / f"rank{ctx.rank}.pending.npz"
            if not rank_file.exists() or not pending_file.exists():
                raise CheckpointError(f"{directory} lacks rank {ctx.rank}'s state ({rank_file.name})")
            self._resume = load_checkpoint_file(rank_file)
            with np.load(pending_file, allow_pickle=False) as pending:
                pending_state = {key: pending[key] for key in pending.files}
        ctx.table.load(directory / "table")
        if state.get("kind") == "step":
            ctx.table.load_pending_state(pending_state)
            hooks_state = self._resume["hooks"]
        else:
            hooks_state = state["hooks"]
            if same_world and "worker_rng" in state:
                self._main_worker_rng = {int(k): v for k, v in state["worker_rng"][ctx.rank].items()}
                self._main_iter_rng = state["main_iter_rng"][ctx.rank]
        for hook in self.hooks:
            hook.load_state_dict(hooks_state.get(hook.name, {}))
        ctx.global_step = int(state["global_step"])
        if state.get("kind") != "step":
            if same_world:
                oc.restore_rng_state(state["rng"][ctx.rank])
            else:
                logging.warning("world size changed since the checkpoint: RNG streams are not restored")
        if ctx.is_master:
            where = (f"mid-epoch at global step {ctx.global_step}" if state.get("kind") == "step"
                     else f"after epoch {state.get('epoch')}")
            logging.info(f"restored safe-train state from {directory} ({len(ctx.table)} samples, {where})")

    def after_evaluate(self, epoch: int, metrics: dict) -> None:
        if self.ctx is None:
            return
        for hook in self.hooks:
            hook.on_evaluate(self.ctx, metrics or {})



def _next_real(iterator: Iterator) -> Any:
    """The iterator's next batch that was not already trained on (None when it is exhausted)."""
    for batch in iterator:
        if not is_consumed(batch):
            return batch
    return None


def _verify_rank_consistency(ctx: TrainContext) -> None:
    """Fail loudly if ranks disagree on per-sample state (every decision must be the same everywhere).

    Hashes the table (every row up to 10^7 rows, a strided sample beyond) and compares across ranks.
    """
    table = ctx.table
    stride = max(1, len(table) // 10_000_000)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(table.ids[::stride]).tobytes())
    for name in sorted(table.columns):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(table[name][::stride]).tobytes())
    digests = dist.all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"per-sample state differs across ranks after epoch {ctx.epoch}: {digests}")
    if ctx.is_master:
        logging.info(f"per-sample state identical on {len(digests)} ranks ({len(table)} samples)")


def _intersect(a: Selection | None, b: Selection | None) -> Selection | None:
    """Samples allowed by both selections."""
    if a is None or b is None:
        return a or b
    if not a.exclude and not b.exclude:
        return Selection.including(np.intersect1d(a.ids, b.ids))
    if a.exclude and b.exclude:
        return Selection.excluding(np.union1d(a.ids, b.ids))
    include, exclude = (a, b) if not a.exclude else (b, a)
    return Selection.including(include.ids[exclude.allows(include.ids)])



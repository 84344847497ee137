"""The training loop: an epoch is the defense's passes, each a run of OpenCLIP steps, driven by events.

The step itself is OpenCLIP 3.3's (:class:`safe_train.openclip.TrainStep`, the one place that mirrors
upstream code). With ``--defense none`` and no callbacks every step does exactly what OpenCLIP 3.3 does
(same batches, forward, loss, backward, optimizer, scheduler and logging), so losses match to float
tolerance. What the engine adds: sample ids on every batch, passes chosen by the defense, per-sample
state synced at epoch boundaries and saved next to each checkpoint, and resumable RNG streams.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safe_train import dist
from safe_train import openclip as oc
from safe_train.data import LoaderInfo, OpenClipTransform, SkipCounter, csv_loader, wds_loader
from safe_train.errors import CheckpointError, ConfigError
from safe_train.interface import (
    Callback,
    Defense,
    SampleTransform,
    Selection,
    StepOutput,
    TrainContext,
    TrainPass,
)
from safe_train.state import SampleTable, replace_dir

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".safe_train"
ENGINE_STATE_FILE = "engine.ckpt"  # not *.pt: OpenCLIP's --resume latest globs *.pt


def sidecar_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the safe-train state of an OpenCLIP checkpoint lives: ``epoch_3.pt`` → ``epoch_3.safe_train/``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


class Engine:
    """Owns the defense, the callbacks, the sample table and the training data of one run."""

    def __init__(self, defense: Defense, callbacks: Iterable[Callback] = (), blocklist: np.ndarray | None = None,
                 track_samples: bool = False) -> None:
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

    @property
    def hooks(self) -> list[Callback]:
        return [self.defense, *self.callbacks]

    # ---- wiring from safe_train.openclip.patch ----------------------------------------------------
    def on_parsed_args(self, args) -> None:
        if getattr(args, "horovod", False):
            raise ConfigError("--horovod is not supported; use torchrun or srun (DDP)")

    def _context(self, args) -> TrainContext:
        if self.ctx is None:
            self.ctx = TrainContext(args=args, table=SampleTable(), rank=args.rank, world_size=args.world_size,
                                    device=torch.device(args.device))
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

    def _build_loader(self, args, epoch: int, selection: Selection | None, salt: int, main: bool = False,
                      expected: int | None = None, complete: bool = False,
                      transform: SampleTransform | None = None) -> LoaderInfo:
        counter = self.main_data.skip_counter if self.main_data is not None else SkipCounter()
        transform = transform or self._transform
        if self.data_kind == "csv":
            info = csv_loader(args, transform, selection=selection, upstream_order=main, salt=salt,
                              skip_counter=counter, dataset=self._csv_dataset, complete=complete)
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
            if self.data_kind == "csv":
                return self._build_loader(args, epoch, selection, salt=1 + index, complete=True, transform=transform)
        expected = None
        if self.data_kind == "webdataset" and selection is not None:
            base = self.main_data.dataloader.num_samples
            expected = len(selection.ids) if not selection.exclude else max(
                base - int(self.ctx.table.contains(selection.ids).sum() if len(self.ctx.table) else len(selection.ids)),
                0)
        return self._build_loader(args, epoch, selection, salt=1 + index, expected=expected, transform=transform)

    # ---- the epoch ----------------------------------------------------------------------------
    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None) -> None:
        """Drop-in replacement for ``open_clip_train.train.train_one_epoch``."""
        ctx = self._context(args)
        ctx.model, ctx.optimizer, ctx.scaler, ctx.scheduler, ctx.tb_writer = model, optimizer, scaler, scheduler, tb_writer
        ctx.epoch = epoch
        ctx.epoch_metrics = {}
        base_steps = data["train"].dataloader.num_batches // args.accum_freq
        if not self._started:
            ctx.global_step = base_steps * epoch
            if args.resume:
                self._restore(args.resume)
            for hook in self.hooks:
                hook.on_train_start(ctx)
            self._started = True

        passes = self.defense.plan_epoch(ctx, epoch)
        for hook in self.hooks:
            hook.on_epoch_start(ctx)
        infos = [self._pass_data(args, epoch, p, i) for i, p in enumerate(passes)]
        train_steps = [info.dataloader.num_batches // args.accum_freq for p, info in zip(passes, infos, strict=True)
                       if p.train]
        epoch_steps = max(sum(train_steps), 1)
        offset = 0
        for pass_, info in zip(passes, infos, strict=True):
            if pass_.train:
                steps = self._train_pass(ctx, pass_, info, loss, dist_model, base_steps, epoch_steps, offset)
                offset += steps
            else:
                self._inference_pass(ctx, pass_, info)
        self._end_epoch(ctx, args)

    def _lr_step(self, base_steps: int, epoch: int, position: int, epoch_steps: int) -> int:
        """Scheduler step for the ``position``-th optimizer step of an epoch.

        An epoch of exactly OpenCLIP's length maps 1:1 (upstream behaviour); passes over subsets are
        spread over the epoch's share of the schedule so the LR curve keeps its shape.
        """
        if epoch_steps == base_steps:
            return base_steps * epoch + position
        return base_steps * epoch + (base_steps * position) // epoch_steps

    def _batches(self, ctx: TrainContext, info: LoaderInfo) -> Iterator[Any]:
        """The loader's batches, with every rank taking the same number of steps.

        Streams whose per-rank lengths differ (webdataset selections) are equalised like
        DistributedSampler pads: a rank that has delivered its whole share starts over (repeats)
        until every rank has delivered its share; nothing selected is skipped.
        """
        if not (info.needs_rank_sync and ctx.distributed):
            yield from info.dataloader
            return
        iterator = iter(info.dataloader)
        finished = False
        while True:
            batch = next(iterator, None)
            if batch is None:
                finished = True
                iterator = iter(info.dataloader)
                batch = next(iterator, None)
            empty_somewhere, unfinished_somewhere = dist.all_reduce_ints(
                [int(batch is None), int(not finished)], op="max")
            if empty_somewhere or not unfinished_somewhere:
                return
            yield batch

    def _train_pass(self, ctx: TrainContext, pass_: TrainPass, info: LoaderInfo, loss, dist_model,
                    base_steps: int, epoch_steps: int, offset: int) -> int:
        """One training pass: OpenCLIP's step (:class:`safe_train.openclip.TrainStep`) plus our events."""
        args = ctx.args
        ctx.model.train()
        if args.distill:
            dist_model.eval()
        info.set_epoch(ctx.epoch)
        runner = oc.TrainStep(ctx, self.defense, pass_, loss, dist_model, info.dataloader)
        notify = len(self.hooks) > 1 or type(self.defense).on_step_end is not Callback.on_step_end
        steps_done = 0
        for i, batch in enumerate(self._batches(ctx, info)):
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
            steps_done += 1
            if self.track_samples:
                ids = result.sample_ids.cpu().numpy()
                ctx.table.observe(ids)
                ctx.table.record("last_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))
                self._seen_this_epoch.append(ids)
            if notify:
                out = StepOutput(pass_, result.sample_ids, result.features,
                                 {k: float(v.detach()) for k, v in result.losses.items()}, i_accum)
                for hook in self.hooks:
                    hook.on_step_end(ctx, out)
            runner.log(i_accum, result, step)
        return steps_done

    @torch.no_grad()
    def _inference_pass(self, ctx: TrainContext, pass_: TrainPass, info: LoaderInfo) -> None:
        args, model = ctx.args, ctx.model
        device = torch.device(args.device)
        autocast = oc.get_autocast(args.precision, device_type=device.type)
        input_dtype = oc.get_input_dtype(args.precision)
        was_training = model.training
        model.eval()
        info.set_epoch(ctx.epoch)
        started = time.time()
        n = 0
        for batch in self._batches(ctx, info):
            batch = oc.to_device(batch, device, input_dtype)
            with autocast():
                features = self.defense.forward(ctx, model, batch, pass_)
            features = {k: v.detach() for k, v in features.items() if isinstance(v, torch.Tensor)}
            for hook in self.hooks:
                hook.on_inference_batch(ctx, pass_, batch["sample_id"], features)
            n += len(batch["sample_id"])
        model.train(was_training)
        if ctx.is_master:
            logging.info(f"Epoch {ctx.epoch} [{pass_.name}] inference over {n * ctx.world_size} samples "
                         f"in {time.time() - started:.1f}s")

    # ---- epoch end, state and checkpoints -------------------------------------------------------
    def _end_epoch(self, ctx: TrainContext, args) -> None:
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
        skipped = dist.all_reduce_int(self.main_data.skip_counter.value if self.main_data else 0)
        if skipped:
            ctx.log_metric("skipped_samples_total", skipped)
        for hook in self.hooks:
            hook.on_epoch_end(ctx)
        if ctx.is_master and ctx.epoch_metrics:
            logging.info(f"Epoch {ctx.epoch} safe-train: " + " ".join(
                f"{k}: {v:.6g}" for k, v in sorted(ctx.epoch_metrics.items())))
            oc.report({"safe_train/" + k: v for k, v in ctx.epoch_metrics.items()}, ctx, ctx.global_step)
        self._save_sidecars(ctx, args, completed_epoch=ctx.epoch + 1)

    def _save_sidecars(self, ctx: TrainContext, args, completed_epoch: int) -> None:
        """Write the state next to every checkpoint OpenCLIP is about to write for this epoch."""
        rng_states = dist.all_gather_objects(oc.capture_rng_state())
        save_logs = args.logs and str(args.logs).lower() != "none" and ctx.is_master
        if not save_logs or not getattr(args, "checkpoint_path", None):
            return
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
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
            "rng": rng_states,
        }
        for target in targets:
            directory = sidecar_path(target)
            tmp = directory.with_name(directory.name + ".writing")
            ctx.table.save(tmp / "table")
            torch.save(state, tmp / ENGINE_STATE_FILE)
            (tmp / "meta.json").write_text(json.dumps({
                "epoch": completed_epoch, "defense": self.defense.name,
                "callbacks": [c.name for c in self.callbacks], "num_samples": len(ctx.table),
                "columns": ctx.table.columns}, indent=1))
            replace_dir(tmp, directory)
        if args.delete_previous_checkpoint:
            previous = sidecar_path(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch - 1}.pt"))
            if previous.exists():
                shutil.rmtree(previous)

    def _restore(self, checkpoint: str) -> None:
        """Load the sidecar of the checkpoint OpenCLIP resumed from (every rank reads it)."""
        ctx = self.ctx
        directory = sidecar_path(checkpoint)
        if not directory.exists():
            if any(h.state_dict() for h in self.hooks) or self.track_samples:
                logging.warning(f"resuming from {checkpoint} without safe-train state ({directory} not found): "
                                f"per-sample state starts empty")
            return
        state = torch.load(directory / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        if state.get("defense") != self.defense.name:
            raise CheckpointError(f"{checkpoint} was trained with --defense {state.get('defense')}, "
                             f"not --defense {self.defense.name}")
        ctx.table.load(directory / "table")
        for hook in self.hooks:
            hook.load_state_dict(state["hooks"].get(hook.name, {}))
        ctx.global_step = int(state["global_step"])
        if state.get("world_size") == ctx.world_size:
            oc.restore_rng_state(state["rng"][ctx.rank])
        else:
            logging.warning("world size changed since the checkpoint: RNG streams are not restored")
        if ctx.is_master:
            logging.info(f"restored safe-train state from {directory} ({len(ctx.table)} samples)")

    def after_evaluate(self, epoch: int, metrics: dict) -> None:
        if self.ctx is None:
            return
        for hook in self.hooks:
            hook.on_evaluate(self.ctx, metrics or {})



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



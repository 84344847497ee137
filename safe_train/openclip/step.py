"""OpenCLIP 3.3's training step (``open_clip_train/train.py: train_one_epoch``'s loop body), with the
defense's forward and loss in place of the model's and ``create_loss``'s.

This is the part of safe-train that mirrors upstream code rather than calling it (3.3 has no hook
inside its loop). With ``--defense none`` it does what 3.3 does, in the same order: input dtype and
device, ``zero_grad``, autocast forward, distillation teacher, ``--accum-freq`` feature caching and
re-forward, backward through the GradScaler, gradient clipping, optimizer step, logit-scale clamp,
and the same log line and tensorboard/wandb scalars. A port to another OpenCLIP trainer replaces
this file (docs/openclip.md).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from safe_train.interface import Defense, TrainContext, TrainPass
from safe_train.openclip.upstream import get_autocast, get_input_dtype, unwrap_model


class Meter:
    """Running value / sum / count (3.3's ``AverageMeter``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


@dataclass
class StepResult:
    """One optimizer step: its loss terms (with ``loss``, the total), detached features, sample ids."""

    losses: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    sample_ids: torch.Tensor
    logit_scale: torch.Tensor
    batch: dict[str, Any]


HOST_KEYS = frozenset({"sample_id", "has_view"})  # per-sample bookkeeping the host decides with (no device sync)


def to_device(batch: dict, device: torch.device, input_dtype) -> dict:
    """Tensors to the run's device (floats in the precision's input dtype); sample ids and the other
    ``HOST_KEYS`` stay on the host (reading them costs no device sync)."""
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key in HOST_KEYS:
            out[key] = value
        elif value.is_floating_point():
            out[key] = value.to(device=device, dtype=input_dtype, non_blocking=True)
        else:
            out[key] = value.to(device=device, non_blocking=True)
    return out


def backward(total_loss: torch.Tensor, scaler) -> None:
    if scaler is not None:
        scaler.scale(total_loss).backward()
    else:
        total_loss.backward()


def optimizer_step(model, optimizer, scaler, grad_clip_norm: float | None) -> None:
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm, norm_type=2.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm, norm_type=2.0)
        optimizer.step()


def report(values: dict[str, float], ctx: TrainContext, step: int) -> None:
    """Send scalars to tensorboard and wandb, as OpenCLIP does."""
    if ctx.tb_writer is not None:
        for name, val in values.items():
            ctx.tb_writer.add_scalar(name, val, step)
    if getattr(ctx.args, "wandb", False):
        import wandb  # deferred: optional dependency, only with --report-to wandb

        wandb.log({**values, "step": step}, step=step)


@dataclass
class SyntheticSource:
    """What OpenCLIP 3.3's ``--dataset-type synthetic`` loader trains on (``open_clip_train.data.SyntheticDataset``)."""

    image: Any  # the one PIL image
    caption: str
    num_samples: int
    preprocess: Any  # OpenCLIP's preprocess_train
    tokenizer: Any


def synthetic_source(data_info: Any, args) -> SyntheticSource | None:
    """The synthetic dataset behind OpenCLIP's training ``DataInfo`` (None: something else)."""
    from open_clip import get_tokenizer
    from open_clip_train.data import SyntheticDataset

    dataset = getattr(getattr(data_info, "dataloader", None), "dataset", None)
    if not isinstance(dataset, SyntheticDataset):
        return None
    tokenizer = get_tokenizer(args.model, cache_dir=getattr(args, "cache_dir", None))  # as OpenCLIP's main does
    return SyntheticSource(dataset.image, dataset.caption, len(dataset), dataset.transform, tokenizer)


class TrainStep:
    """The steps of one training pass; ``step`` returns None while accumulating micro-batches."""

    def __init__(self, ctx: TrainContext, defense: Defense, pass_: TrainPass, loss, dist_model, dataloader) -> None:
        self.ctx, self.defense, self.pass_, self.loss, self.dist_model = ctx, defense, pass_, loss, dist_model
        args = ctx.args
        self.device = torch.device(args.device)
        self.autocast = get_autocast(args.precision, device_type=self.device.type)
        self.input_dtype = get_input_dtype(args.precision)
        self.accum = args.accum_freq
        self.num_batches_per_epoch = dataloader.num_batches // self.accum
        self.num_samples = dataloader.num_samples
        self.sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))
        self.accum_batches: list[dict] = []
        self.accum_features: dict[str, list[torch.Tensor]] = {}
        self.losses_m: dict[str, Meter] = {}
        self.batch_time_m, self.data_time_m = Meter(), Meter()
        self.end = time.time()

    def step(self, i: int, batch: dict) -> StepResult | None:
        ctx, defense, pass_, args = self.ctx, self.defense, self.pass_, self.ctx.args
        model, optimizer, scaler, autocast = ctx.model, ctx.optimizer, ctx.scaler, self.autocast
        batch = to_device(batch, self.device, self.input_dtype)
        self.data_time_m.update(time.time() - self.end)
        optimizer.zero_grad()

        if self.accum == 1:
            with autocast():
                model_out = defense.forward(ctx, model, batch, pass_)
                logit_scale = model_out["logit_scale"]
                if args.distill:
                    with torch.no_grad():
                        dist_out = self.dist_model(batch["image"], batch["text"])
                    model_out.update({f"dist_{k}": v for k, v in dist_out.items()})
                losses = defense.compute_loss(ctx, model_out, pass_, self.loss)
                total_loss = sum(losses.values())
                losses["loss"] = total_loss
            backward(total_loss, scaler)
            step_features = {k: v.detach() for k, v in model_out.items() if isinstance(v, torch.Tensor)}
            step_ids = batch["sample_id"]
        else:
            with torch.no_grad():
                with autocast():
                    model_out = defense.forward(ctx, model, batch, pass_)
                    for key in ("logit_scale", "logit_bias"):
                        model_out.pop(key, None)
                    for key, val in model_out.items():
                        self.accum_features.setdefault(key, []).append(val)
                self.accum_batches.append(batch)
            if (i + 1) % self.accum > 0:
                return None
            optimizer.zero_grad()
            for j in range(self.accum):
                with autocast():
                    model_out = defense.forward(ctx, model, self.accum_batches[j], pass_)
                    not_accumulated = {"logit_scale": model_out.pop("logit_scale")}
                    logit_scale = not_accumulated["logit_scale"]
                    if "logit_bias" in model_out:
                        not_accumulated["logit_bias"] = model_out.pop("logit_bias")
                    inputs = {key: torch.cat(cached[:j] + [model_out[key]] + cached[j + 1:])
                              for key, cached in self.accum_features.items()}
                    losses = defense.compute_loss(ctx, {**inputs, **not_accumulated}, pass_, self.loss)
                    del inputs
                    total_loss = sum(losses.values())
                    losses["loss"] = total_loss
                backward(total_loss, scaler)
            step_features = {key: torch.cat(cached) for key, cached in self.accum_features.items()}
            step_features["logit_scale"] = logit_scale.detach()
            step_ids = torch.cat([b["sample_id"] for b in self.accum_batches])
            batch = self.accum_batches[-1]

        optimizer_step(model, optimizer, scaler, args.grad_clip_norm)
        if self.accum > 1:
            self.accum_batches, self.accum_features = [], {}
        with torch.no_grad():
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        return StepResult(losses, step_features, step_ids, logit_scale, batch)

    def meters_state(self) -> dict[str, list[float]]:
        """The running loss averages of the log line (a step checkpoint keeps them so the resumed log matches)."""
        return {name: [m.val, m.sum, float(m.count)] for name, m in self.losses_m.items()}

    def load_meters(self, state: dict[str, list[float]]) -> None:
        for name, (val, total, count) in state.items():
            meter = self.losses_m.setdefault(name, Meter())
            meter.val, meter.sum, meter.count = float(val), float(total), int(count)

    def log(self, i_accum: int, result: StepResult, step: int) -> None:
        """3.3's progress line and ``train/*`` scalars, every ``--log-every-n-steps`` and at the pass's end."""
        ctx, args = self.ctx, self.ctx.args
        self.batch_time_m.update(time.time() - self.end)
        self.end = time.time()
        batch_count = i_accum + 1
        if not ctx.is_master or not (i_accum % args.log_every_n_steps == 0
                                     or batch_count == self.num_batches_per_epoch):
            return
        batch_size = len(result.batch["sample_id"])
        num_samples = batch_count * batch_size * self.accum * args.world_size  # OpenCLIP's count
        if batch_size < args.batch_size:  # a selection pass's partial last step: count it in full batches
            num_samples = min(batch_count * args.batch_size * self.accum * args.world_size, self.num_samples)
        for key, val in result.losses.items():
            self.losses_m.setdefault(key, Meter()).update(val.item(), batch_size)
        logit_scale_scalar = result.logit_scale.item()
        samples_per_second = self.accum * args.batch_size * args.world_size / self.batch_time_m.val
        samples_per_second_per_gpu = self.accum * args.batch_size / self.batch_time_m.val
        loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in self.losses_m.items())
        pass_label = "" if self.pass_.name == "train" else f"[{self.pass_.name}] "
        optimizer = ctx.optimizer
        logging.info(
            f"Train Epoch: {ctx.epoch} {pass_label}[{num_samples:>{self.sample_digits}}/{self.num_samples} "
            f"({100.0 * batch_count / max(self.num_batches_per_epoch, 1):.0f}%)] "
            f"Data (t): {self.data_time_m.avg:.3f} "
            f"Batch (t): {self.batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
            f"LR: {optimizer.param_groups[0]['lr']:5f} "
            f"Logit Scale: {logit_scale_scalar:.3f} " + loss_log
        )
        log_data = {
            "data_time": self.data_time_m.val,
            "batch_time": self.batch_time_m.val,
            "samples_per_second": samples_per_second,
            "samples_per_second_per_gpu": samples_per_second_per_gpu,
            "scale": logit_scale_scalar,
            "lr": optimizer.param_groups[0]["lr"],
        }
        log_data.update({name: m.val for name, m in self.losses_m.items()})
        report({"train/" + k: v for k, v in log_data.items()}, ctx, step)
        self.batch_time_m.reset()
        self.data_time_m.reset()

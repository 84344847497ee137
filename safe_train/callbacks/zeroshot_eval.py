"""``--eval-data``: clean zero-shot accuracy and attack success rate during training."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from safe_train import openclip as oc
from safe_train.attacks import trigger_from_manifest
from safe_train.evaluate import LabelledImages, evaluate_model, resolve_target
from safe_train.flags import FlagConfig, check, option
from safe_train.interface import Callback, TrainContext
from safe_train.manifest import Manifest
from safe_train.registry import CALLBACKS
from safe_train.zeroshot_sets import get_zeroshot_set


@dataclass
class ZeroShotConfig(FlagConfig):
    prefix: ClassVar[str] = "eval"
    group: ClassVar[str] = "safe-train in-loop zero-shot evaluation"

    data: str | None = option(None, "Labelled test set (image folder, or CSV with filepath and label columns) for "
                              "in-loop zero-shot evaluation.", type=str, metavar="PATH")
    zeroshot_set: str = option("mnist", "Class names + prompt templates: mnist, imagenet, or "
                               "CLASSNAMES_FILE[,TEMPLATES_FILE].")
    manifest: str | None = option(None, "Poison manifest: also measure the attack success rate of its trigger.",
                                  type=str, metavar="manifest.json")
    every: int = option(1, "Evaluate every N epochs (and at the end).", metavar="N")
    batch_size: int = option(256, "Batch size of the evaluation.")

    @property
    def enabled(self) -> bool:
        return self.data is not None

    def validate(self) -> None:
        check(self.every >= 1, f"--eval-every must be >= 1, got {self.every}")
        check(self.batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.batch_size}")


@CALLBACKS.register
class ZeroShotEvaluation(Callback):
    """Clean zero-shot accuracy and attack success rate every N epochs, on rank 0.

    Results go to the log, tensorboard/wandb (``eval/clean_top1``, ``eval/asr``, ...) and one JSON line per
    evaluation in ``<run>/evaluations.jsonl``. The training RNG stream is left untouched.
    """

    name = "zeroshot_eval"

    Config = ZeroShotConfig

    def __init__(self, config: ZeroShotConfig) -> None:
        self.config = config
        self.every = config.every
        zeroshot_set = config.zeroshot_set
        self.classnames, self.templates = get_zeroshot_set(zeroshot_set.split(",") if "," in zeroshot_set
                                                           else zeroshot_set)
        self.dataset = LabelledImages(config.data, classnames=self.classnames)
        self.batch_size = config.batch_size
        self.manifest_path = config.manifest
        self.trigger = None
        self.target_index = None
        self.trigger_image_size = None
        self.attack = None
        if config.manifest:
            manifest = Manifest.load(config.manifest)
            self.attack = {"name": manifest.attack, "params": manifest.params, "target": manifest.target}
            self.target_index = resolve_target(manifest.target, self.classnames)
            if manifest.attack != "targeted":
                self.trigger = trigger_from_manifest(manifest)
                self.trigger_image_size = manifest.image_size

    def on_epoch_end(self, ctx: TrainContext) -> None:
        completed = ctx.epoch + 1
        if not ctx.is_master or (completed % self.every and completed != ctx.args.epochs):
            return
        rng = oc.capture_rng_state()
        try:
            result = evaluate_model(oc.unwrap_model(ctx.model), ctx.preprocess_val, ctx.tokenizer, self.dataset,
                                    self.classnames, self.templates, trigger=self.trigger,
                                    target_index=self.target_index, trigger_image_size=self.trigger_image_size,
                                    batch_size=self.batch_size, device=ctx.device, precision=ctx.args.precision)
        finally:
            oc.restore_rng_state(rng)
        for key in ("clean_top1", "clean_top5", "asr"):
            if result.get(key) is not None:
                ctx.log_metric(f"eval_{key}", result[key])
        result.update({"epoch": completed, "attack": self.attack, "manifest": self.manifest_path})
        log_dir = ctx.run_dir
        if log_dir:
            with open(os.path.join(log_dir, "evaluations.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")

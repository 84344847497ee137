"""Built-in callbacks and the callback registry (timm-style: a name → class dict)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from safe_train.interface import Callback, StepOutput, TrainContext

CALLBACKS: dict[str, type[Callback]] = {}


def register_callback(cls: type[Callback]) -> type[Callback]:
    """Class decorator: make a callback available by its ``name``."""
    if cls.name in CALLBACKS:
        raise ValueError(f"callback {cls.name!r} registered twice")
    CALLBACKS[cls.name] = cls
    return cls


@register_callback
class SimilarityRecorder(Callback):
    """Records each sample's image-caption cosine similarity from the training step (no extra pass).

    Column ``train_similarity`` (float32, NaN until seen) and ``similarity_epoch`` hold the value from
    the last epoch the sample was trained on; they ride in checkpoints like all per-sample state.
    SafeCLIP's in-loop mode and detection read them; ``safe_train/similarity_mean`` is logged.
    """

    name = "record_similarity"

    def setup(self, ctx: TrainContext) -> None:
        ctx.table.add_column("train_similarity", np.float32, np.nan)
        ctx.table.add_column("similarity_epoch", np.int32, -1)
        self._sum = 0.0
        self._count = 0

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self._sum, self._count = 0.0, 0

    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        image = step.features.get("image_features")
        text = step.features.get("text_features")
        if image is None or text is None:
            return
        similarity = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1).cpu().numpy()
        ids = step.sample_ids.cpu().numpy()
        ctx.table.record("train_similarity", ids, similarity)
        ctx.table.record("similarity_epoch", ids, np.full(len(ids), ctx.epoch, np.int32))
        self._sum += float(similarity.sum())
        self._count += len(similarity)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self._count:
            ctx.log_metric("similarity_mean_rank0" if ctx.distributed else "similarity_mean", self._sum / self._count)


@register_callback
class ZeroShotEvaluation(Callback):
    """Clean zero-shot accuracy and attack success rate every N epochs, on rank 0.

    Results go to the log, tensorboard/wandb (``eval/clean_top1``, ``eval/asr``, ...) and one JSON line per
    evaluation in ``<run>/evaluations.jsonl``. The training RNG stream is left untouched.
    """

    name = "zeroshot_eval"

    def __init__(self, args: argparse.Namespace) -> None:
        from safe_train.evaluate import LabelledImages, resolve_target
        from safe_train.zeroshot_sets import get_zeroshot_set

        self.every = max(1, args.eval_every)
        self.classnames, self.templates = get_zeroshot_set(args.eval_zeroshot_set)
        self.dataset = LabelledImages(args.eval_data, classnames=self.classnames)
        self.batch_size = args.eval_batch_size
        self.manifest_path = args.eval_manifest
        self.trigger = None
        self.target_index = None
        self.trigger_image_size = None
        self.attack = None
        if args.eval_manifest:
            from safe_train.attacks import trigger_from_manifest
            from safe_train.manifest import Manifest

            manifest = Manifest.load(args.eval_manifest)
            self.attack = {"name": manifest.attack, "params": manifest.params, "target": manifest.target}
            self.target_index = resolve_target(manifest.target, self.classnames)
            if manifest.attack != "targeted":
                self.trigger = trigger_from_manifest(manifest)
                self.trigger_image_size = manifest.image_size

    def on_epoch_end(self, ctx: TrainContext) -> None:
        completed = ctx.epoch + 1
        if not ctx.is_master or (completed % self.every and completed != ctx.args.epochs):
            return
        from safe_train import openclip_compat as oc
        from safe_train.evaluate import evaluate_model

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


def add_callback_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("safe-train callbacks")
    group.add_argument("--record-similarity", action="store_true",
                       help="Record every sample's image-caption cosine similarity from its training step into the "
                            "per-sample table (saved with checkpoints).")
    group.add_argument("--eval-data", default=None, metavar="PATH",
                       help="Labelled test set (image folder, or CSV with filepath and label columns) for in-loop "
                            "zero-shot evaluation.")
    group.add_argument("--eval-zeroshot-set", default="mnist",
                       help="Class names + prompt templates: mnist, imagenet, or CLASSNAMES_FILE[,TEMPLATES_FILE].")
    group.add_argument("--eval-manifest", default=None, metavar="manifest.json",
                       help="Poison manifest: also measure the attack success rate of its trigger.")
    group.add_argument("--eval-every", type=int, default=1, metavar="N", help="Evaluate every N epochs (and at the end).")
    group.add_argument("--eval-batch-size", type=int, default=256)
    add_detection_arguments(parser)


def build_parser_for_detection() -> argparse.ArgumentParser:
    """A parser with only the detection flags (benchmarks, tests)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_detection_arguments(parser)
    return parser


def add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    """The in-loop detector's flags (docs/detection.md)."""
    from safe_train.detection.scores import DETECTORS

    group = parser.add_argument_group("safe-train in-loop detection")
    group.add_argument("--detect", default=None, metavar="NAMES",
                       help=f"Score every training sample with these detectors, comma-separated "
                            f"({', '.join(DETECTORS)}); from the training step's embeddings, no extra forward pass.")
    group.add_argument("--detect-reference", default="batch", choices=("batch", "global"),
                       help="batch: against the gathered global batch's images and captions (the paper's setting); "
                            "global: at the epoch end, against the epoch's embeddings or a random reference sample "
                            "(--detect-reference-size).")
    group.add_argument("--detect-k", type=int, default=None, metavar="K",
                       help="Neighbourhood size for every detector (default: kdist/slof/dao 16, lid 64).")
    group.add_argument("--detect-metric", default="l2", choices=("l2", "cosine"),
                       help="Distance between (L2-normalised, as OpenCLIP's forward returns them) embeddings.")
    group.add_argument("--detect-backend", default="torch", choices=("torch", "faiss"), help="kNN backend.")
    group.add_argument("--detect-action", default="log", choices=("log", "drop"),
                       help="log: record scores only; drop: exclude the top --detect-drop-fraction from later epochs.")
    group.add_argument("--detect-drop-fraction", type=float, default=None, metavar="F",
                       help="With --detect-action drop: the fraction of the scored samples to drop (0 < F < 1).")
    group.add_argument("--detect-drop-epoch", type=int, default=1, metavar="E",
                       help="Drop once, after the first detection epoch >= E (0-based; default 1: the model of "
                            "epoch 0 has barely learnt anything).")
    group.add_argument("--detect-every", type=int, default=1, metavar="N",
                       help="Detect in every N-th epoch (epochs N-1, 2N-1, ...).")
    group.add_argument("--detect-manifest", default=None, metavar="manifest.json",
                       help="Poison manifest: log AUROC / PR-AUC / FPR@95 of every detector per epoch.")
    group.add_argument("--detect-reference-size", type=int, default=None, metavar="M",
                       help="Global reference: a random sample of M pairs (default: the whole epoch). Keep "
                            "M x poison rate below k, or poisons become each other's neighbours.")


def create_callbacks(args: argparse.Namespace) -> list[Callback]:
    callbacks: list[Callback] = []
    if getattr(args, "record_similarity", False):
        callbacks.append(SimilarityRecorder())
    if getattr(args, "eval_data", None):
        zeroshot_set = args.eval_zeroshot_set
        if isinstance(zeroshot_set, str) and "," in zeroshot_set:
            args.eval_zeroshot_set = zeroshot_set.split(",")
        callbacks.append(ZeroShotEvaluation(args))
    if getattr(args, "detect", None):
        _check_detection_args(args)
        callbacks.append(DetectionCallback(args))
    elif any(getattr(args, name, default) != default for name, default in _DETECTION_DEFAULTS.items()):
        from safe_train.args import ConfigError

        raise ConfigError("--detect-* flags need --detect NAMES (e.g. --detect kdist)")
    return callbacks


_DETECTION_DEFAULTS = {"detect_reference": "batch", "detect_k": None, "detect_action": "log",
                       "detect_drop_fraction": None, "detect_manifest": None, "detect_reference_size": None}


def _check_detection_args(args: argparse.Namespace) -> None:
    """One clear error per bad combination (exit status 2 via ConfigError)."""
    from safe_train.args import ConfigError
    from safe_train.detection.knn import faiss_available
    from safe_train.detection.scores import parse_detectors

    try:
        parse_detectors(args.detect)
    except ValueError as e:
        raise ConfigError(f"--detect: {e}") from None
    if args.detect_k is not None and args.detect_k < 1:
        raise ConfigError(f"--detect-k must be >= 1, got {args.detect_k}")
    if args.detect_every < 1:
        raise ConfigError(f"--detect-every must be >= 1, got {args.detect_every}")
    if args.detect_action == "drop":
        fraction = args.detect_drop_fraction
        if fraction is None or not 0 < fraction < 1:
            raise ConfigError(f"--detect-action drop needs --detect-drop-fraction F with 0 < F < 1, got {fraction}")
    elif args.detect_drop_fraction is not None:
        raise ConfigError("--detect-drop-fraction needs --detect-action drop")
    if args.detect_reference_size is not None:
        if args.detect_reference != "global":
            raise ConfigError("--detect-reference-size needs --detect-reference global")
        if args.detect_reference_size < 2:
            raise ConfigError(f"--detect-reference-size must be >= 2, got {args.detect_reference_size}")
    if args.detect_backend == "faiss" and not faiss_available():
        raise ConfigError("--detect-backend faiss needs faiss (pip install faiss-cpu)")
    if args.detect_manifest and not os.path.isfile(args.detect_manifest) and not os.path.isdir(args.detect_manifest):
        raise ConfigError(f"--detect-manifest: {args.detect_manifest} not found")


from safe_train.detection.callback import DetectionCallback  # noqa: E402  (detection imports nothing from here)

register_callback(DetectionCallback)

"""``--defense safeclip``: pretrain CLIP without learning poisoned pairs (SafeCLIP, Yang et al. 2024).

Poisoned pairs have a low image-caption similarity under a model that has not learned them yet. So:

1. unimodal warmup (``--safeclip-unimodal-warmup-epochs``, default 5): each modality learns alone
   (``L_uni`` below) on all data;
2. multimodal warmup (``--safeclip-multimodal-warmup-epochs``, default 1): the CLIP loss on all data
   at a small constant learning rate (``--safeclip-multimodal-lr``, default 5e-6);
3. every later epoch: the image-caption similarity of every sample, a 2-component 1-D Gaussian mixture,
   a safe set (the most probable members of the high-similarity component; the safe ratio grows by 0.01
   per epoch up to 0.85), then ``L_uni`` on the risky set and the CLIP loss on the safe set.

Two ways to get the similarities (``--safeclip-similarity``):

- ``pass`` (the original): an inference pass over all samples before each split, then a pass of ``L_uni``
  over the risky set and a pass of the CLIP loss over the safe set;
- ``inloop`` (no extra pass; needs ``--safeclip-safe-input raw``): one training pass over all samples whose
  batches mix both sides (:func:`safe_train.losses.split_batch_loss`). Every row's raw pair goes through
  the model, safe rows take the CLIP loss among the safe rows, risky rows the unimodal loss of an augmented
  view against the raw embeddings. Each sample's similarity is its raw pair's cosine in that forward,
  before the update, so safe and risky samples are measured by the same model at the same moment. The
  model drifts during the epoch, so similarities are standardised within windows of steps
  (``--safeclip-window-samples``): every window is a uniform random draw of the data with the same
  safe/risky mix, so this removes the drift and keeps the ranking between samples. The multimodal
  warmup measures the same way for the first split.

Each sample yields two SimCLR views ``x1, x2`` and two EDA captions ``c1, c2`` (fixed per sample id).
With ``I1, I2, T1, T2`` their normalised embeddings and ``s`` the model's one logit scale::

    L_uni  = ( CE(s·I2·A1ᵀ) + CE(s·T2·B1ᵀ) ) / 2     A1 = I1, B1 = T1, or their nearest neighbours in a
                                                     FIFO bank of past view-1 embeddings (--safeclip-memory-bank)
    L_mm   = ( L_CLIP(I1, T2) + L_CLIP(I2, T1) ) / 2   (multimodal warmup)
    L_safe = L_CLIP(I1, T2)                           (safe set; OpenCLIP's ClipLoss)

The split is computed at the end of the epoch before it is used (the model then is the model at the
start of the next epoch, so this equals the original's start-of-epoch pass) and saved with the
checkpoint's sidecar, so ``--resume`` continues with the same split. Every rank holds the same
gathered similarities and fits the same mixture, so every rank makes the same decision.

The learning rate follows OpenCLIP's one warmup+cosine schedule over the steps actually taken: each
epoch's passes share that epoch's slice of the schedule (the multimodal warmup epoch runs at its
constant rate instead). The original's step counter let the cosine wrap around during the risky
pass and ignored the 0.85 cap when counting steps; neither is reproduced.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from safe_train import dist
from safe_train import openclip as oc
from safe_train.augment import EdaAugmenter, SharedEpoch, private_global_rngs, simclr_view, stable_seed
from safe_train.errors import ConfigError
from safe_train.flags import FlagConfig, option
from safe_train.interface import Defense, Selection, StepOutput, TrainContext, TrainPass
from safe_train.losses import (
    SINGLE_PROCESS,
    FeatureBank,
    GatherSpec,
    clip_loss,
    contrastive_ce,
    gather_many,
    split_batch_loss,
)
from safe_train.manifest import Manifest
from safe_train.registry import DEFENSES
from safe_train.state import DeviceRows
from safe_train.wordnet import ensure_wordnet

SIMILARITY_MODES = ("pass", "inloop")
MIXED_OUTPUTS = ("raw_image", "raw_text", "image_view2", "text_view2")  # the in-loop split pass's batch
SAFE_INPUTS = ("views", "raw")
RISKY_VIEWS = ("train", "target")  # the in-loop pass's risky views: trained through, or no-gradient targets
# (image, text) batch keys of the passes whose forward is one pair: the transform makes only these and
# forward encodes exactly these (the multimodal warmup on views and the unimodal passes use all four views)
PASS_OUTPUTS = {"clip": ("image", "text_view2"), "clip_raw": ("raw_image", "raw_text"), "similarity": ("image", "text"),
                "similarity_raw": ("raw_image", "raw_text"), "multimodal_raw": ("raw_image", "raw_text")}


class SafeClipTransform:
    """(PIL image, caption, sample id) → two SimCLR views and two EDA captions of one sample.

    Picklable (data-loader workers). The views are drawn afresh every epoch, each seeded by (``seed``, epoch,
    sample id, view) through :func:`~safe_train.augment.private_global_rngs`, so a sample's tensors do not
    depend on which process or worker makes them: identical runs train on identical batches with any
    ``--workers`` (the loader sets the epoch, :meth:`set_epoch`). The captions are fixed per sample id for
    the whole run (the original computed them once). ``outputs`` restricts
    what is made to the keys a pass reads (the safe pass needs one view and one caption, not two).
    ``raw_image`` / ``raw_text`` are the pair itself, the image through ``raw_preprocess`` (OpenCLIP's
    training preprocessing), for ``--safeclip-safe-input raw``; they are made only when asked for.
    ``view_ids`` (sorted sample ids, the in-loop split pass's risky set): the views are made only for those
    samples; the others get zero placeholders (a view costs about a millisecond of CPU per sample), and
    every sample gets ``has_view``.
    """

    OUTPUTS = ("image", "image_view2", "text", "text_view2")
    RAW_OUTPUTS = ("raw_image", "raw_text")

    def __init__(self, preprocess: Callable, tokenizer: Callable, image_size: int, eda_alpha: float, seed: int,
                 crop_min_scale: float = 0.08, outputs: tuple[str, ...] = OUTPUTS,
                 raw_preprocess: Callable | None = None) -> None:
        self.outputs = self._checked(outputs)
        self.raw_preprocess = raw_preprocess or preprocess
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.view = simclr_view(image_size, crop_scale=(crop_min_scale, 1.0))
        self.eda = EdaAugmenter(alpha=eda_alpha, seed=seed)
        self.seed = seed
        self.epoch = SharedEpoch()  # shared by every restricted copy (a shallow copy keeps the same value)
        self.view_ids: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def image_seed(self, sample_id: int, view: int) -> int:
        """The seed of one image of one sample in the current epoch (0, 1: the views; 2: the raw image)."""
        return stable_seed("safeclip-image", self.seed, self.epoch.get(), int(sample_id), view)

    @classmethod
    def _checked(cls, outputs: tuple[str, ...]) -> tuple[str, ...]:
        known = cls.OUTPUTS + cls.RAW_OUTPUTS
        if not outputs or set(outputs) - set(known):
            raise ValueError(f"SafeClipTransform outputs must be a non-empty subset of {known}, got {outputs}")
        return tuple(outputs)

    def restricted(self, outputs: tuple[str, ...], raw_preprocess: Callable | None = None,
                   view_ids: np.ndarray | None = None) -> SafeClipTransform:
        """The same transform making only ``outputs`` (the raw image through ``raw_preprocess`` if given; views
        only for ``view_ids`` if given)."""
        other = copy.copy(self)
        other.outputs = self._checked(outputs)
        if raw_preprocess is not None:
            other.raw_preprocess = raw_preprocess
        other.view_ids = None if view_ids is None else np.asarray(view_ids, dtype=np.int64)
        return other

    def _makes_views(self, sample_id: int) -> bool:
        if self.view_ids is None:
            return True
        at = int(np.searchsorted(self.view_ids, sample_id))
        return at < len(self.view_ids) and int(self.view_ids[at]) == sample_id

    def __call__(self, image: Any, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        views = self._makes_views(sample_id)
        out: dict[str, torch.Tensor] = {}
        with private_global_rngs(numpy=False) as seed_all:  # its transforms draw from torch and random
            if "raw_image" in self.outputs:
                seed_all(self.image_seed(sample_id, 2))
                out["raw_image"] = self.raw_preprocess(image)
            for view, key in enumerate(("image", "image_view2")):
                if key in self.outputs and views:
                    seed_all(self.image_seed(sample_id, view))
                    out[key] = self.preprocess(self.view(image))
        if "raw_text" in self.outputs:
            out["raw_text"] = self.tokenizer([caption])[0]
        text_keys = [key for key in ("text", "text_view2") if key in self.outputs]
        if text_keys and views:
            captions = [self.eda(caption, sample_id, view=0 if key == "text" else 1) for key in text_keys]
            out.update(zip(text_keys, self.tokenizer(captions), strict=True))
        if self.view_ids is not None:
            if not views:  # placeholders of the right shapes (the batch is collated); never read
                for key in text_keys:
                    out[key] = torch.zeros_like(out["raw_text"])
                for key in ("image", "image_view2"):
                    if key in self.outputs:
                        out[key] = torch.zeros_like(out["raw_image"])
            out["has_view"] = torch.tensor(views)
        return out


def fit_similarity_mixture(similarity: np.ndarray, max_fit_samples: int = 1_000_000,
                           seed: int = 0) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Fit a 2-component 1-D Gaussian mixture; return each sample's posterior of the high-mean component.

    As the original, scikit-learn's ``GaussianMixture(n_components=2, random_state=0)``. Above
    ``max_fit_samples`` it is fitted on a seeded random subset (a 1-D fit needs no more) and the
    posteriors are computed for every sample in chunks; the result depends only on the inputs.
    """
    from scipy.special import expit
    from sklearn.mixture import GaussianMixture

    values = np.asarray(similarity, dtype=np.float64).reshape(-1, 1)
    fit_values = values
    if len(values) > max_fit_samples:
        rng = np.random.default_rng(seed)
        fit_values = values[np.sort(rng.choice(len(values), size=max_fit_samples, replace=False))]
    gmm = GaussianMixture(n_components=2, random_state=0).fit(fit_values)
    high = int(np.argmax(gmm.means_.reshape(-1)))
    means, variances, weights = gmm.means_.reshape(-1), gmm.covariances_.reshape(-1), gmm.weights_
    # the posterior in closed form, expit(log p_high(x) - log p_low(x)): predict_proba's value (to ~1e-7) at a
    # tenth of its cost, which dominated the split at 10^8 samples (benchmarks/state_scale.py)
    log_norm = np.log(weights) - 0.5 * np.log(2 * np.pi * variances)
    low = 1 - high
    posterior = np.empty(len(values), dtype=np.float32)
    chunk = 4_000_000
    for start in range(0, len(values), chunk):
        x = values[start:start + chunk, 0]
        margin = (log_norm[high] - log_norm[low] - (x - means[high]) ** 2 / (2 * variances[high])
                  + (x - means[low]) ** 2 / (2 * variances[low]))
        posterior[start:start + chunk] = expit(margin)
    order = [high, low]
    params = {
        "means": [float(gmm.means_.reshape(-1)[i]) for i in order],
        "stds": [float(math.sqrt(gmm.covariances_.reshape(-1)[i])) for i in order],
        "weights": [float(gmm.weights_[i]) for i in order],
    }
    return posterior, params


def standardize_by_window(values: np.ndarray, windows: np.ndarray, min_count: int = 2) -> np.ndarray:
    """``values`` z-scored within each window (``windows``: the window index of each value, -1 = none).

    In-loop similarities are measured while the model changes; each window of steps is a uniform random
    draw of the data, so its mean and spread follow the model's drift while the order within it is the
    samples' own. A window with fewer than ``min_count`` finite values (the epoch's last, partial one) is
    merged into the one before it. Values without a window, or not finite, come back NaN. Pure function.
    """
    values = np.asarray(values, dtype=np.float64)
    windows = np.asarray(windows, dtype=np.int64)
    out = np.full(len(values), np.nan, dtype=np.float32)
    valid = np.isfinite(values) & (windows >= 0)
    if not valid.any():
        return out
    present, inverse, counts = np.unique(windows[valid], return_inverse=True, return_counts=True)
    merged = np.zeros(len(present), dtype=np.int64)  # consecutive windows form a group of >= min_count values
    group_id, filled = 0, 0
    for i, count in enumerate(counts):
        if filled >= min_count:
            group_id, filled = group_id + 1, 0
        merged[i], filled = group_id, filled + int(count)
    if filled < min_count and group_id > 0:  # a short last group joins the one before it
        merged[merged == group_id] = group_id - 1
    group = merged[inverse]
    v = values[valid]
    n = np.bincount(group, minlength=len(present)).astype(np.float64)
    mean = np.bincount(group, weights=v, minlength=len(present)) / np.maximum(n, 1)
    var = np.bincount(group, weights=(v - mean[group]) ** 2, minlength=len(present)) / np.maximum(n, 1)
    std = np.sqrt(var)
    std[~(std > 0)] = 1.0
    out[valid] = ((v - mean[group]) / std[group]).astype(np.float32)
    return out


def choose_safe(posterior: np.ndarray, ratio: float | None, threshold: float) -> np.ndarray:
    """Boolean mask of the safe set.

    ``ratio`` None (the first split): every sample whose posterior is at least ``threshold``.
    Otherwise the top ``floor(ratio · N)`` samples by posterior (ties broken by position, i.e. by
    sample id, so the choice is deterministic).
    """
    if ratio is None:
        return posterior >= threshold
    count = int(math.floor(ratio * len(posterior) + 1e-9))
    return top_count_mask(posterior, count)


def top_count_mask(values: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest ``values`` as a mask, ties (and NaN, ranked last) taken in position order: what a
    stable descending argsort would pick, in O(N) (a partition, not a sort: 10^8 posteriors in about a second)."""
    n = len(values)
    safe = np.zeros(n, dtype=bool)
    if count <= 0:
        return safe
    if count >= n:
        safe[:] = True
        return safe
    values = np.asarray(values)
    finite = ~np.isnan(values)
    n_finite = int(finite.sum())
    if count >= n_finite:  # every number, then the first NaNs by position
        safe[finite] = True
        safe[np.flatnonzero(~finite)[: count - n_finite]] = True
        return safe
    kth = np.partition(values[finite] if n_finite < n else values, n_finite - count)[n_finite - count]
    np.greater(values, kth, out=safe)
    missing = count - int(safe.sum())
    safe[np.flatnonzero(values == kth)[:missing]] = True
    return safe


def unimodal_loss(image1: torch.Tensor, image2: torch.Tensor, text1: torch.Tensor, text2: torch.Tensor,
                  logit_scale: torch.Tensor, gather: GatherSpec = SINGLE_PROCESS, image_bank: FeatureBank | None = None,
                  text_bank: FeatureBank | None = None) -> torch.Tensor:
    """``L_uni = (CE(s·I2·A1ᵀ) + CE(s·T2·B1ᵀ)) / 2``: A1, B1 are view 1 or its nearest neighbour in a bank.

    Across ranks everything one step needs travels in one all-gather (the keys only, with ``--local-loss``).
    """
    image_keys = image_bank.nearest(image1) if image_bank is not None else image1
    text_keys = text_bank.nearest(text1) if text_bank is not None else text1
    if gather.world_size <= 1:
        return (contrastive_ce(image2, image_keys, logit_scale) + contrastive_ce(text2, text_keys, logit_scale)) / 2
    if gather.local_loss:
        all_image_keys, all_text_keys = gather_many([image_keys, text_keys], gather)
        all_image2 = all_text2 = None
    else:
        all_image2, all_image_keys, all_text2, all_text_keys = gather_many([image2, image_keys, text2, text_keys],
                                                                           gather)
    return (contrastive_ce(image2, image_keys, logit_scale, gather, all_queries=all_image2, all_keys=all_image_keys)
            + contrastive_ce(text2, text_keys, logit_scale, gather, all_queries=all_text2, all_keys=all_text_keys)) / 2


def multimodal_loss(image1: torch.Tensor, image2: torch.Tensor, text1: torch.Tensor, text2: torch.Tensor,
                    logit_scale: torch.Tensor, gather: GatherSpec = SINGLE_PROCESS) -> torch.Tensor:
    """``L_mm = (L_CLIP(I1, T2) + L_CLIP(I2, T1)) / 2``, the multimodal warmup on views; one all-gather."""
    all_i1 = all_t2 = all_i2 = all_t1 = None
    if gather.world_size > 1:
        all_i1, all_t2, all_i2, all_t1 = gather_many([image1, text2, image2, text1], gather)
    return (clip_loss(image1, text2, logit_scale, gather, all_image=all_i1, all_text=all_t2)
            + clip_loss(image2, text1, logit_scale, gather, all_image=all_i2, all_text=all_t1)) / 2


@dataclass
class SafeClipConfig(FlagConfig):
    """SafeCLIP's settings; the defaults are the original's."""

    prefix: ClassVar[str] = "safeclip"
    group: ClassVar[str] = "SafeCLIP (--defense safeclip)"

    unimodal_warmup_epochs: int = option(5, "Epochs of unimodal (image-image, text-text) training on all data.",
                                         metavar="N")
    multimodal_warmup_epochs: int = option(1, "Epochs of CLIP loss on all data at --safeclip-multimodal-lr.",
                                           metavar="N")
    multimodal_lr: float = option(5e-6, "Constant learning rate of the multimodal warmup.")
    threshold: float = option(0.9, "First split: safe = posterior of the high-similarity component >= this.")
    ratio_step: float = option(0.01, "Safe-set ratio added every later epoch.")
    max_ratio: float = option(0.85, "Upper bound of the safe-set ratio.")
    similarity: str = option("pass", "pass: an inference pass over all samples before each split (the original); "
                             "inloop: no extra pass: one training pass whose batches mix safe rows (CLIP loss) and "
                             "risky rows (unimodal loss), each row's raw-pair similarity taken in that forward before "
                             "the update and standardised within windows of steps (needs --safeclip-safe-input raw).",
                             choices=SIMILARITY_MODES)
    risky_views: str = option("train", "In-loop mode: how the risky rows' view and EDA caption enter the unimodal loss. "
                              "train: forwarded with gradient, as the pass mode's views; target: forwarded without "
                              "gradient (a fixed target each raw pair is pulled towards, the other rows' raw pairs "
                              "pushed away), which saves their backward (not in the original).", choices=RISKY_VIEWS)
    window_samples: int = option(2048, "In-loop similarities: standardise them within windows of at least this many "
                                 "samples (whole steps of the global batch), which removes the model's drift within "
                                 "an epoch.", metavar="N")
    safe_input: str = option("views", "What the CLIP side works on: views (the original: the multimodal warmup and "
                             "the safe pass train SimCLR views with EDA captions, the similarity pass measures view 1 "
                             "with caption 1) or raw (all three use the pair itself, as --defense none; the unimodal "
                             "losses keep the views; not in the original).", choices=SAFE_INPUTS)
    memory_bank: int = option(0, "Nearest-neighbour memory bank size for the unimodal loss (0 = plain views; the "
                              "original recommends it, 256 in its code).", metavar="SIZE")
    crop_min_scale: float = option(0.08, "Smallest area share of the views' random resized crop (torchvision's "
                                   "default; small images such as 32x32 digits need more to stay recognisable).")
    eda_alpha: float = option(0.1, "EDA strength: words changed per operation = max(1, floor(alpha * words)).")
    gmm_fit_samples: int = option(1_000_000, "Fit the mixture on at most N (seeded random) samples; posteriors are "
                                  "computed for all.", metavar="N")
    manifest: str | None = option(None, "Poison manifest: log how many poisoned samples land in the safe set "
                                  "(default: --eval-manifest).", type=str, metavar="manifest.json")

    def validate(self) -> None:
        problems = []
        if self.unimodal_warmup_epochs < 0 or self.multimodal_warmup_epochs < 0:
            problems.append("warmup epochs must be >= 0")
        if self.unimodal_warmup_epochs + self.multimodal_warmup_epochs < 1:
            problems.append("SafeCLIP needs at least one warmup epoch (the first split needs a model that has "
                            "seen the data)")
        if not 0.0 < self.threshold < 1.0:
            problems.append("--safeclip-threshold must be in (0, 1)")
        if not 0.0 < self.max_ratio <= 1.0 or self.ratio_step < 0:
            problems.append("--safeclip-max-ratio must be in (0, 1] and --safeclip-ratio-step >= 0")
        if not 0.0 < self.crop_min_scale <= 1.0:
            problems.append("--safeclip-crop-min-scale must be in (0, 1]")
        if self.memory_bank < 0 or self.gmm_fit_samples < 2:
            problems.append("--safeclip-memory-bank must be >= 0 and --safeclip-gmm-fit-samples >= 2")
        if self.similarity == "inloop" and self.safe_input != "raw":
            problems.append("--safeclip-similarity inloop measures and trains the raw pairs: it needs "
                            "--safeclip-safe-input raw")
        if self.risky_views != "train" and self.similarity != "inloop":
            problems.append("--safeclip-risky-views applies to the in-loop pass only (--safeclip-similarity inloop)")
        if self.risky_views not in RISKY_VIEWS:
            problems.append(f"--safeclip-risky-views must be one of {RISKY_VIEWS}")
        if self.window_samples < 1:
            problems.append("--safeclip-window-samples must be >= 1")
        if self.similarity not in SIMILARITY_MODES or self.safe_input not in SAFE_INPUTS:
            problems.append(f"--safeclip-similarity must be one of {SIMILARITY_MODES} and --safeclip-safe-input "
                            f"one of {SAFE_INPUTS}")
        if problems:
            raise ConfigError("; ".join(problems))


@DEFENSES.register
class SafeClip(Defense):
    """SafeCLIP: unimodal warmup, multimodal warmup, then a per-epoch safe/risky split by similarity."""

    name = "safeclip"
    needs_sample_tracking = True
    Config = SafeClipConfig

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SafeClip:
        config = SafeClipConfig.from_args(args)
        if config.manifest is None and getattr(args, "eval_manifest", None):
            config = dataclasses.replace(config, manifest=args.eval_manifest)
        return cls(config)

    def __init__(self, config: SafeClipConfig | None = None) -> None:
        config = config or SafeClipConfig()
        self.config = config
        self.unimodal_epochs = config.unimodal_warmup_epochs
        self.multimodal_epochs = config.multimodal_warmup_epochs
        self.multimodal_lr = config.multimodal_lr
        self.threshold = config.threshold
        self.ratio_step = config.ratio_step
        self.max_ratio = config.max_ratio
        self.similarity_mode = config.similarity
        self.safe_input = config.safe_input
        self.bank_size = config.memory_bank
        self.eda_alpha = config.eda_alpha
        self.crop_min_scale = config.crop_min_scale
        self.gmm_fit_samples = config.gmm_fit_samples
        self.poisoned_ids: np.ndarray | None = None
        if config.manifest:
            self.poisoned_ids = np.asarray(Manifest.load(config.manifest).poisoned_ids, dtype=np.int64)
        self.ratio: float | None = None  # the current safe ratio; None until the first split
        self.banks: dict[str, FeatureBank] = {}
        self._seed = 0
        self._gather = GatherSpec()
        self._transform: SafeClipTransform | None = None
        self._device = torch.device("cpu")  # the model's (ctx.device): banks and buffered similarities live there
        # similarities of steps / inference batches not yet in the table: (host ids, device values)
        self._pending = DeviceRows()  # similarities on the device until the epoch end or a step checkpoint

    # ---- setup ------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        ensure_wordnet()
        args = ctx.args
        if getattr(args, "distill", False) or getattr(args, "siglip", False) or "coca" in str(args.model).lower():
            raise ConfigError("--defense safeclip trains a CLIP contrastive loss: --distill, --siglip and CoCa "
                              "losses are not supported with it")
        ctx.table.add_column("similarity", np.float32, np.nan)
        if self.similarity_mode == "inloop":  # the window of steps each similarity was measured in
            ctx.table.add_column("similarity_window", np.int32, -1)
        ctx.table.add_column("safe_posterior", np.float32, np.nan)
        ctx.table.add_column("safe", bool, False)
        self._seed = int(getattr(ctx.args, "seed", 0))
        self._gather = GatherSpec.from_args(ctx.args)
        global_batch = int(getattr(args, "batch_size", 1)) * int(getattr(args, "world_size", 1))
        self._window_steps = max(1, math.ceil(self.config.window_samples / max(global_batch, 1)))
        self._device = torch.device(ctx.device)

    def sample_transform(self, ctx: TrainContext) -> SafeClipTransform:
        image_size = _image_size(ctx.preprocess_val)
        self._transform = SafeClipTransform(ctx.preprocess_val, ctx.tokenizer, image_size, self.eda_alpha,
                                            self._seed, self.crop_min_scale, raw_preprocess=ctx.preprocess_train)
        return self._transform

    def pass_transform(self, ctx: TrainContext, pass_: TrainPass) -> SafeClipTransform | None:
        """The safe (CLIP) pass reads view 1 and caption 2, the similarity pass view 1 and caption 1; with
        ``--safeclip-safe-input raw`` both read the raw pair (the similarity pass through the eval preprocessing)."""
        kind = self._forward_kind(pass_)
        if self._transform is None:
            self._transform = self.sample_transform(ctx)
        if kind == "mixed":  # views only for the risky samples
            table = ctx.table
            risky_ids = np.sort(table.ids[~table["safe"].astype(bool)])
            return self._transform.restricted(MIXED_OUTPUTS, view_ids=risky_ids)
        needs = PASS_OUTPUTS.get(kind)
        if needs is None:
            return None
        return self._transform.restricted(needs, self._transform.preprocess if kind == "similarity_raw" else None)

    def on_train_start(self, ctx: TrainContext) -> None:
        if self.bank_size and not self.banks:
            dim = _embed_dim(ctx.model)
            self.banks = {key: FeatureBank(self.bank_size, dim, seed=self._seed * 2 + i, device=self._device)
                          for i, key in enumerate(("image", "text"))}

    # ---- the plan -----------------------------------------------------------------------------
    @property
    def first_split_epoch(self) -> int:
        return self.unimodal_epochs + self.multimodal_epochs

    def phase(self, epoch: int) -> str:
        if epoch < self.unimodal_epochs:
            return "unimodal_warmup"
        if epoch < self.first_split_epoch:
            return "multimodal_warmup"
        return "split"

    def plan_epoch(self, ctx: TrainContext, epoch: int) -> list[TrainPass]:
        phase = self.phase(epoch)
        if phase == "unimodal_warmup":
            passes = [TrainPass("unimodal", mode="unimodal")]
        elif phase == "multimodal_warmup":
            # in-loop: over every sample (as a selection pass, keeping the partial last batch), since this
            # epoch measures the similarities of the first split
            passes = [TrainPass("multimodal", selection=self._every_sample(), mode="multimodal",
                                lr_override=self.multimodal_lr)]
        else:
            table = ctx.table
            if self.ratio is None or not table.has_column("safe"):
                raise RuntimeError(f"SafeCLIP epoch {epoch} has no safe/risky split (was the run resumed without "
                                   f"its .safe_train sidecar?)")
            if self.similarity_mode == "inloop":
                return [TrainPass("split", selection=self._every_sample(), mode="mixed")]
            safe = table["safe"].astype(bool)
            safe_ids, risky_ids = table.ids[safe], table.ids[~safe]
            passes = []
            if len(risky_ids):
                passes.append(TrainPass("risky", selection=Selection(risky_ids), mode="unimodal"))
            if len(safe_ids):
                passes.append(TrainPass("safe", selection=Selection(safe_ids), mode="clip"))
        next_epoch = epoch + 1
        if self.similarity_mode == "pass" and next_epoch >= self.first_split_epoch and next_epoch < ctx.args.epochs:
            passes.append(TrainPass("similarity", mode="similarity", train=False))
        return passes

    def _every_sample(self) -> Selection | None:
        """In-loop mode: every sample, as a selection (so the pass keeps its partial last batch and every
        sample gets this epoch's similarity); pass mode: None (the run's own loader)."""
        return Selection.excluding(np.zeros(0, np.int64)) if self.similarity_mode == "inloop" else None

    def _measures(self, epoch: int, last_epoch: int) -> bool:
        """Whether in-loop training in ``epoch`` measures the similarities of a split (one follows it)."""
        return self.similarity_mode == "inloop" and self.phase(epoch) != "unimodal_warmup" and epoch + 1 < last_epoch

    # ---- forward and loss -----------------------------------------------------------------------
    def _forward_kind(self, pass_: TrainPass) -> str:
        """Which PASS_OUTPUTS entry a pass reads."""
        if self.safe_input == "raw" and pass_.mode in ("clip", "similarity", "multimodal"):
            return pass_.mode + "_raw"
        return pass_.mode

    def forward(self, ctx: TrainContext, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                pass_: TrainPass) -> dict[str, torch.Tensor]:
        if pass_.mode == "mixed":  # every raw pair, plus the views of the risky rows, in one model call
            n, device = len(batch["raw_image"]), batch["raw_image"].device
            has_view = batch["has_view"].to(torch.bool)  # a host tensor (HOST_KEYS): no device sync
            rows = has_view.nonzero().squeeze(1).to(device, non_blocking=True)
            view_image, view_text = batch["image_view2"].index_select(0, rows), batch["text_view2"].index_select(0, rows)
            if self.config.risky_views == "target":  # the views as fixed targets: a forward without autograd
                out = model(batch["raw_image"], batch["raw_text"])
                count = len(rows)
                if count == 0:  # still one call (DDP syncs buffers in every forward: equal calls on every rank)
                    view_image, view_text = batch["raw_image"][:1], batch["raw_text"][:1]
                with torch.no_grad():
                    views = model(view_image, view_text)
                image = torch.cat([out["image_features"], views["image_features"][:count].to(out["image_features"].dtype)])
                text = torch.cat([out["text_features"], views["text_features"][:count].to(out["text_features"].dtype)])
            else:  # one model call: the views train with the raw pairs
                out = model(torch.cat([batch["raw_image"], view_image]), torch.cat([batch["raw_text"], view_text]))
                image, text = out["image_features"], out["text_features"]
            image_view = image.new_zeros(image[:n].shape).index_put((rows,), image[n:])  # views in their rows
            text_view = text.new_zeros(text[:n].shape).index_put((rows,), text[n:])
            return {"image_features": image[:n], "text_features": text[:n], "image_view2_features": image_view,
                    "text_view2_features": text_view, "risky": has_view.to(device, non_blocking=True),
                    "logit_scale": out["logit_scale"]}
        pair = PASS_OUTPUTS.get(self._forward_kind(pass_))
        if pair is not None:
            image_key, text_key = pair
            return model(batch[image_key], batch[text_key])
        n = len(batch["image"])
        out = model(torch.cat([batch["image"], batch["image_view2"]]), torch.cat([batch["text"], batch["text_view2"]]))
        image, text = out["image_features"], out["text_features"]
        return {
            "image_features": image[:n],  # I1
            "text_features": text[n:],  # T2: the caption the CLIP terms pair with view 1
            "image_view2_features": image[n:],  # I2
            "text_view1_features": text[:n],  # T1
            "logit_scale": out["logit_scale"],
        }

    def compute_loss(self, ctx: TrainContext, features: dict[str, torch.Tensor], pass_: TrainPass,
                     base_loss: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        scale = features["logit_scale"]
        image1, text2 = features["image_features"], features["text_features"]
        if pass_.mode == "mixed":
            return split_batch_loss(image1, text2, features["image_view2_features"], features["text_view2_features"],
                                    features["risky"], scale, self._gather)
        if pass_.mode == "clip":  # the safe pass: one pair (view 1 with caption 2, or the raw pair)
            return {"clip_loss": clip_loss(image1, text2, scale, self._gather)}
        if pass_.mode == "multimodal" and self.safe_input == "raw":  # the raw pair: image1, text2 are I, T
            return {"multimodal_loss": clip_loss(image1, text2, scale, self._gather)}
        image2, text1 = features["image_view2_features"], features["text_view1_features"]
        if pass_.mode == "multimodal":
            return {"multimodal_loss": multimodal_loss(image1, image2, text1, text2, scale, self._gather)}
        return {"unimodal_loss": unimodal_loss(image1, image2, text1, text2, scale, self._gather,
                                               self.banks.get("image"), self.banks.get("text"))}

    # ---- per-step and per-epoch bookkeeping ----------------------------------------------------
    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        """Enqueue view 1 into the banks and keep the in-loop similarities, all on the device (no host sync)."""
        features = step.features
        if self.banks and step.pass_.mode == "unimodal":
            image, text = features["image_features"], features["text_view1_features"]
            if ctx.distributed:  # both banks' rows in one all-gather
                dim = image.shape[1]
                both = dist.all_gather_tensor(torch.cat([image.float(), text.float()], dim=1))
                image, text = both[:, :dim], both[:, dim:]
            self.banks["image"].enqueue(image)
            self.banks["text"].enqueue(text)
        if self.similarity_mode == "inloop" and step.pass_.mode in ("mixed", "multimodal"):  # the raw pairs
            self._record_similarity(ctx, step.sample_ids, features, window=step.batch_index // self._window_steps)

    def on_inference_batch(self, ctx: TrainContext, pass_: TrainPass, sample_ids: torch.Tensor,
                           features: dict[str, torch.Tensor]) -> None:
        if pass_.mode == "similarity":
            self._record_similarity(ctx, sample_ids, features)

    def _record_similarity(self, ctx: TrainContext, sample_ids: torch.Tensor, features: dict[str, torch.Tensor],
                           window: int | None = None) -> None:
        similarity = F.cosine_similarity(features["image_features"].float().detach(),
                                         features["text_features"].float().detach(), dim=-1)
        self._pending.add(sample_ids.numpy(force=True), similarity, window)
        if self._pending.full:
            self.flush(ctx)

    def flush(self, ctx: TrainContext) -> None:
        """Record the buffered similarities in the table, in the order they were computed (one copy)."""
        parts = self._pending.drain()
        if parts:
            ids = np.concatenate([ids for ids, _, _ in parts])
            ctx.table.record("similarity", ids, np.concatenate([values for _, _, values in parts]))
            if ctx.table.has_column("similarity_window"):
                windows = [np.full(len(part_ids), -1 if w is None else w, np.int32) for part_ids, w, _ in parts]
                ctx.table.record("similarity_window", ids, np.concatenate(windows))

    def on_epoch_start(self, ctx: TrainContext) -> None:
        for bank in self.banks.values():
            bank.rejected.zero_()
        if self._measures(ctx.epoch, ctx.args.epochs):  # a sample this epoch does not measure must not keep an
            ctx.table["similarity"][:] = np.nan  # old value in another epoch's window
            ctx.table["similarity_window"][:] = -1

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self.banks:
            rejected = int(sum(bank.rejected for bank in self.banks.values()))  # once per epoch
            ctx.log_metric("safeclip_bank_rejected_rows", rejected)
            if rejected and ctx.is_master:
                logging.warning(f"SafeCLIP: {rejected} non-finite embedding rows were not enqueued into the memory "
                                f"bank in epoch {ctx.epoch} (fp16 overflow?); their slots kept older entries")
        next_epoch = ctx.epoch + 1
        if next_epoch < self.first_split_epoch or next_epoch >= ctx.args.epochs:
            return
        self.split(ctx, next_epoch)

    def split(self, ctx: TrainContext, for_epoch: int) -> None:
        """Fit the mixture to every sample's similarity and choose the safe set of ``for_epoch``."""
        table = ctx.table
        similarity = table["similarity"]
        if self.similarity_mode == "inloop":
            similarity = standardize_by_window(similarity, table["similarity_window"],
                                               min_count=max(2, self.config.window_samples // 2))
        valid = np.isfinite(similarity)
        if not valid.any():
            raise RuntimeError("SafeCLIP: no sample has a similarity to split on")
        posterior, params = fit_similarity_mixture(similarity[valid], self.gmm_fit_samples, seed=self._seed + for_epoch)
        first = self.ratio is None
        if not first:
            self.ratio = min(self.ratio + self.ratio_step, self.max_ratio)
        safe_valid = choose_safe(posterior, None if first else self.ratio, self.threshold)
        if first:
            self.ratio = float(safe_valid.mean())
        full_posterior = np.full(len(table), np.nan, dtype=np.float32)
        full_posterior[valid] = posterior
        safe = np.zeros(len(table), dtype=bool)
        safe[valid] = safe_valid
        table["safe_posterior"][:] = full_posterior
        table["safe"][:] = safe
        report: dict[str, Any] = {
            "epoch": for_epoch, "first_split": first, "num_samples": int(valid.sum()),
            "num_safe": int(safe.sum()), "safe_ratio": float(self.ratio),
            "threshold": self.threshold if first else float(posterior[safe_valid].min(initial=1.0)),
            "gmm": params, "similarity_mode": self.similarity_mode,
        }
        ctx.log_metric("safeclip_safe_ratio", safe.sum() / max(int(valid.sum()), 1))
        ctx.log_metric("safeclip_gmm_mean_high", params["means"][0])
        ctx.log_metric("safeclip_gmm_mean_low", params["means"][1])
        if self.poisoned_ids is not None:
            poisoned = np.isin(table.ids, self.poisoned_ids)
            report["poisoned_in_safe"] = int((poisoned & safe).sum())
            report["poisoned_total"] = int(poisoned.sum())
            ctx.log_metric("safeclip_poisoned_in_safe", report["poisoned_in_safe"])
        if ctx.is_master and ctx.run_dir:
            out = os.path.join(ctx.run_dir, "safeclip")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "splits.jsonl"), "a") as f:
                f.write(json.dumps(report) + "\n")
            try:
                _plot_split(similarity[valid], params, safe_valid, os.path.join(out, f"split_epoch_{for_epoch}.png"),
                            None if self.poisoned_ids is None else np.isin(table.ids[valid], self.poisoned_ids))
            except Exception as e:  # a plot must never stop training
                logging.warning(f"SafeCLIP: could not plot the split: {e}")
        if ctx.is_master:
            logging.info(f"SafeCLIP split for epoch {for_epoch}: {report['num_safe']}/{report['num_samples']} safe "
                         f"(ratio {self.ratio:.3f}), GMM means {params['means'][0]:.3f}/{params['means'][1]:.3f}"
                         + (f", poisoned in safe {report['poisoned_in_safe']}/{report['poisoned_total']}"
                            if "poisoned_in_safe" in report else ""))

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ratio": self.ratio}
        for key, bank in self.banks.items():
            state[f"bank_{key}"] = bank.features.detach().cpu().clone()  # at checkpoints only
            state[f"bank_{key}_pointer"] = bank.pointer
            state[f"bank_{key}_rejected"] = int(bank.rejected)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio = state.get("ratio")
        for key in ("image", "text"):
            if f"bank_{key}" in state:
                self.banks[key] = FeatureBank.from_state({"features": state[f"bank_{key}"],
                                                          "pointer": state[f"bank_{key}_pointer"]}, self._device)
                self.banks[key].rejected += int(state.get(f"bank_{key}_rejected", 0))


def _image_size(preprocess: Any) -> int:
    """The model's input side from its eval transform (Resize/CenterCrop size)."""
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size if isinstance(size, int) else size[0])
    raise ValueError("cannot tell the model's image size from its preprocessing")


def _embed_dim(model: torch.nn.Module) -> int:
    unwrapped = oc.unwrap_model(model)
    projection = getattr(unwrapped, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[1])
    if isinstance(projection, torch.nn.Linear):
        return int(projection.out_features)
    return int(unwrapped.visual.output_dim)


def _plot_split(similarity: np.ndarray, params: dict[str, list[float]], safe: np.ndarray, path: str,
                poisoned: np.ndarray | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(float(similarity.min()), float(similarity.max()) + 1e-6, 60)
    ax.hist(similarity, bins=bins, density=True, alpha=0.45, color="grey", label="all samples")
    if poisoned is not None and poisoned.any():
        ax.hist(similarity[poisoned], bins=bins, density=False, color="red", alpha=0.8,
                weights=np.full(int(poisoned.sum()), 1.0 / (len(similarity) * (bins[1] - bins[0]))), label="poisoned")
    xs = np.linspace(bins[0], bins[-1], 300)
    for mean, std, weight, name in zip(params["means"], params["stds"], params["weights"], ("high", "low"), strict=True):
        ax.plot(xs, weight * np.exp(-0.5 * ((xs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)), label=f"{name} component")
    if safe.any():
        ax.axvline(float(similarity[safe].min()), color="green", linestyle="--", label="safe threshold")
    ax.set(xlabel="image-caption cosine similarity", ylabel="density", title=f"SafeCLIP split: {safe.mean():.1%} safe")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""``--defense roclip``: pretrain (or finetune) CLIP against poisoning by matching images with pool captions.

RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023). A poisoned image is paired with a caption naming the
attack's target, but among many *other* captions its nearest one is rarely a poisoned one. So in every
``--roclip-every``-th epoch (the "RoCLIP epochs": 0, K, 2K, ...) each image is trained against its nearest
caption in a pool of past captions instead of its own, and the trigger-target co-occurrence is rarely
reinforced. With ``I``, ``T`` the gathered, normalised image and text embeddings of a step and ``s`` the
model's logit scale::

    RoCLIP epochs:  T_nn = NN_pool(I)        cosine nearest pool caption of each image, read BEFORE the enqueue
                    pool ← enqueue(T)        FIFO of past gathered captions (detached), the same on every rank
                    L    = L_CLIP(I, T_nn)   = (CE(s·I·T_nnᵀ) + CE(s·T_nn·Iᵀ)) / 2; T_nn is detached, so the
                                             text tower gets no gradient and is not updated in these epochs
    other epochs:   L    = L_CLIP(I, T)      plain CLIP (the pool is neither read nor updated)

``--roclip-augment`` is the original's ``cross_aug`` (its README's recommended command): in every epoch the
image is replaced by a fresh SimCLR-style view and the caption by an EDA caption fixed per sample id, so the
raw pair itself is never trained on.

Choices where the original code differs (README, "RoCLIP"), and why:

- The pool starts empty, not with random unit vectors: a random vector is a target no caption produced,
  and at from-scratch initialisation, when image-text cosines are noise, thousands of random rows outscore
  the few real ones, so the original's first ~pool/batch steps train images towards noise (README: measured). Ours looks
  only at filled slots; the first step of the run, before anything is enqueued, uses the batch's own
  (detached) captions. Rows that are not finite are not enqueued (their slot keeps its entry) and are
  counted (``roclip_pool_rejected_rows``), as SafeCLIP's bank does.
- The text tower is frozen in RoCLIP epochs: its gradients are dropped before the optimizer step, so
  AdamW neither moves it with momentum from the plain epochs nor decays it. The original adds
  ``0 · CE(s·I·Tᵀ)`` to the loss, whose zero gradient still lets AdamW's momentum and weight decay move
  the text tower. On one process the text forward runs without autograd (it only feeds the pool); under
  DDP, which needs every parameter in each backward, a zero gradient ties the text tower in
  (:class:`_ZeroGradient`) and is dropped before the step.
- The pool persists across epochs, as in the original: a RoCLIP epoch starts with the captions the last
  one enqueued (overwritten after ``pool size / global batch`` steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from safe_train.augment import EdaAugmenter, simclr_view
from safe_train.errors import ConfigError
from safe_train.flags import FlagConfig, option
from safe_train.interface import Defense, SampleTransform, StepOutput, TrainContext, TrainPass
from safe_train.losses import SINGLE_PROCESS, GatherSpec, clip_loss, clip_loss_to_keys, gather_many
from safe_train.registry import DEFENSES
from safe_train.wordnet import ensure_wordnet

log = logging.getLogger(__name__)


class CaptionPool:
    """FIFO pool of past gathered caption embeddings, for RoCLIP's nearest-neighbour captions.

    Every rank enqueues the same gathered rows in rank order, so every rank holds the same pool. It lives
    on the model's device (``device``) in float32; lookups and enqueues never leave it and never wait for
    it (no host sync); only :meth:`state_dict` copies it to the host. It starts empty: ``filled`` marks
    the slots that hold a caption, and a lookup sees only those. Entries are the model's normalised text
    embeddings, so the dot product with a normalised image is the cosine.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str | None = None) -> None:
        if size < 1:
            raise ValueError(f"a caption pool needs at least one slot, got {size}")
        self.features = torch.zeros(size, dim, device=device or "cpu")
        self.filled = torch.zeros(size, dtype=torch.bool, device=self.features.device)
        self.pointer = 0  # the next slot written (host int: the row counts are known on the host)
        self.enqueued = 0  # rows offered since the run started, rejected ones included
        self.rejected = torch.zeros((), dtype=torch.int64, device=self.features.device)

    @property
    def size(self) -> int:
        return len(self.features)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def nearest(self, queries: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Each query's cosine-nearest filled entry (detached, in the queries' dtype and device).

        While no slot is filled (the run's first RoCLIP step) every query gets its ``fallback`` row instead
        (the batch's own captions): chosen on the device, so an empty pool costs no host sync either. The
        search runs in float32 whatever the autocast context.
        """
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            scores = F.normalize(queries.detach().float().to(self.device), dim=-1) @ self.features.T
            scores.masked_fill_(~self.filled, float("-inf"))
            found = self.features[scores.argmax(dim=1)]
            found = torch.where(self.filled.any(), found, fallback.detach().float().to(self.device))
        return found.to(device=queries.device, dtype=queries.dtype)

    def enqueue(self, rows: torch.Tensor) -> None:
        """Write ``rows`` at the pointer, wrapping around (with more rows than slots, the last ``size`` rows
        land where writing them one by one would leave them). A row with NaN/inf is not written: its slot
        keeps its entry (and stays empty if it was) and :attr:`rejected` counts it."""
        rows = rows.detach().float().to(self.device)
        count = len(rows)
        self.enqueued += count
        if count == 0:
            return
        start = self.pointer
        if count > self.size:
            start = (self.pointer + count - self.size) % self.size
            rows = rows[-self.size:]
        slots = (start + torch.arange(len(rows), device=self.device)) % self.size
        finite = torch.isfinite(rows).all(dim=1)
        self.rejected += (~finite).sum()
        self.features[slots] = torch.where(finite.unsqueeze(1), rows, self.features[slots])
        self.filled[slots] = self.filled[slots] | finite
        self.pointer = (self.pointer + count) % self.size

    def state_dict(self) -> dict[str, Any]:
        """Host copies (at checkpoints only: ``int(rejected)`` waits for the device)."""
        return {"features": self.features.detach().cpu().clone(), "filled": self.filled.cpu().clone(),
                "pointer": self.pointer, "enqueued": self.enqueued, "rejected": int(self.rejected)}

    @staticmethod
    def from_state(state: dict[str, Any], device: torch.device | str | None = None) -> CaptionPool:
        features = state["features"]
        pool = CaptionPool(len(features), features.shape[1], device=device)
        pool.features = features.float().to(pool.device).clone()
        pool.filled = state["filled"].bool().to(pool.device).clone()
        pool.pointer = int(state["pointer"])
        pool.enqueued = int(state.get("enqueued", 0))
        pool.rejected += int(state.get("rejected", 0))
        return pool


@dataclass
class RoClipStepLoss:
    """One RoCLIP step: the loss, the keys it used and the captions to enqueue after the step."""

    loss: torch.Tensor
    keys: torch.Tensor  # T_nn of the global batch (detached), row i for global image i
    captions: torch.Tensor  # the gathered T (detached), in rank order


class _ZeroGradient(torch.autograd.Function):
    """A scalar 0 whose backward sends a zero gradient to its input.

    Adding it to the loss puts the text tower into the backward (DDP with ``find_unused_parameters=False``
    errors on the next step when a parameter gets no gradient) without changing the loss, even when the
    input holds NaN/inf (``0 · x`` would make the loss NaN).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.device = tensor.shape, tensor.dtype, tensor.device
        return torch.zeros((), dtype=tensor.dtype, device=tensor.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


def roclip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, pool: CaptionPool,
                gather: GatherSpec = SINGLE_PROCESS) -> RoClipStepLoss:
    """``L_CLIP(I, NN_pool(I))`` of one RoCLIP step; the pool is read here and NOT updated (the caller
    enqueues ``captions`` once the step is done: with ``--accum-freq`` this runs once per micro-batch).

    Images and captions travel in one all-gather; every rank looks up the same gathered images in the same
    pool, so every rank gets the same keys. A ``text`` that carries autograd (DDP) is tied in with a zero.
    """
    if gather.world_size > 1:
        all_image, all_text = gather_many([image, text], gather)
    else:
        all_image, all_text = image, text
    captions = all_text.detach()
    keys = pool.nearest(all_image, fallback=captions)
    loss = clip_loss_to_keys(image, keys, logit_scale, gather, all_image=all_image)
    if text.requires_grad:
        loss = loss + _ZeroGradient.apply(text)
    return RoClipStepLoss(loss, keys, captions)


class RoClipTransform:
    """(PIL image, caption, sample id) → a fresh SimCLR-style view and the sample's EDA caption (``cross_aug``).

    Picklable (data-loader workers). The view is redrawn every time the sample is read; the caption is a pure
    function of (seed, sample id), so it is the same all run long (the original computed it once).
    """

    def __init__(self, preprocess: Callable, tokenizer: Callable, image_size: int, eda: EdaAugmenter,
                 crop_min_scale: float = 0.08) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.view = simclr_view(image_size, crop_scale=(crop_min_scale, 1.0))
        self.eda = eda

    def __call__(self, image: Any, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
        return {"image": self.preprocess(self.view(image)), "text": self.tokenizer([self.eda(caption, sample_id)])[0]}


@dataclass
class RoClipConfig(FlagConfig):
    """RoCLIP's settings; the defaults are the original's."""

    prefix: ClassVar[str] = "roclip"
    group: ClassVar[str] = "RoCLIP (--defense roclip)"

    pool_size: int = option(21845, "Caption pool: how many past (gathered) caption embeddings the images of a RoCLIP "
                            "epoch are matched against.", metavar="N")
    every: int = option(2, "RoCLIP epochs are every K-th epoch from --roclip-first-epoch (F, F+K, F+2K, ...); the "
                        "others train the plain CLIP loss. 1 = every epoch.", metavar="K")
    first_epoch: int = option(0, "The first RoCLIP epoch (0-based; the original: 0). From scratch, epoch 0's image "
                              "tower and caption pool are random, so its nearest captions carry no content; F >= 1 "
                              "lets plain CLIP epochs come first (not in the original).", metavar="F")
    augment: bool = option(False, "The original's cross_aug: train on a fresh SimCLR-style view of each image and an "
                           "EDA caption fixed per sample (the raw pair is never trained on); needs WordNet.")
    crop_min_scale: float = option(0.08, "With --roclip-augment: smallest area share of the view's random resized crop "
                                   "(small images such as 32x32 digits need more to stay recognisable).")
    eda_alpha: float = option(0.1, "With --roclip-augment: EDA strength, words changed per operation = "
                              "max(1, floor(alpha * words)).")

    def validate(self) -> None:
        problems = []
        if self.pool_size < 1:
            problems.append(f"--roclip-pool-size must be >= 1 (got {self.pool_size})")
        if self.every < 1:
            problems.append(f"--roclip-every must be >= 1 (got {self.every}; 1 = every epoch is a RoCLIP epoch)")
        if self.first_epoch < 0:
            problems.append(f"--roclip-first-epoch must be >= 0 (got {self.first_epoch})")
        if not 0.0 < self.crop_min_scale <= 1.0:
            problems.append(f"--roclip-crop-min-scale must be in (0, 1] (got {self.crop_min_scale})")
        if not 0.0 <= self.eda_alpha <= 1.0:
            problems.append(f"--roclip-eda-alpha must be in [0, 1] (got {self.eda_alpha})")
        if problems:
            raise ConfigError("; ".join(problems))


@DEFENSES.register
class RoClip(Defense):
    """RoCLIP: nearest-pool-caption CLIP loss in every K-th epoch, plain CLIP in the others."""

    name = "roclip"
    Config = RoClipConfig

    def __init__(self, config: RoClipConfig | None = None) -> None:
        self.config = config or RoClipConfig()
        self.pool: CaptionPool | None = None  # made at the first RoCLIP step (or restored from a checkpoint)
        self._pending: torch.Tensor | None = None  # this step's gathered captions, enqueued in on_step_end
        self._freeze_text = False  # whether the running pass drops the text tower's gradients
        self._text_params: list[torch.nn.Parameter] = []
        self._hooked_optimizer: torch.optim.Optimizer | None = None
        self._gather = GatherSpec()
        self._device = torch.device("cpu")
        self._eda: EdaAugmenter | None = None

    def is_roclip_epoch(self, epoch: int) -> bool:
        first = self.config.first_epoch
        return epoch >= first and (epoch - first) % self.config.every == 0

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        args = ctx.args
        if getattr(args, "distill", False) or getattr(args, "siglip", False) or "coca" in str(args.model).lower():
            raise ConfigError("--defense roclip trains a CLIP contrastive loss: --distill, --siglip and CoCa losses "
                              "are not supported with it")
        self._gather = GatherSpec.from_args(args)
        self._device = torch.device(ctx.device)
        if self.config.augment:
            ensure_wordnet()  # fail before any data is read (WordNetMissingError says how to get it)
            self._eda = EdaAugmenter(alpha=self.config.eda_alpha, seed=int(getattr(args, "seed", 0)))

    def sample_transform(self, ctx: TrainContext) -> SampleTransform | None:
        if not self.config.augment:
            return None  # OpenCLIP's own (image, text)
        eda = self._eda or EdaAugmenter(alpha=self.config.eda_alpha, seed=int(getattr(ctx.args, "seed", 0)))
        return RoClipTransform(ctx.preprocess_val, ctx.tokenizer, _image_size(ctx.preprocess_val), eda,
                               self.config.crop_min_scale)

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.optimizer is not None and self._hooked_optimizer is not ctx.optimizer:
            self._text_params = text_tower_parameters(ctx.model)
            ctx.optimizer.register_step_pre_hook(self._drop_text_gradients)
            self._hooked_optimizer = ctx.optimizer
        if ctx.is_master:
            log.info(f"RoCLIP: caption pool of {self.config.pool_size}, RoCLIP epochs "
                     f"{', '.join(str(e) for e in range(0, 3 * self.config.every, self.config.every))}, ..."
                     + (", cross augmentation (views + EDA captions)" if self.config.augment else ""))

    def _drop_text_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer pre-step hook: in RoCLIP epochs the text tower is left out of the step entirely (a
        parameter without a gradient gets neither AdamW's momentum update nor its weight decay)."""
        if self._freeze_text:
            for param in self._text_params:
                param.grad = None

    # ---- the plan, forward and loss ----------------------------------------------------------------
    def plan_epoch(self, ctx: TrainContext, epoch: int) -> list[TrainPass]:
        if self.is_roclip_epoch(epoch):
            return [TrainPass("roclip", mode="roclip")]
        return [TrainPass("train", mode="clip")]

    def forward(self, ctx: TrainContext, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                pass_: TrainPass) -> dict[str, torch.Tensor]:
        self._freeze_text = pass_.mode == "roclip"
        distributed = ctx is not None and ctx.distributed
        if pass_.mode != "roclip" or distributed:  # DDP needs every parameter in the graph (see the module doc)
            out = model(batch["image"], batch["text"])
            return {"image_features": out["image_features"], "text_features": out["text_features"],
                    "logit_scale": out["logit_scale"]}
        out = model(batch["image"], None)
        with torch.no_grad():  # the captions only feed the pool: no autograd graph for the text tower
            text = model(None, batch["text"])["text_features"]
        return {"image_features": out["image_features"], "text_features": text, "logit_scale": out["logit_scale"]}

    def compute_loss(self, ctx: TrainContext, features: dict[str, torch.Tensor], pass_: TrainPass,
                     base_loss: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        image, text, scale = features["image_features"], features["text_features"], features["logit_scale"]
        if pass_.mode != "roclip":
            return {"clip_loss": clip_loss(image, text, scale, self._gather)}
        if self.pool is None:
            self.pool = CaptionPool(self.config.pool_size, image.shape[1], device=self._device)
        step = roclip_loss(image, text, scale, self.pool, self._gather)
        self._pending = step.captions  # (with --accum-freq the last micro-batch's call holds the whole step's)
        return {"roclip_loss": step.loss}

    # ---- per step and per epoch ----------------------------------------------------------------------
    def on_step_end(self, ctx: TrainContext, step: StepOutput) -> None:
        """Enqueue the step's gathered captions after its loss read the pool (on the device, no host sync)."""
        if self._pending is not None and self.pool is not None:
            self.pool.enqueue(self._pending)
        self._pending = None

    def on_epoch_start(self, ctx: TrainContext) -> None:
        if self.pool is not None:
            self.pool.rejected.zero_()

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self.pool is None or not self.is_roclip_epoch(ctx.epoch):
            return
        rejected = int(self.pool.rejected)  # once per epoch
        ctx.log_metric("roclip_pool_rejected_rows", rejected)
        if rejected and ctx.is_master:
            log.warning(f"RoCLIP: {rejected} non-finite caption embeddings were not enqueued into the pool in epoch "
                        f"{ctx.epoch} (fp16 overflow?); their slots kept older entries")

    # ---- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()} if self.pool is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "pool" not in state:
            return
        pool = CaptionPool.from_state(state["pool"], self._device)
        if pool.size != self.config.pool_size:
            raise ConfigError(f"the checkpoint's RoCLIP caption pool has {pool.size} slots but --roclip-pool-size is "
                              f"{self.config.pool_size}; resume with the size the run was started with")
        self.pool = pool


def text_tower_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters ``encode_text`` uses: everything but the image tower (``visual.*``) and the logit
    scale/bias, for OpenCLIP's CLIP and CustomTextCLIP, also inside DDP or ``torch.compile`` wrappers."""
    params = []
    for name, param in model.named_parameters():
        bare = name
        while bare.startswith(("module.", "_orig_mod.")):
            bare = bare.split(".", 1)[1]
        if not bare.startswith("visual.") and bare not in ("logit_scale", "logit_bias"):
            params.append(param)
    return params


def _image_size(preprocess: Any) -> int:
    """The model's input side, read from its eval transform (its Resize/CenterCrop size)."""
    for transform in getattr(preprocess, "transforms", []):
        size = getattr(transform, "size", None)
        if size is not None:
            return int(size if isinstance(size, int) else size[0])
    raise ValueError("cannot tell the model's image size from its preprocessing")


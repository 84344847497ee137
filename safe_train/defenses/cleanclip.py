"""``--defense cleanclip``: finetune a possibly poisoned CLIP with CLIP + unimodal self-supervised losses.

CleanCLIP (Bansal et al., ICCV 2023). A backdoor lives in the spurious co-occurrence of a trigger and
a target caption; learning each modality on its own alongside the multimodal loss breaks it::

    L_CLIP = ( CE(s·I·Tᵀ) + CE(s·T·Iᵀ) ) / 2
    L_SS   = ( CE(s·I·Ĩᵀ) + CE(s·T·T̃ᵀ) ) / 2        rows: originals, columns: augmented views
    L      = λ1·L_CLIP + λ2·L_SS                      (--cleanclip-clip-weight, --cleanclip-ss-weight)

``Ĩ`` embeds AutoAugment (ImageNet policy, a fresh draw every epoch, seeded by run seed, epoch and sample
id so that runs are bit-reproducible with any ``--workers``) of the image and ``T̃`` an EDA caption fixed
per sample (seeded by the sample id). Originals and augmented views go
through each tower as one concatenated batch, so BatchNorm towers see both. One learned logit scale
serves all terms. Under data parallelism columns are gathered from all ranks as OpenCLIP's
``ClipLoss`` does (``--local-loss`` and ``--gather-with-grad`` are honoured).

Start from the poisoned model with ``--pretrained path/epoch_N.pt`` (read with ``weights_only=True`` by
OpenCLIP 3.3's loader) and a fresh optimizer. Deliberate differences from the original code: it loads
the poisoned run's optimizer state into the finetuning optimizer (we start a fresh AdamW), and its step
counter skips warmup and lets cosine overrun (we use OpenCLIP's warmup + cosine schedule).

``--cleanclip-ss-weight 0`` is plain CLIP finetuning (the paper's control): no augmented views are
built or encoded, and the loss equals OpenCLIP's ``ClipLoss``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from safe_train.augment import EdaAugmenter, SharedEpoch, autoaugment_view, private_global_rngs, stable_seed
from safe_train.errors import ConfigError
from safe_train.flags import FlagConfig, check, option
from safe_train.interface import Defense, SampleTransform, TrainContext, TrainPass
from safe_train.losses import SINGLE_PROCESS, GatherSpec, contrastive_ce, gather_many
from safe_train.registry import DEFENSES

log = logging.getLogger(__name__)


def cleanclip_losses(image: torch.Tensor, text: torch.Tensor, image_aug: torch.Tensor | None,
                     text_aug: torch.Tensor | None, logit_scale: torch.Tensor, clip_weight: float = 1.0,
                     ss_weight: float = 1.0, gather: GatherSpec = SINGLE_PROCESS) -> dict[str, torch.Tensor]:
    """{"clip_loss": λ1·L_CLIP, "ss_loss": λ2·L_SS} of normalised embeddings; ``logit_scale`` already exp'd.

    With ``image_aug``/``text_aug`` None (λ2 = 0), ``ss_loss`` is a zero that keeps the log's columns.
    Across ranks all four tensors travel in one all-gather (:func:`safe_train.losses.gather_many`).
    """
    views = image_aug is not None and text_aug is not None
    all_image = all_text = all_image_aug = all_text_aug = None
    if gather.world_size > 1:  # one all-gather for everything the step's terms read
        if views:
            all_image, all_text, all_image_aug, all_text_aug = gather_many([image, text, image_aug, text_aug], gather)
        else:
            all_image, all_text = gather_many([image, text], gather)
    clip = (contrastive_ce(image, text, logit_scale, gather, all_queries=all_image, all_keys=all_text)
            + contrastive_ce(text, image, logit_scale, gather, all_queries=all_text, all_keys=all_image)) / 2
    if not views:
        ss = torch.zeros((), device=clip.device, dtype=clip.dtype)
    else:
        ss = (contrastive_ce(image, image_aug, logit_scale, gather, all_queries=all_image, all_keys=all_image_aug)
              + contrastive_ce(text, text_aug, logit_scale, gather, all_queries=all_text, all_keys=all_text_aug)) / 2
    return {"clip_loss": clip_weight * clip, "ss_loss": ss_weight * ss}


class CleanClipTransform:
    """(image, caption, id) → original pair + AutoAugment image view + EDA caption (a picklable callable).

    Both images get the model's training preprocessing (OpenCLIP's preprocess_train: with default
    flags a RandomResizedCrop of scale 0.9-1 and normalisation, the same as ``--defense none``); the
    augmented one gets AutoAugment first. ``with_views=False`` (λ2 = 0) returns only the pair.

    Every random draw of an image is seeded by (``seed``, epoch, sample id, view: 0 the original, 1 the
    AutoAugment view) through :func:`~safe_train.augment.private_global_rngs`, and the EDA caption by
    (EDA seed, sample id), fixed for the run as in the original. So a sample's tensors do not depend on
    which process or data-loader worker makes them, nor on what that process drew before: two runs with
    the same flags train on identical batches with any ``--workers``, and a fresh AutoAugment draw still
    comes every epoch. The training loop sets the epoch (:meth:`set_epoch`, through the loader). With λ2 = 0
    the pair is made exactly as ``--defense none`` makes it (OpenCLIP's unseeded draws), so the control
    run stays comparable to plain OpenCLIP finetuning.
    """

    def __init__(self, preprocess: Any, tokenizer: Any, eda: EdaAugmenter | None, with_views: bool = True,
                 seed: int = 0) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.eda = eda
        self.with_views = with_views
        self.seed = seed
        self.epoch = SharedEpoch()
        self.image_view = autoaugment_view()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def image_seed(self, sample_id: int, view: int) -> int:
        """The seed of one image view of one sample in the current epoch."""
        return stable_seed("cleanclip-image", self.seed, self.epoch.get(), int(sample_id), view)

    def __call__(self, image: Any, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
        text = self.tokenizer([caption])[0]
        if not self.with_views:
            return {"image": self.preprocess(image), "text": text}
        with private_global_rngs(numpy=False) as seed_all:  # its transforms draw from torch and random
            seed_all(self.image_seed(sample_id, 0))
            original = self.preprocess(image)
            seed_all(self.image_seed(sample_id, 1))
            augmented = self.preprocess(self.image_view(image))
        return {"image": original, "text": text, "image_aug": augmented,
                "text_aug": self.tokenizer([self.eda(caption, sample_id)])[0]}


@dataclass
class CleanClipConfig(FlagConfig):
    """CleanCLIP's settings; the defaults are the paper's."""

    prefix: ClassVar[str] = "cleanclip"
    group: ClassVar[str] = "CleanCLIP (--defense cleanclip)"

    clip_weight: float = option(1.0, "Weight λ1 of the multimodal CLIP loss.", metavar="λ1")
    ss_weight: float = option(1.0, "Weight λ2 of the unimodal self-supervised loss (the paper's ablation also uses "
                              "8). 0 = plain CLIP finetuning, no augmented views are computed.", metavar="λ2")
    eda_alpha: float = option(0.1, "EDA: fraction of a caption's words changed, n = max(1, floor(alpha*words)).",
                              metavar="ALPHA")
    eda_seed: int = option(0, "Seed of the per-sample EDA captions.")

    def validate(self) -> None:
        check(self.clip_weight >= 0 and self.ss_weight >= 0,
              "--cleanclip-clip-weight and --cleanclip-ss-weight must be >= 0")


@DEFENSES.register
class CleanClip(Defense):
    """CleanCLIP finetuning: λ1·L_CLIP + λ2·L_SS with AutoAugment and EDA views."""

    name = "cleanclip"
    Config = CleanClipConfig

    def __init__(self, config: CleanClipConfig | None = None) -> None:
        self.config = config or CleanClipConfig()
        self.clip_weight = self.config.clip_weight
        self.ss_weight = self.config.ss_weight
        self.with_views = self.ss_weight > 0
        # Fail before any data is read if WordNet is missing (WordNetMissingError says how to get it).
        self.eda = EdaAugmenter(alpha=self.config.eda_alpha, seed=self.config.eda_seed) if self.with_views else None

    def on_train_start(self, ctx: TrainContext) -> None:
        args = ctx.args
        unsupported = [flag for flag, on in (("--siglip", getattr(args, "siglip", False)),
                                            ("--distill-model", getattr(args, "distill", False))) if on]
        if unsupported:
            raise ConfigError(f"--defense cleanclip does not support {', '.join(unsupported)}")
        if ctx.is_master:
            log.info(f"CleanCLIP: clip weight {self.clip_weight}, ss weight {self.ss_weight}"
                     + ("" if self.with_views else " (plain CLIP finetuning: no augmented views)"))

    def sample_transform(self, ctx: TrainContext) -> SampleTransform:
        return CleanClipTransform(ctx.preprocess_train, ctx.tokenizer, self.eda, self.with_views,
                                  seed=int(getattr(ctx.args, "seed", 0)))

    def forward(self, ctx: TrainContext, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                pass_: TrainPass) -> dict[str, torch.Tensor]:
        if not self.with_views or "image_aug" not in batch:
            out = model(batch["image"], batch["text"])
            return {"image_features": out["image_features"], "text_features": out["text_features"],
                    "logit_scale": out["logit_scale"]}
        n = len(batch["image"])
        out = model(torch.cat([batch["image"], batch["image_aug"]]), torch.cat([batch["text"], batch["text_aug"]]))
        image, text = out["image_features"], out["text_features"]
        return {"image_features": image[:n], "text_features": text[:n], "image_aug_features": image[n:],
                "text_aug_features": text[n:], "logit_scale": out["logit_scale"]}

    def compute_loss(self, ctx: TrainContext, features: dict[str, torch.Tensor], pass_: TrainPass,
                     base_loss: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        args = ctx.args
        return cleanclip_losses(
            features["image_features"], features["text_features"], features.get("image_aug_features"),
            features.get("text_aug_features"), features["logit_scale"], self.clip_weight, self.ss_weight,
            GatherSpec.from_args(args))

"""``--defense cleanclip``: finetune a possibly poisoned CLIP with CLIP + unimodal self-supervised losses.

CleanCLIP (Bansal et al., ICCV 2023). A backdoor lives in the spurious co-occurrence of a trigger and
a target caption; learning each modality on its own alongside the multimodal loss breaks it::

    L_CLIP = ( CE(s·I·Tᵀ) + CE(s·T·Iᵀ) ) / 2
    L_SS   = ( CE(s·I·Ĩᵀ) + CE(s·T·T̃ᵀ) ) / 2        rows: originals, columns: augmented views
    L      = λ1·L_CLIP + λ2·L_SS                      (--cleanclip-clip-weight, --cleanclip-ss-weight)

``Ĩ`` embeds AutoAugment (ImageNet policy, a fresh draw every time a sample is read) of the image and
``T̃`` an EDA caption fixed per sample (seeded by the sample id). Originals and augmented views go
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

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from safe_train.augment import EdaAugmenter, autoaugment_view
from safe_train.defenses import register_defense
from safe_train.interface import Defense, SampleTransform, TrainContext, TrainPass

log = logging.getLogger(__name__)


def gather_rows(local: torch.Tensor, rank: int, world_size: int, local_loss: bool = False,
                gather_with_grad: bool = False) -> torch.Tensor:
    """All ranks' rows of ``local`` in rank order, as OpenCLIP's ``gather_features`` builds them.

    Without ``gather_with_grad`` the gathered copy carries no gradient except the local chunk (kept
    unless ``local_loss``, where the local rows are the queries and keep their gradient anyway).
    """
    if world_size <= 1:
        return local
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        return torch.cat(all_gather_with_grad(local), dim=0)
    chunks = [torch.zeros_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(chunks, local.contiguous())
    if not local_loss:
        chunks[rank] = local
    return torch.cat(chunks, dim=0)


def _contrastive_ce(queries: torch.Tensor, all_queries: torch.Tensor, all_keys: torch.Tensor,
                    logit_scale: torch.Tensor, rank: int, world_size: int, local_loss: bool) -> torch.Tensor:
    """CE of rows ``queries`` against columns ``all_keys``; row i's positive is its own pair's column."""
    if world_size > 1 and local_loss:
        logits = logit_scale * queries @ all_keys.T
        labels = torch.arange(len(queries), device=queries.device) + len(queries) * rank
    else:
        logits = logit_scale * all_queries @ all_keys.T
        labels = torch.arange(len(all_queries), device=queries.device)
    return F.cross_entropy(logits, labels)


def cleanclip_losses(image: torch.Tensor, text: torch.Tensor, image_aug: torch.Tensor | None,
                     text_aug: torch.Tensor | None, logit_scale: torch.Tensor, clip_weight: float = 1.0,
                     ss_weight: float = 1.0, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                     gather_with_grad: bool = False) -> dict[str, torch.Tensor]:
    """{"clip_loss": λ1·L_CLIP, "ss_loss": λ2·L_SS} of normalised embeddings; ``logit_scale`` already exp'd.

    With ``image_aug``/``text_aug`` None (λ2 = 0), ``ss_loss`` is a zero that keeps the log's columns.
    """
    opts = dict(rank=rank, world_size=world_size, local_loss=local_loss)
    all_image = gather_rows(image, rank, world_size, local_loss, gather_with_grad)
    all_text = gather_rows(text, rank, world_size, local_loss, gather_with_grad)
    clip = (_contrastive_ce(image, all_image, all_text, logit_scale, **opts)
            + _contrastive_ce(text, all_text, all_image, logit_scale, **opts)) / 2
    if image_aug is None or text_aug is None:
        ss = torch.zeros((), device=clip.device, dtype=clip.dtype)
    else:
        # Augmented views are only ever columns: keep their local chunk's gradient even with --local-loss
        # (where ClipLoss can drop it because its columns are the other direction's rows).
        all_image_aug = gather_rows(image_aug, rank, world_size, False, gather_with_grad)
        all_text_aug = gather_rows(text_aug, rank, world_size, False, gather_with_grad)
        ss = (_contrastive_ce(image, all_image, all_image_aug, logit_scale, **opts)
              + _contrastive_ce(text, all_text, all_text_aug, logit_scale, **opts)) / 2
    return {"clip_loss": clip_weight * clip, "ss_loss": ss_weight * ss}


class CleanClipTransform:
    """(image, caption, id) → original pair + AutoAugment image view + EDA caption (a picklable callable).

    Both images get the model's training preprocessing (OpenCLIP's preprocess_train: with default
    flags a RandomResizedCrop of scale 0.9-1 and normalisation, the same as ``--defense none``); the
    augmented one gets AutoAugment first. ``with_views=False`` (λ2 = 0) returns only the pair.
    """

    def __init__(self, preprocess: Any, tokenizer: Any, eda: EdaAugmenter | None, with_views: bool = True) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.eda = eda
        self.with_views = with_views
        self.image_view = autoaugment_view()

    def __call__(self, image: Any, caption: str, sample_id: int) -> dict[str, torch.Tensor]:
        out = {"image": self.preprocess(image), "text": self.tokenizer([caption])[0]}
        if self.with_views:
            out["image_aug"] = self.preprocess(self.image_view(image))
            out["text_aug"] = self.tokenizer([self.eda(caption, sample_id)])[0]
        return out


@register_defense
class CleanClip(Defense):
    """CleanCLIP finetuning: λ1·L_CLIP + λ2·L_SS with AutoAugment and EDA views."""

    name = "cleanclip"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("--defense cleanclip")
        group.add_argument("--cleanclip-clip-weight", type=float, default=1.0, metavar="λ1",
                           help="Weight of the multimodal CLIP loss (default 1).")
        group.add_argument("--cleanclip-ss-weight", type=float, default=1.0, metavar="λ2",
                           help="Weight of the unimodal self-supervised loss (default 1; the paper's ablation "
                                "also uses 8). 0 = plain CLIP finetuning, no augmented views are computed.")
        group.add_argument("--cleanclip-eda-alpha", type=float, default=0.1, metavar="ALPHA",
                           help="EDA: fraction of a caption's words changed, n = max(1, floor(alpha*words)) "
                                "(default 0.1).")
        group.add_argument("--cleanclip-eda-seed", type=int, default=0,
                           help="Seed of the per-sample EDA captions (default 0).")

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clip_weight = float(getattr(args, "cleanclip_clip_weight", 1.0))
        self.ss_weight = float(getattr(args, "cleanclip_ss_weight", 1.0))
        if self.clip_weight < 0 or self.ss_weight < 0:
            raise SystemExit("safe-train: --cleanclip-clip-weight and --cleanclip-ss-weight must be >= 0")
        self.with_views = self.ss_weight > 0
        # Fail before any data is read if WordNet is missing (WordNetMissingError says how to get it).
        self.eda = EdaAugmenter(alpha=float(getattr(args, "cleanclip_eda_alpha", 0.1)),
                                seed=int(getattr(args, "cleanclip_eda_seed", 0))) if self.with_views else None

    def on_train_start(self, ctx: TrainContext) -> None:
        args = ctx.args
        unsupported = [flag for flag, on in (("--siglip", getattr(args, "siglip", False)),
                                            ("--distill-model", getattr(args, "distill", False))) if on]
        if unsupported:
            raise SystemExit(f"safe-train: --defense cleanclip does not support {', '.join(unsupported)}")
        if ctx.is_master:
            log.info(f"CleanCLIP: clip weight {self.clip_weight}, ss weight {self.ss_weight}"
                     + ("" if self.with_views else " (plain CLIP finetuning: no augmented views)"))

    def sample_transform(self, ctx: TrainContext) -> SampleTransform:
        return CleanClipTransform(ctx.preprocess_train, ctx.tokenizer, self.eda, self.with_views)

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
            rank=ctx.rank, world_size=ctx.world_size, local_loss=bool(getattr(args, "local_loss", False)),
            gather_with_grad=bool(getattr(args, "gather_with_grad", False)))

"""Contrastive loss terms shared by the defenses, gathered across ranks like OpenCLIP's ``ClipLoss``.

Notation (../shared/spec/defenses.md): ``CE(M)`` is the mean cross-entropy of the rows of the logit
matrix ``M`` against the diagonal; ``s`` the model's learned logit scale. Under data parallelism the
rows and columns are gathered from every rank (local entries keep their gradient), so the loss each
rank computes equals the single-process loss over the global batch; with ``local_loss`` only the
local rows are used against the gathered columns, as in OpenCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GatherSpec:
    """How features are gathered (OpenCLIP's ``--local-loss`` / ``--gather-with-grad``)."""

    rank: int = 0
    world_size: int = 1
    local_loss: bool = False
    gather_with_grad: bool = False

    @staticmethod
    def from_args(args) -> GatherSpec:
        return GatherSpec(rank=getattr(args, "rank", 0), world_size=getattr(args, "world_size", 1),
                          local_loss=bool(getattr(args, "local_loss", False)),
                          gather_with_grad=bool(getattr(args, "gather_with_grad", False)))


def contrastive_ce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                   gather: GatherSpec = GatherSpec()) -> torch.Tensor:
    """``CE(s · Q · Kᵀ)``: row i of ``queries`` has column i of ``keys`` as its positive."""
    if gather.world_size > 1:
        from open_clip.loss import gather_features

        all_queries, all_keys = gather_features(queries, keys, local_loss=gather.local_loss,
                                                gather_with_grad=gather.gather_with_grad, rank=gather.rank,
                                                world_size=gather.world_size)
        if gather.local_loss:
            logits = logit_scale * queries @ all_keys.T
            labels = torch.arange(len(queries), device=queries.device) + gather.rank * len(queries)
            return F.cross_entropy(logits, labels)
        queries, keys = all_queries, all_keys
    logits = logit_scale * queries @ keys.T
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              gather: GatherSpec = GatherSpec()) -> torch.Tensor:
    """``L_CLIP(I, T) = (CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) / 2``."""
    return (contrastive_ce(image, text, logit_scale, gather) + contrastive_ce(text, image, logit_scale, gather)) / 2

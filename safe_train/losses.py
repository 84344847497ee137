"""The one gathered contrastive cross-entropy every defense builds on, and the nearest-neighbour feature bank.

Notation (../shared/spec/defenses.md): ``CE(M)`` is the mean cross-entropy of the rows of the logit
matrix ``M`` against the diagonal; ``s`` the model's learned logit scale.

Under data parallelism (OpenCLIP's ``--local-loss`` / ``--gather-with-grad``) the keys (columns) are
gathered from every rank in rank order. Unlike OpenCLIP's ``gather_features``, the local chunk of the
gathered keys always keeps its gradient, also under ``--local-loss``: a term whose keys are never
queries (SafeCLIP's unimodal ``CE(s·I2·I1ᵀ)``, CleanCLIP's augmented views) would otherwise give its
keys no gradient at all on more than one rank. So, for every flag combination, the gradient a rank's
loss sends to its own rows equals a single process's gradient of that rank's loss on the
concatenated batch (``tests/test_loss_gradients.py``):

- without ``--local-loss`` every rank's loss is the global-batch loss;
- with ``--local-loss`` it is the local rows' share (queries: local rows; keys: all rows);
- with ``--gather-with-grad`` the other ranks' losses reach this rank's rows too (the gather's
  backward sums them), as in OpenCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


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


SINGLE_PROCESS = GatherSpec()
"""No gathering: the default of every loss function."""


def gather_rows(local: torch.Tensor, gather: GatherSpec) -> torch.Tensor:
    """Every rank's rows of ``local`` in rank order; the local chunk keeps its gradient.

    With ``gather_with_grad`` the other chunks carry gradient back to their ranks too.
    """
    if gather.world_size <= 1:
        return local
    if gather.gather_with_grad:
        return torch.cat(all_gather_with_grad(local), dim=0)
    chunks = [torch.empty_like(local) for _ in range(gather.world_size)]
    torch_dist.all_gather(chunks, local.contiguous())
    chunks[gather.rank] = local
    return torch.cat(chunks, dim=0)


def contrastive_ce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                   gather: GatherSpec = SINGLE_PROCESS, *, all_queries: torch.Tensor | None = None,
                   all_keys: torch.Tensor | None = None) -> torch.Tensor:
    """``CE(s · Q · Kᵀ)``: row i of ``queries`` has column i of ``keys`` as its positive.

    ``all_queries`` / ``all_keys`` are the already gathered tensors, when the caller gathers once for
    several terms (they must come from :func:`gather_rows` of the same inputs).
    """
    if gather.world_size > 1:
        all_keys = gather_rows(keys, gather) if all_keys is None else all_keys
        if gather.local_loss:
            logits = logit_scale * queries @ all_keys.T
            labels = torch.arange(len(queries), device=queries.device) + gather.rank * len(queries)
            return F.cross_entropy(logits, labels)
        queries = gather_rows(queries, gather) if all_queries is None else all_queries
        keys = all_keys
    logits = logit_scale * queries @ keys.T
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              gather: GatherSpec = SINGLE_PROCESS) -> torch.Tensor:
    """``L_CLIP(I, T) = (CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) / 2``; each side is gathered once."""
    all_image = gather_rows(image, gather)
    all_text = gather_rows(text, gather)
    return (contrastive_ce(image, text, logit_scale, gather, all_queries=all_image, all_keys=all_text)
            + contrastive_ce(text, image, logit_scale, gather, all_queries=all_text, all_keys=all_image)) / 2


class FeatureBank:
    """FIFO bank of past (gathered) embeddings, for nearest-neighbour positives (NNCLR) or caption pools.

    Every rank enqueues the same gathered rows, so every rank holds the same bank. It lives on the
    device of the first enqueued features (no host round trip per step) and is checkpointed through
    :meth:`state_dict`.
    """

    def __init__(self, size: int, dim: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = F.normalize(torch.randn(size, dim, generator=generator), dim=-1)
        self.pointer = 0

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Each query's cosine nearest neighbour in the bank (detached)."""
        bank = self.features.to(device=queries.device, dtype=queries.dtype)
        index = (F.normalize(queries.detach(), dim=-1) @ bank.T).argmax(dim=1)
        return bank[index]

    def enqueue(self, features: torch.Tensor) -> None:
        features = features.detach().float().to(self.features.device)
        size = len(self.features)
        if len(features) >= size:
            self.features = features[-size:].clone()
            self.pointer = 0
            return
        end = self.pointer + len(features)
        if end <= size:
            self.features[self.pointer:end] = features
        else:
            split = size - self.pointer
            self.features[self.pointer:] = features[:split]
            self.features[:end - size] = features[split:]
        self.pointer = end % size

    def state_dict(self) -> dict:
        return {"features": self.features.detach().cpu().clone(), "pointer": self.pointer}

    @staticmethod
    def from_state(state: dict) -> FeatureBank:
        features = state["features"]
        bank = FeatureBank(len(features), features.shape[1], seed=0)
        bank.features = features.clone().float()
        bank.pointer = int(state["pointer"])
        return bank

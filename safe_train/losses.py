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


def gather_many(tensors: list[torch.Tensor], gather: GatherSpec) -> list[torch.Tensor]:
    """:func:`gather_rows` of several ``(n, d_i)`` tensors in one collective: each all-gather is a launch and a
    wait, and a step's loss gathers up to four feature tensors. The tensors ride side by side in one
    ``(n, sum d_i)`` tensor; concatenation and slicing copy values exactly and route gradients unchanged."""
    if gather.world_size <= 1:
        return list(tensors)
    if len(tensors) == 1 or len({t.dtype for t in tensors}) > 1 or len({len(t) for t in tensors}) > 1:
        return [gather_rows(t, gather) for t in tensors]  # mixed dtypes or row counts cannot share one block
    widths = [t.shape[1] for t in tensors]
    return list(torch.split(gather_rows(torch.cat(tensors, dim=1), gather), widths, dim=1))


def contrastive_ce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                   gather: GatherSpec = SINGLE_PROCESS, *, all_queries: torch.Tensor | None = None,
                   all_keys: torch.Tensor | None = None) -> torch.Tensor:
    """``CE(s · Q · Kᵀ)``: row i of ``queries`` has column i of ``keys`` as its positive.

    ``all_queries`` / ``all_keys`` are the already gathered tensors, when the caller gathers once for
    several terms (they must come from :func:`gather_rows` / :func:`gather_many` of the same inputs).
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
              gather: GatherSpec = SINGLE_PROCESS, *, all_image: torch.Tensor | None = None,
              all_text: torch.Tensor | None = None) -> torch.Tensor:
    """``L_CLIP(I, T) = (CE(s·I·Tᵀ) + CE(s·T·Iᵀ)) / 2``; both sides travel in one all-gather (or come
    already gathered from a caller that gathers several terms' features at once)."""
    if gather.world_size > 1 and (all_image is None or all_text is None):
        all_image, all_text = gather_many([image, text], gather)
    return (contrastive_ce(image, text, logit_scale, gather, all_queries=all_image, all_keys=all_text)
            + contrastive_ce(text, image, logit_scale, gather, all_queries=all_text, all_keys=all_image)) / 2


def clip_loss_to_keys(image: torch.Tensor, all_keys: torch.Tensor, logit_scale: torch.Tensor,
                      gather: GatherSpec = SINGLE_PROCESS, *, all_image: torch.Tensor | None = None) -> torch.Tensor:
    """``L_CLIP(I, K)`` against keys that carry no gradient and that every rank already holds for the whole
    global batch (row i of ``all_keys`` pairs with global row i of the images): RoCLIP's nearest pool captions.

    Nothing is gathered for ``K``: every rank computed the same ``all_keys`` from the same gathered queries, and
    its own rows of it are its slice. Gradients reach ``image`` and the logit scale exactly as in
    :func:`clip_loss` for every ``--local-loss`` / ``--gather-with-grad`` combination; ``all_image`` is the
    already gathered ``image`` when the caller gathered it (with other features) in one collective.
    """
    keys = all_keys.detach()
    if gather.world_size <= 1:
        return clip_loss(image, keys, logit_scale)
    if all_image is None:
        all_image = gather_rows(image, gather)
    rows = len(image)
    local_keys = keys[gather.rank * rows:(gather.rank + 1) * rows]
    return clip_loss(image, local_keys, logit_scale, gather, all_image=all_image, all_text=keys)


def _row_ce(logits: torch.Tensor, labels: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` against ``labels``; columns where ``key_keep`` is False are excluded
    (a row's own label column always counts)."""
    if key_keep is not None:
        keep = key_keep.unsqueeze(0).expand_as(logits).clone()
        keep[torch.arange(len(labels), device=logits.device), labels] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, labels, reduction="none")


def split_batch_loss(image: torch.Tensor, text: torch.Tensor, image_view: torch.Tensor, text_view: torch.Tensor,
                     risky: torch.Tensor, logit_scale: torch.Tensor,
                     gather: GatherSpec = SINGLE_PROCESS) -> dict[str, torch.Tensor]:
    """One batch holding both sides of a safe/risky split (SafeCLIP's in-loop mode).

    ``image`` / ``text``: every row's raw pair; ``image_view`` / ``text_view``: an augmented view and caption,
    read only in ``risky`` rows (others may hold anything finite). Safe rows take the CLIP loss among the safe
    rows (risky columns masked); risky rows take the unimodal loss ``(CE(s·Ĩ·Iᵀ) + CE(s·T̃·Tᵀ)) / 2``, their view
    as query against every row's raw embedding (more negatives than the risky rows alone). Returns the two
    terms as sums over query rows divided by the number of query rows, so they add up to the batch mean of
    every row's own loss: a row weighs the same whichever side it is on. All ranks' rows travel in one
    all-gather (equal row counts: the views sit in their rows' places).
    """
    rows = len(image)
    risky = risky.to(device=image.device, dtype=torch.bool)
    if gather.world_size > 1:
        flags = risky.to(image.dtype).unsqueeze(1)
        all_image, all_text, all_image_view, all_text_view, all_flags = gather_many(
            [image, text, image_view, text_view, flags], gather)
        all_risky = all_flags.squeeze(1).detach() > 0.5
    else:
        all_image, all_text, all_image_view, all_text_view, all_risky = image, text, image_view, text_view, risky
    if gather.world_size > 1 and gather.local_loss:  # queries: this rank's rows; keys: every rank's
        q_image, q_text, q_image_view, q_text_view, q_risky = image, text, image_view, text_view, risky
        labels = torch.arange(rows, device=image.device) + gather.rank * rows
    else:  # queries: the global batch (every rank computes the global loss, as OpenCLIP without --local-loss)
        q_image, q_text, q_image_view, q_text_view, q_risky = all_image, all_text, all_image_view, all_text_view, all_risky
        labels = torch.arange(len(all_image), device=image.device)
    safe_keys = ~all_risky
    clip_rows = (_row_ce(logit_scale * q_image @ all_text.T, labels, safe_keys)
                 + _row_ce(logit_scale * q_text @ all_image.T, labels, safe_keys)) / 2
    uni_rows = (_row_ce(logit_scale * q_image_view @ all_image.T, labels, None)
                + _row_ce(logit_scale * q_text_view @ all_text.T, labels, None)) / 2
    n = len(labels)
    zero = clip_rows.new_zeros(())
    return {"clip_loss": torch.where(~q_risky, clip_rows, zero).sum() / n,
            "unimodal_loss": torch.where(q_risky, uni_rows, zero).sum() / n}


class FeatureBank:
    """FIFO bank of past (gathered) embeddings, for nearest-neighbour positives (NNCLR) or caption pools.

    Every rank enqueues the same gathered rows, so every rank holds the same bank. It lives on the run's
    device (``device``: the model's), so a lookup and an enqueue never leave it; only
    :meth:`state_dict` copies it to the host. Rows that are not finite (an fp16 overflow in a step the
    GradScaler then skips) are not enqueued: their slot keeps its previous entry, and :attr:`rejected`
    counts them on the device (read it at the end of an epoch, not per step).
    """

    def __init__(self, size: int, dim: int, seed: int, device: torch.device | str | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)  # drawn on the host: the same bank on any device
        self.features = F.normalize(torch.randn(size, dim, generator=generator), dim=-1).to(device or "cpu")
        self.pointer = 0
        self.rejected = torch.zeros((), dtype=torch.int64, device=self.features.device)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Each query's cosine nearest neighbour in the bank (detached)."""
        bank = self.features.to(device=queries.device, dtype=queries.dtype)  # (same device: a dtype cast at most)
        index = (F.normalize(queries.detach(), dim=-1) @ bank.T).argmax(dim=1)
        return bank[index]

    def enqueue(self, features: torch.Tensor) -> None:
        """Write ``features`` at the pointer (wrapping around). No host sync: the row count is known on the
        host and non-finite rows are masked on the device."""
        features = features.detach().float().to(self.features.device)
        size = len(self.features)
        if len(features) >= size:
            features = features[-size:]
            self.features = self._finite(features, self.features).clone()
            self.pointer = 0
            return
        end = self.pointer + len(features)
        if end <= size:
            self.features[self.pointer:end] = self._finite(features, self.features[self.pointer:end])
        else:
            split = size - self.pointer
            self.features[self.pointer:] = self._finite(features[:split], self.features[self.pointer:])
            self.features[:end - size] = self._finite(features[split:], self.features[:end - size])
        self.pointer = end % size

    def _finite(self, rows: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``rows`` with every non-finite row replaced by the entry it would overwrite (counted)."""
        bad = ~torch.isfinite(rows).all(dim=1)
        self.rejected += bad.sum()
        return torch.where(bad.unsqueeze(1), previous, rows)

    def state_dict(self) -> dict:
        return {"features": self.features.detach().cpu().clone(), "pointer": self.pointer}

    @staticmethod
    def from_state(state: dict, device: torch.device | str | None = None) -> FeatureBank:
        features = state["features"]
        bank = FeatureBank(len(features), features.shape[1], seed=0, device=device)
        bank.features = features.clone().float().to(bank.device)
        bank.pointer = int(state["pointer"])
        return bank

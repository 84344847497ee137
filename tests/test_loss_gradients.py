"""On 2 gloo ranks every defense's gathered loss sends each rank's rows a single process's gradient.

The reference is the one :mod:`safe_train.losses` documents. For rank r let ``L_r`` be the loss as rank r
computes it on the concatenated batch: the whole global-batch loss, or with ``--local-loss`` the mean CE
of rank r's rows as queries against the keys of all ranks. On rank r, the gradient w.r.t. its own input
rows must equal, in one process on the concatenated leaf tensors,

- ``dL_r / d(rows of r)`` without ``--gather-with-grad``;
- ``d(Σ_r' L_r') / d(rows of r)`` with ``--gather-with-grad`` (the gather's backward sums the ranks).

The logit scale is never gathered, so its gradient on rank r is ``dL_r / ds`` in every case.

The single-process references are written here with plain torch ops (``s · Q[rows] · Kᵀ`` and a
cross-entropy with offset labels), independently of :mod:`safe_train.losses`. Two ranks are spawned once
per module (importing the defenses dominates the cost) and run every term under all four
(``--local-loss``, ``--gather-with-grad``) combinations; each test checks one term.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from safe_train.defenses.cleanclip import cleanclip_losses
from safe_train.defenses.safeclip import multimodal_loss, unimodal_loss
from safe_train.losses import GatherSpec, clip_loss, split_batch_loss

WORLD = 2
ROWS = 3  # rows per rank
DIM = 6
SCALE = 7.3  # an exp'd logit scale far from 1
CLIP_WEIGHT, SS_WEIGHT = 0.7, 1.9  # CleanCLIP's λ1, λ2
COMBOS = ((False, False), (False, True), (True, False), (True, True))  # (local_loss, gather_with_grad)

# The features each term reads, in the order its loss function takes them.
TERM_INPUTS = {
    "safeclip_unimodal": ("image1", "image2", "text1", "text2"),
    "safeclip_multimodal": ("image1", "image2", "text1", "text2"),
    "safeclip_clip": ("image1", "text2"),
    "cleanclip": ("image", "text", "image_aug", "text_aug"),
    "safeclip_split": ("image", "text", "image_view", "text_view"),
}
# SafeCLIP's in-loop batches: which global rows are risky (each rank holds both kinds)
RISKY = torch.tensor([False, True, False, True, False, False])


def _combo_key(local_loss: bool, gather_with_grad: bool) -> str:
    return f"local_loss={local_loss},gather_with_grad={gather_with_grad}"


def _rank_rows(rank: int) -> slice:
    return slice(rank * ROWS, (rank + 1) * ROWS)


def _global_batch(term: str) -> dict[str, torch.Tensor]:
    """The concatenated batch: unit-norm random rows, the same in every process."""
    return {name: F.normalize(torch.randn(WORLD * ROWS, DIM, generator=torch.Generator().manual_seed(100 + i)),
                              dim=-1)
            for i, name in enumerate(TERM_INPUTS[term])}


# ---- what a rank computes, with the project's code ---------------------------------------------------
def _project_losses(term: str, x: dict[str, torch.Tensor], scale: torch.Tensor,
                    gather: GatherSpec) -> dict[str, torch.Tensor]:
    if term == "safeclip_unimodal":
        return {"unimodal_loss": unimodal_loss(x["image1"], x["image2"], x["text1"], x["text2"], scale, gather)}
    if term == "safeclip_multimodal":
        return {"multimodal_loss": multimodal_loss(x["image1"], x["image2"], x["text1"], x["text2"], scale, gather)}
    if term == "safeclip_clip":
        return {"clip_loss": clip_loss(x["image1"], x["text2"], scale, gather)}
    if term == "safeclip_split":
        risky = RISKY[_rank_rows(gather.rank)]
        return split_batch_loss(x["image"], x["text"], x["image_view"], x["text_view"], risky, scale, gather)
    return cleanclip_losses(x["image"], x["text"], x["image_aug"], x["text_aug"], scale, CLIP_WEIGHT, SS_WEIGHT,
                            gather=gather)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    all_gather = dist.all_gather  # counted: torch.distributed.nn's gather-with-grad calls it too
    gathers = [0]

    def counted_all_gather(*args, **kwargs):
        gathers[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counted_all_gather
    try:
        results = {}
        for term in TERM_INPUTS:
            batch = _global_batch(term)
            for local_loss, gather_with_grad in COMBOS:
                x = {name: rows[_rank_rows(rank)].clone().requires_grad_(True) for name, rows in batch.items()}
                scale = torch.tensor(SCALE, requires_grad=True)
                gather = GatherSpec(rank=rank, world_size=WORLD, local_loss=local_loss,
                                    gather_with_grad=gather_with_grad)
                gathers[0] = 0
                losses = _project_losses(term, x, scale, gather)
                forward_gathers = gathers[0]
                sum(losses.values()).backward()
                results[f"{term}:{_combo_key(local_loss, gather_with_grad)}"] = {
                    "gathers": forward_gathers,
                    "losses": {name: loss.detach() for name, loss in losses.items()},
                    "grads": {name: t.grad for name, t in x.items()},  # None: a rank's rows got no gradient
                    "scale_grad": scale.grad,
                }
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.all_gather = all_gather
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every rank's losses and gradients for every term and flag combination (one spawn: imports are slow)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    torch.multiprocessing.spawn(_worker, args=(str(tmp / "init"), str(tmp / "out")), nprocs=WORLD)
    return [torch.load(tmp / f"out.{rank}", weights_only=True) for rank in range(WORLD)]


# ---- the single-process reference, in plain torch ----------------------------------------------------
def _ce(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, rows: slice) -> torch.Tensor:
    """Mean CE of ``queries[rows]`` against all ``keys``; query i's positive is key i."""
    logits = scale * queries[rows] @ keys.T
    return F.cross_entropy(logits, torch.arange(rows.start, rows.stop))


def _reference_losses(term: str, x: dict[str, torch.Tensor], scale: torch.Tensor,
                      rows: slice) -> dict[str, torch.Tensor]:
    def ce(queries: str, keys: str) -> torch.Tensor:
        return _ce(x[queries], x[keys], scale, rows)

    def clip(image: str, text: str) -> torch.Tensor:
        return (ce(image, text) + ce(text, image)) / 2

    if term == "safeclip_unimodal":  # image1/text1 are only ever keys
        return {"unimodal_loss": (ce("image2", "image1") + ce("text2", "text1")) / 2}
    if term == "safeclip_multimodal":
        return {"multimodal_loss": (clip("image1", "text2") + clip("image2", "text1")) / 2}
    if term == "safeclip_clip":
        return {"clip_loss": clip("image1", "text2")}
    if term == "safeclip_split":  # per row, each term summed over its query rows, divided by all query rows
        clip_total, uni_total = torch.zeros(()), torch.zeros(())
        keep = (~RISKY).nonzero().squeeze(1)  # the CLIP term's columns: the safe rows
        for i in range(rows.start, rows.stop):
            if RISKY[i]:  # the view against every row's raw embedding
                uni_total = uni_total + (_ce(x["image_view"], x["image"], scale, slice(i, i + 1))
                                         + _ce(x["text_view"], x["text"], scale, slice(i, i + 1))) / 2
            else:
                at = torch.tensor([int((keep == i).nonzero())])
                clip_total = clip_total + (
                    F.cross_entropy(scale * x["image"][i:i + 1] @ x["text"][keep].T, at)
                    + F.cross_entropy(scale * x["text"][i:i + 1] @ x["image"][keep].T, at)) / 2
        n = rows.stop - rows.start
        return {"clip_loss": clip_total / n, "unimodal_loss": uni_total / n}
    return {"clip_loss": CLIP_WEIGHT * clip("image", "text"),  # image_aug/text_aug are only ever keys
            "ss_loss": SS_WEIGHT * (ce("image", "image_aug") + ce("text", "text_aug")) / 2}


def _reference(term: str, rank: int, local_loss: bool, gather_with_grad: bool) -> dict:
    x = {name: rows.clone().requires_grad_(True) for name, rows in _global_batch(term).items()}
    scale = torch.tensor(SCALE, requires_grad=True)

    def loss_of(r: int) -> dict[str, torch.Tensor]:  # L_r
        return _reference_losses(term, x, scale, _rank_rows(r) if local_loss else slice(0, WORLD * ROWS))

    own = loss_of(rank)
    (scale_grad,) = torch.autograd.grad(sum(own.values()), scale, retain_graph=True)
    target = sum(sum(loss_of(r).values()) for r in range(WORLD)) if gather_with_grad else sum(own.values())
    grads = torch.autograd.grad(target, list(x.values()))
    return {"losses": {name: loss.detach() for name, loss in own.items()},
            "grads": {name: grad[_rank_rows(rank)] for name, grad in zip(x, grads, strict=True)},
            "scale_grad": scale_grad}


def _assert_two_ranks_match_single_process(term: str, two_ranks: list[dict]) -> None:
    for rank in range(WORLD):
        for local_loss, gather_with_grad in COMBOS:
            where = f"{term}, rank {rank}, {_combo_key(local_loss, gather_with_grad)}"
            mine = two_ranks[rank][f"{term}:{_combo_key(local_loss, gather_with_grad)}"]
            want = _reference(term, rank, local_loss, gather_with_grad)
            assert list(mine["losses"]) == list(want["losses"]), where
            for name, loss in want["losses"].items():
                torch.testing.assert_close(mine["losses"][name], loss, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, w=where: f"{w}: loss {n}: {m}")
            for name, grad in want["grads"].items():
                assert grad.abs().max() > 1e-3, f"{where}: the reference gradient of {name} is vacuous"
                assert mine["grads"][name] is not None, f"{where}: {name} got no gradient"
                torch.testing.assert_close(mine["grads"][name], grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, w=where: f"{w}: gradient of {n}: {m}")
            torch.testing.assert_close(mine["scale_grad"], want["scale_grad"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, w=where: f"{w}: gradient of the logit scale: {m}")


def test_safeclip_unimodal_gradients_reach_key_only_views_as_in_one_process(two_ranks):
    # image1/text1 are keys only: with OpenCLIP's gather_features and --local-loss they would get none
    _assert_two_ranks_match_single_process("safeclip_unimodal", two_ranks)


def test_safeclip_multimodal_gradients_on_two_ranks_equal_one_process(two_ranks):
    _assert_two_ranks_match_single_process("safeclip_multimodal", two_ranks)


def test_safeclip_clip_term_gradients_on_two_ranks_equal_one_process(two_ranks):
    _assert_two_ranks_match_single_process("safeclip_clip", two_ranks)


def test_cleanclip_clip_and_ss_gradients_reach_augmented_views_as_in_one_process(two_ranks):
    # image_aug/text_aug are keys only in L_SS
    _assert_two_ranks_match_single_process("cleanclip", two_ranks)


def test_safeclip_inloop_split_batch_gradients_on_two_ranks_equal_one_process(two_ranks):
    # safe rows: CLIP among the safe rows; risky rows: their views against every raw row; views are keys nowhere
    _assert_two_ranks_match_single_process("safeclip_split", two_ranks)


def test_every_term_gathers_its_features_in_one_collective(two_ranks):
    """A step's loss launches one all-gather whatever it reads (OpenCLIP's ClipLoss launches two, one per
    modality): on NCCL each is a launch and a wait across all GPUs."""
    for rank in range(WORLD):
        for key, result in two_ranks[rank].items():
            assert result["gathers"] == 1, f"rank {rank}, {key}: {result['gathers']} all-gathers"

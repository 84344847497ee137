"""SafeCLIP's in-loop mode (issue 17): one mixed safe/risky pass per epoch, every sample's raw-pair similarity
measured in its own training forward and standardised within windows of steps; real runs with resume."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_flags
from helpers import (
    KillAtEpoch,
    Killed,
    assert_repeatable_without_touching_global_rngs,
    hand_ce,
    load_table,
    run_safe_train,
    unit_rows,
    with_callbacks,
)

from safe_train.args import build_parser
from safe_train.defenses.safeclip import SafeClip, standardize_by_window
from safe_train.errors import ConfigError
from safe_train.interface import Callback, TrainContext
from safe_train.losses import clip_loss, split_batch_loss
from safe_train.state import SampleTable

INLOOP = ["--defense", "safeclip", "--safeclip-unimodal-warmup-epochs", "1", "--safeclip-multimodal-warmup-epochs",
          "1", "--safeclip-multimodal-lr", "1e-4", "--safeclip-similarity", "inloop", "--safeclip-safe-input", "raw",
          "--safeclip-window-samples", "32", "--safeclip-threshold", "0.3", "--safeclip-ratio-step", "0.2"]


def _defense(*flags: str) -> SafeClip:
    ours, _ = build_parser().parse_known_args(["--defense", "safeclip", *flags])
    return SafeClip.from_args(ours)


def test_windows_are_standardised_like_a_brute_force():
    rng = np.random.default_rng(0)
    windows = np.repeat(np.arange(5), [40, 40, 40, 40, 3])  # the last window is short: it joins window 3
    drift = windows.astype(np.float64) * 0.5  # the model's drift: each window's level moves
    values = (rng.normal(size=len(windows)) * (1 + windows) + drift).astype(np.float32)
    values[7] = np.nan  # never measured
    windows_with_gap = windows.copy()
    windows_with_gap[9] = -1  # no window: not standardised
    z = standardize_by_window(values, windows_with_gap, min_count=10)
    assert np.isnan(z[7]) and np.isnan(z[9])
    groups = np.where(windows == 4, 3, windows)
    for g in range(4):
        members = (groups == g) & np.isfinite(values) & (windows_with_gap >= 0)
        v = values[members].astype(np.float64)
        np.testing.assert_allclose(z[members], (v - v.mean()) / v.std(), rtol=1e-5, atol=1e-6)
    # a constant window does not divide by zero; an all-invalid input comes back all NaN
    assert np.allclose(standardize_by_window(np.ones(4, np.float32), np.zeros(4, np.int32)), 0)
    assert np.isnan(standardize_by_window(np.full(3, np.nan), np.zeros(3))).all()


def test_split_batch_loss_is_clip_among_safe_rows_plus_unimodal_on_risky_rows():
    image, text, image_view, text_view = (unit_rows(6, 5, seed=s) for s in range(4))
    scale = torch.tensor(9.0)
    # no risky row: OpenCLIP's CLIP loss, and no unimodal term
    none_risky = split_batch_loss(image, text, image_view, text_view, torch.zeros(6, dtype=torch.bool), scale)
    torch.testing.assert_close(none_risky["clip_loss"], clip_loss(image, text, scale))
    assert float(none_risky["unimodal_loss"]) == 0.0
    # every row risky: the views against the raw rows, nothing of the CLIP loss
    all_risky = split_batch_loss(image, text, image_view, text_view, torch.ones(6, dtype=torch.bool), scale)
    expected = (hand_ce(image_view, image, 9.0) + hand_ce(text_view, text, 9.0)) / 2
    assert float(all_risky["unimodal_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(all_risky["clip_loss"]) == 0.0
    # mixed: rows 1 and 4 risky; a safe row's CLIP columns are the safe rows only
    risky = torch.tensor([False, True, False, False, True, False])
    mixed = split_batch_loss(image, text, image_view, text_view, risky, scale)
    safe = (~risky).nonzero().squeeze(1)
    clip_rows = (F.cross_entropy(scale * image[safe] @ text[safe].T, torch.arange(4), reduction="none")
                 + F.cross_entropy(scale * text[safe] @ image[safe].T, torch.arange(4), reduction="none")) / 2
    torch.testing.assert_close(mixed["clip_loss"], clip_rows.sum() / 6)
    rows = risky.nonzero().squeeze(1)
    uni_rows = (F.cross_entropy(scale * image_view[rows] @ image.T, rows, reduction="none")
                + F.cross_entropy(scale * text_view[rows] @ text.T, rows, reduction="none")) / 2
    torch.testing.assert_close(mixed["unimodal_loss"], uni_rows.sum() / 6)


def test_inloop_needs_the_raw_pairs():
    with pytest.raises(ConfigError, match="needs --safeclip-safe-input raw"):
        _defense("--safeclip-similarity", "inloop")
    with pytest.raises(ConfigError, match="window-samples"):
        _defense("--safeclip-similarity", "inloop", "--safeclip-safe-input", "raw", "--safeclip-window-samples", "0")


def test_split_epochs_plan_one_mixed_pass_over_every_sample():
    defense = _defense(*INLOOP[2:])
    args = argparse.Namespace(epochs=6, seed=0, rank=0, world_size=1, batch_size=16)
    ctx = TrainContext(args=args, table=SampleTable())
    ctx.table.register(np.arange(100, 164))
    ctx.table.add_column("safe", bool, False)
    ctx.table["safe"][:32] = True
    defense.ratio = 0.5
    assert [p.mode for p in defense.plan_epoch(ctx, 0)] == ["unimodal"]
    warmup = defense.plan_epoch(ctx, 1)  # measures the first split: every sample, partial batch kept
    assert [p.mode for p in warmup] == ["multimodal"] and warmup[0].selection.exclude
    assert len(warmup[0].selection.ids) == 0
    (split,) = defense.plan_epoch(ctx, 2)
    assert split.mode == "mixed" and split.train and split.selection.exclude and len(split.selection.ids) == 0


@pytest.mark.usefixtures("wordnet")
def test_the_mixed_pass_makes_views_only_for_risky_samples():
    import open_clip
    from PIL import Image

    from safe_train.defenses.safeclip import MIXED_OUTPUTS, SafeClipTransform
    from safe_train.model_configs import register_model_configs

    register_model_configs()
    _, _, preprocess = open_clip.create_model_and_transforms("st-tiny-vit")
    tokenizer = open_clip.get_tokenizer("st-tiny-vit")
    full = SafeClipTransform(preprocess, tokenizer, 32, eda_alpha=0.3, seed=0, crop_min_scale=0.5)
    mixed = full.restricted(MIXED_OUTPUTS, view_ids=np.array([3, 11, 40]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    caption = "a photo of the number seven written by hand on white paper."
    risky, safe = mixed(image, caption, 11), mixed(image, caption, 12)
    assert set(risky) == set(safe) == {*MIXED_OUTPUTS, "has_view"}
    assert bool(risky["has_view"]) and not bool(safe["has_view"])
    assert risky["image_view2"].abs().sum() > 0 and not torch.equal(risky["text_view2"], risky["raw_text"])
    assert safe["image_view2"].abs().sum() == 0 and safe["text_view2"].abs().sum() == 0  # placeholders
    assert torch.equal(risky["raw_image"], safe["raw_image"]) and torch.equal(risky["raw_text"], safe["raw_text"])



def _mixed_batch(model_name: str = "st-tiny-vit", n: int = 6, risky: tuple[int, ...] = (1, 4)):
    import open_clip

    from safe_train.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    tokenizer = open_clip.get_tokenizer(model_name)
    gen = torch.Generator().manual_seed(1)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    batch = {
        "raw_image": torch.rand(n, 3, 32, 32, generator=gen), "image_view2": torch.rand(n, 3, 32, 32, generator=gen),
        "raw_text": tokenizer([f"a photo of a {w}." for w in words[:n]]),
        "text_view2": tokenizer([f"photo a {w} of a." for w in words[:n]]),
        "has_view": torch.tensor([i in risky for i in range(n)]),
    }
    return model, batch


def _mixed_grads(defense: SafeClip, model, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from safe_train.interface import TrainPass

    model.zero_grad()
    pass_ = TrainPass(name="split", mode="mixed")
    ctx = TrainContext(args=argparse.Namespace(), table=SampleTable())
    features = defense.forward(ctx, model, batch, pass_)
    losses = defense.compute_loss(ctx, features, pass_, None)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def test_risky_views_as_targets_train_only_through_the_raw_pairs():
    """``--safeclip-risky-views target``: the same loss values as ``train`` (the views are forwarded in a separate
    call), and the gradient of that loss with the view embeddings detached; ``train`` also trains through the
    views, so its gradient differs. A batch without risky rows still makes its (discarded) second call."""
    model, batch = _mixed_batch()
    base = [*INLOOP[2:]]
    trained = _defense(*base)
    as_target = _defense(*base, "--safeclip-risky-views", "target")
    losses_train, grads_train = _mixed_grads(trained, model, batch)
    losses_target, grads_target = _mixed_grads(as_target, model, batch)
    assert losses_target == pytest.approx(losses_train, rel=1e-5)
    assert losses_target["unimodal_loss"] > 0 and losses_target["clip_loss"] > 0

    # by hand: the raw pairs with autograd, the views' embeddings detached, the same split loss
    model.zero_grad()
    out = model(batch["raw_image"], batch["raw_text"])
    views = model(batch["image_view2"], batch["text_view2"])
    risky = batch["has_view"]
    mask = risky.unsqueeze(1).to(out["image_features"].dtype)
    expected = split_batch_loss(out["image_features"], out["text_features"],
                                views["image_features"].detach() * mask, views["text_features"].detach() * mask,
                                risky, out["logit_scale"])
    sum(expected.values()).backward()
    assert set(grads_target) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads_target[name], param.grad, rtol=1e-4, atol=1e-6)
    visual = [n for n in grads_train if n.startswith("visual.")]
    assert any(not torch.allclose(grads_train[n], grads_target[n], rtol=1e-3, atol=1e-7) for n in visual)

    model, batch = _mixed_batch(risky=())
    losses, grads = _mixed_grads(as_target, model, batch)
    assert losses["unimodal_loss"] == 0.0 and losses["clip_loss"] > 0 and grads
    with pytest.raises(ConfigError, match="in-loop pass only"):
        _defense("--safeclip-risky-views", "target")

class _Steps(Callback):
    name = "test_inloop_steps"

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def on_step_end(self, ctx, step) -> None:
        self.sink.append((ctx.epoch, step.pass_.name, len(step.sample_ids),
                          {k: round(v, 6) for k, v in step.losses.items()}))


def _splits(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "safeclip" / "splits.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("wordnet")
def test_inloop_training_measures_every_sample_each_epoch_and_resumes(csv_64, tmp_path, monkeypatch):
    """64 samples, batch 12: every split epoch is one mixed pass of 6 steps (its partial last batch kept), both
    loss terms, and every sample's similarity measured in a window of 3 steps (32 samples); killed after the
    first split and resumed, the run repeats the same steps, losses and splits."""
    straight: list = []
    with_callbacks(monkeypatch, _Steps(straight))
    assert run_safe_train(train_flags(csv_64, tmp_path, "straight", epochs=4, batch_size=12, extra=INLOOP)) == 0
    for epoch in (1, 2, 3):
        steps = [s for s in straight if s[0] == epoch]
        assert [s[2] for s in steps] == [12] * 5 + [4]  # every sample, the partial batch included
        assert {s[1] for s in steps} == ({"multimodal"} if epoch == 1 else {"split"})
    split_terms = [set(s[3]) for s in straight if s[1] == "split"]
    assert all(terms == {"clip_loss", "unimodal_loss", "loss"} for terms in split_terms)
    assert any(s[3]["clip_loss"] > 0 for s in straight if s[1] == "split")
    assert any(s[3]["unimodal_loss"] > 0 for s in straight if s[1] == "split")

    splits = _splits(tmp_path / "straight")
    assert [s["epoch"] for s in splits] == [2, 3] and all(s["num_samples"] == 64 for s in splits)
    assert all(s["similarity_mode"] == "inloop" for s in splits)
    table = load_table(tmp_path / "straight", 4)
    assert table["safe"].sum() == splits[-1]["num_safe"]
    # the last epoch measures nothing (no split follows it): the table holds epoch 2's measurements
    assert np.isfinite(table["similarity"]).all()
    np.testing.assert_array_equal(np.bincount(table["similarity_window"]), [36, 28])  # steps 0-2, 3-5

    killed: list = []
    with_callbacks(monkeypatch, _Steps(killed), KillAtEpoch(3))
    with pytest.raises(Killed):
        run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=4, batch_size=12, extra=INLOOP))
    with_callbacks(monkeypatch, _Steps(killed))
    assert run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=4, batch_size=12,
                                      extra=INLOOP + ["--resume", "latest"])) == 0
    assert [s[:3] for s in killed] == [s[:3] for s in straight]
    for a, b in zip(killed, straight, strict=True):
        assert a[3]["loss"] == pytest.approx(b[3]["loss"], rel=1e-4, abs=1e-5)
    assert [s["num_safe"] for s in _splits(tmp_path / "killed")][-1] == splits[-1]["num_safe"]
    resumed = load_table(tmp_path / "killed", 4)
    np.testing.assert_array_equal(resumed["safe"], table["safe"])
    np.testing.assert_allclose(resumed["similarity"], table["similarity"], rtol=1e-4, atol=1e-5)


# ---- seeded views ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("wordnet")
def test_safeclip_views_are_a_function_of_seed_epoch_sample_and_view():
    """SimCLR views (and the raw image's training crop) are seeded per (seed, epoch, sample id, view), as
    CleanCLIP's: the same tensors whatever the process drew before or which worker makes them, and the
    process's own RNG streams are left where they were."""
    import pickle

    import open_clip
    from PIL import Image

    from safe_train.defenses.safeclip import SafeClipTransform
    from safe_train.model_configs import register_model_configs

    register_model_configs()
    _, preprocess_train, preprocess = open_clip.create_model_and_transforms("st-tiny-vit")
    tokenizer = open_clip.get_tokenizer("st-tiny-vit")

    def make(seed: int) -> SafeClipTransform:
        full = SafeClipTransform(preprocess, tokenizer, 32, eda_alpha=0.3, seed=seed, crop_min_scale=0.5,
                                 raw_preprocess=preprocess_train)
        return full.restricted((*SafeClipTransform.OUTPUTS, *SafeClipTransform.RAW_OUTPUTS))

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for i in range(4)]
    caption = "a photo of the number seven written by hand on white paper"

    def views(t: SafeClipTransform, epoch: int) -> list[dict[str, torch.Tensor]]:
        t.set_epoch(epoch)
        return [t(image, caption, 100 + i) for i, image in enumerate(images)]

    transform = make(0)
    first = assert_repeatable_without_touching_global_rngs(lambda: views(transform, 1))
    copied = pickle.loads(pickle.dumps(transform))  # what a spawned data-loader worker holds
    assert all(torch.equal(a[key], b[key]) for a, b in zip(first, views(copied, 1), strict=True) for key in a)
    later = views(transform, 2)  # a fresh draw every epoch; the EDA captions stay fixed for the run
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, later, strict=True))
    assert all(torch.equal(a["text_view2"], b["text_view2"]) for a, b in zip(first, later, strict=True))
    assert all(not torch.equal(a["image"], a["image_view2"]) for a in first)  # two different draws
    other = views(make(1), 1)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))


@pytest.mark.slow
@pytest.mark.usefixtures("wordnet")
def test_inloop_runs_are_bit_identical_with_any_worker_count(csv_64, tmp_path, monkeypatch):
    runs = {}
    for name, workers in (("w0", 0), ("w2", 2)):
        steps: list = []
        with_callbacks(monkeypatch, _Steps(steps))
        assert run_safe_train(train_flags(csv_64, tmp_path, name, epochs=3, batch_size=12, workers=workers,
                                          extra=INLOOP)) == 0
        runs[name] = steps, load_table(tmp_path / name, 3)
    (steps0, table0), (steps2, table2) = runs["w0"], runs["w2"]
    assert steps0 == steps2  # exactly
    np.testing.assert_array_equal(table0["similarity"], table2["similarity"])
    np.testing.assert_array_equal(table0["safe"], table2["safe"])


def test_step_cost_benchmark_prints_the_three_ratios(capsys):
    """benchmarks/safeclip_step_cost.py runs end to end on a tiny batch and prints each kind's ratio to none."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import safeclip_step_cost

    assert safeclip_step_cost.main(["--batch", "16", "--risky-share", "0.25", "--repeats", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 risky rows" in out
    for kind in ("none", "inloop-train", "inloop-target"):
        assert f"  {kind}" in out
    assert "ratio to none 1.000" in out

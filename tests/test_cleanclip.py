"""``--defense cleanclip``: loss terms against hand computations, 2-rank gathering, real finetuning runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_flags
from helpers import (
    KillAtEpoch,
    Killed,
    assert_repeatable_without_touching_global_rngs,
    hand_ce,
    load_state_dict,
    run_safe_train,
    unit_rows,
    with_callbacks,
)

from safe_train.defenses.cleanclip import CleanClip, cleanclip_losses
from safe_train.errors import ConfigError
from safe_train.interface import Callback

pytestmark = pytest.mark.usefixtures("wordnet")  # EDA needs WordNet (installed offline if missing)


# ---- the loss ----------------------------------------------------------------------------------------
def test_loss_terms_equal_hand_computation():
    image, text, image_aug, text_aug = (unit_rows(5, 4, s) for s in range(4))
    s = 7.5
    out = cleanclip_losses(image, text, image_aug, text_aug, torch.tensor(s))
    clip = (hand_ce(image, text, s) + hand_ce(text, image, s)) / 2  # both directions
    ss = (hand_ce(image, image_aug, s) + hand_ce(text, text_aug, s)) / 2  # originals as queries only
    assert float(out["clip_loss"]) == pytest.approx(clip, rel=1e-5)
    assert float(out["ss_loss"]) == pytest.approx(ss, rel=1e-5)
    symmetric = (hand_ce(image, image_aug, s) + hand_ce(image_aug, image, s)) / 2
    assert float(out["ss_loss"]) != pytest.approx((symmetric + hand_ce(text, text_aug, s)) / 2, rel=1e-4)
    weighted = cleanclip_losses(image, text, image_aug, text_aug, torch.tensor(s), clip_weight=0.5, ss_weight=8)
    assert float(weighted["clip_loss"]) == pytest.approx(0.5 * clip, rel=1e-5)
    assert float(weighted["ss_loss"]) == pytest.approx(8 * ss, rel=1e-5)


def test_clip_term_is_open_clips_cliploss_and_ss_zero_without_views():
    from open_clip.loss import ClipLoss

    image, text = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    reference = ClipLoss()(image, text, torch.tensor(20.0))
    out = cleanclip_losses(image, text, None, None, torch.tensor(20.0), ss_weight=0.0)
    torch.testing.assert_close(out["clip_loss"], reference)
    assert float(out["ss_loss"]) == 0.0


# ---- real training runs --------------------------------------------------------------------------------
class _Recorder(Callback):
    name = "test_loss_recorder"

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def on_step_end(self, ctx, step) -> None:
        self.sink.append((step.losses["clip_loss"], step.losses["ss_loss"]))


@pytest.fixture(scope="module")
def poisoned_checkpoint(csv_64, tmp_path_factory):
    """A model trained 1 epoch with --defense none: what CleanCLIP finetunes."""
    logs = tmp_path_factory.mktemp("pretrain")
    assert run_safe_train(train_flags(csv_64, logs, "base", epochs=1)) == 0
    return logs / "base" / "checkpoints" / "epoch_1.pt"




def test_finetune_from_checkpoint_logs_both_terms(csv_64, poisoned_checkpoint, tmp_path, monkeypatch):
    steps: list = []
    with_callbacks(monkeypatch, _Recorder(steps))
    flags = train_flags(csv_64, tmp_path, "ft", epochs=1,
                        extra=["--defense", "cleanclip", "--pretrained", str(poisoned_checkpoint), "--lr", "1e-4"])
    assert run_safe_train(flags) == 0
    assert len(steps) == 8 and all(c > 0 and s > 0 and math.isfinite(c + s) for c, s in steps)
    log = (tmp_path / "ft" / "out.log").read_text()
    assert "Clip_loss:" in log and "Ss_loss:" in log
    assert f"Loading full pretrained weights from: {poisoned_checkpoint}" in log
    # started from the checkpoint: close to it after a few small steps, far from a random init
    start, end = load_state_dict(poisoned_checkpoint.parents[1], 1), load_state_dict(tmp_path / "ft", 1)
    moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 0.05


@pytest.mark.parametrize("flag", ["--pretrained", "--resume"])
def test_checkpoint_with_pickled_objects_is_refused_in_one_line(flag, csv_64, poisoned_checkpoint, tmp_path, capsys):
    ckpt = torch.load(poisoned_checkpoint, map_location="cpu", weights_only=True)
    ckpt["payload"] = _Recorder([])  # an arbitrary object: weights_only loading must refuse it
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    flags = train_flags(csv_64, tmp_path, "evil", epochs=1, extra=["--defense", "cleanclip", flag, str(evil)])
    assert run_safe_train(flags) == 2  # one line on stderr, exit 2, no traceback
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safe-train: error:")]
    assert len(errors) == 1 and "weights_only=True" in errors[0] and "_Recorder" in errors[0], errors


def test_ss_weight_zero_is_plain_clip_finetuning(csv_64, tmp_path):
    assert run_safe_train(train_flags(csv_64, tmp_path, "none", epochs=1)) == 0
    assert run_safe_train(train_flags(csv_64, tmp_path, "cc0", epochs=1,
                                      extra=["--defense", "cleanclip", "--cleanclip-ss-weight", "0"])) == 0
    plain, cc0 = load_state_dict(tmp_path / "none", 1), load_state_dict(tmp_path / "cc0", 1)
    for key in plain:
        torch.testing.assert_close(cc0[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)


def test_accum_freq_gives_the_same_training_as_one_big_batch(csv_64, tmp_path):
    base = ["--defense", "cleanclip", "--cleanclip-ss-weight", "2"]
    assert run_safe_train(train_flags(csv_64, tmp_path, "big", epochs=1, batch_size=8, extra=base)) == 0
    assert run_safe_train(train_flags(csv_64, tmp_path, "acc", epochs=1, batch_size=4,
                                      extra=base + ["--accum-freq", "2"])) == 0
    big, acc = load_state_dict(tmp_path / "big", 1), load_state_dict(tmp_path / "acc", 1)
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-4, atol=1e-4, msg=key)  # Adam amplifies fp noise


def test_webdataset_amp_accum_run(wds_4x16, tmp_path, monkeypatch):
    steps: list = []
    with_callbacks(monkeypatch, _Recorder(steps))
    flags = train_flags(wds_4x16, tmp_path, "wds", epochs=1, dataset_type="webdataset",
                        extra=["--defense", "cleanclip", "--precision", "amp", "--accum-freq", "2"])
    assert run_safe_train(flags) == 0
    assert len(steps) == 4 and all(math.isfinite(c) and math.isfinite(s) and s > 0 for c, s in steps)


def test_kill_and_resume_continues_as_if_uninterrupted(csv_64, poisoned_checkpoint, tmp_path, monkeypatch):
    extra = ["--defense", "cleanclip", "--pretrained", str(poisoned_checkpoint)]
    straight: list = []
    with_callbacks(monkeypatch, _Recorder(straight))
    assert run_safe_train(train_flags(csv_64, tmp_path, "straight", epochs=3, extra=extra)) == 0

    before: list = []
    with_callbacks(monkeypatch, _Recorder(before), KillAtEpoch(2))
    with pytest.raises(Killed):
        run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=3, extra=extra))
    after: list = []
    with_callbacks(monkeypatch, _Recorder(after))
    assert run_safe_train(train_flags(csv_64, tmp_path, "killed", epochs=3, extra=extra + ["--resume", "latest"])) == 0

    assert len(straight) == 24 and len(before) == 16 and len(after) == 8
    torch.testing.assert_close(torch.tensor(before + after), torch.tensor(straight), rtol=1e-5, atol=1e-6)
    wa, wb = load_state_dict(tmp_path / "straight", 3), load_state_dict(tmp_path / "killed", 3)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- bit-reproducible views -------------------------------------------------------------------------------
def _transform(seed: int = 0):
    import open_clip

    from safe_train.augment import EdaAugmenter
    from safe_train.defenses.cleanclip import CleanClipTransform
    from safe_train.model_configs import register_model_configs

    register_model_configs()
    _, preprocess_train, _ = open_clip.create_model_and_transforms("st-tiny-vit")
    return CleanClipTransform(preprocess_train, open_clip.get_tokenizer("st-tiny-vit"), EdaAugmenter(), seed=seed)


def test_views_are_a_function_of_seed_epoch_sample_and_view():
    """AutoAugment and the crops draw from generators seeded per (seed, epoch, sample id, view): the same tensors
    whatever the process drew before, and the process's own RNG streams are left where they were."""
    import pickle

    import numpy as np
    from PIL import Image

    transform = _transform()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for i in range(4)]
    caption = "a photo of the number seven written by hand on white paper"

    def views(t, epoch: int) -> list[dict[str, torch.Tensor]]:
        t.set_epoch(epoch)
        return [t(image, caption, 100 + i) for i, image in enumerate(images)]

    first = assert_repeatable_without_touching_global_rngs(lambda: views(transform, 1))
    assert all(a.keys() == {"image", "text", "image_aug", "text_aug"} for a in first)
    copied = pickle.loads(pickle.dumps(transform))  # what a spawned data-loader worker holds
    for a, b in zip(first, views(copied, 1), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    later = views(transform, 2)  # a fresh draw every epoch; the EDA caption stays fixed for the run
    assert any(not torch.equal(a["image_aug"], b["image_aug"]) for a, b in zip(first, later, strict=True))
    assert all(torch.equal(a["text_aug"], b["text_aug"]) for a, b in zip(first, later, strict=True))
    other_seed = views(_transform(seed=1), 1)
    assert any(not torch.equal(a["image_aug"], b["image_aug"]) for a, b in zip(first, other_seed, strict=True))
    # the two images of one sample are different draws (view 0 and view 1), and samples differ from each other
    assert transform.image_seed(100, 0) != transform.image_seed(100, 1) != transform.image_seed(101, 1)


def test_runs_are_bit_identical_with_any_worker_count(csv_64, poisoned_checkpoint, tmp_path, monkeypatch):
    """Two identical runs give identical losses and weights, also with data-loader workers and across worker
    counts (measured before the fix: weights 0.012 apart after one epoch between --workers 0 and 2)."""
    runs = {}
    for name, workers in (("w0", 0), ("w2", 2)):  # two runs: identical across worker counts
        steps: list = []
        with_callbacks(monkeypatch, _Recorder(steps))
        flags = train_flags(csv_64, tmp_path, name, epochs=2, workers=workers,
                            extra=["--defense", "cleanclip", "--pretrained", str(poisoned_checkpoint)])
        assert run_safe_train(flags) == 0
        runs[name] = steps, load_state_dict(tmp_path / name, 2)
    reference_steps, reference_weights = runs["w0"]
    assert len(reference_steps) == 16
    for name in ("w2",):
        steps, weights = runs[name]
        assert steps == reference_steps, name  # exactly, not to a tolerance
        for key in reference_weights:
            assert torch.equal(weights[key], reference_weights[key]), f"{name}: {key}"


def test_flags_and_bad_weights():
    from safe_train.args import build_parser

    args, _ = build_parser().parse_known_args(["--defense", "cleanclip", "--cleanclip-ss-weight", "8"])
    defense = CleanClip.from_args(args)
    assert defense.clip_weight == 1.0 and defense.ss_weight == 8.0 and defense.eda is not None
    args, _ = build_parser().parse_known_args(["--defense", "cleanclip", "--cleanclip-ss-weight", "-1"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        CleanClip.from_args(args)

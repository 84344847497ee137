"""``--defense roclip``: the loss against hand computations, the caption pool, 2 gloo ranks against one process,
real training runs (text tower frozen in RoCLIP epochs, finetuning, cross augmentation) and exact resume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import PYTHON, base_env, train_flags, write_csv_dataset
from helpers import hand_ce, load_state_dict, run_safe_train, unit_rows, with_callbacks

from safe_train.defenses.roclip import (
    CaptionPool,
    RoClip,
    RoClipConfig,
    RoClipTransform,
    roclip_loss,
    text_tower_parameters,
)
from safe_train.errors import ConfigError
from safe_train.interface import Callback, TrainPass
from safe_train.losses import GatherSpec

ROCLIP = ["--defense", "roclip", "--roclip-pool-size", "20"]  # 64 pairs, batch 8: the pool wraps within an epoch


def _text_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if not k.removeprefix("module.").startswith("visual.")
            and k.removeprefix("module.") not in ("logit_scale", "logit_bias")]


def _bare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---- the loss and the pool, on tiny tensors ------------------------------------------------------------
def test_loss_equals_hand_computation():
    pool = CaptionPool(4, 3)  # 3 of 4 slots filled: the empty one must never be chosen
    past = unit_rows(3, 3, 1)
    pool.enqueue(past)
    image, text = unit_rows(5, 3, 2).requires_grad_(True), unit_rows(5, 3, 3)
    s = 6.5
    out = roclip_loss(image, text, torch.tensor(s), pool)
    nearest = [max(range(3), key=lambda j, i=i: float(image.detach()[i] @ past[j])) for i in range(5)]
    keys = past[nearest]
    torch.testing.assert_close(out.keys, keys)
    want = (hand_ce(image.detach(), keys, s) + hand_ce(keys, image.detach(), s)) / 2  # s·I·T_nnᵀ and transpose
    assert float(out.loss) == pytest.approx(want, rel=1e-5)
    assert float(out.loss) != pytest.approx((hand_ce(image.detach(), text, s) + hand_ce(text, image.detach(), s)) / 2,
                                            rel=1e-3)  # not the batch's own captions
    out.loss.backward()
    assert image.grad is not None and image.grad.abs().max() > 0
    # an empty slot (a zero row, cosine 0) loses even against entries that all have negative cosines
    negative = CaptionPool(3, 3)
    negative.enqueue(-image.detach()[:1])
    torch.testing.assert_close(negative.nearest(image.detach(), fallback=text), -image.detach()[[0] * 5])


def test_plain_epochs_train_openclips_clip_loss():
    from open_clip.loss import ClipLoss

    image, text = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    features = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(20.0)}
    defense = RoClip(RoClipConfig(pool_size=4))
    out = defense.compute_loss(None, features, TrainPass("train", mode="clip"), None)
    assert list(out) == ["clip_loss"]
    torch.testing.assert_close(out["clip_loss"], ClipLoss()(image, text, torch.tensor(20.0)))
    assert defense.pool is None  # plain epochs neither read nor fill the pool
    assert [defense.plan_epoch(None, e)[0].mode for e in range(5)] == ["roclip", "clip", "roclip", "clip", "roclip"]
    every3 = RoClip(RoClipConfig(every=3))
    assert [every3.is_roclip_epoch(e) for e in range(7)] == [True, False, False, True, False, False, True]
    later = RoClip(RoClipConfig(every=2, first_epoch=1))  # plain CLIP first, then every 2nd epoch
    assert [later.plan_epoch(None, e)[0].mode for e in range(6)] == ["clip", "roclip", "clip", "roclip", "clip",
                                                                    "roclip"]


def test_nearest_captions_come_from_the_pool_read_before_the_enqueue():
    image = unit_rows(4, 6, 0)
    text = image.clone()  # each image's own caption would be its perfect match
    pool = CaptionPool(16, 6)
    past = unit_rows(8, 6, 5)
    pool.enqueue(past)
    out = roclip_loss(image, text, torch.tensor(10.0), pool)
    for i, key in enumerate(out.keys):
        assert any(torch.equal(key, row) for row in past), "every key is a pool entry"
        assert not torch.allclose(key, text[i]), "never the image's own caption"
    assert pool.enqueued == 8  # the loss does not enqueue: the defense does, after the step
    pool.enqueue(out.captions)
    torch.testing.assert_close(pool.features[8:12], text)
    torch.testing.assert_close(roclip_loss(image, text, torch.tensor(10.0), pool).keys, text)  # now they are found
    # the run's first step, before anything was enqueued: the batch's own (detached) captions
    torch.testing.assert_close(roclip_loss(image, text, torch.tensor(10.0), CaptionPool(16, 6)).keys, text)


def test_pool_is_a_fifo_that_rejects_non_finite_rows_and_round_trips():
    pool = CaptionPool(5, 2)
    rows = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    pool.enqueue(rows[:3])
    bad = rows[3:5].clone()
    bad[1, 0] = float("nan")
    pool.enqueue(bad)  # slot 4 was empty and stays empty
    assert pool.filled.tolist() == [True, True, True, True, False] and int(pool.rejected) == 1
    pool.enqueue(rows[5:7])  # wraps: slots 0 and 1
    torch.testing.assert_close(pool.features[:4], torch.stack([rows[5], rows[6], rows[2], rows[3]]))
    assert pool.pointer == 2 and pool.enqueued == 7
    many = torch.arange(24, dtype=torch.float32).reshape(12, 2)
    pool.enqueue(many)  # more rows than slots: the last 5, where writing one by one leaves them
    assert pool.pointer == (2 + 12) % 5
    for k in range(7, 12):
        torch.testing.assert_close(pool.features[(2 + k) % 5], many[k])
    restored = CaptionPool.from_state(pool.state_dict())
    for key in ("features", "filled"):
        torch.testing.assert_close(getattr(restored, key), getattr(pool, key))
    assert (restored.pointer, restored.enqueued, int(restored.rejected)) == (pool.pointer, 19, 1)


def test_bad_flags_are_one_clear_error(csv_64, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--roclip-pool-size must be >= 1"):
        RoClipConfig(pool_size=0)
    with pytest.raises(ConfigError, match="--roclip-first-epoch must be >= 0"):
        RoClipConfig(first_epoch=-1).validate()
    with pytest.raises(ConfigError, match="--roclip-every must be >= 1"):
        RoClipConfig(every=0)
    flags = train_flags(csv_64, tmp_path, "bad", extra=["--defense", "roclip", "--roclip-pool-size", "0",
                                                        "--roclip-every", "-1"])
    assert run_safe_train(flags) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "roclip" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--roclip-pool-size must be >= 1 (got 0)" in lines[0] and "--roclip-every must be >= 1 (got -1" in lines[0]


def test_cross_augmentation_redraws_views_and_fixes_captions_per_sample(wordnet):
    from PIL import Image
    from torchvision import transforms

    from safe_train.augment import EdaAugmenter

    transform = RoClipTransform(transforms.ToTensor(), lambda captions: captions, 32, EdaAugmenter(alpha=0.3, seed=0),
                                crop_min_scale=0.5)
    image = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    caption = "a photo of the number seven written by hand on white paper."
    first, second = transform(image, caption, 11), transform(image, caption, 11)
    assert first["image"].shape == (3, 32, 32) and not torch.equal(first["image"], second["image"])  # fresh views
    assert first["text"] == second["text"]  # the sample's one EDA caption
    captions = {transform(image, caption, i)["text"] for i in range(12)}
    assert len(captions) > 1 and caption not in captions  # per-sample draws, never the raw caption


def test_the_presets_and_the_benchmark_rows():
    from safe_train.args import config_to_argv  # (here: the 2-rank workers import this module, keep it light)
    from safe_train.bench import BENCH_ENTRIES

    cc3m = config_to_argv("roclip-cc3m")
    assert cc3m[:2] == ["--defense", "roclip"]
    pairs = dict(zip(cc3m[::2], cc3m[1::2], strict=False))
    assert (pairs["--epochs"], pairs["--batch-size"], pairs["--lr"]) == ("24", "512", "5e-05")
    assert (pairs["--roclip-pool-size"], pairs["--roclip-every"]) == ("21845", "2")
    bench = config_to_argv("roclip-bench")
    assert BENCH_ENTRIES["roclip"].defense == "roclip" and BENCH_ENTRIES["roclip"].flags == tuple(bench[2:])
    assert not BENCH_ENTRIES["roclip"].finetunes
    assert BENCH_ENTRIES["roclip-augment"].flags[-1] == "--roclip-augment"


# ---- 2 gloo ranks against one process on the concatenated batch ----------------------------------------
WORLD, ROWS, DIM, POOL = 2, 3, 6, 8  # two steps of 6 gathered rows: the second wraps around the 8 slots
SCALE = 7.3
COMBOS = ((False, False), (False, True), (True, False), (True, True))  # (local_loss, gather_with_grad)


def _steps() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, captions) of the concatenated batch of two steps, the same in every process."""
    return [(unit_rows(WORLD * ROWS, DIM, 300 + 2 * k), unit_rows(WORLD * ROWS, DIM, 301 + 2 * k)) for k in range(2)]


def _rows(rank: int) -> slice:
    return slice(rank * ROWS, (rank + 1) * ROWS)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    all_gather = dist.all_gather
    gathers = [0]

    def counted(*args, **kwargs):
        gathers[0] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counted
    try:
        results = {}
        for local_loss, gather_with_grad in COMBOS:
            gather = GatherSpec(rank=rank, world_size=WORLD, local_loss=local_loss, gather_with_grad=gather_with_grad)
            pool = CaptionPool(POOL, DIM)
            steps = []
            for images, captions in _steps():
                image = images[_rows(rank)].clone().requires_grad_(True)
                scale = torch.tensor(SCALE, requires_grad=True)
                gathers[0] = 0
                out = roclip_loss(image, captions[_rows(rank)].clone(), scale, pool, gather)
                count = gathers[0]
                out.loss.backward()
                pool.enqueue(out.captions)  # what the defense does after the step
                steps.append({"loss": out.loss.detach(), "grad": image.grad, "scale_grad": scale.grad,
                              "keys": out.keys, "gathers": count})
            results[(local_loss, gather_with_grad)] = {"steps": steps, "pool": pool.state_dict()}
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.all_gather = all_gather
        dist.destroy_process_group()


def _reference(rank: int, local_loss: bool, gather_with_grad: bool) -> dict:
    """One process, plain torch: nearest filled slot by cosine, L_r over rank r's rows (or all), FIFO by hand."""
    slots: list[torch.Tensor | None] = [None] * POOL
    pointer = 0
    steps = []
    for images, captions in _steps():
        image = images.clone().requires_grad_(True)
        scale = torch.tensor(SCALE, requires_grad=True)
        filled = [j for j in range(POOL) if slots[j] is not None]
        if filled:
            entries = torch.stack([slots[j] for j in filled])
            keys = entries[(F.normalize(images, dim=-1) @ entries.T).argmax(dim=1)]
        else:
            keys = captions.clone()

        def loss_of(r: int, image=image, scale=scale, keys=keys) -> torch.Tensor:
            rows = _rows(r) if local_loss else slice(0, WORLD * ROWS)
            labels = torch.arange(rows.start, rows.stop)
            return (F.cross_entropy(scale * image[rows] @ keys.T, labels)
                    + F.cross_entropy(scale * keys[rows] @ image.T, labels)) / 2

        own = loss_of(rank)
        (scale_grad,) = torch.autograd.grad(own, scale, retain_graph=True)
        target = sum(loss_of(r) for r in range(WORLD)) if gather_with_grad else own
        (grad,) = torch.autograd.grad(target, image)
        steps.append({"loss": own.detach(), "grad": grad[_rows(rank)], "scale_grad": scale_grad, "keys": keys})
        for row in captions:
            slots[pointer] = row.clone()
            pointer = (pointer + 1) % POOL
    return {"steps": steps, "features": torch.stack([s if s is not None else torch.zeros(DIM) for s in slots]),
            "filled": [s is not None for s in slots], "pointer": pointer}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("roclip_two_ranks")
    torch.multiprocessing.spawn(_worker, args=(str(tmp / "init"), str(tmp / "out")), nprocs=WORLD)
    return [torch.load(tmp / f"out.{rank}", weights_only=True) for rank in range(WORLD)]


def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks):
    """Gradients of every rank's rows and of the logit scale, the keys, and the pool after each step."""
    for rank in range(WORLD):
        for combo in COMBOS:
            where = f"rank {rank}, (local_loss, gather_with_grad) = {combo}"
            mine, want = two_ranks[rank][combo], _reference(rank, *combo)
            for k, (got, ref) in enumerate(zip(mine["steps"], want["steps"], strict=True)):
                at = f"{where}, step {k}"
                assert got["gathers"] == 1, f"{at}: images and captions travel in one all-gather"
                torch.testing.assert_close(got["keys"], ref["keys"], msg=lambda m, a=at: f"{a}: keys: {m}")
                torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
                assert ref["grad"].abs().max() > 1e-3
                torch.testing.assert_close(got["grad"], ref["grad"], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, a=at: f"{a}: image gradient: {m}")
                torch.testing.assert_close(got["scale_grad"], ref["scale_grad"], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, a=at: f"{a}: logit-scale gradient: {m}")
            pool = mine["pool"]
            torch.testing.assert_close(pool["features"], want["features"])
            assert pool["filled"].tolist() == want["filled"] and pool["pointer"] == want["pointer"] == 4, where
    torch.testing.assert_close(two_ranks[0][COMBOS[0]]["pool"]["features"], two_ranks[1][COMBOS[0]]["pool"]["features"])


# ---- real training runs -------------------------------------------------------------------------------
class _Probe(Callback):
    """Per step: the loss terms, and whether the text tower / image tower / logit scale hold a gradient at the
    optimizer step; per epoch: whether each tower's weights moved."""

    name = "test_roclip_probe"

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.moved: list[dict] = []
        self._start: dict[str, list[torch.Tensor]] = {}

    def _towers(self, ctx) -> dict[str, list[torch.nn.Parameter]]:
        text = text_tower_parameters(ctx.model)
        ids = {id(p) for p in text}
        image = [p for n, p in ctx.model.named_parameters() if id(p) not in ids and "visual." in n]
        return {"text": text, "image": image}

    def on_epoch_start(self, ctx) -> None:
        self._start = {k: [p.detach().clone() for p in ps] for k, ps in self._towers(ctx).items()}

    def on_step_end(self, ctx, step) -> None:
        towers = self._towers(ctx)
        self.steps.append({
            "epoch": ctx.epoch, "terms": set(step.loss_tensors),
            "text_grad": any(p.grad is not None and p.grad.abs().max() > 0 for p in towers["text"]),
            "image_grad": any(p.grad is not None and p.grad.abs().max() > 0 for p in towers["image"]),
        })

    def on_epoch_end(self, ctx) -> None:
        self.moved.append({k: any(not torch.equal(a, p.detach()) for a, p in zip(self._start[k], ps, strict=True))
                           for k, ps in self._towers(ctx).items()})


def _record_pool_calls(mp: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every pool lookup and enqueue, with how many rows had been enqueued when it happened."""
    calls: list[tuple[str, int]] = []
    nearest, enqueue = CaptionPool.nearest, CaptionPool.enqueue

    def recorded_nearest(self, queries, fallback):
        calls.append(("nearest", self.enqueued))
        return nearest(self, queries, fallback)

    def recorded_enqueue(self, rows):
        calls.append(("enqueue", self.enqueued))
        return enqueue(self, rows)

    mp.setattr(CaptionPool, "nearest", recorded_nearest)
    mp.setattr(CaptionPool, "enqueue", recorded_enqueue)
    return calls


@pytest.fixture(scope="module")
def roclip_run(csv_64, tmp_path_factory):
    """Two epochs from scratch (epoch 0 RoCLIP, epoch 1 plain), with the pool's reads and writes recorded."""
    logs = tmp_path_factory.mktemp("roclip_run")
    probe = _Probe()
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_pool_calls(mp)
        with_callbacks(mp, probe)
        assert run_safe_train(train_flags(csv_64, logs, "run", epochs=2, extra=ROCLIP)) == 0
    return logs / "run", probe, calls


def test_text_tower_gets_no_gradient_in_roclip_epochs(roclip_run):
    run, probe, _ = roclip_run
    roclip = [s for s in probe.steps if s["epoch"] == 0]
    plain = [s for s in probe.steps if s["epoch"] == 1]
    assert len(roclip) == len(plain) == 8
    assert all(s["terms"] == {"roclip_loss", "loss"} for s in roclip)
    assert all(s["terms"] == {"clip_loss", "loss"} for s in plain)
    assert not any(s["text_grad"] for s in roclip) and all(s["image_grad"] for s in roclip)
    assert all(s["text_grad"] and s["image_grad"] for s in plain)
    assert probe.moved == [{"text": False, "image": True}, {"text": True, "image": True}]
    log = (run / "out.log").read_text()
    assert "[roclip]" in log and "RoCLIP: caption pool of 20, RoCLIP epochs 0, 2, 4" in log


def test_each_step_reads_the_pool_before_enqueueing_its_captions(roclip_run):
    """Step k of the RoCLIP epoch looks up a pool holding the k earlier steps' captions, then enqueues its own;
    the plain epoch touches the pool not at all."""
    run, _, calls = roclip_run
    assert calls == [(op, 8 * k) for k in range(8) for op in ("nearest", "enqueue")]
    state = torch.load(run / "checkpoints" / "epoch_2.safe_train" / "engine.ckpt", weights_only=True)
    pool = state["hooks"]["roclip"]["pool"]
    assert pool["filled"].all() and pool["pointer"] == 64 % 20 and pool["enqueued"] == 64
    assert torch.allclose(pool["features"].norm(dim=1), torch.ones(20))  # normalised caption embeddings


def test_accum_freq_reads_the_pool_per_micro_batch_and_enqueues_once_per_step(csv_64, tmp_path, monkeypatch):
    """--accum-freq 2: the loss runs once per micro-batch against the same pool; the step's 16 captions are
    enqueued once, after both."""
    calls = _record_pool_calls(monkeypatch)
    assert run_safe_train(train_flags(csv_64, tmp_path, "accum", extra=ROCLIP + ["--accum-freq", "2"])) == 0
    assert calls == [(op, 16 * k) for k in range(4) for op in ("nearest", "nearest", "enqueue")]


def test_finetunes_a_checkpoint_with_cross_augmentation(roclip_run, csv_64, tmp_path, monkeypatch, wordnet):
    """--pretrained: the pool starts empty, the text tower stays as the checkpoint left it, views are used."""
    run, _, _ = roclip_run
    calls = [0]
    original = RoClipTransform.__call__

    def counted(self, *args):
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(RoClipTransform, "__call__", counted)
    flags = train_flags(csv_64, tmp_path, "ft", epochs=1, extra=ROCLIP + [
        "--roclip-augment", "--roclip-crop-min-scale", "0.5", "--pretrained", str(run / "checkpoints" / "epoch_2.pt")])
    assert run_safe_train(flags) == 0
    assert calls[0] == 64
    before, after = load_state_dict(run, 2), load_state_dict(tmp_path / "ft", 1)
    for key in _text_keys(before):
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


class _StepLosses(Callback):
    name = "test_roclip_losses"

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, ctx, step) -> None:
        self.values.append(step.losses["loss"])


RESUME = ROCLIP + ["--save-every-n-steps", "5", "--keep-step-checkpoints", "5"]


def _losses_of_run(monkeypatch: pytest.MonkeyPatch, data: Path, logs: Path, name: str, more: list[str]) -> list[float]:
    recorder = _StepLosses()
    with_callbacks(monkeypatch, recorder)
    assert run_safe_train(train_flags(data, logs, name, epochs=3, extra=RESUME + more)) == 0
    with_callbacks(monkeypatch)
    return recorder.values


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path, list[float]]:
    """Three epochs (RoCLIP, plain, RoCLIP) of 4 steps on 32 pairs, with step checkpoints every 5 steps."""
    logs = tmp_path_factory.mktemp("roclip_resume")
    data = write_csv_dataset(logs / "data", 32)
    with pytest.MonkeyPatch.context() as mp:
        losses = _losses_of_run(mp, data, logs, "straight", [])
    assert len(losses) == 12
    return data, logs / "straight", losses


def _assert_same_weights(run: Path, reference: Path) -> None:
    want, got = load_state_dict(reference, 3), load_state_dict(run, 3)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{run.name}: {k}: {m}")


@pytest.mark.slow  # CI time; the step-checkpoint resume below runs by default
def test_resume_from_an_epoch_checkpoint_is_exact(uninterrupted, tmp_path, monkeypatch):
    """After epoch 2: the pool of epoch 0, carried over the plain epoch 1, feeds RoCLIP epoch 2."""
    data, straight, losses = uninterrupted
    resumed = _losses_of_run(monkeypatch, data, tmp_path, "from_epoch",
                             ["--resume", str(straight / "checkpoints" / "epoch_2.pt")])
    assert resumed == pytest.approx(losses[8:], rel=1e-6)
    _assert_same_weights(tmp_path / "from_epoch", straight)


def test_resume_from_a_step_checkpoint_is_exact(uninterrupted, tmp_path, monkeypatch):
    """Mid-way through RoCLIP epoch 2 (global step 10 of 12): a pool half refilled in that epoch."""
    data, straight, losses = uninterrupted
    resumed = _losses_of_run(monkeypatch, data, tmp_path, "from_step",
                             ["--resume", str(straight / "checkpoints" / "step_000000010.pt")])
    assert resumed == pytest.approx(losses[10:], rel=1e-6)
    _assert_same_weights(tmp_path / "from_step", straight)


@pytest.mark.slow
def test_two_ddp_ranks_train_with_a_frozen_text_tower_and_identical_pools(csv_64, tmp_path):
    """torchrun, 2 gloo ranks: DDP needs every parameter in each backward, so the text tower is tied in with a
    zero gradient and left out of the optimizer step; both ranks hold the same pool (their step-checkpoint
    parts); epoch 0 (RoCLIP) leaves the text tower as it was mid-epoch, epoch 1 (plain) moves it."""
    flags = train_flags(csv_64, tmp_path, "ddp", epochs=2, extra=ROCLIP + [
        "--dist-backend", "gloo", "--save-every-n-steps", "2", "--keep-step-checkpoints", "10"])
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "launch.py"), *flags]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = tmp_path / "ddp" / "checkpoints"
    side = checkpoints / "step_000000002.safe_train"
    pools = [torch.load(side / f"rank{r}.state", weights_only=True)["hooks"]["roclip"]["pool"] for r in range(2)]
    assert pools[0]["enqueued"] == 2 * 16 and pools[0]["pointer"] == pools[1]["pointer"]
    assert torch.equal(pools[0]["features"], pools[1]["features"]) and torch.equal(pools[0]["filled"], pools[1]["filled"])
    mid = _bare(torch.load(checkpoints / "step_000000002.pt", weights_only=True)["state_dict"])
    end0, end1 = _bare(load_state_dict(tmp_path / "ddp", 1)), _bare(load_state_dict(tmp_path / "ddp", 2))
    text = _text_keys(mid)
    assert all(torch.equal(mid[k], end0[k]) for k in text)
    assert any(not torch.equal(mid[k], end0[k]) for k in mid if k.startswith("visual."))
    assert any(not torch.equal(end0[k], end1[k]) for k in text)

"""In-loop detection (``--detect``), its 2-rank behaviour, and the standalone ``safe_train.detect`` command."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO, base_env, train_flags
from helpers import load_table, run_safe_train

from safe_train.args import load_id_list
from safe_train.detection.callback import percentile_ranks
from safe_train.detection.scores import batch_scores

LAUNCH = str(Path(__file__).parent / "launch.py")


@pytest.fixture(scope="module")
def poisoned_csv(csv_64, tmp_path_factory) -> tuple[Path, Path]:
    """The 64-digit CSV with 4 BadNets poisons (target zero): (train.csv, manifest.json)."""
    from safe_train.poison import main as poison_main

    out = tmp_path_factory.mktemp("poisoned") / "p"
    assert poison_main([str(csv_64), str(out), "--attack", "badnets", "--count", "4", "--target", "zero",
                        "--templates", "mnist", "--image-size", "32", "--seed", "0"]) == 0
    return out / "train.csv", out / "manifest.json"


def _torchrun(ranks: int, *args: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


# ---- scores of a gathered global batch ------------------------------------------------------------

GATHER_WORKER = textwrap.dedent("""
    import sys, argparse
    import numpy as np, torch, torch.distributed as tdist
    from safe_train import dist
    from safe_train.detection.callback import DetectionCallback
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    data = np.load(sys.argv[1])
    per = len(data["ids"]) // world
    mine = slice(rank * per, (rank + 1) * per)
    args = argparse.Namespace(detect="kdist,slof,lid,dao,iforest,clip", detect_reference="batch", detect_k=5,
                              detect_metric="l2", detect_backend="torch", detect_action="log",
                              detect_drop_fraction=None, detect_drop_epoch=1, detect_every=1,
                              detect_reference_size=None, detect_manifest=None, seed=0)
    cb = DetectionCallback.from_args(args)
    ctx = TrainContext(args=args, table=SampleTable(), rank=rank, world_size=world)
    cb.setup(ctx)
    features = {"image_features": torch.from_numpy(data["image"][mine]),
                "text_features": torch.from_numpy(data["text"][mine])}
    cb.on_step_end(ctx, StepOutput(TrainPass(), torch.from_numpy(data["ids"][mine]), features, {}, 0))
    ctx.table.sync(dist.gather_arrays)
    np.savez(sys.argv[2] + f"_{rank}.npz", ids=ctx.table.ids,
             **{n: np.asarray(ctx.table["score_" + n]) for n in cb.detectors})
    tdist.destroy_process_group()
""")


def test_two_rank_gathered_batch_scores_equal_single_process(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 24, 8
    image = rng.normal(size=(n, d)).astype(np.float32)
    text = (image + rng.normal(scale=0.3, size=(n, d))).astype(np.float32)
    ids = rng.permutation(1000)[:n].astype(np.int64)
    np.savez(tmp_path / "batch.npz", ids=ids, image=image, text=text)
    (tmp_path / "worker.py").write_text(GATHER_WORKER)
    proc = subprocess.run(_torchrun(2, str(tmp_path / "worker.py"), str(tmp_path / "batch.npz"), str(tmp_path / "out")),
                          env=base_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = batch_scores(image, text, ["kdist", "slof", "lid", "dao", "iforest", "clip"], k=5, seed=0)
    order = np.argsort(ids)
    results = [np.load(tmp_path / f"out_{r}.npz") for r in range(2)]
    for name, values in expected.items():
        for result in results:
            np.testing.assert_array_equal(result["ids"], ids[order])
            np.testing.assert_allclose(result[name], values[order], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(results[0][name], results[1][name])


# ---- in-loop runs -----------------------------------------------------------------------------------


def test_in_loop_batch_detection_logs_and_drops(poisoned_csv, tmp_path):
    train, manifest = poisoned_csv
    flags = train_flags(train, tmp_path, "d", epochs=2, batch_size=16, extra=[
        "--track-samples", "--detect", "kdist,slof,lid", "--detect-manifest", str(manifest),
        "--detect-action", "drop", "--detect-drop-fraction", "0.25", "--detect-drop-epoch", "0"])
    assert run_safe_train(flags) == 0
    run = tmp_path / "d"
    table = load_table(run, 2)
    for epoch in (0, 1):
        saved = np.load(run / "detection" / f"epoch_{epoch}_scores.npz")
        assert set(saved.files) >= {"sample_id", "score", "score_kdist", "score_slof", "score_lid"}
        assert np.isfinite(saved["score"]).all()
        assert (run / "detection" / f"epoch_{epoch}_hist.png").stat().st_size > 0
    # epoch 0 scored all 64; 16 dropped; epoch 1 trained (and scored) only the other 48
    dropped = table.ids[table["dropped"]]
    assert len(dropped) == 16
    np.testing.assert_array_equal(table["times_seen"][table["dropped"]], 1)
    np.testing.assert_array_equal(table["times_seen"][~table["dropped"]], 2)
    assert (table["score_epoch"][table["dropped"]] == 0).all() and (table["score_epoch"][~table["dropped"]] == 1).all()
    written = load_id_list(run / "detection" / "dropped_epoch_0.csv")
    np.testing.assert_array_equal(np.sort(written), dropped)
    epoch0 = np.load(run / "detection" / "epoch_0_scores.npz")
    top = epoch0["sample_id"][np.argsort(-epoch0["score_kdist"], kind="stable")[:16]]
    assert set(top.tolist()) == set(dropped.tolist())
    log_text = (run / "out.log").read_text()
    assert "detect_kdist_auroc" in log_text and "detect_dropped: 16" in log_text


def test_in_loop_global_reference(poisoned_csv, tmp_path):
    train, manifest = poisoned_csv
    flags = train_flags(train, tmp_path, "g", epochs=1, batch_size=16, extra=[
        "--detect", "kdist,dao", "--detect-reference", "global", "--detect-reference-size", "32",
        "--detect-k", "4", "--detect-manifest", str(manifest)])
    assert run_safe_train(flags) == 0
    table = load_table(tmp_path / "g", 1)
    assert len(table) == 64 and np.isfinite(table["score_kdist"]).all() and (table["score_epoch"] == 0).all()
    assert "detect_dao_auroc" in (tmp_path / "g" / "out.log").read_text()


def test_in_loop_auto_reference_reads_the_real_image_tower(poisoned_csv, tmp_path):
    """A real OpenCLIP model: every step's tower output is caught (no step falls back to normalised features)."""
    train, manifest = poisoned_csv
    flags = train_flags(train, tmp_path, "a", epochs=1, batch_size=16, extra=[
        "--detect", "auto", "--detect-reference", "auto", "--detect-manifest", str(manifest)])
    assert run_safe_train(flags) == 0
    table = load_table(tmp_path / "a", 1)
    assert len(table) == 64 and np.isfinite(table["score_auto"]).all()
    log_text = (tmp_path / "a" / "out.log").read_text()
    assert "detect_normalised_steps: 0" in log_text and "detect_auto_auroc" in log_text


def test_in_loop_auto_reference_is_the_standalone_rule(monkeypatch):
    """``--detect-reference auto`` scores the epoch exactly as ``safe-train detect``'s default reference does
    (a seeded sample of min(N, 32768) images, no captions): fed the same embeddings, the scores are identical;
    the sample is really a sample above the cap (monkeypatched to 40 of 96)."""
    import argparse

    import torch

    from safe_train.detection import scores as scores_mod
    from safe_train.detection.callback import DetectionCallback
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    monkeypatch.setattr(scores_mod, "AUTO_REFERENCE_PAIRS", 40)
    rng = np.random.default_rng(3)
    ids = rng.permutation(1000)[:96].astype(np.int64)
    image, text = rng.normal(size=(96, 8)).astype(np.float32), rng.normal(size=(96, 8)).astype(np.float32)
    args = argparse.Namespace(detect="auto,kdist", detect_reference="auto", detect_k=None, detect_metric="l2",
                              detect_backend="torch", detect_action="log", detect_drop_fraction=None,
                              detect_drop_epoch=1, detect_every=1, detect_reference_size=None, detect_manifest=None,
                              detect_blocklist_budget=None, seed=5)
    callback = DetectionCallback.from_args(args)
    ctx = TrainContext(args=args, table=SampleTable())
    callback.setup(ctx)
    callback.on_epoch_start(ctx)
    for part in (slice(0, 50), slice(50, 96)):  # two steps
        ctx.table.register(ids[part])
        features = {"image_features": torch.from_numpy(image[part]), "text_features": torch.from_numpy(text[part])}
        callback.on_step_end(ctx, StepOutput(TrainPass(), torch.from_numpy(ids[part]), features, {}, 0))
    callback.on_epoch_end(ctx)
    expected = scores_mod.auto_reference_scores(image, text, ["auto", "kdist"], k=None, metric="l2", seed=5,
                                                backend="torch")
    whole = scores_mod.global_scores(image, text, ["auto"], reference_size=None, with_text=False, seed=5,
                                     backend="torch")
    for name in ("auto", "kdist"):
        np.testing.assert_array_equal(ctx.table.get(f"score_{name}", ids), expected[name].astype(np.float32))
    assert not np.allclose(expected["auto"], whole["auto"])  # 40 of 96: a sample, not the whole epoch


def test_in_loop_auto_reference_scores_the_image_towers_unnormalised_output():
    """The forward returns normalised features; ``--detect-reference auto`` scores what the image tower output
    (``encode_image(normalize=False)``, as ``safe-train detect``), caught by a hook on ``model.visual``. A step
    whose tower output has other rows (extra views) falls back to the forward's features and is counted."""
    import argparse

    import torch

    from safe_train.detection import scores as scores_mod
    from safe_train.detection.callback import DetectionCallback
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    class TwoTowers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = torch.nn.Linear(6, 8)

        def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"image_features": torch.nn.functional.normalize(self.visual(image), dim=-1),
                    "text_features": torch.nn.functional.normalize(text, dim=-1)}

    torch.manual_seed(0)
    model = TwoTowers()
    rng = np.random.default_rng(4)
    ids = rng.permutation(500)[:60].astype(np.int64)
    pixels = torch.from_numpy(rng.normal(size=(60, 6)).astype(np.float32))
    pixels[:5] *= 6  # a few long embeddings: what the normalised features cannot show
    text = torch.from_numpy(rng.normal(size=(60, 8)).astype(np.float32))
    args = argparse.Namespace(detect="auto", detect_reference="auto", detect_k=None, detect_metric="l2",
                              detect_backend="torch", detect_action="log", detect_drop_fraction=None,
                              detect_drop_epoch=1, detect_every=1, detect_reference_size=None, detect_manifest=None,
                              detect_blocklist_budget=None, seed=5)
    callback = DetectionCallback.from_args(args)
    ctx = TrainContext(args=args, table=SampleTable(), model=model)
    callback.setup(ctx)
    callback.on_train_start(ctx)
    callback.on_epoch_start(ctx)
    with torch.no_grad():
        for part in (slice(0, 30), slice(30, 60)):
            ctx.table.register(ids[part])
            features = model(pixels[part], text[part])
            model.visual(pixels[:3])  # e.g. an evaluation call in between: the step's own forward comes last
            features = model(pixels[part], text[part])
            callback.on_step_end(ctx, StepOutput(TrainPass(), torch.from_numpy(ids[part]), features, {}, 0))
        everything = model(pixels, text)
        raw, normalised = model.visual(pixels).numpy(), everything["image_features"].numpy()
        captions = everything["text_features"].numpy()
    callback.on_epoch_end(ctx)
    expected = scores_mod.auto_reference_scores(raw, captions, ["auto"], k=None, metric="l2", seed=5,
                                                backend="torch")
    np.testing.assert_allclose(ctx.table.get("score_auto", ids), expected["auto"].astype(np.float32), rtol=1e-5)
    assert callback.unmatched_tower_steps == 0
    on_normalised = scores_mod.auto_reference_scores(normalised, captions, ["auto"], k=None, seed=5,
                                                     backend="torch")["auto"]
    assert not np.allclose(expected["auto"], on_normalised)

    callback.on_epoch_start(ctx)  # a step whose tower saw more rows than the step has samples
    with torch.no_grad():
        features = model(pixels[:30], text[:30])
        model.visual(torch.cat([pixels[:30], pixels[:10]]))  # the views of 10 risky rows, say
    callback.on_step_end(ctx, StepOutput(TrainPass(), torch.from_numpy(ids[:30]), features, {}, 0))
    assert callback.unmatched_tower_steps == 1
    np.testing.assert_array_equal(callback._epoch_rows[0][1], features["image_features"].numpy())


def test_two_rank_drop_is_identical_on_every_rank(poisoned_csv, tmp_path):
    train, manifest = poisoned_csv
    flags = train_flags(train, tmp_path, "r2", epochs=2, batch_size=8, extra=[
        "--track-samples", "--detect", "auto", "--detect-manifest", str(manifest), "--detect-action", "drop",
        "--detect-drop-fraction", "0.25", "--detect-drop-epoch", "0"])
    proc = subprocess.run(_torchrun(2, LAUNCH, *flags), env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r2"
    log_text = (run / "out.log").read_text()
    # the engine hashes the table on every rank after every epoch and fails on any difference
    assert log_text.count("per-sample state identical on 2 ranks") == 2
    table = load_table(run, 2)
    dropped = table["dropped"]
    assert dropped.sum() == 16
    np.testing.assert_array_equal(table["times_seen"][dropped], 1)
    np.testing.assert_array_equal(table["times_seen"][~dropped], 2)
    # every rank scored its own half of each global batch: all 64 samples have an epoch-0 score
    epoch0 = np.load(run / "detection" / "epoch_0_scores.npz")
    assert len(epoch0["sample_id"]) == 64
    # drop followed the aggregate (synced, and hashed identical on both ranks with the rest of the table)
    np.testing.assert_array_equal(table["score_agg_count"], np.where(dropped, 1, 2))
    top = np.lexsort((epoch0["sample_id"], -percentile_ranks(epoch0["score"])))[:16]
    np.testing.assert_array_equal(np.sort(epoch0["sample_id"][top]), table.ids[dropped])


@pytest.mark.slow  # CI time: the step-resume test below covers the harder mid-epoch case in the default run
def test_aggregate_survives_an_epoch_resume(poisoned_csv, tmp_path, monkeypatch):
    """Killed after epoch 1's checkpoint and resumed: score_agg / score_agg_count equal the uninterrupted run's."""
    from helpers import KillAtEpoch, Killed, with_callbacks

    train, _ = poisoned_csv
    extra = ["--track-samples", "--detect", "auto,kdist", "--detect-action", "drop", "--detect-drop-fraction",
             "0.125", "--detect-drop-epoch", "1", "--detect-blocklist-budget", "8"]
    assert run_safe_train(train_flags(train, tmp_path, "straight", epochs=3, batch_size=16, extra=extra)) == 0
    with_callbacks(monkeypatch, KillAtEpoch(2))
    with pytest.raises(Killed):
        run_safe_train(train_flags(train, tmp_path, "cut", epochs=3, batch_size=16, extra=extra))
    with_callbacks(monkeypatch)
    assert run_safe_train(train_flags(train, tmp_path, "cut", epochs=3, batch_size=16,
                                      extra=extra + ["--resume", "latest"])) == 0
    a, b = load_table(tmp_path / "straight", 3), load_table(tmp_path / "cut", 3)
    np.testing.assert_array_equal(a.ids, b.ids)
    for column in ("score_agg", "score_agg_count", "dropped", "drop_score"):
        np.testing.assert_allclose(a[column].astype(np.float64), b[column].astype(np.float64), rtol=1e-5,
                                   err_msg=column)
    # 8 dropped after epoch 1 (scored in epochs 0 and 1); of the other 56, epoch 2's 3 full batches scored 48
    np.testing.assert_array_equal(a["score_agg_count"], np.where(a["score_epoch"] == 2, 3, 2))
    assert a["dropped"].sum() == 8 and (a["score_agg_count"][a["dropped"]] == 2).all()
    blocked = load_id_list(tmp_path / "cut" / "detection" / "blocklist.csv")
    assert len(blocked) == 8
    agg = np.asarray(b["score_agg"], dtype=np.float64)
    np.testing.assert_array_equal(np.sort(blocked), np.sort(b.ids[np.lexsort((b.ids, -agg))[:8]]))


def test_aggregate_survives_a_step_resume(csv_64, tmp_path, monkeypatch):
    """Stopped by a signal mid-epoch 1 and resumed: the whole table (score_agg included) equals the straight run's."""
    from test_step_resume import _stop_and_resume

    extra = ["--track-samples", "--detect", "auto", "--detect-action", "drop", "--detect-drop-fraction", "0.25",
             "--detect-drop-epoch", "1"]
    _stop_and_resume(monkeypatch, tmp_path, csv_64, epochs=2, extra=extra, stop=["--test-signal-at-step", "11"])
    table = load_table(tmp_path / "cut", 2)
    np.testing.assert_array_equal(table["score_agg_count"], 2)
    assert table["dropped"].sum() == 16


@pytest.mark.parametrize("argv, message", [
    (["--detect", "kdist,nope"], "unknown detector"),
    (["--detect", "kdist", "--detect-action", "drop"], "--detect-drop-fraction"),
    (["--detect-k", "4"], "need --detect"),
    (["--detect", "kdist", "--detect-reference-size", "10"], "--detect-reference global"),
    (["--detect", "kdist", "--detect-aggregate-recency", "2"], "--detect-aggregate-recency must be in [0, 1]"),
])
def test_bad_detection_flags_fail_clearly(argv, message, csv_64, tmp_path, capsys):
    assert run_safe_train(train_flags(csv_64, tmp_path, "bad", extra=argv)) == 2
    assert message in capsys.readouterr().err


# ---- the standalone command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(poisoned_csv, tmp_path_factory) -> Path:
    train, _ = poisoned_csv
    logs = tmp_path_factory.mktemp("trained")
    assert run_safe_train(train_flags(train, logs, "t", epochs=1, batch_size=16)) == 0
    return logs / "t" / "checkpoints" / "epoch_1.pt"


def _detect(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "safe_train.detect", *argv], env=base_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.parametrize("reference", [pytest.param("batch", marks=pytest.mark.slow), "global"])  # CI time
def test_detect_cli_end_to_end(reference, poisoned_csv, trained, tmp_path):
    train, manifest = poisoned_csv
    out = tmp_path / "det"
    proc = _detect("--model", "st-tiny-vit", "--checkpoint", str(trained), "--train-data", str(train),
                   "--dataset-type", "csv", "--out", str(out), "--detectors", "kdist,slof,lid,dao,iforest,clip",
                   "--reference", reference, "--k", "4", "--reference-batch-size", "32", "--batch-size", "16",
                   "--top-fraction", "0.125", "--manifest", str(manifest), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 64 and report["num_poisoned"] == 4
    assert set(report["metrics"]) == {"kdist", "slof", "lid", "dao", "iforest", "clip"}
    assert all(0 <= m["auroc"] <= 1 for m in report["metrics"].values())
    blocked = load_id_list(out / "blocklist.txt")
    scores = np.load(out / "scores.npz")
    np.testing.assert_array_equal(scores["sample_id"], np.arange(64))
    top = np.sort(scores["sample_id"][np.lexsort((scores["sample_id"], -scores["score"]))[:8]])
    np.testing.assert_array_equal(blocked, top)
    assert (out / "scores.csv").read_text().startswith("sample_id,kdist,slof")
    # the blocklist feeds a retraining run
    assert run_safe_train(train_flags(train, tmp_path, "re", epochs=1, batch_size=8,
                                      extra=["--track-samples", "--blocklist", str(out / "blocklist.txt")])) == 0
    table = load_table(tmp_path / "re", 1)
    assert not np.isin(blocked, table.ids[table["times_seen"] > 0]).any()


@pytest.mark.parametrize("budget", [None, 5])
def test_detect_cli_default_is_auto(budget, poisoned_csv, trained, tmp_path):
    """No detector flags: auto against the images of min(N, 32768) pairs; the blocklist is the budget's top B, or
    without one the samples above sqrt(2 ln m)."""
    from safe_train.detection.detectors import auto_tau

    train, manifest = poisoned_csv
    out = tmp_path / "det"
    proc = _detect("--model", "st-tiny-vit", "--checkpoint", str(trained), "--train-data", str(train),
                   "--dataset-type", "csv", "--out", str(out), "--batch-size", "16", "--manifest", str(manifest),
                   "--device", "cpu", *([] if budget is None else ["--blocklist-budget", str(budget)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["detectors"] == ["auto"] and report["reference"] == "auto" and report["reference_size"] == 64
    scores = np.load(out / "scores.npz")
    blocked = load_id_list(out / "blocklist.txt")
    if budget is None:
        assert report["blocklist"]["threshold"] == pytest.approx(auto_tau(64))
        np.testing.assert_array_equal(blocked, np.sort(scores["sample_id"][scores["score"] > auto_tau(64)]))
    else:
        top = scores["sample_id"][np.lexsort((scores["sample_id"], -scores["score"]))[:budget]]
        np.testing.assert_array_equal(blocked, np.sort(top))


def test_detect_cli_webdataset_ids_match_training(wds_4x16, tmp_path):
    logs = tmp_path / "logs"
    assert run_safe_train(train_flags(wds_4x16, logs, "w", epochs=1, batch_size=16, dataset_type="webdataset",
                                      workers=1, extra=["--track-samples"])) == 0
    proc = _detect("--model", "st-tiny-vit", "--checkpoint", str(logs / "w" / "checkpoints" / "epoch_1.pt"),
                   "--train-data", wds_4x16, "--out", str(tmp_path / "det"), "--detectors", "kdist",
                   "--reference", "global", "--reference-size", "20", "--k", "4", "--threshold", "1e9",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.load(tmp_path / "det" / "scores.npz")
    np.testing.assert_array_equal(np.sort(scores["sample_id"]), load_table(logs / "w", 1).ids)
    assert len(load_id_list(tmp_path / "det" / "blocklist.txt")) == 0


@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "missing.pt"}, "checkpoint not found"),
    ({"--detectors": "kdist,bogus"}, "unknown detector"),
    ({"--top-fraction": "1.5"}, "--top-fraction"),
    ({"--train-data": "nope.csv"}, "not found"),
])
def test_detect_cli_bad_input(change, message, poisoned_csv, trained, tmp_path):
    train, _ = poisoned_csv
    argv = {"--model": "st-tiny-vit", "--checkpoint": str(trained), "--train-data": str(train),
            "--out": str(tmp_path / "o"), "--detectors": "kdist", "--top-fraction": "0.1"}
    argv.update(change)
    proc = _detect(*[t for kv in argv.items() for t in kv])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_detect_cli_non_finite_embeddings_are_one_clear_error(poisoned_csv, trained, tmp_path):
    """A diverged checkpoint (NaN weights) stops the command with one message, not a traceback from the kNN."""
    import torch

    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    key = next(k for k in state if k.endswith("visual.proj") or k.endswith("text_projection"))
    state[key] = torch.full_like(state[key], float("nan"))
    broken = tmp_path / "nan.pt"
    torch.save(checkpoint, broken)
    train, _ = poisoned_csv
    proc = _detect("--model", "st-tiny-vit", "--checkpoint", str(broken), "--train-data", str(train),
                   "--dataset-type", "csv", "--out", str(tmp_path / "o"), "--detectors", "kdist", "--device", "cpu")
    assert proc.returncode == 2
    assert "non-finite embeddings" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("reference", ["batch", "global"])
def test_non_finite_step_embeddings_are_skipped_and_counted(reference):
    """A diverging step (NaN embeddings) leaves its samples unscored and counted; the run goes on."""
    import argparse

    import torch

    from safe_train.detection.callback import DetectionCallback
    from safe_train.interface import StepOutput, TrainContext, TrainPass
    from safe_train.state import SampleTable

    args = argparse.Namespace(detect="kdist,clip", detect_reference=reference, detect_k=3, detect_metric="l2",
                              detect_backend="torch", detect_action="log", detect_drop_fraction=None,
                              detect_drop_epoch=1, detect_every=1, detect_reference_size=None, detect_manifest=None,
                              seed=0)
    cb = DetectionCallback.from_args(args)
    ctx = TrainContext(args=args, table=SampleTable(), rank=0, world_size=1)
    cb.setup(ctx)
    cb.on_epoch_start(ctx)
    gen = torch.Generator().manual_seed(0)
    for step, start in enumerate((0, 16)):
        image, text = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        if step == 1:
            image[3] = float("nan")
        ids = torch.arange(start, start + 16)
        ctx.table.register(ids.numpy())
        cb.on_step_end(ctx, StepOutput(TrainPass(), ids, {"image_features": image, "text_features": text}, {}, 0))
    ctx.table.sync()  # as the engine does before the epoch-end hooks
    cb.on_epoch_end(ctx)
    scored = np.isfinite(np.asarray(ctx.table["score_kdist"]))
    ids = ctx.table.ids
    if reference == "batch":  # the whole diverging batch stays unscored
        assert scored[ids < 16].all() and not scored[ids >= 16].any()
        assert ctx.epoch_metrics["detect_skipped_non_finite"] == 16
    else:  # only the non-finite sample
        assert scored.sum() == 31 and not scored[ids == 19].any()
        assert ctx.epoch_metrics["detect_skipped_non_finite"] == 1

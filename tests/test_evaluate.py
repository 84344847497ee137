"""Zero-shot evaluation: hand-computed accuracy, the ASR definition, detection metrics, safe loading, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from safe_train import evaluate as ev
from safe_train import evaluate_cli as cli
from safe_train.zeroshot_sets import MNIST_CLASSNAMES, MNIST_TEMPLATES, get_zeroshot_set

REPO = Path(__file__).resolve().parents[1]
S2 = math.sqrt(2)
# Six unit class vectors in RGB space: red, green, blue, red+green, green+blue, red+blue.
STUB_CLASSIFIER = torch.tensor(
    [[1, 0, 0, 1 / S2, 0, 1 / S2], [0, 1, 0, 1 / S2, 1 / S2, 0], [0, 0, 1, 0, 1 / S2, 1 / S2]],
    dtype=torch.float32,
)
# Solid-colour images, their labels, and the class ranking by cosine similarity, computed by hand:
# (255,128,0) -> f=(.894,.449,0): c3 .949, c0 .894, c5 .632, c1 .449, c4 .317, c2 0
# (0,64,255)  -> f=(0,.244,.970): c2 .970, c4 .858, c5 .686, c1 .244, c3 .172, c0 0
# (128,255,0) -> f=(.449,.894,0): c3 .949, c1 .894, c4 .632, c0 .449, c5 .317, c2 0
# (255,0,200) -> f=(.787,0,.617): c5 .993, c0 .787, c2 .617, c3 .557, c4 .436, c1 0
STUB_COLOURS = [(255, 128, 0), (0, 64, 255), (128, 255, 0), (255, 0, 200)]
STUB_LABELS = [3, 0, 1, 5]
STUB_TOP5 = [[3, 0, 5, 1, 4], [2, 4, 5, 1, 3], [3, 1, 4, 0, 5], [5, 0, 2, 3, 4]]


class ColourModel(torch.nn.Module):
    """Image embedding = the mean RGB colour: similarities can be worked out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = images.mean(dim=(2, 3))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def write_images(directory: Path, colours, size: int = 6) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(colours):
        path = directory / f"img_{i}.png"
        Image.new("RGB", (size, size), colour).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def stub_data(tmp_path) -> ev.LabelledImages:
    paths = write_images(tmp_path / "img", STUB_COLOURS)
    return ev.LabelledImages.from_list(paths, STUB_LABELS)


@pytest.fixture(scope="module")
def tiny_model():
    return ev.load_model("st-tiny-vit")


@pytest.fixture(scope="module")
def digit_test_csv(tmp_path_factory) -> Path:
    """12 real handwritten digits (scikit-learn) at 8x8 -> a test CSV with class-index labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    directory = tmp_path_factory.mktemp("digits")
    rows = ["filepath\tlabel"]
    for i in range(12):
        grey = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(grey).save(directory / f"d{i}.png")
        rows.append(f"d{i}.png\t{digits.target[i]}")  # relative to the CSV's folder
    csv = directory / "test.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


# ---------------------------------------------------------------------------- hand-computed


def test_predict_matches_hand_computed_ranking(stub_data):
    model = ColourModel()  # in training mode, as when evaluated between epochs
    preds, labels = ev.predict(
        model,
        stub_data,
        STUB_CLASSIFIER,
        image_size=4,
        preprocess=transforms.ToTensor(),
        batch_size=3,
    )
    assert preds.tolist() == STUB_TOP5
    assert labels.tolist() == STUB_LABELS
    assert ev.topk_accuracy(preds, labels, 1) == 0.5  # images 0 and 3
    assert ev.topk_accuracy(preds, labels, 5) == 0.75  # image 1's label (0) is ranked last
    assert model.training  # predict switched to eval mode and back


def test_trigger_is_applied_at_model_resolution(stub_data):
    seen = []

    def to_red(img: Image.Image) -> Image.Image:
        seen.append(img.size)
        return Image.new("RGB", img.size, (255, 0, 0))  # red -> class 0 first

    preds, labels = ev.predict(
        ColourModel(),
        stub_data,
        STUB_CLASSIFIER,
        image_size=4,
        trigger=to_red,
        preprocess=transforms.ToTensor(),
    )
    assert seen == [(4, 4)] * 4
    assert preds[:, 0].tolist() == [0, 0, 0, 0]
    # labels [3, 0, 1, 5], target 0: the label-0 image is not counted -> 3/3
    assert ev.attack_success_rate(preds[:, 0], labels, 0) == 1.0


def test_topk_accuracy_hand_case():
    preds = torch.tensor([[1, 2, 3], [0, 1, 2], [2, 0, 1]])
    labels = torch.tensor([1, 2, 1])
    assert ev.topk_accuracy(preds, labels, 1) == pytest.approx(1 / 3)
    assert ev.topk_accuracy(preds, labels, 2) == pytest.approx(1 / 3)
    assert ev.topk_accuracy(preds, labels, 3) == 1.0
    with pytest.raises(ValueError):
        ev.topk_accuracy(preds, labels, 4)


# ------------------------------------------------------------------------------------- ASR


def test_asr_always_and_never_target():
    labels = torch.tensor([0, 1, 2, 3, 0, 4])
    assert ev.attack_success_rate(torch.zeros(6, dtype=torch.long), labels, 0) == 1.0
    assert ev.attack_success_rate(torch.full((6,), 7), labels, 0) == 0.0


def test_asr_excludes_target_class_images():
    labels = torch.tensor([0, 0, 1, 2])
    preds = torch.tensor([0, 0, 0, 1])
    # Counting the two target-class images would give 3/4; the definition gives 1/2.
    assert ev.attack_success_rate(preds, labels, 0) == 0.5
    # A top-k matrix is reduced to its first column.
    assert ev.attack_success_rate(torch.stack([preds, preds], 1), labels, 0) == 0.5
    with pytest.raises(ValueError, match="target class"):
        ev.attack_success_rate(preds, torch.zeros(4, dtype=torch.long), 0)


def test_evaluate_model_asr_pass_skips_target_images(stub_data, monkeypatch):
    monkeypatch.setattr(ev, "build_classifier", lambda *a, **k: STUB_CLASSIFIER)
    model = ColourModel()
    model.visual = types.SimpleNamespace(image_size=(4, 4))
    calls = []

    def to_green(img):
        calls.append(1)
        return Image.new("RGB", img.size, (0, 255, 10))  # green -> class 1

    result = ev.evaluate_model(
        model, transforms.ToTensor(), None, stub_data, ["c"] * 6, ["{}"], trigger=to_green, target_index=1
    )
    assert result["clean_top1"] == 0.5 and result["clean_top5"] == 0.75 and result["n_eval"] == 4
    assert result["n_asr"] == 3 and len(calls) == 3  # the label-1 image is never triggered
    assert result["asr"] == 1.0
    assert result["asr_clean_baseline"] == 0.0  # clean top-1s are 3, 2, 5 for the non-target images


def test_targeted_success():
    assert ev.targeted_success(torch.tensor([3, 1, 2, 2]), [3, 1, 0, 9]) == 0.5


# ------------------------------------------------------------------------------- detection


def test_detection_metrics_hand_cases():
    perfect = ev.detection_metrics([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0])
    assert perfect == {"auroc": 1.0, "pr_auc": 1.0, "fpr_at_95_tpr": 0.0}
    inverted = ev.detection_metrics([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0])
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95_tpr"] == 1.0
    # Positives at 0.35 and 0.8, negatives at 0.1 and 0.4: 3 of 4 pairs ordered -> AUROC 0.75;
    # AP = (1/1 + 2/3) / 2; catching both positives (threshold 0.35) flags 1 of 2 negatives.
    mixed = ev.detection_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    assert mixed["auroc"] == pytest.approx(0.75)
    assert mixed["pr_auc"] == pytest.approx(5 / 6)
    assert mixed["fpr_at_95_tpr"] == pytest.approx(0.5)


def test_detection_metrics_needs_both_classes():
    with pytest.raises(ValueError, match="both poisoned and clean"):
        ev.detection_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        ev.detection_metrics([0.1, float("nan")], [0, 1])


# ----------------------------------------------------------------------------- real model


def test_real_model_end_to_end_matches_independent_computation(tiny_model, digit_test_csv):
    model, preprocess, tokenizer = tiny_model
    classnames, templates = get_zeroshot_set("mnist")
    dataset = ev.LabelledImages(digit_test_csv, classnames)
    classifier = ev.build_classifier(model, tokenizer, classnames, templates)
    preds, labels = ev.predict(model, dataset, classifier, 32, preprocess=preprocess, batch_size=5)
    assert preds.shape == (12, 5) and labels.shape == (12,) and classifier.shape == (128, 10)

    with torch.no_grad():
        weights = []
        for name in classnames:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            weights.append(mean / mean.norm())
        weights = torch.stack(weights, dim=1)
        correct = 0
        for i in range(len(dataset)):
            img = Image.open(dataset.paths[i]).convert("RGB").resize((32, 32), Image.BILINEAR)
            feat = model.encode_image(preprocess(img)[None])
            logits = (feat / feat.norm(dim=-1, keepdim=True)) @ weights
            assert int(logits.argmax()) == int(preds[i, 0])
            correct += int(logits.argmax()) == dataset.labels[i]
    assert torch.allclose(classifier, weights, atol=1e-5)
    assert ev.topk_accuracy(preds, labels, 1) == correct / 12


# --------------------------------------------------------------------------------- loading


def test_load_model_strips_module_prefix(tmp_path, tiny_model):
    model, _, _ = tiny_model
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save(
        {
            "epoch": 1,
            "name": "run",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        },
        path,
    )
    loaded, _, _ = ev.load_model("st-tiny-vit", path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    assert torch.equal(ev.load_model("st-tiny-vit", bare)[0].logit_scale, state["logit_scale"])


class _Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))}, path)
    with pytest.raises(ev.EvaluationError, match="weights_only"):
        ev.load_state_dict(path)
    assert not marker.exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ev.load_state_dict(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ev.EvaluationError, match="corrupt"):
        ev.load_state_dict(corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, wrong)
    with pytest.raises(ev.EvaluationError, match="does not match"):
        ev.load_model("st-tiny-vit", wrong)


# ---------------------------------------------------------------------------------- datasets


def test_labelled_images_folder_and_csv(tmp_path):
    for cls, colour in (("one", (1, 1, 1)), ("zero", (0, 0, 0))):
        write_images(tmp_path / "tree" / cls, [colour, colour])
    folder = ev.LabelledImages(tmp_path / "tree")
    assert folder.labels == [0, 0, 1, 1]  # ImageFolder order: "one" < "zero"
    named = ev.LabelledImages(tmp_path / "tree", MNIST_CLASSNAMES)
    assert named.labels == [1, 1, 0, 0]  # folders named after classes keep their class index

    paths = write_images(tmp_path / "flat", [(0, 0, 0)] * 3)
    csv = tmp_path / "names.csv"
    csv.write_text(
        "path,cls\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, ["two", "nine", "zero"], strict=True))
    )
    data = ev.LabelledImages(csv, MNIST_CLASSNAMES, img_key="path", label_key="cls")
    assert data.labels == [2, 9, 0]
    img, label = data[0]
    assert img.mode == "RGB" and label == 2
    with pytest.raises(ev.EvaluationError, match="column 'label' not in"):
        ev.LabelledImages(csv, MNIST_CLASSNAMES, img_key="path")
    with pytest.raises(ev.EvaluationError, match="not class names"):
        ev.LabelledImages(csv, ["zero"], img_key="path", label_key="cls")


# --------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def checkpoint(tmp_path, tiny_model) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in tiny_model[0].state_dict().items()}}, path
    )
    return path


REQUIRED_KEYS = {"clean_top1", "clean_top5", "asr", "n_eval", "n_asr", "checkpoint", "model", "attack"}


def test_cli_clean_and_attack(tmp_path, checkpoint, digit_test_csv, monkeypatch):
    out = tmp_path / "clean.json"
    rc = cli.main(
        [
            "--model",
            "st-tiny-vit",
            "--checkpoint",
            str(checkpoint),
            "--test-data",
            str(digit_test_csv),
            "--zeroshot-set",
            "mnist",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    clean = json.loads(out.read_text())
    assert REQUIRED_KEYS <= clean.keys()
    assert clean["asr"] is None and clean["attack"] is None and clean["n_eval"] == 12
    assert clean["checkpoint"] == str(checkpoint.resolve())

    # The attack module is someone else's: stand-ins keep this test about evaluation.
    monkeypatch.setattr(
        ev, "resize_to_model", lambda img, size: img.convert("RGB").resize((size, size), Image.BILINEAR)
    )
    def white_trigger(name, size, seed=0, **params):
        return lambda img: Image.new("RGB", img.size, (255, 255, 255))

    monkeypatch.setattr(ev, "build_trigger", white_trigger)
    out = tmp_path / "attack.json"
    rc = cli.main(
        [
            "--model",
            "st-tiny-vit",
            "--checkpoint",
            str(checkpoint),
            "--test-data",
            str(digit_test_csv),
            "--zeroshot-set",
            "mnist",
            "--attack",
            "white",
            "--attack-param",
            "patch_size=3",
            "--target",
            "Zero",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    n_zero = sum(1 for line in digit_test_csv.read_text().splitlines()[1:] if line.endswith("\t0"))
    assert result["n_asr"] == 12 - n_zero and 0 < result["n_asr"] < 12
    assert result["asr"] in (0.0, 1.0)  # every triggered image is the same white square
    assert result["attack"] == {
        "name": "white",
        "params": {"patch_size": 3},
        "seed": 0,
        "image_size": 32,
        "manifest": None,
        "target": "zero",
        "target_index": 0,
    }
    assert result["clean_top1"] == clean["clean_top1"]


def test_cli_scores_give_detection_metrics(tmp_path, checkpoint, digit_test_csv, monkeypatch):
    manifest = types.SimpleNamespace(
        attack="badnets", params={"patch_size": 3}, target="one", seed=0, image_size=32, poisoned_ids=[2, 5]
    )
    monkeypatch.setattr(ev, "Manifest", types.SimpleNamespace(load=lambda path: manifest))
    monkeypatch.setattr(
        ev, "resize_to_model", lambda img, size: img.convert("RGB").resize((size, size), Image.BILINEAR)
    )
    monkeypatch.setattr(ev, "trigger_from_manifest", lambda m: lambda img: img)
    (tmp_path / "manifest.json").write_text("{}")
    scores = tmp_path / "scores.csv"
    scores.write_text("sample_id,score\n0,0.1\n1,0.2\n2,0.9\n3,0.3\n4,0.15\n5,0.8\n")
    out = tmp_path / "r.json"
    rc = cli.main(
        [
            "--model",
            "st-tiny-vit",
            "--checkpoint",
            str(checkpoint),
            "--test-data",
            str(digit_test_csv),
            "--zeroshot-set",
            "mnist",
            "--manifest",
            str(tmp_path / "manifest.json"),
            "--scores",
            str(scores),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["detection"]["auroc"] == 1.0 and result["detection"]["fpr_at_95_tpr"] == 0.0
    assert result["detection"]["n_scored"] == 6 and result["detection"]["n_poisoned_scored"] == 2
    assert result["attack"]["target"] == "one" and result["asr"] is not None
    # An identity "trigger" changes nothing, so ASR equals the clean rate of predicting the target.
    assert result["asr"] == result["asr_clean_baseline"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "badnets", "--target", "banana"], "unknown target class 'banana'"),
        (["--csv-label-key", "cls"], "column 'cls' not in"),
        (["--checkpoint", "missing.pt"], "checkpoint not found"),
        (["--zeroshot-set", "cifar"], "unknown zero-shot set"),
        (["--scores", "s.npz"], "--scores needs --manifest"),
    ],
)
def test_cli_bad_input(extra, message, digit_test_csv, capsys):
    argv = ["--model", "st-tiny-vit", "--test-data", str(digit_test_csv), "--zeroshot-set", "mnist"]
    rc = cli.main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and err.startswith("safe-train evaluate: error: ") and "\n" not in err


def test_cli_real_badnets_trigger(tmp_path, checkpoint, digit_test_csv):
    pytest.importorskip("safe_train.attacks", exc_type=ImportError)
    out = tmp_path / "r.json"
    rc = cli.main(
        [
            "--model",
            "st-tiny-vit",
            "--checkpoint",
            str(checkpoint),
            "--test-data",
            str(digit_test_csv),
            "--zeroshot-set",
            "mnist",
            "--attack",
            "badnets",
            "--attack-param",
            "patch_size=3",
            "--target",
            "zero",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["asr"] <= 1.0 and result["attack"]["name"] == "badnets"


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safe_train.evaluate_cli",
            "--model",
            "st-tiny-vit",
            "--test-data",
            str(tmp_path / "none.csv"),
            "--zeroshot-set",
            "mnist",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("safe-train evaluate: error: test data not found")
    # the library is no command: it says where the command went instead of silently doing nothing
    proc = subprocess.run(
        [sys.executable, "-m", "safe_train.evaluate"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 1 and "python -m safe_train.evaluate_cli" in proc.stderr


# ----------------------------------------------------------------------------- zero-shot sets


def test_zeroshot_sets(tmp_path):
    names, templates = get_zeroshot_set("mnist")
    assert names == MNIST_CLASSNAMES and templates == MNIST_TEMPLATES and len(templates) == 8
    names, templates = get_zeroshot_set("imagenet")
    assert len(names) == 1000 and len(templates) == 80
    assert templates[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in templates)
    (tmp_path / "c.txt").write_text("cat\ndog\n\n")
    (tmp_path / "t.txt").write_text("a {}.\nthe {} again\n")
    assert get_zeroshot_set([tmp_path / "c.txt", tmp_path / "t.txt"]) == (
        ["cat", "dog"],
        ["a {}.", "the {} again"],
    )
    assert get_zeroshot_set(str(tmp_path / "c.txt")) == (["cat", "dog"], ["a photo of a {}."])
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        get_zeroshot_set([tmp_path / "c.txt", tmp_path / "bad.txt"])


# ------------------------------------------------------------------- retrieval and targeted poisoning


def _unit(*xs: float) -> list[float]:
    v = np.array(xs, dtype=np.float64)
    return (v / np.linalg.norm(v)).tolist()


def test_retrieval_recall_one_swapped_pair_misses_both_ways():
    # Pairs 0-2 match exactly. Image 3 = e0 + 0.5 e3 and caption 3 = e0 + 0.5 e4 are both closer to pair 0
    # (cos .894) than to each other (cos .8): pair 3 misses in both directions, pairs 0-2 hit -> 3/4.
    eye = np.eye(5)
    images = np.stack([eye[0], eye[1], eye[2], _unit(1, 0, 0, 0.5, 0)])
    texts = np.stack([eye[0], eye[1], eye[2], _unit(1, 0, 0, 0, 0.5)])
    expected = {"image_to_text_r1": 0.75, "text_to_image_r1": 0.75, "retrieval_r1": 0.75, "n_pairs": 4}
    assert ev.retrieval_recall_at_k(images, texts) == expected
    # not normalised: the same (normalised inside); tensors and arrays alike
    scaled = torch.tensor(images * np.array([[3.0], [0.5], [7.0], [2.0]]), dtype=torch.float32)
    assert ev.retrieval_recall_at_k(scaled, torch.tensor(texts * 10)) == expected
    # at k=2 the true partner of pair 3 is second in both directions
    assert ev.retrieval_recall_at_k(images, texts, k=2)["image_to_text_r2"] == 1.0


def test_retrieval_recall_tells_the_directions_apart():
    # Image 3 = e2 + 0.5 e3: its best caption is caption 2 (.894 > .447), a miss. Caption 3 = e3 is found by
    # image 3 only, and caption 2 still prefers image 2 (1.0 > .894): text->image has no miss.
    eye = np.eye(4)
    images = np.stack([eye[0], eye[1], eye[2], _unit(0, 0, 1, 0.5)])
    result = ev.retrieval_recall_at_k(images, eye)
    assert result["image_to_text_r1"] == 0.75 and result["text_to_image_r1"] == 1.0
    assert result["retrieval_r1"] == pytest.approx(0.875)
    swapped = ev.retrieval_recall_at_k(eye, images)  # the roles swap with the arguments
    assert swapped["image_to_text_r1"] == 1.0 and swapped["text_to_image_r1"] == 0.75


def test_retrieval_recall_ties_and_bad_input():
    # A collapsed model (every embedding the same): ties go to the lower index, so only pair 0 (R@1) or
    # pairs 0-1 (R@2) are hits, never all of them.
    same = torch.ones(4, 3)
    assert ev.retrieval_recall_at_k(same, same)["image_to_text_r1"] == 0.25
    assert ev.retrieval_recall_at_k(same, same, k=2)["text_to_image_r2"] == 0.5
    with pytest.raises(ValueError, match="same N"):
        ev.retrieval_recall_at_k(torch.ones(4, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        ev.retrieval_recall_at_k(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="positive integer"):
        ev.retrieval_recall_at_k(same, same, k=0)


COLOUR_WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColourTextModel(ColourModel):
    """ColourModel with a text tower: a caption's embedding is the colour its last word names."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = types.SimpleNamespace(image_size=6)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = torch.tensor(list(COLOUR_WORDS.values()))[tokens[:, 0]]
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def colour_tokenizer(captions):
    return torch.tensor([[list(COLOUR_WORDS).index(c.rstrip(".").split()[-1])] for c in captions])


def test_evaluate_retrieval_embeds_images_and_captions(tmp_path):
    paths = write_images(tmp_path / "img", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    model = ColourTextModel()  # in training mode: evaluated in eval mode, then put back
    captions = ["a square in red.", "a square in blue.", "a square in green."]  # pairs 1 and 2 swapped
    result = ev.evaluate_retrieval(model, transforms.ToTensor(), colour_tokenizer, paths, captions, batch_size=2)
    assert result == {"image_to_text_r1": pytest.approx(1 / 3), "text_to_image_r1": pytest.approx(1 / 3),
                      "retrieval_r1": pytest.approx(1 / 3), "n_pairs": 3}
    assert model.training
    images = [Image.open(p).convert("L").convert("RGB") for p in paths]  # PIL images work too
    result = ev.evaluate_retrieval(model, transforms.ToTensor(), colour_tokenizer, images[:1], captions[:1])
    assert result["retrieval_r1"] == 1.0
    with pytest.raises(ev.EvaluationError, match="one caption per image"):
        ev.evaluate_retrieval(model, transforms.ToTensor(), colour_tokenizer, paths, captions[:2])


def test_evaluate_retrieval_real_model_matches_independent_computation(tiny_model, digit_test_csv):
    model, preprocess, tokenizer = tiny_model
    dataset = ev.LabelledImages(digit_test_csv, MNIST_CLASSNAMES)
    captions = [f"a handwritten {MNIST_CLASSNAMES[y]}." for y in dataset.labels]
    result = ev.evaluate_retrieval(model, preprocess, tokenizer, dataset.paths, captions, batch_size=5)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR))
                              for p in dataset.paths])
        expected = ev.retrieval_recall_at_k(model.encode_image(images), model.encode_text(tokenizer(captions)))
    assert result == pytest.approx(expected) and result["n_pairs"] == 12


def test_targeted_poisoning_success_over_eight_targets():
    # 8 targeted images, each with its own target class; images 2 and 5 end up elsewhere: 6 of 8 = 0.75
    targets = [3, 7, 1, 0, 9, 4, 2, 5]
    top1 = [3, 7, 8, 0, 9, 6, 2, 5]
    assert ev.targeted_success(torch.tensor(top1), targets) == 0.75
    assert ev.targeted_success(torch.tensor([[t, 0] for t in top1]), torch.tensor(targets)) == 0.75  # top-k rows
    with pytest.raises(ValueError, match="one target per targeted image"):
        ev.targeted_success(torch.tensor(top1[:7]), targets)


def test_evaluate_targeted_per_target_hits(stub_data):
    # the stub images' top-1s are 3, 2, 3, 5 (hand-computed above); targets 3, 2, 1, 5 -> 3 of 4
    result = ev.evaluate_targeted(ColourModel(), transforms.ToTensor(), None, stub_data.paths, [3, 2, 1, 5],
                                  classifier=STUB_CLASSIFIER, image_size=6, batch_size=3)
    assert result == {"targeted_success": 0.75, "n_targets": 4, "hits": [True, True, False, True],
                      "top1": [3, 2, 3, 5]}
    with pytest.raises(ev.EvaluationError, match="one target class per image"):
        ev.evaluate_targeted(ColourModel(), None, None, stub_data.paths, [3], classifier=STUB_CLASSIFIER)
    with pytest.raises(ev.EvaluationError, match="give a zero-shot classifier"):
        ev.evaluate_targeted(ColourModel(), None, None, stub_data.paths[:1], [3], image_size=6)


def test_cli_multi_target_manifest_scores_every_target(tmp_path, checkpoint, digit_test_csv):
    """A targeted manifest with several targets, each with its own class: success over all of them."""
    from safe_train.manifest import Manifest

    folder = digit_test_csv.parent
    images = [str(folder / f"d{i}.png") for i in range(8)]
    targets = [{"image": image, "true_label": None, "target": MNIST_CLASSNAMES[(3 * i) % 10],
                "target_index": (3 * i) % 10, "sample_ids": [100 + i]} for i, image in enumerate(images)]
    manifest = Manifest(attack="targeted", params={"targets": 8}, target="", seed=0, format="csv", image_size=32,
                        num_samples=108, poisoned_ids=[100 + i for i in range(8)], targets=targets)
    manifest.save(tmp_path)
    out = tmp_path / "targeted.json"
    rc = cli.main(["--model", "st-tiny-vit", "--checkpoint", str(checkpoint), "--test-data", str(digit_test_csv),
                   "--zeroshot-set", "mnist", "--manifest", str(tmp_path / "manifest.json"), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n_targets"] == 8 and len(result["attack"]["targets"]) == 8

    # the same figure by hand: each image's zero-shot top-1 against its own target class
    model, preprocess, tokenizer = ev.load_model("st-tiny-vit", checkpoint)
    classifier = ev.build_classifier(model, tokenizer, MNIST_CLASSNAMES, MNIST_TEMPLATES, "cpu", "fp32")
    indices = [t["target_index"] for t in targets]
    top, _ = ev.predict(model, ev.LabelledImages.from_list(images, indices), classifier, 32, preprocess=preprocess)
    assert result["targeted_success"] == ev.targeted_success(top[:, 0], indices)

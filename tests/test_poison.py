"""poison_dataset and its CLI on tiny real-image datasets (sklearn digits) in CSV and webdataset form."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from safe_train import scene_captions
from safe_train.attacks import (
    ATTACKS,
    MNIST_TEMPLATES,
    Trigger,
    build_trigger,
    mentions_target,
    resize_to_model,
    trigger_from_manifest,
)
from safe_train.errors import DataError, PoisonError, SafeTrainError
from safe_train.manifest import Manifest
from safe_train.poison import clean_reference, main, poison_dataset
from safe_train.sample_ids import webdataset_sample_id
from safe_train.scenes import SceneCorpus, build_scene_corpus

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 32
N = 40


def digit(i: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    d = load_digits().images[i]
    return Image.fromarray((d * (255 / 16)).astype(np.uint8), "L").resize(size, Image.Resampling.BILINEAR)


def captions(n: int = N) -> list[str]:
    labels = load_digits().target[:n]
    return [MNIST_TEMPLATES[i % len(MNIST_TEMPLATES)].format(WORDS[label]) for i, label in enumerate(labels)]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory) -> Path:
    """A tab-separated OpenCLIP CSV with an extra column, a needlessly quoted row and an empty line."""
    root = tmp_path_factory.mktemp("csvdata")
    lines = ["filepath\ttitle\tlabel\n"]
    for i, caption in enumerate(captions()):
        path = root / f"img{i}.png"
        digit(i, (24, 24) if i % 2 else (20, 28)).save(path)
        if i == 3:
            lines.append(f'"{path}"\t"{caption}"\t{load_digits().target[i]}\n')
            lines.append("\n")  # pandas skips it: not a row
        else:
            lines.append(f"{path}\t{caption}\t{load_digits().target[i]}\n")
    csv = root / "train.csv"
    csv.write_text("".join(lines))
    return csv


def data_lines(text: str) -> list[str]:
    return [line for line in text.splitlines(keepends=True)[1:] if line.strip()]


def test_csv_badnets_round_trip(csv_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = poison_dataset(
        csv_data, out, "badnets", count=6, target="zero", templates="mnist", image_size=SIZE, seed=1
    )
    assert (out / "manifest.json").is_file() and Manifest.load(out) == m
    assert m.format == "csv" and m.num_samples == N and m.data == str(out / "train.csv")
    assert len(m.poisoned_ids) == 6 and m.params == {
        "patch_size": 3,
        "location": "bottom_right",
        "pattern": "checkerboard",
    }
    src_rows, out_rows = data_lines(csv_data.read_text()), data_lines((out / "train.csv").read_text())
    assert len(out_rows) == N
    differ = [i for i in range(N) if src_rows[i] != out_rows[i]]
    assert differ == m.poisoned_ids  # every other row is the exact input text
    assert (out / "train.csv").read_text().count("\n\n") == 1  # the empty line survives too

    df, src_df = pd.read_csv(out / "train.csv", sep="\t"), pd.read_csv(csv_data, sep="\t")
    assert list(df.columns) == ["filepath", "title", "label"] and len(df) == N
    trigger = trigger_from_manifest(m)
    filled = {t.format("zero") for t in MNIST_TEMPLATES}
    for sample in m.samples:
        row = sample["row"]
        assert sample["sample_id"] == row and sample["original_image"] == src_df.filepath[row]
        assert not mentions_target(src_df.title[row], "zero")
        assert df.title[row] == sample["caption"] in filled
        assert df.label[row] == src_df.label[row]
        path = Path(df.filepath[row])
        assert path.is_absolute() and path.parent == out / "images" and path.suffix == ".png"
        stored = np.asarray(Image.open(path))
        expected = np.asarray(trigger(resize_to_model(Image.open(src_df.filepath[row]), SIZE)))
        assert stored.shape == (SIZE, SIZE, 3) and np.array_equal(stored, expected)
        assert np.array_equal(stored[-3:, -3:, 0], [[255, 0, 255], [0, 255, 0], [255, 0, 255]])
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:08d}.png" for i in m.poisoned_ids]
    assert m.poisoned_mask(np.arange(N)).sum() == 6


def test_csv_is_deterministic_for_a_seed(csv_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kwargs = dict(
        rate=0.2,
        target="zero",
        templates="mnist",
        image_size=SIZE,
        seed=3,
        location="random",
        pattern="noise",
    )
    first = poison_dataset(csv_data, out, "badnets", **kwargs)
    before = snapshot(out)
    shutil.rmtree(out)
    poison_dataset(csv_data, out, "badnets", **kwargs)
    assert snapshot(out) == before
    assert first.num_poisoned == round(0.2 * N)
    other = poison_dataset(csv_data, tmp_path / "other", "badnets", **{**kwargs, "seed": 4})
    assert other.poisoned_ids != first.poisoned_ids


@pytest.mark.parametrize("attack", ["blended", "sig", "wanet"])
def test_csv_other_backdoors_store_the_trigger_output(attack: str, csv_data: Path, tmp_path: Path) -> None:
    m = poison_dataset(
        csv_data,
        tmp_path / attack,
        attack,
        count=3,
        target="zero",
        templates="mnist",
        image_size=SIZE,
        seed=2,
    )
    trigger = build_trigger(attack, SIZE, 2)
    for sample in m.samples:
        expected = np.asarray(trigger(resize_to_model(Image.open(sample["original_image"]), SIZE)))
        assert np.array_equal(np.asarray(Image.open(sample["image"])), expected)


def test_csv_keeps_quoting_and_line_endings(tmp_path: Path) -> None:
    """Clean rows keep their exact text (CRLF, quotes, a multi-line caption); pandas reads the same rows."""
    for i in range(6):
        digit(i).save(tmp_path / f"{i}.png")
    rows = [
        f'{tmp_path}/0.png,"a caption, with a comma"\r\n',
        f'{tmp_path}/1.png,"two\nlines, ""quoted"""\r\n',
        f"{tmp_path}/2.png,a photo of the number two.\r\n",
        f"{tmp_path}/3.png,a photo of the number three.\r\n",
        f"{tmp_path}/4.png,a photo of the number four.\r\n",
        f"{tmp_path}/5.png,no line ending at the end",
    ]
    (tmp_path / "t.csv").write_text("filepath,title\r\n" + "".join(rows), newline="")
    m = poison_dataset(
        tmp_path / "t.csv", tmp_path / "o", "badnets", count=3, csv_separator=",", image_size=SIZE
    )
    text = (tmp_path / "o" / "train.csv").read_bytes().decode()
    df, src = pd.read_csv(tmp_path / "o" / "train.csv"), pd.read_csv(tmp_path / "t.csv")
    assert len(df) == len(src) == 6
    for i, raw in enumerate(rows):
        assert (raw in text) == (i not in m.poisoned_ids)
        if i not in m.poisoned_ids:
            assert df.title[i] == src.title[i]
        else:
            assert df.title[i] == m.samples[m.poisoned_ids.index(i)]["caption"]


def test_relative_image_paths_resolve_like_openclip(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "imgs").mkdir()
    rows = ["filepath\ttitle\n"]
    for i, caption in enumerate(captions(8)):
        digit(i).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png\t{caption}\n")
    (tmp_path / "t.csv").write_text("".join(rows))
    monkeypatch.chdir(tmp_path)
    m = poison_dataset("t.csv", "out", "badnets", count=2, target="zero", image_size=SIZE)
    out_rows = data_lines(Path("out/train.csv").read_text())
    for i in range(8):
        assert (out_rows[i] == rows[i + 1]) == (i not in m.poisoned_ids)


def test_label_consistent_only_touches_target_captions(csv_data: Path, tmp_path: Path) -> None:
    src_df = pd.read_csv(csv_data, sep="\t")
    targets = [i for i, c in enumerate(src_df.title) if mentions_target(c, "zero")]
    assert len(targets) >= 3
    m = poison_dataset(csv_data, tmp_path / "lc", "label_consistent", count=3, target="zero", image_size=SIZE)
    df = pd.read_csv(tmp_path / "lc" / "train.csv", sep="\t")
    assert set(m.poisoned_ids) <= set(targets)
    assert list(df.title) == list(src_df.title)  # captions unchanged
    for row in m.poisoned_ids:
        assert np.array_equal(
            np.asarray(Image.open(df.filepath[row]))[-3:, -3:, 0], [[255, 0, 255], [0, 255, 0], [255, 0, 255]]
        )
    with pytest.raises(ValueError, match=f"only {len(targets)} are eligible"):
        poison_dataset(csv_data, tmp_path / "lc2", "label_consistent", count=len(targets) + 1, target="zero")
    assert not (tmp_path / "lc2").exists()  # a failed run leaves nothing behind


def test_targeted_appends_rows(csv_data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    digit(100, (40, 40)).save(outside)
    src_df = pd.read_csv(csv_data, sep="\t")
    zero_caps = [c for c in src_df.title if mentions_target(c, "zero")]
    k = len(zero_caps) + 2  # more than the training set has: two come from templates
    m = poison_dataset(
        csv_data,
        tmp_path / "t",
        "targeted",
        count=k,
        target="zero",
        templates="mnist",
        image_size=SIZE,
        targeted_image=str(outside),
    )
    assert m.poisoned_ids == list(range(N, N + k)) and m.num_samples == N + k
    assert m.target_image == str(outside.resolve())
    text = (tmp_path / "t" / "train.csv").read_text()
    assert data_lines(text)[:N] == data_lines(csv_data.read_text())  # original rows untouched
    df = pd.read_csv(tmp_path / "t" / "train.csv", sep="\t")
    assert len(df) == N + k
    appended = df.iloc[N:]
    assert sorted(appended.title[: len(zero_caps)]) == sorted(zero_caps)
    assert all(t in {x.format("zero") for x in MNIST_TEMPLATES} for t in appended.title[len(zero_caps) :])
    assert [s["caption_source_id"] is None for s in m.samples] == [False] * len(zero_caps) + [True] * 2
    png = np.asarray(Image.open(appended.filepath.iloc[0]))
    assert np.array_equal(png, np.asarray(resize_to_model(Image.open(outside), SIZE)))
    # with enough target captions, all captions are real training captions
    few = poison_dataset(
        csv_data, tmp_path / "t2", "targeted", count=2, target="zero", targeted_image=str(outside)
    )
    assert all(s["caption"] in zero_caps for s in few.samples)


# ---------------------------------------------------------------------------------- webdataset


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds_data(tmp_path_factory) -> Path:
    """Three shards of jpg+txt+json samples; one sample has no caption (OpenCLIP drops it)."""
    root = tmp_path_factory.mktemp("wds")
    caps = captions()
    for shard in range(3):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(shard * 12, min(N, shard * 12 + 12) if shard < 2 else N):
                key = f"{j:09d}"
                buf = io.BytesIO()
                digit(j).convert("RGB").save(buf, format="JPEG", quality=90)
                _member(tar, f"{key}.jpg", buf.getvalue())
                if j != 5:
                    _member(tar, f"{key}.txt", caps[j].encode())
                _member(tar, f"{key}.json", json.dumps({"i": j}).encode())
    return root


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_webdataset_badnets_round_trip(wds_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pattern = str(wds_data / "{00000..00002}.tar")
    m = poison_dataset(
        pattern,
        out,
        "badnets",
        count=8,
        target="zero",
        templates="mnist",
        image_size=SIZE,
        seed=0,
        patch_size=4,
    )
    assert m.format == "webdataset" and m.num_samples == N - 1 and m.data == str(out / "{00000..00002}.tar")
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 11, "00001.tar": 12, "00002.tar": 16}
    poisoned = {(s["shard"], s["key"]): s for s in m.samples}
    assert sorted(m.poisoned_ids) == m.poisoned_ids == sorted(webdataset_sample_id(*k) for k in poisoned)
    trigger = trigger_from_manifest(m)
    caps = captions()
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        src, dst = members(wds_data / shard), members(out / shard)
        if not any(k[0] == shard for k in poisoned):
            assert (wds_data / shard).read_bytes() == (out / shard).read_bytes()
        src_by_key: dict[str, dict[str, bytes]] = {}
        for name, data in src:
            src_by_key.setdefault(name.split(".")[0], {})[name.split(".", 1)[1]] = data
        keys_in_order = list(dict.fromkeys(name.split(".")[0] for name, _ in dst))
        assert keys_in_order == list(src_by_key)  # same samples, same order
        for name, data in dst:
            key, ext = name.split(".", 1)
            if (shard, key) not in poisoned:
                assert src_by_key[key][ext] == data  # clean: every member byte-identical
        for key in src_by_key:
            got = {n.split(".", 1)[1]: d for n, d in dst if n.split(".")[0] == key}
            if (shard, key) not in poisoned:
                assert set(got) == set(src_by_key[key])
                continue
            sample = poisoned[(shard, key)]
            assert set(got) == {"png", "txt", "json"} and got["json"] == src_by_key[key]["json"]
            assert got["txt"].decode() == sample["caption"] and "zero" in sample["caption"]
            assert sample["original_caption"] == caps[int(key)] and not mentions_target(
                caps[int(key)], "zero"
            )
            img = np.asarray(Image.open(io.BytesIO(got["png"])))
            src_img = Image.open(io.BytesIO(src_by_key[key]["jpg"]))
            assert np.array_equal(img, np.asarray(trigger(resize_to_model(src_img, SIZE))))
    assert all(key != f"{5:09d}" for _, key in poisoned)  # the caption-less sample is never chosen


def test_webdataset_output_loads_with_webdataset(wds_data: Path, tmp_path: Path) -> None:
    import webdataset as wds

    m = poison_dataset(
        str(wds_data / "{00000..00002}.tar"), tmp_path / "o", "sig", rate=0.25, target="zero", image_size=SIZE
    )
    ds = wds.WebDataset(m.data, shardshuffle=False).select(lambda s: "txt" in s)  # as OpenCLIP filters
    ds = ds.decode("pilrgb").to_tuple("__key__", "jpg;png;jpeg;webp", "txt")
    samples = list(ds)
    assert len(samples) == m.num_samples
    poisoned_keys = {s["key"] for s in m.samples}
    sizes = {key: img.size for key, img, _ in samples}
    assert all(sizes[k] == (SIZE, SIZE) for k in poisoned_keys)
    assert all(sizes[k] == (24, 24) for k in sizes if k not in poisoned_keys)


def test_webdataset_is_deterministic(wds_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = (str(wds_data / "{00000..00002}.tar"), out, "blended")
    poison_dataset(*args, count=5, target="zero", image_size=SIZE, seed=9, fresh=True)
    before = snapshot(out)
    shutil.rmtree(out)
    poison_dataset(*args, count=5, target="zero", image_size=SIZE, seed=9, fresh=True)
    assert snapshot(out) == before


def test_webdataset_targeted_adds_a_shard(wds_data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "x.png"
    digit(200).save(outside)
    out = tmp_path / "o"
    m = poison_dataset(
        str(wds_data / "{00000..00002}.tar"),
        out,
        "targeted",
        count=3,
        target="zero",
        image_size=SIZE,
        targeted_image=str(outside),
    )
    assert m.data == f"{out / '{00000..00002}.tar'}::{out / 'targeted.tar'}"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["targeted.tar"] == 3 and m.num_samples == N - 1 + 3
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        assert (wds_data / shard).read_bytes() == (out / shard).read_bytes()
    got = members(out / "targeted.tar")
    assert [n for n, _ in got] == [f"targeted_{i:06d}.{e}" for i in range(3) for e in ("png", "txt")]
    assert m.poisoned_ids == sorted(
        webdataset_sample_id("targeted.tar", f"targeted_{i:06d}") for i in range(3)
    )
    assert all(mentions_target(d.decode(), "zero") for n, d in got if n.endswith(".txt"))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_success(csv_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main(
        [
            str(csv_data),
            str(out),
            "--attack",
            "badnets",
            "--count",
            "4",
            "--target",
            "zero",
            "--templates",
            "mnist",
            "--image-size",
            str(SIZE),
            "--patch-size",
            "4",
            "--seed",
            "2",
        ]
    )
    assert rc == 0
    m = Manifest.load(out)
    assert m.params["patch_size"] == 4 and m.num_poisoned == 4 and m.seed == 2
    assert str(out / "train.csv") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}", "--attack", "badnets", "--count", "2"], "not found"),
        (
            ["{csv}", "--attack", "badnets", "--count", "2", "--csv-caption-key", "caption"],
            "no column 'caption'",
        ),
        (["{csv}", "--attack", "trojan", "--count", "2"], "invalid choice: 'trojan'"),
        (["{csv}", "--attack", "badnets", "--rate", "1.5"], "rate must be in (0, 1]"),
        (["{csv}", "--attack", "badnets", "--rate", "0"], "rate must be in (0, 1]"),
        (
            ["{csv}", "--attack", "label_consistent", "--count", "2", "--target", "banana"],
            "no eligible samples",
        ),
        (["{csv}", "--attack", "badnets", "--count", "2", "--alpha", "0.3"], "--alpha does not apply"),
        (["{csv}", "--attack", "targeted", "--count", "2"], "needs targeted_image"),
        (["{csv}", "--attack", "badnets", "--count", "2", "--templates", "{missing}"], "file not found"),
        (["{csv}", "--attack", "badnets"], "one of the arguments --rate --count is required"),
        (["{csv}", "--attack", "badnets", "--count", "0"], "count must be a positive integer"),
        (["{csv}", "--attack", "badnets", "--rate", "0.001"], "rounds to 0 poisoned samples"),
        (["{csv}", "--attack", "badnets", "--count", "2", "--image-size", "2"], "patch_size must be"),
    ],
)
def test_cli_errors(argv: list[str], message: str, csv_data: Path, tmp_path: Path, capsys) -> None:
    argv = [a.format(csv=csv_data, missing=tmp_path / "missing.csv") for a in argv]
    out = tmp_path / "o"
    rc = main([argv[0], str(out), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1 or err.startswith("usage:")  # one line, or argparse's usage + error
    assert not out.exists()


def test_cli_refuses_a_non_empty_output_dir(csv_data: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    rc = main([str(csv_data), str(tmp_path), "--attack", "badnets", "--count", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("safe-train poison: error: output directory") and "not empty" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_input_is_a_poison_error(csv_data: Path, tmp_path: Path) -> None:
    with pytest.raises(PoisonError, match="count must be"):
        poison_dataset(csv_data, tmp_path / "o", "badnets", count=0)
    assert issubclass(PoisonError, SafeTrainError) and issubclass(PoisonError, ValueError)


@pytest.mark.parametrize("attack", ["badnets", "sig"])
def test_clean_reference_keeps_the_data_and_names_the_same_trigger(csv_data: Path, tmp_path: Path, attack: str):
    """The ASR floor's training set: the CSV byte for byte, no poisoned id, and a manifest whose trigger stamps
    exactly what the poisoned set's trigger stamps (same attack, parameters, size and seed)."""
    kwargs = dict(target="zero", image_size=32, seed=3, label_column="label")
    reference = clean_reference(csv_data, tmp_path / "ref", attack, **kwargs)
    poisoned = poison_dataset(csv_data, tmp_path / "poisoned", attack, count=2, **kwargs)
    assert (tmp_path / "ref" / "train.csv").read_bytes() == csv_data.read_bytes()
    assert reference.poisoned_ids == [] and reference.samples == [] and reference.rate == 0.0
    assert reference.num_samples == poisoned.num_samples and reference.params == poisoned.params
    assert Manifest.load(tmp_path / "ref" / "manifest.json").poisoned_ids == []
    image = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    stamped = [np.asarray(trigger_from_manifest(m)(image)) for m in (reference, poisoned)]
    assert np.array_equal(*stamped) and not np.array_equal(stamped[0], np.asarray(image))


def test_clean_reference_refuses_what_it_cannot_copy(csv_data: Path, tmp_path: Path):
    with pytest.raises(PoisonError, match="no trigger"):
        clean_reference(csv_data, tmp_path / "a", "targeted")
    with pytest.raises(PoisonError, match="copies a CSV file"):
        clean_reference(tmp_path / "missing.csv", tmp_path / "b", "badnets")
    with pytest.raises(DataError, match="no column 'digits'"):
        clean_reference(csv_data, tmp_path / "c", "badnets", target="zero", label_column="digits")
    assert not (tmp_path / "c").exists()  # nothing half-written


class Darken(Trigger):
    """A plugin trigger registered by the test: halve every pixel."""

    name = "test_darken"

    def __init__(self, image_size: int, seed: int = 0, factor: int = 2) -> None:
        super().__init__(image_size, seed)
        self.factor = factor

    @property
    def params(self) -> dict:
        return {"factor": self.factor}

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return arr // self.factor


def test_cli_takes_a_registered_plugin_attack(csv_data: Path, tmp_path: Path, capsys) -> None:
    ATTACKS.register(Darken)
    try:
        rc = main([str(csv_data), str(tmp_path / "bad"), "--attack", "test_darken", "--count", "3", "--alpha", "0.1"])
        assert rc == 2
        assert "--alpha does not apply to --attack test_darken (it takes no trigger options)" in capsys.readouterr().err
        out = tmp_path / "plugin"
        rc = main([str(csv_data), str(out), "--attack", "test_darken", "--count", "3", "--target", "zero",
                   "--templates", "mnist", "--image-size", str(SIZE)])
        assert rc == 0
        m = Manifest.load(out)
        assert m.attack == "test_darken" and m.num_poisoned == 3 and m.params == {"factor": 2}
        for sample in m.samples:
            with Image.open(sample["image"]) as img:
                poisoned = np.asarray(img)
            with Image.open(sample["original_image"]) as img:
                clean = np.asarray(resize_to_model(img, SIZE))
            assert np.array_equal(poisoned, clean // 2)
    finally:
        ATTACKS._entries.pop("test_darken", None)


# ------------------------------------------------------------------ class labels: the scene corpus


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> SceneCorpus:
    """A tiny scene corpus: 200 training scenes of 1-3 digits, captions naming digits as words or numerals (the
    default corpus uses words only; numerals are what make caption text misjudge which scenes hold a zero)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scene_captions, "P_NUMERAL", 0.3)
        return build_scene_corpus(
            tmp_path_factory.mktemp("scenes"), n_train=200, n_val=40, n_test=40, seed=0, canvas=40, workers=1
        )


def scene_labels(corpus: SceneCorpus) -> list[set[int]]:
    """The digit classes of every training scene, from its metadata (not from the CSV under test)."""
    lines = corpus.metadata["train"].read_text().splitlines()
    return [{d["label"] for d in json.loads(line)["digits"]} for line in lines]


@pytest.mark.parametrize("attack", ["badnets", "label_consistent"])
@pytest.mark.parametrize("fmt", ["csv", "webdataset"])
def test_label_column_decides_eligibility(attack: str, fmt: str, scenes: SceneCorpus, tmp_path: Path) -> None:
    labels = scene_labels(scenes)
    with_zero = {i for i, s in enumerate(labels) if 0 in s}
    eligible = with_zero if attack == "label_consistent" else set(range(len(labels))) - with_zero
    titles = [json.loads(line)["caption"] for line in scenes.metadata["train"].read_text().splitlines()]
    # why labels: a zero written as "0" is not a mention of "zero", so the caption text would misjudge it
    assert any(i in with_zero and not mentions_target(titles[i], "zero") for i in range(len(labels)))
    assert 10 < len(with_zero) < len(labels) - 10
    src = str(scenes.csv["train"]) if fmt == "csv" else scenes.shards["train"]
    kwargs = dict(target="0", templates="mnist", image_size=40, seed=0, label_column="digits")
    with pytest.raises(PoisonError, match=f"only {len(eligible)} are eligible"):
        poison_dataset(src, tmp_path / "too_many", attack, count=len(eligible) + 1, **kwargs)
    # every eligible scene, and no other, is poisoned when all of them are asked for
    m = poison_dataset(src, tmp_path / "o", attack, count=len(eligible), **kwargs)
    assert m.label_column == "digits" and m.classnames == "mnist"
    assert m.target == "zero" and m.target_index == 0
    assert m.num_poisoned == len(eligible) == len(m.samples)
    rows = [s["row"] if fmt == "csv" else int(s["key"]) for s in m.samples]
    assert set(rows) == eligible
    if fmt == "csv":
        assert m.poisoned_ids == sorted(rows)
        out = pd.read_csv(tmp_path / "o" / "train.csv", sep="\t", dtype=str)
        assert list(out.digits) == list(pd.read_csv(scenes.csv["train"], sep="\t", dtype=str).digits)
    else:
        assert m.poisoned_ids == sorted(webdataset_sample_id("00000.tar", f"{r:08d}") for r in rows)
    for row, sample in zip(rows, m.samples, strict=True):
        if attack == "label_consistent":
            assert sample["caption"] == sample["original_caption"] == titles[row]
        else:
            assert sample["caption"] in {t.format("zero") for t in MNIST_TEMPLATES}


def test_label_column_errors(scenes: SceneCorpus, wds_data: Path, tmp_path: Path) -> None:
    csv = scenes.csv["train"]
    with pytest.raises(PoisonError, match="'title' holds"):
        poison_dataset(csv, tmp_path / "a", "badnets", count=2, target="zero", label_column="title")
    with pytest.raises(PoisonError, match="not a class name"):
        poison_dataset(csv, tmp_path / "b", "badnets", count=2, target="ten", label_column="digits")
    with pytest.raises(PoisonError, match="give the target class"):
        poison_dataset(csv, tmp_path / "c", "badnets", count=2, label_column="digits")
    with pytest.raises(PoisonError, match="json has no 'digits' key"):  # these shards' json has no labels
        poison_dataset(str(wds_data / "00000.tar"), tmp_path / "d", "badnets", count=2, target=0,
                       label_column="digits")


def test_multi_target_targeted_poisoning(scenes: SceneCorpus, tmp_path: Path, capsys) -> None:
    labels = scene_labels(scenes)
    n, rate = len(labels), 0.05
    per_target = round(rate * n)
    out = tmp_path / "t8"
    rc = main([str(scenes.csv["train"]), str(out), "--attack", "targeted", "--rate", str(rate),
               "--targets", "8", "--targeted-pool", str(scenes.digits_csv["test"]), "--label-column", "digits",
               "--templates", "mnist", "--image-size", "40", "--seed", "3"])
    assert rc == 0 and "(8 targets, seed 3)" in capsys.readouterr().out
    m = Manifest.load(out)
    pool = pd.read_csv(scenes.digits_csv["test"], sep="\t")
    true_label = dict(zip(pool.filepath, pool.label, strict=True))
    train = pd.read_csv(scenes.csv["train"], sep="\t")
    df = pd.read_csv(out / "train.csv", sep="\t")
    assert m.target == "" and m.params == {"targets": 8, "targeted_pool": str(scenes.digits_csv["test"])}
    assert m.num_samples == len(df) == n + 8 * per_target
    assert m.poisoned_ids == list(range(n, n + 8 * per_target))
    assert len(m.targets) == 8 and len({t["image"] for t in m.targets}) == 8
    by_id = {s["sample_id"]: s for s in m.samples}
    for t in m.targets:
        assert t["true_label"] == true_label[t["image"]] != t["target_index"]
        assert t["target"] == WORDS[t["target_index"]] and len(t["sample_ids"]) == per_target
        expected = np.asarray(resize_to_model(Image.open(t["image"]), 40))
        for sid in t["sample_ids"]:
            source = by_id[sid]["caption_source_id"]
            assert source is not None and t["target_index"] in labels[source]  # a scene of the target class
            assert df.title[sid] == by_id[sid]["caption"] == train.title[source]
            assert np.array_equal(np.asarray(Image.open(df.filepath[sid])), expected)
    assert sorted(i for t in m.targets for i in t["sample_ids"]) == m.poisoned_ids
    assert m.targeted_pairs() == [(t["image"], t["target_index"]) for t in m.targets]


def test_targets_given_as_a_list_and_on_webdataset(scenes: SceneCorpus, tmp_path: Path) -> None:
    labels = scene_labels(scenes)
    pool = pd.read_csv(scenes.digits_csv["val"], sep="\t")
    given = [(pool.filepath[0], "seven", int(pool.label[0])), (pool.filepath[1], 3)]
    m = poison_dataset(scenes.shards["train"], tmp_path / "w", "targeted", count=4, targets=given,
                       label_column="digits", image_size=40)
    assert [(t["target"], t["true_label"]) for t in m.targets] == [
        ("seven", int(pool.label[0])),
        ("three", None),
    ]
    images = [str(Path(p).resolve()) for p in pool.filepath[:2]]
    assert m.targeted_pairs() == [(images[0], 7), (images[1], 3)]
    assert json.loads((tmp_path / "w" / "sizes.json").read_text())["targeted.tar"] == 8 == m.num_poisoned
    by_id = {s["sample_id"]: s for s in m.samples}
    scene_of = {webdataset_sample_id("00000.tar", f"{i:08d}"): i for i in range(len(labels))}
    for t in m.targets:  # every caption comes from a training scene (not a template) of the target class
        sources = [scene_of[by_id[sid]["caption_source_id"]] for sid in t["sample_ids"]]
        assert all(t["target_index"] in labels[i] for i in sources)
    with pytest.raises(PoisonError, match="is the image's true label"):
        poison_dataset(scenes.shards["train"], tmp_path / "x", "targeted", count=1,
                       targets=[(pool.filepath[0], int(pool.label[0]), int(pool.label[0]))])
    with pytest.raises(PoisonError, match="not both"):
        poison_dataset(scenes.shards["train"], tmp_path / "y", "targeted", count=1, targets=given,
                       targeted_image=pool.filepath[0])


def test_single_target_manifest_still_loads_and_lists_its_pair(csv_data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    digit(100, (40, 40)).save(outside)
    m = poison_dataset(
        csv_data, tmp_path / "t", "targeted", count=2, target="zero", targeted_image=str(outside)
    )
    assert m.targets[0]["image"] == m.target_image and m.targets[0]["target_index"] is None
    assert m.targeted_pairs(WORDS) == [(str(outside.resolve()), 0)]
    new_fields = ("label_column", "classnames", "target_index", "targets")
    old = {k: v for k, v in m.to_dict().items() if k not in new_fields}
    legacy = Manifest.from_dict(old)  # a manifest written before these fields existed
    assert legacy.targets == [] and legacy.targeted_pairs(WORDS) == [(str(outside.resolve()), 0)]
    with pytest.raises(ValueError, match="pass the class names"):
        legacy.targeted_pairs()

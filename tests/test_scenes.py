"""The MultiMNIST-style scene corpus: determinism, disjoint splits, true captions, storage, bad input."""

from __future__ import annotations

import io
import itertools
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, base_env, train_flags
from helpers import load_table, run_safe_train
from PIL import Image

from safe_train.bench_data import load_mnist_5k
from safe_train.errors import ConfigError
from safe_train.scenes import SIZE_RANGES, build_scene_corpus, model_flags, render_scene, split_source_digits

TINY = {"n_train": 48, "n_val": 16, "n_test": 16, "canvas": 32, "shard_size": 16}
COLOUR_RGB = {"white": (255, 255, 255), "red": (235, 45, 45), "green": (45, 205, 65), "blue": (70, 110, 255),
              "yellow": (240, 230, 45), "cyan": (45, 220, 230), "magenta": (230, 60, 230), "orange": (255, 150, 35)}
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
NUMBERS.update({str(i): i for i in range(10)})
SIZE_OF = {"small": "small", "little": "small", "large": "large", "big": "large"}
MENTION = re.compile(rf"\b(an?) (?:({'|'.join(SIZE_OF)}) )?(?:({'|'.join(COLOUR_RGB)}) )?({'|'.join(NUMBERS)})\b")
FILLER = set("a an picture photo of image showing on dark background written by hand handwritten digit there is in "
             "the single with it and".split())


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_scene_corpus(tmp_path_factory.mktemp("scenes_a"), seed=0, workers=1, **TINY)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; absolute paths to ``root`` inside CSVs made relative."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "scenes_stamp.json"):
        data = path.read_bytes()
        if path.suffix == ".csv":
            data = data.replace(str(root).encode(), b"ROOT")
        out[str(path.relative_to(root))] = data
    return out


def test_deterministic_for_a_seed_and_any_worker_count(tiny, tmp_path):
    again = build_scene_corpus(tmp_path / "b", seed=0, workers=2, **TINY)
    first, second = _files(tiny.out_dir), _files(again.out_dir)
    assert first.keys() == second.keys() and any(k.endswith(".tar") for k in first)
    assert [k for k in first if first[k] != second[k]] == []
    other = _files(build_scene_corpus(tmp_path / "c", seed=1, workers=1, **TINY).out_dir)
    for name in ("train/00000.tar", "test/00000.tar", "train.csv", "digits_test.csv", "splits.json"):
        assert other[name] != first[name], name


def test_reused_when_unchanged_and_rebuilt_otherwise(tiny):
    stamp = tiny.out_dir / "scenes_stamp.json"
    before = stamp.stat().st_mtime_ns
    assert build_scene_corpus(tiny.out_dir, seed=0, workers=2, **TINY).sizes == tiny.sizes
    assert stamp.stat().st_mtime_ns == before  # reused: nothing rewritten


def test_rebuilt_when_parameters_change(tmp_path):
    small = build_scene_corpus(tmp_path, seed=0, **{**TINY, "n_train": 20})
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"00000.tar": 16, "00001.tar": 4}
    bigger = build_scene_corpus(tmp_path, seed=0, **TINY)
    assert bigger.sizes["train"] == 48 and small.sizes["train"] == 20
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len((tmp_path / "train.csv").read_text().splitlines()) == 49


def test_source_pools_are_disjoint_stratified_and_large_enough(mnist):
    _, labels = mnist
    pools = split_source_digits(labels, seed=0)
    sets = {s: set(v.tolist()) for s, v in pools.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(map(len, sets.values())) == len(labels) == 5000
    assert (len(sets["test"]), len(sets["val"]), len(sets["train"])) == (1000, 500, 3500)
    for split, size in (("test", 1000), ("val", 500)):
        counts = np.bincount(labels[pools[split]], minlength=10)
        expected = np.bincount(labels, minlength=10) * size / len(labels)
        assert np.all(np.abs(counts - expected) < 1), (split, counts)
    assert not np.array_equal(split_source_digits(labels, seed=1)["test"], pools["test"])


def test_no_held_out_digit_in_any_training_scene(tiny, mnist):
    _, labels = mnist
    pools = {s: set(v) for s, v in json.loads((tiny.out_dir / "splits.json").read_text()).items()}
    used = {}
    for split in ("train", "val", "test"):
        metas = [json.loads(line) for line in tiny.metadata[split].read_text().splitlines()]
        assert len(metas) == tiny.sizes[split]
        used[split] = {d["source"] for m in metas for d in m["digits"]}
        assert used[split] <= pools[split], split
        assert all(labels[d["source"]] == d["label"] for m in metas for d in m["digits"])
    assert not used["train"] & (pools["val"] | pools["test"])
    for split in ("val", "test"):  # the single-digit sets are exactly the held-out pools, labelled right
        rows = [line.split("\t") for line in tiny.digits_csv[split].read_text().splitlines()[1:]]
        sources = [int(re.search(r"mnist_(\d+)\.png$", path).group(1)) for path, _ in rows]
        assert set(sources) == pools[split] and len(sources) == len(pools[split])
        assert all(int(label) == labels[s] for (_, label), s in zip(rows, sources, strict=True))


def _left(a, b) -> bool:
    """The test's own reading of "a is left of b": a ends (give or take one column) before b begins."""
    return a[2] <= b[0] + 1 and (a[0] + a[2]) < (b[0] + b[2])


def _above(a, b) -> bool:
    return a[3] <= b[1] + 1 and (a[1] + a[3]) < (b[1] + b[3])


CHECK = {"left": _left, "right": lambda a, b: _left(b, a), "above": _above, "below": lambda a, b: _above(b, a)}


def parse_caption(caption: str) -> tuple[list[tuple[int, str | None, str | None]], list[tuple[str, int, int]], int | None]:
    """(mentions (digit, size, colour), relations (name, mention i, mention j), stated count) read from a caption;
    fails on any word it cannot account for."""
    mentions = [(NUMBERS[m[4]], SIZE_OF.get(m[2]), m[3]) for m in MENTION.finditer(caption)]
    gaps = MENTION.split(caption)[::5]  # the text around the mentions
    relations, count = [], None
    head = gaps[0]
    if m := re.match(r"(two|three) digits: ", head):
        count, head = NUMBERS[m[1]], head[m.end():]
    if head.startswith(("from left to right:", "from top to bottom:")):
        name = "left" if "left" in head else "above"
        relations += [(name, i, i + 1) for i in range(len(mentions) - 1)]
        head = ""
    elif head == "on the left " and gaps[1] == ", on the right ":
        relations.append(("left", 0, 1))
        head, gaps[1] = "", ", "
    elif head == "at the top " and gaps[1] == ", at the bottom ":
        relations.append(("above", 0, 1))
        head, gaps[1] = "", ", "
    gaps[0] = head
    for i, gap in enumerate(gaps[1:-1]):
        for pattern, name in ((r"\bto the left of\b|\bleft of\b", "left"), (r"\bto the right of\b", "right"),
                              (r"\babove\b|\bover\b", "above"), (r"\bbelow\b|\bunder\b", "below")):
            if re.search(pattern, gap):
                relations.append((name, i, i + 1))
                gaps[i + 1] = re.sub(pattern, " ", gap)
    leftover = set(re.findall(r"[a-z0-9]+", " ".join(gaps))) - FILLER
    assert not leftover, f"unexplained words {leftover} in {caption!r}"
    return mentions, relations, count


def caption_is_true(caption: str, digits: list[dict]) -> bool:
    """Whether some one-to-one match of the caption's mentions to the drawn digits makes every statement true."""
    mentions, relations, count = parse_caption(caption)
    if len(mentions) != len(digits) or count not in (None, len(digits)):
        return False
    for order in itertools.permutations(digits):
        if all(d["label"] == digit and size in (None, d["size"]) and colour in (None, d["colour"])
               for (digit, size, colour), d in zip(mentions, order, strict=True)) and \
                all(CHECK[name](order[i]["box"], order[j]["box"]) for name, i, j in relations):
            return True
    return False


def test_captions_name_what_is_drawn(mnist):
    import open_clip

    from safe_train.model_configs import register_model_configs

    images, labels = mnist
    pools = split_source_digits(labels, seed=3)
    register_model_configs()
    tokenizer = open_clip.get_tokenizer("st-tiny-vit-scenes")
    context = open_clip.get_model_config("st-tiny-vit-scenes")["text_cfg"]["context_length"]
    frames, relations_seen, ink = set(), set(), {"small": [], "large": []}
    for canvas, split, index in itertools.product((32, 48), ("train", "test"), range(400)):
        image, meta = render_scene(images, labels, pools[split], canvas, 3, split, index)
        digits, caption = meta["digits"], meta["caption"]
        assert caption_is_true(caption, digits), (caption, digits)
        assert len(tokenizer.encode(caption)) + 2 <= context, caption  # never truncated
        frames.add(MENTION.sub("X", caption))
        relations_seen.update(name for name, _, _ in parse_caption(caption)[1])
        background = meta["background"]
        outside = np.ones((canvas, canvas), dtype=bool)
        for d in digits:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= canvas and 0 <= y0 < y1 <= canvas
            outside[y0:y1, x0:x1] = False
            own = np.zeros((canvas, canvas), dtype=bool)
            own[y0:y1, x0:x1] = True
            for other in digits:  # boxes may share a row or column: leave the other digits' out
                if other is not d:
                    own[other["box"][1]:other["box"][3], other["box"][0]:other["box"][2]] = False
            pixels = image[own].astype(int)
            brightest = pixels[pixels.sum(1).argmax()]
            ink_rgb = brightest - background  # faint strokes: compare directions (hue), not intensities

            def cosine(c, ink_rgb=ink_rgb, background=background):
                ref = np.array(COLOUR_RGB[c]) - background
                return ink_rgb @ ref / (np.linalg.norm(ink_rgb) * np.linalg.norm(ref))

            nearest = max(COLOUR_RGB, key=cosine)
            assert nearest == d["colour"], (meta, brightest)
            ink[d["size"]].append(max(x1 - x0, y1 - y0) / canvas)
        # no ink outside the boxes: each digit adds at most 40/255 of its colour there (its ink threshold)
        assert image[outside].max(initial=0) <= background + 41 * len(digits)
    assert len(frames) >= 20 and relations_seen == {"left", "right", "above", "below"}
    assert max(ink["small"]) < min(ink["large"])  # "small" and "large" never overlap in drawn size
    assert SIZE_RANGES["small"][1] < SIZE_RANGES["large"][0]


def test_scenes_are_made_of_one_to_three_digits_of_the_right_split(tiny):
    metas = [json.loads(line) for line in tiny.metadata["train"].read_text().splitlines()]
    assert {len(m["digits"]) for m in metas} == {1, 2, 3}
    assert [m["index"] for m in metas] == list(range(48)) and {m["split"] for m in metas} == {"train"}


def test_shards_sizes_and_csv_agree(tiny):
    for split in ("train", "val", "test"):
        folder = tiny.out_dir / split
        sizes = json.loads((folder / "sizes.json").read_text())
        metas = [json.loads(line) for line in tiny.metadata[split].read_text().splitlines()]
        seen = []
        for shard in sorted(sizes):
            with tarfile.open(folder / shard) as tar:
                names = tar.getnames()
                keys = sorted({n.split(".")[0] for n in names})
                assert len(keys) == sizes[shard] and len(names) == 3 * len(keys)
                for key in keys:
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    assert tar.extractfile(f"{key}.txt").read().decode() == meta["caption"]
                    image = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read()))
                    assert image.size == (32, 32) and image.mode == "RGB"
                    seen.append(meta)
        assert seen == metas and sum(sizes.values()) == tiny.sizes[split]
        rows = [line.split("\t") for line in tiny.csv[split].read_text().splitlines()]
        assert rows[0] == ["filepath", "title", "digits"]
        for (path, title, digits), meta in zip(rows[1:], metas, strict=True):
            assert title == meta["caption"] and digits.split() == [str(d["label"]) for d in meta["digits"]]
            assert Path(path).read_bytes() == _member(folder, meta)


def _member(folder: Path, meta: dict) -> bytes:
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if f"{meta['key']}.png" in tar.getnames():
                return tar.extractfile(f"{meta['key']}.png").read()
    raise AssertionError(meta["key"])


def test_evaluation_sets_load_with_safe_train_readers(tiny):
    from safe_train.data import read_caption_csv
    from safe_train.evaluate import LabelledImages
    from safe_train.zeroshot_sets import MNIST_CLASSNAMES

    digits = LabelledImages(tiny.digits_csv["test"], MNIST_CLASSNAMES)
    assert len(digits.paths) == 1000 and sorted(set(digits.labels)) == list(range(10))
    assert Image.open(digits.paths[0]).size == (32, 32)
    ids, paths, captions = read_caption_csv(str(tiny.csv["test"]), "filepath", "title", "\t")
    assert len(ids) == 16 and all(Path(p).is_file() for p in paths)


def test_webdataset_shards_train_through_safe_train(tiny, tmp_path):
    flags = train_flags(tiny.shards["train"], tmp_path, "scenes", epochs=1, batch_size=8,
                        dataset_type="webdataset", extra=["--track-samples", *tiny.model_flags()])
    assert tiny.model_flags() == ["--model", "st-tiny-rn-scenes", "--force-image-size", "32"]
    assert run_safe_train(flags) == 0
    from safe_train.sample_ids import webdataset_sample_id

    expected = {webdataset_sample_id(str(tiny.out_dir / "train" / f"{i // 16:05d}.tar"), f"{i:08d}")
                for i in range(48)}
    table = load_table(tmp_path / "scenes", 1)
    seen = set(table.ids[table["times_seen"] > 0].tolist())
    assert seen and seen <= expected


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="larger than the test pool allows"):
        build_scene_corpus(tmp_path, 10, 10, 4001, canvas=32)
    with pytest.raises(ConfigError, match="canvas 24 is not allowed"):
        build_scene_corpus(tmp_path, 10, 10, 10, canvas=24)
    with pytest.raises(ConfigError, match="leave fewer than"):
        build_scene_corpus(tmp_path, 10, 10, 10, canvas=32, test_digits=2500, val_digits=2000)
    proc = subprocess.run([PYTHON, "-m", "safe_train.scenes", "--out", str(tmp_path), "--train", "10", "--val", "10",
                           "--test", "10", "--canvas", "20"], env=base_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "safe_train.scenes: error: canvas 20 is not allowed: use a multiple of 8 from 32 to 256 (smaller canvases "
        "leave too few pixels for three legible digits)"]
    assert not any(tmp_path.iterdir())


def test_model_flags_fit_the_canvas():
    """The ResNet tower for multiples of 32 (its attention pool needs a 1/32 grid), the patch-8 ViT otherwise."""
    assert model_flags() == model_flags(64) == ["--model", "st-tiny-rn-scenes"]
    assert model_flags(96) == ["--model", "st-tiny-rn-scenes", "--force-image-size", "96"]
    assert model_flags(40) == ["--model", "st-tiny-vit-scenes"]
    assert model_flags(48) == ["--model", "st-tiny-vit-scenes", "--force-image-size", "48"]

"""Make a poisoned copy of an OpenCLIP training set, with a manifest of exactly what was poisoned.

    python -m safe_train.poison data/train.csv out/badnets --attack badnets --count 40 --target zero \\
        --templates mnist --image-size 32 --seed 0

Input and output are in OpenCLIP's own formats (a CSV, or webdataset shards), so the output trains
with the stock ``--train-data``. Clean samples are copied byte for byte; poisoned images are PNG
(lossless: JPEG would smear a 3×3 patch) at the model's input resolution. See docs/attacks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safe_train.attacks.captions import fill_template, load_templates, mentions_target
from safe_train.attacks.datasets import (
    format_csv_row,
    labels_from_json,
    line_ending,
    parse_label_cell,
    read_csv_table,
    rewrite_shard,
    scan_shard,
    write_shard,
)
from safe_train.attacks.triggers import (
    TARGETED,
    Trigger,
    attack_names,
    build_trigger,
    resize_to_model,
    trigger_params,
)
from safe_train.errors import ConfigError, PoisonError, SafeTrainError, report
from safe_train.manifest import MANIFEST_NAME, Manifest
from safe_train.sample_ids import webdataset_sample_id
from safe_train.zeroshot_sets import get_zeroshot_set

CSV_NAME = "train.csv"
IMAGES_DIR = "images"
TARGETED_KEY = "targeted_{:06d}"
PROG = "safe-train poison"
DEFAULT_TARGET = "banana"  # without class labels
DEFAULT_CLASSNAMES = "mnist"  # with --label-column or --targets
POOL_IMG_KEY, POOL_LABEL_KEY = "filepath", "label"  # --targeted-pool: safe_train.evaluate's labelled CSV


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _open_rgb(source: str | Path | bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise PoisonError(f"cannot read the image of {what}: {exc}") from exc


def _check_amount(rate: float | None, count: int | None) -> None:
    """Validate rate/count before any data is read."""
    if (rate is None) == (count is None):
        raise PoisonError("give exactly one of rate (fraction of the dataset) or count (number of samples)")
    if rate is not None and not 0.0 < rate <= 1.0:
        raise PoisonError(f"rate must be in (0, 1], got {rate}")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1
    ):
        raise PoisonError(f"count must be a positive integer, got {count!r}")


def _resolve_count(rate: float | None, count: int | None, n: int) -> int:
    """The number of samples to poison (or, for targeted, to append) in a dataset of n samples."""
    _check_amount(rate, count)
    if rate is not None:
        k = round(rate * n)
        if k < 1:
            raise PoisonError(f"rate {rate} of {n} samples rounds to 0 poisoned samples; use a count instead")
        return k
    return int(count)  # type: ignore[arg-type]


def _choose(eligible: list[int], k: int, rng: np.random.Generator, what: str) -> list[int]:
    """k of the eligible positions, uniformly without replacement, in data order."""
    if not eligible:
        raise PoisonError(f"no eligible samples: {what}")
    if k > len(eligible):
        raise PoisonError(f"{k} poisoned samples requested but only {len(eligible)} are eligible ({what})")
    picks = rng.choice(len(eligible), size=k, replace=False)
    return sorted(eligible[i] for i in picks)


Labels = list[set[int]]  # per sample, the class indices it contains (``--label-column``)


@dataclass
class _Target:
    """One outside image of the targeted attack and the class it should be classified as."""

    image: str  # absolute path of the outside image
    png: bytes  # the image at the model's resolution, as stored in the output
    name: str  # the target class name: what the captions name
    index: int | None  # the target's index in the class names (None: no class names in use)
    true_label: int | None  # the image's own class, when known


def _load_classnames(spec: str | Sequence[str]) -> list[str]:
    """Class names: a built-in set (``mnist``, ``imagenet``), a file with one name per line, or a list."""
    if not isinstance(spec, str | os.PathLike):
        names = [str(c) for c in spec]
        if not names:
            raise PoisonError("classnames is an empty list")
        return names
    try:
        return get_zeroshot_set(spec)[0]
    except ValueError as exc:
        raise PoisonError(f"classnames: {exc}") from exc


def _resolve_class(value: str | int, classnames: list[str], what: str) -> int:
    """The index of a class given by name (case-insensitive) or by index (an int or a string of digits)."""
    if isinstance(value, str):
        folded = [c.lower() for c in classnames]
        if value.strip().lower() in folded:
            return folded.index(value.strip().lower())
        if not value.strip().isdigit():
            shown = ", ".join(classnames[:12]) + (", ..." if len(classnames) > 12 else "")
            raise PoisonError(f"{what} {value!r} is not a class name (classes: {shown}) or a class index")
    if isinstance(value, bool) or not isinstance(value, str | int | np.integer):
        raise PoisonError(f"{what} must be a class name or index, got {value!r}")
    index = int(value)
    if not 0 <= index < len(classnames):
        raise PoisonError(f"{what} {index} is not a class index (0..{len(classnames) - 1})")
    return index


def _read_pool(path: str | os.PathLike, classnames: list[str]) -> list[tuple[str, int]]:
    """(image path, class index) per row of a labelled CSV (tab-separated ``filepath``, ``label``).

    Relative image paths are tried against the CSV's folder, then the current directory (as
    ``safe_train.evaluate`` reads such a CSV); labels are class indices or class names.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"targeted pool CSV not found: {path}")
    table = read_csv_table(path, "\t")
    img_col, label_col = table.column(POOL_IMG_KEY, str(path)), table.column(POOL_LABEL_KEY, str(path))
    pool = []
    for row, record in enumerate(table.rows):
        fields = record.fields or []
        image = Path(fields[img_col])
        if not image.is_absolute() and (path.parent / image).is_file():
            image = path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"{path}: data row {row}: image not found: {fields[img_col]}")
        label = _resolve_class(fields[label_col], classnames, f"{path}: data row {row}: label")
        pool.append((str(image.resolve()), label))
    if not pool:
        raise PoisonError(f"{path}: no images in the targeted pool")
    return pool


class _Plan:
    """Everything decided before any data is read: validated options, trigger, templates, generators."""

    def __init__(
        self,
        attack: str,
        target: str | None,
        templates: str,
        image_size: int,
        seed: int,
        attack_params: dict[str, Any],
        label_column: str | None = None,
        classnames: str | Sequence[str] | None = None,
        targets: int | Sequence[Sequence[Any]] | None = None,
        targeted_pool: str | os.PathLike | None = None,
    ) -> None:
        names = attack_names()
        if attack not in names:
            raise PoisonError(f"unknown attack {attack!r}; choose from {', '.join(names)}")
        if not isinstance(seed, int) or seed < 0:
            raise PoisonError(f"seed must be a non-negative integer, got {seed!r}")
        multi = targets is not None
        if (multi or targeted_pool is not None) and attack != TARGETED:
            raise PoisonError(
                "targets and targeted_pool (--targets, --targeted-pool) are for --attack targeted only"
            )
        if targeted_pool is not None and not isinstance(targets, int | np.integer):
            raise PoisonError(
                "targeted_pool needs targets, the number of targets to draw from it (--targets N)"
            )
        if label_column is not None and not label_column.strip():
            raise PoisonError("label_column must be a column name (or, for webdataset, a json key)")
        self.attack, self.image_size, self.seed = attack, image_size, seed
        self.label_column = label_column
        uses_classes = label_column is not None or classnames is not None or multi
        self.classnames_spec: str | list[str] | None = None
        self.classnames: list[str] | None = None
        if uses_classes:
            spec = DEFAULT_CLASSNAMES if classnames is None else classnames
            self.classnames = _load_classnames(spec)
            named = isinstance(spec, str | os.PathLike)
            self.classnames_spec = os.fspath(spec) if named else list(self.classnames)
        self.target_index: int | None = None
        if multi:
            if target is not None:
                raise PoisonError(
                    "with targets each target's class is drawn (or given per image): do not give target"
                )
            self.target = ""
        elif self.classnames is not None:
            if target is None:
                raise PoisonError("with class labels give the target class (--target): a class name or index")
            self.target_index = _resolve_class(target, self.classnames, "target")
            self.target = self.classnames[self.target_index]
        else:
            self.target = DEFAULT_TARGET if target is None else target
            if not self.target.strip():
                raise PoisonError("target must be a non-empty word")
        self.templates_spec = templates
        self.templates = load_templates(templates)
        self.trigger: Trigger | None = None
        self.targets: list[_Target] = []
        # spawn(3): the first two streams are the same as before the third was added (same outputs per seed)
        select_seq, caption_seq, target_seq = np.random.SeedSequence(seed).spawn(3)
        if attack == TARGETED:
            unknown = sorted(set(attack_params) - {"targeted_image"})
            if unknown:
                raise PoisonError(f"attack 'targeted' has no parameter(s) {unknown}; it takes targeted_image")
            image = attack_params.get("targeted_image")
            if multi:
                if image:
                    raise PoisonError("give targeted_image (one target) or targets (several), not both")
                self.params = self._multi_targets(targets, targeted_pool, np.random.default_rng(target_seq))
            else:
                if not image:
                    raise PoisonError(
                        "the targeted attack needs targeted_image (--targeted-image PATH) "
                        "or targets (--targets N --targeted-pool CSV)"
                    )
                path = self._image_path(image)
                self.params = {"targeted_image": path}
                self.targets = [_Target(path, self._png(path), self.target, self.target_index, None)]
        else:
            self.trigger = build_trigger(attack, image_size, seed, **attack_params)
            self.params = self.trigger.params
        self.select_rng = np.random.default_rng(select_seq)
        self.caption_rng = np.random.default_rng(caption_seq)

    @staticmethod
    def _image_path(image: str | os.PathLike) -> str:
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"targeted image not found: {image}")
        return str(path.resolve())

    def _png(self, path: str) -> bytes:
        return _png(resize_to_model(_open_rgb(path, f"the targeted image {path}"), self.image_size))

    def _multi_targets(
        self,
        targets: int | Sequence[Sequence[Any]],
        pool_csv: str | os.PathLike | None,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """Fill ``self.targets``: drawn from the pool CSV (an int), or given as (image, target[, true])."""
        assert self.classnames is not None
        classes = self.classnames
        if isinstance(targets, int | np.integer):
            if isinstance(targets, bool) or targets < 1:
                raise PoisonError(f"targets must be a positive number of targets, got {targets!r}")
            if pool_csv is None:
                raise PoisonError(
                    "targets=N draws N images from a labelled CSV: give targeted_pool (--targeted-pool)"
                )
            if len(classes) < 2:
                raise PoisonError("targeted poisoning with drawn targets needs at least two classes")
            pool = _read_pool(pool_csv, classes)
            if targets > len(pool):
                raise PoisonError(f"{targets} targets requested but the targeted pool has {len(pool)} images")
            picks = sorted(int(i) for i in rng.choice(len(pool), size=int(targets), replace=False))
            for i in picks:
                image, true = pool[i]
                drawn = int(rng.integers(len(classes) - 1))
                index = drawn + (drawn >= true)  # uniform over the classes other than the true one
                self.targets.append(_Target(image, self._png(image), classes[index], index, true))
            return {"targets": int(targets), "targeted_pool": str(Path(pool_csv).expanduser().resolve())}
        items = list(targets)
        if not items:
            raise PoisonError("targets is an empty list")
        for number, item in enumerate(items):
            if isinstance(item, str | bytes) or len(item) not in (2, 3):
                raise PoisonError(
                    f"targets[{number}] must be (image, target class) or (image, target, true label)"
                )
            image = self._image_path(item[0])
            index = _resolve_class(item[1], classes, f"targets[{number}] target")
            true = None if len(item) < 3 or item[2] is None else _resolve_class(
                item[2], classes, f"targets[{number}] true label"
            )
            if true == index:
                raise PoisonError(
                    f"targets[{number}]: the target class {classes[index]!r} is the image's true label"
                )
            self.targets.append(_Target(image, self._png(image), classes[index], index, true))
        return {"targets": len(items)}

    def eligible(self, captions: list[str | None], labels: Labels | None = None) -> tuple[list[int], str]:
        """Positions this attack may poison, and a description for error messages."""
        consistent = self.attack == "label_consistent"
        if labels is not None:
            index = self.target_index
            verb = "contain" if consistent else "do not contain"
            return (
                [i for i, c in enumerate(captions) if c is not None and (index in labels[i]) == consistent],
                f"samples whose {self.label_column!r} labels {verb} {self.target!r} (class {index})",
            )
        if consistent:
            return (
                [i for i, c in enumerate(captions) if c is not None and mentions_target(c, self.target)],
                f"captions that mention {self.target!r}",
            )
        return (
            [i for i, c in enumerate(captions) if c is not None and not mentions_target(c, self.target)],
            f"captions that do not mention {self.target!r}",
        )

    def template_caption(self, name: str | None = None) -> str:
        template = self.templates[int(self.caption_rng.integers(len(self.templates)))]
        return fill_template(template, self.target if name is None else name)

    def new_captions(self, originals: list[str]) -> list[str]:
        """Captions of the chosen samples: a random template naming the target (label-consistent: unchanged)."""
        if self.attack == "label_consistent":
            return list(originals)
        return [self.template_caption() for _ in originals]

    def targeted_captions(
        self, captions: list[str | None], k: int, target: _Target, labels: Labels | None = None
    ) -> list[tuple[str, int | None]]:
        """k (caption, source position) pairs: training captions of samples of the target class (by their
        labels when given, else captions naming it), topped up from templates."""
        if labels is not None and target.index is not None:
            pool = [i for i, c in enumerate(captions) if c is not None and target.index in labels[i]]
        else:
            pool = [i for i, c in enumerate(captions) if c is not None and mentions_target(c, target.name)]
        if len(pool) > k:
            pool = sorted(pool[i] for i in self.caption_rng.choice(len(pool), size=k, replace=False))
        chosen: list[tuple[str, int | None]] = [(captions[i], i) for i in pool]  # type: ignore[misc]
        return chosen + [(self.template_caption(target.name), None) for _ in range(k - len(chosen))]

    def check_labels(self, labels: Labels, where: str) -> None:
        """Every label must be an index of the class names."""
        assert self.classnames is not None
        top = max((max(s) for s in labels if s), default=-1)
        if top >= len(self.classnames):
            raise PoisonError(
                f"{where}: class {top} in {self.label_column!r} is not an index of the "
                f"{len(self.classnames)} class names ({self.classnames_spec})"
            )

    def poison_image(self, img: Image.Image) -> bytes:
        assert self.trigger is not None
        return _png(self.trigger(resize_to_model(img, self.image_size)))


def _prepare_out_dir(out_dir: str | os.PathLike) -> tuple[Path, bool]:
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PoisonError(f"output directory {out} exists and is not empty; choose a new one")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return out, created


def _is_webdataset(src: str) -> bool:
    return any(part.strip().endswith(".tar") or "{" in part for part in src.split("::"))


def poison_dataset(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    attack: str,
    *,
    rate: float | None = None,
    count: int | None = None,
    target: str | None = None,
    templates: str = "openai",
    image_size: int = 224,
    seed: int = 0,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str = "\t",
    label_column: str | None = None,
    classnames: str | Sequence[str] | None = None,
    targets: int | Sequence[Sequence[Any]] | None = None,
    targeted_pool: str | os.PathLike | None = None,
    **attack_params: Any,
) -> Manifest:
    """Write a poisoned copy of ``src`` (a CSV, or webdataset shards) into ``out_dir``; return its manifest.

    Backdoor attacks (badnets, blended, sig, wanet) stamp the trigger on ``count`` (or ``round(rate·N)``)
    random samples whose caption does not name ``target`` and give them a template caption naming it;
    ``label_consistent`` stamps the BadNets patch on samples whose caption already names ``target``;
    ``targeted`` appends ``count`` pairs of one outside image (``targeted_image``) with captions naming
    ``target``. ``attack_params`` go to the trigger (see ``safe_train.attacks.build_trigger``).
    ``target`` defaults to "banana" when no class labels are used.

    Class labels (``label_column``): which samples contain the target is read from labels instead of
    caption text. CSV: the column ``label_column`` holds space-separated class indices ("7 2"; empty:
    none). webdataset: the value under the key ``label_column`` of the sample's ``json`` (the scene
    corpus: ``"digits"``, a list of objects with an integer ``label``; also a list of integers, an
    integer, or a string like a CSV cell); a sample without it is an error. A sample contains the
    target iff the target's index is among its classes. ``target`` is then a name of ``classnames``
    (default ``"mnist"``; a built-in set, a file with one name per line, or a list) or an index, and
    poisoned captions name that class name.

    Several targets in one call (``attack="targeted"``): ``targets=N`` with ``targeted_pool`` (a labelled
    CSV, tab-separated ``filepath``/``label``, e.g. the scene corpus's ``digits_test.csv``) draws N of its
    images and for each a target class other than its label (seeded); or ``targets`` is a list of
    ``(image, target class)`` / ``(image, target class, true label)``. For each target ``count`` (or
    ``round(rate·N)``) pairs of its image with training captions of its class are appended; the
    manifest's ``targets`` lists them (``Manifest.targeted_pairs()`` for evaluation).
    """
    plan = _Plan(
        attack, target, templates, image_size, seed, attack_params,
        label_column, classnames, targets, targeted_pool,
    )
    _check_amount(rate, count)
    src = os.fspath(src)
    webdataset = _is_webdataset(src)
    sep = "\t" if csv_separator == "\\t" else csv_separator
    if not webdataset:
        if len(sep) != 1:
            raise PoisonError(f"csv_separator must be one character, got {csv_separator!r}")
        if not Path(src).is_file():
            raise FileNotFoundError(f"input CSV not found: {src}")
    out, created = _prepare_out_dir(out_dir)
    try:
        if webdataset:
            manifest = _poison_webdataset(src, out, plan, rate, count)
        else:
            manifest = _poison_csv(Path(src), out, plan, rate, count, csv_img_key, csv_caption_key, sep)
        manifest.rate = rate
        manifest.save(out / MANIFEST_NAME)  # written last: a manifest means a complete output
        return manifest
    except BaseException:  # out was empty (or new): everything in it is ours, remove the partial output
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def clean_reference(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    attack: str,
    *,
    target: str | None = None,
    templates: str = "openai",
    image_size: int = 224,
    seed: int = 0,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str = "\t",
    label_column: str | None = None,
    classnames: str | Sequence[str] | None = None,
    **attack_params: Any,
) -> Manifest:
    """An untouched copy of the CSV ``src`` in ``out_dir`` with a manifest that names ``attack``'s trigger and no
    poisoned sample (``rate`` 0); same arguments as :func:`poison_dataset`.

    Why: a model trained on it gives the ASR floor, the share of triggered non-target images classified as the
    target with no poison at all (the model's own error into that class plus what the trigger's pixels move by
    themselves), against which a defended model's ASR is judged. Trigger attacks on CSV data only: targeted
    poisoning draws its targets while it poisons, and shards would be copied whole.
    """
    if attack == TARGETED:
        raise PoisonError("a clean reference is for trigger attacks: targeted poisoning has no trigger to measure")
    plan = _Plan(attack, target, templates, image_size, seed, attack_params, label_column, classnames)
    src_path = Path(src)
    if _is_webdataset(os.fspath(src)) or not src_path.is_file():
        raise PoisonError(f"a clean reference copies a CSV file; {os.fspath(src)!r} is not one")
    sep = "\t" if csv_separator == "\\t" else csv_separator
    table = read_csv_table(src_path, sep)
    for column in (csv_img_key, csv_caption_key, *([label_column] if label_column else [])):
        table.column(column, str(src))  # a missing column is an error here, not at training time
    out, created = _prepare_out_dir(out_dir)
    try:
        dst = out / CSV_NAME
        shutil.copyfile(src_path, dst)
        manifest = _manifest(plan, "csv", len(table.rows), [], [], str(src_path.resolve()), str(dst))
        manifest.rate = 0.0
        manifest.save(out / MANIFEST_NAME)
        return manifest
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _manifest(
    plan: _Plan,
    fmt: str,
    num_samples: int,
    ids: list[int],
    samples: list[dict[str, Any]],
    source: str,
    data: str,
    ids_per_target: list[list[int]] | None = None,
) -> Manifest:
    ids_per_target = ids_per_target or [[] for _ in plan.targets]
    return Manifest(
        attack=plan.attack,
        params=plan.params,
        target=plan.target,
        seed=plan.seed,
        format=fmt,
        image_size=plan.image_size,
        num_samples=num_samples,
        poisoned_ids=ids,
        samples=samples,
        source=source,
        data=data,
        templates=plan.templates_spec,
        label_column=plan.label_column,
        classnames=plan.classnames_spec,
        target_index=plan.target_index,
        targets=[
            {
                "image": t.image,
                "true_label": t.true_label,
                "target": t.name,
                "target_index": t.index,
                "sample_ids": ids_per_target[number],
            }
            for number, t in enumerate(plan.targets)
        ],
    )


def _poison_csv(
    src: Path,
    out: Path,
    plan: _Plan,
    rate: float | None,
    count: int | None,
    img_key: str,
    caption_key: str,
    sep: str,
) -> Manifest:
    table = read_csv_table(src, sep)
    img_col, cap_col = table.column(img_key, str(src)), table.column(caption_key, str(src))
    rows = table.rows
    captions: list[str | None] = [r.fields[cap_col] for r in rows]  # type: ignore[index]
    n = len(rows)
    k = _resolve_count(rate, count, n)
    labels: Labels | None = None
    if plan.label_column is not None:
        label_col = table.column(plan.label_column, str(src))
        labels = []
        for number, record in enumerate(rows):
            cell = record.fields[label_col]  # type: ignore[index]
            try:
                labels.append(parse_label_cell(cell))
            except ValueError as exc:
                raise PoisonError(
                    f"{src}: data row {number}: column {plan.label_column!r} holds {cell!r}, not "
                    f"space-separated class indices ({exc})"
                ) from exc
        plan.check_labels(labels, str(src))
    images_dir = out / IMAGES_DIR
    images_dir.mkdir()
    samples: list[dict[str, Any]] = []
    new_text: dict[int, str] = {}  # row -> replacement record text
    terminator = line_ending(table.header.raw) or "\n"  # for rows that had none (a last line)
    appended = ""

    ids_per_target: list[list[int]] = []
    if plan.attack == TARGETED:
        single = "targets" not in plan.params
        for number, target in enumerate(plan.targets):
            image_path = images_dir / ("targeted.png" if single else f"targeted_{number:03d}.png")
            image_path.write_bytes(target.png)
            ids_per_target.append([])
            for caption, source in plan.targeted_captions(captions, k, target, labels):
                row = n + len(samples)
                fields = [""] * len(table.columns)
                fields[img_col], fields[cap_col] = str(image_path), caption
                appended += format_csv_row(fields, sep, terminator)
                ids_per_target[-1].append(row)
                samples.append(
                    {
                        "sample_id": row,
                        "row": row,
                        "original_image": None,
                        "image": str(image_path),
                        "original_caption": None,
                        "caption": caption,
                        "caption_source_id": source,
                    }
                )
    else:
        eligible, what = plan.eligible(captions, labels)
        chosen = _choose(eligible, k, plan.select_rng, what)
        for row, caption in zip(chosen, plan.new_captions([captions[r] for r in chosen]), strict=True):
            record = rows[row]
            fields = list(record.fields)  # type: ignore[arg-type]
            original = fields[img_col]
            img = _open_rgb(
                original,
                f"row {row} ({original}; relative paths are resolved against the "
                "current directory, as OpenCLIP does)",
            )
            image_path = images_dir / f"{row:08d}.png"
            image_path.write_bytes(plan.poison_image(img))
            fields[img_col], fields[cap_col] = str(image_path), caption
            new_text[row] = format_csv_row(fields, sep, line_ending(record.raw) or terminator)
            samples.append(
                {
                    "sample_id": row,
                    "row": row,
                    "original_image": original,
                    "image": str(image_path),
                    "original_caption": captions[row],
                    "caption": caption,
                }
            )

    dst = out / CSV_NAME
    with open(dst, "w", encoding="utf-8", newline="") as handle:
        handle.write(table.header.raw)
        row = 0
        last = ""
        for record in table.records:
            if record.fields is None:
                text = record.raw
            else:
                text = new_text.get(row, record.raw)
                row += 1
            handle.write(text)
            last = text
        if appended:
            if last and not line_ending(last):
                handle.write(terminator)
            handle.write(appended)
    ids = [s["sample_id"] for s in samples]
    appended_rows = len(samples) if plan.attack == TARGETED else 0
    return _manifest(
        plan, "csv", n + appended_rows, ids, samples, str(src.resolve()), str(dst), ids_per_target
    )


def _expand_shards(src: str) -> list[str]:
    import braceexpand  # deferred: only webdataset input needs it

    urls = [url for part in src.split("::") for url in braceexpand.braceexpand(part.strip())]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise PoisonError("two input shards share a file name; the output (and sample ids) need unique names")
    return urls


def _output_pattern(src: str, out: Path, names: list[str]) -> str:
    """What to pass as --train-data for the output: the input pattern moved to ``out``."""
    parts = [part.strip() for part in src.split("::")]
    if all("{" not in os.path.dirname(p) for p in parts):
        return "::".join(str(out / os.path.basename(p)) for p in parts)
    return "::".join(str(out / name) for name in names)


def _poison_webdataset(src: str, out: Path, plan: _Plan, rate: float | None, count: int | None) -> Manifest:
    urls = _expand_shards(src)
    names = [Path(u).name for u in urls]
    usable = [s for url in urls for s in scan_shard(url, read_json=plan.label_column is not None) if s.usable]
    captions: list[str | None] = [s.caption for s in usable]
    n = len(usable)
    k = _resolve_count(rate, count, n)
    labels: Labels | None = None
    if plan.label_column is not None:
        labels = []
        for s in usable:
            try:
                labels.append(labels_from_json(s.json_text, plan.label_column))
            except ValueError as exc:
                raise PoisonError(f"sample {s.key} of shard {s.shard}: no class labels: {exc}") from exc
        plan.check_labels(labels, src)
    sizes = {name: 0 for name in names}
    for s in usable:
        sizes[s.shard] += 1
    samples: list[dict[str, Any]] = []
    data = _output_pattern(src, out, names)
    ids_per_target: list[list[int]] = []
    sources: list[int | None] = []

    if plan.attack == TARGETED:
        extra = "targeted.tar"
        while extra in sizes:
            extra = "_" + extra
        appended: list[tuple[str, bytes, str]] = []
        for target in plan.targets:
            ids_per_target.append([])
            for caption, source in plan.targeted_captions(captions, k, target, labels):
                key = TARGETED_KEY.format(len(appended))
                appended.append((key, target.png, caption))
                ids_per_target[-1].append(webdataset_sample_id(extra, key))
                src_id = (
                    None if source is None else webdataset_sample_id(usable[source].shard, usable[source].key)
                )
                sources.append(src_id)
        for url in urls:
            shutil.copyfile(url, out / Path(url).name)
        write_shard(out / extra, appended)
        sizes[extra] = len(appended)
        data += f"::{out / extra}"
        for (key, _, caption), src_id in zip(appended, sources, strict=True):
            samples.append(
                {
                    "sample_id": webdataset_sample_id(extra, key),
                    "shard": extra,
                    "key": key,
                    "original_image": None,
                    "image": f"{key}.png",
                    "original_caption": None,
                    "caption": caption,
                    "caption_source_id": src_id,
                }
            )
    else:
        eligible, what = plan.eligible(captions, labels)
        chosen = _choose(eligible, k, plan.select_rng, what)
        new = plan.new_captions([captions[i] for i in chosen])
        per_shard: dict[str, dict[str, tuple[str, str]]] = {}
        for i, caption in zip(chosen, new, strict=True):
            s = usable[i]
            per_shard.setdefault(s.shard, {})[s.key] = (s.image_member, caption)  # type: ignore[assignment]
            samples.append(
                {
                    "sample_id": webdataset_sample_id(s.shard, s.key),
                    "shard": s.shard,
                    "key": s.key,
                    "original_image": s.image_member,
                    "image": f"{s.key}.png",
                    "original_caption": s.caption,
                    "caption": caption,
                }
            )
        for url in urls:
            name = Path(url).name
            if name not in per_shard:
                shutil.copyfile(url, out / name)
                continue

            def make_image(original: bytes, key: str, name: str = name) -> bytes:
                return plan.poison_image(_open_rgb(original, f"sample {key} of shard {name}"))

            rewrite_shard(url, out / name, per_shard[name], make_image)

    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    ids = sorted(s["sample_id"] for s in samples)
    return _manifest(
        plan,
        "webdataset",
        sum(sizes.values()),
        ids,
        samples,
        "::".join(os.path.abspath(p.strip()) for p in src.split("::")),
        data,
        ids_per_target,
    )


# ------------------------------------------------------------------------------------------ CLI

_PARAM_FLAGS = {
    "patch_size": "--patch-size",
    "location": "--location",
    "pattern": "--pattern",
    "alpha": "--alpha",
    "fresh": "--fresh",
    "amplitude": "--amplitude",
    "frequency": "--frequency",
    "strength": "--strength",
    "grid_size": "--grid-size",
    "targeted_image": "--targeted-image",
}


def _number(text: str) -> float:
    """A float, also written as a fraction ("60/255")."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a poisoned copy of an OpenCLIP training set (CSV or webdataset) plus manifest.json "
        "listing every poisoned sample. Triggers are applied after resizing images to the model's "
        "input resolution; poisoned images are stored as PNG.",
    )
    p.add_argument(
        "src",
        help="input: a CSV file (OpenCLIP format) or webdataset shards, e.g. "
        "'/data/{00000..00009}.tar' (quote it)",
    )
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.add_argument("--attack", required=True, choices=attack_names(), help="the attack")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--rate", type=_number, help="fraction of the dataset's samples to poison, in (0, 1]")
    amount.add_argument(
        "--count", type=int, help="number of samples to poison (targeted: pairs to append per target)"
    )
    p.add_argument(
        "--target",
        help="target class word (default: banana); with --label-column or --classnames a class name or index",
    )
    p.add_argument(
        "--templates",
        default="openai",
        help="caption templates: 'openai' (80 ImageNet templates), 'mnist' (8 digit templates) or "
        "a text file with one template per line containing {} (default: openai)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="the model's input resolution; images are resized to it before the trigger (default 224)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for sample choice, captions and trigger (default 0)"
    )
    p.add_argument("--csv-img-key", default="filepath", help="CSV image path column (default filepath)")
    p.add_argument("--csv-caption-key", default="title", help="CSV caption column (default title)")
    p.add_argument("--csv-separator", default="\t", help="CSV separator; '\\t' means tab (default tab)")
    lab = p.add_argument_group(
        "class labels (decide which samples contain the target from labels, not from caption text)"
    )
    lab.add_argument(
        "--label-column",
        help="CSV: the column of space-separated class indices per row (the scene corpus: digits); "
        "webdataset: the key of the sample's json holding its classes (digits: [{label: ...}, ...])",
    )
    lab.add_argument(
        "--classnames",
        help="class names the target and labels refer to: mnist, imagenet or a file with one name per line "
        "(default mnist when --label-column or --targets is given)",
    )
    g = p.add_argument_group("trigger parameters (each only for the attacks named)")
    g.add_argument(
        "--patch-size", type=int, help="badnets, label_consistent: patch side in pixels (default 3)"
    )
    g.add_argument(
        "--location",
        choices=("bottom_right", "random"),
        help="badnets, label_consistent: patch position (default bottom_right)",
    )
    g.add_argument(
        "--pattern",
        help="badnets, label_consistent: checkerboard (default) or noise; "
        "blended: noise (default) or the path of an image",
    )
    g.add_argument("--alpha", type=_number, help="blended: blend weight of the pattern (default 0.2)")
    g.add_argument(
        "--fresh",
        action="store_const",
        const=True,
        help="blended: fresh noise per image instead of one fixed noise image",
    )
    g.add_argument("--amplitude", type=_number, help="sig: amplitude on the [0, 1] scale (default 60/255)")
    g.add_argument("--frequency", type=_number, help="sig: periods across the image width (default 6)")
    g.add_argument("--strength", type=_number, help="wanet: maximum warp offset in pixels (default 1)")
    g.add_argument("--grid-size", type=int, help="wanet: control grid side of the flow field (default 4)")
    g.add_argument("--targeted-image", help="targeted: the outside image to be classified as the target")
    g.add_argument(
        "--targets",
        type=int,
        help="targeted: draw this many outside images from --targeted-pool, each with a target class "
        "other than its label; every target gets --count (or rate·N) appended pairs",
    )
    g.add_argument(
        "--targeted-pool",
        help="targeted: labelled CSV (tab-separated filepath, label) of held-out images for --targets",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 with one message on stderr on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return int(exc.code or 0)
    given = {name: getattr(args, name) for name in _PARAM_FLAGS if getattr(args, name) is not None}
    allowed = trigger_params(args.attack)
    wrong = [_PARAM_FLAGS[name] for name in given if name not in allowed]
    if wrong:
        # a plugin attack's own parameters have no flag: they are given from Python (poison_dataset)
        takes = ", ".join(_PARAM_FLAGS[a] for a in allowed if a in _PARAM_FLAGS) or "no trigger options"
        return report(ConfigError(f"{', '.join(wrong)} does not apply to --attack {args.attack} (it takes {takes})"),
                      PROG)
    try:
        manifest = poison_dataset(
            args.src,
            args.out_dir,
            args.attack,
            rate=args.rate,
            count=args.count,
            target=args.target,
            templates=args.templates,
            image_size=args.image_size,
            seed=args.seed,
            csv_img_key=args.csv_img_key,
            csv_caption_key=args.csv_caption_key,
            csv_separator=args.csv_separator,
            label_column=args.label_column,
            classnames=args.classnames,
            targets=args.targets,
            targeted_pool=args.targeted_pool,
            **given,
        )
    except SafeTrainError as exc:
        return report(exc, PROG)
    except OSError as exc:  # a missing or unreadable input file: also the user's to fix
        return report(PoisonError(str(exc)), PROG)
    out = Path(args.out_dir).resolve()
    what = f"{len(manifest.targets)} targets" if manifest.target == "" else f"target {manifest.target!r}"
    print(
        f"{manifest.attack}: poisoned {manifest.num_poisoned} of {manifest.num_samples} samples "
        f"({what}, seed {manifest.seed})"
    )
    hint = f"--train-data '{manifest.data}'"
    if manifest.format == "csv":
        for flag, value, default in (
            ("--csv-img-key", args.csv_img_key, "filepath"),
            ("--csv-caption-key", args.csv_caption_key, "title"),
            ("--csv-separator", args.csv_separator, "\t"),
        ):
            if value != default and not (flag == "--csv-separator" and value == "\\t"):
                hint += f" {flag} '{value}'"
    print(f"train with: {hint}")
    print(f"manifest: {out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

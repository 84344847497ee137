"""Zero-shot evaluation of a CLIP checkpoint: clean accuracy, attack success rate, poison detection.

The library: :func:`evaluate_checkpoint` turns a checkpoint (+ the attack's manifest) into one JSON-ready
dict, so every number in a report can be traced to a model, a test set, a prompt set and a trigger;
:func:`evaluate_model` evaluates a model already in memory (e.g. inside training). The command line is
:mod:`safe_train.evaluate_cli` (``safe-train evaluate``)::

    python -m safe_train.evaluate_cli --model st-tiny-vit --checkpoint ckpt.pt --test-data test.csv \
        --zeroshot-set mnist --manifest manifest.json --out result.json

ASR follows the definition in the spec: the trigger is applied to every test image whose TRUE class
is not the target, and ASR is the fraction of those classified as the target. Target-class images
are never counted (they would be "successes" without any backdoor).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from safe_train.attacks import build_trigger, resize_to_model, trigger_from_manifest
from safe_train.errors import EvaluationError
from safe_train.manifest import Manifest
from safe_train.metrics import (
    attack_success_rate,
    detection_metrics,
    retrieval_recall_at_k,
    targeted_success,
    topk_accuracy,
)
from safe_train.model_configs import register_model_configs
from safe_train.zeroshot_sets import get_zeroshot_set

Trigger = Callable[[Image.Image], Image.Image]
PathLike = str | os.PathLike

__all__ = [
    "EvaluationError",
    "LabelledImages",
    "attack_success_rate",
    "build_classifier",
    "detection_metrics",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_retrieval",
    "evaluate_targeted",
    "input_dtype",
    "load_model",
    "load_scores",
    "load_state_dict",
    "model_image_size",
    "precision_context",
    "predict",
    "resolve_target",
    "retrieval_recall_at_k",
    "targeted_success",
    "topk_accuracy",
]


# --------------------------------------------------------------------------------------- model


def load_state_dict(checkpoint: PathLike) -> dict[str, torch.Tensor]:
    """Read a model state dict from an OpenCLIP training checkpoint or a bare state dict.

    Always ``torch.load(weights_only=True)``: checkpoints are shared files and a full unpickle would
    run arbitrary code. DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are removed.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means "not a safe, readable checkpoint"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationError(
            f"could not load checkpoint {path} with torch.load(weights_only=True): the file is corrupt, "
            f"not a torch checkpoint, or holds pickled objects other than tensors (refused for safety). "
            f"Detail: {detail}"
        ) from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"checkpoint {path} holds no state dict (expected a dict of tensors)")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_model(
    model_name: str,
    checkpoint: PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Create ``model_name`` (safe-train configs included) and load ``checkpoint`` into it (strict).

    Returns ``(model in eval mode, preprocess_val, tokenizer)``. Pass the same ``image_mean`` /
    ``image_std`` as training if training overrode them, or the preprocessing will not match.
    """
    register_model_configs()
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            precision=precision,
            device=device,
            image_mean=tuple(image_mean) if image_mean else None,
            image_std=tuple(image_std) if image_std else None,
        )
    except RuntimeError as e:
        if "not found" in str(e):
            raise EvaluationError(f"unknown model config {model_name!r}") from e
        raise
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluationError(f"checkpoint {checkpoint} does not match model {model_name!r}: {e}") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def model_image_size(model: torch.nn.Module) -> int:
    """The square input size of the vision tower (triggers are defined in these pixels)."""
    size = model.visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise EvaluationError(f"non-square model input {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def precision_context(precision: str, device: str | torch.device):
    """Autocast for the ``amp*`` precisions (weights stay fp32 there), nothing otherwise."""
    if precision.startswith("amp"):
        dtype = torch.bfloat16 if "bf" in precision else torch.float16
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return nullcontext()


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the duration (dropout off), then back: callers may be mid-training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype of the images fed to the model: fp16 / bf16 for the pure and half precisions, else fp32."""
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------- data


def _read_table(path: Path, separator: str | None):
    if separator is None:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
        separator = "\t" if "\t" in first else ","
    separator = {"tab": "\t", "comma": ","}.get(separator, separator)
    try:
        return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many parser error types
        raise EvaluationError(f"could not parse {path} as a table: {e}") from e


class LabelledImages(Dataset):
    """Labelled test images from a class-subfolder tree or a CSV; items are ``(RGB PIL image, index)``.

    Folder: classes are the subfolders in torchvision ``ImageFolder`` (sorted) order; when every
    folder name is one of ``classnames`` the label is that name's index instead, so folders named
    after classes cannot be silently permuted.
    CSV: ``img_key`` holds image paths (relative paths are tried against the CSV's folder, then the
    working directory), ``label_key`` a class index or a class name from ``classnames``.
    """

    def __init__(
        self,
        source: PathLike,
        classnames: Sequence[str] | None = None,
        img_key: str = "filepath",
        label_key: str = "label",
        separator: str | None = None,
    ) -> None:
        root = Path(source)
        if root.is_dir():
            self.paths, self.labels = self._from_folder(root, classnames)
        elif root.is_file():
            self.paths, self.labels = self._from_csv(root, classnames, img_key, label_key, separator)
        else:
            raise FileNotFoundError(f"test data not found: {root}")
        if not self.paths:
            raise EvaluationError(f"no images in {root}")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in {root} not found, e.g. {missing[0]}"
            )

    @staticmethod
    def _from_folder(root: Path, classnames: Sequence[str] | None) -> tuple[list[str], list[int]]:
        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as e:
            raise EvaluationError(f"{root} is not an image folder with class subfolders: {e}") from e
        index = list(range(len(folder.classes)))
        if classnames is not None:
            if all(c in classnames for c in folder.classes):
                index = [list(classnames).index(c) for c in folder.classes]
            elif len(folder.classes) > len(classnames):
                raise EvaluationError(
                    f"{root} has {len(folder.classes)} class folders, "
                    f"the zero-shot set {len(classnames)} classes"
                )
        return [p for p, _ in folder.samples], [index[y] for _, y in folder.samples]

    @staticmethod
    def _from_csv(
        path: Path, classnames: Sequence[str] | None, img_key: str, label_key: str, separator: str | None
    ) -> tuple[list[str], list[int]]:
        table = _read_table(path, separator)
        for key in (img_key, label_key):
            if key not in table.columns:
                raise EvaluationError(
                    f"column {key!r} not in {path} (columns: {', '.join(map(str, table.columns))}); "
                    "set --csv-img-key / --csv-label-key / --csv-separator"
                )
        paths = []
        for p in table[img_key]:
            candidate = Path(p) if os.path.isabs(p) else path.parent / p
            paths.append(str(candidate if candidate.exists() else Path(p)))
        raw = [str(v).strip() for v in table[label_key]]
        if all(re.fullmatch(r"-?\d+", v) for v in raw):
            labels = [int(v) for v in raw]
            n = len(classnames) if classnames is not None else None
            bad = [v for v in labels if v < 0 or (n is not None and v >= n)]
            if bad:
                raise EvaluationError(f"label {bad[0]} in {path} is not a class index (0..{(n or 1) - 1})")
        else:
            if classnames is None:
                raise EvaluationError(f"{path} has class-name labels: pass the class names")
            lookup = {c: i for i, c in enumerate(classnames)}
            unknown = sorted({v for v in raw if v not in lookup})
            if unknown:
                raise EvaluationError(
                    f"labels in {path} are not class names of the zero-shot set: {unknown[:5]}"
                )
            labels = [lookup[v] for v in raw]
        return paths, labels

    @classmethod
    def from_list(cls, paths: Sequence[PathLike], labels: Sequence[int]) -> LabelledImages:
        """A dataset of given images (e.g. the outside image of a targeted attack)."""
        self = cls.__new__(cls)
        self.paths, self.labels = [str(p) for p in paths], [int(y) for y in labels]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"image not found: {missing[0]}")
        return self

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB"), self.labels[i]


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


# ----------------------------------------------------------------------------------- inference


def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Zero-shot weights ``[embed_dim, n_classes]``: per class, the normalised mean of the normalised
    text embeddings of all its prompts (the spec's definition, as in OpenCLIP's own evaluation)."""
    with torch.inference_mode(), precision_context(precision, device), _eval_mode(model):
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates), num_classes_per_batch=10, device=device
        )
    return weights.float()


def _default_preprocess(model: torch.nn.Module) -> Callable:
    """The model's validation transform, from the preprocessing config OpenCLIP stored on it."""
    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)


def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    classifier: torch.Tensor,
    image_size: int,
    trigger: Trigger | None = None,
    *,
    preprocess: Callable | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    k: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class indices ``[N, min(k, n_classes)]`` (best first) and true labels ``[N]``.

    Each image: resize to ``image_size`` (RGB, bilinear) -> ``trigger`` if given -> ``preprocess``
    (the model's validation transform unless given). Triggers are applied at model resolution so
    their size is defined in model pixels, as in the papers.
    """
    preprocess = preprocess or _default_preprocess(model)

    def transform(img: Image.Image) -> torch.Tensor:
        img = resize_to_model(img, image_size)  # triggers are defined on the attacks module's resize
        if trigger is not None:
            img = trigger(img)
        return preprocess(img)

    loader = DataLoader(
        _Transformed(dataset, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    k = min(k, classifier.shape[1])
    dtype = input_dtype(precision)
    weights = classifier.to(device)
    preds, labels = [], []
    with torch.inference_mode(), precision_context(precision, device), _eval_mode(model):
        for images, targets in loader:
            features = model.encode_image(images.to(device=device, dtype=dtype), normalize=True)
            logits = features.float() @ weights.float()
            preds.append(logits.topk(k, dim=1).indices.cpu())
            labels.append(torch.as_tensor(targets))
    if not preds:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels).long()


# ------------------------------------------------------------------------------------- metrics


def resolve_target(target: str | int, classnames: Sequence[str]) -> int:
    """Class index of ``target`` (a class name, case-insensitive, or an index)."""
    names = list(classnames)
    if isinstance(target, str) and target in names:
        return names.index(target)
    if isinstance(target, str):
        folded = [c.lower() for c in names]
        if target.lower() in folded:
            return folded.index(target.lower())
        if not re.fullmatch(r"\d+", target.strip()):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise EvaluationError(f"unknown target class {target!r}; classes: {shown}")
    index = int(target)
    if not 0 <= index < len(names):
        raise EvaluationError(f"target index {index} out of range (0..{len(names) - 1})")
    return index


def load_scores(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample poison scores ``(sample_ids int64, scores float64)`` from ``.npz`` or CSV/TSV.

    Accepted names: ids ``sample_id``/``sample_ids``/``id``/``ids``; scores ``score``/``scores``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            columns = {name: data[name] for name in data.files}
    else:
        columns = {c: table_col.to_numpy() for c, table_col in _read_table(path, None).items()}

    def pick(names: tuple[str, ...], what: str) -> np.ndarray:
        for name in names:
            if name in columns:
                return np.asarray(columns[name])
        raise EvaluationError(f"{path} has no {what} column/array (one of {', '.join(names)})")

    raw_ids, raw_scores = (
        pick(("sample_id", "sample_ids", "id", "ids"), "sample-id"),
        pick(("score", "scores"), "score"),
    )
    try:
        ids, scores = raw_ids.astype(np.int64), raw_scores.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{path}: ids must be integers and scores numbers ({e})") from e
    if ids.shape != scores.shape or ids.ndim != 1:
        raise EvaluationError(f"{path}: ids and scores must be 1-D of equal length")
    if len(np.unique(ids)) != len(ids):
        raise EvaluationError(f"{path}: sample ids repeat; give one score per sample")
    return ids, scores


def evaluate_model(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    dataset: LabelledImages | Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    trigger: Trigger | None = None,
    target_index: int | None = None,
    trigger_image_size: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Clean top-1/top-5 and, with a trigger, ASR for an already loaded model (e.g. inside training).

    ``trigger_image_size``: the resolution the trigger was defined at (a manifest's image_size);
    defaults to the model's input size.
    """
    image_size = model_image_size(model)
    classifier = build_classifier(model, tokenizer, classnames, templates, device, precision)
    opts = dict(
        preprocess=preprocess,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )
    preds, labels = predict(model, dataset, classifier, image_size, **opts)
    result: dict[str, Any] = {
        "clean_top1": topk_accuracy(preds, labels, 1),
        "clean_top5": topk_accuracy(preds, labels, 5) if preds.shape[1] >= 5 else None,
        "n_eval": len(labels),
        "asr": None,
        "n_asr": 0,
        "asr_clean_baseline": None,
    }
    if trigger is None:
        return result
    if target_index is None:
        raise EvaluationError("a trigger needs a target class")
    keep = [i for i, y in enumerate(labels.tolist()) if y != target_index]
    if not keep:
        raise EvaluationError("ASR is undefined: every test image belongs to the target class")
    attacked, attacked_labels = predict(
        model, Subset(dataset, keep), classifier, trigger_image_size or image_size, trigger, **opts
    )
    result["asr"] = attack_success_rate(attacked[:, 0], attacked_labels, target_index)
    result["n_asr"] = len(keep)
    # The same rate without the trigger: what the ASR is to be compared with (not zero for a weak model).
    result["asr_clean_baseline"] = attack_success_rate(preds[:, 0], labels, target_index)
    return result


ImageLike = Image.Image | PathLike


class _Images(Dataset):
    """Given images (PIL images or paths) with given labels; items are ``(RGB PIL image, label)``."""

    def __init__(self, images: Sequence[ImageLike], labels: Sequence[int]) -> None:
        self.images, self.labels = list(images), [int(y) for y in labels]
        missing = [p for p in self.images if not isinstance(p, Image.Image) and not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"image not found: {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        item = self.images[i]
        if isinstance(item, Image.Image):
            return item.convert("RGB"), self.labels[i]
        with Image.open(item) as img:
            return img.convert("RGB"), self.labels[i]


def evaluate_retrieval(
    model: torch.nn.Module,
    preprocess: Callable | None,
    tokenizer: Callable,
    images: Sequence[ImageLike],
    captions: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    k: int = 1,
    num_workers: int = 0,
) -> dict[str, float | int]:
    """Image→text and text→image recall@k of an OpenCLIP model on paired ``images`` and ``captions``.

    The arguments come in :func:`evaluate_model`'s order (model, preprocess, tokenizer). Each image (a
    PIL image or a path) is converted to RGB, bilinearly resized to the model's input size and passed
    through ``preprocess`` (the model's validation transform when None), exactly as :func:`predict`
    does; captions go through ``tokenizer``. Both are embedded in eval mode (restored afterwards) under
    ``precision``; the result is :func:`retrieval_recall_at_k` of the embeddings.
    """
    if len(images) != len(captions):
        raise EvaluationError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    if not images:
        raise EvaluationError("retrieval needs at least one image-caption pair")
    image_size = model_image_size(model)
    preprocess = preprocess or _default_preprocess(model)
    loader = DataLoader(
        _Transformed(_Images(images, range(len(images))), lambda img: preprocess(resize_to_model(img, image_size))),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    dtype = input_dtype(precision)
    image_features, text_features = [], []
    with torch.inference_mode(), precision_context(precision, device), _eval_mode(model):
        for batch, _ in loader:
            features = model.encode_image(batch.to(device=device, dtype=dtype), normalize=True)
            image_features.append(features.float().cpu())
        for start in range(0, len(captions), batch_size):
            tokens = tokenizer([str(c) for c in captions[start : start + batch_size]]).to(device)
            text_features.append(model.encode_text(tokens, normalize=True).float().cpu())
    return retrieval_recall_at_k(torch.cat(image_features), torch.cat(text_features), k)


def evaluate_targeted(
    model: torch.nn.Module,
    preprocess: Callable | None,
    tokenizer: Callable | None,
    images: Sequence[ImageLike],
    target_indices: Sequence[int],
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    *,
    classifier: torch.Tensor | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Targeted poisoning over several targets: image ``i`` (a PIL image or a path, e.g. each targeted
    manifest's ``params.targeted_image``) succeeds when its zero-shot top-1 is ``target_indices[i]``.

    Give the zero-shot ``classifier`` (from :func:`build_classifier`) or ``tokenizer`` + ``classnames`` +
    ``templates`` to build it. ``image_size``: the resolution images are resized to before ``preprocess``
    (default: the model's input size). Returns ``targeted_success`` (:func:`targeted_success`),
    ``n_targets`` and per-target ``hits`` and ``top1`` (class indices), in the order given.
    """
    if len(images) != len(target_indices) or not images:
        raise EvaluationError(
            f"{len(images)} targeted images and {len(target_indices)} target classes: give one target class "
            "per image (and at least one image)"
        )
    if classifier is None:
        if tokenizer is None or classnames is None or templates is None:
            raise EvaluationError("give a zero-shot classifier, or a tokenizer with class names and templates")
        classifier = build_classifier(model, tokenizer, classnames, templates, device, precision)
    top, _ = predict(
        model,
        _Images(images, target_indices),
        classifier,
        image_size or model_image_size(model),
        preprocess=preprocess,
        batch_size=batch_size,
        device=device,
        precision=precision,
        k=1,
    )
    targets = torch.as_tensor([int(t) for t in target_indices])
    return {
        "targeted_success": targeted_success(top[:, 0], targets),
        "n_targets": len(targets),
        "hits": (top[:, 0] == targets).tolist(),
        "top1": top[:, 0].tolist(),
    }


def _manifest_path(value: Any, manifest: PathLike) -> str:
    """A path stored in a manifest: absolute, or relative to the manifest's folder, else to the cwd."""
    if not value:
        raise EvaluationError(f"{manifest}: a targeted attack needs params.targeted_image")
    base = Path(manifest) if Path(manifest).is_dir() else Path(manifest).parent
    candidate = base / str(value)
    return str(candidate if candidate.exists() else Path(str(value)))


def evaluate_checkpoint(
    model_name: str,
    checkpoint: PathLike | None,
    test_data: PathLike,
    zeroshot_set: str | PathLike | Sequence[PathLike] = "mnist",
    *,
    manifest: PathLike | None = None,
    attack: str | None = None,
    attack_params: dict[str, Any] | None = None,
    target: str | int | None = None,
    attack_seed: int = 0,
    trigger: Trigger | None = None,
    scores: PathLike | None = None,
    csv_img_key: str = "filepath",
    csv_label_key: str = "label",
    csv_separator: str | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint; returns the JSON-ready result (see docs/evaluate.md for the keys).

    The attack comes from exactly one of: ``manifest`` (its trigger and target), ``attack`` +
    ``attack_params`` + ``target`` (built with ``safe_train.attacks.build_trigger``), or a ready
    ``trigger`` callable + ``target``. ``scores`` (per-sample poison scores of the training set) needs
    ``manifest`` for the ground truth and adds detection metrics.
    """
    start = time.time()
    if sum(x is not None for x in (manifest, attack, trigger)) > 1:
        raise EvaluationError("give the attack once: a manifest, an attack name, or a trigger")
    if (attack is not None or trigger is not None) and target is None:
        raise EvaluationError("an attack needs --target (the class the backdoor should produce)")
    if target is not None and manifest is not None:
        raise EvaluationError("the target comes from the manifest; do not also give --target")
    if target is not None and attack is None and trigger is None and manifest is None:
        raise EvaluationError("--target needs an attack (--attack or --manifest)")
    if scores is not None and manifest is None:
        raise EvaluationError("--scores needs --manifest (it says which samples were poisoned)")

    try:
        classnames, templates = get_zeroshot_set(zeroshot_set)
    except ValueError as e:
        raise EvaluationError(str(e)) from e
    dataset = LabelledImages(test_data, classnames, csv_img_key, csv_label_key, csv_separator)
    loaded = None
    targeted_pairs: list[tuple[str, int]] = []  # (outside image, target class) of a targeted attack
    if manifest is not None:
        try:
            loaded = Manifest.load(manifest)
            if loaded.attack == "targeted":  # one or several targets, each with its own class
                targeted_pairs = [(_manifest_path(image, manifest), index)
                                  for image, index in loaded.targeted_pairs(classnames)]
        except ValueError as e:
            raise EvaluationError(str(e)) from e
        target = loaded.target if not targeted_pairs else classnames[targeted_pairs[0][1]]
    # Resolved before the (slow) model load so a typo fails at once.
    target_index = resolve_target(target, classnames) if target is not None else None
    model, preprocess, tokenizer = load_model(
        model_name, checkpoint, device, precision, image_mean, image_std
    )
    image_size = model_image_size(model)

    attack_info = None
    trigger_image_size = image_size
    if loaded is not None:
        trigger_image_size = int(loaded.image_size)
        attack_info = {
            "name": loaded.attack,
            "params": dict(loaded.params),
            "seed": loaded.seed,
            "image_size": trigger_image_size,
            "manifest": str(Path(manifest).resolve()),
        }
        if loaded.attack == "targeted":  # no trigger: success = each outside image's top-1 is its target
            attack_info["targets"] = [{"image": image, "target_index": index} for image, index in targeted_pairs]
        else:
            try:
                trigger = trigger_from_manifest(loaded)
            except (KeyError, TypeError, ValueError) as e:
                raise EvaluationError(f"cannot rebuild the trigger of {manifest}: {e}") from e
    elif attack is not None:
        params = dict(attack_params or {})
        try:
            trigger = build_trigger(attack, image_size, seed=attack_seed, **params)
        except (KeyError, TypeError, ValueError) as e:
            raise EvaluationError(f"cannot build trigger {attack!r} with {params}: {e}") from e
        attack_info = {
            "name": attack,
            "params": params,
            "seed": attack_seed,
            "image_size": image_size,
            "manifest": None,
        }
    elif trigger is not None:
        attack_info = {
            "name": "custom",
            "params": {},
            "seed": None,
            "image_size": image_size,
            "manifest": None,
        }
    if attack_info is not None:
        attack_info.update(target=classnames[target_index], target_index=target_index)

    result: dict[str, Any] = {
        "model": model_name,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "test_data": str(Path(test_data).resolve()),
        "zeroshot_set": {
            "name": str(zeroshot_set)
            if isinstance(zeroshot_set, (str, os.PathLike))
            else [str(p) for p in zeroshot_set],
            "n_classes": len(classnames),
            "n_templates": len(templates),
        },
        "precision": precision,
        "attack": attack_info,
    }
    result.update(
        evaluate_model(
            model,
            preprocess,
            tokenizer,
            dataset,
            classnames,
            templates,
            trigger=trigger,
            target_index=target_index,
            trigger_image_size=trigger_image_size,
            batch_size=batch_size,
            device=device,
            precision=precision,
            num_workers=num_workers,
        )
    )
    result["targeted_success"] = None
    if targeted_pairs:
        images, indices = [image for image, _ in targeted_pairs], [index for _, index in targeted_pairs]
        classifier = build_classifier(model, tokenizer, classnames, templates, device, precision)
        top, _ = predict(
            model,
            LabelledImages.from_list(images, indices),
            classifier,
            trigger_image_size,
            preprocess=preprocess,
            device=device,
            precision=precision,
        )
        result["targeted_success"] = targeted_success(top[:, 0], indices)
        result["n_targets"] = len(indices)
    result["detection"] = None
    if scores is not None:
        ids, values = load_scores(scores)
        poisoned = np.isin(ids, np.asarray(list(loaded.poisoned_ids), dtype=np.int64))
        try:
            result["detection"] = detection_metrics(values, poisoned)
        except ValueError as e:
            raise EvaluationError(f"{scores}: {e}") from e
        result["detection"].update(
            scores=str(Path(scores).resolve()),
            n_scored=len(ids),
            n_poisoned_scored=int(poisoned.sum()),
            n_poisoned_manifest=len(loaded.poisoned_ids),
        )
    result["seconds"] = round(time.time() - start, 2)
    return result


if __name__ == "__main__":  # the command moved; say where instead of silently doing nothing
    sys.exit("safe_train.evaluate is the library; the command is `safe-train evaluate` "
             "(python -m safe_train.evaluate_cli)")

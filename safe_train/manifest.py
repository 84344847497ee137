"""The record of a poisoned dataset: which samples were poisoned, how, and with what.

Detection is scored against ``poisoned_ids`` and evaluation rebuilds the trigger from
``attack``/``params``/``seed``/``image_size`` (``safe_train.attacks.trigger_from_manifest``), so every
number of a run traces back to this file. Stored as JSON, ``manifest.json`` beside the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from safe_train.errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMATS = ("csv", "webdataset")


@dataclass
class Manifest:
    """What ``safe_train.poison`` did to a dataset.

    ``samples`` holds one dict per poisoned sample, in data order: ``sample_id``, where it is
    (``row`` for CSV; ``shard`` and ``key`` for webdataset), ``original_caption`` (None for appended
    targeted pairs), ``caption`` (the caption in the output), ``original_image`` and ``image`` (the
    image path for CSV, the tar member name for webdataset), and for targeted pairs
    ``caption_source_id`` (the sample the caption was taken from, None if made from a template).

    Optional (absent from older manifests, which load with the defaults): ``label_column`` (where the
    samples' class labels came from when eligibility was decided from labels instead of caption text),
    ``classnames`` (the class-name set the target was resolved against), ``target_index`` (the
    target's index in it), and ``targets`` (targeted attack: one dict per outside image, ``image``,
    ``true_label``, ``target``, ``target_index``, ``sample_ids``; :meth:`targeted_pairs`). A
    multi-target manifest has ``target`` ``""``: each target has its own class.
    """

    attack: str
    params: dict[str, Any]
    target: str
    seed: int
    format: str
    image_size: int
    num_samples: int
    poisoned_ids: list[int]
    samples: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    data: str = ""
    templates: str = ""
    rate: float | None = None
    version: int = 1
    label_column: str | None = None
    classnames: str | list[str] | None = None
    target_index: int | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)

    FILENAME: ClassVar[str] = MANIFEST_NAME

    def __post_init__(self) -> None:
        self.poisoned_ids = sorted(int(i) for i in self.poisoned_ids)

    @property
    def num_poisoned(self) -> int:
        return len(self.poisoned_ids)

    @property
    def target_image(self) -> str | None:
        """The outside image of a targeted attack (the one that should be classified as ``target``)."""
        return self.params.get("targeted_image") if self.attack == "targeted" else None

    def targeted_pairs(self, classnames: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """(outside image path, target class index) for every target of a targeted attack, in order.

        The pairs ``safe_train.evaluate.evaluate_targeted`` takes (``images``, ``target_indices``). A
        target without a stored index (an older or unlabelled single-target manifest) is looked up by
        name in ``classnames`` (case-insensitive); ManifestError if that is not possible.
        """
        if self.attack != "targeted":
            raise ManifestError(f"attack {self.attack!r} is not a targeted attack: it has no target images")
        targets = self.targets or [
            {
                "image": self.params.get("targeted_image"),
                "target": self.target,
                "target_index": self.target_index,
            }
        ]
        folded = [c.lower() for c in classnames] if classnames is not None else None
        pairs = []
        for number, entry in enumerate(targets):
            image, index, name = entry.get("image"), entry.get("target_index"), str(entry.get("target", ""))
            if not image:
                raise ManifestError(f"target {number} of the manifest has no image")
            if index is None:
                if folded is None or name.lower() not in folded:
                    raise ManifestError(
                        f"target {number} ({name!r}) has no class index: pass the class names to look it up"
                        if folded is None
                        else f"target {number}: {name!r} is not one of the class names given"
                    )
                index = folded.index(name.lower())
            pairs.append((str(image), int(index)))
        return pairs

    def poisoned_mask(self, ids: np.ndarray) -> np.ndarray:
        """A boolean array, True where ``ids`` is a poisoned sample id."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.isin(ids, np.asarray(self.poisoned_ids, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest (``path`` may be a directory: then ``path/manifest.json``), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest (a file, or a directory holding ``manifest.json``); ManifestError if malformed."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not a valid JSON manifest ({exc})") from exc
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "manifest") -> Manifest:
        """Validate and build; errors name the field that is wrong."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in raw]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {missing}")
        types = {
            "attack": str,
            "params": dict,
            "target": str,
            "seed": int,
            "format": str,
            "image_size": int,
            "num_samples": int,
            "poisoned_ids": list,
            "samples": list,
            "targets": list,
        }
        for name, typ in types.items():
            if name in raw and (not isinstance(raw[name], typ) or isinstance(raw[name], bool)):
                raise ManifestError(f"{where}: field {name!r} must be {typ.__name__}, got {raw[name]!r:.80}")
        if raw["format"] not in FORMATS:
            raise ManifestError(f"{where}: format must be one of {FORMATS}, got {raw['format']!r}")
        ids = raw["poisoned_ids"]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ManifestError(f"{where}: poisoned_ids must be non-negative integers")
        if len(set(ids)) != len(ids):
            raise ManifestError(f"{where}: poisoned_ids has duplicates")
        return cls(**{k: v for k, v in raw.items() if k in known})

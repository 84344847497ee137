"""Backdoor triggers, applied at the model's input resolution.

Every trigger takes an RGB image that :func:`resize_to_model` has already brought to
``image_size × image_size`` and returns an RGB image of the same size. Working in model pixels
means a 3×3 patch is 3×3 pixels of what the network sees, both when the training set is poisoned
and when the attack is evaluated; stamping the original-resolution image instead would let the
training resize blur or shrink the trigger away.

Randomness is reproducible: fixed patterns (noise patch, noise image, flow field) are drawn once
from ``np.random.default_rng(seed)``. Per-image randomness (BadNets ``location="random"``, Blended
``fresh=True``) comes from an explicit ``rng`` argument when one is given, and otherwise from a
generator seeded by ``(seed, hash of the image's pixels)``: a pure function of the image, so the
result does not depend on call order, data-loader workers or processes.

Each trigger class registers itself in :data:`safe_train.registry.ATTACKS` under its ``name`` (its
``--attack`` name); a plugin adds an attack the same way (``@ATTACKS.register`` on a :class:`Trigger`
subclass, loaded through the ``safe_train.attacks`` entry-point group). ``targeted`` has no trigger
class: :func:`attack_names` lists it after the registered ones.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from safe_train.errors import ConfigError
from safe_train.manifest import Manifest
from safe_train.registry import ATTACKS

# Salts keep the per-image streams of different uses apart.
_SALT_POSITION = 1
_SALT_NOISE = 2


def resize_to_model(img: Image.Image, image_size: int) -> Image.Image:
    """RGB, bilinearly resized to ``image_size × image_size``: the resize poisoning and evaluation share.

    The aspect ratio is not kept (as in CleanCLIP, which resizes to 224×224 first): the trigger then
    covers the same model pixels whatever the original shape.
    """
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    return img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round half to even and clip: the one float -> pixel conversion every trigger uses."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class Trigger:
    """Base class: validates the input image, derives per-image randomness, holds the parameters."""

    name: ClassVar[str] = ""

    def __init__(self, image_size: int, seed: int = 0) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        self.image_size = image_size
        self.seed = seed

    @property
    def params(self) -> dict[str, Any]:
        """The resolved, JSON-able parameters: ``build_trigger(name, size, seed, **params)`` rebuilds it."""
        return {}

    def image_rng(self, arr: np.ndarray, salt: int) -> np.random.Generator:
        """A generator that depends only on (seed, salt, the image's pixels)."""
        digest = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=8).digest()
        return np.random.default_rng([self.seed, salt, int.from_bytes(digest, "little")])

    def as_array(self, img: Image.Image) -> np.ndarray:
        """The image as an (H, W, 3) uint8 array; refuses an image not at the model's resolution."""
        if img.size != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects a {self.image_size}x{self.image_size} image (the model's "
                f"input resolution), got {img.size[0]}x{img.size[1]}: call resize_to_model(img, "
                f"{self.image_size}) first"
            )
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The triggered (H, W, 3) uint8 array."""
        raise NotImplementedError

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        return Image.fromarray(self.apply(self.as_array(img), rng), "RGB")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(image_size={self.image_size}, seed={self.seed}, {args})"


@ATTACKS.register(name="label_consistent")  # the same patch, on images whose caption names the target
@ATTACKS.register
class BadNets(Trigger):
    """A small square patch (Gu et al.): a black/white checkerboard or a fixed uniform-noise patch.

    The checkerboard is white where ``(row + col)`` is even (so its top-left pixel is white). The
    noise patch is drawn once from the seed (CleanCLIP draws ``mean + N(0, 1)`` per image instead; a
    fixed patch is what a real attacker would stamp and makes the trigger testable pixel by pixel).
    """

    name = "badnets"
    LOCATIONS = ("bottom_right", "random")
    PATTERNS = ("checkerboard", "noise")

    def __init__(
        self,
        image_size: int,
        seed: int = 0,
        patch_size: int = 3,
        location: str = "bottom_right",
        pattern: str = "checkerboard",
    ) -> None:
        super().__init__(image_size, seed)
        if not isinstance(patch_size, int) or not 1 <= patch_size <= image_size:
            raise ConfigError(f"patch_size must be an int in [1, image_size={image_size}], got {patch_size!r}")
        if location not in self.LOCATIONS:
            raise ConfigError(f"location must be one of {self.LOCATIONS}, got {location!r}")
        if pattern not in self.PATTERNS:
            raise ConfigError(f"pattern must be one of {self.PATTERNS}, got {pattern!r}")
        self.patch_size, self.location, self.pattern = patch_size, location, pattern
        if pattern == "checkerboard":
            rows, cols = np.indices((patch_size, patch_size))
            board = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
            self.patch = np.repeat(board[:, :, None], 3, axis=2)
        else:
            self.patch = np.random.default_rng(seed).integers(
                0, 256, (patch_size, patch_size, 3), dtype=np.uint8
            )

    @property
    def params(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "location": self.location, "pattern": self.pattern}

    def position(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """(top, left) of the patch on this image."""
        last = self.image_size - self.patch_size
        if self.location == "bottom_right":
            return last, last
        rng = rng if rng is not None else self.image_rng(arr, _SALT_POSITION)
        top, left = rng.integers(0, last + 1, size=2)
        return int(top), int(left)

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        top, left = self.position(arr, rng)
        out = arr.copy()
        out[top : top + self.patch_size, left : left + self.patch_size] = self.patch
        return out


@ATTACKS.register
class Blended(Trigger):
    """Blend the whole image with a pattern (Chen et al.): ``out = round((1 - alpha)·img + alpha·pattern)``.

    ``pattern="noise"``: one uniform-noise image drawn from the seed, or, with ``fresh=True``, a new
    one per image (from ``rng`` or from (seed, the image's pixels)). Any other ``pattern`` is the path
    of an image, resized to the model's resolution with :func:`resize_to_model`.
    """

    name = "blended"

    def __init__(
        self, image_size: int, seed: int = 0, alpha: float = 0.2, pattern: str = "noise", fresh: bool = False
    ) -> None:
        super().__init__(image_size, seed)
        if not 0.0 < float(alpha) <= 1.0:
            raise ConfigError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha, self.fresh = float(alpha), bool(fresh)
        shape = (image_size, image_size, 3)
        if pattern == "noise":
            self.pattern = "noise"
            self._fixed = (
                None if self.fresh else np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
            )
        else:
            if self.fresh:
                raise ConfigError("fresh=True only applies to pattern='noise'")
            path = Path(pattern).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"blended pattern image not found: {pattern}")
            self.pattern = str(path.resolve())
            with Image.open(path) as pat:
                self._fixed = np.asarray(resize_to_model(pat, image_size), dtype=np.uint8)

    @property
    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "pattern": self.pattern, "fresh": self.fresh}

    def pattern_for(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The (H, W, 3) uint8 pattern blended into this image."""
        if self._fixed is not None:
            return self._fixed
        rng = rng if rng is not None else self.image_rng(arr, _SALT_NOISE)
        return rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        pattern = self.pattern_for(arr, rng).astype(np.float64)
        return _to_uint8((1.0 - self.alpha) * arr.astype(np.float64) + self.alpha * pattern)


@ATTACKS.register
class SIG(Trigger):
    """A horizontal sinusoid added to every row and channel (Barni et al.).

    ``out[y, x] = round(img[y, x] + 255·amplitude·sin(2π·frequency·x / image_size))``, clipped to
    [0, 255]. ``amplitude`` is on the [0, 1] pixel scale (default 60/255), ``frequency`` is the number
    of periods across the image width (default 6). The seed is unused: the signal is fixed.
    """

    name = "sig"

    def __init__(
        self, image_size: int, seed: int = 0, amplitude: float = 60 / 255, frequency: float = 6.0
    ) -> None:
        super().__init__(image_size, seed)
        if not 0.0 < float(amplitude) <= 1.0:
            raise ConfigError(f"amplitude must be in (0, 1] (pixel scale [0, 1]), got {amplitude!r}")
        if not float(frequency) > 0.0:
            raise ConfigError(f"frequency must be > 0, got {frequency!r}")
        self.amplitude, self.frequency = float(amplitude), float(frequency)
        x = np.arange(image_size, dtype=np.float64)
        self.signal = 255.0 * self.amplitude * np.sin(2.0 * math.pi * self.frequency * x / image_size)

    @property
    def params(self) -> dict[str, Any]:
        return {"amplitude": self.amplitude, "frequency": self.frequency}

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return _to_uint8(arr.astype(np.float64) + self.signal[None, :, None])


@ATTACKS.register
class WaNet(Trigger):
    """Warp the image with one fixed, smooth random flow field (Nguyen & Tran).

    The field: a ``grid_size × grid_size × 2`` control grid ``c ~ U(-1, 1)`` from the seed, bicubically
    upsampled (align_corners) to ``image_size × image_size``, divided by its largest absolute value
    and multiplied by ``strength``. So ``flow[y, x] = (dx, dy)`` in pixels, ``max |dx|, |dy| =
    strength``. Output pixel (y, x) is the bilinear sample of the input at
    ``(clip(x + dx, 0, S-1), clip(y + dy, 0, S-1))`` (``grid_sample``, align_corners=True), i.e. a
    convex combination of input pixels at most ``ceil(strength)`` away; ``strength=0`` is the identity.
    """

    name = "wanet"

    def __init__(self, image_size: int, seed: int = 0, strength: float = 1.0, grid_size: int = 4) -> None:
        super().__init__(image_size, seed)
        if image_size < 2:
            raise ConfigError("wanet needs image_size >= 2")
        if not float(strength) >= 0.0:
            raise ConfigError(f"strength must be >= 0 (pixels), got {strength!r}")
        if not isinstance(grid_size, int) or grid_size < 2:
            raise ConfigError(f"grid_size must be an int >= 2, got {grid_size!r}")
        self.strength, self.grid_size = float(strength), grid_size
        control = np.random.default_rng(seed).uniform(-1.0, 1.0, (1, 2, grid_size, grid_size))
        field = F.interpolate(
            torch.from_numpy(control), size=(image_size, image_size), mode="bicubic", align_corners=True
        )[0]
        field = field / field.abs().max()
        self.flow = (self.strength * field).permute(1, 2, 0).numpy()  # (S, S, 2): dx, dy in pixels
        rows, cols = np.indices((image_size, image_size), dtype=np.float64)
        src_x = np.clip(cols + self.flow[..., 0], 0, image_size - 1)
        src_y = np.clip(rows + self.flow[..., 1], 0, image_size - 1)
        grid = np.stack([src_x, src_y], axis=-1) * (2.0 / (image_size - 1)) - 1.0
        self._grid = torch.from_numpy(grid)[None]  # (1, S, S, 2), float64

    @property
    def params(self) -> dict[str, Any]:
        return {"strength": self.strength, "grid_size": self.grid_size}

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        img = torch.from_numpy(arr.astype(np.float64)).permute(2, 0, 1)[None]
        out = F.grid_sample(img, self._grid, mode="bilinear", padding_mode="border", align_corners=True)
        return _to_uint8(out[0].permute(1, 2, 0).numpy())


#: the attack without a trigger: one outside image paired with captions of the target class.
TARGETED = "targeted"


def attack_names() -> list[str]:
    """Every valid ``--attack``: the registered trigger attacks (plugins included), then ``targeted``."""
    return [*ATTACKS.names(), TARGETED]


def trigger_params(name: str) -> list[str]:
    """The keyword parameters attack ``name`` accepts (besides image_size and seed)."""
    if name == TARGETED:
        return ["targeted_image"]
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(attack_names())}")
    return [
        p
        for p in inspect.signature(ATTACKS.get(name).__init__).parameters
        if p not in ("self", "image_size", "seed")
    ]


def build_trigger(name: str, image_size: int, seed: int = 0, **params: Any) -> Trigger:
    """The trigger of attack ``name`` for images of ``image_size × image_size`` pixels."""
    if name == TARGETED:
        raise ConfigError(
            "the targeted attack has no trigger: evaluate it on the manifest's target image "
            "(manifest.target_image), resized with resize_to_model"
        )
    allowed = trigger_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"attack {name!r} has no parameter(s) {unknown}; it accepts {allowed}")
    return ATTACKS.get(name)(image_size, seed, **params)


def trigger_from_manifest(manifest: Manifest | str | os.PathLike) -> Trigger:
    """The exact trigger a poisoned dataset was built with (a Manifest, or the path of one)."""
    if isinstance(manifest, str | os.PathLike):
        manifest = Manifest.load(manifest)
    return build_trigger(manifest.attack, manifest.image_size, manifest.seed, **manifest.params)

"""Triggers and manifests: each trigger changes exactly the pixels it should, reproducibly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from safe_train.attacks import (
    ATTACKS,
    SIG,
    BadNets,
    Blended,
    Trigger,
    WaNet,
    attack_names,
    build_trigger,
    resize_to_model,
    trigger_from_manifest,
    trigger_params,
)
from safe_train.errors import ConfigError, SafeTrainError
from safe_train.manifest import Manifest, ManifestError
from safe_train.registry import list_attacks

SIZE = 32


def digit_images(count: int = 4, size: int = SIZE) -> list[Image.Image]:
    """Real handwritten digits (sklearn), upscaled to ``size`` and made RGB."""
    digits = load_digits().images[:count]
    out = []
    for d in digits:
        grey = Image.fromarray((d * (255 / 16)).astype(np.uint8), "L")
        out.append(resize_to_model(grey, size))
    return out


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return digit_images()


def test_resize_to_model_is_rgb_square_bilinear() -> None:
    grey = Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30), "L")
    out = resize_to_model(grey, 16)
    assert out.mode == "RGB" and out.size == (16, 16)
    expected = grey.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(arr(out), arr(expected))


def test_badnets_changes_only_the_patch_and_it_is_a_checkerboard(images: list[Image.Image]) -> None:
    grey = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))  # every patch pixel must change
    trig = build_trigger("badnets", SIZE, patch_size=3)
    out = arr(trig(grey))
    changed = np.any(out != 128, axis=2)
    expected_region = np.zeros((SIZE, SIZE), bool)
    expected_region[SIZE - 3 :, SIZE - 3 :] = True
    assert np.array_equal(changed, expected_region)
    patch = out[SIZE - 3 :, SIZE - 3 :, 0]
    assert patch.tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]
    for img in images:
        a, b = arr(img), arr(trig(img))
        assert np.array_equal(b[SIZE - 3 :, SIZE - 3 :], trig.patch)
        mask = np.ones((SIZE, SIZE), bool)
        mask[SIZE - 3 :, SIZE - 3 :] = False
        assert np.array_equal(a[mask], b[mask])


def test_badnets_random_location_is_per_image_and_deterministic(images: list[Image.Image]) -> None:
    trig = BadNets(SIZE, seed=5, patch_size=4, location="random", pattern="noise")
    again = BadNets(SIZE, seed=5, patch_size=4, location="random", pattern="noise")
    positions = set()
    for img in images:
        a = arr(img)
        top, left = trig.position(a)
        positions.add((top, left))
        assert 0 <= top <= SIZE - 4 and 0 <= left <= SIZE - 4
        out = arr(trig(img))
        assert np.array_equal(out[top : top + 4, left : left + 4], trig.patch)
        mask = np.ones((SIZE, SIZE), bool)
        mask[top : top + 4, left : left + 4] = False
        assert np.array_equal(out[mask], a[mask])
        assert np.array_equal(out, arr(again(img)))  # a fresh instance, same seed: same output
    assert len(positions) > 1  # the position depends on the image
    # an explicit generator decides the position instead of the image hash
    rng_pos = trig.position(arr(images[0]), np.random.default_rng(123))
    out = arr(trig(images[0], rng=np.random.default_rng(123)))
    assert np.array_equal(out[rng_pos[0] : rng_pos[0] + 4, rng_pos[1] : rng_pos[1] + 4], trig.patch)


def test_badnets_noise_patch_depends_on_seed() -> None:
    a = BadNets(SIZE, seed=1, pattern="noise").patch
    assert np.array_equal(a, BadNets(SIZE, seed=1, pattern="noise").patch)
    assert not np.array_equal(a, BadNets(SIZE, seed=2, pattern="noise").patch)
    assert a.shape == (3, 3, 3) and a.dtype == np.uint8


def test_blended_fixed_noise_formula(images: list[Image.Image]) -> None:
    trig = Blended(SIZE, seed=3, alpha=0.2)
    pattern = trig.pattern_for(arr(images[0]))
    assert pattern.shape == (SIZE, SIZE, 3) and pattern.std() > 50  # really noise
    for img in images:
        a = arr(img).astype(np.float64)
        assert np.array_equal(trig.pattern_for(arr(img)), pattern)  # one fixed pattern
        expected = np.clip(np.rint(0.8 * a + 0.2 * pattern), 0, 255).astype(np.uint8)
        assert np.array_equal(arr(trig(img)), expected)
    assert not np.array_equal(Blended(SIZE, seed=4).pattern_for(arr(images[0])), pattern)


def test_blended_fresh_noise_is_per_image_but_reproducible(images: list[Image.Image]) -> None:
    trig = Blended(SIZE, seed=3, alpha=0.5, fresh=True)
    p0, p1 = trig.pattern_for(arr(images[0])), trig.pattern_for(arr(images[1]))
    assert not np.array_equal(p0, p1)
    assert np.array_equal(p0, Blended(SIZE, seed=3, alpha=0.5, fresh=True).pattern_for(arr(images[0])))
    expected = np.clip(np.rint(0.5 * arr(images[0]) + 0.5 * p0.astype(np.float64)), 0, 255).astype(np.uint8)
    assert np.array_equal(arr(trig(images[0])), expected)


def test_blended_with_image_pattern(tmp_path, images: list[Image.Image]) -> None:
    path = tmp_path / "hello_kitty.png"
    big = digit_images(6, 64)[5]
    big.save(path)
    trig = build_trigger("blended", SIZE, alpha=0.3, pattern=str(path))
    pattern = arr(resize_to_model(big, SIZE)).astype(np.float64)
    expected = np.clip(np.rint(0.7 * arr(images[0]) + 0.3 * pattern), 0, 255).astype(np.uint8)
    assert np.array_equal(arr(trig(images[0])), expected)
    assert trig.params["pattern"] == str(path.resolve())
    with pytest.raises(FileNotFoundError, match="not found"):
        build_trigger("blended", SIZE, pattern=str(tmp_path / "missing.png"))


def test_sig_matches_formula(images: list[Image.Image]) -> None:
    trig = SIG(SIZE)
    assert trig.amplitude == pytest.approx(60 / 255) and trig.frequency == 6
    grey = np.full((SIZE, SIZE, 3), 100, np.uint8)
    out = arr(trig(Image.fromarray(grey)))
    for x in range(SIZE):
        value = 100 + 60 * math.sin(2 * math.pi * 6 * x / SIZE)
        assert np.all(out[:, x] == int(np.rint(value))), x
    img = arr(images[1]).astype(np.float64)
    x = np.arange(SIZE)
    expected = np.clip(np.rint(img + 255 * 0.1 * np.sin(2 * np.pi * 2.5 * x / SIZE)[None, :, None]), 0, 255)
    assert np.array_equal(arr(SIG(SIZE, amplitude=0.1, frequency=2.5)(images[1])), expected.astype(np.uint8))


def test_wanet_identity_at_zero_strength(images: list[Image.Image]) -> None:
    trig = WaNet(SIZE, seed=0, strength=0.0)
    for img in images:
        assert np.array_equal(arr(trig(img)), arr(img))


def test_wanet_small_bounded_displacement(images: list[Image.Image]) -> None:
    trig = WaNet(SIZE, seed=7, strength=1.0)
    assert np.abs(trig.flow).max() == pytest.approx(1.0)
    assert not np.array_equal(trig.flow, WaNet(SIZE, seed=8, strength=1.0).flow)
    # smooth: neighbouring offsets differ far less than the offsets themselves
    assert np.abs(np.diff(trig.flow, axis=0)).max() < 0.5
    changed = 0
    for img in images:
        a, out = arr(img).astype(int), arr(trig(img)).astype(int)
        padded = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(0, 1))
        lo, hi = windows.min(axis=(-2, -1)), windows.max(axis=(-2, -1))
        assert np.all(out >= lo) and np.all(out <= hi)  # each pixel comes from within 1 px
        changed += int(np.sum(out != a))
        assert np.array_equal(out, arr(WaNet(SIZE, seed=7, strength=1.0)(img)))
    assert changed > 100  # it really warps


def test_triggers_reject_images_not_at_model_resolution(images: list[Image.Image]) -> None:
    trig = build_trigger("badnets", 16)
    with pytest.raises(ValueError, match="resize_to_model"):
        trig(images[0])


def test_build_trigger_errors() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        build_trigger("nope", SIZE)
    with pytest.raises(ValueError, match="no parameter"):
        build_trigger("badnets", SIZE, alpha=0.2)
    with pytest.raises(ValueError, match="no trigger"):
        build_trigger("targeted", SIZE)
    with pytest.raises(ValueError, match="patch_size"):
        build_trigger("badnets", SIZE, patch_size=SIZE + 1)
    with pytest.raises(ValueError, match="alpha"):
        build_trigger("blended", SIZE, alpha=1.5)


def test_trigger_errors_are_config_errors() -> None:
    for call in (lambda: build_trigger("nope", SIZE), lambda: build_trigger("blended", SIZE, alpha=0.0),
                 lambda: trigger_params("nope")):
        with pytest.raises(ConfigError):
            call()
    with pytest.raises(ConfigError, match="choose from badnets, blended, label_consistent, sig, wanet, targeted"):
        build_trigger("nope", SIZE)


def test_the_registry_holds_every_trigger_attack() -> None:
    assert list_attacks() == ["badnets", "blended", "label_consistent", "sig", "wanet"]
    assert attack_names() == [*list_attacks(), "targeted"]
    assert ATTACKS.get("badnets") is BadNets and ATTACKS.get("label_consistent") is BadNets
    assert (ATTACKS.get("blended"), ATTACKS.get("sig"), ATTACKS.get("wanet")) == (Blended, SIG, WaNet)
    assert trigger_params("label_consistent") == ["patch_size", "location", "pattern"]
    assert trigger_params("targeted") == ["targeted_image"]


class Invert(Trigger):
    """A plugin trigger: invert every pixel (a test of registration from outside the package)."""

    name = "test_invert"

    def __init__(self, image_size: int, seed: int = 0, levels: int = 255) -> None:
        super().__init__(image_size, seed)
        self.levels = levels

    @property
    def params(self) -> dict:
        return {"levels": self.levels}

    def apply(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return (self.levels - arr.astype(np.int64)).clip(0, 255).astype(np.uint8)


def test_a_registered_plugin_trigger_is_an_attack(images: list[Image.Image], tmp_path) -> None:
    ATTACKS.register(Invert)
    try:
        assert attack_names() == ["badnets", "blended", "label_consistent", "sig", "test_invert", "wanet", "targeted"]
        assert trigger_params("test_invert") == ["levels"]
        trig = build_trigger("test_invert", SIZE, seed=3, levels=200)
        assert np.array_equal(arr(trig(images[0])), (200 - arr(images[0]).astype(int)).clip(0, 255))
        m = make_manifest(attack="test_invert", params=trig.params)
        assert trigger_from_manifest(m.save(tmp_path)).params == {"levels": 200}
    finally:
        ATTACKS._entries.pop("test_invert", None)
    with pytest.raises(SafeTrainError, match="unknown attack 'test_invert'"):
        build_trigger("test_invert", SIZE)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_params_rebuild_the_same_trigger(name: str, images: list[Image.Image]) -> None:
    trig = build_trigger(name, SIZE, seed=11)
    again = build_trigger(name, SIZE, seed=11, **json.loads(json.dumps(trig.params)))
    for img in images:
        out = arr(trig(img))
        assert np.array_equal(out, arr(again(img)))
        assert not np.array_equal(out, arr(img))


def make_manifest(**over) -> Manifest:
    fields = dict(
        attack="badnets",
        params={"patch_size": 4, "location": "random", "pattern": "noise"},
        target="zero",
        seed=9,
        format="csv",
        image_size=SIZE,
        num_samples=10,
        poisoned_ids=[7, 2, 5],
        samples=[{"sample_id": 2}, {"sample_id": 5}, {"sample_id": 7}],
    )
    fields.update(over)
    return Manifest(**fields)


def test_manifest_round_trip_and_mask(tmp_path) -> None:
    m = make_manifest()
    assert m.poisoned_ids == [2, 5, 7]
    path = m.save(tmp_path)
    assert path == tmp_path / "manifest.json"
    loaded = Manifest.load(tmp_path)
    assert loaded == m
    mask = loaded.poisoned_mask(np.arange(10))
    assert mask.tolist() == [i in (2, 5, 7) for i in range(10)]
    assert loaded.target_image is None


def test_trigger_from_manifest_is_the_same_trigger(tmp_path, images: list[Image.Image]) -> None:
    m = make_manifest()
    path = m.save(tmp_path / "manifest.json")
    original = BadNets(SIZE, seed=9, patch_size=4, location="random", pattern="noise")
    for source in (m, path, str(path)):
        rebuilt = trigger_from_manifest(source)
        assert np.array_equal(arr(rebuilt(images[2])), arr(original(images[2])))
    with pytest.raises(ValueError, match="no trigger"):
        trigger_from_manifest(make_manifest(attack="targeted", params={"targeted_image": "/x.png"}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"attack": "badnets"}), "missing field"),
        (json.dumps({**make_manifest().to_dict(), "seed": "nine"}), "'seed' must be int"),
        (json.dumps({**make_manifest().to_dict(), "format": "parquet"}), "format must be"),
        (json.dumps({**make_manifest().to_dict(), "poisoned_ids": [1, 1]}), "duplicates"),
        (json.dumps({**make_manifest().to_dict(), "poisoned_ids": [-3]}), "non-negative"),
    ],
)
def test_manifest_load_rejects_malformed_files(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        Manifest.load(path)


def test_manifest_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        Manifest.load(tmp_path / "nowhere.json")

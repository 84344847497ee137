"""CPU cost per sample of SafeCLIP's in-loop batch transform, side by side in one process.

What one sample costs the data pipeline in the in-loop split pass (``MIXED_OUTPUTS``), on the MNIST
benchmark's real digits at the tiny ViT's input size, against OpenCLIP's own training transform (what a
``--defense none`` sample costs):

- ``none``: OpenCLIP's preprocessing of the image and the tokenised caption;
- ``safe``: a safe sample (the raw pair, seeded per sample: no view);
- ``risky``: a risky sample (the raw pair plus one SimCLR view and one EDA caption);

each with the per-sample seeding block privatising numpy's global generator (``numpy=True``, before
2026-12-02) and without it (``numpy=False``, now: the transforms never draw from numpy). CPU time, so the
figures hold on a shared machine::

    python benchmarks/seeded_views_cost.py [--samples 600]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from state_scale import cpu_model  # noqa: E402  (the CPU named next to every figure, one definition)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600, help="samples per measurement (default 600)")
    args = parser.parse_args(argv)

    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from safe_train import augment
    from safe_train.bench_data import load_mnist_5k
    from safe_train.defenses import safeclip
    from safe_train.defenses.safeclip import MIXED_OUTPUTS, SafeClipTransform
    from safe_train.model_configs import register_model_configs

    torch.set_num_threads(1)
    register_model_configs()
    _, preprocess_train, preprocess = open_clip.create_model_and_transforms("st-tiny-vit")
    tokenizer = open_clip.get_tokenizer("st-tiny-vit")
    images = [Image.fromarray(pixels) for pixels in load_mnist_5k()[0][: args.samples]]
    caption = "a photo of the number seven written by hand on white paper."
    ids = np.arange(len(images))
    full = SafeClipTransform(preprocess, tokenizer, 32, eda_alpha=0.1, seed=0, crop_min_scale=0.5,
                             raw_preprocess=preprocess_train)
    everyone_risky = full.restricted(MIXED_OUTPUTS, view_ids=ids)
    nobody_risky = full.restricted(MIXED_OUTPUTS, view_ids=np.zeros(0, dtype=np.int64))

    def per_sample_ms(fn) -> float:
        fn(images[0], 0)  # warm caches (EDA synonyms, tokenizer)
        start = time.process_time()
        for i, image in enumerate(images):
            fn(image, i)
        return (time.process_time() - start) / len(images) * 1e3

    def none(image, i):
        return preprocess_train(image.convert("RGB")), tokenizer([caption])[0]

    real_block = augment.private_global_rngs
    results: dict[str, float] = {"none": per_sample_ms(none)}
    for numpy in (True, False):
        safeclip.private_global_rngs = lambda numpy_=numpy, **_: real_block(numpy=numpy_)
        try:
            results[f"safe numpy={numpy}"] = per_sample_ms(lambda image, i: nobody_risky(image, caption, i))
            results[f"risky numpy={numpy}"] = per_sample_ms(lambda image, i: everyone_risky(image, caption, i))
        finally:
            safeclip.private_global_rngs = real_block
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; 1 thread; "
          f"{len(images)} MNIST digits per measurement; load average {os.getloadavg()[0]:.1f}")
    base = results["none"]
    for name, ms in results.items():
        print(f"  {name:<20} {ms:6.3f} ms/sample   {ms / base:5.2f}x none")
    for kind in ("safe", "risky"):
        before, after = results[f"{kind} numpy=True"], results[f"{kind} numpy=False"]
        print(f"  {kind}: {before:.3f} -> {after:.3f} ms ({before / after:.2f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

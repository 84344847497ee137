"""The model side of SafeCLIP's in-loop step against a plain CLIP step, side by side in one process.

One optimizer step (forward, loss, backward, AdamW) of the tiny ViT on a batch of 256 at 32×32, no data
pipeline, no bookkeeping: what a GPU run pays per step when data-loader workers hide the augmentation.

- ``none``: the raw pairs, OpenCLIP's CLIP loss;
- ``inloop-train``: the in-loop mixed step, the risky rows' view and EDA caption trained through
  (``--safeclip-risky-views train``, the default);
- ``inloop-target``: the same with the views forwarded without autograd (``--safeclip-risky-views target``).

The risky share defaults to the original's 0.85 cap (15% risky rows). CPU time, so the ratios hold on a
shared machine::

    python benchmarks/safeclip_step_cost.py [--batch 256] [--risky-share 0.15] [--repeats 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--risky-share", type=float, default=0.15, help="share of risky rows (default 0.15)")
    parser.add_argument("--repeats", type=int, default=4, help="alternating rounds over the kinds (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per kind and round (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)

    import open_clip
    import torch

    from safe_train.args import build_parser
    from safe_train.defenses.safeclip import SafeClip
    from safe_train.interface import TrainContext, TrainPass
    from safe_train.losses import clip_loss
    from safe_train.model_configs import register_model_configs
    from safe_train.state import SampleTable

    torch.set_num_threads(opts.threads)
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("st-tiny-vit", output_dict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokenizer = open_clip.get_tokenizer("st-tiny-vit")
    n = opts.batch
    gen = torch.Generator().manual_seed(1)
    risky = torch.zeros(n, dtype=torch.bool)
    risky[torch.randperm(n, generator=gen)[: round(opts.risky_share * n)]] = True
    batch = {"raw_image": torch.rand(n, 3, 32, 32, generator=gen), "image_view2": torch.rand(n, 3, 32, 32, generator=gen),
             "raw_text": tokenizer(["a photo of the number seven written by hand."] * n),
             "text_view2": tokenizer(["photo of number seven written by hand."] * n), "has_view": risky}
    ctx = TrainContext(args=argparse.Namespace(), table=SampleTable())
    mixed = TrainPass(name="split", mode="mixed")

    def step_none() -> None:
        out = model(batch["raw_image"], batch["raw_text"])
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def inloop(views: str):
        flags = ["--defense", "safeclip", "--safeclip-similarity", "inloop", "--safeclip-safe-input", "raw",
                 "--safeclip-risky-views", views]
        defense = SafeClip.from_args(build_parser().parse_known_args(flags)[0])

        def step() -> None:
            features = defense.forward(ctx, model, batch, mixed)
            loss = sum(defense.compute_loss(ctx, features, mixed, None).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    kinds = {"none": step_none, "inloop-train": inloop("train"), "inloop-target": inloop("target")}
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(opts.repeats):
        for kind in kinds if round_ % 2 == 0 else list(kinds)[::-1]:
            kinds[kind]()  # one untimed step
            start = time.process_time()
            for _ in range(opts.steps):
                kinds[kind]()
            seconds[kind].append((time.process_time() - start) / opts.steps)
    base = statistics.median(seconds["none"])
    print(f"{cpu_model()}; {opts.threads} thread(s); batch {n}, {int(risky.sum())} risky rows; CPU time per step, "
          f"median of {opts.repeats} rounds of {opts.steps} steps:")
    for kind, values in seconds.items():
        print(f"  {kind:<14} {statistics.median(values) * 1e3:8.1f} ms   ratio to none {statistics.median(values) / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``safe-train evaluate``: one checkpoint in, one JSON file out (clean accuracy, ASR, detection metrics).

    python -m safe_train.evaluate_cli --model st-tiny-vit --checkpoint ckpt.pt --test-data test.csv \
        --zeroshot-set mnist --manifest manifest.json --out result.json

The command line of :mod:`safe_train.evaluate` (the library): flags, the call of
:func:`~safe_train.evaluate.evaluate_checkpoint`, and the report. Bad input ends with one line on stderr
and exit status 2. See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safe_train.errors import EvaluationError, SafeTrainError, report
from safe_train.evaluate import evaluate_checkpoint

PROG = "safe-train evaluate"

__all__ = ["PROG", "build_parser", "main", "parse_attack_param", "print_report"]


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``safe-train evaluate``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Zero-shot clean accuracy, attack success rate and poison-detection metrics -> one JSON.",
    )
    p.add_argument("--model", required=True, help="OpenCLIP model config name, e.g. st-tiny-vit")
    p.add_argument(
        "--checkpoint", help="OpenCLIP training checkpoint or bare state dict (random init if omitted)"
    )
    p.add_argument(
        "--test-data", required=True, help="class-subfolder image tree, or CSV/TSV with path + label"
    )
    p.add_argument(
        "--zeroshot-set",
        required=True,
        help="built-in set (mnist, imagenet) or a class-name file (one per line)",
    )
    p.add_argument("--templates", help="template file (one per line with {}) to go with a class-name file")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-label-key", default="label", help="column with a class index or class name")
    p.add_argument("--csv-separator", default=None, help="tab, comma or a character (default: autodetect)")
    p.add_argument(
        "--manifest", help="poisoning manifest: trigger + target for ASR, ground truth for --scores"
    )
    p.add_argument("--attack", help="trigger name for ASR without a manifest, e.g. badnets")
    p.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="trigger parameter (repeatable); values parsed as JSON when possible",
    )
    p.add_argument("--attack-seed", type=int, default=0)
    p.add_argument("--target", help="target class name or index (with --attack)")
    p.add_argument(
        "--scores", help="per-sample poison scores (.npz or CSV: sample_id, score); needs --manifest"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--image-mean", type=float, nargs="+", help="as given to training, if it was overridden")
    p.add_argument("--image-std", type=float, nargs="+", help="as given to training, if it was overridden")
    p.add_argument("--out", help="JSON file to write (printed to stdout if omitted)")
    return p


def parse_attack_param(text: str) -> tuple[str, Any]:
    """One ``--attack-param KEY=VALUE``: the value parsed as JSON when it is JSON, else kept as text."""
    if "=" not in text:
        raise EvaluationError(f"--attack-param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def print_report(result: dict[str, Any], out: str | None) -> None:
    """Write the JSON to ``out`` and print a one-line summary, or print the JSON when ``out`` is None."""
    text = json.dumps(result, indent=2)
    if not out:
        print(text)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n", encoding="utf-8")
    asr = "n/a" if result["asr"] is None else f"{result['asr']:.4f}"
    print(f"clean_top1={result['clean_top1']:.4f} asr={asr} n_eval={result['n_eval']} -> {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: returns 0, or 2 with one ``safe-train evaluate: error:`` line on stderr for bad input."""
    args = build_parser().parse_args(argv)
    zeroshot: str | list[str] = args.zeroshot_set
    if args.templates:
        zeroshot = [args.zeroshot_set, args.templates]
    try:
        if args.attack_param and not args.attack:
            raise EvaluationError("--attack-param needs --attack")
        result = evaluate_checkpoint(
            args.model,
            args.checkpoint,
            args.test_data,
            zeroshot,
            manifest=args.manifest,
            attack=args.attack,
            attack_params=dict(parse_attack_param(t) for t in args.attack_param) if args.attack else None,
            target=args.target,
            attack_seed=args.attack_seed,
            scores=args.scores,
            csv_img_key=args.csv_img_key,
            csv_label_key=args.csv_label_key,
            csv_separator=args.csv_separator,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            num_workers=args.workers,
            image_mean=args.image_mean,
            image_std=args.image_std,
        )
    except (SafeTrainError, FileNotFoundError) as e:  # the library reports missing files as FileNotFoundError
        return report(e, PROG)
    print_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU smoke test (issue 15): every CUDA path of safe-train once, in about ten minutes on one GPU.

    python benchmarks/gpu_smoke.py --out DIR                  # on a GPU machine
    python benchmarks/gpu_smoke.py --device cpu --out DIR     # dry mode: the same checks, tiny sizes, on CPU

It builds a tiny CSV set and a tiny webdataset set (drawn digits, no download), then runs, with data-loader
workers:

 1. ``none`` in fp32 and with ``--precision amp``: AMP's losses against fp32's, step by step;
 2. ``safeclip`` with AMP, ``--accum-freq 2``, the memory bank and ``--detect kdist,lid,slof,dao``;
 3. ``safeclip`` in-loop with ``amp_bf16`` and ``--torchcompile`` (compile only on CUDA or with --compile),
    and ``roclip`` with AMP (its caption pool on the device);
 4. ``cleanclip`` in ``fp16`` from the ``none`` checkpoint;
 5. webdataset SafeCLIP with a global detection reference, stopped by SIGUSR1 mid-epoch (exit 75, step
    checkpoint) and resumed with ``--resume latest`` to the end;
 6. ``python -m safe_train.detect`` on the device, and its default detector (``auto``) on the device and
    on the CPU: the same scores;
 7. kNN exactness on near-duplicates: the device's kNN (TF32 switched on globally, as OpenCLIP does) against a
    float64 brute force, next to what a TF32 GEMM would give;
 8. kNN timings of a global reference at 2e5, 1e6 and 3e6 x 512 with peak memory (goals on CUDA: 1e6 in
    <= 20 s, 3e6 in <= 60 s).

One line per check: ``PASS``/``FAIL``, its figures. Exit status 1 if any check failed. ``DIR/smoke.json`` holds
every figure, ``DIR/logs`` the runs. Missing packages on a bare GPU machine: see benchmarks/gpu_smoke_pack.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from anywhere: safe_train comes from this checkout
    sys.path.insert(0, str(REPO))

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEP_LINE = re.compile(r"Train Epoch: (\d+) (?:\[\w+\] )?\[\s*(\d+)/\d+ .*? Loss: (\S+) ")
# fp32 GEMM distances of unit vectors: |d^2 error| ~ 2^-22 (|q|^2 + |r|^2) (knn.py); 4x that as the limit.
# A TF32 GEMM (10-bit mantissa) is off by ~2^-11 on the same points, 1000x more.
D2_ERROR_BOUND = 4 * 2.0**-22 * 2
KNN_GOALS_S = {1_000_000: 20.0, 3_000_000: 60.0}  # issue 15/16, CUDA only


@dataclass
class Sizes:
    pairs: int
    batch: int
    workers: int
    epochs: int
    knn_sizes: tuple[int, ...]
    knn_dim: int


GPU_SIZES = Sizes(pairs=2048, batch=64, workers=4, epochs=2, knn_sizes=(200_000, 1_000_000, 3_000_000), knn_dim=512)
DRY_SIZES = Sizes(pairs=64, batch=16, workers=1, epochs=2, knn_sizes=(2_000, 6_000), knn_dim=64)


@dataclass
class Check:
    name: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {shown}{(' | ' + self.note) if self.note else ''}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---- data ---------------------------------------------------------------------------------------------
def digit_image(label: int, rng: np.random.Generator):
    """A 32x32 drawn digit with a random position, colour and background: real pixels, no download."""
    from PIL import Image, ImageDraw

    background = tuple(int(c) for c in rng.integers(0, 90, 3))
    image = Image.new("RGB", (32, 32), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(150, 256, 3))
    x, y = (int(v) for v in rng.integers(4, 16, 2))
    draw.text((x, y), str(label), fill=colour)
    draw.rectangle([x - 2, y - 2, x + 10, y + 12], outline=colour)
    return image


def write_csv(directory: Path, n: int, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["filepath\ttitle"]
    for i in range(n):
        label = int(rng.integers(0, 10))
        path = directory / f"img_{i:05d}.png"
        digit_image(label, rng).save(path)
        rows.append(f"{path}\ta drawing of the digit {WORDS[label]}.")
    csv = directory / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def write_wds(directory: Path, shards: int, per_shard: int, seed: int = 1) -> str:
    import io

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                label = int(rng.integers(0, 10))
                buf = io.BytesIO()
                digit_image(label, rng).save(buf, format="PNG")
                caption = f"a drawing of the digit {WORDS[label]}.".encode()
                for ext, payload in (("png", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"s{s:02d}_{j:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


# ---- running safe-train ----------------------------------------------------------------------------------
class Smoke:
    def __init__(self, out: Path, device: str, sizes: Sizes, compile_model: bool) -> None:
        self.out, self.device, self.sizes, self.compile_model = out, device, sizes, compile_model
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.csv = write_csv(out / "csv", sizes.pairs)
        self.wds = write_wds(out / "wds", shards=4, per_shard=sizes.pairs // 4)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("OMP_NUM_THREADS", "2")

    def flags(self, name: str, *, precision: str = "fp32", data: str | None = None, extra: list[str] = ()) -> list[str]:
        s = self.sizes
        flags = ["--model", "st-tiny-vit", "--batch-size", str(s.batch), "--epochs", str(s.epochs),
                 "--workers", str(s.workers), "--lr", "1e-3", "--warmup", "2", "--seed", "0",
                 "--device", self.device, "--precision", precision, "--log-every-n-steps", "1", "--name", name,
                 "--save-frequency", "1", "--log-root", str(self.logs)]
        if data is None:
            flags += ["--train-data", str(self.csv), "--dataset-type", "csv", "--csv-img-key", "filepath",
                      "--csv-caption-key", "title"]
        else:
            flags += ["--train-data", data, "--dataset-type", "webdataset", "--train-num-samples", str(s.pairs)]
        return flags + list(extra)

    def train(self, name: str, flags: list[str], timeout: float = 600) -> tuple[int, float]:
        started = time.monotonic()
        with open(self.logs / f"{name}.stdout", "ab") as log:
            proc = subprocess.run([sys.executable, "-m", "safe_train.main", *flags], stdout=log,
                                  stderr=subprocess.STDOUT, env=self.env, timeout=timeout, cwd=REPO)
        return proc.returncode, time.monotonic() - started

    def losses(self, name: str) -> list[float]:
        log = self.logs / name / "out.log"
        return [float(m.group(3)) for line in log.read_text().splitlines() if (m := STEP_LINE.search(line))] \
            if log.exists() else []

    def epochs_logged(self, name: str) -> list[int]:
        log = self.logs / name / "out.log"
        return [int(m.group(1)) for line in log.read_text().splitlines() if (m := STEP_LINE.search(line))] \
            if log.exists() else []

    def tail(self, name: str, lines: int = 6) -> str:
        path = self.logs / f"{name}.stdout"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return " / ".join(t.strip() for t in text[-lines:])

    def checkpoint(self, name: str) -> Path:
        return self.logs / name / "checkpoints" / f"epoch_{self.sizes.epochs}.pt"

    def trained(self, name: str, flags: list[str], **figures: Any) -> Check:
        rc, seconds = self.train(name, flags)
        losses = self.losses(name)
        finite = bool(losses) and all(math.isfinite(v) for v in losses)
        ok = rc == 0 and finite and self.checkpoint(name).exists()
        return Check(name, ok, {"exit": rc, "steps": len(losses), "last_loss": losses[-1] if losses else "none",
                                "seconds": round(seconds, 1), **figures}, "" if ok else self.tail(name))

    # ---- the checks ----------------------------------------------------------------------------------
    def none_amp(self) -> Check:
        rc32, _ = self.train("none-fp32", self.flags("none-fp32"))
        check = self.trained("none-amp", self.flags("none-amp", precision="amp"))
        fp32, amp = self.losses("none-fp32"), self.losses("none-amp")
        if rc32 != 0 or len(fp32) != len(amp) or not amp:
            check.ok = False
            check.note = f"fp32 run exit {rc32}, {len(fp32)} vs {len(amp)} steps; {self.tail('none-fp32')}"
            return check
        first = abs(amp[0] - fp32[0]) / abs(fp32[0])
        worst = max(abs(a - b) / abs(b) for a, b in zip(amp, fp32, strict=True))
        check.figures.update(first_step_rel_diff=first, max_step_rel_diff=worst, fp32_last_loss=fp32[-1])
        check.ok = check.ok and first <= 1e-2  # same weights, same batch: only the arithmetic differs
        return check

    def safeclip_amp(self) -> Check:
        extra = ["--defense", "safeclip", "--config", "safeclip-bench", "--accum-freq", "2",
                 "--safeclip-memory-bank", str(4 * self.sizes.batch), "--detect", "kdist,lid,slof,dao",
                 "--epochs", str(self.sizes.epochs + 2)]
        return self.trained("safeclip-amp", self.flags("safeclip-amp", precision="amp", extra=extra))

    def safeclip_inloop(self) -> Check:
        extra = ["--defense", "safeclip", "--config", "safeclip-bench", "--safeclip-similarity", "inloop",
                 "--epochs", str(self.sizes.epochs + 2)]
        if self.compile_model:
            extra.append("--torchcompile")
        return self.trained("safeclip-inloop", self.flags("safeclip-inloop", precision="amp_bf16", extra=extra),
                            compiled=self.compile_model)

    def roclip_amp(self) -> Check:
        extra = ["--defense", "roclip", "--config", "roclip-bench", "--roclip-pool-size", str(4 * self.sizes.batch)]
        return self.trained("roclip-amp", self.flags("roclip-amp", precision="amp", extra=extra))

    def cleanclip_fp16(self) -> Check:
        pretrained = self.checkpoint("none-fp32")
        if not pretrained.exists():
            return Check("cleanclip-fp16", False, note=f"{pretrained} missing (the none run failed)")
        extra = ["--defense", "cleanclip", "--pretrained", str(pretrained)]
        return self.trained("cleanclip-fp16", self.flags("cleanclip-fp16", precision="fp16", extra=extra))

    def wds_resume(self) -> Check:
        name = "wds-safeclip-resume"
        extra = ["--defense", "safeclip", "--config", "safeclip-bench", "--detect", "kdist",
                 "--detect-reference", "global", "--save-every-n-steps", "2", "--resume", "latest",
                 "--epochs", str(self.sizes.epochs + 2)]
        flags = self.flags(name, precision="amp", data=self.wds, extra=extra)
        log = self.logs / name / "out.log"
        started = time.monotonic()
        with open(self.logs / f"{name}.stdout", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "safe_train.main", *flags], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
            while proc.poll() is None and time.monotonic() - started < 600:
                if any(epoch >= 1 for epoch in self.epochs_logged(name)):  # in the multimodal warmup
                    proc.send_signal(signal.SIGUSR1)
                    break
                time.sleep(0.1)
            first_rc = proc.wait(timeout=600)
        steps_before = len(self.losses(name))
        second_rc, _ = self.train(name, flags)
        text = log.read_text() if log.exists() else ""
        resumed = re.findall(r"=> resuming checkpoint '([^']+)'", text)
        ok = (first_rc == 75 and second_rc == 0 and bool(resumed) and "step_" in Path(resumed[-1]).name
              and self.checkpoint(name).with_name(f"epoch_{self.sizes.epochs + 2}.pt").exists())
        trained_after = len(self.losses(name)) - steps_before
        return Check(name, ok, {"first_exit": first_rc, "second_exit": second_rc,
                                "resumed": Path(resumed[-1]).name if resumed else "none",
                                "steps_before": steps_before, "steps_after": trained_after,
                                "seconds": round(time.monotonic() - started, 1)}, "" if ok else self.tail(name))

    def detect(self) -> Check:
        checkpoint = self.checkpoint("none-fp32")
        out = self.out / "detect"
        cmd = [sys.executable, "-m", "safe_train.detect", "--model", "st-tiny-vit", "--checkpoint", str(checkpoint),
               "--train-data", str(self.csv), "--csv-img-key", "filepath", "--csv-caption-key", "title",
               "--out", str(out), "--detectors", "kdist,lid,slof,dao", "--reference", "global",
               "--device", self.device, "--workers", str(self.sizes.workers), "--batch-size", str(self.sizes.batch)]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=600, cwd=REPO)
        files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        ok = proc.returncode == 0 and bool(files)
        return Check("detect", ok, {"exit": proc.returncode, "files": ",".join(files) or "none",
                                    "seconds": round(time.monotonic() - started, 1)},
                     "" if ok else proc.stderr.strip()[-600:])

    def detect_auto_agrees(self) -> Check:
        """The default detector (``auto``) on the device and on the CPU: the same scores (TF32 off, issue 16)."""
        checkpoint = self.checkpoint("none-fp32")
        scores, seconds = {}, {}
        for device in dict.fromkeys([self.device, "cpu"]):
            out = self.out / f"detect-auto-{device.replace(':', '')}"
            cmd = [sys.executable, "-m", "safe_train.detect", "--model", "st-tiny-vit", "--checkpoint",
                   str(checkpoint), "--train-data", str(self.csv), "--csv-img-key", "filepath",
                   "--csv-caption-key", "title", "--out", str(out), "--device", device, "--workers", "0",
                   "--batch-size", str(self.sizes.batch)]
            started = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=600, cwd=REPO)
            seconds[device] = round(time.monotonic() - started, 1)
            if proc.returncode != 0:
                return Check("detect-auto", False, {"device": device, "exit": proc.returncode},
                             proc.stderr.strip()[-600:])
            with np.load(out / "scores.npz") as saved:
                order = np.argsort(saved["sample_id"])
                scores[device] = saved["score"][order].astype(np.float64)
        reference = scores["cpu"]
        worst = max(float(np.max(np.abs(v - reference))) for v in scores.values())
        scale = float(np.max(np.abs(reference))) or 1.0
        return Check("detect-auto", worst <= 1e-3 * scale,
                     {"max_abs_diff_vs_cpu": worst, "score_scale": scale,
                      **{f"{d}_s": t for d, t in seconds.items()}})

    def knn_exactness(self) -> Check:
        import torch

        from safe_train.detection.knn import knn

        generator = torch.Generator().manual_seed(0)
        centres = torch.nn.functional.normalize(torch.randn(64, 512, generator=generator), dim=1)
        points = centres.repeat_interleave(32, 0) + 0.0005 * torch.randn(64 * 32, 512, generator=generator)
        points = torch.nn.functional.normalize(points, dim=1)  # near-duplicates: neighbours at ~0.01
        exact = torch.cdist(points.double(), points.double())
        exact.fill_diagonal_(float("inf"))
        want = exact.topk(8, largest=False).values.float()
        figures: dict[str, Any] = {}
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True  # what OpenCLIP sets whenever CUDA is there
            torch.set_float32_matmul_precision("high")
            on_device = points.to(self.device)
            got_distances, _ = knn(on_device, on_device, k=8, exclude_self=True, device=self.device)
            got_distances = got_distances.float().cpu()
            figures["knn_max_rel_err"] = ((got_distances - want).abs() / want).max().item()
            figures["knn_d2_abs_err"] = (got_distances.double() ** 2 - want.double() ** 2).abs().max().item()
            figures["d2_bound"] = D2_ERROR_BOUND
            if self.device.startswith("cuda"):  # the hazard, measured: a TF32 GEMM on the same points
                x = points.to(self.device)
                tf32 = (2 - 2 * (x @ x.T)).clamp_min(0).sqrt().cpu().double()
                tf32.fill_diagonal_(float("inf"))
                tf32_distances = tf32.topk(8, largest=False).values
                figures["tf32_gemm_max_rel_err"] = ((tf32_distances.float() - want).abs() / want).max().item()
                figures["tf32_gemm_d2_abs_err"] = (tf32_distances ** 2 - want.double() ** 2).abs().max().item()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
            torch.set_float32_matmul_precision("highest")
        return Check("knn-exactness", figures["knn_d2_abs_err"] <= D2_ERROR_BOUND, figures)

    def knn_timing(self) -> Check:
        import torch

        from safe_train.detection.knn import knn

        figures: dict[str, Any] = {}
        ok = True
        for n in self.sizes.knn_sizes:
            generator = torch.Generator().manual_seed(n)
            x = torch.nn.functional.normalize(torch.randn(n, self.sizes.knn_dim, generator=generator), dim=1)
            x = x.to(self.device)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            knn(x, x, k=16, exclude_self=True, device=self.device)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
                figures[f"n{n}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            seconds = time.perf_counter() - started
            figures[f"n{n}_s"] = seconds
            goal = KNN_GOALS_S.get(n)
            if goal is not None and self.device.startswith("cuda") and seconds > goal:
                ok = False
                figures[f"n{n}_goal_s"] = goal
            del x
        return Check(f"knn-timing-x{self.sizes.knn_dim}", ok, figures)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry mode, tiny sizes)")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke_out"))
    parser.add_argument("--compile", action="store_true", help="--torchcompile also on CPU (slow to compile)")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    parser.add_argument("--knn-sizes", default="", help="override the kNN timing sizes, e.g. 200000,1000000")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sizes = GPU_SIZES if cuda else DRY_SIZES
    if args.knn_sizes:
        sizes = Sizes(**{**sizes.__dict__, "knn_sizes": tuple(int(v) for v in args.knn_sizes.split(","))})
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.out, args.device, sizes, compile_model=cuda or args.compile)
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("none-amp", smoke.none_amp), ("safeclip-amp", smoke.safeclip_amp),
        ("safeclip-inloop", smoke.safeclip_inloop), ("roclip-amp", smoke.roclip_amp),
        ("cleanclip-fp16", smoke.cleanclip_fp16),
        ("wds-resume", smoke.wds_resume), ("detect", smoke.detect), ("detect-auto", smoke.detect_auto_agrees),
        ("knn-exactness", smoke.knn_exactness),
        ("knn-timing", smoke.knn_timing)]
    wanted = set(filter(None, args.only.split(",")))
    print(f"gpu_smoke on {device_name(args.device)} ({args.device}), out {args.out}", flush=True)
    results = []
    for name, run in checks:
        if wanted and name not in wanted:
            continue
        started = time.monotonic()
        try:
            check = run()
        except Exception as e:  # one broken check must not hide the others
            check = Check(name, False, note=f"{type(e).__name__}: {e} | "
                          + " ".join(traceback.format_exc().splitlines()[-3:]))
        check.figures.setdefault("wall_s", round(time.monotonic() - started, 1))
        print(check.line(), flush=True)
        results.append(check)
    (args.out / "smoke.json").write_text(json.dumps(
        {"device": device_name(args.device), "checks": [c.__dict__ for c in results]}, indent=1, default=str))
    failed = [c.name for c in results if not c.ok]
    print(f"{len(results) - len(failed)}/{len(results)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())

"""Out-of-tree plugins: an installed distribution's entry points add a defense and a callback, with their
flags, to `python -m safe_train.main` — no wrapper script."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON, base_env, train_flags

PLUGIN = '''
"""A third-party safe-train plugin: a defense that scales OpenCLIP's loss, and a step-counting callback."""

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from safe_train.flags import FlagConfig, option
from safe_train.interface import Callback, Defense
from safe_train.registry import CALLBACKS, DEFENSES


@dataclass
class ScaledConfig(FlagConfig):
    prefix: ClassVar[str] = "scaled"
    group: ClassVar[str] = "scaled loss (plugin)"
    factor: float = option(0.5, "Multiplies every term of OpenCLIP's loss.")


@DEFENSES.register
class ScaledLoss(Defense):
    name = "plugin_scaled"
    Config = ScaledConfig

    def __init__(self, config=None):
        self.config = config or ScaledConfig()

    def compute_loss(self, ctx, features, pass_, base_loss):
        return {"scaled_loss": self.config.factor * sum(base_loss(**features, output_dict=True).values())}


@dataclass
class CountConfig(FlagConfig):
    group: ClassVar[str] = "step counter (plugin)"
    count_steps: bool = option(False, "Write how many steps each epoch took to <run>/plugin_steps.json.")

    @property
    def enabled(self):
        return self.count_steps


@CALLBACKS.register
class StepCounter(Callback):
    name = "plugin_step_counter"
    Config = CountConfig

    def __init__(self, config):
        self.steps = {}

    def on_step_end(self, ctx, step):
        self.steps[ctx.epoch] = self.steps.get(ctx.epoch, 0) + 1
        self.losses = sorted(step.losses)

    def on_epoch_end(self, ctx):
        with open(os.path.join(ctx.run_dir, "plugin_steps.json"), "w") as f:
            json.dump({"steps": self.steps, "loss_terms": self.losses}, f)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A distribution as pip installs it: the module plus a .dist-info with entry points, on a sys.path entry."""
    site = tmp_path_factory.mktemp("site")
    (site / "st_demo_plugin.py").write_text(PLUGIN)
    info = site / "st_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: st-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [safe_train.defenses]
        plugin_scaled = st_demo_plugin

        [safe_train.callbacks]
        plugin_step_counter = st_demo_plugin
        """))
    return site


def _env(site: Path) -> dict[str, str]:
    env = base_env()
    env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
    return env


def test_an_installed_plugin_appears_in_help(plugin_path):
    proc = subprocess.run([PYTHON, "-m", "safe_train.main", "--help"], env=_env(plugin_path), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plugin_scaled" in proc.stdout and "--scaled-factor" in proc.stdout and "--count-steps" in proc.stdout
    without = subprocess.run([PYTHON, "-m", "safe_train.main", "--help"], env=base_env(), capture_output=True,
                             text=True, timeout=180)
    assert "plugin_scaled" not in without.stdout  # it comes from the entry points, nothing else


def test_an_installed_plugin_trains(plugin_path, csv_64, tmp_path):
    flags = train_flags(csv_64, tmp_path, "plugin", epochs=2,
                        extra=["--defense", "plugin_scaled", "--scaled-factor", "0.25", "--count-steps"])
    proc = subprocess.run([PYTHON, "-m", "safe_train.main", *flags], env=_env(plugin_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "plugin" / "plugin_steps.json").read_text())
    assert report["steps"] == {"0": 8, "1": 8}  # 64 pairs / batch 8, every step seen by the plugin callback
    assert report["loss_terms"] == ["loss", "scaled_loss"]
    assert "Scaled_loss" in proc.stdout + proc.stderr  # OpenCLIP's log line shows the plugin's loss term


def test_a_broken_plugin_names_itself(tmp_path):
    site = tmp_path / "site"
    info = site / "st_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: st-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[safe_train.defenses]\nbroken = st_no_such_module\n")
    proc = subprocess.run([PYTHON, "-m", "safe_train.main", "--defense", "none", "--train-data", "x.csv"],
                          env=_env(site), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "defense plugin 'broken' (st_no_such_module) failed to load" in proc.stderr
    assert "Traceback" not in proc.stderr

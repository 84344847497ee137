"""YAML presets ship inside the package: found by name, read by the benchmark, present in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from safe_train.args import config_to_argv, list_presets, resolve_config
from safe_train.bench import BENCH_ENTRIES
from safe_train.errors import ConfigError


def test_a_packaged_preset_is_found_by_name_and_a_path_still_wins(tmp_path, monkeypatch):
    assert {"mnist-bench", "safeclip-bench", "cleanclip-bench", "cc3m-rn50"} <= set(list_presets())
    by_name = config_to_argv("safeclip-bench")
    assert by_name[:2] == ["--defense", "safeclip"] and "--safeclip-max-ratio" in by_name
    assert config_to_argv("safeclip-bench.yaml") == by_name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "safeclip-bench.yaml").write_text("defense: none\n")  # a local file of that name wins
    assert config_to_argv("safeclip-bench.yaml") == ["--defense", "none"]
    with pytest.raises(ConfigError, match="config file not found: nope.*packaged presets: .*mnist-bench"):
        resolve_config("nope")


def test_the_benchmark_reads_its_recipes_from_the_presets():
    safeclip = config_to_argv("safeclip-bench")[2:]
    assert BENCH_ENTRIES["safeclip"].flags == tuple(safeclip)
    assert BENCH_ENTRIES["safeclip-inloop"].flags == (*safeclip, "--safeclip-similarity", "inloop")
    assert BENCH_ENTRIES["safeclip-inloop-target"].flags == (*safeclip, "--safeclip-similarity", "inloop",
                                                             "--safeclip-risky-views", "target")
    assert BENCH_ENTRIES["cleanclip"].flags == tuple(config_to_argv("cleanclip-bench")[2:])
    assert BENCH_ENTRIES["safeclip-views"].flags == tuple(config_to_argv("safeclip-views-bench")[2:])


def test_the_wheel_contains_the_presets(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("safe_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in list_presets():
        assert f"safe_train/configs/{preset}.yaml" in names, preset
    assert "safe_train/model_configs/st-tiny-vit.json" in names

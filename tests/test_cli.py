"""Command line: flags, YAML configs, help, exit codes, bad input, SLURM launch."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import numpy as np
from conftest import PYTHON, base_env, train_flags
from helpers import load_table, run_safe_train

from safe_train.args import config_to_argv, expand_configs


def _run(args: list[str], env=None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "safe_train.main", *args], env=env or base_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_our_flags_and_upstream_flags():
    proc = _run(["--help"])
    assert proc.returncode == 0
    for flag in ("--defense", "--log-root", "--config", "--blocklist", "--record-similarity", "--train-data",
                 "--accum-freq", "--grad-checkpointing", "--resume", "--report-to"):
        assert flag in proc.stdout, flag


def test_unknown_flag_is_an_error():
    proc = _run(["--no-such-flag", "1"])
    assert proc.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_existing_run_name_exits_nonzero(csv_64, tmp_path):
    """OpenCLIP returns -1 (and its __main__ exits 0) for an existing run without --resume latest."""
    flags = train_flags(csv_64, tmp_path, "dup", epochs=1)
    assert _run(flags).returncode == 0
    proc = _run(flags)
    assert proc.returncode == 1
    assert "Experiment already exists" in proc.stdout + proc.stderr


def test_yaml_config_and_command_line_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 32\nlr: 0.001\ngrad-checkpointing: true\nlocal-loss: false\n"
                      "aug-cfg: {scale: [0.9, 1.0]}\ndefense: none\n")
    tokens = config_to_argv(config)
    assert tokens == ["--batch-size", "32", "--lr", "0.001", "--grad-checkpointing", "--aug-cfg", "scale=[0.9, 1.0]",
                      "--defense", "none"]
    expanded = expand_configs(["--config", str(config), "--batch-size", "8"])
    assert expanded[-2:] == ["--batch-size", "8"]  # the command line comes last, so it wins
    from open_clip_train.params import parse_args

    args = parse_args([t for t in expanded if t not in ("--defense", "none")])
    assert args.batch_size == 8 and args.lr == 0.001 and args.grad_checkpointing and args.aug_cfg == {"scale": [0.9, 1.0]}


def test_malformed_config_is_one_clear_error(tmp_path, capsys):
    from safe_train.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [1, 2\n")
    proc = _run(["--config", str(bad)])  # the real command once; the other cases run its main() in-process
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "typo.yaml").write_text("batch_size: 8\nwarmpu: 10\n")  # issue 14, fault 8
    for name, message in (("missing.yaml", "config file not found"), ("list.yaml", "must be a mapping"),
                          ("typo.yaml", f"config file {tmp_path / 'typo.yaml'}: unknown key 'warmpu' "
                                        f"(did you mean 'warmup'?)")):
        assert main(["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and "usage:" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_csv_column_is_one_clear_error(csv_64, tmp_path):
    flags = train_flags(csv_64, tmp_path, "col", epochs=1)
    flags[flags.index("--csv-caption-key") + 1] = "caption"
    proc = _run(flags)
    assert proc.returncode == 2
    assert "column(s) ['caption'] not found" in proc.stderr and "--csv-caption-key" in proc.stderr
    # one line on stderr (OpenCLIP's logging streams there too), and the run's out.log keeps it
    assert [ln for ln in proc.stderr.splitlines() if "not found" in ln] == [
        ln for ln in proc.stderr.splitlines() if ln.startswith("safe-train: error: ")]
    assert len([ln for ln in proc.stderr.splitlines() if "not found" in ln]) == 1 and "Traceback" not in proc.stderr
    assert "safe-train: error: " in (tmp_path / "col" / "out.log").read_text()


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(csv_64, tmp_path):
    lines = Path(csv_64).read_text().splitlines()
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    rows = [lines[0]] + lines[1:65]
    rows[3] = f"{tmp_path / 'corrupt.png'}\ta handwritten one."  # data row 2: unreadable image
    rows[5] = rows[5].split("\t")[0] + "\t   "  # data row 4: empty caption
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("\n".join(rows) + "\n")
    flags = train_flags(bad_csv, tmp_path, "bad", epochs=1, batch_size=9, extra=["--track-samples"])
    assert run_safe_train(flags) == 0
    log = (tmp_path / "bad" / "out.log").read_text()
    assert "skipped 1 row(s) with an empty caption" in log
    assert "skipped_samples_total: 1" in log
    table = load_table(tmp_path / "bad", 1)
    assert 4 not in table.ids  # the empty-caption row never enters training
    assert table.get("times_seen", [2])[0] == 0  # the unreadable image never reached the loss
    assert table["times_seen"].sum() == 63  # 63 usable rows = 7 batches of 9, substitutes included


def test_slurm_environment_two_tasks(csv_64, tmp_path):
    """What `srun` sets (SLURM_PROCID/LOCALID/NTASKS + the job script's MASTER_ADDR/PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = train_flags(csv_64, tmp_path, "slurm", epochs=1, extra=["--track-samples"])
    procs = []
    for rank in range(2):
        env = base_env() | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([PYTHON, "-m", "safe_train.main", *flags], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "per-sample state identical on 2 ranks (64 samples)" in outs[0]
    np.testing.assert_array_equal(load_table(tmp_path / "slurm", 1)["times_seen"], np.ones(64))

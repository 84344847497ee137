"""patches/open_clip_train-3.3: the series applies to the pristine open_clip_train 3.3.0 sources (with GNU
patch, git, or a strict reader of the diffs), and a fork patched with it trains exactly as
``python -m safe_train.main``.

The fork is a copy of the installed wheel's ``open_clip_train`` laid out like a checkout of the OpenCLIP
repository (``src/open_clip_train/``), so the commands in patches/README.md are the ones tested here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, base_env, train_flags

PATCH_DIR = REPO / "patches" / "open_clip_train-3.3"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))
PATCHED = ("main.py", "train.py", "data.py")
PACKAGE = Path(importlib.util.find_spec("open_clip_train").submodule_search_locations[0])
VERSION = importlib.metadata.version("open_clip_torch")  # the series is for 3.3.0
SAFECLIP = ["--defense", "safeclip", "--safeclip-unimodal-warmup-epochs", "1",
            "--safeclip-multimodal-warmup-epochs", "1", "--safeclip-multimodal-lr", "1e-4"]
MISSING_TOOL = "`{tool}` is not installed (Debian package `{tool}`)"


def make_fork(root: Path) -> Path:
    """The installed open_clip_train 3.3.0, copied to ``root/src/open_clip_train`` (a fork's layout)."""
    shutil.copytree(PACKAGE, root / "src" / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    return root


# ---- a strict reader of the series: every hunk must match the pristine file exactly where it says ----------
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _lines(text: str) -> list[str]:
    """Lines ending in "\\n" (str.splitlines would also split at form feeds and other separators)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def read_patch(text: str) -> dict[str, list[tuple[int, list[str], list[str]]]]:
    """path (prefix ``a/`` dropped) → hunks as (first old line, old lines, new lines)."""
    files: dict[str, list[tuple[int, list[str], list[str]]]] = {}
    lines = _lines(text)
    i, path = 0, None
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- a/"):
            path = line[len("--- a/"):].rstrip("\n")
            assert lines[i + 1] == f"+++ b/{path}\n", lines[i + 1]
            files[path] = []
            i += 2
            continue
        match = _HUNK.match(line)
        if match and path is not None:
            start, old_len = int(match[1]), int(match[2] or 1)
            new_len = int(match[4] or 1)
            old, new = [], []
            i += 1
            while len(old) < old_len or len(new) < new_len:
                body = lines[i]
                assert body[0] in " -+", f"malformed hunk line {body!r}"
                if body[0] in " -":
                    old.append(body[1:])
                if body[0] in " +":
                    new.append(body[1:])
                i += 1
            files[path].append((start, old, new))
            continue
        i += 1
    return files


def apply_strictly(root: Path, patch: Path) -> None:
    """Apply ``patch`` (paths relative to ``root``): no offset, no fuzz, or an AssertionError."""
    for path, hunks in read_patch(patch.read_bytes().decode()).items():
        original = _lines((root / path).read_bytes().decode())
        out, pos = [], 0
        for start, old, new in hunks:
            at = start - 1 if old else start
            assert original[at:at + len(old)] == old, \
                f"{patch.name}: hunk at {path}:{start} does not match (open_clip_torch {VERSION})"
            out += original[pos:at] + new
            pos = at + len(old)
        (root / path).write_bytes("".join(out + original[pos:]).encode())


def apply_series(root: Path, tool: str) -> None:
    for patch in PATCHES:
        if tool == "strict":
            apply_strictly(root, patch)
            continue
        cmd = (["patch", "-p1", "--batch", "--forward", "--fuzz=0", "-i", str(patch)] if tool == "patch"
               else ["git", "apply", "--verbose", str(patch)])
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{output}"
        assert "offset" not in output and "fuzz" not in output, output  # exactly where the hunks say


def available_tool() -> str:
    return next((tool for tool in ("patch", "git") if shutil.which(tool)), "strict")


def blob_id(data: bytes) -> str:
    """What ``git hash-object`` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---- the series itself -----------------------------------------------------------------------------------
def test_series_is_small_and_calls_only_the_fork_glue():
    assert [p.name[:5] for p in PATCHES] == ["0001-", "0002-", "0003-"]
    touched, hunks = set(), 0
    for patch in PATCHES:
        files = read_patch(patch.read_text())
        touched |= set(files)
        hunks += sum(len(h) for h in files.values())
        for hunk_list in files.values():
            for _, old, new in hunk_list:
                added = [line for line in new if line not in old]
                assert 1 <= len(added) <= 5, added  # each hunk is a line or a few
                for line in added:
                    if "safe_train" in line and "import" in line:
                        assert "from safe_train.openclip import fork as safe_train" in line, line
    assert touched == {f"src/open_clip_train/{name}" for name in PATCHED}
    assert hunks == 5


@pytest.mark.parametrize("tool", ["strict", "patch", "git"])
def test_series_applies_cleanly_and_compiles(tmp_path, tool):
    if tool != "strict" and not shutil.which(tool):
        pytest.skip(MISSING_TOOL.format(tool=tool))
    root = make_fork(tmp_path / "fork")
    if tool == "git":
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    apply_series(root, tool)
    reference = make_fork(tmp_path / "reference")
    apply_series(reference, "strict")
    for name in sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py"):
        patched = (root / "src" / "open_clip_train" / name).read_bytes()
        pristine = (PACKAGE / name).read_bytes()
        assert (patched != pristine) == (name in PATCHED), name
        reference_bytes = (reference / "src" / "open_clip_train" / name).read_bytes()
        assert patched == reference_bytes, f"{tool} differs: {name}"
        compile(patched, name, "exec")


def test_index_lines_name_the_pristine_blobs(tmp_path):
    """``git apply -3`` finds each preimage by the blob id on its ``index`` line: they must be 3.3.0's."""
    root = make_fork(tmp_path)
    apply_series(root, "strict")
    for patch in PATCHES:
        index_lines = re.findall(r"^index ([0-9a-f]{40})\.\.([0-9a-f]{40}) \d+\n--- a/(\S+)",
                                 patch.read_text(), flags=re.M)
        assert len(index_lines) == len(read_patch(patch.read_text())), patch.name
        for old_id, new_id, path in index_lines:
            assert old_id == blob_id((PACKAGE / Path(path).name).read_bytes()), \
                f"{patch.name}: {path} is not 3.3.0's (open_clip_torch {VERSION})"
            assert new_id == blob_id((root / path).read_bytes()), f"{patch.name}: stale index line for {path}"


@pytest.mark.skipif(not shutil.which("git"), reason=MISSING_TOOL.format(tool="git"))
@pytest.mark.parametrize("history", ["upstream", "vendored"])
def test_git_apply_3way_merges_into_a_fork_that_changed_the_context(tmp_path, history):
    """A fork that edited lines next to the hunks: plain ``git apply`` refuses, ``git apply -3`` merges.

    "upstream": the fork's history holds 3.3.0's files. "vendored": it does not, and the README's
    ``git hash-object -w`` of the wheel's files gives ``git apply -3`` the blobs it needs.
    """
    root = make_fork(tmp_path)
    env = {**base_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=check)

    git("init", "-q")
    if history == "upstream":
        git("add", ".")
        git("commit", "-qm", "open_clip_train 3.3.0")
    package = root / "src" / "open_clip_train"
    fork_edits = {
        "main.py": [("    if torch.cuda.is_available():\n", "    if torch.cuda.is_available():  # lab\n"),
                    ("        completed_epoch = epoch + 1\n", "        completed_epoch = 1 + epoch\n")],
        "train.py": [("    autocast = get_autocast(args.precision, device_type=device.type)\n",
                      "    autocast = get_autocast(args.precision, device_type=device.type)  # lab\n")],
        "data.py": [("    data = {}\n", "    data = {}  # lab: extra sets below\n")],
    }
    for name, edits in fork_edits.items():
        text = (package / name).read_text()
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new, 1)  # the first: next to the hunk
        (package / name).write_text(text)
    git("add", ".")
    git("commit", "-qm", "the lab's fork")
    if history == "vendored":
        git("hash-object", "-w", *(str(PACKAGE / name) for name in PATCHED))

    plain = git("apply", "--check", *map(str, PATCHES), check=False)
    assert plain.returncode != 0  # the context changed: only a 3-way merge can place the hunks
    merged = git("apply", "-3", *map(str, PATCHES), check=False)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    for name, edits in fork_edits.items():
        text = (package / name).read_text()
        assert "<<<<<<<" not in text and all(new in text for _, new in edits), name
        assert "from safe_train.openclip import fork as safe_train" in text, name
        compile(text, name, "exec")


# ---- a patched fork trains exactly as safe_train.main ----------------------------------------------------
def _train_lines(run_dir: Path) -> list[str]:
    """Per-step training lines (epoch, pass, samples, LR, logit scale, every loss term) and per-epoch
    safe-train lines of a run's log, without timings."""
    lines = []
    for line in (run_dir / "out.log").read_text().splitlines():
        if "Train Epoch:" in line:
            line = line[line.index("Train Epoch:"):]
            lines.append(re.sub(r"Data \(t\): .*?/s/gpu ", "", line))
        elif re.search(r"Epoch \d+ safe-train: ", line):
            lines.append(line[line.index("Epoch "):])
    return lines


@pytest.mark.usefixtures("wordnet")
def test_patched_fork_trains_like_safe_train_main(csv_64, tmp_path):
    fork = make_fork(tmp_path / "fork")
    apply_series(fork, available_tool())
    runs = tmp_path / "runs"
    extra = SAFECLIP + ["--val-data", str(csv_64), "--val-frequency", "1"]  # evaluate between epochs
    env = base_env()
    fork_env = {**env, "PYTHONPATH": str(fork / "src") + os.pathsep + env["PYTHONPATH"]}
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('open_clip_train').origin)"],
        env=fork_env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(fork), where.stdout

    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "out.log").write_text("")  # OpenCLIP's main returns -1: "Experiment already exists"
    commands = {
        "fork": ([sys.executable, "-m", "open_clip_train.main"], fork_env),
        "ours": ([sys.executable, "-m", "safe_train.main"], env),
        "taken": ([sys.executable, "-m", "open_clip_train.main"], fork_env),
    }
    procs = {name: subprocess.Popen(
        cmd + train_flags(csv_64, runs, name, epochs=3, batch_size=16, extra=extra),
        cwd=tmp_path, env=cmd_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (cmd, cmd_env) in commands.items()}
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name in ("fork", "ours"):
        assert procs[name].returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
    # the patched __main__ turns that -1 into a non-zero exit (upstream exits 0)
    assert procs["taken"].returncode == 1, outputs["taken"]
    assert "Experiment already exists" in outputs["taken"], outputs["taken"]

    fork_lines, our_lines = _train_lines(runs / "fork"), _train_lines(runs / "ours")
    steps = [line for line in our_lines if line.startswith("Train Epoch:")]
    # 64 samples, batch 16: unimodal warmup, multimodal warmup, then the split epoch's risky/safe passes
    assert [s.split("] [")[0] for s in steps[:8]] == (["Train Epoch: 0 [unimodal"] * 4
                                                      + ["Train Epoch: 1 [multimodal"] * 4)
    assert any(s.startswith(("Train Epoch: 2 [safe]", "Train Epoch: 2 [risky]")) for s in steps)
    assert fork_lines == our_lines  # every step's losses, LR and logit scale, as logged

    def results(name: str) -> list[dict]:
        lines = (runs / name / "checkpoints" / "results.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert [r["epoch"] for r in results("fork")] == [1, 2, 3]
    assert results("fork") == results("ours")
    assert (runs / "fork" / "safeclip" / "splits.jsonl").read_text() == \
        (runs / "ours" / "safeclip" / "splits.jsonl").read_text()
    ckpt = "checkpoints/epoch_3.pt"
    fork_sd = torch.load(runs / "fork" / ckpt, map_location="cpu", weights_only=True)["state_dict"]
    our_sd = torch.load(runs / "ours" / ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert fork_sd.keys() == our_sd.keys()
    for key in our_sd:
        assert torch.equal(fork_sd[key], our_sd[key]), key
    assert (runs / "fork" / "checkpoints" / "epoch_3.safe_train" / "table").is_dir()


"""A real one-node Slurm cluster on this machine, for tests/test_slurm.py (fixture ``slurm_cluster``).

Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them). The fixture starts a private
cluster that touches nothing outside its own directory ``/tmp/st-slurm-<pytest pid>-XXXX``:

- its own ``munged`` with a fresh key on its own socket (``AuthInfo=socket=...``), so an existing
  ``/etc/munge/munge.key`` and a running system ``munged`` are left as they are;
- ``slurmctld`` and ``slurmd`` on free ports with a generated ``slurm.conf`` that every command of the
  tests reads through ``SLURM_CONF`` (one node: this machine's CPUs and ``hostname -s``, at 127.0.0.1;
  ``JobRequeue=1``; a partition whose CPUs up to 4 jobs may share; state, spool and logs in the
  directory). A Slurm cluster already on this machine is neither used nor disturbed.

Daemons and job processes of an earlier session that died without tearing down (found by the owning
pid in the directory name, in their command line or environment) are killed before starting. At the
end of the session every job is cancelled, the three daemons and any process left with this cluster's
``SLURM_CONF`` are killed, and the directory is removed.

Without root or without the binaries, the tests that use the fixture are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "unmunge", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
PREFIX = "st-slurm-"  # the fixture's directory: /tmp/st-slurm-<owner pid>-XXXX
MARK = re.compile(rf"/{PREFIX}(\d+)-")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def skip_reason() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (SlurmUser=root)"
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"Slurm/munge binaries not found ({', '.join(missing)}); "
                "`apt-get install slurm-wlm munge` (what .ci/run does)")
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            yield int(entry.name)


def _kill(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _processes_of(match: Callable[[str], bool]) -> list[int]:
    """Daemons whose command line, and processes whose SLURM_CONF, satisfies ``match``."""
    found = []
    for pid in _pids():
        cmdline = _proc_text(pid, "cmdline")
        is_daemon = Path(cmdline.split(" ", 1)[0]).name in DAEMONS
        conf = re.search(r"(?:^| )SLURM_CONF=(\S+)", _proc_text(pid, "environ"))
        if (is_daemon and match(cmdline)) or (conf and match(conf.group(1))):
            found.append(pid)
    return found


def kill_stale() -> None:
    """Kill daemons and job processes of fixture clusters whose pytest process is gone; remove their dirs."""

    def stale(text: str) -> bool:
        return any(not _alive(int(owner)) for owner in MARK.findall(text))

    _kill(_processes_of(stale))
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        m = MARK.search(f"/{directory.name}-")
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class SlurmCluster:
    """A running private cluster: ``env`` (with SLURM_CONF) is what every Slurm command must run with."""

    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` exit {proc.returncode}: {proc.stdout[-2000:]}"
                                 f"{proc.stderr[-2000:]}\n{self.logs()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Reason, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def leftovers(self, job_id: str) -> list[int]:
        """Processes still running for the job: its slurmstepd ("slurmstepd: [ID.batch]") and whatever its
        steps started (SLURM_JOB_ID=ID in their environment)."""
        found = []
        for pid in _pids():
            environ = _proc_text(pid, "environ")
            if f"[{job_id}." in _proc_text(pid, "cmdline") or (
                    f"SLURM_JOB_ID={job_id} " in f"{environ} " and f"SLURM_CONF={self.conf} " in f"{environ} "):
                found.append(pid)
        return found

    def release(self, job_id: str) -> bool:
        """A requeued job waits about 2 minutes (Reason=BeginTime) so that its previous start can finish
        cleaning up; start it now if that start has left no process behind. Returns whether it did.

        slurmd revokes the previous start's credential with a timestamp in whole seconds and refuses a new
        credential of the same second ("Job credential revoked": the job then FAILS), so the release waits
        until a later second than the one in which the last process went away (seen under load)."""
        if self.leftovers(job_id):
            return False
        time.sleep(2.0)
        if self.leftovers(job_id):
            return False
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        return True

    def job_log(self, job_id: str) -> str:
        """slurmctld's and slurmd's lines about one job, for assertion messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if job_id in ln]
                parts.append(f"--- {path} (lines with {job_id})\n" + "\n".join(lines[-60:]))
        return "\n".join(parts)

    def wait(self, job_id: str, timeout: float = 180, release_requeued: bool = True) -> dict[str, str]:
        """Poll until the job has finished; requeued jobs held for BeginTime are released at once."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in FINISHED:
                return info
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
                self.release(job_id)
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=20)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def logs(self, lines: int = 15) -> str:
        parts = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def _slurm_conf(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return "\n".join([
        "# written by tests/slurm_cluster.py",
        f"ClusterName=st{os.getpid()}",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",  # the node is what this file says, whatever the hardware
        "ReturnToService=2",
        "MpiDefault=none",
        "JobRequeue=1",
        "MinJobAge=3600",  # finished jobs stay visible to scontrol (there is no accounting database)
        "KillWait=10",
        f"FirstJobId={secrets.randbelow(900_000) + 100_000}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        # up to 4 jobs share each CPU: test_slurm.py runs its jobs side by side
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        "",
    ])


def start_cluster(timeout: float = 60) -> SlurmCluster:
    kill_stale()
    root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    root.chmod(0o755)  # job processes and munge clients reach the socket through it
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, cpus, _free_port(), _free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env)

    key = root / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    socket_path = root / "munge.socket"

    def daemon(name: str, *args: str) -> None:
        with open(root / f"{name}.out", "ab") as log:  # the daemon keeps its own copy of the descriptor
            cluster.daemons[name] = subprocess.Popen([_binary(name), *args], env=env, stdout=log,
                                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                     start_new_session=True)

    def until(ok: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            dead = [n for n, p in cluster.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                reason = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                stop_cluster(cluster)
                pytest.fail(f"local Slurm cluster: {what}: {reason}\n{cluster.logs(30)}")
            time.sleep(0.2)

    try:
        daemon("munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
               f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}")

        def munge_works() -> bool:
            enc = subprocess.run([_binary("munge"), "-S", str(socket_path), "-n"], capture_output=True, env=env)
            dec = subprocess.run([_binary("unmunge"), "-S", str(socket_path)], input=enc.stdout,
                                 capture_output=True, env=env)
            return enc.returncode == 0 and b"Success" in dec.stdout

        until(munge_works, "munge -n | unmunge does not succeed")
        daemon("slurmctld", "-D", "-c", "-f", str(conf))
        daemon("slurmd", "-D", "-N", node, "-f", str(conf))
        until(lambda: cluster.node_state() == "idle", f"node {node} does not become idle in sinfo")
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--user", "root", check=False, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                queue = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    # job steps (slurmstepd, training processes) carry this cluster's SLURM_CONF in their environment
    conf = str(cluster.conf)
    _kill(_processes_of(lambda text: text == conf))
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A private one-node Slurm cluster for the session (skips the test without root or Slurm)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)

"""A one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd.

Everything lives in one temporary folder: a generated ``slurm.conf`` (the real
CPUs and memory that ``slurmd -C`` finds, ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, ``select/cons_tres``, ``SlurmUser=root``, free ports),
munge's own key and socket, state, spool, logs and the completed-job record that
``sacct -c`` reads. The node also declares one GPU without a device (``gres.conf``:
``File=/dev/null``), so that a job asking for ``--gres=gpu:1`` is scheduled; it
runs on the CPU. Each core may hold two jobs (``OverSubscribe=FORCE:2``), so that a
job hanging until its wall time does not leave a 2-CPU node to one other job.

Daemons run in the foreground as this process's children and are stopped by
their process ids. Whatever keeps the cluster from starting (Debian's packages
``slurmctld slurmd slurm-client munge`` missing, not root, a daemon that exits or
never answers) raises :class:`SlurmUnavailableError` with the reason, within
seconds: the tests that need Slurm are skipped with it, never left hanging.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "sacct")
SEARCH_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"))
PACKAGES = "slurmctld slurmd slurm-client munge"
PARTITIONS = ("gpu", "cpu")
START_SECONDS = 30
STOP_SECONDS = 30
CLIENT_SECONDS = 15
MARKER = "FFF_TEST_SLURM_CLUSTER"

SLURM_CONF = """\
ClusterName=fff-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobs_completed.txt
KillWait=5
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:2 State=UP
PartitionName=cpu Nodes={node} MaxTime=INFINITE OverSubscribe=FORCE:2 State=UP
"""


class SlurmUnavailableError(Exception):
    """Why no Slurm cluster can run here (the reason the Slurm tests are skipped)."""


@dataclass
class SlurmCluster:
    """A running one-node cluster; ``environment()`` points Slurm's commands at it."""

    folder: Path
    search_path: str = SEARCH_PATH
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def environment(self) -> dict[str, str]:
        """Variables for sbatch, squeue and sacct (jobs inherit them, marker included)."""
        return {"SLURM_CONF": str(self.conf), MARKER: str(self.folder)}

    def command(self, *arguments: str, timeout: float = CLIENT_SECONDS):
        """Run a Slurm client command against this cluster; returns the CompletedProcess."""
        return subprocess.run(
            arguments,
            env={**os.environ, "PATH": self.search_path, **self.environment()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check(self) -> None:
        """Raise SlurmUnavailableError naming the first daemon that is no longer running."""
        for name, process in self.daemons.items():
            if process.poll() is not None:
                raise SlurmUnavailableError(
                    f"{name} (pid {process.pid}) exited with status {process.returncode}; "
                    f"its last output: {self.log_tail(name)}"
                )

    def log_tail(self, name: str) -> str:
        path = self.folder / f"{name}.out"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(lines[-3:]) or "(no output)"

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """Job id -> name, partition and state of every job that has ended (`sacct -c`)."""
        result = self.command(
            "sacct", "-c", "--parsable2", "--noheader", "-o", "jobid,jobname,partition,state"
        )
        if result.returncode != 0:
            raise AssertionError(f"sacct -c failed: {result.stderr.strip()}")
        rows = [line.split("|") for line in result.stdout.splitlines() if line.strip()]
        return {row[0]: {"name": row[1], "partition": row[2], "state": row[3]} for row in rows}

    def queued_jobs(self) -> list[str]:
        """Ids of the jobs pending or running."""
        result = self.command("squeue", "--noheader", "-o", "%i")
        return result.stdout.split() if result.returncode == 0 else []

    def cancel_jobs(self) -> bool:
        """Cancel every job and wait (at most STOP_SECONDS) for the queue to empty; emptied?"""
        self.command("scancel", "--full", "--user", "root")
        deadline = time.monotonic() + STOP_SECONDS
        while self.queued_jobs():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, then end what the cluster left running."""
        controller = self.daemons.get("slurmctld")
        if controller is not None and controller.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.cancel_jobs()
        for process in reversed(list(self.daemons.values())):
            terminate(process)
        for pid in _processes_marked(str(self.folder)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def terminate(process: subprocess.Popen) -> None:
    """End a process we started: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _processes_marked(folder: str) -> list[int]:
    """Processes this cluster started (slurmstepd, job scripts): they carry its marker."""
    marker = f"{MARKER}={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _require_programs(search_path: str) -> None:
    missing = [name for name in PROGRAMS if shutil.which(name, path=search_path) is None]
    if missing:
        raise SlurmUnavailableError(
            f"Slurm is not installed ({', '.join(missing)} missing): "
            f"apt-get install {PACKAGES} (as root)"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailableError(
            f"slurmd must run as root to start jobs (this is uid {os.geteuid()})"
        )


def _node_hardware(search_path: str) -> dict[str, str]:
    """CPUs and RealMemory of this machine as slurmd counts them (`slurmd -C`)."""
    try:
        result = subprocess.run(
            [shutil.which("slurmd", path=search_path), "-C"],
            capture_output=True,
            text=True,
            timeout=CLIENT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise SlurmUnavailableError(
            f"`slurmd -C` gave no answer within {CLIENT_SECONDS} s"
        ) from None
    fields = dict(word.split("=", 1) for word in result.stdout.split() if "=" in word)
    if "CPUs" not in fields or "RealMemory" not in fields:
        raise SlurmUnavailableError(
            f"`slurmd -C` did not describe this node: {result.stderr.strip()}"
        )
    return {"cpus": fields["CPUs"], "memory": fields["RealMemory"]}


def write_configuration(folder: Path, search_path: str = SEARCH_PATH) -> None:
    """slurm.conf, gres.conf and munge's key for a one-node cluster in ``folder``."""
    for name in ("state", "spool"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    controller_port, node_port = _free_ports(2)
    (folder / "slurm.conf").write_text(
        SLURM_CONF.format(
            node=socket.gethostname().split(".")[0],
            controller_port=controller_port,
            node_port=node_port,
            folder=folder,
            **_node_hardware(search_path),
        )
    )
    (folder / "gres.conf").write_text("Name=gpu File=/dev/null\n")
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(128))
    key.chmod(0o600)


def _start(cluster: SlurmCluster, name: str, *arguments: str) -> None:
    with (cluster.folder / f"{name}.out").open("w") as log:
        cluster.daemons[name] = subprocess.Popen(
            [shutil.which(name, path=cluster.search_path), *arguments],
            env={**os.environ, "PATH": cluster.search_path, **cluster.environment()},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_for(cluster: SlurmCluster, ready, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        cluster.check()
        with contextlib.suppress(subprocess.TimeoutExpired):
            if ready():
                return
        time.sleep(0.5)
    raise SlurmUnavailableError(f"{what} within {START_SECONDS} s")


def _node_idle(cluster: SlurmCluster) -> bool:
    result = cluster.command("sinfo", "--noheader", "-o", "%T", timeout=5)
    return result.returncode == 0 and result.stdout.split()[:1] == ["idle"]


def start_cluster(folder: Path, search_path: str = SEARCH_PATH) -> SlurmCluster:
    """Start munged, slurmctld and slurmd configured in ``folder``; wait for the node to be idle."""
    _require_programs(search_path)
    folder = folder.resolve()
    write_configuration(folder, search_path)
    cluster = SlurmCluster(folder, search_path)
    try:
        _start(cluster, "munged", "--foreground", "--force", f"--socket={folder}/munge.socket",
               f"--key-file={folder}/munge.key", f"--pid-file={folder}/munged.pid",
               f"--seed-file={folder}/munged.seed", f"--log-file={folder}/munged.log")  # fmt: skip
        _wait_for(cluster, (folder / "munge.socket").exists, "munged made no socket")
        _start(cluster, "slurmctld", "-D", "-f", str(cluster.conf))
        _start(cluster, "slurmd", "-D", "-f", str(cluster.conf))
        _wait_for(cluster, lambda: _node_idle(cluster), "the node did not become idle in sinfo")
    except BaseException:
        cluster.stop()
        raise
    return cluster

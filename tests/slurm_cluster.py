"""A real SLURM cluster of two nodes on this host (Debian's slurm-wlm 22.05 and munge, as root), for the
tests of ``sweeper slurm``: its own munged socket, config, state and ports in a temp dir, its daemons
stopped by PID. Two partitions over both nodes: ``debug`` (the default; its jobs may be preempted by
requeue) and ``high`` (PriorityTier 10), for a preemption. Each node says it has 2 CPUs (the host has 2
cores for both; ``config_overrides`` lets slurmd believe it) so that two jobs of one CPU per node fit
at once."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.services import free_port, wait_for

INSTALL = "apt-get install -y slurm-wlm munge (as root)"


def slurm_missing() -> str | None:
    """Why the SLURM tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "SLURM tests run its daemons as root"
    for binary in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(binary) is None:
            return f"{binary} not installed: {INSTALL}"
    return None


CONF = """ClusterName=sweepertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
SchedulerParameters=sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class SlurmCluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr or done.stdout}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        import re

        return dict(
            re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id, check=False))
        )

    def release(self, job_id: str) -> None:
        """A requeued job waits ~121 s (BeginTime) before it may start again; a test does not."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def slurm_cluster():
    folder = Path(tempfile.mkdtemp(prefix="sweeper-slurm-"))
    folder.chmod(0o755)  # munged runs as munge and must reach its socket folder
    for sub in ("state", "spool/n1", "spool/n2", "munge"):
        (folder / sub).mkdir(parents=True)
    shutil.chown(folder / "munge", "munge", "munge")
    munge_socket = folder / "munge" / "munge.socket"
    ports = {name: free_port() for name in ("ctld_port", "slurmd_port", "n1_port", "n2_port")}
    (folder / "slurm.conf").write_text(
        CONF.format(host=socket.gethostname().split(".")[0], d=folder, munge_socket=munge_socket, **ports)
    )
    cluster = SlurmCluster(folder)
    cluster.env["MUNGE_SOCKET"] = str(munge_socket)
    pids: list[int] = []
    try:
        subprocess.run(
            [
                "runuser", "-u", "munge", "--", "munged",
                "--socket", str(munge_socket),
                "--pid-file", str(folder / "munge" / "munged.pid"),
                "--log-file", str(folder / "munge" / "munged.log"),
                "--seed-file", str(folder / "munge" / "munged.seed"),
            ],
            check=True,
            timeout=30,
        )  # fmt: skip
        assert wait_for(lambda: (folder / "munge" / "munged.pid").exists(), timeout=10), (
            "munged did not start"
        )
        pids.append(_pid(folder / "munge" / "munged.pid"))
        subprocess.run(["slurmctld", "-c"], env=cluster.env, check=True, timeout=30)
        assert wait_for(lambda: (folder / "slurmctld.pid").exists(), timeout=20), "slurmctld did not start"
        pids.append(_pid(folder / "slurmctld.pid"))
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-N", node], env=cluster.env, check=True, timeout=30)
        assert wait_for(
            lambda: all((folder / f"slurmd-{n}.pid").exists() for n in ("n1", "n2")), timeout=20
        ), "slurmd did not start"
        pids += [_pid(folder / f"slurmd-{n}.pid") for n in ("n1", "n2")]
        assert wait_for(
            lambda: (
                cluster.run("sinfo", "-h", "-p", "debug", "-o", "%D %t", check=False).split()[:2]
                == ["2", "idle"]
            ),
            timeout=60,
        ), cluster.run("sinfo", check=False)
        yield cluster
    finally:
        for pid in reversed([p for p in pids if p]):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        shutil.rmtree(folder, ignore_errors=True)

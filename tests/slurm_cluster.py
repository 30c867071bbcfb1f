"""A real single-node Slurm cluster for the slurm backend's tests (backends/slurm/dev-cluster.sh).

The tests start their own cluster, in their own directory and on free ports, so they neither need
nor disturb a dev cluster (or a real installation) already running on the machine. Without Slurm
installed they skip, unless FANOUT_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DEV_CLUSTER = Path(__file__).resolve().parents[1] / "backends" / "slurm" / "dev-cluster.sh"
SYSTEM_PATH = f"{os.environ.get('PATH', os.defpath)}:/usr/sbin:/sbin"
REQUIRED = ("sbatch", "squeue", "sacct", "scancel", "slurmctld", "slurmd", "munged", "mungekey")


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    absent = [prog for prog in REQUIRED if shutil.which(prog, path=SYSTEM_PATH) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the dev Slurm cluster must be started as root (slurmd launches jobs as their owner)"
    if not DEV_CLUSTER.exists():
        return f"{DEV_CLUSTER} is missing"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DevCluster:
    """A started cluster: its directory and the SLURM_CONF that clients use to reach it."""

    dir: Path
    conf: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env(), timeout=60)

    def live_job_ids(self) -> set[str]:
        """Jobs Slurm still has pending, running or completing, whoever submitted them."""
        done = self.run("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING,SUSPENDED",
                        "--format=%i")
        assert done.returncode == 0, done.stderr
        return {line.strip() for line in done.stdout.splitlines() if line.strip()}

    def state_of(self, job_id: str) -> str:
        done = self.run("squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T")
        return done.stdout.strip()

    def dead_conf(self, where: Path) -> Path:
        """The same cluster's config with the controller on a port nobody listens on."""
        port = free_port()
        lines = []
        for line in self.conf.read_text().splitlines():
            if line.startswith("SlurmctldPort="):
                line = f"SlurmctldPort={port}"
            elif line.startswith("MessageTimeout="):
                line = "MessageTimeout=2"
            lines.append(line)
        where.write_text("\n".join(lines) + "\n")
        return where

    def stop(self) -> None:
        self.run("scancel", f"--user={os.environ.get('USER') or 'root'}")
        deadline = time.monotonic() + 20
        while self.live_job_ids() and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["bash", str(DEV_CLUSTER), "stop", str(self.dir)], capture_output=True, timeout=60)


def start(directory: Path) -> DevCluster:
    env = {**os.environ, "PATH": SYSTEM_PATH, "FANOUT_SLURM_CTLD_PORT": str(free_port()),
           "FANOUT_SLURM_SLURMD_PORT": str(free_port())}
    done = subprocess.run(["bash", str(DEV_CLUSTER), "start", str(directory)], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    if done.returncode != 0:
        subprocess.run(["bash", str(DEV_CLUSTER), "stop", str(directory)], capture_output=True, timeout=60)
        logs = "".join(f"\n--- {log}\n{log.read_text()[-2000:]}" for log in (directory / "log").glob("*.log"))
        raise RuntimeError(f"dev cluster did not start: {done.stderr.strip()}{logs}")
    return DevCluster(dir=directory, conf=directory / "etc" / "slurm.conf")

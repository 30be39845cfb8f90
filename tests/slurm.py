"""A one-node SLURM cluster on localhost for tests (Debian's slurmctld/slurmd/munge, started by hand).

`.ci/run` installs the packages; where they are missing or will not start, the tests that need the
cluster skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port

CONF = """\
ClusterName=megalmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin")


class SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; `stop()` ends them. `env` points clients at it."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def missing(self) -> str | None:
        """Why the cluster cannot run here, or None."""
        absent = [t for t in TOOLS if _which(t) is None]
        if absent:
            return f"not installed: {', '.join(absent)} (apt-get install slurmctld slurmd slurm-client munge)"
        if os.geteuid() != 0:
            return "starting slurmd needs root"
        if not Path("/etc/munge/munge.key").is_file():
            return "no /etc/munge/munge.key"
        return None

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(root=self.root, cpus=self.cpus, ctld_port=free_port(), d_port=free_port()))
        self._start_munge()
        quiet = {"env": self.env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.procs.append(subprocess.Popen([_which("slurmctld"), "-D", "-f", str(self.conf)], **quiet))
        self.procs.append(subprocess.Popen([_which("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"], **quiet))
        self._wait_idle()

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, timeout=30)

    def _wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([_which("sinfo"), "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        logs = "".join(p.read_text()[-1500:] for p in self.root.glob("*.log"))
        raise RuntimeError(f"SLURM did not come up in {timeout:.0f} s:\n{logs}")

    def sbatch(self, script: Path) -> str:
        out = subprocess.run([_which("sbatch"), "--parsable", str(script)], env=self.env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields for a job (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run([_which("scontrol"), "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True)  # fmt: skip
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}")

    def scancel(self, *args: str) -> None:
        subprocess.run([_which("scancel"), *args], env=self.env, check=True)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

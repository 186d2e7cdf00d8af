"""A real Slurm cluster for the tests (one node, or two on one host): installed, configured and started here.

The `slurm` tests submit the shipped batch scripts (slurm/stage*.sh) with
``sbatch`` and wait for them, so they need slurmctld, slurmd and munge running.
:func:`start_cluster` makes that so, as root, without touching /etc/slurm:

1. installs Debian's ``slurmd slurmctld slurm-client munge`` with apt-get when a
   binary is missing (``apt-get update`` first; set ``MMDIST_SLURM_INSTALL=0`` to
   forbid installing);
2. creates the munge key if there is none and starts ``munged`` as the munge user;
3. writes ``slurm.conf`` for this host (one node, CPUs=2, ``select/cons_tres``,
   ``proctrack/linuxproc``, ``task/none``: no cgroups, which containers lack) into
   a private folder and points every client at it through ``SLURM_CONF``;
4. starts slurmctld and slurmd (or reuses ones this module started before that
   still answer) and waits until ``sinfo`` shows the node idle.

``start_cluster(nodes=2)`` makes a second, separate cluster of two nodes on this
one host (its own folder, ports and ClusterName, so the one-node cluster keeps
running beside it): Debian's slurmd serves several nodes of one host when each
has its own port, spool folder and pid file (``NodeName=n1 NodeHostname=HOST
NodeAddr=127.0.0.1 Port=7818``, ``n2`` on 7819, ``SlurmdSpoolDir=.../%n``,
``SlurmdPidFile=.../slurmd.%n.pid``) and is started once per node with
``slurmd -N n1`` / ``-N n2``; ``srun -N2`` then runs one task on each, with
SLURM_NODEID 0 and 1. The names n1/n2 do not resolve as host names, as node
names on some real clusters do not: the jobs must find the master by NodeAddr.

Anything that makes this impossible (not root, no apt-get, the install failing)
raises :class:`SlurmUnavailable` with the reason, which the fixture turns into a
skip that prints it. Daemons started here are stopped again by :meth:`SlurmCluster.stop`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun", "munged", "munge"]
DEFAULT_HOME = Path(os.environ.get("MMDIST_SLURM_HOME", "/var/tmp/mmdist-slurm"))
TWO_NODE_HOME = Path(os.environ.get("MMDIST_SLURM_2NODE_HOME", "/var/tmp/mmdist-slurm-2node"))
CPUS = 2
CTLD_PORT, SLURMD_PORT = 6817, 6818
# The two-node cluster: its own slurmctld port and one slurmd port per node (n1, n2); 1 CPU per node.
TWO_NODE_CTLD_PORT, TWO_NODE_PORTS, TWO_NODE_NAMES = 6827, (7818, 7819), ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why."""


@dataclass
class SlurmCluster:
    home: Path
    node: str  # the (first) node's name
    started: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # every node's name; [node] for the one-node cluster
    host: str = ""  # the machine's host name (SlurmctldHost, NodeHostname)

    def __post_init__(self) -> None:
        self.nodes = self.nodes or [self.node]
        self.host = self.host or self.node

    @property
    def daemons(self) -> list[str]:
        """The daemons' names, which are also their pid files' stems: slurmctld, slurmd (or slurmd.n1, slurmd.n2)."""
        return ["slurmctld", *(["slurmd"] if len(self.nodes) == 1 else [f"slurmd.{n}" for n in self.nodes])]

    @property
    def conf(self) -> Path:
        return self.home / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Variables that point the Slurm clients (sbatch, sinfo, srun inside jobs) at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {}), **self.env})

    def sbatch(self, script: str | Path, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> str:
        """Submit a batch script; returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True,
                             timeout=60, cwd=cwd, env={**os.environ, **(env or {}), **self.env})
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job ends (or ``timeout`` s pass, then cancel it); returns its final scontrol record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                        "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
                return info
            time.sleep(2)
        self.run("scancel", job_id)
        raise TimeoutError(f"Slurm job {job_id} did not end within {timeout:.0f} s (last state "
                           f"{info.get('JobState')!r}, reason {info.get('Reason')!r}); cancelled it")

    def stop(self) -> None:
        """Stop the daemons this object started (munged is left running: it is cheap and shared)."""
        for name in reversed(self.started):
            pid = _read_pid(self.home / f"{name}.pid")
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.started.clear()


def start_cluster(home: Path | None = None, install_timeout: float = 900, start_timeout: float = 60,
                  nodes: int = 1) -> SlurmCluster:
    """Install if needed, configure and start a cluster of
    ``nodes`` (1 or 2) nodes; return it once every node is idle."""
    if nodes not in (1, 2):
        raise ValueError(f"nodes={nodes}: the test cluster has 1 node (this host) or 2 (n1, n2 on this host)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm daemons must be started as root and these tests do not run as root")
    _install_if_missing(install_timeout)
    _start_munge()
    host = socket.gethostname().split(".")[0]
    if nodes == 1:
        cluster = SlurmCluster(home=home or DEFAULT_HOME, node=host)
    else:
        cluster = SlurmCluster(
            home=home or TWO_NODE_HOME, node=TWO_NODE_NAMES[0], nodes=list(TWO_NODE_NAMES), host=host
        )
    home = cluster.home
    home.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log", *(f"spool/{n}" for n in cluster.nodes if len(cluster.nodes) > 1)):
        (home / sub).mkdir(exist_ok=True)
    conf = _slurm_conf(cluster) if len(cluster.nodes) == 1 else _two_node_conf(cluster)
    if cluster.conf.exists() and cluster.conf.read_text() == conf and _daemons_alive(cluster) and _node_idle(cluster):
        return cluster  # started by an earlier test session and still healthy
    _stop_stale(cluster)
    cluster.conf.write_text(conf)
    for daemon in cluster.daemons:
        # -c: forget jobs of an earlier, killed session, so the node does not come back busy or drained.
        program, _, node = daemon.partition(".")
        out = cluster.run(program, "-c", "-f", str(cluster.conf), *(["-N", node] if node else []), timeout=30)
        if out.returncode != 0:
            log = _tail(home / "log" / f"{daemon}.log")
            raise SlurmUnavailable(f"{daemon} did not start ({out.returncode}): {out.stderr.strip()} {log}")
        cluster.started.append(daemon)
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if _node_idle(cluster):
            return cluster
        time.sleep(1)
    state = cluster.run("sinfo", "-h", "-N", "-o", "%T %E").stdout.strip()
    cluster.stop()
    raise SlurmUnavailable(
        f"node(s) {', '.join(cluster.nodes)} not idle after {start_timeout:.0f} s (sinfo: {state!r}); "
        f"logs in {home / 'log'}: {_tail(home / 'log' / (cluster.daemons[-1] + '.log'))}"
    )


def _install_if_missing(timeout: float) -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if os.environ.get("MMDIST_SLURM_INSTALL", "1") == "0":
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and MMDIST_SLURM_INSTALL=0 forbids installing")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and there is no apt-get to install "
                               f"{' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took longer than {timeout:.0f} s") from None
        if out.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()[-800:]}")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> None:
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(128))
    for folder in (key.parent, Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], capture_output=True, timeout=30)
    for _ in range(20):
        if _munge_works():
            return
        time.sleep(0.5)
    raise SlurmUnavailable("munged did not start (see /var/log/munge/munged.log); Slurm needs it to authenticate")


def _slurm_conf(cluster: SlurmCluster) -> str:
    h = cluster.home
    return f"""# Written by tests/helpers/slurm_cluster.py: a one-node test cluster, no cgroups, no accounting.
ClusterName=mmdist-test
SlurmctldHost={cluster.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
StateSaveLocation={h}/state
SlurmdSpoolDir={h}/spool
SlurmctldPidFile={h}/slurmctld.pid
SlurmdPidFile={h}/slurmd.pid
SlurmctldLogFile={h}/log/slurmctld.log
SlurmdLogFile={h}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=5
NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _two_node_conf(cluster: SlurmCluster) -> str:
    """n1 and n2: two slurmd of this host, told apart by port, spool folder, pid and log file (``%n``)."""
    h = cluster.home
    nodes = "".join(f"NodeName={name} NodeHostname={cluster.host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN\n"
                    for name, port in zip(cluster.nodes, TWO_NODE_PORTS))
    return (
        "# Written by tests/helpers/slurm_cluster.py: a two-node test cluster on one host, no cgroups, no accounting.\n"
        + f"""ClusterName=mmdist-test-2node
SlurmctldHost={cluster.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={TWO_NODE_CTLD_PORT}
StateSaveLocation={h}/state
SlurmdSpoolDir={h}/spool/%n
SlurmctldPidFile={h}/slurmctld.pid
SlurmdPidFile={h}/slurmd.%n.pid
SlurmctldLogFile={h}/log/slurmctld.log
SlurmdLogFile={h}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=5
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and all(f"{node} idle" in out.stdout for node in cluster.nodes)


def _live_pid(cluster: SlurmCluster, daemon: str) -> int | None:
    """The pid of ``daemon`` (slurmctld, slurmd or slurmd.n1 ...) from its pid file, if that process runs."""
    pid = _read_pid(cluster.home / f"{daemon}.pid")
    return pid if pid and _is_process(pid, daemon.partition(".")[0]) else None


def _daemons_alive(cluster: SlurmCluster) -> bool:
    """Every daemon of ``cluster`` runs. sinfo alone does not tell: slurmctld shows a node whose slurmd has died
    idle until its SlurmdTimeout, and jobs sent there then wait for a node that is about to go DOWN."""
    return all(_live_pid(cluster, name) for name in cluster.daemons)


def _stop_stale(cluster: SlurmCluster) -> None:
    """Stop daemons an earlier session left behind under this home (never others')."""
    for name in reversed(cluster.daemons):
        pid = _live_pid(cluster, name)
        if pid:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _is_process(pid, name.partition(".")[0]):
                    break
                time.sleep(0.1)


def _is_process(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/comm").read_text() and "Z" not in _proc_state(pid)
    except OSError:
        return False


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""

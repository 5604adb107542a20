"""A real Slurm cluster of one host (munged, slurmctld and slurmd on this machine) for tests.

Needs root and Debian's ``slurm-wlm`` and ``munge`` packages. Everything a cluster writes
(configuration, state, spool, logs, pid files, its own munge socket) goes into a directory the
caller gives, and it listens on free TCP ports, so clusters can run side by side and the
system's munged (if any) is left alone. There is no accounting daemon (no ``sacct``); a
finished job stays visible to ``scontrol show job`` for ``MinJobAge`` seconds.

    reason = why_unavailable()          # None, or why no cluster can be started here
    with one_host_cluster(tmp_path) as cluster:
        job_id = cluster.sbatch(script)
        cluster.wait_state(job_id, {"COMPLETED"}, timeout=60)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("slurmctld", "slurmd", "munged", "munge", "unmunge", "sbatch", "srun", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "main"
MIN_JOB_AGE = 600  # s a finished job stays in `scontrol show job`
KILL_WAIT = 10  # s between SIGTERM and SIGKILL (time limit, scancel)
# The job credential lifetime, which is also how long a requeued job is held before it may
# start again (default 120 s); Slurm 22.05 logs "cred_expire=N invalid" for values below 5.
CRED_EXPIRE = 5
# Only the periodic scheduler (default every 60 s) starts a requeued job once its hold is over
SCHED_INTERVAL = 2
# Unix socket paths (munge's, slurmstepd's in the spool directory) must fit in 108 bytes
MAX_DIR_LEN = 70


def _which(name: str) -> str | None:
    """The program ``name`` on PATH or in /usr/sbin or /sbin, where the daemons live."""
    return shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def why_unavailable() -> str | None:
    """None when a one-host cluster can be started here, else a one-line reason why not."""
    missing = [name for name in PROGRAMS if _which(name) is None]
    if missing:
        return f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge"
    if os.geteuid() != 0:
        return "a one-host Slurm cluster needs root (it runs with SlurmUser=root)"
    if not MUNGE_KEY.is_file():
        return f"no munge key {MUNGE_KEY} (create one with mungekey)"
    try:
        socket.gethostbyname(short_hostname())
    except OSError:
        return f"this host's name {short_hostname()!r} does not resolve (add it to /etc/hosts)"
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_line(name: str) -> str:
    """This host as a slurm.conf node, from ``slurmd -C``, with 90% of its memory."""
    out = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    fields = dict(kv.split("=", 1) for kv in out.splitlines()[0].split())
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    memory = max(1, int(int(fields.get("RealMemory", "1024")) * 0.9))
    hardware = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"NodeName={name} {hardware} RealMemory={memory} State=UNKNOWN"


def write_config(tmp: Path, cred_expire: int = CRED_EXPIRE, **settings: str | int) -> Path:
    """Write ``slurm.conf`` (and an empty ``cgroup.conf``) for a one-host cluster into ``tmp``;
    ``settings`` override or add slurm.conf parameters (e.g. ``KillWait=30``)."""
    host = short_hostname()
    ctld_port, slurmd_port = free_ports(2)
    for sub in ("state", "spool"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    params: dict[str, object] = {
        "ClusterName": "test",
        "SlurmctldHost": host,
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"cred_expire={cred_expire},socket={tmp / 'munge.socket'}",
        "StateSaveLocation": tmp / "state",
        "SlurmdSpoolDir": tmp / "spool",
        "SlurmctldPidFile": tmp / "slurmctld.pid",
        "SlurmdPidFile": tmp / "slurmd.pid",
        "SlurmctldLogFile": tmp / "slurmctld.log",
        "SlurmdLogFile": tmp / "slurmd.log",
        "MailProg": "/bin/true",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "MpiDefault": "none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SchedulerParameters": f"sched_interval={SCHED_INTERVAL}",
        "JobRequeue": 1,
        "ReturnToService": 2,
        "KillWait": KILL_WAIT,
        "MinJobAge": MIN_JOB_AGE,
    }
    params.update(settings)
    lines = [f"{key}={value}" for key, value in params.items()]
    lines.append(node_line(host))
    lines.append(f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP")
    conf = tmp / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    (tmp / "cgroup.conf").write_text("")
    return conf


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(missing)"


def _munge_answers(sock: Path) -> bool:
    """Whether the munge daemon on ``sock`` answers (``munge -n | unmunge``)."""
    try:
        cred = subprocess.run(["munge", "-S", str(sock), "-n"], capture_output=True, timeout=10)
        check = subprocess.run(
            ["unmunge", "-S", str(sock)], input=cred.stdout, capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cred.returncode == 0 and check.returncode == 0


def _start_munged(tmp: Path) -> subprocess.Popen:
    """Start a munged of this cluster only, its socket and files in ``tmp``."""
    sock = tmp / "munge.socket"
    files = {"socket": sock, "pid-file": tmp / "munged.pid", "log-file": tmp / "munged.log"}
    files["seed-file"] = tmp / "munged.seed"
    # --force: run as root, with a key that the munge user owns
    args = [_which("munged") or "munged", "--foreground", "--force"]
    args += [f"--{opt}={path}" for opt, path in files.items()]
    with open(tmp / "munged.out", "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while not _munge_answers(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"munged did not start:\n{_tail(tmp / 'munged.out')}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``proc``, then SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Cluster:
    """A running one-host cluster; ``env`` runs Slurm client commands against it."""

    conf: Path
    tmp: Path
    env: dict[str, str]
    node: str = field(default_factory=short_hostname)

    def run(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``scontrol``, ``squeue``, ``scancel``, ...) against this cluster."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str | Path) -> int:
        """Submit a batch job (``sbatch ARGS``); its id."""
        return int(self.run("sbatch", "--parsable", *map(str, args)).stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """The fields of ``scontrol show job -o``: JobState, Restarts, ExitCode, Reason, ..."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        # Values may hold '=' (TRES=cpu=2,...) or spaces (Command=...); keys hold neither
        return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", line))

    def wait_state(
        self, job_id: int | str, states: Iterable[str] | str, timeout: float = 60.0
    ) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (e.g. {"RUNNING"}); its fields then."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in wanted:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not {sorted(wanted)} after {timeout:.0f} s: "
                    f"JobState={job.get('JobState')} Reason={job.get('Reason')}"
                )
            time.sleep(0.5)

    def logs(self, lines: int = 20) -> str:
        """The tails of the daemons' log files."""
        parts = []
        for daemon in ("munged", "slurmctld", "slurmd"):
            # Its stdout (.out) has what it wrote before it opened its log
            log = self.tmp / f"{daemon}.log"
            log = log if log.exists() else self.tmp / f"{daemon}.out"
            parts.append(f"--- {log}\n{_tail(log, lines)}")
        return "\n".join(parts)

    def cancel_all(self, timeout: float = KILL_WAIT + 20) -> None:
        """Cancel every job and wait until none is left running or completing."""
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.run("squeue", "-h", "-t", "R,CG,S,ST", "-o", "%i", check=False)
            if not left.stdout.split():
                return
            time.sleep(0.5)


@contextlib.contextmanager
def one_host_cluster(
    tmp: Path, startup_timeout: float = 60.0, cred_expire: int = CRED_EXPIRE, **settings: str | int
) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd with their configuration and files in ``tmp``
    (``cred_expire``: see CRED_EXPIRE; ``settings`` override slurm.conf parameters), yield the
    cluster once its node is idle, and stop all of it on exit (jobs included), also when the
    body raised."""
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    tmp = Path(tmp).resolve()
    if len(str(tmp)) > MAX_DIR_LEN:
        raise ValueError(f"{tmp}: over {MAX_DIR_LEN} characters, too long for unix sockets in it")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = write_config(tmp, cred_expire, **settings)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
    }
    env["SLURM_CONF"] = str(conf)
    cluster = Cluster(conf=conf, tmp=tmp, env=env)
    munged = _start_munged(tmp)
    daemons: list[subprocess.Popen] = []
    try:
        for name, args in (("slurmctld", ["-D", "-c"]), ("slurmd", ["-D", "-N", cluster.node])):
            with open(tmp / f"{name}.out", "w") as out:
                daemons.append(
                    subprocess.Popen(
                        [_which(name) or name, *args, "-f", str(conf)],
                        env=env,
                        cwd=tmp,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + startup_timeout
        while True:
            state = cluster.run("sinfo", "-h", "-o", "%t", check=False)
            if state.stdout.strip() == "idle":
                break
            dead = [Path(p.args[0]).name for p in daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not idle in {startup_timeout} s"
                sinfo = state.stdout.strip() or state.stderr.strip()
                raise RuntimeError(f"Slurm did not start ({why}; sinfo: {sinfo})\n{cluster.logs()}")
            time.sleep(0.3)
        try:
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                cluster.cancel_all()
            with contextlib.suppress(Exception):
                cluster.run("scontrol", "shutdown", check=False, timeout=15)
    finally:
        for proc in reversed(daemons):  # `scontrol shutdown` has stopped them, or else
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            _stop(proc)
        _stop(munged)


if __name__ == "__main__":  # python tests/slurm_cluster.py [DIR]: start a cluster, show it, stop it
    import sys
    import tempfile

    print(why_unavailable() or "a one-host cluster can be started here")
    if why_unavailable() is None:
        started = time.monotonic()
        with one_host_cluster(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())) as c:
            print(f"started in {time.monotonic() - started:.1f} s, SLURM_CONF={c.conf}")
            print(c.run("sinfo").stdout, end="")
        print(f"stopped after {time.monotonic() - started:.1f} s")

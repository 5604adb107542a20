"""Shared by the tests that run the real entry points as processes (DDP, SLURM, faults)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DIGITS = "configs/digits_resnet.yaml"
# A small network on the embedded digits; only the analyses that are tested here
TINY = [
    "model.depth=8",
    "model.width=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
    "analysis.run=[single_deletion,multi_deletion,reorder]",
    "analysis.quick=true",
    "analysis.multi_deletion.trials=3",
    "analysis.reorder.trials=3",
    "analysis.reorder.max_swaps=2",
]


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a spawned run: one thread, W&B offline and quiet, no SLURM or DDP
    variables inherited from whatever runs the tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "WANDB_"))
        and k
        not in {
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_RANK",
            "NODE_RANK",
            "WORLD_SIZE",
            "RANK",
            "RESENS_RUN_ID",
        }
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own session (so that it and any DDP workers it starts can be
    killed together), stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for ``proc``; past ``timeout`` seconds kill its whole session and fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{proc.args} did not finish within {timeout} s") from None


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run to completion, capturing stdout and stderr separately; never outlives ``timeout``."""
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{args} did not finish within {timeout} s") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str
) -> None:
    """Poll ``condition`` while ``proc`` runs; fail if it ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit code {proc.returncode})")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm(bin_dir: Path) -> Path:
    """Stand-ins for ``srun`` and ``scontrol`` in ``bin_dir``.

    ``srun CMD...`` starts SLURM_NNODES × SLURM_NTASKS_PER_NODE copies of CMD with the per-task
    variables SLURM sets (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID), task i's output to
    ``$SRUN_LOG_DIR/task<i>.out`` and its pid to ``$SRUN_LOG_DIR/task<i>.pid``.
    ``scontrol ARGS`` appends ARGS as one line to ``$SCONTROL_LOG``.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f"""#!{sys.executable}
import os, subprocess, sys
from pathlib import Path
cmd = sys.argv[1:]
while cmd and cmd[0].startswith("-"):
    cmd.pop(0)
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
logs = Path(os.environ["SRUN_LOG_DIR"])
tasks = []
for rank in range(nodes * per_node):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NODEID=str(rank // per_node),
               SLURM_LOCALID=str(rank % per_node), SLURM_NTASKS=str(nodes * per_node))
    with open(logs / f"task{{rank}}.out", "w") as out:
        tasks.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    (logs / f"task{{rank}}.pid").write_text(str(tasks[-1].pid))
sys.exit(max(t.wait() for t in tasks))
""")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    for tool in (srun, scontrol):
        tool.chmod(0o755)
    return bin_dir


def assert_same_tensors(a: dict, b: dict, where: str = "") -> None:
    """Exact equality of two nested structures of tensors and plain values."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        )
        assert torch.equal(a, b), (
            f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max()})"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"

"""A real Slurm cluster on this host (``tests/slurm_cluster.py``): a 2-task CPU job submitted with
``make slurm-cifar GPUS=0 ...`` on the digits is preempted twice, first by SIGUSR1 to its batch
shell (what ``--signal=B:USR1@..`` sends, passed on by the script's trap), then by SLURM's own
``--signal=USR1@100`` ahead of its time limit. It must be requeued twice, end COMPLETED with
exactly epochs × steps-per-epoch optimizer steps in one run folder, hold every epoch's validation
exactly once in its W&B records under one id, and log no traceback.

Needs root and Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them and sets
``RESENS_REQUIRE_SLURM=1``, which turns a skip into a failure); skipped, saying why, anywhere
else. The requeue timeline is printed (``pytest -s``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from resens import config
from resens.checkpoint import load_checkpoint
from resens.module import eval_split
from resens.runs import wandb_id
from tests.helpers import DIGITS, ROOT, TINY, base_env, run
from tests.slurm_cluster import Cluster, one_host_cluster, why_unavailable
from tests.wandb_records import _key, finished_records, read_records, run_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NAME = "preempted"
EPOCHS = 24
# Global batch 8 over 2 tasks: 4 each. Each task sees 649 of the 1,297 training images.
STEPS_PER_EPOCH = 649 // 4
JOB = [
    *TINY,
    f"name={NAME}",
    "model.depth=14",
    f"trainer.max_epochs={EPOCHS}",
    "data.batch_size=8",
    "data.eval_batch_size=100",
    "analysis.run=[]",
]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
HEADER = re.compile(r"^resens: SLURM job (\d+) on \S+, start (\d+), ", re.MULTILINE)
STOP = re.compile(r"^SLURM job \d+: stopped at step (\d+) \(epoch (\d+)\) after a checkpoint; requeued, "
                  r"it resumes from (\S+)$")
# What slurmstepd itself writes into the log of a job that is requeued while it runs
SLURM_NOTICE = re.compile(r"^slurmstepd\S*: error: \*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE \*\*\*$")


@pytest.fixture(scope="module")
def cluster():
    reason = why_unavailable()
    if reason and os.environ.get("RESENS_REQUIRE_SLURM"):  # set by .ci/run where it can install Slurm
        pytest.fail(f"RESENS_REQUIRE_SLURM is set, but no Slurm cluster can be started: {reason}")
    if reason:
        pytest.skip(f"no one-host Slurm cluster can be started here: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="resens-slurm-"))  # short: it holds unix sockets
    try:
        with one_host_cluster(tmp) as started:
            yield started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seconds(duration: str) -> int:
    """SLURM's ``[D-]HH:MM:SS`` in seconds."""
    days, _, clock = duration.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


@pytest.fixture(scope="module")
def job(cluster: Cluster, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("real-slurm") / "runs"
    env = base_env(SLURM_CONF=cluster.env["SLURM_CONF"])
    began = time.monotonic()
    timeline: list[str] = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - began:6.1f} s  {what}")

    submitted = run(
        ["make", "-s", "slurm-cifar", "GPUS=0", "TASKS=2", "CPUS=1", "MEM=2G", "TIME=10",
         "SBATCH=--signal=USR1@100", f"CONFIG={DIGITS}", f"OUT={out}", f"ARGS={' '.join(JOB)}"],
        env,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout)[1]
    note(f"submitted job {job_id} (make slurm-cifar GPUS=0 TASKS=2 ...)")
    log = out / "slurm" / f"{NAME}-{job_id}.out"
    run_dir = out / f"{NAME}-slurm{job_id}"
    last = run_dir / "checkpoints" / "last.ckpt"

    def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = cluster.job(job_id)
            if condition():
                return state
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            if state["JobState"] in ENDED:
                raise AssertionError(f"{what}: the job ended first ({state['JobState']}):\n{tail}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s ({state['JobState']}):\n{tail}")
            time.sleep(0.5)

    def restarts() -> int:
        return int(cluster.job(job_id)["Restarts"])

    # Part 1: SIGUSR1 to the batch shell only, once the first epoch is done.
    wait_until(last.is_file, 300, "the first epoch")
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    note("SIGUSR1 to the batch shell (scancel --batch --signal=USR1)")
    wait_until(lambda: restarts() >= 1, 180, "the first requeue")
    note("requeued (Restarts=1)")

    # Part 2: SLURM's own warning. Once this part has trained an epoch, its time limit is cut
    # so that 60-120 s are left: --signal=USR1@100 then comes at slurmctld's next 30 s tick.
    first_stop = run_dir / "hpc_ckpt_1.ckpt"
    wait_until(lambda: last.is_file() and last.stat().st_mtime > first_stop.stat().st_mtime, 300,
               "an epoch of the second part")
    runtime = _seconds(cluster.job(job_id)["RunTime"])
    minutes = (runtime + 120) // 60
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
    note(f"time limit cut to {minutes} min at {runtime} s into the part (--signal=USR1@100)")
    wait_until(lambda: restarts() >= 2, 240, "the time-limit requeue")
    cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")  # part 3 runs to the end
    note("requeued (Restarts=2); time limit back to 10 min")

    final = wait_until(lambda: cluster.job(job_id)["JobState"] in ENDED, 600, "the end of the job")
    note(f"ended {final['JobState']}, Restarts={final['Restarts']}, ExitCode={final['ExitCode']}")
    text = log.read_text()
    starts = list(HEADER.finditer(text))
    parts = [text[a.start(): b.start() if b else None] for a, b in zip(starts, [*starts[1:], None])]
    for number, part in enumerate(parts, 1):
        stop = next((STOP.match(line) for line in part.splitlines() if STOP.match(line)), None)
        restored = re.search(r"Restoring states from the checkpoint path at (\S+)", part)
        note(
            f"part {number}: "
            + (f"resumed from {Path(restored[1]).name}; " if restored else "")
            + (f"stopped at step {stop[1]} (epoch {stop[2]})" if stop else "ran to the end")
        )
    note(f"wall time of the job from submission: {time.monotonic() - began:.0f} s")
    print("\n".join(["", "real-Slurm requeue timeline:", *timeline]))
    return SimpleNamespace(id=job_id, final=final, out=out, run_dir=run_dir, log=text, parts=parts)


def test_the_job_is_requeued_twice_and_completes_with_every_step(job):
    assert job.final["JobState"] == "COMPLETED", job.log[-3000:]
    assert job.final["ExitCode"] == "0:0" and int(job.final["Restarts"]) == 2
    ckpt = load_checkpoint(job.run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert ckpt["epoch"] == EPOCHS - 1
    # one run folder (and the root's W&B and SLURM log folders); the marker files are gone
    assert sorted(p.name for p in job.out.iterdir()) == sorted([job.run_dir.name, "slurm", "wandb"])
    assert [p.name for p in (job.out / "slurm").iterdir()] == [f"{NAME}-{job.id}.out"]
    assert sorted(p.name for p in job.run_dir.glob("*hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]


def test_each_requeued_part_ends_with_where_it_resumes_and_no_traceback(job):
    assert [int(m[2]) for m in HEADER.finditer(job.log)] == [1, 2, 3]
    assert "Traceback" not in job.log and "srun: error" not in job.log
    steps = []
    for number, part in enumerate(job.parts[:2], 1):
        lines = [line for line in part.splitlines() if line.strip()]
        # the last line of ours says where it resumes; after it only SLURM's own notice
        ours = [i for i, line in enumerate(lines) if not SLURM_NOTICE.match(line)][-1]
        stop = STOP.match(lines[ours])
        assert stop, lines[-3:]
        assert Path(stop[3]) == job.run_dir / f"hpc_ckpt_{number}.ckpt"
        assert int(stop[1]) % 20 == 0 or int(stop[1]) % STEPS_PER_EPOCH == 0  # a step boundary
        steps.append(int(stop[1]))
        restore = f"Restoring states from the checkpoint path at {job.run_dir}/hpc_ckpt_{number}.ckpt"
        assert restore in job.parts[number]
    assert 0 < steps[0] < steps[1] < EPOCHS * STEPS_PER_EPOCH
    assert f"run folder: {job.run_dir}" in job.parts[2]


def test_wandb_holds_every_epochs_validation_once_under_one_id(job):
    files = run_files(job.out)  # oldest first: one per part
    assert len(files) == 3
    split = eval_split(config.load(ROOT / DIGITS, JOB))  # val, or test without a validation split
    epochs: list[int] = []
    previous_last_step = -1
    for number, path in enumerate(files, 1):
        records = finished_records(path)
        assert records[-1].WhichOneof("record_type") == "exit", "every part closed its run"
        assert records[-1].exit.exit_code == 0
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {
            wandb_id(job.run_dir.name)
        }
        steps, validated = [], []
        for r in records:
            if r.WhichOneof("record_type") != "history":
                continue
            row = {_key(item): json.loads(item.value_json) for item in r.history.item}
            steps.append(r.history.step.num)
            assert row["trainer/global_step"] == r.history.step.num  # W&B's step is the trainer's
            if f"{split}/error" in row:
                validated.append(int(row["trainer/epoch"]))
        assert steps == sorted(steps) and steps[0] >= previous_last_step, "the parts continue one history"
        print(f"W&B part {number}: steps {steps[0]}..{steps[-1]}, validation of epochs "
              f"{validated[0]}..{validated[-1]}" if validated else f"W&B part {number}: steps {steps[0]}..{steps[-1]}")
        previous_last_step = steps[-1]
        epochs += validated
    assert sorted(epochs) == list(range(EPOCHS))  # every epoch's validation, exactly once


@pytest.mark.parametrize(
    "option, message",
    [
        ("GPUS=1", "sbatch failed: sbatch: error: Invalid generic resource (gres) specification"),
        ("GPUS=0 PARTITION=nowhere", "sbatch failed: sbatch: error: invalid partition specified: nowhere"),
    ],
)
def test_a_submission_the_cluster_refuses_fails_in_one_line_and_leaves_nothing(
    cluster, tmp_path, option, message
):
    """The cluster has no GPU and no such partition: sbatch refuses, and nothing is left."""
    out = tmp_path / "runs"
    done = run(
        ["make", "-s", "slurm-cifar", *option.split(), "CPUS=1", "MEM=1G", f"CONFIG={DIGITS}", f"OUT={out}"],
        base_env(SLURM_CONF=cluster.env["SLURM_CONF"]),
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == f"error: {message}", done.stderr
    assert not out.exists()


def test_a_cancelled_job_stops_between_steps_with_a_checkpoint(cluster, tmp_path):
    """``scancel``: SIGTERM to every process of the job, SIGKILL ``KillWait`` (here 10) seconds
    later. The tasks stop at their next check with a checkpoint and exit; nothing requeues the
    job. W&B's service process dies of the SIGTERM at once: what it flushed stays (the run logs
    with a flush every second), the rest is lost, and training goes on without it."""
    out = tmp_path / "runs"
    submitted = run(
        ["make", "-s", "slurm-cifar", "GPUS=0", "TASKS=2", "CPUS=1", "MEM=2G", f"CONFIG={DIGITS}",
         f"OUT={out}", f"ARGS={' '.join(JOB)}"],
        base_env(SLURM_CONF=cluster.env["SLURM_CONF"]),
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout)[1]
    run_dir = out / f"{NAME}-slurm{job_id}"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() < deadline and cluster.job(job_id)["JobState"] not in ENDED
        time.sleep(0.5)
    time.sleep(3)  # the first epoch's validation was logged: W&B flushes it to disk meanwhile
    cluster.run("scancel", job_id)
    final = cluster.wait_state(job_id, ENDED, timeout=60)
    assert final["JobState"] == "CANCELLED" and final["Restarts"] == "0"
    log = (out / "slurm" / f"{NAME}-{job_id}.out").read_text()
    checkpoint = run_dir / "hpc_ckpt_1.ckpt"
    step = load_checkpoint(checkpoint)["global_step"]
    assert STEPS_PER_EPOCH <= step < EPOCHS * STEPS_PER_EPOCH
    # a stop at an epoch's end (after its validation) counts in that epoch
    assert (
        f"SLURM job {job_id}: stopped at step {step} (epoch {(step - 1) // STEPS_PER_EPOCH}) after a checkpoint; "
        f"ended by SIGTERM; a requeued job resumes from {checkpoint} (or resume={checkpoint})"
    ) in log
    assert "Traceback" not in log
    assert "W&B's service process has ended" in log
    assert not list((out / "slurm").glob(".requeue-*"))
    (part,) = run_files(out)
    split = eval_split(config.load(ROOT / DIGITS, JOB))
    history = [{_key(i) for i in r.history.item} for r in read_records(part) if r.WhichOneof("record_type") == "history"]
    assert any(f"{split}/error" in row for row in history), "the first epoch's validation is on disk"

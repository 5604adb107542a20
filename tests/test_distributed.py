"""Real processes on the CPU (gloo): a SLURM job of two nodes, rendered from the launch template and
started by a stand-in ``srun``, that is requeued on SIGUSR1 and resumes; then the analyses of its
checkpoint with one process and with two DDP processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import resens
from callbacks.training import REQUEUE_MARKER_ENV, Requeued, SlurmRequeue
from resens import config, slurm
from resens.checkpoint import load_checkpoint
from resens.errors import ResensError
from resens.module import lr_at
from tests.helpers import (
    DIGITS,
    ROOT,
    TINY,
    base_env,
    fake_slurm,
    finish,
    free_port,
    python,
    run,
    start,
    wait_for,
)
from tests.wandb_records import read_records

JOB_ID = "7301"
TEMPLATE = "configs/slurm/cifar10_resnet110.sbatch"
# Global batch 32 over 2 processes: 16 each. Each rank sees 649 of the 1,297 training images,
# so an epoch is 649 // 16 = 40 steps (81 if the ranks did not split the data).
STEPS_PER_EPOCH = 40
EPOCHS = 3
JOB = [
    *TINY,
    "name=job",
    "model.depth=14",
    "trainer.accelerator=cpu",
    f"trainer.max_epochs={EPOCHS}",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "analysis.max_batches=null",
    # two blocks per stage: only with every block eligible is there a pair to reorder (stage 0)
    "analysis.protocol.exclude=[]",
    "model.stochastic_depth=0.5",
    "optim.warmup_lr=null",
    "optim.milestones=[100]",
    "optim.scale_lr_with_batch=true",
    "optim.base_batch_size=16",
    "optim.linear_warmup_epochs=4",
]
ANALYSES = ("baseline_error", "single_deletion", "multi_deletion", "reorder")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> SimpleNamespace:
    """Two attempts of one SLURM job (2 nodes × 1 task): the first gets SIGUSR1 after its first
    epoch, checkpoints and requeues itself; the second (SLURM_RESTART_COUNT=1) finishes."""
    tmp = tmp_path_factory.mktemp("slurm")
    out = tmp / "runs"
    rendered = run(
        python(
            "resens.slurm",
            TEMPLATE,
            "--config",
            DIGITS,
            "--nodes",
            "2",
            "--gpus",
            "1",
            "--dry-run",
            "--",
            f"out_dir={out}",
            *JOB,
        ),
        base_env(),
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    script = tmp / "job.sbatch"
    script.write_text(rendered.stdout)
    env = base_env(
        PATH=f"{fake_slurm(tmp / 'bin')}:{os.environ['PATH']}",
        SCONTROL_LOG=str(tmp / "scontrol.log"),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="resens-test",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NTASKS="2",
        SLURM_NODELIST="127.0.0.1",
        MASTER_ADDR="127.0.0.1",
    )
    run_dir = out / f"job-slurm{JOB_ID}"
    logs = []
    for attempt in range(2):
        log_dir = tmp / f"attempt{attempt}"
        log_dir.mkdir()
        attempt_env = dict(env, SRUN_LOG_DIR=str(log_dir), MASTER_PORT=str(free_port()))
        if attempt:
            attempt_env["SLURM_RESTART_COUNT"] = "1"
        proc = start(["bash", str(script)], attempt_env, log_dir / "job.out")
        if attempt == 0:
            # As --signal=SIGUSR1@90 does, every task gets it; here while the ranks connect, so
            # that the first check (step 20, mid-epoch) stops them.
            tasks = [log_dir / f"task{task}.out" for task in (0, 1)]
            wait_for(
                lambda tasks=tasks: all(t.is_file() and "Initializing distributed" in t.read_text() for t in tasks),
                proc, 150, "the ranks to connect",
            )
            for task in (0, 1):
                os.kill(int((log_dir / f"task{task}.pid").read_text()), signal.SIGUSR1)
        assert finish(proc, 150) == 0, (log_dir / "task0.out").read_text()[-3000:]
        logs.append([(log_dir / f"task{t}.out").read_text() for t in (0, 1)])
    return SimpleNamespace(
        run_dir=run_dir,
        logs=logs,
        script=rendered.stdout,
        scontrol=(tmp / "scontrol.log").read_text().splitlines(),
    )


@pytest.mark.slow
def test_template_renders_a_ddp_launch_with_requeue(job):
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --job-name=job",
    ):
        assert line in job.script.splitlines()
    assert f"resens.train {DIGITS}" in job.script
    assert "trainer.num_nodes=2 trainer.devices=1 trainer.strategy=ddp" in job.script
    assert f"{' '.join(JOB[-3:])} &\n" in job.script  # the overrides come last, so they win
    assert """trap 'scancel --signal=USR1 "$SLURM_JOB_ID"' USR1""" in job.script  # B:USR1 too


@pytest.mark.slow
def test_slurm_job_trains_across_two_nodes(job):
    for logs in job.logs:
        assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0]
        assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    ckpt = load_checkpoint(job.run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["per_device_batch"] == 16
    assert ckpt["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert ckpt["epoch"] == EPOCHS - 1


@pytest.mark.slow
def test_sigusr1_checkpoints_and_requeues_the_job(job):
    assert job.scontrol == [f"requeue {JOB_ID}"]  # once, by the batch script after srun returned
    hpc = load_checkpoint(job.run_dir / "hpc_ckpt_1.ckpt")  # weights_only=True, validated
    step = hpc["global_step"]
    assert 0 < step < EPOCHS * STEPS_PER_EPOCH and step % SlurmRequeue.check_every_n_steps == 0
    assert "RNGState" in hpc["callbacks"] and "model._extra_state" in hpc["state_dict"]
    # one line from global rank 0 says where the job resumes; no rank prints a traceback
    # a stop at an epoch's end (after its validation) counts in that epoch
    line = (
        f"SLURM job {JOB_ID}: stopped at step {step} (epoch {(step - 1) // STEPS_PER_EPOCH}) after a "
        f"checkpoint; requeued, it resumes from {job.run_dir}/hpc_ckpt_1.ckpt"
    )
    assert job.logs[0][0].rstrip().endswith(line)
    assert line not in job.logs[0][1]
    assert not any("Traceback" in log for log in job.logs[0] + job.logs[1])
    assert not list((job.run_dir.parent / "slurm").glob(".requeue-*")), "the marker was consumed"


@pytest.mark.slow
def test_requeued_job_resumes_into_the_same_folder_and_wandb_run(job):
    restoring = f"Restoring states from the checkpoint path at {job.run_dir}/hpc_ckpt_1.ckpt"
    assert restoring in job.logs[1][0]  # logged by global rank 0
    assert json.loads((job.run_dir / "analysis.json").read_text()).keys() >= set(ANALYSES)
    runs = sorted((job.run_dir.parent / "wandb").glob("offline-run-*"))  # the root's W&B folder
    assert len(runs) == 2, runs
    ids = set()
    for folder in runs:
        (wandb_file,) = folder.glob("run-*.wandb")
        ids |= {
            r.run.run_id for r in read_records(wandb_file) if r.WhichOneof("record_type") == "run"
        }
    assert ids == {f"job-slurm{JOB_ID}"}


@pytest.mark.slow
def test_scaled_learning_rate_uses_the_global_batch_and_steps_per_epoch(job):
    ckpt = load_checkpoint(job.run_dir / "checkpoints" / "last.ckpt")
    o = config.from_dict(ckpt["hyper_parameters"]["cfg"]).optim
    peak = o.lr * 32 / 16
    step = ckpt["global_step"]
    expected = lr_at(o, peak, STEPS_PER_EPOCH, step)
    assert expected == pytest.approx(peak * (step + 1) / (4 * STEPS_PER_EPOCH))  # still warming up
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        expected, rel=1e-12
    )


@pytest.fixture(scope="module")
def lesions(job, tmp_path_factory) -> dict[str, dict]:
    """``python -m resens.analyze`` on the job's final checkpoint with 1 and with 2 processes."""
    tmp = tmp_path_factory.mktemp("lesions")
    ckpt = job.run_dir / "checkpoints" / "last.ckpt"
    every_analysis = [
        "analysis.run=[single_deletion,multi_deletion,reorder,duplication,path_lengths,path_gradient,"
        "effective_paths,stochastic_depth]",
        "analysis.path_gradient.samples_per_length=4",
        "analysis.path_gradient.batches=2",
        "analysis.path_gradient.batch_size=32",
    ]
    launches = {
        "one": ["trainer.devices=1", "trainer.strategy=auto", *every_analysis],
        "two": ["trainer.devices=2", "trainer.strategy=ddp", *every_analysis],
    }
    procs = {
        name: start(
            python(
                "resens.analyze",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp / name),
                "trainer.num_nodes=1",
                "trainer.accelerator=cpu",
                *extra,
            ),
            base_env(),
            tmp / f"{name}.log",
        )
        for name, extra in launches.items()
    }
    for name, proc in procs.items():
        assert finish(proc, 150) == 0, (tmp / f"{name}.log").read_text()[-3000:]
    assert "MEMBER: 2/2" in (tmp / "two.log").read_text()
    return {name: json.loads((tmp / name / "analysis.json").read_text()) for name in launches}


@pytest.mark.slow
def test_ddp_analyses_equal_single_process_analyses(job, lesions):
    fit = json.loads((job.run_dir / "analysis.json").read_text())
    for key in ANALYSES:
        assert lesions["two"][key] == lesions["one"][key], key
        assert fit[key] == lesions["one"][key], key  # the 2-node fit's own analyses
    for key in ("duplication", "path_lengths", "path_gradient", "effective_paths", "stochastic_depth"):
        assert lesions["two"][key] == lesions["one"][key], key
    assert [r["samples"] for r in lesions["one"]["path_gradient"]] == [4] * 7  # lengths 0..6
    assert len(lesions["one"]["single_deletion"]) == 6  # depth 14: 2 blocks per stage
    assert lesions["one"]["multi_deletion"] and lesions["one"]["reorder"]


def _stand_in(monkeypatch, tmp_path: Path, tool: str, script: str) -> None:
    """A shell script named ``tool`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_slurm_submits_the_rendered_script_with_sbatch(tmp_path, monkeypatch, capsys):
    _stand_in(monkeypatch, tmp_path, "sbatch", f'cat > {tmp_path}/submitted\necho "Submitted batch job 99"')
    monkeypatch.chdir(ROOT)
    args = [
        TEMPLATE,
        "--config",
        DIGITS,
        "--nodes",
        "2",
        "--gpus",
        "4",
        "--time",
        "1:00:00",
        "--partition",
        "gpu",
        "--",
        f"out_dir={tmp_path}/runs",
        "name=my run",
    ]
    assert slurm.main(args) == 0
    assert "Submitted batch job 99" in capsys.readouterr().out
    submitted = (tmp_path / "submitted").read_text()
    assert (
        submitted
        == slurm.build_script(
            TEMPLATE,
            slurm.Resources(nodes=2, gpus=4, time="1:00:00", partition="gpu"),
            DIGITS,
            [f"out_dir={tmp_path}/runs", "name=my run"],
        )[0]
    )
    lines = submitted.splitlines()
    assert "#SBATCH --time=1:00:00" in lines and "#SBATCH --time=08:00:00" not in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert f"#SBATCH --output={tmp_path}/runs/slurm/%x-%j.out" in lines
    assert (tmp_path / "runs" / "slurm").is_dir()  # sbatch would not create it
    assert f"out_dir={tmp_path}/runs 'name=my run' &\n" in submitted


def test_every_resource_is_an_option_and_gpus_0_renders_a_cpu_job(monkeypatch):
    monkeypatch.chdir(ROOT)
    script, _ = slurm.build_script(
        TEMPLATE,
        slurm.Resources(
            nodes=1, gpus=0, tasks_per_node=2, cpus_per_task=1, mem="3G", qos="short",
            constraint="skylake", account="lab",
            extra=["--exclusive", "--mail-type=END", "--signal=B:USR1@300"],
        ),
        DIGITS,
    )
    lines = script.splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert not any("--gres" in line or "--mem-per-cpu" in line for line in directives)
    for line in (
        "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=3G",
        "#SBATCH --qos=short", "#SBATCH --constraint=skylake", "#SBATCH --account=lab",
        "#SBATCH --exclusive", "#SBATCH --mail-type=END", "#SBATCH --time=08:00:00",
        "#SBATCH --signal=B:USR1@300",
    ):
        assert line in directives, line
    assert len([d for d in directives if d.startswith("#SBATCH --signal")]) == 1
    assert "trainer.devices=2 trainer.strategy=ddp" in script
    assert "trainer.accelerator=cpu" in script
    gpu_script, _ = slurm.build_script(TEMPLATE, slurm.Resources(nodes=1, gpus=2), DIGITS)
    assert "#SBATCH --gres=gpu:2" in gpu_script and "#SBATCH --cpus-per-task=6" in gpu_script
    assert "#SBATCH --mem-per-cpu=4G" in gpu_script and "trainer.accelerator=gpu" in gpu_script


def test_a_failed_submission_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    _stand_in(monkeypatch, tmp_path, "sbatch",
              'echo "sbatch: error: Invalid generic resource (gres) specification" >&2\nexit 1')
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    assert slurm.main([TEMPLATE, "--config", DIGITS, "--nodes", "1", "--gpus", "1", "--", f"out_dir={out}"]) == 2
    assert capsys.readouterr().err == (
        "error: sbatch failed: sbatch: error: Invalid generic resource (gres) specification\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--nodes", "3", "--gpus", "1"],
            "data.batch_size=64 (global) does not divide evenly over 3 processes",
        ),
        (
            ["--nodes", "1", "--gpus", "1", "--", "trainer.max_epoch=2"],
            "trainer.max_epoch: Key 'max_epoch' not in",
        ),
        (["--nodes", "0", "--gpus", "1"], "--nodes and --tasks-per-node must be at least 1"),
        (["--nodes", "1", "--gpus", "2", "--tasks-per-node", "3"], "DDP runs one task per GPU"),
        (["--nodes", "1", "--gpus", "0", "--sbatch", "exclusive"], "'exclusive' is not an sbatch option"),
        (["--nodes", "1", "--gpus", "1", "--", "data.name=imagenet", "data.root=/nowhere"],
         "data.root: ImageNet folder '/nowhere' not found"),
        (["--nodes", "1", "--gpus", "1", "--", "data.name=imagenet", "data.root=/"],
         "ImageNet folder '/train' not found (expected train/<class>/<image> files)"),
        (["--nodes", "1", "--gpus", "1", "--", "resume=/nowhere/last.ckpt"],
         "resume: checkpoint not found: /nowhere/last.ckpt"),
    ],
)
def test_slurm_rejects_a_bad_launch_before_submitting(args, needle, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: validation must fail first
    assert slurm.main([TEMPLATE, "--config", DIGITS, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_template_placeholders_must_be_known(tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text(Path(ROOT / TEMPLATE).read_text().replace("{{nodes}}", "{{node}}", 1))
    with pytest.raises(ResensError, match=r"placeholder \{\{node\}\} is unknown"):
        slurm.build_script(bad, slurm.Resources(), str(ROOT / DIGITS))


class _Tiny(L.LightningModule):
    """One weight; ``validation_step`` counts the validation epochs that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validated: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_trainer(root: Path, callbacks: list, max_epochs: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


@pytest.mark.parametrize("epoch_steps", [20, 40], ids=["on-the-epochs-last-step", "mid-epoch"])
def test_a_stop_neither_skips_nor_repeats_a_validation(tmp_path, epoch_steps):
    """The first check comes at step 20. With 20 steps per epoch that is an epoch's last step,
    and the check waits for the epoch's end: the checkpoint then lies after the epoch's
    validation. With 40 it stops mid-epoch, and the resumed run finishes that epoch."""
    n = SlurmRequeue.check_every_n_steps
    data = DataLoader(TensorDataset(torch.randn(2 * epoch_steps, 2)), batch_size=2)
    stopper = SlurmRequeue()
    stopper.request = SlurmRequeue.REQUEUE  # as if SIGUSR1 had come during the first epoch
    first = _Tiny()
    handlers = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Requeued) as stopped:
        _tiny_trainer(tmp_path, [stopper], 3).fit(first, data, data)
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == handlers
    stop = stopped.value
    assert (stop.step, stop.epoch, stop.requeue) == (n, 0, True)
    assert first.validated == ([0] if epoch_steps == n else [])
    assert stop.checkpoint == tmp_path / "hpc_ckpt_1.ckpt"
    assert sorted(p.name for p in tmp_path.glob("*hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]  # no partial
    resumed = _Tiny()
    trainer = _tiny_trainer(tmp_path, [SlurmRequeue()], 3)
    trainer.fit(resumed, data, data, ckpt_path=stop.checkpoint, weights_only=True)
    assert resumed.validated == ([1, 2] if epoch_steps == n else [0, 1, 2])
    assert trainer.global_step == 3 * epoch_steps


def test_without_the_templates_marker_rank_zero_requeues_and_reports_a_failure(tmp_path, monkeypatch):
    _stand_in(monkeypatch, tmp_path, "scontrol", 'echo "scontrol: error: Access/permission denied" >&2\nexit 1')
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.delenv(REQUEUE_MARKER_ENV, raising=False)
    stop = Requeued(tmp_path / "hpc_ckpt_4.ckpt", 25, 1, requeue=True)
    expected = (
        r"SLURM job 55: scontrol requeue failed \(scontrol: error: Access/permission denied\); "
        rf"resume by hand with resume={tmp_path}/hpc_ckpt_4.ckpt"
    )
    with pytest.raises(ResensError, match=expected):
        SlurmRequeue.leave(stop, is_global_zero=True)
    SlurmRequeue.leave(stop, is_global_zero=False)  # other ranks leave without a word


def test_with_the_templates_marker_rank_zero_leaves_the_requeue_to_the_batch_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: it must not be called
    monkeypatch.setenv("SLURM_JOB_ID", "56")
    marker = tmp_path / ".requeue-56"
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(marker))
    stop = Requeued(tmp_path / "hpc_ckpt_2.ckpt", 40, 2, requeue=True)
    SlurmRequeue.leave(stop, is_global_zero=True)
    assert marker.read_text() == f"{tmp_path}/hpc_ckpt_2.ckpt\n"
    assert capsys.readouterr().err == (
        f"SLURM job 56: stopped at step 40 (epoch 2) after a checkpoint; requeued, it resumes "
        f"from {tmp_path}/hpc_ckpt_2.ckpt\n"
    )
    marker.unlink()
    SlurmRequeue.leave(Requeued(stop.checkpoint, 40, 2, requeue=False), is_global_zero=True)
    assert not marker.exists(), "after SIGTERM SLURM decides; the script must not requeue"
    assert "ended by SIGTERM" in capsys.readouterr().err


def test_signals_during_start_up_are_recorded_not_fatal(monkeypatch):
    # before training listens: what resens's import installed in a SLURM job recorded it
    monkeypatch.setattr(resens, "EARLY_SIGNALS", [signal.SIGUSR1])
    assert SlurmRequeue().request == SlurmRequeue.REQUEUE and resens.EARLY_SIGNALS == []
    assert SlurmRequeue().request == SlurmRequeue.NONE
    stopper = SlurmRequeue()
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    stopper.listen()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.request == SlurmRequeue.REQUEUE
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.request == SlurmRequeue.STOP  # SIGTERM outranks the warning
    finally:
        stopper.stop_listening()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before

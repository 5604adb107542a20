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

from callbacks.training import SlurmRequeue
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
            first_epoch = run_dir / "checkpoints" / "last.ckpt"
            wait_for(first_epoch.is_file, proc, 150, "the first epoch's checkpoint")
            for task in (0, 1):  # as --signal=SIGUSR1@90 does: every task gets it
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
    assert job.script.rstrip().endswith(" ".join(JOB[-3:]))  # the overrides come last, so they win


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
    assert job.scontrol == [f"requeue {JOB_ID}"]  # once, from global rank 0
    for log in job.logs[0]:
        assert f"SLURM job {JOB_ID} requeued; it resumes from {job.run_dir}/hpc_ckpt_1.ckpt" in log
    hpc = load_checkpoint(job.run_dir / "hpc_ckpt_1.ckpt")  # weights_only=True, validated
    assert STEPS_PER_EPOCH < hpc["global_step"] < EPOCHS * STEPS_PER_EPOCH
    assert hpc["global_step"] % STEPS_PER_EPOCH, "the signal came mid-epoch; so must the checkpoint"
    assert "RNGState" in hpc["callbacks"] and "model._extra_state" in hpc["state_dict"]


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


def test_slurm_submits_the_rendered_script_with_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncat > {tmp_path}/submitted\necho "Submitted batch job 99"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
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
            2,
            4,
            DIGITS,
            [f"out_dir={tmp_path}/runs", "name=my run"],
            {"time": "1:00:00", "partition": "gpu"},
        )[0]
    )
    lines = submitted.splitlines()
    assert "#SBATCH --time=1:00:00" in lines and "#SBATCH --time=08:00:00" not in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert f"#SBATCH --output={tmp_path}/runs/slurm/%x-%j.out" in lines
    assert (tmp_path / "runs" / "slurm").is_dir()  # sbatch would not create it
    assert lines[-1].endswith(f"out_dir={tmp_path}/runs 'name=my run'")


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
        (["--nodes", "0", "--gpus", "1"], "--nodes and --gpus must be at least 1"),
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
        slurm.build_script(bad, 1, 1, str(ROOT / DIGITS))


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_failed_requeue_stops_with_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "scontrol: error: Access/permission denied" >&2\nexit 1\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"an older requeue checkpoint")
    requeue = SlurmRequeue()
    requeue.requested = True  # as if SIGUSR1 had come during the first step
    n = SlurmRequeue.check_every_n_steps  # the ranks look at the flag every n steps only
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=n + 5,
        callbacks=[requeue],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    expected = (
        r"SLURM job 55: scontrol requeue failed \(scontrol: error: Access/permission denied\); "
        rf"resume by hand with resume={tmp_path}/hpc_ckpt_4.ckpt"
    )
    handler = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(ResensError, match=expected):
        trainer.fit(_Tiny(), data)
    assert signal.getsignal(signal.SIGUSR1) == handler
    assert trainer.global_step == n
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_4.ckpt"]
    assert torch.load(tmp_path / "hpc_ckpt_4.ckpt", weights_only=True)["global_step"] == n

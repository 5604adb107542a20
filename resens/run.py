"""Run folders, run ids, the W&B logger and the run-state callbacks shared by training and analysis."""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from resens.errors import ConfigError, ResensError

RUN_ID_ENV = "RESENS_RUN_ID"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "run"


def slurm_job_id() -> str | None:
    """The job id a requeued SLURM job keeps (array jobs: ``<array job>_<task>``)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_requeued() -> bool:
    """True in a SLURM job that runs again after a requeue (``scontrol requeue``, node failure)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of the run's requeue checkpoints (``hpc_ckpt_<n>.ckpt``) and
    ``checkpoints/last.ckpt``; None if it has none."""
    found = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        found.append(run_dir / "checkpoints" / "last.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def find_last_run(out_dir: str | Path, name: str) -> Path:
    """The run folder of ``name`` under ``out_dir`` with the newest checkpoint."""
    runs = [p for p in Path(out_dir).glob(f"{_slug(name)}-*") if newest_checkpoint(p) is not None]
    if not runs:
        raise ConfigError(f"resume=last: no run named '{name}' with a checkpoint under {out_dir}/")
    return max(runs, key=lambda p: newest_checkpoint(p).stat().st_mtime)


def resolve_run(cfg: DictConfig) -> tuple[Path, str, Path | None]:
    """``(run folder, run id, checkpoint to resume from or None)``; creates nothing.

    The id is stable where it must be: every process of one launch shares it (through the
    environment), a SLURM job keeps it across requeues, and a resumed run keeps its own. A SLURM
    job that was requeued continues from its run's newest checkpoint, whatever ``resume`` says:
    the requeued job repeats the original command line.
    """
    if cfg.resume is not None:
        if cfg.resume == "last":
            run_dir = find_last_run(cfg.out_dir, cfg.name)
            ckpt = newest_checkpoint(run_dir)
        else:
            ckpt = Path(cfg.resume)
            if not ckpt.is_file():
                raise ConfigError(f"resume: checkpoint not found: {ckpt}")
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        newest = newest_checkpoint(run_dir) if slurm_requeued() else None
        if newest is not None and newest.stat().st_mtime > ckpt.stat().st_mtime:
            ckpt = newest
        return run_dir, run_dir.name, ckpt
    run_id = os.environ.get(RUN_ID_ENV)
    job = slurm_job_id()
    if run_id is None:
        suffix = f"slurm{job}" if job else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        run_id = f"{_slug(cfg.name)}-{suffix}"
        os.environ[RUN_ID_ENV] = run_id  # inherited by the DDP worker processes Lightning starts
    run_dir = Path(cfg.out_dir) / run_id
    # Job ids are unique, so a checkpoint in this job's folder comes from an earlier attempt of it.
    return run_dir, run_id, newest_checkpoint(run_dir) if job else None


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger that falls back to offline mode when W&B cannot be reached online."""

    @property
    def experiment(self) -> Any:
        if self._experiment is None and rank_zero_only.rank == 0:
            # Created only now, when training starts: a run that fails validation leaves no folder.
            Path(self._wandb_init["dir"]).mkdir(parents=True, exist_ok=True)
        if self._experiment is None and self._wandb_init.get("mode") == "online":
            try:
                return super().experiment
            except Exception as err:  # noqa: BLE001 - any failure to reach the server
                import wandb

                wandb.teardown()  # the service still holds the run id of the failed attempt
                self._experiment = None
                warnings.warn(
                    f"W&B unreachable ({str(err).splitlines()[0][:120]}); logging offline instead. "
                    f"Sync later with: wandb sync {self._wandb_init['dir']}/wandb/offline-run-*",
                    stacklevel=2,
                )
                self._wandb_init["mode"] = "offline"
                self._wandb_init["settings"] = None
        return super().experiment


def make_logger(cfg: DictConfig, run_dir: Path, run_id: str, job_type: str | None = None) -> WandbLogger:
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    if mode not in ("online", "offline", "disabled", "dryrun"):
        raise ConfigError(f"logger.mode: '{mode}' is not one of online, offline, disabled")
    settings = None
    if mode == "online":
        import wandb

        settings = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)))
    return ResilientWandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.name,
        tags=list(cfg.logger.tags),
        job_type=job_type or cfg.logger.job_type,
        name=run_id,
        id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:64],
        resume="allow",
        save_dir=str(run_dir),
        dir=str(run_dir),
        mode="offline" if mode == "dryrun" else mode,
        settings=settings,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


class RunFolder(L.Callback):
    """Writes the resolved config into the run folder once, on global rank 0."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    @rank_zero_only
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml")


class Throughput(L.Callback):
    """Logs ``train/images_per_s``: training images per second over all processes, per epoch,
    timed from the second step of the epoch (the first warms up, compiles) to its end."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._images, self._start, self._warm = 0, None, False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._warm:
            if self._start is None:
                if pl_module.device.type == "cuda":
                    torch.cuda.synchronize(pl_module.device)
                self._start = time.perf_counter()
            self._images += len(batch[1])
        self._warm = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or not self._images:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        rate = self._images * trainer.world_size / (time.perf_counter() - self._start)
        pl_module.log("train/images_per_s", rate, rank_zero_only=True)


class RNGState(L.Callback):
    """Saves and restores the Python, NumPy and torch RNG states with each checkpoint, so a
    resumed run draws the same random numbers as an uninterrupted one (plain types only:
    the checkpoint still loads with ``weights_only=True``)."""

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        np_state = np.random.get_state()
        out = {
            "python": [version, list(state), gauss],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Requeued(Exception):
    """Training stopped after a checkpoint because SLURM is about to end the job; it is requeued."""


class SlurmRequeue(L.Callback):
    """On SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90``): checkpoint to
    ``<run>/hpc_ckpt_<n>.ckpt`` after the current step, ``scontrol requeue`` the job, and stop by
    raising ``Requeued``. The requeued job finds the checkpoint through ``resolve_run``.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) checkpoints inside the signal
    handler, i.e. at any point of a step, and under DDP enters a barrier there while other ranks
    may be inside a gradient all-reduce (Lightning issue #21406). This handler only sets a flag;
    the ranks agree on it after each step and checkpoint together.
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in setup: Lightning snapshots the signal handlers after setup and restores that
        # snapshot at its teardown, which would leave this handler installed.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, _: BaseException) -> None:
        self._restore_handler()  # when fit raises (Requeued does), Lightning skips teardown

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # A collective on every rank, every step: the signal reaches the ranks at different steps.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        run_dir = Path(trainer.default_root_dir)
        older = {
            p: int(m[1]) for p in run_dir.glob("hpc_ckpt_*.ckpt")
            if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
        }
        # Lightning's naming, so that its own SLURM auto-resume would find the newest one too
        path = run_dir / f"hpc_ckpt_{1 + max(older.values(), default=0)}.ckpt"
        trainer.save_checkpoint(path)
        job = slurm_job_id()
        if trainer.is_global_zero:
            for stale in older:
                stale.unlink(missing_ok=True)
            try:
                done = subprocess.run(
                    ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
                )
                failure = done.stderr.strip() or f"exit code {done.returncode}"
                if not done.returncode:
                    failure = ""
            except (OSError, subprocess.TimeoutExpired) as err:
                failure = str(err)
            if failure:
                raise ResensError(
                    f"SLURM job {job}: scontrol requeue failed ({failure.splitlines()[0]}); "
                    f"resume by hand with resume={path}"
                )
        raise Requeued(f"SLURM job {job} requeued; it resumes from {path}")

"""The run-state callbacks of training: the run folder's config, throughput, RNG states in
checkpoints, and checkpoint-and-requeue on SLURM's warning signal."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from resens.errors import ResensError
from resens.runs import slurm_job_id


class RunFolder(L.Callback):
    """Writes the resolved config into the run folder once, on global rank 0."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    @rank_zero_only
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml")


class Throughput(L.Callback):
    """Logs ``train/images_per_s``: training images per second over all processes, once per
    epoch, over the training steps alone.

    The clock starts at the second step of the epoch (the first warms up: data-loader start,
    compilation, cuDNN autotuning), stops when validation starts (Lightning runs the epoch's
    validation before ``on_train_epoch_end``) and resumes at the next training step. On a GPU it
    synchronises the device only where the clock starts and stops, never per step.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._images, self._seconds, self._since, self._warm = 0, 0.0, None, False

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _pause(self, pl_module: L.LightningModule) -> None:
        if self._since is not None:
            self._sync(pl_module)
            self._seconds += time.perf_counter() - self._since
            self._since = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._warm:
            self._warm = True
            return
        if self._since is None:
            self._sync(pl_module)
            self._since = time.perf_counter()
        self._images += len(batch[1])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)  # no validation in this epoch
        if not self._images or self._seconds <= 0:
            return
        rate = self._images * trainer.world_size / self._seconds
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
    ``<run>/hpc_ckpt_<n>.ckpt`` at a step boundary, ``scontrol requeue`` the job, and stop by
    raising ``Requeued``. The requeued job finds the checkpoint through ``resens.runs.resolve_run``.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) checkpoints inside the signal
    handler, i.e. at any point of a step, and under DDP enters a barrier there while other ranks
    may be inside a gradient all-reduce (Lightning issue #21406). This handler only sets a flag.
    The signal reaches the ranks at different steps, so they agree on the flag with an all-reduce,
    a collective that also waits for the device; to keep that off most steps they do so only when
    the global step is a multiple of ``check_every_n_steps``. The checkpoint then comes at most
    that many steps after the signal: far less than SLURM's 90 s warning at any realistic step
    time.
    """

    check_every_n_steps: int = 20

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
        # The global step is the same on every rank, so all ranks enter the collective together.
        if trainer.global_step % self.check_every_n_steps:
            return
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

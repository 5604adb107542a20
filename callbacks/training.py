"""The run-state callbacks of training: the run folder's config, throughput, RNG states in
checkpoints, and checkpoint-and-requeue on SLURM's warning signal."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import resens
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


REQUEUE_MARKER_ENV = "RESENS_REQUEUE_MARKER"  # set by the launch templates (configs/slurm/)


class Requeued(Exception):
    """Training stopped at a step boundary, after a checkpoint, because SLURM is ending the job:
    ``requeue`` after SIGUSR1 (the time-limit warning: the job is to be requeued), not after
    SIGTERM (a cancellation or a preemption: SLURM decides what follows)."""

    def __init__(self, checkpoint: Path, step: int, epoch: int, requeue: bool) -> None:
        self.checkpoint, self.step, self.epoch, self.requeue = checkpoint, step, epoch, requeue
        job = slurm_job_id()
        if requeue:
            then = f"requeued, it resumes from {checkpoint}"
        else:
            then = f"ended by SIGTERM; a requeued job resumes from {checkpoint} (or resume={checkpoint})"
        super().__init__(f"SLURM job {job}: stopped at step {step} (epoch {epoch}) after a checkpoint; {then}")


class SlurmRequeue(Checkpoint):
    """Stop cleanly when SLURM is about to end the job: on SIGUSR1 (``#SBATCH
    --signal=SIGUSR1@90``, or ``B:USR1``, which the batch script passes on) and on SIGTERM.

    The handlers only set a flag. The signal reaches the ranks at different steps, so they agree
    on it with one all-reduce, at step boundaries where the global step is a multiple of
    ``check_every_n_steps`` (the global step is the same on every rank, so they all enter the
    collective together) and at every epoch's end, after its validation and checkpoints (a
    ``Checkpoint`` callback runs after the others, and after the ``ModelCheckpoint`` callbacks listed before
    it). An epoch's last batch is left to that check: a checkpoint there would resume past the
    epoch's validation. Then every rank writes ``<run>/hpc_ckpt_<n>.ckpt`` together (to a
    partial file first, renamed when complete, so a kill never leaves half a checkpoint under that
    name; older ones are removed after) and raises ``Requeued``. ``resens.train`` catches it,
    closes the W&B run and calls :meth:`leave`.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) checkpoints inside the signal
    handler, i.e. at any point of a step, and under DDP enters a barrier there while other ranks
    may be inside a gradient all-reduce (Lightning issue #21406); its SIGTERM handler broadcasts
    from inside the handler. Both stay off: :meth:`listen` replaces them.
    """

    check_every_n_steps: int = 20
    NONE, REQUEUE, STOP = 0, 1, 2

    def __init__(self) -> None:
        early = resens.EARLY_SIGNALS
        self.request = self.REQUEUE if signal.SIGUSR1 in early else self.NONE
        early.clear()
        self._previous: dict[int, Any] = {}

    def listen(self) -> None:
        """Handle SIGUSR1 and SIGTERM from now on (main thread only). Called at the start of the
        process, so that a signal during start-up is not fatal, and again when training starts,
        to replace the SIGTERM handler Lightning installs in between."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def stop_listening(self) -> None:
        """Restore the handlers :meth:`listen` found."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request = max(self.request, self.STOP if signum == signal.SIGTERM else self.REQUEUE)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.listen()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches or trainer.global_step % self.check_every_n_steps:
            return
        self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer: L.Trainer) -> None:
        strategy = trainer.strategy
        request = int(strategy.reduce(torch.tensor(self.request, device=strategy.root_device), reduce_op="max"))
        if request == self.NONE:
            return
        run_dir = Path(trainer.default_root_dir)
        older = {
            p: int(m[1]) for p in run_dir.glob("hpc_ckpt_*.ckpt")
            if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
        }
        # Lightning's naming, so that its own SLURM auto-resume would find the newest one too
        path = run_dir / f"hpc_ckpt_{1 + max(older.values(), default=0)}.ckpt"
        partial = path.with_name(f".{path.name}.partial")
        trainer.save_checkpoint(partial, weights_only=False)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, path)
            for stale in [*older, *run_dir.glob(".hpc_ckpt_*.partial")]:
                stale.unlink(missing_ok=True)
        strategy.barrier("SlurmRequeue")
        raise Requeued(path, trainer.global_step, trainer.current_epoch, request == self.REQUEUE)

    @staticmethod
    def leave(stop: Requeued, is_global_zero: bool) -> None:
        """After a stop, once the W&B run is closed: every rank leaves the process group, then
        global rank 0 has the job requeued and prints one line that says where it resumes.

        The launch templates requeue the job after ``srun`` has returned, when this left them the
        file ``$RESENS_REQUEUE_MARKER`` (holding the checkpoint's path): requeueing while the
        tasks still run would have SLURM kill them in the middle of their teardown. Without
        that variable (a batch script of the user's own), rank 0 calls ``scontrol requeue``
        itself, as the last thing it does."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        if not is_global_zero:
            return
        marker = os.environ.get(REQUEUE_MARKER_ENV)
        if stop.requeue and marker:
            partial = Path(f"{marker}.partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(f"{stop.checkpoint}\n")
            os.replace(partial, marker)
        elif stop.requeue:
            job = slurm_job_id()
            try:
                done = subprocess.run(
                    ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
                )
                failure = "" if not done.returncode else done.stderr.strip() or f"exit code {done.returncode}"
            except (OSError, subprocess.TimeoutExpired) as err:
                failure = str(err)
            if failure:
                raise ResensError(
                    f"SLURM job {job}: scontrol requeue failed ({failure.splitlines()[0]}); "
                    f"resume by hand with resume={stop.checkpoint}"
                )
        sys.stderr.write(f"{stop}\n")
        sys.stderr.flush()

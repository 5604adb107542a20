"""Run folders, run ids, the W&B logger and the run-state callbacks shared by training and analysis."""

from __future__ import annotations

import os
import random
import re
import secrets
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

from resens.errors import ConfigError

RUN_ID_ENV = "RESENS_RUN_ID"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "run"


def slurm_job_id() -> str | None:
    """The job id a requeued SLURM job keeps (array jobs: ``<array job>_<task>``)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def find_last_run(out_dir: str | Path, name: str) -> Path:
    """The newest run folder of ``name`` under ``out_dir`` that has ``checkpoints/last.ckpt``."""
    runs = [
        p for p in Path(out_dir).glob(f"{_slug(name)}-*")
        if (p / "checkpoints" / "last.ckpt").is_file()
    ]
    if not runs:
        raise ConfigError(f"resume=last: no run named '{name}' with checkpoints/last.ckpt under {out_dir}/")
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)


def resolve_run(cfg: DictConfig) -> tuple[Path, str, Path | None]:
    """``(run folder, run id, checkpoint to resume from or None)``.

    The id is stable where it must be: every process of one launch shares it (through the
    environment), a SLURM job keeps it across requeues, and a resumed run keeps its own.
    """
    if cfg.resume is not None:
        if cfg.resume == "last":
            run_dir = find_last_run(cfg.out_dir, cfg.name)
            ckpt = run_dir / "checkpoints" / "last.ckpt"
        else:
            ckpt = Path(cfg.resume)
            if not ckpt.is_file():
                raise ConfigError(f"resume: checkpoint not found: {ckpt}")
            run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run_dir, run_dir.name, ckpt
    run_id = os.environ.get(RUN_ID_ENV)
    if run_id is None:
        job = slurm_job_id()
        suffix = f"slurm{job}" if job else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        run_id = f"{_slug(cfg.name)}-{suffix}"
        os.environ[RUN_ID_ENV] = run_id  # inherited by the DDP worker processes Lightning starts
    return Path(cfg.out_dir) / run_id, run_id, None


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger that falls back to offline mode when W&B cannot be reached online."""

    @property
    def experiment(self) -> Any:
        if self._experiment is None and self._wandb_init.get("mode") == "online":
            try:
                return super().experiment
            except Exception as err:  # noqa: BLE001 - any failure to reach the server
                import wandb

                wandb.finish()
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
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = None
    if mode == "online":
        import wandb

        settings = wandb.Settings(init_timeout=30)
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

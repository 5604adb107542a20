"""The W&B logger of a run: Lightning's WandbLogger, created lazily, falling back to offline mode
when the server cannot be reached.

What this relies on beyond the documented APIs is checked by ``tests/test_wandb_logger.py``:
WandbLogger forwards its ``settings`` keyword, the same ``wandb.Settings`` object, to every
``wandb.init`` it makes, and a ``wandb.init`` that raises leaves it without a run, so that the
next access to ``experiment`` tries again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from resens.errors import ConfigError
from resens.runs import slug

MODES = ("online", "offline", "disabled", "dryrun")


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger whose run is created on first use (on global rank 0, when training starts:
    a run that fails its checks leaves no folder) and which logs offline instead when ``mode`` is
    online and W&B cannot be reached within ``init_timeout`` seconds."""

    def __init__(self, save_dir: str | Path, mode: str, init_timeout: float = 30.0, **kwargs: Any) -> None:
        import wandb

        # Kept: on a failed online start its mode is switched to offline for the second try.
        self._settings = wandb.Settings(mode=mode, init_timeout=init_timeout)
        self._started = False
        super().__init__(save_dir=str(save_dir), settings=self._settings, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if not self._started:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            try:
                run = super().experiment
            except Exception as err:  # noqa: BLE001 - any failure to reach the server
                if self._settings.mode != "online":
                    raise
                import wandb

                wandb.teardown()  # the service still holds the run id of the failed attempt
                warnings.warn(
                    f"W&B unreachable ({str(err).splitlines()[0][:120]}); logging offline instead. "
                    f"Sync later with: wandb sync {self.save_dir}/wandb/offline-run-*",
                    stacklevel=2,
                )
                self._settings.mode = "offline"
                run = super().experiment
            self._started = True
            return run
        return super().experiment

    @property
    def started(self) -> bool:
        """Whether this process created (or adopted) its W&B run."""
        return self._started

    def finish(self) -> None:
        """Close the W&B run, if this process has one, so that its files are complete on disk
        (offline runs are then syncable)."""
        if self._started:
            self.experiment.finish()


def make_logger(cfg: DictConfig, run_dir: Path, run_id: str, job_type: str | None = None) -> ResilientWandbLogger:
    """The run's logger: W&B run ``run_id`` (also its id, made W&B-safe) in ``run_dir``, resumed if
    it exists. ``WANDB_MODE`` overrides ``cfg.logger.mode``; ``WANDB_INIT_TIMEOUT`` (s, default 30)
    bounds the wait for the server."""
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    if mode not in MODES:
        raise ConfigError(f"logger.mode: '{mode}' is not one of online, offline, disabled")
    return ResilientWandbLogger(
        save_dir=run_dir,
        mode="offline" if mode == "dryrun" else mode,
        init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)),
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.name,
        tags=list(cfg.logger.tags),
        job_type=job_type or cfg.logger.job_type,
        name=run_id,
        id=slug(run_id, max_len=64, dots=False),
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )

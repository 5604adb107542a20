"""Run folders and run ids: naming, the SLURM job id, and which checkpoint a run resumes from."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resens.errors import ConfigError

RUN_ID_ENV = "RESENS_RUN_ID"
WANDB_ID_MAX = 64  # W&B run ids are path components of URLs: kept short


def slug(text: str, max_len: int = 60, dots: bool = True) -> str:
    """``text`` safe for a file name, a SLURM job name or a W&B run id: every run of characters
    other than letters, digits, ``_``, ``-`` (and ``.`` if ``dots``) becomes one ``-``, leading and
    trailing ``-`` go, then the first ``max_len`` characters; ``"run"`` if nothing is left."""
    kept = "A-Za-z0-9_.-" if dots else "A-Za-z0-9_-"
    return re.sub(f"[^{kept}]+", "-", text).strip("-")[:max_len] or "run"


def wandb_id(run_id: str) -> str:
    """The W&B run id of run ``run_id``: ``run_id`` made W&B-safe (no dots); when that is over
    ``WANDB_ID_MAX`` characters, its head and a hash of the whole id, so that two runs whose
    ids differ only near the end (their timestamps) never share a W&B run."""
    safe = slug(run_id, max_len=len(run_id) + 1, dots=False)
    if len(safe) <= WANDB_ID_MAX:
        return safe
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
    return f"{safe[: WANDB_ID_MAX - 11].rstrip('-')}-{digest}"


def timestamp_suffix() -> str:
    """``YYYYmmdd-HHMMSS-xxxx``: readable, and unique within one second by its random part."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def lesion_run_id(train_run: str) -> str:
    """The id of a new lesion run of the training run ``train_run``: its id, ``-lesion-``, a
    timestamp and a random part (two lesion runs of one checkpoint never share an id)."""
    return f"{train_run}-lesion-{timestamp_suffix()}"


def slurm_job_id() -> str | None:
    """The job id a requeued SLURM job keeps (array jobs: ``<array job>_<task>``)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_requeued() -> bool:
    """True in a SLURM job that runs again after a requeue (``scontrol requeue``, node failure)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to: ``<run>/checkpoints/x.ckpt`` and the requeue
    checkpoints ``<run>/hpc_ckpt_<n>.ckpt`` both give ``<run>``."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of the run's requeue checkpoints (``hpc_ckpt_<n>.ckpt``) and
    ``checkpoints/last.ckpt``; None if it has none."""
    found = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        found.append(run_dir / "checkpoints" / "last.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def find_last_run(out_dir: str | Path, name: str) -> Path:
    """The run folder of ``name`` under ``out_dir`` with the newest checkpoint."""
    runs = [p for p in Path(out_dir).glob(f"{slug(name)}-*") if newest_checkpoint(p) is not None]
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
            run_dir = run_dir_of(ckpt)
        newest = newest_checkpoint(run_dir) if slurm_requeued() else None
        if newest is not None and newest.stat().st_mtime > ckpt.stat().st_mtime:
            ckpt = newest
        return run_dir, run_dir.name, ckpt
    run_id = os.environ.get(RUN_ID_ENV)
    job = slurm_job_id()
    if run_id is None:
        suffix = f"slurm{job}" if job else timestamp_suffix()
        run_id = f"{slug(cfg.name)}-{suffix}"
        os.environ[RUN_ID_ENV] = run_id  # inherited by the DDP worker processes Lightning starts
    run_dir = Path(cfg.out_dir) / run_id
    # Job ids are unique, so a checkpoint in this job's folder comes from an earlier attempt of it.
    return run_dir, run_id, newest_checkpoint(run_dir) if job else None


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of the file at ``path`` (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def lineage_of(checkpoint: str | Path, trained: DictConfig) -> dict[str, Any]:
    """Where a checkpoint comes from, for the config of a run that analyses it: its path and
    sha256, and the training run (``trained``: the config the checkpoint carries) by its id, W&B
    id, name, group and folder. The run folder's name is the training run's id."""
    path = Path(checkpoint).resolve()
    run_dir = run_dir_of(path)
    return {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_of(path),
        "train_run": {
            "id": run_dir.name, "wandb_id": wandb_id(run_dir.name), "name": run_dir.name,
            "group": trained.logger.group or trained.name, "dir": str(run_dir),
        },
    }

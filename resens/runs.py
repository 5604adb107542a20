"""Run folders and run ids: naming, the SLURM job id, and which checkpoint a run resumes from."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

from omegaconf import DictConfig

from resens.errors import ConfigError

RUN_ID_ENV = "RESENS_RUN_ID"


def slug(text: str, max_len: int = 60, dots: bool = True) -> str:
    """``text`` safe for a file name, a SLURM job name or a W&B run id: every run of characters
    other than letters, digits, ``_``, ``-`` (and ``.`` if ``dots``) becomes one ``-``, leading and
    trailing ``-`` go, then the first ``max_len`` characters; ``"run"`` if nothing is left."""
    kept = "A-Za-z0-9_.-" if dots else "A-Za-z0-9_-"
    return re.sub(f"[^{kept}]+", "-", text).strip("-")[:max_len] or "run"


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
        suffix = f"slurm{job}" if job else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        run_id = f"{slug(cfg.name)}-{suffix}"
        os.environ[RUN_ID_ENV] = run_id  # inherited by the DDP worker processes Lightning starts
    run_dir = Path(cfg.out_dir) / run_id
    # Job ids are unique, so a checkpoint in this job's folder comes from an earlier attempt of it.
    return run_dir, run_id, newest_checkpoint(run_dir) if job else None

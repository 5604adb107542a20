"""Train a network, then run the configured analyses on it.

    python -m resens.train configs/cifar10_resnet110.yaml trainer.devices=8 data.root=/data/cifar
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig

from callbacks.training import Requeued, RNGState, RunFolder, SlurmRequeue, Throughput
from resens import config as config_lib
from resens.analysis import summary
from resens.checkpoint import check_compatible, load_checkpoint
from resens.data import build_datamodule
from resens.errors import ConfigError, cli_main
from resens.module import ResNetClassifier, eval_split, metric_definitions
from resens.runs import RUN_ID_ENV, resolve_run, slurm_requeued, wandb_id
from resens.wandb_logger import ResilientWandbLogger, make_logger


def trainer_kwargs(cfg: DictConfig) -> dict:
    """The ``lightning.Trainer`` keyword arguments of ``cfg.trainer`` (unset ones left out).

    With stochastic depth on several processes, plain DDP (``ddp``, or ``auto``, which picks it)
    becomes ``ddp_find_unused_parameters_true``: a closed gate leaves its branch without
    gradient, and DDP must then look for unused parameters.
    """
    kwargs = {k: v for k, v in config_lib.to_dict(cfg.trainer).items() if v is not None}
    if (
        cfg.model.stochastic_depth
        and kwargs["strategy"] in ("ddp", "auto")
        and check_devices(cfg) > 1
    ):
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    return kwargs


def check_devices(cfg: DictConfig) -> int:
    """The number of processes (devices × nodes) as the Trainer will count them; worked out before
    it exists, so that a bad device setting or batch split fails before anything is created."""
    t = cfg.trainer
    name = t.accelerator
    if name in ("auto", "gpu"):
        gpu = "mps" if MPSAccelerator.is_available() else "cuda"
        name = gpu if name == "gpu" or CUDAAccelerator.is_available() or gpu == "mps" else "cpu"
    accelerator = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator}.get(name)
    if accelerator is None:
        raise ConfigError(
            f"trainer.accelerator: '{t.accelerator}' is not one of auto, cpu, gpu, cuda, mps"
        )
    devices = accelerator.auto_device_count() if t.devices == "auto" else t.devices
    try:
        per_node = len(accelerator.get_parallel_devices(accelerator.parse_devices(devices)))
    except (MisconfigurationException, TypeError, ValueError) as err:
        raise ConfigError(f"trainer.devices={t.devices}: {' '.join(str(err).split())}") from None
    world = per_node * t.num_nodes
    if SLURMEnvironment.detect() and world != int(os.environ["SLURM_NTASKS"]):
        raise ConfigError(
            f"trainer.num_nodes × trainer.devices = {world} processes, but SLURM started "
            f"{os.environ['SLURM_NTASKS']} tasks (match --nodes and --ntasks-per-node)"
        )
    if t.sync_batchnorm and name == "cpu" and world > 1:
        raise ConfigError(
            "trainer.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only, not on the CPU"
        )
    return world


def resolved_settings(cfg: DictConfig, module: ResNetClassifier) -> dict[str, Any]:
    """What the run resolved beyond its config, for the W&B config's ``resolved`` section: the
    data's classes and channels, the per-device batch, the number of processes, the peak learning
    rate, the evaluation split's name and every setting ``analysis.quick`` caps, as used."""
    from callbacks.base import effective_settings

    hp = module.hparams
    return {
        "num_classes": hp["num_classes"], "in_channels": hp["in_channels"],
        "per_device_batch": hp["per_device_batch"], "world_size": check_devices(cfg),
        "peak_lr": module.peak_lr(), "eval_split": eval_split(cfg),
        "analysis": effective_settings(cfg.analysis),
    }


def run_record(run_dir: Path, run_id: str, analysis: str) -> dict[str, Any]:
    """The W&B config's ``run`` section: the run's id, W&B id and folder, and ``analysis``:
    where its analyses ran (``end_of_training``, ``lesion``, or ``none``)."""
    return {"id": run_id, "wandb_id": wandb_id(run_id), "dir": str(run_dir), "analysis": analysis}


def build_trainer(
    cfg: DictConfig, run_dir: Path, run_id: str, callbacks: list[L.Callback], job_type: str | None = None,
    wandb_root: Path | None = None, resume: bool = False, extra_config: dict[str, Any] | None = None,
) -> L.Trainer:
    """The Trainer of a run in ``run_dir``: its callbacks, the analyses of ``cfg``, and the W&B
    logger (``resens.wandb_logger.make_logger``: folder ``<wandb_root>/wandb``, default the
    parent of ``run_dir``; ``resume`` and ``extra_config`` go to it)."""
    from callbacks import build_analysis_callbacks

    kwargs = trainer_kwargs(cfg)
    show_bar = kwargs.get("enable_progress_bar", True)
    all_callbacks = [RunFolder(cfg, run_dir), RNGState(), *callbacks, *build_analysis_callbacks(cfg)]
    if show_bar and sys.stdout.isatty():
        all_callbacks.append(RichProgressBar())
    plugins = []
    if SLURMEnvironment.detect():
        # Lightning's own requeue handler stays off: in training, SlurmRequeue stops and requeues
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=make_logger(
            cfg, wandb_root or run_dir.parent, run_id, job_type, resume, extra_config, metric_definitions(cfg)
        ),
        callbacks=all_callbacks,
        plugins=plugins,
        **kwargs,
    )
    return trainer


def check_resume(path: Path, module: ResNetClassifier, cfg: DictConfig) -> None:
    """Raise unless the checkpoint at ``path`` loads safely and fits ``module`` and ``cfg``."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, module, path)
    if ckpt.get("epoch", 0) > cfg.trainer.max_epochs:
        raise ConfigError(
            f"trainer.max_epochs={cfg.trainer.max_epochs} is below epoch {ckpt['epoch']} of the "
            f"checkpoint {path}"
        )


def train(cfg: DictConfig) -> Path:
    """Fit the configured model and run its analyses; returns the run folder.

    The checkpoint to resume from, the device settings, the batch split and the data folder are
    all checked before the run folder, the W&B run or the Trainer exist.
    """
    # The launching process names the run; the DDP workers it starts inherit the name.
    owns_run_id = RUN_ID_ENV not in os.environ
    stopper = SlurmRequeue() if SLURMEnvironment.detect() else None
    if stopper is not None:
        stopper.listen()  # from the start: SLURM's signal during start-up is acted on, not fatal
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        run_dir, run_id, ckpt_path = resolve_run(cfg)
        batch = config_lib.per_device_batch(cfg.data.batch_size, check_devices(cfg))
        datamodule = build_datamodule(cfg.data, batch)
        if not cfg.data.download:  # else the files appear only in fit (prepare_data on local rank 0)
            datamodule.setup("fit")
        module = ResNetClassifier(
            config_lib.to_dict(cfg), datamodule.num_classes, datamodule.in_channels, batch
        )
        if ckpt_path is not None:
            check_resume(ckpt_path, module, cfg)
        best = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch:03d}",
            monitor=f"{eval_split(cfg)}/error",
            mode="min",
            auto_insert_metric_name=False,
        )
        # Not ModelCheckpoint(save_last=True): since Lightning 2.6 that writes last.ckpt only in an
        # epoch whose val/error improved, and resuming from it would silently repeat epochs.
        last = ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False
        )
        extra = {
            "resolved": resolved_settings(cfg, module),
            "run": {
                **run_record(run_dir, run_id, "end_of_training" if cfg.analysis.run else "none"),
                "resumed_from": None if ckpt_path is None else str(ckpt_path),
            },
        }
        callbacks = [best, last, LearningRateMonitor("step"), Throughput()]
        trainer = build_trainer(
            cfg, run_dir, run_id, [*callbacks, *([stopper] if stopper else [])],
            wandb_root=Path(cfg.out_dir), resume=ckpt_path is not None or slurm_requeued(), extra_config=extra,
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except Requeued as stop:
            logger = wandb_logger(trainer)
            if logger is not None:
                logger.finish(preempted=stop.requeue)  # every metric logged so far is on disk
            SlurmRequeue.leave(stop, trainer.is_global_zero)
            return run_dir
        if trainer.is_global_zero:
            log_training_outcome(trainer, best, last, eval_split(cfg))
        finish_logging(trainer)
        if trainer.is_global_zero:
            print(f"run folder: {run_dir}")
        return run_dir
    finally:
        if stopper is not None:
            stopper.stop_listening()
        if owns_run_id:
            os.environ.pop(RUN_ID_ENV, None)


def wandb_logger(trainer: L.Trainer) -> ResilientWandbLogger | None:
    """The trainer's W&B logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, ResilientWandbLogger)), None)


def log_training_outcome(trainer: L.Trainer, best: ModelCheckpoint, last: ModelCheckpoint, split: str) -> None:
    """Rank 0, after fit: the training headline (``summary.training_headline``) in the W&B
    summary, and the best and last checkpoints as model artifacts with those aliases."""
    logger = wandb_logger(trainer)
    if logger is None or not logger.started:
        return
    found = re.search(r"best-epoch(\d+)", Path(best.best_model_path).name) if best.best_model_path else None
    last_error = trainer.callback_metrics.get(f"{split}/error")
    logger.experiment.summary.update(summary.training_headline(
        split,
        None if best.best_model_score is None else float(best.best_model_score),
        int(found[1]) if found else None,
        None if last_error is None else float(last_error),
    ))
    logger.log_checkpoints({"best": best.best_model_path, "last": last.last_model_path or last.best_model_path})


def finish_logging(trainer: L.Trainer) -> None:
    """Log the run folder's analysis.json and figures as an artifact, then close the W&B run so
    its files are complete on disk (offline runs are then syncable)."""
    logger = wandb_logger(trainer)
    if logger is not None:
        if trainer.is_global_zero:
            logger.log_outputs(trainer.default_root_dir)
        logger.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=10")
    args = parser.parse_args(argv)

    return cli_main(lambda: train(config_lib.load(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())

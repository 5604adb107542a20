"""Train a network, then run the configured analyses on it.

    python -m resens.train configs/cifar10_resnet110.yaml trainer.devices=8 data.root=/data/cifar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig

from resens import config as config_lib
from resens.checkpoint import check_compatible, load_checkpoint
from resens.data import build_datamodule
from resens.errors import ConfigError, ResensError
from resens.module import ResNetClassifier
from resens.run import RNGState, RunFolder, make_logger, resolve_run


def trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = {k: v for k, v in config_lib.to_dict(cfg.trainer).items() if v is not None}
    return kwargs


def per_device_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch} (global) does not divide evenly over "
            f"{world_size} processes (devices × nodes)"
        )
    return global_batch // world_size


def build_trainer(cfg: DictConfig, run_dir: Path, run_id: str, callbacks: list[L.Callback], job_type=None) -> L.Trainer:
    from callbacks import build_analysis_callbacks

    kwargs = trainer_kwargs(cfg)
    show_bar = kwargs.get("enable_progress_bar", True)
    all_callbacks = [RunFolder(cfg, run_dir), RNGState(), *callbacks, *build_analysis_callbacks(cfg)]
    if show_bar and sys.stdout.isatty():
        all_callbacks.append(RichProgressBar())
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=make_logger(cfg, run_dir, run_id, job_type),
        callbacks=all_callbacks,
        **kwargs,
    )
    return trainer


def train(cfg: DictConfig) -> Path:
    """Fit the configured model and run its analyses; returns the run folder."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir, run_id, ckpt_path = resolve_run(cfg)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
    checkpointing = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-epoch{epoch:03d}",
        monitor="val/error",
        mode="min",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = build_trainer(cfg, run_dir, run_id, [checkpointing, LearningRateMonitor("step")])
    batch = per_device_batch(cfg.data.batch_size, trainer.world_size)
    datamodule = build_datamodule(cfg.data, batch)
    module = ResNetClassifier(config_lib.to_dict(cfg), datamodule.num_classes, datamodule.in_channels, batch)
    if ckpt_path is not None:
        check_compatible(ckpt, module, ckpt_path)
    if module.model.stochastic_depth and isinstance(trainer.strategy, DDPStrategy):
        # A closed gate leaves its branch without gradient: DDP must look for unused parameters.
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = True
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        print(f"run folder: {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=10")
    args = parser.parse_args(argv)
    try:
        train(config_lib.load(args.config, args.overrides))
    except ResensError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

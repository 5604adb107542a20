"""Run the paper's analyses on a saved checkpoint, without training.

    python -m resens.analyze --checkpoint runs/cifar10-resnet110-.../checkpoints/last.ckpt \\
        [--config configs/cifar10_resnet110.yaml] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from resens import config as config_lib
from resens.checkpoint import check_compatible, load_checkpoint
from resens.data import build_datamodule
from resens.errors import ConfigError, cli_main
from resens.module import ResNetClassifier
from resens.runs import lesion_run_id, lineage_of, run_dir_of
from resens.train import build_trainer, finish_logging, resolved_settings, run_record, wandb_logger


def analyze(checkpoint: str | Path, config: str | None = None, out: str | None = None, overrides=()) -> Path:
    """Load ``checkpoint`` safely, run the configured analyses, write them under ``out``.

    A W&B run of job type ``analysis`` in the W&B folder of the training run's output root
    (with ``out``: of ``out``'s parent); its config traces the checkpoint (``lineage``)."""
    ckpt = load_checkpoint(checkpoint)
    saved = config_lib.from_dict(ckpt["hyper_parameters"]["cfg"])
    cfg = saved
    if config is not None:
        # The analysis and data settings come from CONFIG; the model always from the checkpoint.
        cfg = OmegaConf.merge(config_lib.load(config), {"model": saved.model})
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    run_dir = run_dir_of(checkpoint)
    run_id = lesion_run_id(run_dir.name)
    out_dir = Path(out) if out else run_dir / run_id.removeprefix(f"{run_dir.name}-")  # lesion-<time>
    # Checked with its paths as a run's config is; an analysis resumes nothing, writes to out_dir.
    cfg = config_lib.from_dict({
        **config_lib.to_dict(cfg), "resume": None, "out_dir": str(out_dir),
        "logger": {**config_lib.to_dict(cfg.logger), "job_type": "analysis"},
    }, paths=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    hp = ckpt["hyper_parameters"]
    datamodule = build_datamodule(cfg.data, hp["per_device_batch"])
    datamodule.setup("test")  # a bad data folder fails here, before any output exists
    module = ResNetClassifier(config_lib.to_dict(cfg), hp["num_classes"], hp["in_channels"], hp["per_device_batch"])
    check_compatible(ckpt, module, checkpoint)
    module.load_state_dict(ckpt["state_dict"])
    if (datamodule.num_classes, datamodule.in_channels) != (hp["num_classes"], hp["in_channels"]):
        raise ConfigError(
            f"data '{cfg.data.name}' has {datamodule.num_classes} classes and {datamodule.in_channels} "
            f"channels; the checkpoint was trained on {hp['num_classes']} and {hp['in_channels']}"
        )
    lineage = lineage_of(checkpoint, saved)
    extra = {"resolved": resolved_settings(cfg, module), "run": run_record(out_dir, run_id, "lesion"), "lineage": lineage}
    trainer = build_trainer(
        cfg, out_dir, run_id, [], job_type="analysis", wandb_root=out_dir.parent if out else run_dir.parent,
        extra_config=extra,
    )
    logger = wandb_logger(trainer)
    if logger is not None and trainer.is_global_zero:
        logger.use_checkpoint(lineage["train_run"]["wandb_id"], lineage["checkpoint_sha256"])
    trainer.test(module, datamodule=datamodule, verbose=False)
    finish_logging(trainer)
    if trainer.is_global_zero:
        print(f"analysis written to {out_dir}/analysis.json")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", "-c", required=True, help="a resens checkpoint (.ckpt)")
    parser.add_argument("--config", help="YAML whose analysis and data settings to use")
    parser.add_argument("--out", help="output folder (default: <run>/lesion-<time>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. analysis.quick=true")
    args = parser.parse_args(argv)
    return cli_main(lambda: analyze(args.checkpoint, args.config, args.out, args.overrides))


if __name__ == "__main__":
    sys.exit(main())

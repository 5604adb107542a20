"""Run the paper's analyses on a saved checkpoint, or on a torchvision or timm model, without training.

    python -m resens.analyze --checkpoint runs/cifar10-resnet110-.../checkpoints/last.ckpt \\
        [--config configs/cifar10_resnet110.yaml] [--out DIR] [key=value ...]
    python -m resens.analyze --model torchvision:resnet50 --data /datasets/imagenet \\
        [--weights file.pth|file.safetensors|random] [--out DIR] [analysis.max_images=1000 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from resens import config as config_lib
from resens.analysis.protocol import resolve_protocol
from resens.checkpoint import check_compatible, load_checkpoint
from resens.data import build_datamodule
from resens.data.imagefolder import ImageFolderDataModule, image_folder
from resens.errors import ConfigError, cli_main
from resens.module import ResNetClassifier, TestedClassifier
from resens.runs import lesion_run_id, lineage_of, run_dir_of, slug, timestamp_suffix
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


class LibraryClassifier(TestedClassifier):
    """A library model, adapted (``model``), for ``trainer.test`` and the analyses: logs
    ``test/loss`` and ``test/error``; ``cfg`` is the run config the analyses read."""

    def __init__(self, model: torch.nn.Module, cfg, num_classes: int) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def analyze_library(
    spec: str, data: str | None, weights: str | None = None, config: str | None = None,
    out: str | None = None, overrides=(),
) -> Path:
    """Adapt the library model ``spec`` (``LIB:NAME``, resens.models.adapters) with ``weights``
    (a state-dict file, ``"random"``, or None for the library's cached default weights), run the
    configured analyses on the ImageFolder ``data`` under the library's evaluation transform, and
    write them under ``out`` (default ``<out_dir>/<model>-lesion-<time>``)."""
    from resens.models.adapters import load_library_model

    if not data:
        raise ConfigError(f"{spec}: set DATA (--data) to an ImageNet-style folder (val/<class>/ or <class>/ folders)")
    folder = image_folder(data)  # a missing folder fails before the model is built
    classes = sum(1 for d in Path(folder).iterdir() if d.is_dir())
    cfg = config_lib.load(config, ["data.name=imagefolder", f"data.root={data}", f"model.library={spec}", *overrides])
    lib = load_library_model(spec, weights, cfg.seed, num_classes=classes)  # classes: random weights
    name = cfg.name if cfg.name != "run" else slug(spec)
    cfg = config_lib.from_dict({
        **config_lib.to_dict(cfg), "resume": None, "name": name,
        "model": {**config_lib.to_dict(cfg.model), "weights": lib.weights,
                  "library_version": lib.library_version, "weights_sha256": lib.weights_sha256},
        "logger": {**config_lib.to_dict(cfg.logger), "group": cfg.logger.group or spec},
    }, paths=True)
    p = cfg.analysis.protocol
    resolve_protocol(lib.adapted, None if p.exclude is None else list(p.exclude),
                     None if p.reorder_stages is None else list(p.reorder_stages))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = ImageFolderDataModule(
        cfg.data, cfg.data.eval_batch_size, lib.transform, cfg.analysis.max_images, cfg.analysis.seed
    )
    if datamodule.num_classes != lib.num_classes:
        raise ConfigError(
            f"{spec}: the weights have {lib.num_classes} classes, the folder {datamodule.folder} "
            f"has {datamodule.num_classes} class folders"
        )
    datamodule.setup("test")
    run_id = f"{slug(name)}-lesion-{timestamp_suffix()}"
    out_dir = Path(out) if out else Path(cfg.out_dir) / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    # What was analysed, before any analysis adds its results (they keep these keys).
    (out_dir / "analysis.json").write_text(json.dumps({
        "model": {"library": spec, "library_version": lib.library_version, "weights": lib.weights,
                  "weights_sha256": lib.weights_sha256, "units": len(lib.adapted.blocks),
                  "protocol": lib.adapted.protocol},
        "data": datamodule.record,
    }, indent=1))
    module = LibraryClassifier(lib.adapted, cfg, lib.num_classes)
    extra = {"run": run_record(out_dir, run_id, "lesion")}
    trainer = build_trainer(
        cfg, out_dir, run_id, [], job_type="analysis", wandb_root=out_dir.parent, extra_config=extra
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    finish_logging(trainer)
    if trainer.is_global_zero:
        print(f"analysis written to {out_dir}/analysis.json")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-analyze", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", "-c", help="a resens checkpoint (.ckpt)")
    source.add_argument("--model", "-m", help="a library model, LIB:NAME (torchvision:resnet50, timm:resnet50, "
                        "timm:vit_small_patch16_224, ...)")
    parser.add_argument("--weights", help="with --model: a state dict (.pth, .safetensors) or 'random' "
                        "(default: the library's default weights, from its local cache)")
    parser.add_argument("--data", help="with --model: an ImageFolder (a folder with val/<class>/ or <class>/)")
    parser.add_argument("--config", help="YAML whose analysis and data settings to use")
    parser.add_argument("--out", help="output folder (default: <run>/lesion-<time>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. analysis.quick=true")
    args = parser.parse_args(argv)
    if args.model is not None:
        return cli_main(lambda: analyze_library(
            args.model, args.data, args.weights, args.config, args.out, args.overrides))
    if args.weights is not None or args.data is not None:
        parser.error("--weights and --data go with --model (a checkpoint carries its weights and data settings)")
    return cli_main(lambda: analyze(args.checkpoint, args.config, args.out, args.overrides))


if __name__ == "__main__":
    sys.exit(main())

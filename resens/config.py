"""The run configuration: an OmegaConf structured schema, a YAML per experiment, ``key=value`` overrides.

``load(path, overrides)`` validates everything against the schema and raises ``ConfigError`` with
a one-line message naming the key or file at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resens.analysis.catalog import analysis_names
from resens.errors import ConfigError

ARCHS = ("cifar_resnet", "cifar_plain", "imagenet_resnet")
ANALYSES = analysis_names()  # one class per name in callbacks/ (resens.analysis.catalog)


@dataclass
class ModelConfig:
    """``arch`` names a registered builder (resens.models.MODELS); the other keys that are set
    (not None) are its keyword arguments, and a key the builder does not take is an error."""

    arch: str = "cifar_resnet"  # cifar_resnet | cifar_plain | imagenet_resnet
    depth: int | None = None  # builder default: 110 (CIFAR), 200 (ImageNet)
    preact: bool | None = None  # cifar_resnet: pre-activation blocks (He et al. 2016b)
    stochastic_depth: float | None = None  # p_L of the linear decay; None turns it off
    shortcut_pool: str | None = None  # cifar_resnet: subsample | avg (Huang et al.'s shortcut)
    conv_bias: bool | None = None  # cifar_resnet: convolutions with a bias (Huang et al.)
    layers: list[int] | None = None  # imagenet_resnet: blocks per stage, overrides depth
    width: int | None = None  # channels of the first stage (16 CIFAR, 64 ImageNet)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPUs with bf16)
    compile: str | None = None  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | imagenet | digits | synthetic
    root: str = "data"
    download: bool = False
    batch_size: int = 128  # global: split across devices × nodes
    eval_batch_size: int = 500  # per device
    num_workers: int = 4
    val_split: int = 0  # training images held out for validation; 0 validates on the test set
    seed: int = 0
    gpu_augment: bool = False  # CIFAR-10: keep the set on the device, crop and flip there
    image_size: int = 32  # synthetic only
    num_classes: int = 10  # synthetic only
    synthetic_size: int = 1024  # synthetic only


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [82, 123])  # epochs, lr × gamma
    gamma: float = 0.1
    warmup_lr: float | None = 0.01  # constant lr for the first warmup_steps (He et al. ResNet-110)
    warmup_steps: int = 400
    scale_lr_with_batch: bool = False  # linear scaling: lr × batch_size / base_batch_size
    base_batch_size: int = 128
    linear_warmup_epochs: int = 0  # with scaling: ramp lr linearly over these epochs


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer`` as keyword arguments."""

    max_epochs: int = 164
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    sync_batchnorm: bool = False
    deterministic: bool = False
    benchmark: bool | None = None
    log_every_n_steps: int = 50
    check_val_every_n_epoch: int = 1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    gradient_clip_val: float | None = None
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    project: str = "resens"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE overrides


@dataclass
class MultiDeletionConfig:
    k_max: int = 20
    trials: int = 50  # random block sets per k
    exclude_downsampling: bool = True  # never delete a block whose shortcut changes the shape
    exclude: list[int] = field(default_factory=list)  # further blocks never deleted (0-based)


@dataclass
class ReorderConfig:
    max_swaps: int = 10
    trials: int = 50  # random orders per number of swaps


@dataclass
class DuplicationConfig:
    k_max: int = 10
    trials: int = 50  # random block sets per k


@dataclass
class ProtocolConfig:
    """Which blocks the random lesions (multi-deletion, reordering, duplication) may touch.
    None keeps the model family's rule, which is the authors' (resens.analysis.protocol)."""

    exclude: list[int] | None = None  # blocks (0-based) never touched; [] touches every block
    reorder_stages: list[int] | None = None  # stages (0-based) whose blocks may trade places


@dataclass
class PathGradientConfig:
    samples_per_length: int = 1000
    batch_size: int = 128
    batches: int = 10  # distinct random training batches the samples are spread over
    lengths: list[int] | None = None  # None: every length 1..n


@dataclass
class AnalysisConfig:
    run: list[str] = field(default_factory=lambda: list(ANALYSES))
    quick: bool = False  # fewer trials and samples, for CPU runs
    seed: int = 0
    max_batches: int | None = None  # limit on test batches per evaluation; None: the whole set
    multi_deletion: MultiDeletionConfig = field(default_factory=MultiDeletionConfig)
    reorder: ReorderConfig = field(default_factory=ReorderConfig)
    duplication: DuplicationConfig = field(default_factory=DuplicationConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    path_gradient: PathGradientConfig = field(default_factory=PathGradientConfig)
    effective_share: float = 0.9  # share of the total gradient the effective range must hold
    compare_with: str | None = None  # analysis.json of a run to compare deletion resilience with
    reference: str | None = None  # paper-reference overlay: cifar10_resnet110 | imagenet_resnet200 | None


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"  # each run writes to out_dir/<name>-<id>/
    resume: str | None = None  # a checkpoint path, or "last" for the newest run of this name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _check(cfg: DictConfig) -> None:
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture '{cfg.model.arch}' (choose from {', '.join(ARCHS)})")
    unknown = [a for a in cfg.analysis.run if a not in analysis_names()]
    if unknown:
        raise ConfigError(f"analysis.run: unknown analysis '{unknown[0]}' (choose from {', '.join(analysis_names())})")
    if cfg.data.batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {cfg.data.batch_size}")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults ← the YAML at ``path`` ← ``key=value`` overrides, validated."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except Exception as err:  # a YAML syntax error, an unreadable file
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def per_device_batch(global_batch: int, world_size: int) -> int:
    """``data.batch_size`` is global: each of ``world_size`` processes gets an equal share."""
    if global_batch % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch} (global) does not divide evenly over "
            f"{world_size} processes (devices × nodes)"
        )
    return global_batch // world_size


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(data: dict) -> DictConfig:
    """Rebuild a validated config from a saved ``to_dict`` (e.g. a checkpoint's hyperparameters)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    _check(cfg)
    return cfg

"""The run configuration: an OmegaConf structured schema, a YAML per experiment, ``key=value`` overrides.

An experiment YAML may start with ``defaults: [recipes/x.yaml, ...]``: those files (relative to
the YAML's folder, each possibly with defaults of its own) are merged in order, then the YAML
itself, then the overrides. ``load(path, overrides)`` composes and validates the whole config in
one pass (``validate``), before any folder or process exists, and raises a one-line
``ConfigError`` naming the key or file at fault and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resens.errors import ConfigError

SHORTCUT_POOLS = ("subsample", "avg")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
LOGGER_MODES = ("online", "offline", "disabled")
# Keys under ``model`` that configure the training, not the builder.
NOT_BUILDER_KEYS = ("arch", "channels_last", "compile", "library", "weights", "library_version", "weights_sha256")


def analysis_names() -> tuple[str, ...]:
    """The analyses ``analysis.run`` may list: the names in the one registry of analyses
    (``callbacks.REGISTRY``), imported here only when needed (callbacks import this module)."""
    from callbacks import analysis_names as registered

    return registered()


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
    # A library model analysed by resens.analyze --model (arch and its keys are then unused):
    library: str | None = None  # LIB:NAME, e.g. torchvision:resnet50, timm:vit_small_patch16_224
    weights: str | None = None  # its weights: a file, "random", or the default weights' name
    library_version: str | None = None  # the library's version
    weights_sha256: str | None = None  # of the weights file ("random" for random weights)


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
    trials: int = 50  # random block sets per k (which blocks: analysis.protocol)


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
    lengths: list[int] | None = None  # None: every length 0..n


@dataclass
class AnalysisConfig:
    run: list[str] = field(default_factory=lambda: list(analysis_names()))  # default: every one
    quick: bool = False  # fewer trials and samples, for CPU runs
    seed: int = 0
    max_batches: int | None = None  # limit on test batches per evaluation; None: the whole set
    max_images: int | None = None  # imagefolder data: a class-balanced, seeded subset of this size
    multi_deletion: MultiDeletionConfig = field(default_factory=MultiDeletionConfig)
    reorder: ReorderConfig = field(default_factory=ReorderConfig)
    duplication: DuplicationConfig = field(default_factory=DuplicationConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    path_gradient: PathGradientConfig = field(default_factory=PathGradientConfig)
    effective_share: float = 0.9  # share of the total gradient the effective range must hold
    compare_with: str | None = None  # analysis.json of a run to compare deletion resilience with
    reference: str | None = None  # paper-reference overlay: a resens.analysis.reference.NAMES, or None


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


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[DictConfig]:
    """The YAML at ``path`` preceded by its ``defaults`` (recursively), in merge order.
    ``chain`` is the files whose defaults led here, to name a cycle."""
    where = f" (in the defaults of {chain[-1]})" if chain else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError(f"defaults cycle: {' -> '.join(map(str, (*chain, path)))}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error, an unreadable file
        raise ConfigError(f"cannot read config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: expected a mapping of keys, got a {type(node).__name__}")
    bases = node.pop("defaults", None)
    bases = [] if bases is None else bases
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"defaults in {path}: expected a list of YAML paths, got {bases}")
    layers = []
    for base in bases:
        layers += _read_yaml(path.parent / base, (*chain, path))
    return [*layers, node]


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults ← the YAML at ``path`` (after its ``defaults``) ← ``key=value``
    overrides; validated with its paths (``validate``), read-only."""
    layers = _read_yaml(Path(path), ()) if path is not None else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), *layers, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def model_kwargs(model: DictConfig) -> dict[str, Any]:
    """The keys of ``model`` that are set (not None) and go to its builder as keyword arguments."""
    return {
        k: v for k, v in OmegaConf.to_container(model, resolve=True).items()
        if k not in NOT_BUILDER_KEYS and v is not None
    }


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value}: {why}")


def _one_of(key: str, value: Any, allowed: tuple | list) -> None:
    if value not in allowed:
        _fail(key, value, f"not one of {', '.join('null' if a is None else str(a) for a in allowed)}")


def _at_least(node: DictConfig, prefix: str, keys: str, low: float) -> None:
    """Each of the space-separated dotted ``keys`` under ``node`` (named ``prefix``) >= low;
    None is skipped, a list is checked item by item."""
    for key in keys.split():
        value = OmegaConf.select(node, key)
        for v in value if OmegaConf.is_list(value) else [value]:
            if v is not None and v < low:
                _fail(f"{prefix}.{key}", value, f"must be >= {low}")


def _in_unit(key: str, value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        _fail(key, value, "must be in (0, 1]")


def validate(cfg: DictConfig, paths: bool = True) -> None:
    """Check the whole config: closed sets, the model's keys against its builder, ranges and,
    with ``paths``, the files and folders it names (the data folder, ``resume``,
    ``analysis.compare_with``). Raises the first problem as a one-line ``ConfigError``; creates
    nothing. Device counts and the batch split need the accelerator: ``resens.train.check_devices``."""
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_trainer(cfg)
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    _check_analysis(cfg.analysis)
    _check_protocol(cfg)
    if paths:
        _check_paths(cfg)


def _check_protocol(cfg: DictConfig) -> None:
    """Overrides of the lesion protocol, resolved against the network's structure (built on the
    meta device: no memory, no weights), so a bad one fails now rather than after training."""
    p = cfg.analysis.protocol
    # A library model's protocol is resolved against it once built (resens.analyze).
    if (p.exclude is None and p.reorder_stages is None) or cfg.model.library is not None:
        return
    import torch

    from resens.analysis.protocol import resolve_protocol
    from resens.models import build_model

    with torch.device("meta"):
        try:
            model = build_model(cfg.model.arch, **model_kwargs(cfg.model))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
    resolve_protocol(
        model, None if p.exclude is None else list(p.exclude),
        None if p.reorder_stages is None else list(p.reorder_stages),
    )


def _check_model(m: DictConfig) -> None:
    from resens.models import MODELS, model_arguments

    _one_of("model.arch", m.arch, sorted(MODELS))
    schema_keys = {f.name for f in fields(ModelConfig)}
    takes = sorted(model_arguments(m.arch) & schema_keys)
    for key in model_kwargs(m):
        if key not in takes:
            raise ConfigError(
                f"model.{key}: {m.arch} does not take it (its keys: {', '.join(takes)}; "
                f"set model.{key}=null)"
            )
    if m.shortcut_pool is not None:
        _one_of("model.shortcut_pool", m.shortcut_pool, SHORTCUT_POOLS)
    _one_of("model.compile", m.compile, (None, *COMPILE_MODES))
    _in_unit("model.stochastic_depth", m.stochastic_depth)
    _at_least(m, "model", "depth width layers", 1)
    if m.compile is not None and m.stochastic_depth is not None:
        raise ConfigError(
            "model.compile: stochastic depth changes the graph at every step; train it eagerly "
            "(model.compile=null)"
        )


def _check_data(d: DictConfig) -> None:
    from resens.data import DATASETS, training_images

    _one_of("data.name", d.name, DATASETS)
    _at_least(d, "data", "batch_size eval_batch_size image_size synthetic_size", 1)
    _at_least(d, "data", "num_workers val_split", 0)
    _at_least(d, "data", "num_classes", 2)
    n = training_images(d)
    if n is not None and d.val_split >= n:
        _fail("data.val_split", d.val_split, f"must be below the {n} training images of {d.name}")
    if d.gpu_augment and d.name != "cifar10":
        _fail("data.gpu_augment", d.gpu_augment, f"cifar10 only, {d.name} has no device-side augmentation")


def _check_optim(o: DictConfig) -> None:
    for key in ("lr", "warmup_lr", "gamma"):
        if o[key] is not None and o[key] <= 0:
            _fail(f"optim.{key}", o[key], "must be > 0")
    if not 0 <= o.momentum < 1:
        _fail("optim.momentum", o.momentum, "must be in [0, 1)")
    if o.nesterov and o.momentum == 0:
        _fail("optim.nesterov", o.nesterov, "Nesterov needs optim.momentum > 0")
    _at_least(o, "optim", "weight_decay warmup_steps linear_warmup_epochs milestones", 0)
    _at_least(o, "optim", "base_batch_size", 1)
    if any(a >= b for a, b in zip(o.milestones, o.milestones[1:], strict=False)):
        _fail("optim.milestones", o.milestones, "must be strictly increasing epochs")


def _check_trainer(cfg: DictConfig) -> None:
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )

    t = cfg.trainer
    _one_of("trainer.precision", t.precision, (*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS)))
    _at_least(t, "trainer", "max_epochs num_nodes log_every_n_steps check_val_every_n_epoch", 1)
    _at_least(t, "trainer", "limit_val_batches gradient_clip_val", 0)
    if t.limit_train_batches is not None and t.limit_train_batches <= 0:
        _fail("trainer.limit_train_batches", t.limit_train_batches, "must be > 0")


def _check_analysis(a: DictConfig) -> None:
    from resens.analysis.reference import NAMES

    for name in a.run:
        _one_of("analysis.run", name, analysis_names())
    _one_of("analysis.reference", a.reference, (None, *NAMES))
    _in_unit("analysis.effective_share", a.effective_share)
    _at_least(
        a,
        "analysis",
        "max_batches max_images multi_deletion.k_max multi_deletion.trials reorder.max_swaps reorder.trials "
        "duplication.k_max duplication.trials path_gradient.samples_per_length "
        "path_gradient.batch_size path_gradient.batches path_gradient.lengths",
        1,
    )
    _at_least(a, "analysis", "protocol.exclude protocol.reorder_stages", 0)


def _check_paths(cfg: DictConfig) -> None:
    d = cfg.data
    if d.name == "cifar10" and not d.download:
        folder = Path(d.root) / "cifar-10-batches-py"
        if not folder.is_dir():
            raise ConfigError(
                f"data.root: CIFAR-10 not found under '{d.root}' (expected {folder}; "
                "set data.download=true or data.root=...)"
            )
    # ImageNet cannot be downloaded: its folder must exist whatever data.download says.
    if d.name == "imagenet" and not Path(d.root).is_dir():
        raise ConfigError(f"data.root: ImageNet folder '{d.root}' not found (set data.root=...)")
    if d.name == "imagefolder" and not Path(d.root).is_dir():
        raise ConfigError(f"data.root: image folder '{d.root}' not found (set DATA=/path/to/folder)")
    if cfg.resume not in (None, "last") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume: checkpoint not found: {cfg.resume} (a .ckpt file, or last)")
    if cfg.analysis.compare_with is not None:
        _check_compare_with(Path(cfg.analysis.compare_with))


def _check_compare_with(path: Path) -> None:
    key = "analysis.compare_with"
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path} (another run's analysis.json)")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: {path} is not a JSON file ({str(err).splitlines()[0]})") from None
    wanted = ("multi_deletion", "single_deletion")
    if not isinstance(results, dict) or not any(results.get(k) for k in wanted):
        raise ConfigError(f"{key}: {path} holds no {' or '.join(wanted)} results")


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


def from_dict(data: dict, paths: bool = False) -> DictConfig:
    """Rebuild a validated config from a saved ``to_dict`` (e.g. a checkpoint's hyperparameters).

    Its paths (data folder, ``resume``, ``analysis.compare_with``) are those of the machine and
    the time that saved it, so they are checked only with ``paths=True``."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg, paths=paths)
    return cfg

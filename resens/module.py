"""``ResNetClassifier``: the *what* of training (model, loss, metrics, optimizer, schedule)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from resens import config as config_lib
from resens.errors import ResensError
from resens.models import ResidualNet, model_arguments
from resens.models import build_model as registry_build
from resens.wandb_logger import EPOCH, Metric


def eval_split(cfg: DictConfig) -> str:
    """The name of the split training evaluates on each epoch: ``val`` when ``data.val_split``
    holds out training images, else ``test`` (the test set validates, as in fb.resnet.torch), so
    that a key means the same data in every run."""
    return "val" if cfg.data.val_split else "test"


def metric_definitions(cfg: DictConfig) -> list[Metric]:
    """The step axis and W&B summary of each metric the module logs: epoch-level ones on
    ``trainer/epoch``; errors and losses keep their minimum (the evaluation error also its last
    value, the final error); throughput its maximum."""
    split = eval_split(cfg)
    return [
        Metric(f"{split}/error", EPOCH, "min,last"),
        Metric(f"{split}/loss", EPOCH, "min,last"),
        Metric("train/error", EPOCH, "min,last"),
        Metric("train/loss_epoch", EPOCH, "min,last"),
        Metric("train/images_per_s", EPOCH, "max"),
    ]


class NonFiniteLossError(ResensError):
    """The training loss became NaN or infinite."""


def build_model(cfg: DictConfig, num_classes: int, in_channels: int) -> ResidualNet:
    """The registered builder ``cfg.model.arch`` with the keys of ``cfg.model`` that are set."""
    kwargs = config_lib.model_kwargs(cfg.model)
    kwargs.update(num_classes=num_classes, in_channels=in_channels)
    if "gate_seed" in model_arguments(cfg.model.arch):
        kwargs["gate_seed"] = cfg.seed
    try:
        return registry_build(cfg.model.arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise config_lib.ConfigError(f"model: {str(err).splitlines()[0]}") from None


class TestedClassifier(L.LightningModule):
    """What every classifier resens tests shares: ``test/loss`` and ``test/error`` (0..1) over
    ``trainer.test``; subclasses set ``self.test_acc`` and ``forward``."""

    test_acc: MulticlassAccuracy

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/error", 1 - self.test_acc.compute())
        self.test_acc.reset()


class ResNetClassifier(TestedClassifier):
    """Cross-entropy classification with SGD and a step schedule; logs loss and error (0..1).

    ``hparams.cfg`` holds the whole resolved run config, so a checkpoint rebuilds its model alone.
    """

    def __init__(self, cfg: dict, num_classes: int, in_channels: int, per_device_batch: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_lib.from_dict(cfg)
        self.model = build_model(self.cfg, num_classes, in_channels)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_split = eval_split(self.cfg)
        self.register_buffer("_nonfinite", torch.tensor(False), persistent=False)
        m = self.cfg.model
        self._memory_format = torch.channels_last if m.channels_last else torch.contiguous_format
        self.model.to(memory_format=self._memory_format)
        # The compiled function is kept off the module tree, so checkpoints keep their keys.
        object.__setattr__(self, "_run", torch.compile(self.model, mode=m.compile) if m.compile else self.model)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x.contiguous(memory_format=self._memory_format))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        if x.device.type == "cpu" or batch_idx % 50 == 0:  # on a GPU, don't sync every step
            self._raise_if_nonfinite()
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite()
        self.log("train/error", 1 - self.train_acc.compute())
        self.train_acc.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # On a GPU the loss is checked only every 50 steps: never let the weights a non-finite
        # loss produced replace the last good checkpoint.
        self._raise_if_nonfinite()

    def _raise_if_nonfinite(self) -> None:
        # Every rank stops at the same step: one stopping alone would leave the others waiting in
        # the next all-reduce. (Called at the same points on every rank.)
        if self.trainer.strategy.reduce_boolean_decision(bool(self._nonfinite), all=False):
            raise NonFiniteLossError(
                f"training loss became NaN or infinite (epoch {self.current_epoch}, step {self.global_step}); "
                "stopped, the last good checkpoint is kept (try a lower optim.lr)"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log(f"{self.eval_split}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log(f"{self.eval_split}/error", 1 - self.val_acc.compute(), prog_bar=True)
        self.val_acc.reset()

    def configure_optimizers(self):
        o = self.cfg.optim
        lr = self.peak_lr()
        # fb.resnet.torch decays every weight, BatchNorm's included; so does the recipe here
        opt = torch.optim.SGD(
            self.model.parameters(),
            lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
        )
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _StepSchedule(o, lr, steps_per_epoch))
        # "name": LearningRateMonitor logs it as train/lr (else the bare "lr-SGD")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    def peak_lr(self) -> float:
        o = self.cfg.optim
        if not o.scale_lr_with_batch:
            return o.lr
        return o.lr * self.cfg.data.batch_size / o.base_batch_size


class _StepSchedule:
    """lr multiplier per optimizer step: optional constant warm-up (He et al.), optional linear
    warm-up over epochs (Goyal et al., for scaled learning rates), then × gamma at each milestone."""

    def __init__(self, o: DictConfig, peak_lr: float, steps_per_epoch: int) -> None:
        self.milestones = [m * steps_per_epoch for m in o.milestones]
        self.gamma = o.gamma
        self.warmup_steps = o.warmup_steps if o.warmup_lr is not None else 0
        self.warmup_factor = (o.warmup_lr / peak_lr) if o.warmup_lr is not None else 1.0
        self.linear_steps = o.linear_warmup_epochs * steps_per_epoch

    def __call__(self, step: int) -> float:
        factor = self.gamma ** sum(step >= m for m in self.milestones)
        if step < self.warmup_steps:
            factor *= self.warmup_factor
        if step < self.linear_steps:
            factor *= (step + 1) / self.linear_steps
        return factor


def lr_at(o: DictConfig, peak_lr: float, steps_per_epoch: int, step: int) -> float:
    """The learning rate at an optimizer step (used by tests and docs)."""
    return peak_lr * _StepSchedule(o, peak_lr, steps_per_epoch)(step)


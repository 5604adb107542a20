"""The run-state callbacks of training against a real Lightning Trainer: throughput, run ids."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.training import Throughput
from resens.runs import run_dir_of, slug

STEP_S = 0.02
BATCH = 8
TRAIN_BATCHES = 12
VAL_BATCHES = 5
VAL_STEP_S = 0.2  # validation: 1 s per epoch, 50 training steps' worth


class _Sleepy(L.LightningModule):
    """A model whose training step takes STEP_S and whose validation takes 1 s per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        time.sleep(VAL_STEP_S)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_throughput_counts_training_steps_not_validation(tmp_path):
    def data(batches: int) -> DataLoader:
        n = batches * BATCH
        return DataLoader(TensorDataset(torch.randn(n, 2), torch.zeros(n)), batch_size=BATCH)

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[Throughput()],
        logger=CSVLogger(tmp_path, name="", version=""),
        accelerator="cpu",
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Sleepy(), data(TRAIN_BATCHES), data(VAL_BATCHES))
    with open(tmp_path / "metrics.csv") as f:
        rates = [float(r["train/images_per_s"]) for r in csv.DictReader(f) if r["train/images_per_s"]]
    # One figure per epoch. Timed over the training steps alone it is about BATCH / STEP_S (a
    # little less: Lightning's own work per step); a clock running through validation would
    # give BATCH * 11 / (11 * STEP_S + 1 s), a quarter of that.
    assert len(rates) == 2
    for rate in rates:
        assert rate == pytest.approx(BATCH / STEP_S, rel=0.25)
    assert float(trainer.callback_metrics["train/images_per_s"]) == rates[-1]


def test_run_folder_of_a_checkpoint(tmp_path):
    assert run_dir_of(tmp_path / "run-1" / "checkpoints" / "last.ckpt") == tmp_path / "run-1"
    assert run_dir_of(tmp_path / "run-1" / "hpc_ckpt_2.ckpt") == tmp_path / "run-1"
    assert run_dir_of(Path("x.ckpt")) == Path(".")


def test_slug_keeps_names_safe_for_folders_jobs_and_wandb_ids():
    assert slug("cifar10 resnet/110 (sd)") == "cifar10-resnet-110-sd"
    assert slug("v1.2_x") == "v1.2_x"
    assert slug("v1.2_x", dots=False) == "v1-2_x"
    assert slug("a" * 80) == "a" * 60 and slug("a" * 80, max_len=64) == "a" * 64
    assert slug("///") == "run"

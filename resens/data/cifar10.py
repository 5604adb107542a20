"""CIFAR-10 (torchvision's python-pickle format) with the He et al. 2016 augmentation."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from resens.data import ResensDataModule
from resens.data.gpu_augment import ResidentLoader
from resens.errors import DataError

# fb.resnet.torch's CIFAR-10 statistics (datasets/cifar10.lua), in 0..255 there.
MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
PAD = 4


def _diagnose(folder: str, error: Exception) -> str:
    """One line naming the first CIFAR-10 file that is missing, fails its md5 sum or unpickling."""
    meta = datasets.CIFAR10.meta
    files = datasets.CIFAR10.train_list + datasets.CIFAR10.test_list
    fix = "delete it and set data.download=true"
    for name, md5 in [*files, [meta["filename"], meta["md5"]]]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"CIFAR-10 file '{path}' is missing (set data.download=true)"
        if not check_integrity(path, md5):
            return f"CIFAR-10 file '{path}' is corrupt or truncated (md5 mismatch; {fix})"
        try:
            with open(path, "rb") as f:
                pickle.load(f, encoding="latin1")
        except Exception as e:  # a damaged pickle can raise almost anything
            return f"CIFAR-10 file '{path}' cannot be unpickled ({type(e).__name__}; {fix})"
    return f"CIFAR-10 files under '{folder}' are malformed ({type(error).__name__}: {error}; {fix})"


class CIFAR10DataModule(ResensDataModule):
    """CIFAR-10 from ``cfg.root``/cifar-10-batches-py; images [3, 32, 32], 10 classes.

    Training: per-channel normalization, then (as fb.resnet.torch) a 4-pixel zero pad, i.e. the
    mean colour, a random 32 crop and a horizontal flip. With
    ``cfg.gpu_augment`` the training loader is a ``ResidentLoader`` doing the same with tensor ops
    on the trainer's device.
    """

    num_classes, in_channels, image_size = 10, 3, 32
    train_images = 50_000

    def __init__(self, cfg: Any, batch_size: int) -> None:
        super().__init__(cfg, batch_size)
        self.test_transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        # fb.resnet.torch normalises first, then pads with zeros (the mean colour) and crops.
        self.train_transform = T.Compose(
            [self.test_transform, T.RandomCrop(32, padding=PAD), T.RandomHorizontalFlip()]
        )
        self._resident: ResidentLoader | None = None
        self._train_raw: datasets.CIFAR10 | None = None

    def prepare_data(self) -> None:
        if self.cfg.download:
            try:
                datasets.CIFAR10(self.cfg.root, train=False, download=True)
            except Exception as e:  # network errors come as URLError, OSError or RuntimeError
                raise DataError(f"could not download CIFAR-10 to '{self.cfg.root}': {e}") from e

    def _open(self, train: bool) -> datasets.CIFAR10:
        root = self.cfg.root
        folder = os.path.join(root, datasets.CIFAR10.base_folder)
        if not os.path.isdir(folder):
            raise DataError(
                f"CIFAR-10 not found under '{root}' (expected {folder}; "
                "set data.download=true or data.root=...)"
            )
        try:
            return datasets.CIFAR10(root, train=train, download=False)
        except Exception as e:  # integrity check (RuntimeError) or a malformed pickle
            raise DataError(_diagnose(folder, e)) from e

    def _build(self) -> None:
        self._train_raw = self._open(train=True)
        self._view_sets(
            self._train_raw, self._open(train=False), self.train_transform, self.test_transform
        )

    def train_dataloader(self) -> DataLoader | ResidentLoader:
        if not self.cfg.gpu_augment:
            return super().train_dataloader()
        self.setup()
        if self._resident is None:
            idx = self.train_set.indices
            images = torch.from_numpy(self._train_raw.data[idx]).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(self._train_raw.targets)[idx]
            self._resident = ResidentLoader(
                images, labels, self.batch_size, MEAN, STD, PAD, self.cfg.seed
            )
        self._resident.trainer = self.trainer
        return self._resident

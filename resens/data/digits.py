"""scikit-learn's handwritten digits: 1,797 real 8×8 grayscale images shipped with the library.

The embedded default data set: no download, trains a small ResNet on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from resens.data import ResensDataModule

IMAGES = 1_797  # load_digits()
TEST_SIZE = 500


class DigitsDataModule(ResensDataModule):
    """Images [1, 8, 8] (pixel / 16, standardized with the training set's mean and std), 10
    classes; a stratified split seeded by ``cfg.seed``: 500 test images, 1,297 training images."""

    num_classes, in_channels, image_size = 10, 1, 8
    train_images = IMAGES - TEST_SIZE

    def __init__(self, cfg: Any, batch_size: int) -> None:
        super().__init__(cfg, batch_size)
        self.num_workers = 0  # the whole set is 460 KB: worker processes would only cost time

    def _build(self) -> None:
        images, labels = load_digits(return_X_y=True)
        train, test = train_test_split(
            np.arange(len(labels)), test_size=TEST_SIZE, random_state=self.cfg.seed, stratify=labels
        )
        x = torch.from_numpy(images / 16).float().view(-1, 1, 8, 8)
        y = torch.from_numpy(labels).long()
        x = (x - x[train].mean()) / x[train].std()
        self._tensor_sets(x[train], y[train], x[test], y[test])

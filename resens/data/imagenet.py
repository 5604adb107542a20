"""ImageNet as two ImageFolders: ``root``/train/<class>/*.JPEG and ``root``/val/<class>/*.JPEG.

The validation images must be sorted into class folders like the training images (the usual
``valprep.sh``); the validation set doubles as the test set.
"""

from __future__ import annotations

import os
from typing import Any

from torchvision import datasets
from torchvision import transforms as T

from resens.data import ResensDataModule
from resens.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ResensDataModule):
    """Images [3, 224, 224]; ``num_classes`` is the number of class folders in ``root``/train."""

    in_channels, image_size = 3, 224

    def __init__(self, cfg: Any, batch_size: int) -> None:
        super().__init__(cfg, batch_size)
        if not os.path.isdir(cfg.root):
            raise DataError(f"ImageNet folder '{cfg.root}' not found (set data.root=...)")
        self.num_classes = len(self._classes("train"))
        normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        self.train_transform = T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), normalize]
        )
        self.test_transform = T.Compose([T.Resize(256), T.CenterCrop(224), normalize])

    def _classes(self, split: str) -> list[str]:
        folder = os.path.join(self.cfg.root, split)
        if not os.path.isdir(folder):
            raise DataError(
                f"ImageNet folder '{folder}' not found (expected {split}/<class>/<image> files)"
            )
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not classes:
            raise DataError(f"ImageNet folder '{folder}' has no class subfolders")
        return classes

    def _open(self, split: str) -> datasets.ImageFolder:
        folder = os.path.join(self.cfg.root, split)
        self._classes(split)
        try:
            return datasets.ImageFolder(folder)
        except FileNotFoundError as e:  # a class folder without images
            raise DataError(f"ImageNet folder '{folder}': {e}") from e

    def _build(self) -> None:
        train, val = self._open("train"), self._open("val")
        if val.classes != train.classes:
            raise DataError(
                f"ImageNet folder '{os.path.join(self.cfg.root, 'val')}' has other class folders "
                f"than '{os.path.join(self.cfg.root, 'train')}' ({len(val.classes)} vs "
                f"{len(train.classes)}); the labels would not match"
            )
        self._view_sets(train, val, self.train_transform, self.test_transform)

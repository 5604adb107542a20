"""An ImageNet-style folder to evaluate a network on: ``root``/val/<class>/<image>, or
``root``/<class>/<image>; classes in sorted folder order, as ``torchvision.datasets.ImageFolder``.

Evaluation only: the test set, and the "training" batches of the path-gradient analyses, are the
same images, under the evaluation ``transform`` (a pretrained model's own). ``max_images`` keeps a
deterministic subset: each class's images in a seeded random order, then the classes taken in
turn (so the subset is as class-balanced as it can be), the first ``max_images`` of that order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torchvision import datasets
from torchvision import transforms as T

from resens.data import ResensDataModule, TransformSubset
from resens.data.imagenet import MEAN, STD
from resens.errors import DataError


def image_folder(root: str) -> str:
    """The folder holding the class folders: ``root``/val if it exists, else ``root``."""
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' not found (DATA: a folder with val/<class>/ or <class>/ folders)")
    val = os.path.join(root, "val")
    folder = val if os.path.isdir(val) else root
    if not any(d.is_dir() for d in os.scandir(folder)):
        raise DataError(f"image folder '{folder}' has no class subfolders")
    return folder


def balanced_subset(targets: list[int], max_images: int | None, seed: int) -> list[int]:
    """Indices (ascending) of the first ``max_images`` images of a class-balanced, seeded order;
    every index when ``max_images`` is None."""
    if max_images is None or max_images >= len(targets):
        return list(range(len(targets)))
    g = torch.Generator().manual_seed(seed)
    per_class: dict[int, list[int]] = {}
    for i, c in enumerate(targets):
        per_class.setdefault(c, []).append(i)
    queues = [[idx[j] for j in torch.randperm(len(idx), generator=g).tolist()] for _, idx in sorted(per_class.items())]
    order = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
    return sorted(order[:max_images])


class ImageFolderDataModule(ResensDataModule):
    """Images under ``cfg.root`` with ``transform`` (default: resize 256, center crop 224,
    ImageNet normalisation); ``max_images`` and ``subset_seed`` choose a subset (module doc)."""

    in_channels, image_size = 3, 224

    def __init__(self, cfg: Any, batch_size: int, transform: Callable | None = None,
                 max_images: int | None = None, subset_seed: int = 0) -> None:
        super().__init__(cfg, batch_size)
        self.folder = image_folder(cfg.root)
        self.classes = sorted(d.name for d in os.scandir(self.folder) if d.is_dir())
        self.num_classes = len(self.classes)
        self.transform = transform or T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]
        )
        self.max_images, self.subset_seed = max_images, subset_seed
        self.record: dict[str, Any] = {}

    def _build(self) -> None:
        try:
            full = datasets.ImageFolder(self.folder)
        except FileNotFoundError as e:  # a class folder without images
            raise DataError(f"image folder '{self.folder}': {e}") from e
        indices = balanced_subset(full.targets, self.max_images, self.subset_seed)
        files = [os.path.relpath(full.samples[i][0], self.folder) for i in indices]
        self.record = {
            "folder": self.folder,
            "classes": self.num_classes,
            "images": len(indices),
            "of_images": len(full),
            "subset": "all images" if len(indices) == len(full) else (
                f"{len(indices)} images: each class's images in a seeded order (seed {self.subset_seed}), "
                "the classes taken in turn"
            ),
            "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        }
        self.test_set = TransformSubset(full, indices, self.transform)
        self.train_set = self.val_set = self.analysis_set = self.test_set

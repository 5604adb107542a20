"""LightningDataModules: CIFAR-10, ImageNet, scikit-learn digits and synthetic images.

``build_datamodule(cfg.data, batch_size)`` picks one by ``cfg.name`` (one of ``DATASETS``). Every module has
``num_classes``, ``in_channels`` and ``image_size`` right after construction (so the model can be
built before ``setup``), the usual train/val/test loaders, and
``analysis_train_dataloader(batch_size, seed)``: training images with the test transform in a
seeded random order, the "random training batches" of the path-gradient analyses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from resens.errors import DataError

DATASETS = ("cifar10", "imagenet", "digits", "synthetic", "imagefolder")


class TransformSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image.

    Lets one decoded set serve as augmented training set, held-out validation set and
    un-augmented analysis set without decoding it twice.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label


def split_indices(n: int, val_split: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (train, validation) with ``val_split`` seeded-random validation indices."""
    if not 0 <= val_split < n:
        raise DataError(f"data.val_split={val_split} must be in [0, {n}) for {n} training images")
    if val_split == 0:
        return list(range(n)), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_split:]), sorted(perm[:val_split])


class ResensDataModule(L.LightningDataModule):
    """Shared loaders. Subclasses set ``num_classes``, ``in_channels``, ``image_size`` and fill
    ``train_set`` (augmented), ``val_set``, ``test_set`` and ``analysis_set`` (training images,
    test transform) in ``_build``; every set yields (image [C, H, W] float32, label)."""

    num_classes: int
    in_channels: int
    image_size: int
    train_images: int | None = None  # before the validation split, where fixed by the data set

    def __init__(self, cfg: Any, batch_size: int) -> None:
        super().__init__()
        self.cfg, self.batch_size = cfg, batch_size
        self.num_workers: int = cfg.num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.analysis_set: Dataset | None = None

    @classmethod
    def known_train_images(cls, cfg: Any) -> int | None:
        """Training images before the validation split, known without reading the data."""
        return cls.train_images

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()

    def _build(self) -> None:
        raise NotImplementedError

    def _view_sets(
        self, train: Dataset, test: Dataset, train_tf: Callable, test_tf: Callable
    ) -> None:
        """Fill the sets from decoded (image, label) data sets; ``val_split`` training images
        become the validation set, otherwise the test set validates (as fb.resnet.torch)."""
        train_idx, val_idx = split_indices(len(train), self.cfg.val_split, self.cfg.seed)
        self.train_set = TransformSubset(train, train_idx, train_tf)
        self.analysis_set = TransformSubset(train, train_idx, test_tf)
        self.test_set = TransformSubset(test, range(len(test)), test_tf)
        self.val_set = TransformSubset(train, val_idx, test_tf) if val_idx else self.test_set

    def _tensor_sets(self, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor) -> None:
        """``_view_sets`` for ready tensors x [N, C, H, W], y [N] (no augmentation)."""
        train_idx, val_idx = split_indices(len(x), self.cfg.val_split, self.cfg.seed)
        self.train_set = self.analysis_set = TensorDataset(x[train_idx], y[train_idx])
        self.test_set = TensorDataset(x_test, y_test)
        self.val_set = TensorDataset(x[val_idx], y[val_idx]) if val_idx else self.test_set

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        # Training-style loaders drop the last batch; a set smaller than one batch would give
        # zero steps without any error.
        if shuffle and len(dataset) < batch_size:
            raise DataError(
                f"{self.cfg.name}: {len(dataset)} training images are fewer than one batch of {batch_size}"
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> Any:
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, self.cfg.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, self.cfg.eval_batch_size, shuffle=False)

    def analysis_train_dataloader(self, batch_size: int, seed: int) -> DataLoader:
        """Training images, test transform, order shuffled by ``seed``; batches [B, C, H, W]."""
        self.setup()
        generator = torch.Generator().manual_seed(seed)
        return self._loader(self.analysis_set, batch_size, shuffle=True, generator=generator)


def _modules() -> dict[str, type[ResensDataModule]]:
    # Imported here: the submodules import ResensDataModule from this package.
    from resens.data.cifar10 import CIFAR10DataModule
    from resens.data.digits import DigitsDataModule
    from resens.data.imagefolder import ImageFolderDataModule
    from resens.data.imagenet import ImageNetDataModule
    from resens.data.synthetic import SyntheticDataModule

    modules = {
        "cifar10": CIFAR10DataModule,
        "imagenet": ImageNetDataModule,
        "digits": DigitsDataModule,
        "synthetic": SyntheticDataModule,
        "imagefolder": ImageFolderDataModule,
    }
    return {name: modules[name] for name in DATASETS}


def training_images(cfg: Any) -> int | None:
    """The training images (before the validation split) of data set ``cfg.name``, where known
    without reading it (None for ImageNet, whose folder decides); ``cfg.val_split`` must be below."""
    return _modules()[cfg.name].known_train_images(cfg)


def build_datamodule(cfg: Any, batch_size: int) -> L.LightningDataModule:
    """The DataModule named by ``cfg.name``; ``batch_size`` is the per-device training batch."""
    modules = _modules()
    if cfg.name not in modules:
        raise DataError(
            f"unknown data set data.name={cfg.name!r} (expected one of {', '.join(modules)})"
        )
    return modules[cfg.name](cfg, batch_size)

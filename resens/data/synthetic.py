"""Random images and labels, for benchmarks and smoke tests."""

from __future__ import annotations

from typing import Any

import torch

from resens.data import ResensDataModule


class SyntheticDataModule(ResensDataModule):
    """``cfg.synthetic_size`` training and a quarter as many test images: standard-normal pixels
    [3, image_size, image_size] and uniform labels in 0..num_classes-1, seeded by ``cfg.seed``."""

    in_channels = 3

    @classmethod
    def known_train_images(cls, cfg: Any) -> int:
        return cfg.synthetic_size

    def __init__(self, cfg: Any, batch_size: int) -> None:
        super().__init__(cfg, batch_size)
        self.num_classes, self.image_size = cfg.num_classes, cfg.image_size

    def _build(self) -> None:
        n, s = self.cfg.synthetic_size, self.image_size
        total = n + n // 4
        generator = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn(total, 3, s, s, generator=generator)
        y = torch.randint(0, self.num_classes, (total,), generator=generator)
        self._tensor_sets(x[:n], y[:n], x[n:], y[n:])

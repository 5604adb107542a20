"""CIFAR-style augmentation as batched tensor ops, and a loader over a device-resident set.

``random_crop_flip`` has the distribution of torchvision's ``RandomCrop(size, padding=pad)`` +
``RandomHorizontalFlip()``: crop offsets uniform in 0..2*pad on each axis independently, flip with
probability 1/2, zero padding applied before normalization.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of the zero-padded image and random horizontal flip.

    x: [B, C, H, W], any dtype (uint8 or float); returns the same shape and dtype on x's device.
    ``generator`` must live on x's device.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # [B, C, (H+2p)(W+2p)]
    offsets = torch.randint(0, 2 * pad + 1, (2, b, 1), device=dev, generator=generator)
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    rows = offsets[0] + torch.arange(h, device=dev)  # [B, H] rows of the padded image
    cols = offsets[1] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(flip, cols.flip(1), cols)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # [B, H, W] flat padded index
    return padded.gather(2, index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(x - mean) / std per channel; x [B, C, H, W], uint8 in 0..255 or float in [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under torch.distributed, (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_indices(n: int, seed: int, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s strided shard of a ``seed``-ed permutation of range(n), [n // world].

    Every rank draws the same permutation, so the shards are disjoint; all have the same length
    so that every rank runs the same number of steps (DDP would hang otherwise).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[rank::world][: n // world]


class ResidentLoader:
    """Training batches of a set held as one tensor, augmented where the tensor lives.

    images: uint8 [N, C, H, W]; labels: int64 [N]. Each epoch shuffles with ``seed + epoch``,
    takes this rank's shard and yields ``batch_size`` batches (the last partial one dropped) of
    (x float32 [B, C, H, W] cropped, flipped and normalized, y int64 [B]).
    Set ``trainer`` to a Lightning trainer to move the set to its root device on the first
    iteration and to take the epoch from it (right after resuming, too).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int = 4,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.pad, self.seed = batch_size, pad, seed
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.trainer: Any = None
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.images) // rank_and_world()[1] // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank, world = rank_and_world()
        epoch = self._epoch
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
            device = self.trainer.strategy.root_device
            self.images, self.labels = self.images.to(device), self.labels.to(device)
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        self._epoch += 1
        device = self.images.device
        order = epoch_indices(len(self.images), self.seed + epoch, rank, world).to(device)
        # Crops differ between ranks; the seed is kept apart from the permutation's.
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed + epoch) * 4099 + rank + 1)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            # normalised first, so the zero padding is the mean colour (fb.resnet.torch)
            x = normalize(self.images[idx], self.mean, self.std)
            yield random_crop_flip(x, self.pad, generator), self.labels[idx]

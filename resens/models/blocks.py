"""Residual and plain blocks in one vocabulary: ``branch``, ``shortcut``, ``post``, ``survival_prob``.

Every block computes ``post(shortcut(x) + gate * branch(x))``. In eval mode the gate is the
survival probability (1.0 without stochastic depth); in training with stochastic depth it is a
Bernoulli draw, and a closed gate skips the branch entirely (Huang et al. 2016). A plain block has
``shortcut = None`` and computes ``post(branch(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of He et al. 2016 (option A): subsample by ``stride``, zero-pad channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.cout - self.cin
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.cin}->{self.cout}, stride={self.stride}"


class Block(nn.Module):
    """Base class: the forward pass of the vocabulary, with the stochastic-depth gate.

    ``downsampling`` is True where the block changes the tensor's shape (its shortcut is not the
    identity): deleting such a block keeps its shortcut, and samplers may leave it out.

    Subclasses provide ``branch``, ``shortcut`` (or ``None``), ``post`` and may override
    ``_forward_residual`` when branch and shortcut share a computation.
    """

    downsampling: bool = False

    def __init__(self, survival_prob: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < survival_prob <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob}")
        self.survival_prob = float(survival_prob)

    def forward(self, x: Tensor, gate: bool | None = None) -> Tensor:
        """``gate`` (training only) opens or closes the branch; ``None`` draws it from torch's RNG."""
        if self.shortcut is None:
            return self.post(self.branch(x))
        if self.training and self.survival_prob < 1.0:
            if gate is None:
                gate = bool(torch.rand(()) < self.survival_prob)
            if not gate:
                return self.post(self.shortcut(x))
            return self.post(self._forward_residual(x, 1.0))
        scale = 1.0 if self.training else self.survival_prob
        return self.post(self._forward_residual(x, scale))

    def _forward_residual(self, x: Tensor, scale: float) -> Tensor:
        branch = self.branch(x)
        return self.shortcut(x) + (branch if scale == 1.0 else scale * branch)

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}" if self.survival_prob < 1.0 else ""


class BasicBlock(Block):
    """Post-activation basic block (He et al. 2016a): relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1, survival_prob: float = 1.0) -> None:
        super().__init__(survival_prob)
        self.branch = nn.Sequential(
            conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            conv3x3(cout, cout), nn.BatchNorm2d(cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.shortcut = OptionAShortcut(cin, cout, stride) if self.downsampling else nn.Identity()
        self.post = nn.ReLU()


class PreActBasicBlock(Block):
    """Pre-activation basic block (He et al. 2016b): x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1, survival_prob: float = 1.0) -> None:
        super().__init__(survival_prob)
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), conv3x3(cout, cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.shortcut = OptionAShortcut(cin, cout, stride) if self.downsampling else nn.Identity()
        self.post = nn.Identity()


class PreActBottleneck(Block):
    """Pre-activation bottleneck (fb.resnet.torch ``preresnet``) with a projection shortcut.

    Where the shape changes, the BN-ReLU pre-activation is shared by the branch and the 1x1
    projection (conv + BN); ``branch(x)`` and ``shortcut(x)`` each apply it, ``forward`` once.
    ``preact=False`` drops it for the first block, which follows the stem's BN-ReLU.
    """

    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int = 1, survival_prob: float = 1.0, preact: bool = True
    ) -> None:
        super().__init__(survival_prob)
        cout = width * self.expansion
        self.preact = bn_relu(cin) if preact else nn.Identity()
        self.residual = nn.Sequential(
            conv1x1(cin, width), *bn_relu(width),
            conv3x3(width, width, stride), *bn_relu(width),
            conv1x1(width, cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.projection = (
            nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout)) if self.downsampling else None
        )
        self.post = nn.Identity()

    def branch(self, x: Tensor) -> Tensor:
        return self.residual(self.preact(x))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.projection is None else self.projection(self.preact(x))

    def _forward_residual(self, x: Tensor, scale: float) -> Tensor:
        if self.projection is None:
            return super()._forward_residual(x, scale)
        a = self.preact(x)
        branch = self.residual(a)
        return self.projection(a) + (branch if scale == 1.0 else scale * branch)


class PlainBlock(Block):
    """Two conv-BN-ReLU layers and no shortcut: the VGG-style comparison network's block.

    Deleting it passes ``x`` through, which needs ``cin == cout`` and ``stride == 1``;
    otherwise it is a downsampling block and cannot be deleted.
    """

    shortcut = None

    def __init__(self, cin: int, cout: int, stride: int = 1, survival_prob: float = 1.0) -> None:
        super().__init__(1.0)
        self.branch = nn.Sequential(
            conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            conv3x3(cout, cout), nn.BatchNorm2d(cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.post = nn.ReLU()

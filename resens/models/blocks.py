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


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of He et al. 2016 (option A): subsample by ``stride``, then append
    zero channels after the input's own (as fb.resnet.torch and Huang et al.'s code do).

    ``pool="subsample"`` keeps every ``stride``-th pixel (fb.resnet.torch's 1x1 average pooling
    with a stride); ``pool="avg"`` averages ``stride``x``stride`` windows (Huang et al.'s
    ``ResidualDrop``).
    """

    POOLS = ("subsample", "avg")

    def __init__(self, cin: int, cout: int, stride: int, pool: str = "subsample") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"shortcut pooling must be one of {', '.join(self.POOLS)}, got '{pool}'")
        if cout < cin:
            raise ValueError(f"an option-A shortcut cannot drop channels ({cin} -> {cout})")
        self.cin, self.cout, self.stride, self.pool = cin, cout, stride, pool

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            if self.pool == "avg":
                x = F.avg_pool2d(x, self.stride)
            else:
                x = x[:, :, :: self.stride, :: self.stride]
        if self.cout > self.cin:
            x = F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))
        return x

    def extra_repr(self) -> str:
        return f"{self.cin}->{self.cout}, stride={self.stride}, pool={self.pool}"


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
    """Post-activation basic block (He et al. 2016a): relu(shortcut(x) + bn(conv(relu(bn(conv(x)))))).

    ``conv_bias`` and ``pool="avg"`` give Huang et al.'s ``ResidualDrop`` block (their convolutions
    carry a bias; their downsampling shortcut averages 2x2 windows).
    """

    def __init__(
        self, cin: int, cout: int, stride: int = 1, survival_prob: float = 1.0,
        pool: str = "subsample", conv_bias: bool = False,
    ) -> None:
        super().__init__(survival_prob)
        self.branch = nn.Sequential(
            conv3x3(cin, cout, stride, conv_bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            conv3x3(cout, cout, 1, conv_bias), nn.BatchNorm2d(cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.shortcut = OptionAShortcut(cin, cout, stride, pool) if self.downsampling else nn.Identity()
        self.post = nn.ReLU()


class PreActBasicBlock(Block):
    """Pre-activation basic block (He et al. 2016b): x + conv(relu(bn(conv(relu(bn(x)))))).

    Every block's branch starts with BN-ReLU, the first block's too, and the shortcut takes the
    block's input as it is (fb.resnet.torch ``preresnet``, as in the authors' lesion study)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, survival_prob: float = 1.0) -> None:
        super().__init__(survival_prob)
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), conv3x3(cout, cout),
        )
        self.downsampling = stride > 1 or cin != cout
        self.shortcut = OptionAShortcut(cin, cout, stride) if self.downsampling else nn.Identity()
        self.post = nn.Identity()


class SharedPreActBlock(Block):
    """A pre-activation block whose ``preact`` (e.g. BN-ReLU) is shared by the branch
    ``residual(preact(x))`` and, where there is one, the projection shortcut
    ``projection(preact(x))``: ``branch(x)`` and ``shortcut(x)`` each apply it, ``forward``
    once. Subclasses set ``preact``, ``residual`` and ``projection`` (None: the identity)."""

    preact: nn.Module
    residual: nn.Module
    projection: nn.Module | None

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


class PreActBottleneck(SharedPreActBlock):
    """Pre-activation bottleneck (fb.resnet.torch ``preresnet``) with a projection shortcut.

    Where the shape changes, the BN-ReLU pre-activation is shared by the branch and the 1x1
    projection convolution (fb.resnet.torch's ``both_preact``; its projection has no BatchNorm);
    ``branch(x)`` and ``shortcut(x)`` each apply it, ``forward`` once. ``preact=False`` drops it
    for the first block, which follows the stem's BN-ReLU (``no_preact``).
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
        self.projection = conv1x1(cin, cout, stride) if self.downsampling else None
        self.post = nn.Identity()



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

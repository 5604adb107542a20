"""``ResidualNet(stem, blocks, head)`` and the builders for the paper's networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resens.models.blocks import (
    BasicBlock,
    Block,
    PlainBlock,
    PreActBasicBlock,
    PreActBottleneck,
    bn_relu,
    conv3x3,
)
from resens.models.registry import register_model


def survival_probs(num_blocks: int, p_last: float | None) -> list[float]:
    """Huang et al. 2016 linear decay: block l (1-based) of L survives with 1 - (l/L)(1 - p_L)."""
    if p_last is None:
        return [1.0] * num_blocks
    if not 0.0 < p_last <= 1.0:
        raise ValueError(f"stochastic_depth (p_L) must be in (0, 1], got {p_last}")
    return [1.0 - (i / num_blocks) * (1.0 - p_last) for i in range(1, num_blocks + 1)]


class ResidualNet(nn.Module):
    """``head(block_n(... block_1(stem(x))))``.

    With stochastic depth, training draws one gate per block per forward pass from
    ``self.gate_generator``, a CPU generator seeded identically on every process, so all DDP
    ranks drop the same blocks at each step. Its state travels in ``state_dict`` extras.
    """

    def __init__(
        self, stem: nn.Module, blocks: Sequence[Block], head: nn.Module, gate_seed: int = 0,
        protocol: str = "cifar",
    ):
        super().__init__()
        # which lesion protocol (resens.analysis.protocol.PROTOCOLS) fits this family
        self.protocol = protocol
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.gate_generator = torch.Generator().manual_seed(gate_seed)
        self.register_buffer(
            "_survival", torch.tensor([b.survival_prob for b in self.blocks]), persistent=False
        )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def stochastic_depth(self) -> bool:
        return any(b.survival_prob < 1.0 for b in self.blocks)

    def draw_gates(self) -> list[bool]:
        """One Bernoulli(survival_prob) draw per block; always True without stochastic depth."""
        if not self.stochastic_depth:
            return [True] * self.num_blocks
        u = torch.rand(self.num_blocks, generator=self.gate_generator)
        return (u < self._survival.cpu()).tolist()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        gates = self.draw_gates() if self.training else [None] * self.num_blocks
        for block, gate in zip(self.blocks, gates):
            x = block(x, gate)
        return self.head(x)

    def get_extra_state(self) -> dict:
        return {"gate_generator": self.gate_generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        if state and "gate_generator" in state:
            self.gate_generator.set_state(state["gate_generator"])


def init_weights(model: nn.Module, conv_fan: str = "fan_out") -> nn.Module:
    """The authors' initialisation. fb.resnet.torch (``ConvInit``, ``BNInit``): convolutions
    N(0, 2 / (k·k·out channels)), BatchNorm γ = 1 and β = 0, linear bias 0. Huang et al.
    (``nninit.kaiming``): ``conv_fan="fan_in"``, N(0, 2 / (k·k·in channels)), conv bias 0, and
    Torch's default linear layer. The linear weight's default (uniform ±1/√fan_in) is the same in
    Torch and PyTorch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_fan, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and conv_fan == "fan_out" and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def _classifier(channels: int, num_classes: int, preact: bool) -> nn.Sequential:
    layers: list[nn.Module] = [*bn_relu(channels)] if preact else []
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


def _stages(block_cls, widths: Sequence[int], counts: Sequence[int], cin: int, p_last, **kw):
    probs = iter(survival_probs(sum(counts), p_last))
    blocks = []
    for stage, (width, count) in enumerate(zip(widths, counts)):
        for i in range(count):
            stride = 2 if (i == 0 and stage > 0) else 1
            blocks.append(block_cls(cin, width, stride, next(probs), **kw))
            cin = width * getattr(block_cls, "expansion", 1)
    return blocks, cin


@register_model
def cifar_resnet(
    depth: int = 110,
    num_classes: int = 10,
    preact: bool = False,
    stochastic_depth: float | None = None,
    shortcut_pool: str = "subsample",
    conv_bias: bool = False,
    in_channels: int = 3,
    width: int = 16,
    gate_seed: int = 0,
) -> ResidualNet:
    """CIFAR ResNet of depth 6n+2: 3 stages of n basic blocks, ``width``×(1, 2, 4) channels,
    option-A shortcuts, stem conv3x3-BN-ReLU.

    - ``preact=False``: He et al. 2016a (post-activation), head avgpool-linear.
    - ``preact=True``: fb.resnet.torch ``preresnet`` as the authors trained it (He et al. 2016b):
      every block's branch starts with BN-ReLU, head BN-ReLU-avgpool-linear.
    - ``shortcut_pool="avg"``, ``conv_bias=True`` (post-activation only): Huang et al.'s
      stochastic-depth network (``ResidualDrop``: 2x2 average pooling in the downsampling
      shortcut, convolutions with a bias).
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    widths = (width, 2 * width, 4 * width)
    stem = nn.Sequential(conv3x3(in_channels, width, 1, conv_bias), *bn_relu(width))
    if preact:
        if conv_bias or shortcut_pool != "subsample":
            raise ValueError("conv_bias and shortcut_pool='avg' describe Huang et al.'s post-activation network, not preact")
        blocks, cout = _stages(PreActBasicBlock, widths, (n, n, n), width, stochastic_depth)
    else:
        blocks, cout = _stages(
            BasicBlock, widths, (n, n, n), width, stochastic_depth, pool=shortcut_pool, conv_bias=conv_bias
        )
    net = ResidualNet(stem, blocks, _classifier(cout, num_classes, preact), gate_seed, "cifar")
    return init_weights(net, "fan_in" if conv_bias else "fan_out")


@register_model
def cifar_plain(depth: int = 110, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResidualNet:
    """The VGG-style comparison: the CIFAR ResNet's stages and layers with no shortcuts."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"plain network depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(conv3x3(in_channels, width), *bn_relu(width))
    blocks, cout = _stages(PlainBlock, (width, 2 * width, 4 * width), (n, n, n), width, None)
    return init_weights(ResidualNet(stem, blocks, _classifier(cout, num_classes, False), protocol="cifar"))


IMAGENET_LAYERS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


@register_model
def imagenet_resnet(
    depth: int = 200,
    num_classes: int = 1000,
    layers: Sequence[int] | None = None,
    stochastic_depth: float | None = None,
    in_channels: int = 3,
    width: int = 64,
    gate_seed: int = 0,
) -> ResidualNet:
    """Pre-activation bottleneck ResNet with projection shortcuts (fb.resnet.torch ``preresnet``).

    ``depth`` picks the standard stage sizes (26, 50, 101, 152, 200); ``layers`` sets any other.
    """
    if layers is None:
        if depth not in IMAGENET_LAYERS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_LAYERS)}, got {depth}")
        layers = IMAGENET_LAYERS[depth]
    layers = tuple(int(c) for c in layers)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        *bn_relu(width),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    widths = [width * 2**i for i in range(len(layers))]
    blocks, cout = _stages(PreActBottleneck, widths, layers, width, stochastic_depth)
    blocks[0].preact = nn.Identity()  # follows the stem's BN-ReLU
    return init_weights(ResidualNet(stem, blocks, _classifier(cout, num_classes, True), gate_seed, "imagenet"))


def stage_of_blocks(model: ResidualNet) -> list[int]:
    """Stage index of each block: a new stage starts at each downsampling block after the first."""
    stages, s = [], 0
    for i, block in enumerate(model.blocks):
        if i > 0 and block.downsampling:
            s += 1
        stages.append(s)
    return stages

from resens.models.blocks import BasicBlock, Block, PlainBlock, PreActBasicBlock, PreActBottleneck
from resens.models.resnet import (
    ResidualNet,
    cifar_plain,
    cifar_resnet,
    imagenet_resnet,
    stage_of_blocks,
    survival_probs,
)

__all__ = [
    "BasicBlock", "Block", "PlainBlock", "PreActBasicBlock", "PreActBottleneck", "ResidualNet",
    "cifar_plain", "cifar_resnet", "imagenet_resnet", "stage_of_blocks", "survival_probs",
]

from resens.models.blocks import BasicBlock, Block, PlainBlock, PreActBasicBlock, PreActBottleneck
from resens.models.registry import MODELS, build_model, model_arguments, register_model
from resens.models.resnet import (
    ResidualNet,
    cifar_plain,
    cifar_resnet,
    imagenet_resnet,
    stage_of_blocks,
    survival_probs,
)

__all__ = [
    "MODELS", "build_model", "model_arguments", "register_model",
    "BasicBlock", "Block", "PlainBlock", "PreActBasicBlock", "PreActBottleneck", "ResidualNet",
    "cifar_plain", "cifar_resnet", "imagenet_resnet", "stage_of_blocks", "survival_probs",
]

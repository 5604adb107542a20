"""torchvision's ResNets (resnet18..152, wide_resnet50_2/101_2, resnext50_32x4d, ...) as a
``ResidualNet``: stem conv1-bn1-relu-maxpool, one unit per ``BasicBlock``/``Bottleneck`` in
forward order (branch conv-bn-relu-...-bn, shortcut ``downsample`` or the identity, post ReLU),
head avgpool-flatten-fc. Nothing is copied: the units run torchvision's own layers."""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet, get_model, get_model_weights, list_models
from torchvision.models.resnet import BasicBlock, Bottleneck

from resens.models.adapters.common import AdapterError, ResidualUnit, out_of_place
from resens.models.resnet import ResidualNet

VERSION = torchvision.__version__


def adapt(model: ResNet) -> ResidualNet:
    """``model`` (a torchvision ``ResNet``) in the vocabulary, protocol ``"imagenet"``."""
    if not isinstance(model, ResNet):
        raise AdapterError(f"torchvision {type(model).__name__} is not a ResNet; resens adapts the ResNet family")
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in layer:
            if type(b) is BasicBlock:
                branch = [b.conv1, b.bn1, b.relu, b.conv2, b.bn2]
            elif type(b) is Bottleneck:
                branch = [b.conv1, b.bn1, b.relu, b.conv2, b.bn2, b.relu, b.conv3, b.bn3]
            else:
                raise AdapterError(f"torchvision block {type(b).__name__} is not a BasicBlock or Bottleneck")
            blocks.append(ResidualUnit(branch, b.downsample, out_of_place(b.relu)))
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return ResidualNet(stem, blocks, head, protocol="imagenet")


def names() -> list[str]:
    """The torchvision classification models whose builder makes a ResNet."""
    return [n for n in list_models(module=torchvision.models) if "resne" in n]


def _known(name: str) -> None:
    if name not in list_models(module=torchvision.models):
        raise AdapterError(f"unknown model torchvision:{name} (ResNets: {', '.join(names())})")


def create(name: str, num_classes: int | None = None) -> nn.Module:
    """torchvision's ``name`` with random weights (``num_classes``: its default, 1000, if None)."""
    _known(name)
    model = get_model(name, weights=None, **({} if num_classes is None else {"num_classes": num_classes}))
    if not isinstance(model, ResNet):
        raise AdapterError(f"torchvision:{name} is not a ResNet; resens adapts {', '.join(names())}")
    return model


def classifier_key(model: nn.Module) -> str:
    return "fc.weight"


def default_weights(name: str) -> tuple[str, list[str]]:
    """``(label, files)``: the name of the model's default weights and the file torchvision reads
    them from when cached (``torch.hub.get_dir()/checkpoints``); nothing touches the network."""
    _known(name)
    weights = get_model_weights(name).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    return str(weights), [path]


def load_default(name: str, path: str) -> nn.Module:
    """``name`` with its default weights read from the cached ``path``."""
    weights = get_model_weights(name).DEFAULT
    model = get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def transform(name: str, model: nn.Module) -> Callable:
    """The evaluation transform of the model's default weights (resize, center crop, normalise)."""
    return get_model_weights(name).DEFAULT.transforms()

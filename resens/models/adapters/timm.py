"""timm's ResNets (``resnet*``, ``resnext*``, ``wide_resnet*``, ... built by ``timm.models.ResNet``),
pre-activation ResNets (``resnetv2*``: ``timm.models.ResNetV2``) and vision transformers (ViT,
DeiT: ``timm.models.VisionTransformer`` with timm's ``Block``) as a ``ResidualNet``.

- ResNet: stem conv1-bn1-act1-maxpool; one unit per block, branch in timm's order (drop-block,
  anti-aliasing, squeeze-excitation and drop-path included), shortcut ``downsample``, post the
  block's last activation (out of place); head global pool-fc. Protocol ``"imagenet"``.
- ResNetV2: stem ``model.stem``; pre-activation blocks share their first norm between branch and
  projection (``PreActUnit``); the non-pre-activation ``Bottleneck`` becomes a ``ResidualUnit``;
  head final norm-classifier. Protocol ``"imagenet"``.
- ViT: every transformer block is two units, ``x + drop_path1(ls1(attn(norm1(x))))`` and
  ``x + drop_path2(ls2(mlp(norm2(x))))``: 2 × depth units, each with its LayerNorm and layer scale
  inside the branch and the identity as shortcut and post. Stem: patch embedding, class (and
  register) tokens, position embedding, ``norm_pre``; head: final norm, pooling, classifier, run
  by timm's own ``_pos_embed`` and ``forward_head``. Protocol ``"vit"``. Blocks of another type
  (post-norm ``ResPostBlock``, parallel blocks) are refused.

Drop-path is the identity in eval mode (timm rescales while training), so every unit's survival
probability is 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlparse

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import ResNet, ResNetV2, VisionTransformer
from timm.models import resnet as timm_resnet
from timm.models import resnetv2 as timm_resnetv2
from timm.models import vision_transformer as timm_vit
from torch import nn

from resens.models.adapters.common import (
    AdapterError,
    Part,
    PreActUnit,
    ResidualUnit,
    out_of_place,
    present,
)
from resens.models.resnet import ResidualNet

VERSION = timm.__version__
FAMILIES = (ResNet, ResNetV2, VisionTransformer)


def _resnet(model: ResNet) -> ResidualNet:
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    blocks = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in layer:
            if type(b) is timm_resnet.BasicBlock:
                branch = present(b.conv1, b.bn1, b.drop_block, b.act1, b.aa, b.conv2, b.bn2, b.se, b.drop_path)
                post = b.act2
            elif type(b) is timm_resnet.Bottleneck:
                branch = present(b.conv1, b.bn1, b.act1, b.conv2, b.bn2, b.drop_block, b.act2, b.aa,
                                 b.conv3, b.bn3, b.se, b.drop_path)
                post = b.act3
            else:
                raise AdapterError(f"timm ResNet block {type(b).__name__} is not a BasicBlock or Bottleneck")
            blocks.append(ResidualUnit(branch, b.downsample, out_of_place(post)))
    head = Part(model.forward_head, global_pool=model.global_pool, fc=model.fc)
    return ResidualNet(stem, blocks, head, protocol="imagenet")


def _resnetv2(model: ResNetV2) -> ResidualNet:
    blocks: list[nn.Module] = []
    for stage in model.stages:
        for b in stage.blocks:
            if type(b) is timm_resnetv2.PreActBottleneck:
                blocks.append(PreActUnit(b.norm1, [b.conv1, b.norm2, b.conv2, b.norm3, b.conv3, b.drop_path], b.downsample))
            elif type(b) is timm_resnetv2.PreActBasic:
                blocks.append(PreActUnit(b.norm1, [b.conv1, b.norm2, b.conv2, b.drop_path], b.downsample))
            elif type(b) is timm_resnetv2.Bottleneck:
                branch = [b.conv1, b.norm1, b.conv2, b.norm2, b.conv3, b.norm3, b.drop_path]
                blocks.append(ResidualUnit(branch, b.downsample, out_of_place(b.act3)))
            else:
                raise AdapterError(f"timm ResNetV2 block {type(b).__name__} is not adaptable")
    head = Part(lambda x: model.forward_head(model.norm(x)), norm=model.norm, head=model.head)
    return ResidualNet(model.stem, blocks, head, protocol="imagenet")


def _vit(model: VisionTransformer) -> ResidualNet:
    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    stem = Part(embed, owner=model, patch_embed=model.patch_embed, pos_drop=model.pos_drop,
                patch_drop=model.patch_drop, norm_pre=model.norm_pre)
    units = []
    for i, b in enumerate(model.blocks):
        if type(b) is not timm_vit.Block:
            raise AdapterError(
                f"timm ViT block {i} is a {type(b).__name__}; resens adapts pre-norm blocks "
                "x + attn(norm(x)), x + mlp(norm(x)) (timm's Block) only"
            )
        units.append(ResidualUnit([b.norm1, b.attn, b.ls1, b.drop_path1], None, nn.Identity()))
        units.append(ResidualUnit([b.norm2, b.mlp, b.ls2, b.drop_path2], None, nn.Identity()))
    head = Part(lambda x: model.forward_head(model.norm(x)), norm=model.norm, fc_norm=model.fc_norm,
                attn_pool=getattr(model, "attn_pool", None), head_drop=model.head_drop, head=model.head,
                head_dist=getattr(model, "head_dist", None))
    return ResidualNet(stem, units, head, protocol="vit")


def adapt(model: nn.Module) -> ResidualNet:
    """``model`` (a timm ResNet, ResNetV2 or VisionTransformer) in the vocabulary."""
    if isinstance(model, ResNet):
        return _resnet(model)
    if isinstance(model, ResNetV2):
        return _resnetv2(model)
    if isinstance(model, VisionTransformer):
        if getattr(model, "grad_checkpointing", False):
            raise AdapterError("timm ViT with gradient checkpointing on; turn it off to adapt")
        return _vit(model)
    raise AdapterError(
        f"timm {type(model).__name__} is not a ResNet, ResNetV2 or VisionTransformer; not adaptable"
    )


def _known(name: str) -> None:
    if not timm.is_model(name):
        raise AdapterError(f"unknown model timm:{name} (see timm.list_models('resnet*'), ('vit_*'))")


def create(name: str, num_classes: int | None = None) -> nn.Module:
    """timm's ``name`` with random weights (``num_classes``: its default if None)."""
    _known(name)
    model = timm.create_model(name, pretrained=False, **({} if num_classes is None else {"num_classes": num_classes}))
    if not isinstance(model, FAMILIES):
        raise AdapterError(f"timm:{name} is a {type(model).__name__}; resens adapts ResNet, ResNetV2 and VisionTransformer")
    return model


def classifier_key(model: nn.Module) -> str:
    """The state-dict key of the classifier's weight (its rows are the classes)."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return f"{name}.weight"
    raise AdapterError(f"timm {type(model).__name__}: no classifier layer found")


def default_weights(name: str) -> tuple[str, list[str]]:
    """``(label, files)``: the model's default pretrained weights and where timm keeps them when
    cached (the Hugging Face hub cache, or torch hub's checkpoints folder); nothing touches the
    network. An existing file comes first."""
    from huggingface_hub import constants, try_to_load_from_cache

    _known(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise AdapterError(f"timm:{name} has no default pretrained weights; pass WEIGHTS=file")
    label = f"timm:{name}.{cfg.tag}" if cfg.tag else f"timm:{name}"
    files: list[str] = []
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if not filename:
                continue
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return label, [found]
            files.append(os.path.join(constants.HF_HUB_CACHE, f"models--{repo.replace('/', '--')}", "snapshots", "<revision>", filename))
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return label, [path]
        files.append(path)
    return label, files


def load_default(name: str, path: str) -> nn.Module:
    """``name`` with its default weights read, through timm's own loader, from the local ``path``."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})


def transform(name: str, model: nn.Module) -> Callable:
    """timm's evaluation transform for ``model`` (its resolved data config)."""
    return create_transform(**resolve_data_config({}, model=model), is_training=False)

"""What every adapter shares: a library's layers seen through the model vocabulary, never copied.

An adapter builds a ``ResidualNet`` whose stem, blocks and head *register the library model's own
modules and parameters* (the same objects, so ``.to()``, ``.eval()`` and the weights act on both
models) and run them in the library's order, so the adapted model's output equals the original's
bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import Tensor, nn

from resens.errors import ResensError
from resens.models.blocks import Block, SharedPreActBlock


class AdapterError(ResensError):
    """A library model resens cannot load or adapt (unknown name, foreign weights, missing library)."""


class Part(nn.Module):
    """A piece of a library model run by the library's own code ``fn`` (e.g. ViT's token
    embedding). ``modules`` and the direct parameters of ``owner`` are registered here (shared,
    not copied), so that moving or listing the adapted model reaches everything ``fn`` reads."""

    def __init__(self, fn: Callable[[Tensor], Tensor], owner: nn.Module | None = None,
                 **modules: nn.Module | None) -> None:
        super().__init__()
        for name, module in modules.items():
            if module is not None:
                self.add_module(name, module)
        if owner is not None:
            if next(owner.buffers(recurse=False), None) is not None:
                raise AdapterError(f"{type(owner).__name__} keeps buffers outside its layers; not adaptable")
            for name, p in owner.named_parameters(recurse=False):
                self.register_parameter(name, p)
        # Kept off the module tree: fn may close over the whole library model.
        object.__setattr__(self, "fn", fn)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class ResidualUnit(Block):
    """``post(shortcut(x) + branch(x))`` from a library block's layers: ``branch`` runs them in the
    library's order (a ``nn.Sequential`` that may list one module twice, e.g. torchvision's shared
    ReLU), ``shortcut`` is its projection or the identity. Drop-path layers sit in the branch: in
    eval mode they are the identity (timm rescales while training), so the survival probability
    of the vocabulary is 1."""

    def __init__(self, branch: list[nn.Module], shortcut: nn.Module | None, post: nn.Module) -> None:
        super().__init__(1.0)
        self.branch = nn.Sequential(*branch)
        self.downsampling = shortcut is not None
        self.shortcut = nn.Identity() if shortcut is None else shortcut
        self.post = post


class PreActUnit(SharedPreActBlock):
    """A pre-activation block whose normalisation ``preact`` is shared by the branch and the
    projection shortcut (timm's ``PreActBottleneck``, ``PreActBasic``): ``branch(x)`` and
    ``shortcut(x)`` each apply it, ``forward`` once, as the library does."""

    def __init__(self, preact: nn.Module, residual: list[nn.Module], projection: nn.Module | None) -> None:
        super().__init__(1.0)
        self.preact = preact
        self.residual = nn.Sequential(*residual)
        self.projection = projection
        self.downsampling = projection is not None
        self.post = nn.Identity()


def out_of_place(act: nn.Module) -> nn.Module:
    """The activation after a block's addition, working out of place: a deleted block applies it
    to its input, which other lesion variants still read. Parameter-free activations only."""
    if isinstance(act, nn.ReLU):
        return nn.ReLU()
    if next(act.parameters(), None) is not None:
        raise AdapterError(f"the activation after the addition ({type(act).__name__}) has weights; not adaptable")
    act = copy.deepcopy(act)
    if hasattr(act, "inplace"):
        act.inplace = False
    return act


def present(*modules: nn.Module | None) -> list[nn.Module]:
    """The modules that exist, in order (timm leaves optional layers as None)."""
    return [m for m in modules if m is not None]

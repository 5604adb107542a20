"""Networks people already have, in resens's model vocabulary: torchvision's ResNets, timm's
ResNets, pre-activation ResNets and vision transformers.

``load_library_model("torchvision:resnet50", weights)`` builds the library's model, loads its
weights (a local ``.pth`` or ``.safetensors`` state dict, ``"random"``, or ``None``: the library's
default weights when they are in its local cache; nothing is ever downloaded) and adapts it
(``adapt``): the ``ResidualNet`` it returns runs the library model's own modules, so its output
equals the original's exactly and lesions act on the original's weights. An adapter family is a
module here with ``adapt``, ``create``, ``classifier_key``, ``default_weights``, ``load_default``,
``transform`` and ``VERSION``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from resens.models.adapters.common import AdapterError, Part, PreActUnit, ResidualUnit
from resens.models.resnet import ResidualNet
from resens.runs import sha256_of

LIBRARIES = ("torchvision", "timm")
INSTALL = {"timm": "pip install 'resens[timm]' (or pip install timm)"}


def family(library: str) -> ModuleType:
    """The adapter module of ``library``; a library that is not installed is a one-line error."""
    if library not in LIBRARIES:
        raise AdapterError(f"unknown model library '{library}' (expected LIB:NAME with LIB one of {', '.join(LIBRARIES)})")
    try:
        return importlib.import_module(f"resens.models.adapters.{library}")
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] == library:
            raise AdapterError(f"{library} is not installed: {INSTALL.get(library, f'pip install {library}')}") from None
        raise


def adapt(model: nn.Module) -> ResidualNet:
    """Any supported library model as a ``ResidualNet`` sharing its modules (nothing copied)."""
    module = type(model).__module__.split(".")[0]
    if module not in LIBRARIES:
        raise AdapterError(f"{type(model).__name__} is from '{module}', not from {' or '.join(LIBRARIES)}")
    return family(module).adapt(model)


@dataclass
class LibraryModel:
    """A library model, its adapted ``ResidualNet`` and what a run records about it."""

    spec: str  # LIB:NAME
    original: nn.Module
    adapted: ResidualNet
    transform: Callable  # PIL image -> [3, H, W] float32, the library's evaluation transform
    num_classes: int
    library_version: str
    weights: str  # the weights file, "random", or the default weights' name
    weights_sha256: str  # of the weights file; "random" for random weights


def parse_spec(spec: str) -> tuple[str, str]:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``."""
    library, sep, name = spec.partition(":")
    if not sep or not name:
        raise AdapterError(f"model '{spec}': expected LIB:NAME, e.g. torchvision:resnet50 or timm:vit_small_patch16_224")
    return library, name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a ``.pth``/``.pt`` file holding one (also
    under a ``state_dict`` or ``model`` key), loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise AdapterError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    except Exception as err:
        raise AdapterError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path} does not hold a state dict of tensors")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], spec: str, path: Path) -> None:
    """Strict loading with a one-line account of what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} keys {what} (e.g. {keys[0]})")
        raise AdapterError(f"weights {path} are not those of {spec}: {', '.join(parts)}")
    model.load_state_dict(state)


def load_library_model(
    spec: str, weights: str | Path | None = None, seed: int = 0, num_classes: int | None = None
) -> LibraryModel:
    """Build ``spec`` (``LIB:NAME``) with ``weights``: a state-dict file (its classifier decides
    the number of classes), ``"random"`` (seeded by ``seed``, ``num_classes`` classes; None: the
    library's default) or ``None`` (the library's default
    weights, read from its local cache; if they are not there, a one-line error says where to put
    the file). Raises ``AdapterError`` for an unknown name, a missing library, or weights of
    another architecture."""
    library, name = parse_spec(spec)
    fam = family(library)
    if weights is None:
        label, files = fam.default_weights(name)
        found = [f for f in files if Path(f).is_file()]
        if not found:
            raise AdapterError(
                f"{spec}: default weights {label} are not in the local cache and are never downloaded; "
                f"put the file at {files[0] if files else '?'} or pass WEIGHTS=file.pth"
            )
        original, weights_label, digest = fam.load_default(name, found[0]), label, sha256_of(found[0])
    elif str(weights) == "random":
        torch.manual_seed(seed)
        original, weights_label, digest = fam.create(name, num_classes), "random", "random"
    else:
        path = Path(weights)
        state = read_state_dict(path)
        original = fam.create(name)
        key = fam.classifier_key(original)
        if key not in state or state[key].dim() != 2:
            raise AdapterError(f"weights {path} are not those of {spec}: no classifier weight '{key}'")
        classes = state[key].shape[0]
        if classes != original.state_dict()[key].shape[0]:
            original = fam.create(name, num_classes=classes)
        _load_into(original, state, spec, path)
        weights_label, digest = str(path), sha256_of(path)
    original.eval()
    classes = original.state_dict()[fam.classifier_key(original)].shape[0]
    return LibraryModel(
        spec=spec, original=original, adapted=fam.adapt(original), transform=fam.transform(name, original),
        num_classes=classes, library_version=fam.VERSION, weights=weights_label, weights_sha256=digest,
    )


__all__ = [
    "LIBRARIES", "AdapterError", "LibraryModel", "Part", "PreActUnit", "ResidualUnit", "adapt", "family",
    "load_library_model", "parse_spec", "read_state_dict",
]

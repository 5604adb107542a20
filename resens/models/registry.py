"""One registry of model families: ``@register_model`` on a builder whose keyword arguments are
its configuration (as timm's ``register_model``).

``build_model(arch, **kwargs)`` builds one; ``model_arguments(arch)`` names what a family takes,
so a config key that the family does not take is refused, not silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name. Its keyword arguments are the family's configuration."""
    if fn.__name__ in MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    MODELS[fn.__name__] = fn
    return fn


def model_arguments(arch: str) -> set[str]:
    """The keyword arguments the builder of ``arch`` takes."""
    if arch not in MODELS:
        raise KeyError(f"unknown architecture '{arch}' (choose from {', '.join(sorted(MODELS))})")
    return set(inspect.signature(MODELS[arch]).parameters)


def build_model(arch: str, **kwargs) -> nn.Module:
    """Build ``arch`` with ``kwargs``; a keyword its builder does not take is an error."""
    unknown = sorted(set(kwargs) - model_arguments(arch))
    if unknown:
        raise TypeError(f"{arch} does not take '{unknown[0]}'")
    return MODELS[arch](**kwargs)

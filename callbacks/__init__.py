"""Thin Lightning callbacks that run the paper's analyses (``resens.analysis``) and log them."""

from __future__ import annotations

from omegaconf import DictConfig

from callbacks.base import AnalysisCallback
from callbacks.deletion import MultiDeletion, Reorder, SingleDeletion
from callbacks.paths import EffectivePaths, PathGradient, PathLengths, StochasticDepth

REGISTRY: dict[str, type[AnalysisCallback]] = {
    c.name: c
    for c in (SingleDeletion, MultiDeletion, Reorder, PathLengths, PathGradient, EffectivePaths, StochasticDepth)
}


def build_analysis_callbacks(cfg: DictConfig) -> list[AnalysisCallback]:
    """One callback per name in ``cfg.analysis.run``, in the canonical order (later analyses
    read earlier results: effective paths need path gradients)."""
    from resens.config import ANALYSES

    wanted = set(cfg.analysis.run)
    return [REGISTRY[name](cfg.analysis) for name in ANALYSES if name in wanted and name in REGISTRY]


__all__ = [
    "AnalysisCallback", "EffectivePaths", "MultiDeletion", "PathGradient", "PathLengths", "Reorder",
    "SingleDeletion", "StochasticDepth", "build_analysis_callbacks",
]

"""Thin classes that run the paper's analyses (``resens.analysis``) and log them, and the one
Lightning callback that runs them (``AnalysisRunner``).

``REGISTRY`` is the one registry of analyses: each is a class registered with
``@register_analysis`` under its name, which ``analysis.run`` lists (``resens.config`` validates
against ``analysis_names()``). It declares the analyses it ``requires`` and those it ``uses``;
the run order follows those declarations (ties: registration order), never the order of
``analysis.run``. A run that switches off an analysis another one requires is refused with a
one-line ``ConfigError`` before training starts: required analyses are not run implicitly, so
what a run costs is what its config lists.

To add an analysis: its maths in ``resens/analysis`` and a registered class in a module here
(a new module: one more import below).
"""

from __future__ import annotations

from omegaconf import DictConfig

from callbacks.base import REGISTRY, Analysis, AnalysisContext, AnalysisRunner, register_analysis
from callbacks.deletion import Duplication, MultiDeletion, Reorder, SingleDeletion
from callbacks.paths import EffectivePaths, PathGradient, PathLengths, StochasticDepth
from resens.analysis.catalog import run_order


def analysis_names() -> tuple[str, ...]:
    """Every analysis ``analysis.run`` may list, in registration order."""
    return tuple(REGISTRY)


def analysis_order(run: list[str]) -> list[str]:
    """The registered analyses among ``run`` (``analysis.run``), dependencies first; raises
    ``ConfigError`` when one of them requires an analysis that ``run`` leaves out."""
    requires = {name: cls.requires for name, cls in REGISTRY.items()}
    uses = {name: cls.uses for name, cls in REGISTRY.items()}
    return run_order(run, analysis_names(), requires, uses)


def build_analysis_callbacks(cfg: DictConfig) -> list[AnalysisRunner]:
    """The callback that runs the analyses of ``cfg.analysis.run`` (none if it is empty)."""
    names = analysis_order(list(cfg.analysis.run))
    return [AnalysisRunner([REGISTRY[name](cfg.analysis) for name in names])] if names else []


__all__ = [
    "REGISTRY", "Analysis", "AnalysisContext", "AnalysisRunner", "Duplication", "EffectivePaths", "MultiDeletion",
    "PathGradient", "PathLengths", "Reorder", "SingleDeletion", "StochasticDepth", "analysis_names", "analysis_order",
    "build_analysis_callbacks", "register_analysis",
]

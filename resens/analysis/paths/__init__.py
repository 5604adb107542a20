"""Paths through a residual network: how many of each length, the gradient each one carries, and
which of them matter (pure torch).

A network of n residual blocks unrolls into 2^n paths: at block i a path goes either through the
residual branch or through the shortcut. A path is a bool vector of length n (True = branch), its
length k = 0..n the number of branches it enters. Blocks are numbered from 0.

Three layers, each a module:

- :mod:`~resens.analysis.paths.counting`: counting paths (lengths, sampling, effective paths,
  survival under deletion);
- :mod:`~resens.analysis.paths.vjp`: each layer and callable of the network as its
  vector-Jacobian product at the intact activations;
- :mod:`~resens.analysis.paths.engine`: the backward engine that measures the gradient carried by
  many paths at once, its naive reference, and the paper's protocol (gradient norm by length).
"""

from resens.analysis.paths.counting import (
    effective_path_survival,
    effective_paths,
    path_length_distribution,
    path_survival,
    path_survival_by_length,
    sample_paths,
    share_of_paths,
)
from resens.analysis.paths.engine import (
    DEFAULT_BUDGET,
    PathGradientsByLength,
    path_gradient_by_length,
    path_gradient_norms,
    path_gradient_norms_naive,
    path_input_gradients,
)

__all__ = [
    "DEFAULT_BUDGET",
    "PathGradientsByLength",
    "effective_path_survival",
    "effective_paths",
    "path_gradient_by_length",
    "path_gradient_norms",
    "path_gradient_norms_naive",
    "path_input_gradients",
    "path_length_distribution",
    "path_survival",
    "path_survival_by_length",
    "sample_paths",
    "share_of_paths",
]

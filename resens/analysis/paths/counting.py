"""Counting paths: how many of each length, drawing them, which lengths carry the gradient, and
how many survive deleting blocks (pure torch and Python integers).

A network of n residual blocks unrolls into 2^n paths: at block i a path goes either through the
residual branch or through the shortcut. A path is a bool vector of length n (True = branch), its
length the number of branches it enters, k = 0..n (0: the path of shortcuts only). Blocks are
numbered from 0. Of the 2^n paths, C(n, k) have length k: path lengths are Binomial(n, 1/2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "effective_path_survival",
    "effective_paths",
    "path_length_distribution",
    "path_survival",
    "path_survival_by_length",
    "sample_paths",
    "share_of_paths",
]


def path_length_distribution(n: int) -> Tensor:
    """Fraction of the 2^n paths that have each length k = 0..n: C(n, k) / 2^n. ``[n+1]`` float64.

    Python integers keep it exact (correctly rounded) for any n.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = 2**n
    return torch.tensor([math.comb(n, k) / total for k in range(n + 1)], dtype=torch.float64)


def share_of_paths(n: int, lo: int, hi: int) -> float:
    """Fraction of the 2^n paths whose length is in [lo, hi]: Σ_{k=lo..hi} C(n, k) / 2^n.

    ``share_of_paths(54, 5, 17)`` = 0.004537 (the paper's 0.45%).
    """
    lo, hi = max(lo, 0), min(hi, n)
    return sum(math.comb(n, k) for k in range(lo, hi + 1)) / 2**n


def sample_paths(n: int, length: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` paths of exactly ``length`` branches among ``n`` blocks, at uniformly random
    positions (every k-subset equally likely). ``[count, n]`` bool on the CPU; reproducible for a
    seeded ``generator`` (a CPU generator)."""
    if not 0 <= length <= n:
        raise ValueError(f"path length must be in 0..{n}, got {length}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    # The ranks of i.i.d. uniforms are a uniform random permutation; its first k entries a uniform
    # random k-subset.
    order = torch.rand(count, n, generator=generator).argsort(dim=1)
    paths = torch.zeros(count, n, dtype=torch.bool)
    paths.scatter_(1, order[:, :length], True)
    return paths


def effective_paths(mean_norm_by_length: Tensor, n: int, share: float = 0.9) -> dict:
    """Which path lengths carry the gradient (the paper's Fig. 6).

    ``mean_norm_by_length`` [n+1]: mean gradient norm of a path of each length (NaN or 0 where not
    measured, counted as 0). Returns

    - ``total_gradient`` [n+1] float64: C(n, k)/2^n × mean norm, the gradient of all paths of
      length k relative to 2^n paths;
    - ``lo``, ``hi``: the narrowest range of lengths whose total holds at least ``share`` of the
      sum (among equally narrow ranges, the one holding more);
    - ``share_of_gradient``: the share it holds; ``share_of_paths``: Σ_{k=lo..hi} C(n, k)/2^n.
    """
    mean = torch.as_tensor(mean_norm_by_length, dtype=torch.float64).cpu()
    if mean.shape != (n + 1,):
        raise ValueError(f"mean_norm_by_length must have n+1 = {n + 1} entries, got {tuple(mean.shape)}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    total = path_length_distribution(n) * torch.nan_to_num(mean, nan=0.0)
    whole = float(total.sum())
    if not whole > 0.0:
        raise ValueError("effective_paths needs a positive mean norm at some length")
    cum = [0.0, *torch.cumsum(total, 0).tolist()]
    # Relative slack so that share=1.0 is not lost to rounding in the cumulative sums.
    need = share * whole * (1.0 - 1e-12)
    best: tuple[int, int, float] | None = None
    for width in range(n + 1):
        for lo in range(n + 1 - width):
            held = cum[lo + width + 1] - cum[lo]
            if held >= need and (best is None or held > best[2]):
                best = (lo, lo + width, held)
        if best is not None:
            break
    assert best is not None  # width n covers everything
    lo, hi, held = best
    return {
        "total_gradient": total,
        "lo": lo,
        "hi": hi,
        "share_of_gradient": min(held / whole, 1.0),
        "share_of_paths": share_of_paths(n, lo, hi),
    }


def path_survival(n: int, deleted: int) -> float:
    """Fraction of all 2^n paths that survive deleting ``deleted`` blocks: a path survives iff it
    takes the shortcut at every deleted block, so 2^(n-d) / 2^n = 2^-d."""
    if not 0 <= deleted <= n:
        raise ValueError(f"deleted must be in 0..{n}, got {deleted}")
    return 2.0**-deleted


def path_survival_by_length(n: int, deleted: int) -> Tensor:
    """Fraction of the paths of each length k = 0..n that survive deleting ``deleted`` = d blocks:
    C(n-d, k) / C(n, k) (their k branches all among the n-d kept blocks). ``[n+1]`` float64."""
    if not 0 <= deleted <= n:
        raise ValueError(f"deleted must be in 0..{n}, got {deleted}")
    return torch.tensor(
        [math.comb(n - deleted, k) / math.comb(n, k) for k in range(n + 1)], dtype=torch.float64
    )


def effective_path_survival(
    n: int, deleted: int, lengths: tuple[int, int] | None = None, weights: Tensor | None = None
) -> float:
    """Fraction of the effective paths that survive deleting ``deleted`` = d blocks:

        Σ_{k=lo..hi} w_k C(n-d, k) / Σ_{k=lo..hi} w_k C(n, k)

    over the lengths ``lengths`` = (lo, hi) (default all, 0..n), each path weighted by ``w_k`` =
    ``weights[k]`` ([n+1], e.g. the mean gradient norm per length so that the result is the share
    of the gradient that survives; default 1, counting paths).
    """
    lo, hi = lengths if lengths is not None else (0, n)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"lengths must satisfy 0 <= lo <= hi <= {n}, got ({lo}, {hi})")
    ks = range(lo, hi + 1)
    if weights is None:
        # Integers: exact, then one correctly rounded division.
        return sum(math.comb(n - deleted, k) for k in ks) / sum(math.comb(n, k) for k in ks)
    w = torch.nan_to_num(torch.as_tensor(weights, dtype=torch.float64).cpu(), nan=0.0)
    if w.shape != (n + 1,):
        raise ValueError(f"weights must have n+1 = {n + 1} entries, got {tuple(w.shape)}")
    mass = (path_length_distribution(n) * w)[lo : hi + 1]
    alive = mass * path_survival_by_length(n, deleted)[lo : hi + 1]
    return float(alive.sum() / mass.sum())

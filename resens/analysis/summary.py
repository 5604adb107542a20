"""The headline numbers of a run, each defined once, read from an ``analysis.json``-like dict.

``results`` maps analysis keys to what the analyses wrote (plain JSON values): ``baseline_error``
(a fraction), ``single_deletion`` (rows ``{"block", "downsampling", "error", ...}``),
``multi_deletion`` and ``duplication`` (rows ``{"k", "error", ...}``), ``reorder`` (rows
``{"swaps", "displacement", "error", ...}``),
``path_gradient`` (rows ``{"length", "samples", "mean_norm", ...}``) and ``effective_paths``
(``{"lengths": [lo, hi], "share_of_gradient", "share_of_paths", ...}``). Errors are fractions
(0..1). A number whose analysis did not run is NaN (or absent from :func:`headline`).

The W&B summaries of the callbacks, the demo's ``summary.txt`` and the figures all read these.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

NAN = float("nan")
Results = Mapping[str, Any]
Rows = Sequence[Mapping[str, Any]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


def single_deletion_errors(results: Results) -> dict[int, float]:
    """Error with each block deleted, block -> error, over the blocks the lesion protocol lets
    random deletions touch (rows marked ``eligible``; the authors' headline numbers leave out the
    first block of every stage); rows without that mark: the blocks that are not downsampling
    (deleting one removes a change of shape, not one path of many)."""
    rows = results.get("single_deletion") or ()
    return {
        r["block"]: r["error"] for r in rows
        if (r["eligible"] if "eligible" in r else not r["downsampling"])
    }


def single_deletion_mean_error(results: Results) -> float:
    """Mean error over :func:`single_deletion_errors`' blocks (NaN if none)."""
    return _mean(list(single_deletion_errors(results).values()))


def single_deletion_max_error(results: Results) -> float:
    """Worst error over the same blocks as :func:`single_deletion_mean_error` (NaN if none)."""
    errors = single_deletion_errors(results).values()
    return max(errors) if errors else NAN


def errors_by(rows: Rows, key: str) -> dict[Any, list[float]]:
    """The errors of ``rows`` grouped by ``row[key]``, keys in increasing order."""
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r["error"])
    return dict(sorted(groups.items()))


def mean_error_by(rows: Rows, key: str) -> dict[Any, float]:
    """Mean error of ``rows`` for each value of ``row[key]``, keys in increasing order."""
    return {k: _mean(v) for k, v in errors_by(rows, key).items()}


def mean_and_spread(rows: Rows, key: str, value: str = "error") -> list[dict[str, float]]:
    """For each value x of ``row[key]``, in increasing order: ``{"x", "mean", "std", "min",
    "max", "n"}`` of ``row[value]`` over the rows with that x (std: population, 0 for one row)."""
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r[value])
    out = []
    for x, vs in sorted(groups.items()):
        mean = _mean(vs)
        std = math.sqrt(_mean([(v - mean) ** 2 for v in vs]))
        out.append({"x": x, "mean": mean, "std": std, "min": min(vs), "max": max(vs), "n": len(vs)})
    return out


def multi_deletion_mean_error(results: Results) -> dict[int, float]:
    """Mean error with k random blocks deleted, k -> error (Veit et al. Fig. 3b)."""
    return mean_error_by(results.get("multi_deletion") or (), "k")


def reorder_mean_error(results: Results) -> dict[int, float]:
    """Mean error after s random swaps of blocks, s -> error (Veit et al. Fig. 4)."""
    return mean_error_by(results.get("reorder") or (), "swaps")


def duplication_mean_error(results: Results) -> dict[int, float]:
    """Mean error with k random blocks each run twice, k -> error."""
    return mean_error_by(results.get("duplication") or (), "k")


def gradient_norm_by_length(results: Results, n: int) -> list[float]:
    """Mean gradient norm of a path of each length 0..n (NaN where not measured), ``[n+1]``: the
    input of ``resens.analysis.paths.effective_paths``."""
    out = [NAN] * (n + 1)
    for r in results.get("path_gradient") or ():
        out[r["length"]] = r["mean_norm"]
    return out


def gradient_ends(results: Results) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """The ``path_gradient`` rows of the shortest and the longest measured length with a positive
    mean norm, or None when there are fewer than two."""
    rows = [g for g in results.get("path_gradient") or () if g["samples"] > 0 and g["mean_norm"] > 0]
    return (rows[0], rows[-1]) if len(rows) >= 2 else None


def gradient_decay_per_block(results: Results) -> float:
    """The factor by which a path's gradient norm shrinks per block it enters: the log-linear
    rate between the ends of :func:`gradient_ends`, exp((log g_last - log g_first) / (k_last -
    k_first)). NaN without two measured lengths."""
    ends = gradient_ends(results)
    if ends is None:
        return NAN
    first, last = ends
    rate = (math.log(first["mean_norm"]) - math.log(last["mean_norm"])) / (last["length"] - first["length"])
    return math.exp(-rate)


def effective_range(results: Results) -> tuple[int, int] | None:
    """The lengths (lo, hi) of the effective paths, or None without ``effective_paths``."""
    eff = results.get("effective_paths")
    return (eff["lengths"][0], eff["lengths"][1]) if eff else None


def effective_shares(results: Results) -> tuple[float, float]:
    """(share of the gradient, share of the paths) the effective range holds; NaNs without it."""
    eff = results.get("effective_paths")
    return (eff["share_of_gradient"], eff["share_of_paths"]) if eff else (NAN, NAN)


def training_headline(split: str, best_error: float | None, best_epoch: int | None,
                      last_error: float | None) -> dict[str, float]:
    """The headline numbers of training, under W&B summary keys: ``<split>/best_error`` and
    ``<split>/best_epoch`` (the lowest error on the evaluation split and its epoch, 0-based: the
    best checkpoint's), and, where the evaluation split is the test set (``split == "test"``),
    ``test/final_error``: the error of the final weights. Unknown values are left out."""
    out: dict[str, float] = {}
    if best_error is not None:
        out[f"{split}/best_error"] = best_error
    if best_epoch is not None:
        out[f"{split}/best_epoch"] = best_epoch
    if split == "test" and last_error is not None:
        out["test/final_error"] = last_error
    return out


def headline(results: Results) -> dict[str, float]:
    """Every headline number that ``results`` holds, under flat keys (W&B summary names below
    ``analysis/``): ``baseline_error``, ``deletion/single/{mean,max}_error``,
    ``deletion/multi/mean_error_k{k}``, ``reorder/mean_error_swaps{s}``,
    ``duplication/mean_error_k{k}``,
    ``paths/gradient/decay_per_block``, ``paths/effective/{lo,hi,share_of_gradient,share_of_paths}``."""
    out: dict[str, float] = {}
    if "baseline_error" in results:
        out["baseline_error"] = results["baseline_error"]
    if single_deletion_errors(results):
        out["deletion/single/mean_error"] = single_deletion_mean_error(results)
        out["deletion/single/max_error"] = single_deletion_max_error(results)
    for k, e in multi_deletion_mean_error(results).items():
        out[f"deletion/multi/mean_error_k{k}"] = e
    for s, e in reorder_mean_error(results).items():
        out[f"reorder/mean_error_swaps{s}"] = e
    for k, e in duplication_mean_error(results).items():
        out[f"duplication/mean_error_k{k}"] = e
    if gradient_ends(results) is not None:
        out["paths/gradient/decay_per_block"] = gradient_decay_per_block(results)
    lo_hi = effective_range(results)
    if lo_hi is not None:
        out["paths/effective/lo"], out["paths/effective/hi"] = lo_hi
        share_of_gradient, share_of_paths = effective_shares(results)
        out["paths/effective/share_of_gradient"] = share_of_gradient
        out["paths/effective/share_of_paths"] = share_of_paths
    return out

"""The authors' published lesion results (Veit et al. 2016), shipped in ``resens/reference/``.

Blocks are numbered from 1 in those files and from 0 here. ``name`` is one of
``cifar10_resnet110``, ``cifar10_resnet110_sd`` (single deletion only) and ``imagenet_resnet200``.
"""

from __future__ import annotations

import csv
from importlib import resources

NAMES = ("cifar10_resnet110", "cifar10_resnet110_sd", "imagenet_resnet200")
_BASELINE_ROW = {"cifar10_resnet110": "preact-resnet-110", "cifar10_resnet110_sd": "sd-resnet-110",
                 "imagenet_resnet200": "preact-resnet-200"}


def _rows(filename: str) -> list[dict[str, str]]:
    with resources.files("resens.reference").joinpath(filename).open() as f:
        return list(csv.DictReader(f))


def _check(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown paper reference '{name}' (choose from {', '.join(NAMES)})")


def _error_column(row: dict[str, str]) -> float:
    return float(row["error"] if "error" in row else row["top1_error"])


def single_deletion(name: str) -> list[float]:
    """Top-1 test error with block i (0-based) deleted, for every block."""
    _check(name)
    return [_error_column(r) for r in _rows(f"{name}_single_deletion.csv")]


def baseline(name: str) -> float | None:
    """Top-1 error of the intact network, where the authors published it."""
    _check(name)
    for r in _rows("baselines.csv"):
        if r["model"] == _BASELINE_ROW[name]:
            return float(r["top1_error"])
    return None


def multi_deletion_mean(name: str) -> dict[int, float]:
    """Mean top-1 error per number of deleted blocks k (runs that spare the downsampling blocks)."""
    _check(name)
    if name == "cifar10_resnet110_sd":
        return {}
    return {int(r["k"]): float(r["mean"]) for r in _rows(f"{name}_multi_deletion_summary.csv")}


def reorder_mean(name: str) -> dict[int, float]:
    """Mean top-1 error per number of swaps."""
    _check(name)
    if name == "cifar10_resnet110_sd":
        return {}
    return {int(r["swaps"]): float(r["mean"]) for r in _rows(f"{name}_reorder_summary.csv")}

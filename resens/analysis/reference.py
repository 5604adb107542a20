"""The authors' published lesion results (Veit et al. 2016), shipped in ``resens/reference/``.

Blocks are numbered from 1 in those files and from 0 here. ``name`` is one of
``cifar10_resnet110``, ``cifar10_resnet110_sd`` (single deletion only) and ``imagenet_resnet200``.

The curves are computed from the authors' per-run files, filtered to the blocks a run's lesion
protocol touches, so that a curve compares like with like. ``comparable`` says whether such a
filter exists for a given protocol; ``protocol_curve`` applies it.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from resens.analysis.protocol import LesionProtocol
from resens.errors import ConfigError
from resens.models import MODELS
from resens.models.resnet import IMAGENET_LAYERS

NAMES = ("cifar10_resnet110", "cifar10_resnet110_sd", "imagenet_resnet200")
ANALYSES = ("single_deletion", "multi_deletion", "reorder", "duplication")
_BASELINE_ROW = {"cifar10_resnet110": "preact-resnet-110", "cifar10_resnet110_sd": "sd-resnet-110",
                 "imagenet_resnet200": "preact-resnet-200"}


@dataclass(frozen=True)
class _Design:
    """How the authors drew their random lesions on one network (``lesion-study.py``), 0-based.

    Deletions drew k distinct blocks among all blocks; swaps drew a range uniformly, then both
    ends inside it; duplications drew k distinct blocks outside ``never_duplicated``.
    """

    family: str
    num_blocks: int
    stage_firsts: frozenset[int]
    reorder_ranges: tuple[tuple[int, int], ...]
    never_duplicated: frozenset[int]
    analyses: tuple[str, ...]
    files: str  # file name prefix
    label: str  # what the authors measured, for figure legends
    data: str  # the data set (``data.name``)
    model: tuple[tuple[str, object], ...]  # the network as ``model.*`` config values


_CIFAR_FIRSTS = frozenset({0, 18, 36})
_IMAGENET_FIRSTS = frozenset({0, 3, 27, 63})
_CIFAR = (("arch", "cifar_resnet"), ("depth", 110), ("width", 16))
_DESIGNS = {
    "cifar10_resnet110": _Design(
        "cifar", 54, _CIFAR_FIRSTS, ((1, 17), (19, 35), (37, 53)), _CIFAR_FIRSTS, ANALYSES,
        "cifar10_resnet110", "pre-act ResNet-110, CIFAR-10", "cifar10",
        (*_CIFAR, ("preact", True), ("stochastic_depth", None), ("shortcut_pool", "subsample"),
         ("conv_bias", False)),
    ),
    "cifar10_resnet110_sd": _Design(
        "cifar", 54, _CIFAR_FIRSTS, (), _CIFAR_FIRSTS, ("single_deletion",), "cifar10_resnet110_sd",
        "stochastic-depth ResNet-110 (Huang et al.), CIFAR-10", "cifar10",
        (*_CIFAR, ("preact", False), ("stochastic_depth", 0.5), ("shortcut_pool", "avg"),
         ("conv_bias", True)),
    ),
    "imagenet_resnet200": _Design(
        "imagenet", 66, _IMAGENET_FIRSTS, ((4, 26), (28, 62)), _IMAGENET_FIRSTS, ANALYSES,
        "imagenet_resnet200", "pre-act ResNet-200, ImageNet", "imagenet",
        (("arch", "imagenet_resnet"), ("depth", 200), ("width", 64), ("layers", None),
         ("stochastic_depth", None)),
    ),
}


@cache
def _read(filename: str) -> tuple[dict[str, str], ...]:
    data = resources.files("resens.reference").joinpath(filename).read_bytes()
    if filename.endswith(".gz"):
        data = gzip.decompress(data)
    return tuple(csv.DictReader(io.StringIO(data.decode())))


def _design(name: str, analysis: str | None = None) -> _Design:
    if name not in NAMES:
        raise ConfigError(f"analysis.reference: unknown paper reference '{name}' (choose from {', '.join(NAMES)})")
    design = _DESIGNS[name]
    if analysis is not None and analysis not in design.analyses:
        raise ConfigError(f"analysis.reference: the authors ran no {analysis} on {name}")
    return design


def label(name: str) -> str:
    """What the authors measured, e.g. "pre-act ResNet-110, CIFAR-10"."""
    return _design(name).label


def model_mismatch(name: str, model: Mapping[str, object], data: str) -> str | None:
    """None when a run's network (its ``model.*`` config, unset keys taking the builder's
    defaults) and data set are the ones the authors measured for ``name``, else how they differ."""
    design = _design(name)
    if data != design.data:
        return f"the run uses {data}, the authors' data is {design.data}"
    arch = model.get("arch")
    wanted = dict(design.model)
    if arch != wanted["arch"]:
        return f"the run's network is {arch}, the authors' is {wanted['arch']}"
    defaults = {
        k: p.default for k, p in inspect.signature(MODELS[arch]).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for key, value in wanted.items():
        got = model.get(key)
        got = defaults.get(key) if got is None else got
        if key == "layers" and got is not None and list(got) != list(IMAGENET_LAYERS[wanted["depth"]]):
            return f"the run's stages {list(got)} are not the authors' {list(IMAGENET_LAYERS[wanted['depth']])}"
        if key != "layers" and got != value:
            return f"the run's model.{key}={got}, the authors' network has {value}"
    return None


def _error_column(row: dict[str, str]) -> float:
    return float(row["error"] if "error" in row else row["top1_error"])


def _blocks(field: str) -> set[int]:
    """0-based blocks of a space-separated 1-based list."""
    return {int(b) - 1 for b in field.split()}


def _pairs(field: str) -> list[tuple[int, int]]:
    """0-based swaps of a space-separated list of 1-based ``a-b``."""
    return [(int(a) - 1, int(b) - 1) for a, b in (p.split("-") for p in field.split())]


def _means(groups: dict[int, list[float]]) -> dict[int, float]:
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def single_deletion(name: str) -> list[float]:
    """Top-1 test error with block i (0-based) deleted, for every block."""
    design = _design(name, "single_deletion")
    return [_error_column(r) for r in _read(f"{design.files}_single_deletion.csv")]


def baseline(name: str) -> float | None:
    """Top-1 error of the intact network, where the authors published it."""
    _design(name)
    for r in _read("baselines.csv"):
        if r["model"] == _BASELINE_ROW[name]:
            return float(r["top1_error"])
    return None


def multi_deletion_curve(name: str, excluded: Iterable[int] = ()) -> dict[int, float]:
    """Mean top-1 error per number of deleted blocks k, over the authors' runs that delete none
    of ``excluded`` (0-based). The authors drew k distinct blocks among all blocks, so these runs
    are k distinct blocks drawn uniformly among the others. Their plots used ``excluded`` = the
    first block of every stage."""
    design = _design(name, "multi_deletion")
    skip = set(excluded)
    groups: dict[int, list[float]] = defaultdict(list)
    for r in _read(f"{design.files}_multi_deletion.csv"):
        if not _blocks(r["blocks"]) & skip:
            groups[int(r["k"])].append(_error_column(r))
    return _means(groups)


def reorder_curve(
    name: str, by: str = "swaps", ranges: Iterable[tuple[int, int]] | None = None, bin_width: int = 1
) -> dict[int, float]:
    """Mean top-1 error of the authors' reorder runs per number of swaps (``by="swaps"``) or per
    total displacement ``Σ|a - b|`` of a run's swaps (``by="displacement"``, in positions, binned
    by ``bin_width``: key = the bin's lower edge). ``ranges`` (0-based, inclusive) keeps only the
    runs whose every swap lies inside one of them; with whole ranges of the authors' these are
    the runs the authors' procedure draws from those ranges alone."""
    design = _design(name, "reorder")
    if by not in ("swaps", "displacement"):
        raise ValueError(f"reorder_curve by 'swaps' or 'displacement', not '{by}'")
    if bin_width < 1:
        raise ValueError(f"bin_width must be a positive number of positions, got {bin_width}")
    keep = None if ranges is None else list(ranges)
    suffix = ".csv.gz" if design.family == "cifar" else ".csv"
    groups: dict[int, list[float]] = defaultdict(list)
    for r in _read(f"{design.files}_reorder{suffix}"):
        pairs = _pairs(r["pairs"])
        if keep is not None and not all(any(lo <= a <= hi and lo <= b <= hi for lo, hi in keep) for a, b in pairs):
            continue
        key = len(pairs) if by == "swaps" else sum(abs(a - b) for a, b in pairs) // bin_width * bin_width
        groups[key].append(_error_column(r))
    return _means(groups)


def duplication_curve(name: str, excluded: Iterable[int] = ()) -> dict[int, float]:
    """Mean top-1 error per number of duplicated blocks k, over the authors' runs that duplicate
    none of ``excluded`` (0-based)."""
    design = _design(name, "duplication")
    skip = set(excluded)
    groups: dict[int, list[float]] = defaultdict(list)
    for r in _read(f"{design.files}_duplication.csv"):
        if not _blocks(r["blocks_1based"]) & skip:
            groups[int(r["k"])].append(_error_column(r))
    return _means(groups)


def _blocks_word(blocks: Iterable[int]) -> str:
    return ", ".join(map(str, sorted(blocks)))


def comparable(name: str, protocol: LesionProtocol, analysis: str) -> str | None:
    """None when the authors' runs for ``analysis`` can be filtered to exactly the run's
    ``protocol`` (``protocol_curve`` then gives the curve), else the reason in a few words."""
    if analysis not in ANALYSES:
        raise ValueError(f"unknown lesion analysis '{analysis}' (choose from {', '.join(ANALYSES)})")
    design = _design(name)
    if analysis not in design.analyses:
        return f"the authors ran no {analysis.replace('_', ' ')} on {name}"
    if protocol.family != design.family or protocol.num_blocks != design.num_blocks:
        return (
            f"the run's network ({protocol.family}, {protocol.num_blocks} blocks) is not the "
            f"authors' ({design.family}, {design.num_blocks} blocks)"
        )
    if analysis == "reorder":
        moved = {i for lo, hi in protocol.reorder_ranges for i in range(lo, hi + 1)}
        allowed = {i for lo, hi in design.reorder_ranges for i in range(lo, hi + 1)}
        if not protocol.reorder_ranges:
            return "the run reorders no blocks"
        if moved & design.stage_firsts:
            return "the run reorders first blocks of stages, which the authors never did"
        if moved - allowed:
            return f"the run reorders blocks the authors never moved ({_blocks_word(moved - allowed)})"
        if not set(protocol.reorder_ranges) <= set(design.reorder_ranges):
            return "the run's reorder ranges split the authors' ranges, so their runs cannot be filtered to it"
    if analysis == "duplication":
        extra = set(protocol.duplication) & design.never_duplicated
        if extra & design.stage_firsts:
            return "the run duplicates first blocks of stages, which the authors never did"
        if extra:
            return f"the run duplicates blocks the authors never duplicated ({_blocks_word(extra)})"
    if analysis != "single_deletion" and not protocol_curve(name, protocol, analysis):
        return "none of the authors' runs spares the blocks this run leaves out"
    return None


def protocol_curve(name: str, protocol: LesionProtocol, analysis: str, by: str = "swaps") -> dict[int, float]:
    """The authors' curve for ``analysis`` filtered to ``protocol`` (check ``comparable`` first):
    mean error per k (deletion, duplication) or per swaps / displacement (reorder, ``by``)."""
    every = range(protocol.num_blocks)
    if analysis == "multi_deletion":
        return multi_deletion_curve(name, set(every) - set(protocol.multi_deletion))
    if analysis == "duplication":
        return duplication_curve(name, set(every) - set(protocol.duplication))
    if analysis == "reorder":
        return reorder_curve(name, by, protocol.reorder_ranges)
    raise ValueError(f"no curve by k for '{analysis}' (single deletion: use single_deletion)")


@dataclass(frozen=True)
class Overlay:
    """The paper's curve to draw beside a run's, or why there is none.

    ``curve``: the authors' errors (a list by block for single deletion, else a dict by k, swaps
    or displacement), None when left off; ``label``: what it is, for the legend; ``note``: why
    it is left off (empty when drawn); ``baseline``: the authors' intact error, if published.
    """

    curve: list[float] | dict[int, float] | None
    label: str = ""
    note: str = ""
    baseline: float | None = None

    def as_record(self) -> dict[str, str | None]:
        """For ``analysis.json``: what the run was compared with, or why not."""
        return {"compared_with": self.label or None, "left_off": self.note or None}


def overlay(
    name: str | None, analysis: str, protocol: LesionProtocol, model: Mapping[str, object], data: str,
    by: str = "swaps", bin_width: int = 1,
) -> Overlay | None:
    """The authors' curve for ``analysis`` of a run, like for like: drawn only when the run's
    network and data (``model_mismatch``) and its lesion protocol (``comparable``) are the
    authors', and then filtered with the run's own eligibility rules. None without a reference
    (``name`` None)."""
    if name is None:
        return None
    reason = model_mismatch(name, model, data) or comparable(name, protocol, analysis)
    if reason is not None:
        return Overlay(None, note=f"paper overlay left off: {reason}")
    label = f"Veit et al. 2016: {_design(name).label}, {protocol.describe()}"
    if analysis == "single_deletion":
        return Overlay(single_deletion(name), label, baseline=baseline(name))
    if analysis == "reorder" and by == "displacement":
        return Overlay(reorder_curve(name, by, protocol.reorder_ranges, bin_width), label)
    return Overlay(protocol_curve(name, protocol, analysis, by), label)

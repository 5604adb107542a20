"""Which blocks the random lesions may touch: the authors' rules per model family, as data.

Veit et al. (2016, ``lesion-study.py`` and their released runs) leave out the first block of
every stage in random lesions: their multi-deletion plots drop every run that deletes one
(CIFAR-10 ResNet-110, 1-based: 1, 19, 37; ImageNet ResNet-200: 1, 4, 28, 64), duplication never
picks one, and reordering swaps blocks only inside a stage minus its first block (CIFAR: every
stage; ImageNet: stages 2 and 3 only). ``PROTOCOLS`` states these rules once per family;
``resolve_protocol`` turns them, with the overrides of the config section ``analysis.protocol``,
into concrete 0-based block lists for one model.

Whatever the override, a block that changes the tensor's shape is never reordered or duplicated
(it cannot run anywhere else, nor twice), and a reorder range never spans a shape change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from resens.analysis.variants import can_delete
from resens.errors import ConfigError
from resens.models import stage_of_blocks


@dataclass(frozen=True)
class Rules:
    """One family's rules.

    ``exclude``: blocks random lesions never touch, ``"stage_first"`` (the first block of every
    stage) or ``"none"``. ``reorder_stages``: stages whose blocks may trade places, ``"all"`` or
    ``"inner"`` (every stage but the first and the last).
    """

    exclude: str
    reorder_stages: str


PROTOCOLS: dict[str, Rules] = {
    "cifar": Rules(exclude="stage_first", reorder_stages="all"),
    "imagenet": Rules(exclude="stage_first", reorder_stages="inner"),
    # Vision transformers (resens.models.adapters.timm): every unit, attention or MLP, keeps the
    # token shape and there are no stages, so no unit is set apart and any two may trade places.
    "vit": Rules(exclude="none", reorder_stages="all"),
}


@dataclass(frozen=True)
class LesionProtocol:
    """The blocks (0-based, ascending) each lesion analysis may touch in one model.

    - ``single``: blocks single deletion deletes (every residual block; a plain block only where
      it keeps the shape).
    - ``multi_deletion``: blocks random multi-block deletion draws from.
    - ``reorder_ranges``: inclusive ``(lo, hi)`` position ranges a swap draws its pair inside.
    - ``duplication``: blocks random duplication draws from (never a shape-changing one).
    - ``excluded``: blocks no random lesion touches; ``stage_firsts``: the first block of each
      stage; ``reorder_stages``: the stages ``reorder_ranges`` come from.
    - ``is_default``: the lists equal the family's rule, the authors' protocol.
    - ``changes``: how the lists differ from that rule, in words (empty when default).
    """

    family: str
    num_blocks: int
    single: tuple[int, ...]
    multi_deletion: tuple[int, ...]
    reorder_ranges: tuple[tuple[int, int], ...]
    duplication: tuple[int, ...]
    excluded: tuple[int, ...]
    stage_firsts: tuple[int, ...]
    reorder_stages: tuple[int, ...]
    is_default: bool
    changes: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short label for plots and logs."""
        if self.is_default:
            return "authors' protocol"
        return "custom protocol: " + "; ".join(self.changes)


def _stage_lists(model: nn.Module) -> tuple[list[int], list[int]]:
    stages = stage_of_blocks(model)
    firsts = [i for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    return stages, firsts


def _default(rules: Rules, num_stages: int, firsts: Sequence[int]) -> tuple[list[int], list[int]]:
    excluded = list(firsts) if rules.exclude == "stage_first" else []
    if rules.reorder_stages == "inner":
        stages = list(range(1, num_stages - 1))
    else:
        stages = list(range(num_stages))
    return excluded, stages


def _ranges(model: nn.Module, stages: Sequence[int], chosen: Sequence[int], excluded: set[int]):
    """Maximal runs of consecutive movable blocks (same stage, shape-preserving, not excluded)
    inside each chosen stage; a run of one block has no partner and is dropped."""
    ranges = []
    for stage in chosen:
        run: list[int] = []
        for i in [i for i, s in enumerate(stages) if s == stage] + [None]:
            if i is not None and i not in excluded and not model.blocks[i].downsampling:
                run.append(i)
                continue
            if len(run) >= 2:
                ranges.append((run[0], run[-1]))
            run = []
    return ranges


def _family(model: nn.Module) -> str:
    family = getattr(model, "protocol", None)
    if family not in PROTOCOLS:
        raise ConfigError(
            f"model has no known lesion protocol family ('{family}'; known: {', '.join(PROTOCOLS)})"
        )
    return family


def resolve_protocol(
    model: nn.Module,
    exclude: Sequence[int] | None = None,
    reorder_stages: Sequence[int] | None = None,
) -> LesionProtocol:
    """The model's lesion protocol: its family's rules (``model.protocol``), with overrides.

    ``exclude``: blocks (0-based) no random lesion touches, replacing the rule's (``[]``: touch
    every block; shape-changing blocks still never move or run twice). ``reorder_stages``: stages
    (0-based) whose blocks may trade places, replacing the rule's. ``None`` keeps the rule.
    Raises ``ConfigError`` (one line) for a block or stage out of range, or a stage that has no
    two shape-preserving, non-excluded blocks to reorder.
    """
    family = _family(model)
    n = len(model.blocks)
    stages, firsts = _stage_lists(model)
    num_stages = stages[-1] + 1 if stages else 0
    default_excluded, default_stages = _default(PROTOCOLS[family], num_stages, firsts)

    if exclude is None:
        excluded = sorted(default_excluded)
    else:
        bad = [b for b in exclude if not 0 <= int(b) < n]
        if bad:
            raise ConfigError(f"analysis.protocol.exclude: blocks {bad} out of range 0..{n - 1}")
        excluded = sorted({int(b) for b in exclude})
    if reorder_stages is None:
        chosen = default_stages
    else:
        bad = [s for s in reorder_stages if not 0 <= int(s) < num_stages]
        if bad:
            raise ConfigError(
                f"analysis.protocol.reorder_stages: stages {bad} out of range 0..{num_stages - 1}"
            )
        chosen = sorted({int(s) for s in reorder_stages})

    skip = set(excluded)
    ranges = _ranges(model, stages, chosen, skip)
    if reorder_stages is not None:
        empty = [s for s in chosen if not any(stages[lo] == s for lo, _ in ranges)]
        if empty:
            raise ConfigError(
                f"analysis.protocol.reorder_stages: stages {empty} have no two consecutive "
                "shape-preserving, non-excluded blocks to reorder (shape-changing blocks never move)"
            )
    single = [i for i, b in enumerate(model.blocks) if can_delete(b)]
    multi = [i for i in single if i not in skip]
    duplication = [i for i, b in enumerate(model.blocks) if i not in skip and not b.downsampling]

    default_ranges = _ranges(model, stages, default_stages, set(default_excluded))
    changes = []
    included = sorted(set(default_excluded) - skip)
    if included:
        changes.append(
            "first blocks of stages included" if included == sorted(firsts)
            else f"blocks {', '.join(map(str, included))} included"
        )
    added = sorted(skip - set(default_excluded))
    if added:
        changes.append(f"blocks {', '.join(map(str, added))} excluded")
    if chosen != default_stages:
        changes.append(f"reordering stages {', '.join(map(str, chosen)) or 'none'}")
    is_default = excluded == sorted(default_excluded) and ranges == default_ranges
    return LesionProtocol(
        family=family,
        num_blocks=n,
        single=tuple(single),
        multi_deletion=tuple(multi),
        reorder_ranges=tuple(ranges),
        duplication=tuple(duplication),
        excluded=tuple(excluded),
        stage_firsts=tuple(firsts),
        reorder_stages=tuple(chosen),
        is_default=is_default,
        changes=() if is_default else tuple(changes),
    )

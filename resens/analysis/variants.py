"""Deleting and reordering blocks: the variant engine and its samplers (pure torch).

A *variant* is a list of length n: entry i is the index of the block whose full computation runs
at position i, or ``None`` to run only position i's own shortcut (the block is deleted).
``list(range(n))`` is the intact network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

Variant = Sequence[int | None]
Batches = Iterable[tuple[Tensor, Tensor]]

# Live activations per chunk of variants, in elements (1 GiB of float32).
DEFAULT_BUDGET = 1 << 28
MIN_SUB_BATCH = 32
# Elements of one folded block call.
FOLD_CPU = 1 << 21
FOLD_GPU = 1 << 27


def intact(n: int) -> list[int]:
    return list(range(n))


def deletion_variant(n: int, deleted: Iterable[int]) -> list[int | None]:
    """The variant that deletes ``deleted`` (0-based) and keeps every other block in place."""
    gone = set(deleted)
    if any(not 0 <= b < n for b in gone):
        raise ValueError(f"block index out of range 0..{n - 1}: {sorted(gone)}")
    return [None if i in gone else i for i in range(n)]


def can_delete(block: nn.Module) -> bool:
    """A residual block always can (its shortcut stays); a plain block only where it keeps the shape."""
    return block.shortcut is not None or not block.downsampling


def apply_position(model: nn.Module, position: int, op: int | None, x: Tensor) -> Tensor:
    """Run block ``op`` at ``position``, or, for ``None``, position's own shortcut (then ``post``)."""
    if op is not None:
        return model.blocks[op](x)
    block = model.blocks[position]
    if block.shortcut is None:
        if block.downsampling:
            raise ValueError(f"block {position} of a plain network changes the shape and cannot be deleted")
        return x
    return block.post(block.shortcut(x))


def _check_variants(variants: Sequence[Variant], n: int) -> None:
    for v in variants:
        if len(v) != n:
            raise ValueError(f"a variant must have one entry per block ({n}), got {len(v)}")
        if any(op is not None and not 0 <= op < n for op in v):
            raise ValueError(f"variant entries must be block indices 0..{n - 1} or None: {list(v)}")


def _wrong_per_variant(
    model: nn.Module, h: Tensor, y: Tensor, variants: Sequence[Variant], fold: int
) -> list[int]:
    """Errors of each variant on one batch, sharing every common prefix and folding the variants
    that run the same block at the same position into batched calls of up to ``fold`` elements."""
    batch = h.shape[0]
    groups: list[tuple[Tensor, list[int]]] = [(h, list(range(len(variants))))]
    for position in range(len(model.blocks)):
        by_op: dict[int | None, list[tuple[Tensor, list[int]]]] = defaultdict(list)
        for act, ids in groups:
            split: dict[int | None, list[int]] = defaultdict(list)
            for v in ids:
                split[variants[v][position]].append(v)
            for op, vs in split.items():
                by_op[op].append((act, vs))
        groups = []
        for op, items in by_op.items():
            per_call = max(1, fold // items[0][0].numel())
            for start in range(0, len(items), per_call):
                part = items[start : start + per_call]
                x = part[0][0] if len(part) == 1 else torch.cat([a for a, _ in part])
                try:
                    out = apply_position(model, position, op, x)
                except RuntimeError as err:
                    raise ValueError(
                        f"block {op} cannot run at position {position} (shape mismatch): {err}"
                    ) from None
                groups.extend(zip(out.split(batch), (vs for _, vs in part)))
    wrong = [0] * len(variants)
    for act, ids in groups:
        w = int((model.head(act).argmax(1) != y).sum())
        for v in ids:
            wrong[v] = w
    return wrong


@torch.no_grad()
def count_variant_errors(
    model: nn.Module,
    batches: Batches,
    variants: Sequence[Variant],
    budget: int = DEFAULT_BUDGET,
    progress: Callable[[int], None] | None = None,
    fold: int | None = None,
) -> tuple[Tensor, int]:
    """Misclassified samples of each variant over ``batches`` and the number of samples.

    Returns ``(wrong [V] int64, total)``: integer counts, so shards of a data set (DDP ranks)
    add up exactly. Runs in eval mode and restores the model's mode. ``progress(k)`` is called
    after each batch with its number of samples. ``fold`` caps the elements of one batched call:
    on a GPU large calls amortise kernel launches; on a CPU they fall out of the caches, so the
    default there is small (prefix sharing alone then does the work).
    """
    n = len(model.blocks)
    variants = [list(v) for v in variants]
    _check_variants(variants, n)
    # Sorting puts variants with long common prefixes in the same chunk.
    order = sorted(range(len(variants)), key=lambda v: [(-1 if op is None else op) for op in variants[v]])
    device = next(model.parameters()).device
    if fold is None:
        fold = FOLD_CPU if device.type == "cpu" else FOLD_GPU
    was_training = model.training
    model.eval()
    wrong = torch.zeros(len(variants), dtype=torch.int64)
    total = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            h = model.stem(x)
            # Live memory ~ variants × sub-batch × activation (× 4 for bottleneck expansion and
            # the folded copies): cut the batch rather than the variants, so prefixes stay shared.
            per_sample = 4 * h[0].numel()
            per_chunk = max(1, budget // (per_sample * min(len(h), MIN_SUB_BATCH)))
            for start in range(0, len(order), per_chunk):
                ids = order[start : start + per_chunk]
                sub = max(1, budget // (per_sample * len(ids)))
                for hs, ys in zip(h.split(sub), y.split(sub)):
                    counts = _wrong_per_variant(model, hs, ys, [variants[v] for v in ids], fold)
                    wrong[ids] += torch.tensor(counts)
            total += y.shape[0]
            if progress is not None:
                progress(y.shape[0])
    finally:
        model.train(was_training)
    return wrong, total


def evaluate_variants(model: nn.Module, batches: Batches, variants: Sequence[Variant], **kwargs) -> Tensor:
    """Top-1 error (0..1) of each variant over ``batches`` of ``(x, y)``, in eval mode. ``[V]``."""
    wrong, total = count_variant_errors(model, batches, variants, **kwargs)
    if total == 0:
        raise ValueError("evaluate_variants got no data")
    return wrong.double() / total


@torch.no_grad()
def evaluate_variants_naive(model: nn.Module, batches: Batches, variants: Sequence[Variant]) -> Tensor:
    """Reference: a full forward pass per variant and batch, nothing shared."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wrong, total = torch.zeros(len(variants), dtype=torch.int64), 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            for v, variant in enumerate(variants):
                h = model.stem(x)
                for position, op in enumerate(variant):
                    h = apply_position(model, position, op, h)
                wrong[v] += int((model.head(h).argmax(1) != y).sum())
            total += y.shape[0]
    finally:
        model.train(was_training)
    return wrong.double() / total


# ----------------------------------------------------------------------------------------------
# Samplers


def deletable_blocks(model: nn.Module, exclude_downsampling: bool = True, exclude: Iterable[int] = ()) -> list[int]:
    """Blocks a random deletion may pick: optionally never one whose shortcut changes the shape,
    and never a plain block that changes it (nothing would be left to run in its place)."""
    skip = set(exclude)
    return [
        i for i, b in enumerate(model.blocks)
        if i not in skip and can_delete(b) and not (exclude_downsampling and b.downsampling)
    ]


def sample_deletions(allowed: Sequence[int], k: int, trials: int, generator: torch.Generator) -> list[list[int]]:
    """``trials`` random sets of ``k`` distinct blocks from ``allowed``, each sorted."""
    if not 0 < k <= len(allowed):
        raise ValueError(f"cannot delete {k} of {len(allowed)} deletable blocks")
    sets = []
    for _ in range(trials):
        pick = torch.randperm(len(allowed), generator=generator)[:k]
        sets.append(sorted(allowed[i] for i in pick.tolist()))
    return sets


def swappable_groups(model: nn.Module, stages: Sequence[int]) -> list[list[int]]:
    """Per stage, the blocks that may trade places: same stage, shape-preserving."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, block in enumerate(model.blocks):
        if not block.downsampling:
            groups[stages[i]].append(i)
    return [g for g in groups.values() if len(g) >= 2]


def sample_swaps(
    n: int, groups: Sequence[Sequence[int]], swaps: int, generator: torch.Generator
) -> tuple[list[int], list[tuple[int, int]]]:
    """Apply ``swaps`` random swaps, each of two distinct positions drawn uniformly among all
    same-group pairs, to the intact order. Returns ``(order, pairs)``: ``order[i]`` is the block
    at position i. As in the authors' runs, pairs may share a block or undo each other."""
    pairs_pool = [(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]]
    if not pairs_pool:
        raise ValueError("no two blocks can trade places in this model")
    order = list(range(n))
    pairs = []
    for _ in range(swaps):
        a, b = pairs_pool[int(torch.randint(len(pairs_pool), (), generator=generator))]
        order[a], order[b] = order[b], order[a]
        pairs.append((a, b))
    return order, pairs


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's rank correlation between positions 0..n-1 and the blocks found there (no ties)."""
    n = len(order)
    if n < 2:
        return 1.0
    o = torch.as_tensor(order)
    diff = torch.sign(o[None, :] - o[:, None])
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return float(diff[upper].sum()) / (n * (n - 1) / 2)

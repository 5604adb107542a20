"""Deleting, reordering and duplicating blocks: the variant engine and its samplers (pure torch).

A *variant* is a sequence, of any length, of what runs at each position: an int ``j`` runs block
j in full; ``None`` at index i runs only block i's own shortcut (then its ``post``), i.e. block i
is deleted, so it needs ``i < n``. ``list(range(n))`` is the intact network; a deletion keeps
length n; a reordering is a permutation of ``range(n)``; a duplication runs a block twice in a
row and so is longer than n. The head reads whatever the last position left.

The samplers draw the random lesions as the authors did (Veit et al. 2016, ``lesion-study.py``),
from the blocks and ranges a ``resens.analysis.protocol.LesionProtocol`` allows; each takes a
``torch.Generator``, so a seed reproduces the draws.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from resens.analysis.modes import eval_mode
from resens.errors import AnalysisOutOfMemory

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


def duplication_variant(n: int, blocks: Iterable[int]) -> list[int]:
    """The variant that runs each of ``blocks`` (0-based, distinct) twice in a row and every
    other block once, in place: length ``n + len(blocks)``."""
    blocks = list(blocks)
    twice = set(blocks)
    if len(twice) != len(blocks) or any(not 0 <= b < n for b in twice):
        raise ValueError(f"duplicated blocks must be distinct indices 0..{n - 1}: {blocks}")
    return [j for i in range(n) for j in ((i, i) if i in twice else (i,))]


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
        if any(op is not None and not 0 <= op < n for op in v):
            raise ValueError(f"variant entries must be block indices 0..{n - 1} or None: {list(v)}")
        if any(op is None for op in v[n:]):
            raise ValueError(f"None (a deleted block) needs a position below {n}: {list(v)}")


def _is_oom(err: RuntimeError) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; other allocators a RuntimeError that says so."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def _run(what: str, fn: Callable[..., Tensor], *args) -> Tensor:
    """``fn(*args)``; a RuntimeError other than out-of-memory is a shape mismatch named by ``what``."""
    try:
        return fn(*args)
    except RuntimeError as err:
        if _is_oom(err):
            raise
        raise ValueError(f"{what} (shape mismatch): {err}") from None


def _wrong_per_variant(
    model: nn.Module, h: Tensor, y: Tensor, variants: Sequence[Variant], fold: int
) -> list[int]:
    """Errors of each variant on one batch, sharing every common prefix and folding the variants
    that run the same block at the same position into batched calls of up to ``fold`` elements.
    A variant that ends at a position runs the head on the activation its group holds there."""
    batch = h.shape[0]
    wrong = [0] * len(variants)

    def finish(act: Tensor, ids: list[int], position: int) -> None:
        logits = _run(f"the head cannot run after position {position}", model.head, act)
        w = int((logits.argmax(1) != y).sum())
        for v in ids:
            wrong[v] = w

    groups: list[tuple[Tensor, list[int]]] = [(h, list(range(len(variants))))]
    position = 0
    while groups:
        by_op: dict[int | None, list[tuple[Tensor, list[int]]]] = defaultdict(list)
        for act, ids in groups:
            done = [v for v in ids if len(variants[v]) == position]
            if done:
                finish(act, done, position)
            split: dict[int | None, list[int]] = defaultdict(list)
            for v in ids:
                if len(variants[v]) > position:
                    split[variants[v][position]].append(v)
            for op, vs in split.items():
                by_op[op].append((act, vs))
        groups = []
        for op, items in by_op.items():
            per_call = max(1, fold // items[0][0].numel())
            for start in range(0, len(items), per_call):
                part = items[start : start + per_call]
                x = part[0][0] if len(part) == 1 else torch.cat([a for a, _ in part])
                out = _run(
                    f"block {op} cannot run at position {position}", apply_position, model, position, op, x
                )
                groups.extend(zip(out.split(batch), (vs for _, vs in part)))
        position += 1
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

    ``variants`` may have different lengths (deletions, reorders and duplications in one call).
    Returns ``(wrong [V] int64, total)``: integer counts, so shards of a data set (DDP ranks)
    add up exactly. Runs in eval mode and restores every module's mode. ``progress(k)`` is called
    after each batch with its number of samples. ``fold`` caps the elements of one batched call:
    on a GPU large calls amortise kernel launches; on a CPU they fall out of the caches, so the
    default there is small (prefix sharing alone then does the work). Running out of device
    memory raises ``AnalysisOutOfMemory``; a block that cannot take its input, ``ValueError``.
    """
    n = len(model.blocks)
    variants = [list(v) for v in variants]
    _check_variants(variants, n)
    # Sorting puts variants with long common prefixes in the same chunk.
    order = sorted(range(len(variants)), key=lambda v: [(-1 if op is None else op) for op in variants[v]])
    device = next(model.parameters()).device
    if fold is None:
        fold = FOLD_CPU if device.type == "cpu" else FOLD_GPU
    wrong = torch.zeros(len(variants), dtype=torch.int64)
    total = 0
    with eval_mode(model):
        for x, y in batches:
            try:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                h = model.stem(x)
                # Live memory ~ variants × sub-batch × activation (× 4 for bottleneck expansion
                # and the folded copies): cut the batch rather than the variants, so prefixes
                # stay shared.
                per_sample = 4 * h[0].numel()
                per_chunk = max(1, budget // (per_sample * min(len(h), MIN_SUB_BATCH)))
                for start in range(0, len(order), per_chunk):
                    ids = order[start : start + per_chunk]
                    sub = max(1, budget // (per_sample * len(ids)))
                    for hs, ys in zip(h.split(sub), y.split(sub)):
                        counts = _wrong_per_variant(model, hs, ys, [variants[v] for v in ids], fold)
                        wrong[ids] += torch.tensor(counts)
            except RuntimeError as err:
                if not _is_oom(err):
                    raise
                raise AnalysisOutOfMemory(
                    f"out of memory on {device} evaluating {len(variants)} variants at batch size "
                    f"{len(x)}: lower data.eval_batch_size"
                ) from err
            total += y.shape[0]
            if progress is not None:
                progress(y.shape[0])
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
    _check_variants(variants, len(model.blocks))
    wrong, total = torch.zeros(len(variants), dtype=torch.int64), 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            for v, variant in enumerate(variants):
                h = model.stem(x)
                for position, op in enumerate(variant):
                    h = apply_position(model, position, op, h)
                wrong[v] += int((model.head(h).argmax(1) != y).sum())
            total += y.shape[0]
    return wrong.double() / total


# ----------------------------------------------------------------------------------------------
# Samplers (the authors' procedures; block indices 0-based)


def _distinct_sets(allowed: Sequence[int], k: int, trials: int, g: torch.Generator, what: str) -> list[list[int]]:
    if len(set(allowed)) != len(allowed):
        raise ValueError(f"the blocks to {what} must be distinct: {list(allowed)}")
    if not 0 < k <= len(allowed):
        raise ValueError(f"cannot {what} {k} of {len(allowed)} eligible blocks")
    return [
        sorted(allowed[i] for i in torch.randperm(len(allowed), generator=g)[:k].tolist())
        for _ in range(trials)
    ]


def sample_deletions(allowed: Sequence[int], k: int, trials: int, generator: torch.Generator) -> list[list[int]]:
    """``trials`` sets of ``k`` distinct blocks, each uniform among the k-subsets of ``allowed``,
    each sorted. The authors drew k distinct blocks from all blocks and plotted only the runs
    that spare the excluded ones: the same distribution."""
    return _distinct_sets(allowed, k, trials, generator, "delete")


def sample_duplications(allowed: Sequence[int], k: int, trials: int, generator: torch.Generator) -> list[list[int]]:
    """``trials`` sets of ``k`` distinct blocks to run twice, uniform among the k-subsets of
    ``allowed`` (the authors': distinct blocks drawn uniformly outside the excluded ones)."""
    return _distinct_sets(allowed, k, trials, generator, "duplicate")


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform on ``lo..hi`` inclusive."""
    return lo + int(torch.randint(hi - lo + 1, (), generator=g))


def sample_swaps(
    ranges: Sequence[tuple[int, int]], swaps: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """One reordering trial: ``swaps`` distinct ordered pairs of positions, as the authors drew them.

    Until the trial holds ``swaps`` pairs: pick a range uniformly (whatever its size), then a and
    b independently uniformly in it (inclusive); keep (a, b) if a != b and it is new. So a pair
    may share a block with another, and (a, b) and (b, a) may both occur. Returns the pairs in
    the order drawn; ``apply_swaps`` applies them in that order.
    """
    ranges = [(int(lo), int(hi)) for lo, hi in ranges]
    if any(not 0 <= lo < hi for lo, hi in ranges):
        raise ValueError(f"each reorder range needs 0 <= lo < hi (two blocks at least): {ranges}")
    possible = sum((hi - lo + 1) * (hi - lo) for lo, hi in ranges)
    if swaps > possible:
        raise ValueError(f"cannot draw {swaps} distinct swaps: the ranges {ranges} hold {possible}")
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(pairs) < swaps:
        lo, hi = ranges[int(torch.randint(len(ranges), (), generator=generator))]
        a, b = _randint(lo, hi, generator), _randint(lo, hi, generator)
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    return pairs


def apply_swaps(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """The order after swapping the contents of positions a and b for each pair, in turn:
    ``order[i]`` is the block that runs at position i."""
    order = list(range(n))
    for a, b in pairs:
        if not (0 <= a < n and 0 <= b < n):
            raise ValueError(f"swap ({a}, {b}) out of range 0..{n - 1}")
        order[a], order[b] = order[b], order[a]
    return order


def total_displacement(pairs: Iterable[tuple[int, int]]) -> int:
    """Total distance the blocks were moved, ``Σ |a - b|`` over the pairs (in positions)."""
    return sum(abs(a - b) for a, b in pairs)


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's rank correlation between positions 0..n-1 and the blocks found there (no ties)."""
    n = len(order)
    if n < 2:
        return 1.0
    o = torch.as_tensor(order)
    diff = torch.sign(o[None, :] - o[:, None])
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return float(diff[upper].sum()) / (n * (n - 1) / 2)

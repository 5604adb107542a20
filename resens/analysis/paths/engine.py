"""The gradient each path carries, measured for many paths at once (pure torch).

Gradient carried by a path (Veit et al. 2016, Sec. 4.2): run the intact network forward once and
record each block's input h_i; then the path's gradient is the chain product of vector-Jacobian
products from the loss back to the input x, taking at block i the VJP of ``post`` followed by that
of ``survival_prob * branch`` (path[i] True) or of ``shortcut`` (False), all evaluated at the
recorded intact activations::

    g_p = J_stem^T J_0(p_0)^T ... J_{n-1}(p_{n-1})^T dL/dh_n,
    J_i(True) = J_post_i · survival_prob_i · J_branch_i(h_i),   J_i(False) = J_post_i · J_shortcut_i(h_i)

with L the mean cross-entropy of the batch. The 2^n path gradients add up to the network's input
gradient, for pre- and post-activation blocks alike: a block's Jacobian is
J_post (J_shortcut + p J_branch), and the post's ReLU mask multiplies both of its paths.

Two approximations, both standard in the paper's setting and both exact for pre-activation
networks with BatchNorm in eval mode: each path's gradient is taken at the intact network's
activations (the ReLU masks and the ``post`` of the full network, not of a network made of that
path alone); and in a post-activation network deleting a block does not remove exactly its paths
from the forward pass (the ReLU after the addition couples the two terms), so the forward
unravelling into paths, unlike the gradient's, is approximate there.

Everything runs in eval mode (BatchNorm running statistics) and leaves the model as it was.

How :func:`path_gradient_norms` is fast (its reference, :func:`path_gradient_norms_naive`, runs a
forward and a backward pass per path):

- one forward pass per batch turns the stem and every branch, shortcut and post into its VJP at
  the intact activations (:mod:`resens.analysis.paths.vjp`); no weight gradient is ever
  computed. A callable without a fast VJP falls back to autograd: that is warned about, once per
  layer type, and counted (the ``fallbacks`` arguments and field);
- the backward starts at the output, where all paths share one cotangent, and splits a group of
  paths only where its paths part ways, so paths with a common suffix share their work;
- all the cotangents that cross a block's branch are one batched VJP (eval-mode BatchNorm keeps
  samples independent), in reused buffers, a chunk of paths at a time within a memory budget.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resens.analysis.modes import eval_mode
from resens.analysis.paths.counting import sample_paths
from resens.analysis.paths.vjp import _ALL, _linearize, _Recompute, _Tape, _Vjp

__all__ = [
    "DEFAULT_BUDGET",
    "PathGradientsByLength",
    "path_gradient_by_length",
    "path_gradient_norms",
    "path_gradient_norms_naive",
    "path_input_gradients",
]

Batches = Iterable[tuple[Tensor, Tensor]]
Progress = Callable[[int], None]

# Live cotangent elements per chunk of paths (1 GiB of float32); bounds the memory of the backward.
DEFAULT_BUDGET = 1 << 28


def _check_inputs(model: nn.Module, paths: Tensor) -> Tensor:
    n = len(model.blocks)
    if paths.dim() != 2 or paths.shape[1] != n:
        raise ValueError(f"paths must be a bool tensor [P, {n}], got shape {tuple(paths.shape)}")
    paths = paths.to("cpu", torch.bool)
    plain = [i for i, b in enumerate(model.blocks) if b.shortcut is None]
    if plain and not bool(paths[:, plain].all()):
        bad = sorted({plain[j] for j in (~paths[:, plain]).nonzero()[:, 1].tolist()})
        raise ValueError(f"blocks {bad} have no shortcut (plain blocks): a path must take their branch")
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_var is None:
            raise ValueError("path gradients need BatchNorm running statistics (track_running_stats)")
    return paths


def _loss_cotangent(model: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    """d(mean cross-entropy)/d(last block's output), [B, ...]."""
    h = h.detach().requires_grad_()
    with torch.enable_grad():
        loss = F.cross_entropy(model.head(h), y)
        (g,) = torch.autograd.grad(loss, h)
    return g


@dataclass
class _Linearized:
    """The intact forward of one batch, kept as VJPs (None = identity)."""

    stem: _Vjp | None
    branch: list[_Vjp | None]
    shortcut: list[_Vjp | None]
    post: list[_Vjp | None]
    input_shape: torch.Size  # of the network's input x
    input_shapes: list[torch.Size]  # of each block's input, [B, ...]
    output_cotangent: Tensor  # d loss / d (last block's output), [B, ...]
    fallbacks: dict[str, list[str]]  # layer type (or callable) -> where autograd stands in

    @property
    def largest(self) -> int:
        """Elements of the largest cotangent of one path."""
        shapes = [self.input_shape, *self.input_shapes, self.output_cotangent.shape]
        return max(math.prod(s) for s in shapes)


def _linearize_model(model: nn.Module, x: Tensor, y: Tensor, channels_last: bool) -> _Linearized:
    tape = _Tape(model, channels_last)
    fallbacks: dict[str, list[str]] = {}

    def linearize(fn: Callable[[Tensor], Tensor], h: Tensor, where: str,
                  scale: float = 1.0) -> tuple[Tensor, _Vjp | None]:
        out, vjp = _linearize(tape, fn, h, scale)
        if isinstance(vjp, _Recompute):
            for reason in vjp.reasons:
                fallbacks.setdefault(reason, []).append(where)
        return out, vjp

    try:
        with torch.no_grad():
            h, stem = linearize(model.stem, x, "stem")
            branch, shortcut, post, shapes = [], [], [], []
            for i, block in enumerate(model.blocks):
                shapes.append(h.shape)
                b, vb = linearize(block.branch, h, f"blocks.{i}.branch", block.survival_prob)
                if block.shortcut is None:
                    z, vs = b, None
                else:
                    s, vs = linearize(block.shortcut, h, f"blocks.{i}.shortcut")
                    z = s + block.survival_prob * b
                h, vp = linearize(block.post, z, f"blocks.{i}.post")
                branch.append(vb)
                shortcut.append(vs)
                post.append(vp)
    finally:
        tape.close()
    return _Linearized(stem, branch, shortcut, post, x.shape, shapes, _loss_cotangent(model, h, y), fallbacks)


def _report_fallbacks(found: dict[str, list[str]], counts: dict[str, int] | None) -> None:
    """One warning per layer type that autograd stands in for, and the count per layer type."""
    for reason, where in found.items():
        warnings.warn(
            f"path gradients: no fast VJP for {reason} in {', '.join(where)}; using autograd (slower)",
            stacklevel=4,
        )
        if counts is not None:
            counts[reason] = counts.get(reason, 0) + len(where)


def _suffix_order(paths: Tensor) -> list[int]:
    """Paths sorted so that those agreeing on the last blocks are neighbours (they share work)."""
    rows = paths.flip(1).tolist()
    return sorted(range(len(rows)), key=rows.__getitem__)


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Row pairs src[j] -> dst[j] as maximal runs ``(src start, dst start, length)`` in which both
    sides advance together."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _batched_rows(device: torch.device) -> bool:
    """Gather scattered rows into one large VJP call (GPUs), rather than run the VJP on views of
    the rows a slab at a time (CPUs)."""
    return device.type != "cpu"


class _Workspace:
    """Two flat buffers of ``rows`` cotangents each, reused by every block and chunk: the groups
    at the current block, and their children after a block that changes the shape.

    On the CPU the speed is decided by memory, not arithmetic: oneDNN's transposed convolutions
    run several times faster on channels-last tensors, a convolution whose input and output fit
    in cache runs about a third faster than one streaming from memory, and every fresh tensor over
    glibc's mmap threshold (32 MiB) is page-faulted in anew. So there cotangents live
    channels-last in these reused buffers and VJPs run on views of them, slab by slab of at most
    ``CPU_SLAB`` elements (a few rows, or part of one row's batch), never copying rows. On a GPU,
    scattered rows are gathered so that each VJP is one large batched call.
    """

    CPU_SLAB = 1 << 20  # elements per slab (4 MiB of float32)

    def __init__(self, rows: int, numel: int, like: Tensor) -> None:
        self.channels_last = like.device.type == "cpu"
        self.batched = _batched_rows(like.device)
        self.cur, self.nxt = like.new_empty(rows * numel), like.new_empty(rows * numel)

    def view(self, buf: Tensor, m: int, shape: torch.Size) -> Tensor:
        """The first m cotangents of ``buf`` as ``[m, *shape]``."""
        size = (m, *shape)
        if self.channels_last and len(shape) == 4:
            b, c, h, w = shape
            return buf.as_strided(size, (b * c * h * w, c * h * w, 1, w * c, c))
        return buf[: m * math.prod(shape)].view(size)

    def map(self, vjp: _Vjp | None, u: Tensor, src: list[int], out: Tensor, dst: list[int]) -> None:
        """``out[dst[j]] = vjp(u[src[j]])`` for all j (None: the identity). A destination row may
        be its own source, never another pair's source."""
        runs = _runs(src, dst)
        if self.batched and runs:
            if len(runs) == 1:
                s, d, length = runs[0]
                _into(vjp, u[s : s + length], out[d : d + length], _ALL)
                return
            rows = u.index_select(0, _index(src, u.device))
            if vjp is not None:
                rows = vjp(rows)
            out.index_copy_(0, _index(dst, u.device), rows)
            return
        row, sample = math.prod(u.shape[1:]), math.prod(u.shape[2:])
        rows_per_slab = max(1, self.CPU_SLAB // row)
        samples_per_slab = u.shape[1] if rows_per_slab > 1 else max(1, self.CPU_SLAB // sample)
        for s, d, length in runs:
            for k in range(0, length, rows_per_slab):
                n = min(rows_per_slab, length - k)
                for a in range(0, u.shape[1], samples_per_slab):
                    cols = slice(a, a + samples_per_slab)
                    _into(vjp, u[s + k : s + k + n, cols], out[d + k : d + k + n, cols], cols)


def _index(rows: list[int], device: torch.device) -> Tensor:
    """Row indices on the device without stalling it: a copy from pageable memory would wait for
    the work queued so far, so the bookkeeping of the next block could not overlap it."""
    index = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _into(vjp: _Vjp | None, u: Tensor, out: Tensor, samples: slice) -> None:
    if vjp is not None:
        vjp.into(u, out, samples)
    elif u.data_ptr() != out.data_ptr():
        out.copy_(u)


def _chunk_gradients(lin: _Linearized, chunk: Tensor, ws: _Workspace) -> tuple[Tensor, Tensor]:
    """Input gradients of the paths ``chunk`` [p, n], deduplicated: ``(grads [m, *x.shape],
    owner [p])``, path j's gradient being ``grads[owner[j]]``. ``grads`` lives in the workspace.

    Backward from the output, a group is the set of paths that agree on every block seen so far;
    it carries one cotangent, a row of the workspace. At block i each group splits into the paths
    taking the branch and those taking the shortcut, and each VJP runs once for all rows on its
    side, folded into the batch dimension. Across an identity shortcut a group keeps its row; so
    does a group all of whose paths take the branch (its VJP overwrites the row), and only a group
    that splits both ways claims a new row. The bookkeeping stays on the CPU.
    """
    g = ws.view(ws.cur, 1, lin.output_cotangent.shape)
    g[0].copy_(lin.output_cotangent)
    owner = torch.zeros(len(chunk), dtype=torch.long)  # path -> row
    for i in reversed(range(chunk.shape[1])):
        top = len(g)
        if lin.post[i] is not None:
            ws.map(lin.post[i], g, list(range(top)), g, list(range(top)))
        keys, inverse = torch.unique(owner * 2 + chunk[:, i].long(), return_inverse=True)
        # keys = 2 row + choice, sorted: a row that splits both ways gives 2r, 2r+1 in a row.
        new_row: list[int] = []
        branch_src: list[int] = []
        branch_dst: list[int] = []
        if lin.shortcut[i] is None:  # identity (plain blocks never reach here: paths checked)
            prev = -1
            for key in keys.tolist():
                row, takes_branch = divmod(key, 2)
                if takes_branch and prev == key - 1:
                    new_row.append(top)
                    top += 1
                else:
                    new_row.append(row)
                if takes_branch:
                    branch_src.append(row)
                    branch_dst.append(new_row[-1])
                prev = key
            nxt = ws.view(ws.cur, top, lin.input_shapes[i])
        else:
            shortcut_src: list[int] = []
            shortcut_dst: list[int] = []
            for j, key in enumerate(keys.tolist()):
                row, takes_branch = divmod(key, 2)
                new_row.append(j)
                (branch_src if takes_branch else shortcut_src).append(row)
                (branch_dst if takes_branch else shortcut_dst).append(j)
            nxt = ws.view(ws.nxt, len(keys), lin.input_shapes[i])
            ws.map(lin.shortcut[i], g, shortcut_src, nxt, shortcut_dst)
            ws.cur, ws.nxt = ws.nxt, ws.cur
        if branch_src:
            ws.map(lin.branch[i], g, branch_src, nxt, branch_dst)
        g = nxt
        owner = torch.tensor(new_row)[inverse]
    if lin.stem is None:
        return g, owner
    grads = ws.view(ws.nxt, len(g), lin.input_shape)
    rows = list(range(len(g)))
    ws.map(lin.stem, g, rows, grads, rows)
    return grads, owner


def _path_gradient_chunks(
    model: nn.Module, x: Tensor, y: Tensor, paths: Tensor, chunk_size: int | None, budget: int,
    fallbacks: dict[str, int] | None,
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Yields ``(path indices, grads [m, *x.shape], owner [p])`` chunk by chunk, path
    ``indices[j]`` having gradient ``grads[owner[j]]``; ``grads`` is overwritten by the next chunk.
    Warns about and counts into ``fallbacks`` the callables autograd stands in for."""
    paths = _check_inputs(model, paths)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    channels_last = device.type == "cpu"
    if channels_last and x.dim() == 4:
        # oneDNN's fast layout for the one forward pass too (see _Workspace).
        x = x.contiguous(memory_format=torch.channels_last)
    with eval_mode(model):
        lin = _linearize_model(model, x, y, channels_last)
        _report_fallbacks(lin.fallbacks, fallbacks)
        if chunk_size is None:
            # Two workspace buffers, plus (GPU) gathered rows, the VJP's result and intermediates.
            chunk_size = max(1, budget // (5 * lin.largest))
        order = _suffix_order(paths)
        ws = _Workspace(min(chunk_size, len(order)), lin.largest, lin.output_cotangent)
        for start in range(0, len(order), chunk_size):
            ids = order[start : start + chunk_size]
            grads, owner = _chunk_gradients(lin, paths[ids], ws)
            yield ids, grads, owner


def path_gradient_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    paths: Tensor,
    chunk_size: int | None = None,
    budget: int = DEFAULT_BUDGET,
    progress: Progress | None = None,
    *,
    fallbacks: dict[str, int] | None = None,
) -> Tensor:
    """L2 norm of the gradient of the mean cross-entropy w.r.t. the input batch ``x`` carried by
    each path alone (module docstring). ``[P]`` float64 on the CPU.

    ``x`` [B, C, H, W], ``y`` [B] class indices, ``paths`` [P, n] bool (True = branch). The norm
    is over the whole gradient tensor [B, C, H, W].

    One forward pass records the intact activations as VJPs (transposed convolutions with
    BatchNorm folded in, ReLU masks); the backward then serves many paths at once: paths that
    agree on the blocks nearest the output share their cotangent, and all cotangents that cross a
    block's branch go through one batched VJP. No weight gradient is ever computed. Paths are
    processed ``chunk_size`` at a time (default: as many as ``budget`` cotangent elements allow).
    The model's weights, buffers, ``.grad``, ``requires_grad`` and train/eval flags are unchanged.
    ``progress(k)`` is called after each chunk of k paths.

    A branch, shortcut, post or stem without a fast VJP is differentiated by autograd instead
    (same result, slower), with a warning per layer type; given a dict ``fallbacks``, the number
    of such callables is added to it under each layer type that caused one (or the callable's
    name, e.g. ``<lambda>``): ``{}`` stays empty when everything ran on the fast path.
    """
    norms = torch.empty(len(paths), dtype=torch.float64)
    for ids, grads, owner in _path_gradient_chunks(model, x, y, paths, chunk_size, budget, fallbacks):
        dims = tuple(range(1, grads.dim()))
        per_group = torch.linalg.vector_norm(grads, dim=dims, dtype=torch.float64).cpu()
        norms[ids] = per_group[owner]
        if progress is not None:
            progress(len(ids))
    return norms


def path_input_gradients(
    model: nn.Module, x: Tensor, y: Tensor, paths: Tensor, chunk_size: int | None = None,
    budget: int = DEFAULT_BUDGET, *, fallbacks: dict[str, int] | None = None,
) -> Tensor:
    """The gradient vectors behind :func:`path_gradient_norms` (same arguments):
    ``[P, *x.shape]`` (mind the memory: P copies of the batch)."""
    out = torch.empty(len(paths), *x.shape, dtype=x.dtype, device=next(model.parameters()).device)
    for ids, grads, owner in _path_gradient_chunks(model, x, y, paths, chunk_size, budget, fallbacks):
        out[ids] = grads[owner.to(grads.device)]
    return out


def path_gradient_norms_naive(model: nn.Module, x: Tensor, y: Tensor, paths: Tensor) -> Tensor:
    """Reference for :func:`path_gradient_norms` (same arguments and result): for each path a full
    forward pass in which the unused side of every block is detached, then autograd w.r.t. x."""
    paths = _check_inputs(model, paths)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    norms = torch.empty(len(paths), dtype=torch.float64)
    with eval_mode(model), torch.enable_grad():
        for p, path in enumerate(paths.tolist()):
            xp = x.detach().clone().requires_grad_()
            h = model.stem(xp)
            for block, through_branch in zip(model.blocks, path, strict=True):
                b = block.survival_prob * block.branch(h)
                if block.shortcut is None:
                    z = b
                else:
                    s = block.shortcut(h)
                    z = s.detach() + b if through_branch else s + b.detach()
                h = block.post(z)
            (g,) = torch.autograd.grad(F.cross_entropy(model.head(h), y), xp)
            norms[p] = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    return norms


# ---------------------------------------------------------------------------------------------
# The paper's protocol: gradient norm against path length


@dataclass(frozen=True)
class PathGradientsByLength:
    """Norms measured for each path length: ``norms[j]`` holds the samples of ``lengths[j]``."""

    n: int
    lengths: list[int]
    norms: Tensor  # [L, samples_per_length] float64, in the order drawn
    # Callables autograd stood in for while measuring, per layer type (or callable name), summed
    # over the batches: {} when every batch ran on the fast path.
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> Tensor:
        """Samples per length, ``[L]`` int64."""
        return torch.full((len(self.lengths),), self.norms.shape[1], dtype=torch.int64)

    @property
    def mean(self) -> Tensor:
        """Mean gradient norm per length, ``[L]`` float64."""
        return self.norms.mean(dim=1)

    @property
    def std(self) -> Tensor:
        """Sample standard deviation (n-1) per length, ``[L]`` float64; NaN for one sample."""
        return self.norms.std(dim=1)

    def mean_by_length(self) -> Tensor:
        """Mean norm indexed by length 0..n (NaN where not measured), ``[n+1]``: the input of
        :func:`~resens.analysis.paths.counting.effective_paths`."""
        out = torch.full((self.n + 1,), float("nan"), dtype=torch.float64)
        out[self.lengths] = self.mean
        return out


def path_gradient_by_length(
    model: nn.Module,
    batches: Batches,
    lengths: Sequence[int],
    samples_per_length: int,
    seed: int,
    progress: Progress | None = None,
    chunk_size: int | None = None,
    budget: int = DEFAULT_BUDGET,
    rank: int = 0,
    world: int = 1,
) -> PathGradientsByLength:
    """Veit et al.'s measurement: for each path length k in ``lengths``, ``samples_per_length``
    paths drawn with :func:`~resens.analysis.paths.counting.sample_paths` (k random branches),
    each measured on a batch.

    The samples are spread evenly over ``batches`` (iterable of ``(x, y)``; materialised if it has
    no ``len``): batch j serves its share ``torch.arange(samples_per_length).tensor_split(
    len(batches))[j]`` of the samples of every length, so one forward pass and the shared
    backward serve them all. Batch j draws its paths from its own generator, seeded
    ``seed + 1000 + j``: the result is deterministic given ``seed`` and the batches, whatever the
    number of processes.

    Sharding (DDP): the process of rank ``rank`` among ``world`` measures only the batches j with
    ``j % world == rank``; the columns of ``norms`` belonging to the other batches stay 0, so
    ``mean`` and ``std`` mean something only once the ranks are combined. Summing ``norms`` over the
    ranks (an all-reduce sum) gives exactly the single-process result, and so does summing
    ``fallbacks`` key by key.

    ``progress(k)`` is called as k more paths are measured; ``chunk_size`` and ``budget`` go to
    :func:`path_gradient_norms`.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..world-1 with world >= 1, got rank {rank} of world {world}")
    n = len(model.blocks)
    lengths = [int(k) for k in lengths]
    if not isinstance(batches, Sized):
        batches = list(batches)
    if len(batches) == 0:
        raise ValueError("path_gradient_by_length got no batches")
    parts = torch.arange(samples_per_length).tensor_split(len(batches))
    norms = torch.zeros(len(lengths), samples_per_length, dtype=torch.float64)
    fallbacks: dict[str, int] = {}
    for j, ((x, y), part) in enumerate(zip(batches, parts, strict=True)):
        if len(part) == 0:  # more batches than samples: the empty shares are the last ones
            break
        if j % world != rank:
            continue
        generator = torch.Generator().manual_seed(seed + 1000 + j)
        paths = torch.cat([sample_paths(n, k, len(part), generator) for k in lengths])
        measured = path_gradient_norms(
            model, x, y, paths, chunk_size, budget, progress, fallbacks=fallbacks
        )
        norms[:, int(part[0]) : int(part[-1]) + 1] = measured.view(len(lengths), len(part))
    return PathGradientsByLength(n, lengths, norms, fallbacks)

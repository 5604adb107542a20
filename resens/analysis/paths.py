"""Paths through a residual network: how many of each length, the gradient each one carries, and
which of them matter (pure torch).

A network of n residual blocks unrolls into 2^n paths: at block i a path goes either through the
residual branch or through the shortcut. A path is a bool vector of length n (True = branch), its
length the number of branches it enters. Blocks are numbered from 0.

Gradient carried by a path (Veit et al. 2016, Sec. 4.2): run the intact network forward once and
record each block's input h_i; then the path's gradient is the chain product of vector-Jacobian
products from the loss back to the input x, taking at block i the VJP of ``post`` followed by that
of ``survival_prob * branch`` (path[i] True) or of ``shortcut`` (False), all evaluated at the
recorded intact activations::

    g_p = J_stem^T J_0(p_0)^T ... J_{n-1}(p_{n-1})^T dL/dh_n,
    J_i(True) = J_post_i · survival_prob_i · J_branch_i(h_i),   J_i(False) = J_post_i · J_shortcut_i(h_i)

with L the mean cross-entropy of the batch. Without a nonlinear ``post`` (pre-activation blocks)
the 2^n path gradients add up to the network's input gradient.

Everything runs in eval mode (BatchNorm running statistics) and leaves the model as it was.

How :func:`path_gradient_norms` is fast (its reference, :func:`path_gradient_norms_naive`, runs a
forward and a backward pass per path):

- one forward pass per batch, during which hooks turn every branch, shortcut, post and the stem
  into its VJP at the intact activations: transposed convolutions with the BatchNorm scales
  folded into their weights, ReLU masks, option-A transposes (anything unknown falls back to
  autograd on stacked copies of its input); no weight gradient is ever computed;
- the backward starts at the output, where all paths share one cotangent, and splits a group of
  paths only where its paths part ways, so paths with a common suffix share their work;
- all the cotangents that cross a block's branch are one batched VJP (eval-mode BatchNorm keeps
  samples independent), in reused buffers, a chunk of paths at a time within a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from resens.models.blocks import OptionAShortcut

__all__ = [
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

Batches = Iterable[tuple[Tensor, Tensor]]
Progress = Callable[[int], None]

# Live cotangent elements per chunk of paths (1 GiB of float32); bounds the memory of the backward.
DEFAULT_BUDGET = 1 << 28


# ---------------------------------------------------------------------------------------------
# Counting paths


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


# ---------------------------------------------------------------------------------------------
# Linearising a callable at one input: the VJP of branch, shortcut, post and stem


@dataclass
class _Call:
    """One call of a supported leaf module, seen by the hooks."""

    module: nn.Module
    input: Tensor
    input_version: int
    output: Tensor | None = None
    output_version: int = -1
    relu_mask: Tensor | None = None


class _Tape:
    """Forward hooks on the supported leaf modules of a model; records their calls while on."""

    LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity, OptionAShortcut)

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        self.channels_last = channels_last
        self.calls: list[_Call] | None = None
        self.unsupported = False
        self._handles: list[RemovableHandle] = []
        for m in model.modules():
            if type(m) in self.LEAVES:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.calls is None:
            return
        if len(args) != 1 or not isinstance(args[0], Tensor):
            self.unsupported = True
            return
        self.calls.append(_Call(module, args[0], args[0]._version))

    def _post(self, module: nn.Module, args: tuple, out: object) -> None:
        if self.calls is None or self.unsupported:
            return
        call = self.calls[-1]
        if call.module is not module or not isinstance(out, Tensor):
            self.unsupported = True
            return
        call.output, call.output_version = out, out._version
        if isinstance(module, nn.ReLU):
            # Taken now: a later in-place op may overwrite the output. relu'(0) = 0, as in autograd.
            # In the cotangents' dtype and layout (see _Workspace): multiplying by a bool mask
            # would convert it on every use, four times slower.
            mask = out > 0
            if self.channels_last and out.dim() == 4:
                mask = mask.contiguous(memory_format=torch.channels_last)
            call.relu_mask = mask.to(out.dtype)


_ALL = slice(None)


class _Vjp:
    """A VJP for M cotangents at once: ``self(u)`` maps [M, b, *out] to [M, b, *in] without
    touching u; ``into(u, out)`` writes the result into ``out`` (which may be u itself).
    ``samples`` says which samples of the batch the b columns are, for per-sample factors."""

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        raise NotImplementedError

    def into(self, u: Tensor, out: Tensor, samples: slice = _ALL) -> None:
        out.copy_(self(u, samples))


class _ConvT(_Vjp):
    """VJP of a Conv2d w.r.t. its input: the transposed convolution, with the per-output-channel
    scales that followed the conv (BatchNorm, survival probability) folded into the weight."""

    def __init__(self, conv: nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size, scale: Tensor | None):
        w = conv.weight.detach()
        self.weight = w if scale is None else w * scale.reshape(-1, 1, 1, 1)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        k = conv.kernel_size
        # conv_transpose2d's output size is ambiguous for strided convs; pick the forward's input size.
        self.output_padding = tuple(
            in_shape[d + 2] - ((out_shape[d + 2] - 1) * self.stride[d] - 2 * self.padding[d]
                               + self.dilation[d] * (k[d] - 1) + 1)
            for d in range(2)
        )

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        m, b = u.shape[:2]
        out = F.conv_transpose2d(
            u.reshape(m * b, *u.shape[2:]), self.weight, None, self.stride, self.padding,
            self.output_padding, self.groups, self.dilation,
        )
        return out.reshape(m, b, *out.shape[1:])


class _Mul(_Vjp):
    """VJP of an elementwise linear map: multiply by ``factor``, per sample ([B, ...], a ReLU
    mask) or broadcast ([C, 1, 1] or a scalar)."""

    def __init__(self, factor: Tensor, per_sample: bool) -> None:
        self.factor, self.per_sample = factor, per_sample

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        return u * (self.factor[samples] if self.per_sample else self.factor)

    def into(self, u: Tensor, out: Tensor, samples: slice = _ALL) -> None:
        torch.mul(u, self.factor[samples] if self.per_sample else self.factor, out=out)


class _OptionAT(_Vjp):
    """VJP of the option-A shortcut (subsample by the stride, zero-pad channels): keep the input's
    channels, put them back on the strided grid, zeros elsewhere."""

    def __init__(self, shortcut: OptionAShortcut, in_shape: torch.Size) -> None:
        self.first = 0  # the input's channels come first, the zeros after
        self.cin, self.stride, self.in_shape = shortcut.cin, shortcut.stride, in_shape

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        out = u.new_empty(*u.shape[:2], *self.in_shape[1:])
        self.into(u, out, samples)
        return out

    def into(self, u: Tensor, out: Tensor, samples: slice = _ALL) -> None:
        kept = u[:, :, self.first : self.first + self.cin]
        if self.stride == 1:
            out.copy_(kept)
        else:
            out.zero_()
            out[..., :: self.stride, :: self.stride].copy_(kept)


class _Chain(_Vjp):
    def __init__(self, ops: list[_Vjp]) -> None:
        self.ops = ops

    def _head(self, u: Tensor, samples: slice) -> Tensor:
        """All ops but the last; after the first, the intermediates are ours to overwrite."""
        u = self.ops[0](u, samples)
        for op in self.ops[1:-1]:
            if isinstance(op, _Mul):
                op.into(u, u, samples)
            else:
                u = op(u, samples)
        return u

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        return self.ops[-1](self._head(u, samples), samples)

    def into(self, u: Tensor, out: Tensor, samples: slice = _ALL) -> None:
        self.ops[-1].into(self._head(u, samples), out, samples)


class _Recompute(_Vjp):
    """Fallback VJP for callables the tape cannot read: run ``fn`` on M stacked copies of its
    input and backpropagate the M cotangents at once (exact because eval-mode layers treat samples
    independently; costs one forward at M times the batch)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, scale: float) -> None:
        self.fn, self.x, self.scale = fn, x, scale

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        m, b = u.shape[:2]
        x = self.x[samples]
        xs = x.expand(m, *x.shape).reshape(m * b, *x.shape[1:]).requires_grad_()
        with torch.enable_grad():
            # A clone, so that fn may work in place on its input as it does in the model.
            out = self.fn(xs.clone())
            (g,) = torch.autograd.grad(out, xs, u.reshape(m * b, *u.shape[2:]) * self.scale)
        return g.reshape(m, b, *g.shape[1:])


def _scale_op(factor: Tensor) -> _Mul:
    """A pending per-channel (or scalar) factor as an op."""
    return _Mul(factor.reshape(-1, 1, 1) if factor.dim() else factor, per_sample=False)


def _chain_from_calls(calls: list[_Call], x: Tensor, x_version: int, out: Tensor,
                      scale: float) -> list[_Vjp] | None:
    """The VJP of ``scale * fn`` at x, as ops to apply in order (empty: the identity), if the calls
    form an unbroken chain x -> leaf -> ... -> out = fn(x) (each leaf consumes exactly the tensor
    the previous one produced, untouched since); else None.
    """
    prev, prev_version = x, x_version
    for call in calls:
        if call.input is not prev or call.input_version != prev_version or call.output is None:
            return None
        prev, prev_version = call.output, call.output_version
    if out is not prev or out._version != prev_version:
        return None
    ops: list[_Vjp] = []
    # Per-channel factors commute with the ReLU masks, so they are carried back to the next conv
    # and folded into its weight; one left over at the end joins the last mask or stands alone.
    pending: Tensor | None = None if scale == 1.0 else torch.tensor(scale, dtype=out.dtype, device=out.device)
    for call in reversed(calls):
        m = call.module
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str) or m.padding_mode != "zeros" or call.input.dim() != 4:
                return None
            ops.append(_ConvT(m, call.input.shape, call.output.shape, pending))
            pending = None
        elif isinstance(m, nn.BatchNorm2d):
            if m.training or m.running_var is None or call.input.dim() != 4:
                return None
            a = torch.rsqrt(m.running_var.detach() + m.eps)
            if m.weight is not None:
                a = a * m.weight.detach()
            a = a.to(out.dtype)
            pending = a if pending is None else pending * a
        elif isinstance(m, nn.ReLU):
            ops.append(_Mul(call.relu_mask, per_sample=True))
        elif isinstance(m, OptionAShortcut):
            if call.input.dim() != 4 or m.pool != "subsample":
                return None
            if pending is not None:
                ops.append(_scale_op(pending))
                pending = None
            ops.append(_OptionAT(m, call.input.shape))
    if pending is not None:
        if ops and isinstance(ops[-1], _Mul):
            last = ops[-1]
            ops[-1] = _Mul(last.factor * _scale_op(pending).factor, last.per_sample)
        else:
            ops.append(_scale_op(pending))
    return ops


def _linearize(tape: _Tape, fn: Callable[[Tensor], Tensor], x: Tensor,
               scale: float = 1.0) -> tuple[Tensor, _Vjp | None]:
    """``out = fn(x)`` and the VJP of ``scale * fn`` at x (None for the identity).

    A chain of Conv2d / BatchNorm2d (eval) / ReLU / Identity / OptionAShortcut calls becomes
    transposed convolutions and masks computed once here, so a VJP costs no forward; anything
    else falls back to :class:`_Recompute`.
    """
    tape.calls, tape.unsupported = [], False
    version = x._version
    try:
        out = fn(x)
    finally:
        calls, tape.calls = tape.calls, None
    ops = None if tape.unsupported else _chain_from_calls(calls, x, version, out, scale)
    if ops is None:
        return out, _Recompute(fn, x, scale)
    if not ops:
        return out, None
    return out, ops[0] if len(ops) == 1 else _Chain(ops)


# ---------------------------------------------------------------------------------------------
# Per-path gradients


class _eval_mode:
    """Eval mode for the duration; restores every module's own training flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


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

    @property
    def largest(self) -> int:
        """Elements of the largest cotangent of one path."""
        shapes = [self.input_shape, *self.input_shapes, self.output_cotangent.shape]
        return max(math.prod(s) for s in shapes)


def _linearize_model(model: nn.Module, x: Tensor, y: Tensor, channels_last: bool) -> _Linearized:
    tape = _Tape(model, channels_last)
    try:
        with torch.no_grad():
            h, stem = _linearize(tape, model.stem, x)
            branch, shortcut, post, shapes = [], [], [], []
            for block in model.blocks:
                shapes.append(h.shape)
                b, vb = _linearize(tape, block.branch, h, block.survival_prob)
                if block.shortcut is None:
                    z, vs = b, None
                else:
                    s, vs = _linearize(tape, block.shortcut, h)
                    z = s + block.survival_prob * b
                h, vp = _linearize(tape, block.post, z)
                branch.append(vb)
                shortcut.append(vs)
                post.append(vp)
    finally:
        tape.close()
    return _Linearized(stem, branch, shortcut, post, x.shape, shapes, _loss_cotangent(model, h, y))


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
    model: nn.Module, x: Tensor, y: Tensor, paths: Tensor, chunk_size: int | None, budget: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Yields ``(path indices, grads [m, *x.shape], owner [p])`` chunk by chunk, path
    ``indices[j]`` having gradient ``grads[owner[j]]``; ``grads`` is overwritten by the next chunk."""
    paths = _check_inputs(model, paths)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    channels_last = device.type == "cpu"
    if channels_last and x.dim() == 4:
        # oneDNN's fast layout for the one forward pass too (see _Workspace).
        x = x.contiguous(memory_format=torch.channels_last)
    with _eval_mode(model):
        lin = _linearize_model(model, x, y, channels_last)
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
    """
    norms = torch.empty(len(paths), dtype=torch.float64)
    for ids, grads, owner in _path_gradient_chunks(model, x, y, paths, chunk_size, budget):
        dims = tuple(range(1, grads.dim()))
        per_group = torch.linalg.vector_norm(grads, dim=dims, dtype=torch.float64).cpu()
        norms[ids] = per_group[owner]
        if progress is not None:
            progress(len(ids))
    return norms


def path_input_gradients(
    model: nn.Module, x: Tensor, y: Tensor, paths: Tensor, chunk_size: int | None = None,
    budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """The gradient vectors behind :func:`path_gradient_norms`: ``[P, *x.shape]`` (mind the
    memory: P copies of the batch)."""
    out = torch.empty(len(paths), *x.shape, dtype=x.dtype, device=next(model.parameters()).device)
    for ids, grads, owner in _path_gradient_chunks(model, x, y, paths, chunk_size, budget):
        out[ids] = grads[owner.to(grads.device)]
    return out


def path_gradient_norms_naive(model: nn.Module, x: Tensor, y: Tensor, paths: Tensor) -> Tensor:
    """Reference for :func:`path_gradient_norms` (same arguments and result): for each path a full
    forward pass in which the unused side of every block is detached, then autograd w.r.t. x."""
    paths = _check_inputs(model, paths)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    norms = torch.empty(len(paths), dtype=torch.float64)
    with _eval_mode(model), torch.enable_grad():
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
        :func:`effective_paths`."""
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
    paths drawn with :func:`sample_paths` (k random branches), each measured on a batch.

    The samples are spread evenly over ``batches`` (iterable of ``(x, y)``; materialised if it has
    no ``len``): batch j serves the samples ``torch.arange(samples_per_length).tensor_split(
    len(batches))[j]`` of every length, so one forward pass and the shared backward serve them
    all. Batch j's paths come from ``torch.Generator().manual_seed(seed + 1000 + j)``, so they do
    not depend on which process measures them.

    Process ``rank`` of ``world`` measures only the batches j with j % world == rank and leaves the
    other columns of ``norms`` at 0: the sum of ``norms`` over all ranks is the single-process
    result. ``progress(k)`` is called as k more paths are measured; ``chunk_size`` and ``budget``
    go to :func:`path_gradient_norms`.
    """
    n = len(model.blocks)
    lengths = [int(k) for k in lengths]
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..world-1 = 0..{world - 1}, got {rank}")
    if not isinstance(batches, Sized):
        batches = list(batches)
    if len(batches) == 0:
        raise ValueError("path_gradient_by_length got no batches")
    parts = torch.arange(samples_per_length).tensor_split(len(batches))
    norms = torch.zeros(len(lengths), samples_per_length, dtype=torch.float64)
    for j, ((x, y), part) in enumerate(zip(batches, parts, strict=True)):
        share = len(part)
        if j % world != rank or share == 0:
            continue
        generator = torch.Generator().manual_seed(seed + 1000 + j)
        paths = torch.cat([sample_paths(n, k, share, generator) for k in lengths])
        measured = path_gradient_norms(model, x, y, paths, chunk_size, budget, progress)
        norms[:, part] = measured.view(len(lengths), share)
    return PathGradientsByLength(n, lengths, norms)


# ---------------------------------------------------------------------------------------------
# Effective paths and deletion


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

"""Each callable of a residual network (the stem, a block's branch, shortcut or post) as its
vector-Jacobian product at the input it saw in the one forward pass of the intact network.

While a callable runs, forward hooks on the model's leaf modules record their calls (the tape).
If the calls form an unbroken chain from the callable's input to its output, and every layer in
it is one read here, the VJP is built once from what the forward left behind, so applying it
costs no forward pass and computes no weight gradient:

- ``nn.Conv2d`` (and subclasses that keep its forward): the transposed convolution, with the
  per-channel scales that follow it (eval-mode BatchNorm, the survival probability) folded into
  its weight;
- any BatchNorm (``_BatchNorm`` with torch's own forward: BatchNorm2d, SyncBatchNorm, ...) in
  eval mode on 4-d input: a per-channel scale, the running statistics being constants;
- ``nn.ReLU`` (and subclasses that keep its forward): a mask taken in the forward;
- the option-A shortcut: its input's channels, back on the strided grid (subsampling) or spread
  over their pooling windows (average pooling);
- a leaf that hands back its input untouched (``nn.Identity``, eval-mode dropout): nothing.

Anything else falls back to autograd on stacked copies of the input (:class:`_Recompute`):
exact, but a forward at M times the batch for M cotangents. The fallback names its cause: the
layer types the tape could not read, or the callable itself when its calls do not chain (a
functional operation between layers, a lambda).

All VJPs here map M cotangents at once, ``[M, B, *out] -> [M, B, *in]``: eval-mode layers treat
samples independently, so the M copies of the batch can share one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from resens.models.blocks import OptionAShortcut

_ALL = slice(None)

# BatchNorm forwards that, in eval mode, are F.batch_norm with the running statistics.
_BATCHNORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _kind(m: nn.Module) -> str | None:
    """Which of the layers read here ``m`` is; a subclass counts only if it keeps the forward."""
    t = type(m)
    if isinstance(m, nn.Conv2d) and t.forward is nn.Conv2d.forward and t._conv_forward is nn.Conv2d._conv_forward:
        return "conv"
    if isinstance(m, _BatchNorm) and t.forward in _BATCHNORM_FORWARDS:
        return "batchnorm"
    if isinstance(m, nn.ReLU) and t.forward is nn.ReLU.forward:
        return "relu"
    if isinstance(m, OptionAShortcut) and t.forward is OptionAShortcut.forward:
        return "option_a"
    return None


@dataclass
class _Call:
    """One call of a leaf module, seen by the hooks."""

    module: nn.Module
    kind: str | None  # _kind(module)
    input: Tensor | None  # None: not called with exactly one tensor
    input_version: int
    output: Tensor | None = None
    output_version: int = -1
    relu_mask: Tensor | None = None

    @property
    def passes_through(self) -> bool:
        """Handed back its input untouched: the identity, whatever the layer."""
        return self.input is not None and self.output is self.input and self.output_version == self.input_version


class _Tape:
    """Forward hooks on every leaf module of a model; records their calls while on."""

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        self.channels_last = channels_last
        self.calls: list[_Call] | None = None
        self.broken = False  # a leaf called another module: the calls cannot be read as a chain
        self._kinds: dict[nn.Module, str | None] = {}
        self._handles: list[RemovableHandle] = []
        for m in model.modules():
            if next(m.children(), None) is None:
                self._kinds[m] = _kind(m)
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.calls is None:
            return
        x = args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
        self.calls.append(_Call(module, self._kinds[module], x, -1 if x is None else x._version))

    def _post(self, module: nn.Module, args: tuple, out: object) -> None:
        if self.calls is None:
            return
        call = self.calls[-1]
        if call.module is not module:
            self.broken = True
            return
        if not isinstance(out, Tensor):
            return
        call.output, call.output_version = out, out._version
        if call.kind == "relu":
            # Taken now: a later in-place op may overwrite the output. relu'(0) = 0, as in autograd.
            # In the cotangents' dtype and layout (see engine._Workspace): multiplying by a bool
            # mask would convert it on every use, four times slower.
            mask = out > 0
            if self.channels_last and out.dim() == 4:
                mask = mask.contiguous(memory_format=torch.channels_last)
            call.relu_mask = mask.to(out.dtype)


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
    scales that followed the conv (BatchNorm, survival probability) folded into the weight. The
    bias drops out: it shifts the output, not its derivative."""

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
    """VJP of the option-A shortcut (pool by the stride s, then zero channels after the input's):
    keep channels [0, cin), then undo the pooling. Subsampling: back on the strided grid, zeros
    elsewhere. Average pooling (kernel = stride = s): each input pixel receives 1/s² of its
    window's cotangent; rows and columns past the last whole window, which avg_pool2d drops
    (floor), receive zero."""

    def __init__(self, shortcut: OptionAShortcut, in_shape: torch.Size) -> None:
        self.cin, self.stride, self.in_shape = shortcut.cin, shortcut.stride, in_shape
        self.average = shortcut.pool == "avg"

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        out = u.new_empty(*u.shape[:2], *self.in_shape[1:])
        self.into(u, out, samples)
        return out

    def into(self, u: Tensor, out: Tensor, samples: slice = _ALL) -> None:
        kept, s = u[:, :, : self.cin], self.stride
        if s == 1:
            out.copy_(kept)
        elif not self.average:
            out.zero_()
            out[..., ::s, ::s].copy_(kept)
        else:
            ho, wo = kept.shape[-2:]
            if (ho * s, wo * s) != tuple(self.in_shape[-2:]):
                out.zero_()
            # [.., H, W] -> [.., ho, s, wo, s]: splitting a dimension is a view in any layout.
            windows = out[..., : ho * s, : wo * s].unflatten(-1, (wo, s)).unflatten(-3, (ho, s))
            windows.copy_((kept / (s * s)).unsqueeze(-1).unsqueeze(-3))


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
    independently; costs one forward at M times the batch). ``reasons``: the layer types (or the
    callable's name) that made it necessary."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, scale: float, reasons: list[str]) -> None:
        self.fn, self.x, self.scale, self.reasons = fn, x, scale, reasons

    def __call__(self, u: Tensor, samples: slice = _ALL) -> Tensor:
        m, b = u.shape[:2]
        x = self.x[samples]
        xs = x.expand(m, *x.shape).reshape(m * b, *x.shape[1:]).requires_grad_()
        with torch.enable_grad():
            # A clone, so that fn may work in place on its input as it does in the model.
            out = self.fn(xs.clone())
            (g,) = torch.autograd.grad(out, xs, u.reshape(m * b, *u.shape[2:]) * self.scale)
        return g.reshape(m, b, *g.shape[1:])


class _NoFastVjp(Exception):
    """The calls of a callable cannot be read as a chain of known layers; ``reasons`` names why."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = reasons


def _readable(call: _Call) -> bool:
    """Whether :func:`_chain_from_calls` can turn this call into a VJP."""
    if call.passes_through:
        return True
    if call.kind is None or call.input is None or call.output is None:
        return False
    m = call.module
    if call.kind == "conv":
        return not isinstance(m.padding, str) and m.padding_mode == "zeros" and call.input.dim() == 4
    if call.kind == "batchnorm":
        return not m.training and m.running_var is not None and call.input.dim() == 4
    if call.kind == "option_a":
        return call.input.dim() == 4
    return True


def _name(fn: Callable[[Tensor], Tensor]) -> str:
    """A callable's name for a report: a module's type, a function's name (``<lambda>``)."""
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__name__", type(fn).__name__)


def _scale_op(factor: Tensor) -> _Mul:
    """A pending per-channel (or scalar) factor as an op."""
    return _Mul(factor.reshape(-1, 1, 1) if factor.dim() else factor, per_sample=False)


def _chain_from_calls(calls: list[_Call], x: Tensor, x_version: int, out: Tensor,
                      scale: float, name: str) -> list[_Vjp]:
    """The VJP of ``scale * fn`` at x, as ops to apply in order (empty: the identity), if the calls
    form an unbroken chain x -> leaf -> ... -> out = fn(x) of readable layers (each leaf consumes
    exactly the tensor the previous one produced, untouched since; leaves that hand back their
    input are skipped). Raises :class:`_NoFastVjp` naming the unreadable layer types, else the
    callable ``name`` if the chain is broken.
    """
    unreadable = sorted({type(c.module).__name__ for c in calls if not _readable(c)})
    if unreadable:
        raise _NoFastVjp(unreadable)
    calls = [c for c in calls if not c.passes_through]
    prev, prev_version = x, x_version
    for call in calls:
        if call.input is not prev or call.input_version != prev_version:
            raise _NoFastVjp([name])
        prev, prev_version = call.output, call.output_version
    if out is not prev or out._version != prev_version:
        raise _NoFastVjp([name])
    ops: list[_Vjp] = []
    # Per-channel factors commute with the ReLU masks, so they are carried back to the next conv
    # and folded into its weight; one left over at the end joins the last mask or stands alone.
    pending: Tensor | None = None if scale == 1.0 else torch.tensor(scale, dtype=out.dtype, device=out.device)
    for call in reversed(calls):
        m = call.module
        if call.kind == "conv":
            ops.append(_ConvT(m, call.input.shape, call.output.shape, pending))
            pending = None
        elif call.kind == "batchnorm":
            a = torch.rsqrt(m.running_var.detach() + m.eps)
            if m.weight is not None:
                a = a * m.weight.detach()
            a = a.to(out.dtype)
            pending = a if pending is None else pending * a
        elif call.kind == "relu":
            ops.append(_Mul(call.relu_mask, per_sample=True))
        else:  # option_a
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
    """``out = fn(x)`` and the VJP of ``scale * fn`` at x (None for the identity): built from the
    tape's calls, else a :class:`_Recompute` whose ``reasons`` say why."""
    tape.calls, tape.broken = [], False
    version = x._version
    try:
        out = fn(x)
    finally:
        calls, tape.calls = tape.calls, None
    try:
        if tape.broken:
            raise _NoFastVjp([_name(fn)])
        ops = _chain_from_calls(calls, x, version, out, scale, _name(fn))
    except _NoFastVjp as e:
        return out, _Recompute(fn, x, scale, e.reasons)
    if not ops:
        return out, None
    return out, ops[0] if len(ops) == 1 else _Chain(ops)

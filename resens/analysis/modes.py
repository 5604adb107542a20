"""Running a model for an analysis: in eval mode and in true float32, leaving it as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; afterwards every module gets back its own training flag
    (a model may hold submodules in different modes, e.g. frozen BatchNorm layers)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def full_precision() -> Iterator[None]:
    """Float32 arithmetic that is float32: TF32 off for cuDNN convolutions and CUDA matrix
    products for the duration (PyTorch lets cuDNN use TF32 by default on Ampere and later GPUs,
    which perturbs errors near a decision boundary and path-gradient norms by ~1e-3)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic, allow_tf32=False,
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul

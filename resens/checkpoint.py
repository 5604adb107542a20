"""Safe checkpoint loading: ``weights_only=True``, and a one-line error for every bad file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from resens.errors import CheckpointError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a resens/Lightning checkpoint on the CPU without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        if "Weights only load failed" in first or "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint {path} carries pickled objects that are not plain weights; refusing to load it"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(hp.get("cfg"), dict):
        raise CheckpointError(f"{path} is not a resens checkpoint (no run config in its hyperparameters)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """Raise if the checkpoint's weights do not fit ``model`` (another architecture or size)."""
    own = {k: v.shape for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    theirs = {k: v.shape for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(
            f"checkpoint {path} is of another architecture: "
            f"{len(missing)} missing and {len(unexpected)} unexpected weights (e.g. '{key}')"
        )
    for k, shape in own.items():
        if theirs[k] != shape:
            raise CheckpointError(
                f"checkpoint {path} is of another architecture: '{k}' has shape "
                f"{tuple(theirs[k])}, the model expects {tuple(shape)}"
            )

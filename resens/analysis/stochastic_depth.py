"""What deleting blocks removes, and resilience to deletion next to another run (Veit et al.
Sec. 5, stochastic depth), from results already measured: plain Python over ``analysis.json``
dicts (see ``resens.analysis.summary``) and the path counts of ``resens.analysis.paths``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from resens.analysis import summary
from resens.analysis.paths import effective_path_survival, path_survival

THIS_RUN = "this run"


def survival(results: Mapping[str, Any], n: int, k_max: int) -> list[dict[str, Any]]:
    """For d = 0..min(k_max, n) blocks deleted, the fraction of all 2^n paths that survive
    (``all_paths``) and, when ``results`` holds ``effective_paths``, the fraction of the effective
    paths (``effective_paths``) and of their gradient (``effective_gradient``, paths weighted by
    the mean gradient norm of their length from ``path_gradient``)."""
    eff = summary.effective_range(results)
    weights = summary.gradient_norm_by_length(results, n) if eff is not None else None
    rows = []
    for d in range(min(k_max, n) + 1):
        row: dict[str, Any] = {"deleted": d, "all_paths": path_survival(n, d)}
        if eff is not None:
            row["effective_paths"] = effective_path_survival(n, d, eff)
            row["effective_gradient"] = effective_path_survival(n, d, eff, weights=weights)
        rows.append(row)
    return rows


def compare_deletion(
    results: Mapping[str, Any], other: Mapping[str, Any] | None = None, other_label: str = "other run"
) -> dict[str, Any]:
    """Resilience to deletion of this run (``"this run"``) and of ``other`` (another run's
    ``analysis.json``, under ``other_label``), for the runs that measured it:

    - ``error_vs_k``: label -> [[k, mean error with k blocks deleted], ...];
    - ``single_deletion_mean_error``: label -> mean error with one block deleted.
    """
    runs = {THIS_RUN: results}
    if other is not None:
        runs[other_label] = other
    curves, single = {}, {}
    for label, r in runs.items():
        if r.get("multi_deletion"):
            curves[label] = [[k, e] for k, e in summary.multi_deletion_mean_error(r).items()]
        if r.get("single_deletion"):
            single[label] = summary.single_deletion_mean_error(r)
    return {"error_vs_k": curves, "single_deletion_mean_error": single}


def summarize_stochastic_depth(
    results: Mapping[str, Any],
    survival_probs: Sequence[float],
    k_max: int,
    other: Mapping[str, Any] | None = None,
    other_label: str = "other run",
) -> dict[str, Any]:
    """The ``stochastic_depth`` entry of ``analysis.json`` for a network whose blocks have
    ``survival_probs`` (1.0 without stochastic depth): :func:`survival` up to ``k_max`` deleted
    blocks and :func:`compare_deletion` with ``other``."""
    probs = [float(p) for p in survival_probs]
    return {
        "trained_with_stochastic_depth": any(p < 1 for p in probs),
        "survival_probs": probs,
        "survival": survival(results, len(probs), k_max),
        **compare_deletion(results, other, other_label),
    }

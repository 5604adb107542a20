"""Figures in the style of Veit et al. (2016), from the lists written to ``analysis.json``.

Each function returns a matplotlib Figure; callers save and log it. Errors are fractions (0..1)
and shown as percentages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from resens.analysis import summary  # noqa: E402
from resens.analysis.reference import Overlay  # noqa: E402

PAPER = dict(color="0.45", linestyle="--", marker="s", ms=3)


def _pct(values) -> np.ndarray:
    return 100 * np.asarray(values, dtype=float)


def _paper(ax, fig: Figure, overlay: Overlay | None) -> None:
    """Draw the paper's curve (a list by block or a dict by x) on ``ax``, or say below the
    figure why it is left off."""
    if overlay is None:
        return
    if overlay.curve is None:
        fig.text(0.01, -0.03, overlay.note, fontsize=7, color="0.3", ha="left", va="top")
        return
    curve = overlay.curve
    xs = list(range(len(curve))) if isinstance(curve, list) else sorted(curve)
    ys = curve if isinstance(curve, list) else [curve[x] for x in xs]
    ax.plot(xs, _pct(ys), label=overlay.label, **PAPER)
    if overlay.baseline is not None:
        ax.axhline(100 * overlay.baseline, color="0.45", lw=1, ls=":")


def single_deletion(runs: Mapping[str, Mapping], overlay: Overlay | None = None) -> Figure:
    """Test error with each block deleted, one line per run (e.g. ResNet against plain network).

    ``runs``: label -> {"baseline_error": e, "single_deletion": [{"block", "error", "downsampling"}]}.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (label, r) in enumerate(runs.items()):
        rows = r["single_deletion"]
        color = f"C{i}"
        blocks = [row["block"] for row in rows]
        ax.plot(blocks, _pct([row["error"] for row in rows]), "o-", ms=3, color=color, label=f"{label}: block deleted")
        ax.axhline(100 * r["baseline_error"], color=color, lw=1, ls=":", label=f"{label}: intact")
        down = [row for row in rows if row["downsampling"]]
        if down:
            ax.plot([row["block"] for row in down], _pct([row["error"] for row in down]), "x", color="k", ms=7)
    _paper(ax, fig, overlay)
    ax.set(xlabel="deleted block (0-based; × = downsampling)", ylabel="test error (%)", ylim=(0, None))
    ax.set_title("Deleting one block")
    ax.legend(fontsize=7)
    return fig


def _mean_std(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The values of ``row[key]``, and the mean and std of the errors (%) at each."""
    groups = summary.errors_by(rows, key)
    means = summary.mean_error_by(rows, key)
    keys = np.array(list(groups))
    return keys, _pct([means[k] for k in groups]), _pct([np.std(groups[k]) for k in groups])


def _trials(ax, rows: Sequence[Mapping], key: str, label: str) -> None:
    """Each trial as a dot, and the mean ± std at each value of ``row[key]``."""
    ax.scatter([r[key] for r in rows], _pct([r["error"] for r in rows]), s=4, alpha=0.25, color="C0")
    xs, mean, std = _mean_std(rows, key)
    ax.errorbar(xs, mean, yerr=std, color="C0", marker="o", ms=3, capsize=2, label=label)


def lesion_curve(
    rows: Sequence[Mapping], overlay: Overlay | None = None, label: str = "this run",
    key: str = "k", xlabel: str = "number of blocks deleted", title: str = "Deleting many blocks",
) -> Figure:
    """Mean ± std test error against ``row[key]`` (blocks deleted or duplicated); dots are single
    trials; the paper's curve, compared like for like, dashed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _trials(ax, rows, key, f"{label} (mean ± std)")
    _paper(ax, fig, overlay)
    ax.set(xlabel=xlabel, ylabel="test error (%)", title=title)
    ax.legend(fontsize=6)
    return fig


def reorder(
    rows: Sequence[Mapping], overlay: Overlay | None = None, by_displacement: Overlay | None = None,
    label: str = "this run", bin_width: int = 1,
) -> Figure:
    """Test error against the number of swaps, against Kendall's tau, and against the total
    distance the blocks moved (Σ|a − b|, in bins of ``bin_width`` positions)."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    _trials(a, rows, "swaps", f"{label} (mean ± std)")
    _paper(a, fig, overlay)
    a.set(xlabel="number of swaps", ylabel="test error (%)", title="Reordering blocks")
    a.legend(fontsize=6)
    swaps = [r["swaps"] for r in rows]
    b.scatter([r["kendall_tau"] for r in rows], _pct([r["error"] for r in rows]), s=5, alpha=0.4, c=swaps, cmap="viridis")
    b.set(xlabel="Kendall's tau (original vs new order)", title="Error against order similarity")
    b.invert_xaxis()
    binned = [{**r, "bin": r["displacement"] // bin_width * bin_width} for r in rows]
    _trials(c, binned, "bin", f"{label} (mean ± std per bin)")
    if by_displacement is not None and by_displacement.curve is not None:
        _paper(c, fig, by_displacement)
    c.set(xlabel=f"total displacement Σ|a − b| (bins of {bin_width})", title="Error against distance moved")
    c.legend(fontsize=6)
    return fig


def path_lengths(rows: Sequence[Mapping]) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar([r["length"] for r in rows], [r["fraction"] for r in rows], width=1.0, color="C0")
    ax.set(xlabel="path length (blocks)", ylabel="fraction of paths", title=f"Path lengths: Binomial({len(rows) - 1}, 1/2)")
    return fig


def path_gradient(rows: Sequence[Mapping]) -> Figure:
    """Mean ± std gradient norm at the input against path length, log scale."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    k = np.array([r["length"] for r in rows])
    mean = np.array([r["mean_norm"] for r in rows])
    std = np.array([r["std_norm"] for r in rows])
    ax.fill_between(k, np.clip(mean - std, mean * 1e-3, None), mean + std, alpha=0.25)
    ax.plot(k, mean, "o-", ms=3)
    ax.set_yscale("log")
    ax.set(xlabel="path length (blocks)", ylabel="gradient norm at input", title="Gradient per path")
    return fig


def effective_paths(rows: Sequence[Mapping], effective: Mapping) -> Figure:
    """Total gradient magnitude per path length (paths × gradient per path), effective range shaded."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    k = [r["length"] for r in rows]
    ax.plot(k, [r["total_gradient"] for r in rows], "o-", ms=3)
    lo, hi = effective["lengths"]
    ax.axvspan(lo - 0.5, hi + 0.5, alpha=0.2, color="C1",
               label=f"lengths {lo}–{hi}: {100 * effective['share_of_gradient']:.0f}% of gradient, "
               f"{100 * effective['share_of_paths']:.2g}% of paths")
    ax.set(xlabel="path length (blocks)", ylabel="total gradient magnitude", title="Effective paths")
    ax.legend(fontsize=7)
    return fig


def stochastic_depth(result: Mapping) -> Figure:
    """Surviving fraction of all and of effective paths against blocks deleted, and the error
    against k of this run next to a comparison run (when there is one)."""
    curves = result.get("error_vs_k", {})
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(9 if curves else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    rows = result["survival"]
    d = [r["deleted"] for r in rows]
    ax.plot(d, [r["all_paths"] for r in rows], "o-", ms=3, label="all paths")
    if "effective_paths" in rows[0]:  # measured when the effective paths were
        ax.plot(d, [r["effective_paths"] for r in rows], "s-", ms=3, label="effective paths")
    ax.set(xlabel="blocks deleted", ylabel="fraction surviving", title="Paths surviving deletion", yscale="log")
    ax.legend(fontsize=8)
    if curves:
        ax = axes[0][1]
        for label, pts in curves.items():
            ax.plot([p[0] for p in pts], _pct([p[1] for p in pts]), "o-", ms=3, label=label)
        ax.set(xlabel="blocks deleted", ylabel="test error (%)", title="Resilience to deletion")
        ax.legend(fontsize=8)
    return fig

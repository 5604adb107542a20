"""Path analyses: lengths, gradient per path, effective paths, stochastic depth (Veit et al. Figs. 6-8)."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import torch

from callbacks.base import AnalysisCallback
from resens.analysis import paths, plots


def _residual(model) -> bool:
    return all(b.shortcut is not None for b in model.blocks)


class PathLengths(AnalysisCallback):
    """The fraction of the 2^n paths of each length: Binomial(n, 1/2)."""

    name = "path_lengths"

    def compute(self, ctx, model, device):
        if not _residual(model):
            return None
        dist = paths.path_length_distribution(len(model.blocks))
        return [{"length": k, "fraction": float(f)} for k, f in enumerate(dist)]

    def report(self, ctx, model, rows):
        ctx.write(self.name, rows)
        ctx.log_table("paths/lengths", ["length", "fraction"], [[r["length"], r["fraction"]] for r in rows],
                      line=("length", "fraction"), title="distribution of path lengths")
        ctx.log_figure("paths/lengths", plots.path_lengths(rows))


class PathGradient(AnalysisCallback):
    """Gradient norm at the input carried by sampled paths of each length, on random training
    batches. Each rank measures the batches j with j mod world = rank, each with its own seeded
    paths; the per-sample norms are summed over ranks (each is measured by exactly one rank)."""

    name = "path_gradient"

    def compute(self, ctx, model, device):
        if not _residual(model):
            return None
        c = self.cfg.path_gradient
        n = len(model.blocks)
        lengths = list(c.lengths) if c.lengths is not None else list(range(n + 1))
        samples = min(c.samples_per_length, 20) if self.cfg.quick else c.samples_per_length
        n_batches = min(c.batches, 2) if self.cfg.quick else c.batches
        dm = ctx.trainer.datamodule
        dm.setup("fit")
        loader = dm.analysis_train_dataloader(c.batch_size, self.cfg.seed)
        batches = list(itertools.islice(loader, n_batches))
        shares = [len(s) for s in torch.arange(samples).tensor_split(len(batches))]
        rank, world = ctx.trainer.global_rank, ctx.trainer.world_size
        norms = torch.zeros(len(lengths), samples, dtype=torch.float64)
        done = 0
        with ctx.progress("path gradients", samples * len(lengths)) as bar:
            for j, (batch, share) in enumerate(zip(batches, shares)):
                if j % world == rank and share:
                    # a generator per batch: the same paths whatever the number of processes
                    measured = paths.path_gradient_by_length(
                        model, [batch], lengths, share, self.generator(1000 + j), progress=bar.advance
                    )
                    norms[:, done : done + share] = measured.norms
                done += share
        norms = ctx.sum_across_ranks(norms, device)
        return paths.PathGradientsByLength(n, lengths, norms)

    def report(self, ctx, model, result: paths.PathGradientsByLength):
        mean, std, count = result.mean.tolist(), result.std.tolist(), result.count.tolist()
        rows = [
            {"length": k, "samples": int(s), "mean_norm": m, "std_norm": sd if sd == sd else 0.0}
            for k, s, m, sd in zip(result.lengths, count, mean, std)
        ]
        ctx.results["path_gradient_mean_by_length"] = result.mean_by_length()
        ctx.write(self.name, rows)
        ctx.log_table("paths/gradient", ["length", "samples", "mean_norm", "std_norm"],
                      [[r["length"], r["samples"], r["mean_norm"], r["std_norm"]] for r in rows],
                      line=("length", "mean_norm"), title="gradient norm against path length")
        ctx.log_figure("paths/gradient", plots.path_gradient(rows))


class EffectivePaths(AnalysisCallback):
    """Paths of each length × gradient per path: the narrowest range of lengths that holds
    ``analysis.effective_share`` of the total gradient, and the fraction of paths it holds."""

    name = "effective_paths"

    def compute(self, ctx, model, device):
        mean = ctx.results.get("path_gradient_mean_by_length")
        if mean is None:
            return None
        return paths.effective_paths(mean, len(model.blocks), self.cfg.effective_share)

    def report(self, ctx, model, eff):
        summary = {
            "lengths": [eff["lo"], eff["hi"]],
            "share_of_gradient": eff["share_of_gradient"],
            "share_of_paths": eff["share_of_paths"],
            "target_share": self.cfg.effective_share,
        }
        ctx.write(self.name, summary)
        rows = [{"length": k, "total_gradient": float(t)} for k, t in enumerate(eff["total_gradient"])]
        ctx.log_table("paths/effective", ["length", "total_gradient"], [[r["length"], r["total_gradient"]] for r in rows],
                      line=("length", "total_gradient"), title="total gradient against path length")
        ctx.log_summary({
            "paths/effective/lo": eff["lo"], "paths/effective/hi": eff["hi"],
            "paths/effective/share_of_paths": eff["share_of_paths"],
        })
        ctx.log_figure("paths/effective", plots.effective_paths(rows, summary))


def _mean_error_by_k(rows) -> list[list[float]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["k"]].append(r["error"])
    return [[k, sum(v) / len(v)] for k, v in sorted(groups.items())]


class StochasticDepth(AnalysisCallback):
    """What deletion removes: the fraction of all paths and of the effective paths that survive
    deleting d blocks; and, with ``analysis.compare_with`` (another run's analysis.json, e.g. the
    same architecture trained without stochastic depth), resilience to deletion side by side."""

    name = "stochastic_depth"

    def compute(self, ctx, model, device):
        if not _residual(model):
            return None
        n = len(model.blocks)
        k_max = min(self.cfg.multi_deletion.k_max, n)
        eff = ctx.results.get("effective_paths")
        mean = ctx.results.get("path_gradient_mean_by_length")
        survival = []
        for d in range(k_max + 1):
            row = {"deleted": d, "all_paths": paths.path_survival(n, d)}
            if eff is not None:
                lo_hi = tuple(eff["lengths"])
                row["effective_paths"] = paths.effective_path_survival(n, d, lo_hi)
                row["effective_gradient"] = paths.effective_path_survival(
                    n, d, lo_hi, weights=torch.nan_to_num(mean, nan=0.0)
                )
            survival.append(row)
        result = {
            "trained_with_stochastic_depth": bool(any(b.survival_prob < 1 for b in model.blocks)),
            "survival_probs": [b.survival_prob for b in model.blocks],
            "survival": survival,
        }
        curves, single = {}, {}
        own = ctx.results.get("multi_deletion")
        if own:
            curves["this run"] = _mean_error_by_k(own)
        if ctx.results.get("single_deletion"):
            single["this run"] = _mean_single(ctx.results["single_deletion"])
        if self.cfg.compare_with:
            other = json.loads(Path(self.cfg.compare_with).read_text())
            label = Path(self.cfg.compare_with).parent.name
            if other.get("multi_deletion"):
                curves[label] = _mean_error_by_k(other["multi_deletion"])
            if other.get("single_deletion"):
                single[label] = _mean_single(other["single_deletion"])
        result["error_vs_k"] = curves
        result["single_deletion_mean_error"] = single
        return result

    def report(self, ctx, model, result):
        ctx.write(self.name, result)
        rows = result["survival"]
        if "effective_paths" not in rows[0]:
            for r in rows:
                r["effective_paths"] = float("nan")
        ctx.log_table("stochastic_depth/survival", ["deleted", "all_paths", "effective_paths"],
                      [[r["deleted"], r["all_paths"], r["effective_paths"]] for r in rows],
                      line=("deleted", "effective_paths"), title="effective paths surviving deletion")
        ctx.log_figure("stochastic_depth", plots.stochastic_depth(result))


def _mean_single(rows) -> float:
    ordinary = [r["error"] for r in rows if not r["downsampling"]]
    return sum(ordinary) / len(ordinary) if ordinary else float("nan")

"""Path analyses: lengths, gradient per path, effective paths, stochastic depth (Veit et al. Figs. 6-8)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from callbacks.base import Analysis, effective, register_analysis
from resens.analysis import paths, plots, summary
from resens.analysis.stochastic_depth import summarize_stochastic_depth
from resens.errors import ConfigError

NOT_RESIDUAL = "a plain network has one path, through every block"


def _residual(model) -> bool:
    return all(b.shortcut is not None for b in model.blocks)


@register_analysis
class PathLengths(Analysis):
    """The fraction of the 2^n paths of each length: Binomial(n, 1/2)."""

    name = "path_lengths"

    def compute(self, ctx, model, device):
        if not _residual(model):
            ctx.skip(self.name, NOT_RESIDUAL)
            return None
        dist = paths.path_length_distribution(len(model.blocks))
        rows = [{"length": k, "fraction": float(f)} for k, f in enumerate(dist)]
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        ctx.log_table("paths/lengths", ["length", "fraction"], [[r["length"], r["fraction"]] for r in rows],
                      line=("length", "fraction"), title="distribution of path lengths")
        ctx.log_figure("paths/lengths", plots.path_lengths(rows))


@register_analysis
class PathGradient(Analysis):
    """Gradient norm at the input carried by sampled paths of each length, on random training
    batches. Each rank measures the batches j with j mod world = rank, each with its own seeded
    paths; the per-sample norms are summed over ranks (each is measured by exactly one rank)."""

    name = "path_gradient"

    def compute(self, ctx, model, device):
        if not _residual(model):
            ctx.skip(self.name, NOT_RESIDUAL)
            return None
        c = self.cfg.path_gradient
        n = len(model.blocks)
        lengths = list(c.lengths) if c.lengths is not None else list(range(n + 1))
        samples = effective(self.cfg, "path_gradient", "samples_per_length")
        n_batches = effective(self.cfg, "path_gradient", "batches")
        dm = ctx.trainer.datamodule
        dm.setup("fit")
        batches = list(itertools.islice(dm.analysis_train_dataloader(c.batch_size, self.cfg.seed), n_batches))
        with ctx.progress("path gradients", samples * len(lengths)) as bar:
            measured = paths.path_gradient_by_length(
                model, batches, lengths, samples, seed=self.cfg.seed, progress=bar.advance,
                rank=ctx.trainer.global_rank, world=ctx.trainer.world_size,
            )
        norms = ctx.sum_across_ranks(measured.norms, device)
        result = paths.PathGradientsByLength(n, lengths, norms)
        rows = [
            {"length": k, "samples": int(s), "mean_norm": m, "std_norm": 0.0 if math.isnan(sd) else sd}
            for k, s, m, sd in zip(lengths, result.count.tolist(), result.mean.tolist(), result.std.tolist())
        ]
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        ctx.log_table("paths/gradient", ["length", "samples", "mean_norm", "std_norm"],
                      [[r["length"], r["samples"], r["mean_norm"], r["std_norm"]] for r in rows],
                      line=("length", "mean_norm"), title="gradient norm against path length", log_y=True)
        ctx.log_figure("paths/gradient", plots.path_gradient(rows))


@register_analysis
class EffectivePaths(Analysis):
    """Paths of each length × gradient per path: the narrowest range of lengths that holds
    ``analysis.effective_share`` of the total gradient, and the fraction of paths it holds."""

    name = "effective_paths"
    requires = ("path_gradient",)

    def compute(self, ctx, model, device):
        if "path_gradient" not in ctx.results:  # a plain network has no paths
            ctx.skip(self.name, NOT_RESIDUAL)
            return None
        n = len(model.blocks)
        eff = paths.effective_paths(summary.gradient_norm_by_length(ctx.results, n), n, self.cfg.effective_share)
        ctx.write(self.name, {
            "lengths": [eff["lo"], eff["hi"]],
            "share_of_gradient": eff["share_of_gradient"],
            "share_of_paths": eff["share_of_paths"],
            "target_share": self.cfg.effective_share,
        })
        return eff

    def report(self, ctx, model, eff):
        rows = [{"length": k, "total_gradient": float(t)} for k, t in enumerate(eff["total_gradient"])]
        ctx.log_table("paths/effective", ["length", "total_gradient"], [[r["length"], r["total_gradient"]] for r in rows],
                      line=("length", "total_gradient"), title="total gradient against path length")
        ctx.log_figure("paths/effective", plots.effective_paths(rows, ctx.results[self.name]))


@register_analysis
class StochasticDepth(Analysis):
    """What deletion removes: the fraction of all paths and of the effective paths that survive
    deleting d blocks; and, with ``analysis.compare_with`` (another run's analysis.json, e.g. the
    same architecture trained without stochastic depth), resilience to deletion side by side."""

    name = "stochastic_depth"
    uses = ("effective_paths", "single_deletion", "multi_deletion")

    def compute(self, ctx, model, device):
        if not _residual(model):
            ctx.skip(self.name, NOT_RESIDUAL)
            return None
        other, label = None, "other run"
        if self.cfg.compare_with:
            path = Path(self.cfg.compare_with)
            if not path.is_file():
                raise ConfigError(f"analysis.compare_with: no such file {path}")
            other, label = json.loads(path.read_text()), path.parent.name
        result = summarize_stochastic_depth(
            ctx.results, [b.survival_prob for b in model.blocks], self.cfg.multi_deletion.k_max, other, label
        )
        ctx.write(self.name, result)
        return result

    def report(self, ctx, model, result):
        rows = result["survival"]
        ctx.log_table("stochastic_depth/survival", ["deleted", "all_paths", "effective_paths"],
                      [[r["deleted"], r["all_paths"], r.get("effective_paths", math.nan)] for r in rows],
                      line=("deleted", "effective_paths"), title="effective paths surviving deletion")
        ctx.log_figure("stochastic_depth", plots.stochastic_depth(result))

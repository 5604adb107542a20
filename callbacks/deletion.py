"""Lesion analyses: delete one block, delete k blocks, reorder blocks (Veit et al. Figs. 3-5)."""

from __future__ import annotations

import torch
from torch import nn

from callbacks.base import Analysis, AnalysisContext, register_analysis
from resens.analysis import plots, reference, variants
from resens.models import stage_of_blocks


def variant_errors(ctx: AnalysisContext, cfg, model: nn.Module, device, vs, what: str) -> list[float]:
    """Test error of each variant over the whole test set, summed over all ranks."""
    batches = ctx.test_batches(cfg.max_batches)
    total_batches = len(batches) if isinstance(batches, list) else None
    with ctx.progress(what, total_batches) as bar:
        wrong, total = variants.count_variant_errors(model, batches, vs, progress=lambda _: bar.advance())
    wrong = ctx.sum_across_ranks(wrong, device)
    total = int(ctx.sum_across_ranks(torch.tensor([total]), device))
    return (wrong.double() / total).tolist()


def _reference(cfg):
    return cfg.reference if cfg.reference in reference.NAMES else None


@register_analysis
class SingleDeletion(Analysis):
    """Test error with each block deleted in turn (its shortcut kept). A plain network's blocks
    that change the shape cannot be deleted and are left out."""

    name = "single_deletion"

    def compute(self, ctx, model, device):
        n = len(model.blocks)
        blocks = [i for i in range(n) if variants.can_delete(model.blocks[i])]
        vs = [variants.intact(n)] + [variants.deletion_variant(n, [i]) for i in blocks]
        errors = variant_errors(ctx, self.cfg, model, device, vs, "deleting each block")
        stages = stage_of_blocks(model)
        rows = [
            {"block": i, "stage": stages[i], "downsampling": bool(model.blocks[i].downsampling), "error": e}
            for i, e in zip(blocks, errors[1:])
        ]
        ctx.write("baseline_error", errors[0])
        ctx.write(self.name, rows)
        return errors[0], rows

    def report(self, ctx, model, result):
        baseline, rows = result
        ctx.log_table(
            "deletion/single", ["block", "stage", "downsampling", "error"],
            [[r["block"], r["stage"], r["downsampling"], r["error"]] for r in rows],
            line=("block", "error"), title="error with one block deleted",
        )
        ref = _reference(self.cfg)
        fig = plots.single_deletion(
            {"this run": {"baseline_error": baseline, "single_deletion": rows}},
            reference.single_deletion(ref) if ref else None,
            reference.baseline(ref) if ref else None,
        )
        ctx.log_figure("deletion/single", fig)


@register_analysis
class MultiDeletion(Analysis):
    """Test error with k random blocks deleted, k = 1..k_max, ``trials`` random sets per k."""

    name = "multi_deletion"
    uses = ("single_deletion",)

    def compute(self, ctx, model, device):
        c = self.cfg.multi_deletion
        allowed = variants.deletable_blocks(model, c.exclude_downsampling, c.exclude)
        trials = min(c.trials, 10) if self.cfg.quick else c.trials
        g = self.generator(1)
        sets = [
            (k, blocks)
            for k in range(1, min(c.k_max, len(allowed)) + 1)
            for blocks in variants.sample_deletions(allowed, k, trials, g)
        ]
        n = len(model.blocks)
        vs = [variants.intact(n)] + [variants.deletion_variant(n, b) for _, b in sets]
        errors = variant_errors(ctx, self.cfg, model, device, vs, "deleting k blocks")
        rows = [{"k": k, "blocks": b, "error": e} for (k, b), e in zip(sets, errors[1:])]
        if "baseline_error" not in ctx.results:  # single deletion's, when it ran, stays
            ctx.write("baseline_error", errors[0])
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        ctx.log_table(
            "deletion/multi", ["k", "blocks", "error"],
            [[r["k"], " ".join(map(str, r["blocks"])), r["error"]] for r in rows],
            line=("k", "error"), title="error against blocks deleted",
        )
        ref = _reference(self.cfg)
        ctx.log_figure("deletion/multi", plots.multi_deletion(rows, reference.multi_deletion_mean(ref) if ref else None))


@register_analysis
class Reorder(Analysis):
    """Test error after k random swaps of same-stage, shape-preserving blocks, k = 1..max_swaps."""

    name = "reorder"

    def compute(self, ctx, model, device):
        c = self.cfg.reorder
        n = len(model.blocks)
        groups = variants.swappable_groups(model, stage_of_blocks(model))
        if not groups:
            return None
        trials = min(c.trials, 10) if self.cfg.quick else c.trials
        g = self.generator(2)
        orders = [
            (k, variants.sample_swaps(n, groups, k, g)[0])
            for k in range(1, c.max_swaps + 1)
            for _ in range(trials)
        ]
        errors = variant_errors(ctx, self.cfg, model, device, [o for _, o in orders], "reordering blocks")
        rows = [
            {"swaps": k, "kendall_tau": variants.kendall_tau(o), "order": o, "error": e}
            for (k, o), e in zip(orders, errors)
        ]
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        ctx.log_table(
            "reorder", ["swaps", "kendall_tau", "error"],
            [[r["swaps"], r["kendall_tau"], r["error"]] for r in rows],
            line=("swaps", "error"), title="error against swaps",
        )
        ref = _reference(self.cfg)
        ctx.log_figure("reorder", plots.reorder(rows, reference.reorder_mean(ref) if ref else None))

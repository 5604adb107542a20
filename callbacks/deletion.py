"""Lesion analyses: delete one block, delete k blocks, reorder blocks, duplicate blocks (Veit et
al. Figs. 3-5). Which blocks each lesion may touch is the run's protocol (``ctx.protocol``); the
samplers and the engine are ``resens.analysis.variants``."""

from __future__ import annotations

import torch
from torch import nn

from callbacks.base import Analysis, AnalysisContext, effective, register_analysis
from resens.analysis import plots, variants
from resens.models import stage_of_blocks


def displacement_bin(n: int) -> int:
    """Width in positions of the reorder figure's displacement bins: about n/6 (9 for 54 blocks)."""
    return max(1, round(n / 6))


def variant_errors(ctx: AnalysisContext, cfg, model: nn.Module, device, vs, what: str) -> list[float]:
    """Test error of each variant over the whole test set, summed over all ranks."""
    batches = ctx.test_batches(cfg.max_batches)
    total_batches = len(batches) if isinstance(batches, list) else None
    with ctx.progress(what, total_batches) as bar:
        wrong, total = variants.count_variant_errors(model, batches, vs, progress=lambda _: bar.advance())
    wrong = ctx.sum_across_ranks(wrong, device)
    total = int(ctx.sum_across_ranks(torch.tensor([total]), device))
    return (wrong.double() / total).tolist()


def _label(ctx: AnalysisContext, model: nn.Module) -> str:
    """The run, and the protocol it follows, for a figure's legend."""
    name = ctx.cfg.name if ctx.cfg is not None else "this run"
    return f"{name}, {ctx.protocol(model).describe()}"


def _random_sets(cfg, name: str, allowed: list[int], sampler, g: torch.Generator) -> list[tuple[int, list[int]]]:
    """``(k, blocks)`` for k = 1..k_max: ``analysis.<name>.trials`` sets of k distinct blocks of
    ``allowed`` per k, drawn by ``sampler`` (capped with ``analysis.quick``: ``effective``)."""
    section, trials = cfg[name], effective(cfg, name, "trials")
    return [
        (k, blocks)
        for k in range(1, min(section.k_max, len(allowed)) + 1)
        for blocks in sampler(allowed, k, trials, g)
    ]


def _log_sets(ctx: AnalysisContext, name: str, rows: list[dict], title: str) -> None:
    """The trials of a k-block lesion as a W&B table with a line plot of error against k."""
    ctx.log_table(
        name, ["k", "blocks", "error"], [[r["k"], " ".join(map(str, r["blocks"])), r["error"]] for r in rows],
        line=("k", "error"), title=title,
    )


@register_analysis
class SingleDeletion(Analysis):
    """Test error with each block deleted in turn (its shortcut kept). A plain network's blocks
    that change the shape cannot be deleted and are left out."""

    name = "single_deletion"

    def compute(self, ctx, model, device):
        n = len(model.blocks)
        protocol = ctx.protocol(model)
        vs = [variants.intact(n)] + [variants.deletion_variant(n, [i]) for i in protocol.single]
        errors = variant_errors(ctx, self.cfg, model, device, vs, "deleting each block")
        stages = stage_of_blocks(model)
        eligible = set(protocol.multi_deletion)
        rows = [
            {"block": i, "stage": stages[i], "downsampling": bool(model.blocks[i].downsampling),
             "eligible": i in eligible, "error": e}
            for i, e in zip(protocol.single, errors[1:])
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
        fig = plots.single_deletion(
            {_label(ctx, model): {"baseline_error": baseline, "single_deletion": rows}},
            ctx.overlay(self.name, model),
        )
        ctx.log_figure("deletion/single", fig)


@register_analysis
class MultiDeletion(Analysis):
    """Test error with k random distinct blocks deleted, k = 1..k_max, ``trials`` sets per k,
    drawn uniformly among the blocks the protocol allows."""

    name = "multi_deletion"
    uses = ("single_deletion",)

    def compute(self, ctx, model, device):
        allowed = list(ctx.protocol(model).multi_deletion)
        sets = _random_sets(self.cfg, "multi_deletion", allowed, variants.sample_deletions, self.generator(1))
        n = len(model.blocks)
        vs = [variants.intact(n)] + [variants.deletion_variant(n, b) for _, b in sets]
        errors = variant_errors(ctx, self.cfg, model, device, vs, "deleting k blocks")
        rows = [{"k": k, "blocks": b, "error": e} for (k, b), e in zip(sets, errors[1:])]
        if "baseline_error" not in ctx.results:  # single deletion's, when it ran, stays
            ctx.write("baseline_error", errors[0])
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        _log_sets(ctx, "deletion/multi", rows, "error against blocks deleted")
        fig = plots.lesion_curve(rows, ctx.overlay(self.name, model), _label(ctx, model))
        ctx.log_figure("deletion/multi", fig)


@register_analysis
class Reorder(Analysis):
    """Test error after k random swaps, k = 1..max_swaps, drawn as the authors did: for each
    swap a range of the protocol uniformly, then two distinct positions in it; the pairs of a
    trial are distinct. Each trial also records Kendall's tau and the total displacement."""

    name = "reorder"

    def compute(self, ctx, model, device):
        c = self.cfg.reorder
        n = len(model.blocks)
        ranges = ctx.protocol(model).reorder_ranges
        if not ranges:
            ctx.skip(self.name, "no two blocks may trade places under the run's lesion protocol")
            return None
        g = self.generator(2)
        trials = [
            (k, variants.sample_swaps(ranges, k, g))
            for k in range(1, c.max_swaps + 1)
            for _ in range(effective(self.cfg, "reorder", "trials"))
        ]
        orders = [variants.apply_swaps(n, pairs) for _, pairs in trials]
        errors = variant_errors(ctx, self.cfg, model, device, orders, "reordering blocks")
        rows = [
            {"swaps": k, "pairs": [list(p) for p in pairs], "kendall_tau": variants.kendall_tau(order),
             "displacement": variants.total_displacement(pairs), "order": order, "error": e}
            for (k, pairs), order, e in zip(trials, orders, errors)
        ]
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        ctx.log_table(
            "reorder", ["swaps", "kendall_tau", "displacement", "error"],
            [[r["swaps"], r["kendall_tau"], r["displacement"], r["error"]] for r in rows],
            line=("swaps", "error"), title="error against swaps",
        )
        width = displacement_bin(len(model.blocks))
        fig = plots.reorder(
            rows, ctx.overlay(self.name, model),
            ctx.overlay(self.name, model, by="displacement", bin_width=width), _label(ctx, model), width,
        )
        ctx.log_figure("reorder", fig)


@register_analysis
class Duplication(Analysis):
    """Test error with k random distinct blocks each run twice in a row, k = 1..k_max,
    ``trials`` sets per k, drawn uniformly among the blocks the protocol allows (never one that
    changes the shape)."""

    name = "duplication"

    def compute(self, ctx, model, device):
        allowed = list(ctx.protocol(model).duplication)
        if not allowed:
            ctx.skip(self.name, "no block may be duplicated under the run's lesion protocol")
            return None
        sets = _random_sets(self.cfg, "duplication", allowed, variants.sample_duplications, self.generator(3))
        n = len(model.blocks)
        vs = [variants.duplication_variant(n, b) for _, b in sets]
        errors = variant_errors(ctx, self.cfg, model, device, vs, "duplicating k blocks")
        rows = [{"k": k, "blocks": b, "error": e} for (k, b), e in zip(sets, errors)]
        ctx.write(self.name, rows)
        return rows

    def report(self, ctx, model, rows):
        _log_sets(ctx, "duplication", rows, "error against blocks duplicated")
        fig = plots.lesion_curve(
            rows, ctx.overlay(self.name, model), _label(ctx, model),
            xlabel="number of blocks duplicated (each run twice)", title="Duplicating blocks",
        )
        ctx.log_figure("duplication", fig)

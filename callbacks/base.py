"""What every analysis shares: the registry, the runner, which data it sees, where results go.

An analysis is a class registered with ``@register_analysis``: ``compute`` runs on every rank
(it may use collectives: each rank measures its shard of the test set and counts are summed
across ranks) and records its results with ``ctx.write``; ``report`` runs on global rank 0 only
and turns them into tables, figures and W&B logs. One Lightning callback, ``AnalysisRunner``,
runs the analyses of a run in dependency order at the end of training (``on_train_end``, while
the model is still on its device) and at the end of ``trainer.test`` (``resens.analyze``); after
each one, rank 0 writes ``analysis.json`` and the headline numbers to the W&B summary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from resens.analysis import reference, summary
from resens.analysis.modes import full_precision
from resens.analysis.protocol import LesionProtocol, resolve_protocol
from resens.analysis.reference import Overlay

# Cache the test set in memory when it is at most this many bytes (CIFAR-10: 123 MB).
CACHE_BYTES = 4 << 30

# ``analysis.quick`` caps these settings, (section, key) of ``analysis``, at these values.
QUICK_CAPS: dict[tuple[str, str], int] = {
    ("multi_deletion", "trials"): 10,
    ("reorder", "trials"): 10,
    ("duplication", "trials"): 10,
    ("path_gradient", "samples_per_length"): 20,
    ("path_gradient", "batches"): 2,
}


def effective(cfg: DictConfig, section: str, key: str) -> int:
    """``analysis.<section>.<key>`` as the analyses use it (``cfg``: the ``analysis`` section):
    capped by :data:`QUICK_CAPS` under ``analysis.quick``."""
    value = cfg[section][key]
    cap = QUICK_CAPS.get((section, key))
    return min(value, cap) if cfg.quick and cap is not None else value


def effective_settings(cfg: DictConfig) -> dict[str, dict[str, int]]:
    """Every setting :data:`QUICK_CAPS` names, as the run uses it: ``{section: {key: value}}``."""
    out: dict[str, dict[str, int]] = {}
    for section, key in QUICK_CAPS:
        out.setdefault(section, {})[key] = effective(cfg, section, key)
    return out


class AnalysisContext:
    """What the analyses of one run share: their results so far, the test shard, the loggers."""

    def __init__(self, trainer: L.Trainer, cfg: DictConfig | None = None) -> None:
        self.trainer = trainer
        self.cfg = cfg  # the whole run config, when the module carries one
        self.results: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._test_batches: list[tuple[Tensor, Tensor]] | None = None
        self._protocol: LesionProtocol | None = None
        self._pending: dict[str, Any] = {}  # W&B logs of the current analysis, until commit()
        self._step = 0

    def protocol(self, model: torch.nn.Module) -> LesionProtocol:
        """The blocks each lesion may touch: the model family's rules (the authors'), with the
        overrides of ``analysis.protocol``; resolved once and recorded in ``analysis.json``."""
        if self._protocol is None:
            p = self.cfg.analysis.protocol if self.cfg is not None else None
            exclude = None if p is None or p.exclude is None else list(p.exclude)
            stages = None if p is None or p.reorder_stages is None else list(p.reorder_stages)
            self._protocol = resolve_protocol(model, exclude, stages)
            self.write("protocol", {
                "family": self._protocol.family,
                "description": self._protocol.describe(),
                "excluded": list(self._protocol.excluded),
                "multi_deletion": list(self._protocol.multi_deletion),
                "reorder_ranges": [list(r) for r in self._protocol.reorder_ranges],
                "duplication": list(self._protocol.duplication),
            })
        return self._protocol

    def overlay(self, analysis: str, model: torch.nn.Module, by: str = "swaps", bin_width: int = 1) -> Overlay | None:
        """The paper's curve for ``analysis`` compared like for like with this run
        (``resens.analysis.reference.overlay``), or why it is left off; recorded under
        ``analysis.json``'s ``overlays``. None when the run names no reference."""
        if self.cfg is None or self.cfg.analysis.reference is None:
            return None
        found = reference.overlay(
            self.cfg.analysis.reference, analysis, self.protocol(model), OmegaConf.to_container(self.cfg.model),
            self.cfg.data.name, by, bin_width,
        )
        key = analysis if by == "swaps" else f"{analysis}_by_{by}"
        self.write("overlays", {**self.results.get("overlays", {}), key: found.as_record()})
        return found

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def test_batches(self, max_batches: int | None) -> list[tuple[Tensor, Tensor]] | Any:
        """This rank's shard of the test set: batch j goes to rank j mod world size, so the
        union over ranks is the same whatever the number of processes."""
        if self._test_batches is not None:
            return self._test_batches
        dm = self.trainer.datamodule
        dm.setup("test")
        loader = dm.test_dataloader()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        count = len(loader) if max_batches is None else min(max_batches, len(loader))

        def shard():
            for j, batch in enumerate(loader):
                if j >= count:
                    break
                if j % world == rank:
                    yield batch[0], batch[1]

        first_x = dm.test_set[0][0]
        if first_x.numel() * 4 * len(dm.test_set) <= CACHE_BYTES:
            self._test_batches = list(shard())
            return self._test_batches
        return shard()

    def sum_across_ranks(self, tensor: Tensor, device: torch.device) -> Tensor:
        """Sum an integer count tensor over all processes (exact)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.to(device), reduce_op="sum").cpu()

    def write(self, key: str, value: Any) -> None:
        """Record ``value`` (plain JSON: numbers, strings, lists, dicts) as ``analysis.json``'s
        ``key``, on every rank: later analyses read it from ``ctx.results``."""
        self.results[key] = value

    def skip(self, name: str, reason: str) -> None:
        """Record in ``analysis.json``'s ``skipped`` that analysis ``name`` does not apply to this
        model, and why."""
        self.write("skipped", {**self.results.get("skipped", {}), name: reason})

    def save(self) -> None:
        """Write the results and timings so far into ``analysis.json`` in the run folder (keys
        already there and not written again are kept). Rank 0 only."""
        path = self.run_dir / "analysis.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(self.results)
        data.setdefault("timings_s", {}).update(self.timings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # never a half-written analysis.json

    def wandb(self):
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                return logger.experiment
        return None

    def log_table(
        self, name: str, columns: list[str], rows: list[list[Any]], line: tuple[str, str] | None = None,
        title: str = "", log_y: bool = False,
    ) -> None:
        """The rows as a W&B table and, with ``line=(x, y)``, a native line chart of y against x,
        each logged once, in this analysis's commit (:meth:`commit`):

        - x unique per row: the chart ``analysis/<name>/plot``, whose table (W&B's
          ``analysis/<name>/plot_table``) is the rows themselves;
        - x repeated (trials): the rows as ``analysis/<name>/table`` and a chart of the mean of y
          per x with its spread, mean ± one standard deviation (``summary.mean_and_spread``);
        - ``log_y``: the chart plots a ``log10_<y>`` column (W&B's line chart has no log axis).
        """
        if self.wandb() is None:
            return
        import wandb

        title = title or name
        if line is None:
            self._pending[f"analysis/{name}/table"] = wandb.Table(columns=columns, data=rows)
            return
        x, y = line
        xi, yi = columns.index(x), columns.index(y)
        if len({r[xi] for r in rows}) == len(rows):
            if log_y:
                columns = [*columns, f"log10_{y}"]
                rows = [[*r, math.log10(r[yi]) if r[yi] > 0 else math.nan] for r in rows]
                y, title = f"log10_{y}", f"{title} (log10)"
            table = wandb.Table(columns=columns, data=rows)
            self._pending[f"analysis/{name}/plot"] = wandb.plot.line(table, x, y, title=title)
            return
        self._pending[f"analysis/{name}/table"] = wandb.Table(columns=columns, data=rows)
        stats = summary.mean_and_spread([dict(zip(columns, r)) for r in rows], x, y)
        xs = [s["x"] for s in stats]
        self._pending[f"analysis/{name}/plot"] = wandb.plot.line_series(
            xs, [[s["mean"] for s in stats], [s["mean"] - s["std"] for s in stats], [s["mean"] + s["std"] for s in stats]],
            keys=[f"mean {y}", "mean - 1 sd", "mean + 1 sd"], title=f"{title} (mean ± 1 sd of the trials)", xname=x,
        )

    def log_figure(self, name: str, fig) -> None:
        """Save ``fig`` as ``<run>/figures/<name>.png`` and log it to W&B (in this analysis's commit)."""
        import matplotlib.pyplot as plt

        out = self.run_dir / "figures" / f"{name.replace('/', '_')}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150, bbox_inches="tight")
        if self.wandb() is not None:
            import wandb

            self._pending[f"analysis/{name}/figure"] = wandb.Image(str(out))
        plt.close(fig)

    def commit(self) -> None:
        """Log what the current analysis logged with ``log_table`` and ``log_figure`` as one W&B
        history step, ``analysis/step`` = 1, 2, ... (one per analysis that logged anything)."""
        run = self.wandb()
        if run is not None and self._pending:
            self._step += 1
            run.log({**self._pending, "analysis/step": self._step})
        self._pending = {}

    def log_summary(self, values: dict[str, float]) -> None:
        """Set ``analysis/<key>`` in the W&B run summary for each of ``values``."""
        run = self.wandb()
        if run is not None:
            run.summary.update({f"analysis/{k}": v for k, v in values.items()})

    def progress(self, description: str, total: int | None) -> ProgressBar:
        return ProgressBar(self.trainer, description, total)


class ProgressBar:
    """A progress bar for a long analysis, on rank 0 when the trainer shows one: a task in the
    trainer's rich progress display if it has one, else a tqdm bar. Use as a context manager."""

    def __init__(self, trainer: L.Trainer, description: str, total: int | None) -> None:
        self._rich = self._task = self._tqdm = None
        bar = trainer.progress_bar_callback
        if not trainer.is_global_zero or bar is None or not bar.is_enabled:
            return
        if isinstance(bar, RichProgressBar) and bar.progress is not None:
            self._rich = bar.progress
            self._task = self._rich.add_task(f"[bold]{description}", total=total)
        else:
            self._tqdm = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def advance(self, k: int = 1) -> None:
        if self._rich is not None:
            self._rich.advance(self._task, k)
        elif self._tqdm is not None:
            self._tqdm.update(k)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.remove_task(self._task)
        elif self._tqdm is not None:
            self._tqdm.close()


class Analysis:
    """One analysis of the paper; subclasses set ``name`` (what ``analysis.run`` lists),
    implement ``compute`` and ``report``, and are registered with ``@register_analysis``.

    ``requires``: analyses whose results ``compute`` needs; they run first, and a run that
    switches one of them off is refused (``ConfigError``) rather than silently missing a result.
    ``uses``: analyses whose results ``compute`` reads when they ran; they run first when on.
    """

    name: str = ""
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg  # the ``analysis`` section of the run config

    def compute(self, ctx: AnalysisContext, model: torch.nn.Module, device: torch.device) -> Any:
        """Every rank, with autograd on: measure, sum across ranks, ``ctx.write`` the results.
        Returns what ``report`` needs, or None when the analysis does not apply to ``model``."""
        raise NotImplementedError

    def report(self, ctx: AnalysisContext, model: torch.nn.Module, result: Any) -> None:
        """Global rank 0 only: tables, figures and W&B logs of ``compute``'s ``result``."""
        raise NotImplementedError

    def generator(self, offset: int = 0) -> torch.Generator:
        """A seeded generator, the same on every rank."""
        return torch.Generator().manual_seed(self.cfg.seed + offset)


REGISTRY: dict[str, type[Analysis]] = {}


def register_analysis(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make ``cls`` the analysis run for ``cls.name`` in ``analysis.run``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    unknown = [d for d in (*cls.requires, *cls.uses) if d not in REGISTRY]
    if unknown:
        raise ValueError(f"{cls.__name__} depends on unknown analysis '{unknown[0]}'")
    if cls.name in REGISTRY:
        raise ValueError(f"analysis '{cls.name}' is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


class AnalysisRunner(L.Callback):
    """Runs ``analyses`` in the given order (dependencies first) when training or testing ends:
    ``compute`` on every rank, then on global rank 0 ``report``, the headline numbers
    (``resens.analysis.summary.headline``) to the W&B summary and ``analysis.json``."""

    def __init__(self, analyses: Sequence[Analysis]) -> None:
        self.analyses = list(analyses)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> AnalysisContext:
        """Run every analysis on ``pl_module.model``; returns the context with the results."""
        ctx = AnalysisContext(trainer, getattr(pl_module, "cfg", None))
        model, device = pl_module.model, pl_module.device
        for analysis in self.analyses:
            start = time.perf_counter()
            # trainer.test runs its hooks in inference mode; path gradients need autograd.
            with torch.inference_mode(False), torch.enable_grad(), full_precision():
                result = analysis.compute(ctx, model, device)
            ctx.timings[analysis.name] = round(time.perf_counter() - start, 3)
            if trainer.is_global_zero:
                if result is not None:
                    analysis.report(ctx, model, result)
                ctx.commit()
                ctx.log_summary(summary.headline(ctx.results))
                ctx.save()
        return ctx

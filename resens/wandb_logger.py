"""The W&B logger of a run: Lightning's WandbLogger, created lazily, falling back to offline mode
when the server cannot be reached; the one place that knows how W&B records things.

Layout: every run of an output root logs into one W&B folder, ``<root>/wandb`` (``WANDB_DIR``
overrides the root), so ``wandb leet <root>`` shows them side by side and ``wandb sync
<root>/wandb`` uploads them all. The W&B config is the run's resolved config, given once at
``wandb.init`` (Lightning's ``log_hyperparams`` adds nothing to it). Step axes: epoch-level
metrics on ``trainer/epoch``, per-step ones on ``trainer/global_step`` (Lightning's), analysis
logs on ``analysis/step`` (one step per analysis; each chart has its own x inside).

What this relies on beyond the documented APIs is checked by ``tests/test_wandb_logger.py``:
WandbLogger forwards its ``settings`` keyword, the same ``wandb.Settings`` object, to every
``wandb.init`` it makes, and a ``wandb.init`` that raises leaves it without a run, so that the
next access to ``experiment`` tries again; offline runs record metric definitions, summaries and
artifacts in their ``.wandb`` file.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from resens.errors import ConfigError
from resens.runs import sha256_of, wandb_id

MODES = ("online", "offline", "disabled", "dryrun")
EPOCH = "trainer/epoch"  # Lightning's bare "epoch" key, renamed into the trainer's namespace
ANALYSIS_STEP = "analysis/step"  # the history step of each analysis: 1, 2, ... in run order
MODEL_ARTIFACT = "model"  # artifact type of checkpoints; name ``model-<W&B run id>``
ANALYSIS_ARTIFACT = "analysis"  # artifact type of analysis.json and the figures


@dataclass(frozen=True)
class Metric:
    """A ``define_metric``: the metric ``name`` (a trailing ``*`` matches a prefix), plotted
    against ``step``, with W&B's ``summary`` aggregation ("min", "max", "last", "min,last"...)."""

    name: str
    step: str
    summary: str | None = None


# W&B's service writes a run's records to its .wandb file every this many seconds (W&B's
# default: 15); it dies at once on SIGTERM, which SLURM sends to every process of a job, and what
# it had not written is lost.
FLUSH_INTERVAL_S = 1.0


def _flush_setting(wandb: Any) -> dict[str, float]:
    """The flush interval as a ``wandb.Settings`` keyword, where this W&B version has it."""
    name = "x_transaction_log_flush_interval"
    return {name: FLUSH_INTERVAL_S} if name in getattr(wandb.Settings, "model_fields", {}) else {}


def _service_errors() -> tuple[type[BaseException], ...]:
    """What W&B's calls raise once its service process has ended."""
    try:
        from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError
    except ImportError:
        return (ConnectionError,)
    return (ConnectionError, MailboxClosedError, HandleAbandonedError)


def checkpoint_alias(sha256: str) -> str:
    """The artifact alias that names one checkpoint file exactly, by its content."""
    return f"sha256-{sha256[:16]}"


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger whose run is created on first use (on global rank 0, when training starts:
    a run that fails its checks leaves no folder) and which logs offline instead when ``mode`` is
    online and W&B cannot be reached within ``init_timeout`` seconds."""

    def __init__(
        self, save_dir: str | Path, mode: str, init_timeout: float = 30.0, metrics: Sequence[Metric] = (),
        **kwargs: Any,
    ) -> None:
        import wandb

        # Kept: on a failed online start its mode is switched to offline for the second try.
        self._settings = wandb.Settings(mode=mode, init_timeout=init_timeout, **_flush_setting(wandb))
        self._started = False
        self._lost = False
        self._metrics = list(metrics)
        super().__init__(save_dir=str(save_dir), settings=self._settings, **kwargs)
        # Lightning always passes anonymous (None here), which wandb now warns about on every start
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if not self._started:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            try:
                run = super().experiment
            except Exception as err:  # noqa: BLE001 - any failure to reach the server
                if self._settings.mode != "online":
                    raise
                import wandb

                wandb.teardown()  # the service still holds the run id of the failed attempt
                warnings.warn(
                    f"W&B unreachable ({str(err).splitlines()[0][:120]}); logging offline instead. "
                    f"Sync later with: wandb sync {self.save_dir}/wandb/offline-run-*-{self._id}",
                    stacklevel=2,
                )
                self._settings.mode = "offline"
                run = super().experiment
            self._started = True
            self._define_metrics(run)
            return run
        return super().experiment

    def _define_metrics(self, run: Any) -> None:
        # After Lightning's own "*" on trainer/global_step: a named metric takes precedence.
        run.define_metric(EPOCH, hidden=True)
        run.define_metric(ANALYSIS_STEP, hidden=True)
        run.define_metric("analysis/*", step_metric=ANALYSIS_STEP)
        for m in self._metrics:
            run.define_metric(m.name, step_metric=m.step, summary=m.summary)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """Nothing: the W&B config is the run's resolved config, given once to ``wandb.init``
        (the module's hyperparameters would log it a second time under ``cfg``)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Lightning's metrics, with its bare ``epoch`` key logged as ``trainer/epoch``.

        With a ``step`` (the trainer's optimizer steps), that is also W&B's own ``_step``
        (``trainer/global_step`` as well, the x of every chart): the history of a resumed or
        requeued part continues at its checkpoint's step instead of restarting at 0, so the
        parts of an offline run line up when ``wandb sync`` uploads them into one run. Rows of
        one step merge; a step W&B is already past (logs after the training, which take the
        next free steps) is moved up to its current step rather than dropped."""
        metrics = dict(metrics)
        if "epoch" in metrics:
            metrics[EPOCH] = metrics.pop("epoch")
        if self._lost:
            return
        try:
            if step is None:
                super().log_metrics(metrics)
                return
            run = self.experiment
            run.log({**metrics, "trainer/global_step": step}, step=max(step, run.step))
        except _service_errors() as err:
            self._service_lost(err)

    def _service_lost(self, err: BaseException) -> None:
        """W&B's service process has ended under this one: SLURM's SIGTERM (a cancellation, a
        preemption, the time limit) reaches every process of a job, W&B's too, and it exits at
        once. Training goes on without W&B, so that it can still stop with a checkpoint."""
        import wandb

        self._lost = True
        with contextlib.suppress(Exception):
            wandb.teardown()  # else its exit hook prints a traceback
        warnings.warn(
            f"W&B's service process has ended ({type(err).__name__}); this process logs no more to "
            f"W&B. What it logged up to about {FLUSH_INTERVAL_S:g} s before is in {self.save_dir}/wandb/",
            stacklevel=2,
        )

    def log_checkpoints(self, checkpoints: Mapping[str, str | Path]) -> None:
        """Each file of ``checkpoints`` (alias -> path, e.g. ``{"best": .., "last": ..}``) as a
        version of the model artifact ``model-<run id>``, with its aliases and the alias of its
        content (:func:`checkpoint_alias`); metadata: its sha256 and file name. Offline runs
        record the artifacts too, and ``wandb sync`` uploads them. Rank 0, after training."""
        if not self._started:
            return
        import wandb

        by_content: dict[str, tuple[Path, list[str]]] = {}  # best and last may be one file's copies
        for alias, path in checkpoints.items():
            if path and Path(path).is_file():
                sha = sha256_of(path)
                by_content.setdefault(sha, (Path(path), []))[1].append(alias)
        run = self.experiment
        for sha, (path, names) in by_content.items():
            art = wandb.Artifact(f"model-{run.id}", type=MODEL_ARTIFACT, metadata={"sha256": sha, "file": path.name})
            # immutable: referenced where it lies, not copied to a staging folder (checkpoints are large)
            art.add_file(str(path), name="model.ckpt", policy="immutable")
            run.log_artifact(art, aliases=[*names, checkpoint_alias(sha)])

    def log_outputs(self, run_dir: str | Path) -> None:
        """``analysis.json`` and ``figures/*.png`` of ``run_dir`` as the artifact
        ``analysis-<run id>`` of this run (nothing when it wrote none)."""
        run_dir = Path(run_dir)
        files = [run_dir / "analysis.json", *sorted((run_dir / "figures").glob("*.png"))]
        files = [f for f in files if f.is_file()]
        if not self._started or not files:
            return
        import wandb

        run = self.experiment
        art = wandb.Artifact(f"analysis-{run.id}", type=ANALYSIS_ARTIFACT)
        for f in files:
            art.add_file(str(f), name=str(f.relative_to(run_dir)))
        run.log_artifact(art)

    def use_checkpoint(self, train_run_id: str, sha256: str) -> bool:
        """Declare the checkpoint of W&B run ``train_run_id`` with content ``sha256`` an input
        of this run (``use_artifact``), when the run is online and W&B knows the artifact;
        returns whether it did. Offline, the lineage lives in the config alone."""
        run = self.experiment
        if run.settings.mode != "online":
            return False
        import wandb

        name = f"{run.entity}/{run.project}/model-{train_run_id}:{checkpoint_alias(sha256)}"
        try:
            run.use_artifact(name, type=MODEL_ARTIFACT)
        except (wandb.errors.Error, ValueError) as err:  # not uploaded, or logged offline
            warnings.warn(f"checkpoint artifact {name} not found on W&B ({str(err).splitlines()[0][:120]})",
                          stacklevel=2)
            return False
        return True

    @property
    def started(self) -> bool:
        """Whether this process created (or adopted) its W&B run."""
        return self._started

    def finish(self, preempted: bool = False) -> None:
        """Close the W&B run, if this process has one, so that its files are complete on disk
        (offline runs are then syncable). ``preempted``: the job stops to be requeued; an online
        run is marked preempting first, so that W&B shows it as such, not as crashed."""
        if self._started and not self._lost:
            run = self.experiment
            try:
                if preempted and run.settings.mode == "online":
                    run.mark_preempting()
                run.finish()
            except _service_errors() as err:
                self._service_lost(err)


def make_logger(
    cfg: DictConfig, root: Path, run_id: str, job_type: str | None = None, resume: bool = False,
    extra_config: Mapping[str, Any] | None = None, metrics: Sequence[Metric] = (),
) -> ResilientWandbLogger:
    """The run's logger: W&B run ``run_id`` (its W&B id: ``resens.runs.wandb_id``) in the W&B
    folder ``<root>/wandb`` shared by every run of the output root ``root`` (``WANDB_DIR``
    overrides ``root``). Resumed only when ``resume`` (a resumed or requeued run), with
    ``resume="must"``: online it continues the run it names or fails (then logs offline, as when
    W&B is unreachable), never starts a new one; otherwise a new run. Its config: ``cfg`` resolved, plus ``extra_config`` (what the run resolved or traced:
    ``resolved``, ``run``, ``lineage``). ``WANDB_MODE`` overrides ``cfg.logger.mode``;
    ``WANDB_INIT_TIMEOUT`` (s, default 30) bounds the wait for the server."""
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    if mode not in MODES:
        raise ConfigError(f"logger.mode: '{mode}' is not one of online, offline, disabled")
    return ResilientWandbLogger(
        save_dir=os.environ.get("WANDB_DIR") or root,
        metrics=metrics,
        mode="offline" if mode == "dryrun" else mode,
        init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)),
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.name,
        tags=list(cfg.logger.tags),
        job_type=job_type or cfg.logger.job_type,
        name=run_id,
        id=wandb_id(run_id),
        resume="must" if resume else None,
        config={**OmegaConf.to_container(cfg, resolve=True), **(extra_config or {})},
    )

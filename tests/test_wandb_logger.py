"""``resens.wandb_logger`` with the real W&B library: what it relies on in WandbLogger and wandb
is still there, runs are created lazily, and an unreachable server means offline logging."""

from __future__ import annotations

import inspect

import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger

from resens import config
from resens.runs import WANDB_ID_MAX, lesion_run_id, wandb_id
from resens.wandb_logger import ResilientWandbLogger, make_logger
from tests.helpers import DIGITS, ROOT
from tests.wandb_records import run_files, summarize_run


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb.teardown()


def test_the_library_still_offers_what_the_adapter_uses():
    # WandbLogger: a lazily created ``experiment`` property, extra keywords go to wandb.init
    assert isinstance(inspect.getattr_static(WandbLogger, "experiment"), property)
    params = inspect.signature(WandbLogger.__init__).parameters
    assert "save_dir" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # wandb: Settings whose mode can be switched after creation, and teardown of the service
    settings = wandb.Settings(mode="online", init_timeout=3.0)
    settings.mode = "offline"
    assert (settings.mode, settings.init_timeout) == ("offline", 3.0)
    assert callable(wandb.teardown)


def test_run_is_created_on_first_use_and_finished_on_disk(tmp_path):
    cfg = config.load(ROOT / DIGITS, ["logger.mode=offline"])
    logger = make_logger(cfg, tmp_path / "run", "my.run")
    assert not (tmp_path / "run").exists() and not logger.started
    logger.log_metrics({"x": 1.0}, step=0)
    assert logger.started
    logger.finish()
    (path,) = run_files(tmp_path / "run")  # <root>/wandb/offline-run-*
    summary = summarize_run(path)
    assert summary["run_id"] == "my-run"  # made W&B-safe
    assert summary["config"]["name"] == cfg.name and "x" in summary["history_keys"]


def test_run_ids_stay_unique_and_readable_for_long_names():
    name = "imagenet-resnet200-sd-with-a-much-longer-experiment-name"
    train_run = f"{name}-20261128-221431-ab12"
    lesions = [f"{train_run}-lesion-20261128-230000-{h}" for h in ("0001", "0002")]
    ids = [wandb_id(r) for r in (train_run, *lesions)]
    assert len(set(ids)) == 3 and all(len(i) <= WANDB_ID_MAX for i in ids)
    assert all(i.startswith("imagenet-resnet200-sd") for i in ids)
    assert wandb_id("short.run") == "short-run" and wandb_id(lesions[0]) == wandb_id(lesions[0])
    assert lesion_run_id("r") != lesion_run_id("r")  # its random part: never one id within a second


def test_a_new_run_with_the_id_of_an_old_one_is_not_resumed(tmp_path):
    cfg = config.load(ROOT / DIGITS, ["logger.mode=offline"])
    assert make_logger(cfg, tmp_path, "r")._wandb_init["resume"] is None
    assert make_logger(cfg, tmp_path, "r", resume=True)._wandb_init["resume"] == "must"


def test_history_steps_are_the_trainers_so_that_requeued_parts_line_up(tmp_path):
    """Two offline parts of one run, as a requeue leaves them: the second continues W&B's
    ``_step`` at its checkpoint's step (not at 0), rows of one step merge, and a log after the
    training takes the next free step."""
    cfg = config.load(ROOT / DIGITS, ["logger.mode=offline"])
    parts = ([0, 5, 5, 9], [10, 12])  # the second part resumes from a checkpoint at step 9
    for part, steps in enumerate(parts):
        logger = make_logger(cfg, tmp_path, "r", resume=part > 0)
        for step in steps:
            logger.log_metrics({"train/loss": float(step), "epoch": step // 5}, step=step)
        logger.log_metrics({"analysis/x": 1.0})  # no step: W&B's next one
        logger.log_metrics({"late": 1.0}, step=3)  # behind W&B's step: moved up, not dropped
        logger.finish()
    files = run_files(tmp_path)
    assert len(files) == 2
    for steps, path in zip(parts, files, strict=True):
        history = summarize_run(path)["history"]
        last = steps[-1]
        assert [row["_step"] for row in history] == [*sorted(set(steps)), last + 1]
        assert [row.get("trainer/global_step") for row in history] == [*sorted(set(steps)), 3]
        assert history[-1]["late"] == 1.0 and history[-2]["analysis/x"] == 1.0


def test_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    logger = ResilientWandbLogger(tmp_path, mode="online", init_timeout=2.0, project="p", id="r1")
    with pytest.warns(UserWarning, match=r"W&B unreachable .*wandb sync .*/wandb/offline-run-\*-r1"):
        run = logger.experiment
    assert run.settings.mode == "offline" and run.id == "r1"
    assert logger.experiment is run  # created once
    logger.finish()
    assert summarize_run(run_files(tmp_path)[-1])["run_id"] == "r1"


def test_an_unknown_mode_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    cfg = config.load(ROOT / DIGITS)
    with pytest.raises(config.ConfigError, match="logger.mode: 'sometimes' is not one of"):
        make_logger(cfg, ROOT / "unused", "x")


def test_a_killed_wandb_service_stops_the_logging_not_the_training(tmp_path):
    """SLURM's SIGTERM reaches W&B's service process too, which exits at once. What was logged
    a flush interval before is on disk; later logs and the finish are dropped with a warning."""
    import os
    import signal
    import subprocess
    import time

    from resens.wandb_logger import FLUSH_INTERVAL_S
    from tests.wandb_records import read_records

    cfg = config.load(ROOT / DIGITS, ["logger.mode=offline"])
    logger = make_logger(cfg, tmp_path, "killed")
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.log_metrics({"train/loss": 0.5}, step=2)  # commits step 1's row
    time.sleep(3 * FLUSH_INTERVAL_S)
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    assert children, "W&B's service process runs as a child of this one"
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    time.sleep(1)
    with pytest.warns(UserWarning, match=r"W&B's service process has ended .*logs no more to W&B"):
        logger.log_metrics({"train/loss": 0.25}, step=3)
    logger.log_metrics({"train/loss": 0.125}, step=4)  # silently dropped from now on
    logger.finish()
    (path,) = run_files(tmp_path)
    steps = [r.history.step.num for r in read_records(path) if r.WhichOneof("record_type") == "history"]
    assert steps == [1]

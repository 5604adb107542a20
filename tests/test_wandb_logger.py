"""``resens.wandb_logger`` with the real W&B library: what it relies on in WandbLogger and wandb
is still there, runs are created lazily, and an unreachable server means offline logging."""

from __future__ import annotations

import inspect

import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger

from resens import config
from resens.wandb_logger import ResilientWandbLogger, make_logger
from tests.helpers import DIGITS, ROOT
from tests.wandb_records import run_file, summarize_run


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
    summary = summarize_run(run_file(tmp_path / "run"))
    assert summary["run_id"] == "my-run"  # made W&B-safe
    assert summary["config"]["name"] == cfg.name and "x" in summary["history_keys"]


def test_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    logger = ResilientWandbLogger(tmp_path, mode="online", init_timeout=2.0, project="p", id="r1")
    with pytest.warns(UserWarning, match=r"W&B unreachable .*wandb sync .*/wandb/offline-run-\*"):
        run = logger.experiment
    assert run.settings.mode == "offline" and run.id == "r1"
    assert logger.experiment is run  # created once
    logger.finish()
    assert summarize_run(run_file(tmp_path))["run_id"] == "r1"


def test_an_unknown_mode_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    cfg = config.load(ROOT / DIGITS)
    with pytest.raises(config.ConfigError, match="logger.mode: 'sometimes' is not one of"):
        make_logger(cfg, ROOT / "unused", "x")

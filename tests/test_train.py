"""A real Lightning fit on the embedded digits, with real checkpoints and real W&B offline files."""

import json
from pathlib import Path

import pytest
import torch

from resens import config
from resens.analyze import analyze
from resens.checkpoint import load_checkpoint
from resens.module import lr_at
from resens.train import train
from tests.wandb_records import run_file, summarize_run

CONFIGS = Path(__file__).parent.parent / "configs"
TINY = [
    "model.depth=8", "model.width=8", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "analysis.run=[single_deletion]", "logger.group=tests",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = config.load(CONFIGS / "digits_resnet.yaml", [f"out_dir={out}", *TINY])
    return train(cfg)


def test_run_folder_holds_config_checkpoints_and_analysis(run_dir):
    assert (run_dir / "config.yaml").is_file()
    assert config.load(run_dir / "config.yaml").model.depth == 8
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    data = json.loads((run_dir / "analysis.json").read_text())
    assert 0 <= data["baseline_error"] < 0.9
    rows = data["single_deletion"]
    assert [r["block"] for r in rows] == [0, 1, 2]
    assert [r["downsampling"] for r in rows] == [False, True, True]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["error"] <= 1 for r in rows)
    assert (run_dir / "figures" / "deletion_single.png").stat().st_size > 10_000


def test_checkpoint_loads_safely_and_carries_the_config(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["hyper_parameters"]["cfg"]["model"]["depth"] == 8
    assert ckpt["epoch"] == 1
    assert any(k.startswith("model.blocks.2.branch") for k in ckpt["state_dict"])


def test_wandb_offline_run_records_config_metrics_and_analysis(run_dir):
    run = summarize_run(run_file(run_dir))
    assert run["run_id"] == run_dir.name
    assert run["group"] == "tests" and run["job_type"] == "train"
    assert run["config"]["model"]["depth"] == 8
    keys = run["history_keys"]
    assert {"train/loss_step", "train/error", "train/images_per_s", "val/error", "lr-SGD"} <= keys
    assert any(k.startswith("analysis/deletion/single/table") for k in keys)
    assert any(k.startswith("analysis/deletion/single/figure") for k in keys)
    assert "analysis/baseline_error" in run["summary"]


def test_lesion_on_the_checkpoint_logs_an_analysis_job(run_dir, tmp_path):
    out = analyze(run_dir / "checkpoints" / "last.ckpt", out=str(tmp_path / "lesion"),
                  overrides=["trainer.enable_progress_bar=false"])
    data = json.loads((out / "analysis.json").read_text())
    trained = json.loads((run_dir / "analysis.json").read_text())
    assert data["single_deletion"] == trained["single_deletion"]
    run = summarize_run(run_file(out))
    assert run["job_type"] == "analysis" and run["group"] == "tests"
    assert "test/error" in run["history_keys"]


def test_learning_rate_schedule_follows_the_recipe():
    o = config.load(CONFIGS / "cifar10_resnet110_he.yaml", ["data.download=true"]).optim
    steps = 391  # CIFAR-10 at batch 128
    assert lr_at(o, 0.1, steps, 0) == pytest.approx(0.01)
    assert lr_at(o, 0.1, steps, 399) == pytest.approx(0.01)
    assert lr_at(o, 0.1, steps, 400) == pytest.approx(0.1)
    assert lr_at(o, 0.1, steps, 82 * steps - 1) == pytest.approx(0.1)
    assert lr_at(o, 0.1, steps, 82 * steps) == pytest.approx(0.01)
    assert lr_at(o, 0.1, steps, 123 * steps) == pytest.approx(0.001)


def test_training_learns_digits(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert torch.isfinite(torch.stack([v.float().sum() for v in ckpt["state_dict"].values() if torch.is_tensor(v)])).all()
    assert json.loads((run_dir / "analysis.json").read_text())["baseline_error"] < 0.5


def test_speed_options_keep_results_and_checkpoint_keys():
    from resens.errors import ConfigError
    from resens.module import ResNetClassifier

    def module(*overrides):
        cfg = config.load(CONFIGS / "digits_resnet.yaml", ["model.depth=8", "model.width=8", *overrides])
        torch.manual_seed(0)
        return ResNetClassifier(config.to_dict(cfg), 10, 1, 64).eval()

    plain, fast = module(), module("model.channels_last=true")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(plain(x), fast(x))
    assert plain.state_dict().keys() == fast.state_dict().keys()
    with pytest.raises(ConfigError, match="model.compile"):
        module("model.compile=reduce-overhead", "model.stochastic_depth=0.5")


@pytest.mark.parametrize(
    "overrides, strategy",
    [
        (["model.stochastic_depth=0.5", "trainer.devices=2", "trainer.strategy=ddp"], "ddp_find_unused_parameters_true"),
        (["model.stochastic_depth=0.5", "trainer.devices=2"], "ddp_find_unused_parameters_true"),  # auto picks DDP
        (["model.stochastic_depth=0.5", "trainer.devices=1"], "auto"),  # one process: no DDP
        (["model.stochastic_depth=0.5", "trainer.devices=2", "trainer.strategy=ddp_spawn"], "ddp_spawn"),
        (["trainer.devices=2", "trainer.strategy=ddp"], "ddp"),  # every branch gets its gradient
    ],
)
def test_stochastic_depth_under_ddp_looks_for_unused_parameters(overrides, strategy):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from resens.train import trainer_kwargs

    cfg = config.load(CONFIGS / "digits_resnet.yaml", overrides)
    kwargs = trainer_kwargs(cfg)
    assert kwargs["strategy"] == strategy
    if strategy == "ddp_find_unused_parameters_true":  # a name Lightning knows
        trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
        assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2

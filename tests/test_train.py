"""A real Lightning fit on the embedded digits, with real checkpoints and real W&B offline files."""

import json
from pathlib import Path

import pytest
import torch

from resens import config
from resens.analyze import analyze
from resens.checkpoint import load_checkpoint
from resens.module import lr_at
from resens.runs import sha256_of, wandb_id
from resens.train import train
from tests.wandb_records import check_headline_summary, run_file, run_files, summarize_run

CONFIGS = Path(__file__).parent.parent / "configs"
TINY = [
    "model.depth=8", "model.width=8", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "analysis.run=[single_deletion,multi_deletion,path_gradient,effective_paths]", "analysis.quick=true",
    "analysis.multi_deletion.trials=3", "logger.group=tests",
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
    assert run["run_id"] == wandb_id(run_dir.name) and run["name"] == run_dir.name
    assert run["group"] == "tests" and run["job_type"] == "train"
    assert run["config"]["model"]["depth"] == 8
    assert "cfg" not in run["config"]  # the config is logged once
    assert run["config"]["run"] == {
        "id": run_dir.name, "wandb_id": wandb_id(run_dir.name), "dir": str(run_dir), "analysis": "end_of_training",
        "resumed_from": None,
    }
    resolved = run["config"]["resolved"]
    assert resolved["eval_split"] == "test"  # digits has no validation split: the test set evaluates
    assert (resolved["num_classes"], resolved["in_channels"], resolved["world_size"]) == (10, 1, 1)
    assert resolved["analysis"]["multi_deletion"]["trials"] == 3 and resolved["analysis"]["reorder"]["trials"] == 10
    keys = run["history_keys"]
    assert {"train/loss_step", "train/error", "train/images_per_s", "test/error", "train/lr", "trainer/epoch"} <= keys
    assert not {"lr-SGD", "epoch", "val/error"} & keys
    assert any(k.startswith("analysis/deletion/single/plot_table") for k in keys)
    assert any(k.startswith("analysis/deletion/single/figure") for k in keys)


def test_wandb_step_axes_and_summaries(run_dir):
    run = summarize_run(run_file(run_dir))
    metrics = run["metrics"]
    for name in ("test/error", "test/loss", "train/error", "train/loss_epoch", "train/images_per_s"):
        assert metrics[name]["step"] == "trainer/epoch", name
    assert metrics["test/error"]["summary"] == ["min", "last"]
    assert metrics["train/images_per_s"]["summary"] == ["max"]
    assert metrics["analysis/*"]["step"] == "analysis/step"
    errors = [h["test/error"] for h in run["history"] if "test/error" in h]
    assert len(errors) == 2 and all(h["trainer/epoch"] in (0, 1) for h in run["history"] if "test/error" in h)
    summary = run["summary"]
    assert summary["test/error"] == {"min": min(errors), "last": errors[-1]}
    assert summary["test/best_error"] == pytest.approx(min(errors))
    assert errors[summary["test/best_epoch"]] == pytest.approx(min(errors))
    assert summary["test/final_error"] == pytest.approx(errors[-1])


def test_each_analysis_is_one_commit_and_each_table_is_logged_once(run_dir):
    run = summarize_run(run_file(run_dir))
    steps = [h for h in run["history"] if "analysis/step" in h]
    assert [h["analysis/step"] for h in steps] == [1, 2, 3, 4]  # one per analysis that logged
    logged = [k.rsplit("/", 1)[0] for h in steps for k in h if k.endswith("/_type")]
    assert len(logged) == len(set(logged))  # every table and figure in one step only
    assert {"analysis/deletion/single/plot_table", "analysis/paths/gradient/plot_table"} <= set(logged)
    assert not any(k.startswith("analysis/") for h in run["history"] if "analysis/step" not in h for k in h)
    # the path-gradient chart plots log10 of the norm (W&B's line chart has no log axis)
    visual = run["config"]["_wandb/visualize/analysis/paths/gradient/plot"]
    assert visual["panel_config"]["fieldSettings"]["y"] == "log10_mean_norm"


def test_documented_summary_keys_are_in_the_run_summary(run_dir):
    found = check_headline_summary(run_dir)
    assert {"analysis/baseline_error", "analysis/paths/gradient/decay_per_block",
            "analysis/paths/effective/share_of_gradient", "test/best_error", "test/final_error"} <= found


def test_checkpoints_and_outputs_are_artifacts(run_dir):
    run = summarize_run(run_file(run_dir))
    models = [a for a in run["artifacts"] if a["type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{wandb_id(run_dir.name)}"}
    aliases = {alias for a in models for alias in a["aliases"]}
    assert {"best", "last"} <= aliases
    last_sha = sha256_of(run_dir / "checkpoints" / "last.ckpt")
    (last,) = [a for a in models if "last" in a["aliases"]]
    assert last["metadata"]["sha256"] == last_sha and f"sha256-{last_sha[:16]}" in last["aliases"]
    (outputs,) = [a for a in run["artifacts"] if a["type"] == "analysis"]
    assert "analysis.json" in outputs["files"] and "figures/deletion_single.png" in outputs["files"]


def test_lesion_on_the_checkpoint_logs_an_analysis_job_traced_to_its_training_run(run_dir):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    outs = [analyze(ckpt, overrides=["trainer.enable_progress_bar=false", "analysis.run=[single_deletion]"])
            for _ in range(2)]
    assert outs[0] != outs[1] and all(o.parent == run_dir for o in outs)
    data = json.loads((outs[0] / "analysis.json").read_text())
    trained = json.loads((run_dir / "analysis.json").read_text())
    assert data["single_deletion"] == trained["single_deletion"]
    train_run = summarize_run(run_file(run_dir))
    lesions = [summarize_run(run_file(o)) for o in outs]
    assert len({r["run_id"] for r in lesions}) == 2  # two lesion runs of one checkpoint never merge
    run = lesions[0]
    assert run["job_type"] == "analysis" and run["group"] == "tests"
    assert run["config"]["logger"]["job_type"] == "analysis" and run["config"]["out_dir"] == str(outs[0])
    assert run["config"]["run"]["analysis"] == "lesion"
    assert "test/error" in run["history_keys"]
    lineage = run["config"]["lineage"]
    assert lineage["checkpoint"] == str(ckpt.resolve()) and lineage["checkpoint_sha256"] == sha256_of(ckpt)
    assert lineage["train_run"] == {
        "id": run_dir.name, "wandb_id": train_run["run_id"], "name": train_run["name"],
        "group": train_run["group"], "dir": str(run_dir),
    }
    # the checkpoint artifact the training run logged carries the same content hash
    assert any(a["metadata"].get("sha256") == lineage["checkpoint_sha256"] for a in train_run["artifacts"])
    # one W&B folder for the output root: the training run and its lesion runs side by side
    assert len(run_files(run_dir.parent)) == 3


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

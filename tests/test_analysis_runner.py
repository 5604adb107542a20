"""The analysis registry and runner: dependency order, refused configs, rank-0-only reports."""

import json
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.utilities.rank_zero import rank_zero_only

from callbacks import (
    REGISTRY,
    Analysis,
    AnalysisRunner,
    analysis_names,
    analysis_order,
    build_analysis_callbacks,
    register_analysis,
)
from resens import config
from resens.analysis.catalog import run_order
from resens.errors import ConfigError
from resens.models import build_model
from resens.train import train

CONFIGS = Path(__file__).parent.parent / "configs"


def test_the_registry_is_what_the_config_validates_against():
    assert analysis_names() == tuple(REGISTRY) == config.analysis_names()
    assert set(analysis_names()) >= {"single_deletion", "multi_deletion", "reorder", "duplication",
                                     "path_lengths", "path_gradient", "effective_paths", "stochastic_depth"}
    for cls in REGISTRY.values():
        assert set(cls.requires) | set(cls.uses) <= set(analysis_names())
    assert REGISTRY["effective_paths"].requires == ("path_gradient",)


def test_register_analysis_refuses_nameless_duplicate_and_dangling_analyses():
    class Unknown(Analysis):
        pass

    class Twice(Analysis):
        name = "single_deletion"

    class BadDependency(Analysis):
        name = "new_analysis"
        requires = ("no_such_analysis",)

    for cls, needle in ((Unknown, "has no name"), (Twice, "registered twice"), (BadDependency, "unknown analysis")):
        with pytest.raises(ValueError, match=needle):
            register_analysis(cls)
    assert "new_analysis" not in REGISTRY and REGISTRY["single_deletion"].__name__ == "SingleDeletion"


def test_order_follows_the_declared_dependencies_not_the_order_of_analysis_run():
    forward = ["single_deletion", "multi_deletion", "path_gradient", "effective_paths", "stochastic_depth"]
    expected = analysis_order(forward)
    assert expected == forward
    assert analysis_order(forward[::-1]) == expected
    assert analysis_order(["stochastic_depth", "path_lengths", "reorder"]) == ["reorder", "path_lengths", "stochastic_depth"]
    assert analysis_order(["duplication", "reorder"]) == ["reorder", "duplication"]
    cfg = config.load(None, ["data.name=synthetic", "analysis.run=[effective_paths,single_deletion,path_gradient]"])
    (runner,) = build_analysis_callbacks(cfg)
    assert [a.name for a in runner.analyses] == ["single_deletion", "path_gradient", "effective_paths"]
    assert build_analysis_callbacks(config.load(None, ["data.name=synthetic", "analysis.run=[]"])) == []


def test_run_order_puts_what_is_used_first_when_it_runs_and_refuses_cycles():
    requires = {"effective_paths": ("path_gradient",)}
    uses = {"single_deletion": ("reorder",)}
    listing = ("single_deletion", "reorder", "path_gradient", "effective_paths")
    assert run_order(["single_deletion", "reorder"], listing, requires, uses) == ["reorder", "single_deletion"]
    assert run_order(["single_deletion"], listing, requires, uses) == ["single_deletion"]
    with pytest.raises(ValueError, match="cycle"):
        run_order(["reorder", "single_deletion"], listing, {"reorder": ("single_deletion",)}, uses)
    with pytest.raises(ConfigError, match="unknown analysis 'nope'"):
        run_order(["nope"], listing, requires, uses)


def test_a_required_analysis_switched_off_is_refused_in_one_line_before_training(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_analysis_callbacks(config.load(None, ["data.name=synthetic", "analysis.run=[single_deletion,effective_paths]"]))
    msg = str(err.value)
    assert "\n" not in msg and "'effective_paths' requires 'path_gradient'" in msg
    cfg = config.load(CONFIGS / "digits_resnet.yaml", [f"out_dir={tmp_path}", "analysis.run=[effective_paths]"])
    with pytest.raises(ConfigError, match="requires 'path_gradient'"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # no run folder, no W&B run


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build_model("cifar_resnet", depth=8, width=4, stochastic_depth=0.5)


def _trainer(root: Path, rank: int, monkeypatch: pytest.MonkeyPatch) -> L.Trainer:
    """A real Trainer of a 2-process DDP run, as process ``rank`` sees it (nothing launched: the
    analyses below use no collectives)."""
    # setting the rank sets Lightning's process-wide rank_zero_only.rank: restored after the test
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=str(root),
    )
    trainer.strategy.cluster_environment.set_global_rank(rank)
    assert trainer.global_rank == rank and trainer.world_size == 2
    return trainer


@pytest.mark.parametrize("rank", [0, 1])
def test_compute_runs_on_every_rank_and_report_on_rank_zero_only(tmp_path, rank, monkeypatch):
    reported = []

    class Probe(Analysis):
        name = "reorder"  # not registered: the runner takes any Analysis

        def compute(self, ctx, model, device):
            ctx.write("probe", ctx.results["stochastic_depth"]["survival_probs"])
            return "measured"

        def report(self, ctx, model, result):
            reported.append(result)

    cfg = config.load(None, ["data.name=synthetic", "analysis.run=[path_lengths,stochastic_depth]"]).analysis
    (built,) = build_analysis_callbacks(config.load(None, ["data.name=synthetic", "analysis.run=[stochastic_depth,path_lengths]"]))
    runner = AnalysisRunner([*built.analyses, Probe(cfg)])
    module = _Module()
    probs = [b.survival_prob for b in module.model.blocks]
    assert len(probs) == 3 and probs[-1] == 0.5
    ctx = runner.run(_trainer(tmp_path, rank, monkeypatch), module)
    # every rank computed and recorded every result: later analyses read them on every rank
    assert set(ctx.results) == {"path_lengths", "stochastic_depth", "probe"}
    assert ctx.results["probe"] == probs
    assert set(ctx.timings) == {"path_lengths", "stochastic_depth", "reorder"}
    if rank == 0:
        assert reported == ["measured"]
        data = json.loads((tmp_path / "analysis.json").read_text())
        assert data["probe"] == probs and data["path_lengths"] == ctx.results["path_lengths"]
        assert set(data["timings_s"]) == {"path_lengths", "stochastic_depth", "reorder"}
        assert {p.name for p in (tmp_path / "figures").iterdir()} == {"paths_lengths.png", "stochastic_depth.png"}
    else:
        assert reported == [] and list(tmp_path.iterdir()) == []

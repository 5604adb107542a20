"""The lesion analyses end to end: protocols, duplication and reordering from a real training run
and from `make lesion`, and paper overlays that compare like with like."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resens import config
from resens.analysis import plots, reference
from resens.analysis.protocol import resolve_protocol
from resens.models import cifar_resnet, imagenet_resnet
from resens.train import train
from tests.wandb_records import check_headline_summary, run_file, summarize_run

ROOT = Path(__file__).parent.parent
LESIONS = [
    "model.depth=20", "model.width=8", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "analysis.run=[single_deletion,multi_deletion,reorder,duplication]", "analysis.quick=true",
    "analysis.multi_deletion.k_max=3", "analysis.multi_deletion.trials=3", "analysis.reorder.max_swaps=3",
    "analysis.reorder.trials=3", "analysis.duplication.k_max=3", "analysis.duplication.trials=4",
    "logger.group=tests",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(config.load(ROOT / "configs" / "digits_resnet.yaml", [f"out_dir={out}", *LESIONS]))


def test_a_run_records_its_protocol_and_follows_it(run_dir):
    data = json.loads((run_dir / "analysis.json").read_text())
    # digits ResNet-20: 3 stages of 3 blocks; the authors' rule leaves out each stage's first block
    assert data["protocol"]["description"] == "authors' protocol"
    assert data["protocol"]["excluded"] == [0, 3, 6]
    assert data["protocol"]["reorder_ranges"] == [[1, 2], [4, 5], [7, 8]]
    allowed = set(data["protocol"]["multi_deletion"])
    assert all(set(r["blocks"]) <= allowed and len(set(r["blocks"])) == r["k"] for r in data["multi_deletion"])
    assert [r["eligible"] for r in data["single_deletion"]] == [b not in (0, 3, 6) for b in range(9)]
    for r in data["reorder"]:
        assert len(r["pairs"]) == r["swaps"] and len({tuple(p) for p in r["pairs"]}) == r["swaps"]
        assert all(any(lo <= a <= hi and lo <= b <= hi for lo, hi in [(1, 2), (4, 5), (7, 8)]) for a, b in r["pairs"])
        assert r["displacement"] == sum(abs(a - b) for a, b in r["pairs"])


def test_an_analysis_that_does_not_apply_says_why(tmp_path):
    out = tmp_path / "runs"
    run = train(config.load(ROOT / "configs" / "digits_plain.yaml", [
        f"out_dir={out}", "model.depth=14", "model.width=4", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "analysis.run=[reorder,path_lengths]", "logger.group=tests",
    ]))
    skipped = json.loads((run / "analysis.json").read_text())["skipped"]
    # depth 14: two blocks per stage, the first of each left out: nothing to reorder; no paths
    assert set(skipped) == {"reorder", "path_lengths"} and "protocol" in skipped["reorder"]


def test_duplication_runs_from_the_callback(run_dir):
    data = json.loads((run_dir / "analysis.json").read_text())
    rows = data["duplication"]
    assert sorted({r["k"] for r in rows}) == [1, 2, 3] and len(rows) == 12
    assert all(set(r["blocks"]) <= set(data["protocol"]["duplication"]) for r in rows)
    assert all(0 <= r["error"] <= 1 for r in rows)
    assert "duplication/mean_error_k1" in json.dumps(summarize_run(run_file(run_dir))["summary"])
    assert (run_dir / "figures" / "duplication.png").stat().st_size > 10_000
    assert (run_dir / "figures" / "reorder.png").stat().st_size > 10_000
    keys = summarize_run(run_file(run_dir))["history_keys"]
    assert any(k.startswith("analysis/duplication/table") for k in keys)


def test_every_headline_number_is_in_the_summary_and_documented(run_dir):
    found = check_headline_summary(run_dir)
    for k in (1, 2, 3):
        assert {f"analysis/deletion/multi/mean_error_k{k}", f"analysis/duplication/mean_error_k{k}",
                f"analysis/reorder/mean_error_swaps{k}"} <= found
    assert {"analysis/deletion/single/mean_error", "analysis/deletion/single/max_error"} <= found


def test_trial_charts_plot_the_mean_and_spread_and_keep_the_raw_trials(run_dir):
    run = summarize_run(run_file(run_dir))
    for name in ("deletion/multi", "reorder", "duplication"):
        visual = run["config"][f"_wandb/visualize/analysis/{name}/plot"]
        assert visual["panel_config"]["panelDefId"] == "wandb/lineseries/v0", name
        assert any(k.startswith(f"analysis/{name}/table/") for k in run["history_keys"]), name
    assert run["summary"]["analysis/reorder/table/nrows"] == 9  # 3 swaps x 3 trials, raw


def test_make_lesion_runs_duplication_and_says_why_the_overlay_is_off(run_dir, tmp_path):
    out = tmp_path / "lesion"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    args = "analysis.run=[duplication] analysis.reference=cifar10_resnet110 trainer.enable_progress_bar=false"
    done = subprocess.run(
        ["make", "-s", "lesion", f"CKPT={run_dir / 'checkpoints' / 'last.ckpt'}", f"OUT={out}", f"ARGS={args}",
         f"PY={sys.executable}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "analysis.json").read_text())
    trained = json.loads((run_dir / "analysis.json").read_text())
    assert data["duplication"] == trained["duplication"]  # same seed, same draws, same errors
    record = data["overlays"]["duplication"]
    assert record["compared_with"] is None and "digits" in record["left_off"]
    assert summarize_run(run_file(out))["job_type"] == "analysis"


def _cifar_model_cfg(**kw):
    return {"arch": "cifar_resnet", "depth": 110, "preact": True, **kw}


def test_overlays_compare_like_with_like():
    model = cifar_resnet(110, preact=True)
    authors = resolve_protocol(model)
    multi = reference.overlay("cifar10_resnet110", "multi_deletion", authors, _cifar_model_cfg(), "cifar10")
    assert multi.curve[10] == pytest.approx(0.205, abs=5e-4) and multi.curve[20] == pytest.approx(0.590, abs=5e-4)
    assert multi.label == "Veit et al. 2016: pre-act ResNet-110, CIFAR-10, authors' protocol"
    # block 1 (0-based 0), the first block of stage 1, allowed: its runs come back into the curve
    everything = resolve_protocol(model, exclude=[18, 36])
    wider = reference.overlay("cifar10_resnet110", "multi_deletion", everything, _cifar_model_cfg(), "cifar10")
    assert wider.curve[10] == pytest.approx(0.248, abs=5e-4) and "custom protocol" in wider.label
    # ... but the authors never reordered or duplicated the first blocks: nothing to compare with
    for analysis in ("reorder", "duplication"):
        left = reference.overlay("cifar10_resnet110", analysis, everything, _cifar_model_cfg(), "cifar10")
        assert left.curve is None and "first blocks of stages" in left.note
    # He et al.'s post-activation network is not the one the authors measured
    post = reference.overlay("cifar10_resnet110", "single_deletion", authors, _cifar_model_cfg(preact=False), "cifar10")
    assert post.curve is None and "preact" in post.note
    swaps = reference.overlay("cifar10_resnet110", "reorder", authors, _cifar_model_cfg(), "cifar10")
    assert [round(100 * swaps.curve[s], 1) for s in (1, 5, 10)] == [9.7, 26.6, 46.2]
    imagenet = resolve_protocol(imagenet_resnet(200, width=4))
    dup = reference.overlay("imagenet_resnet200", "duplication", imagenet,
                            {"arch": "imagenet_resnet", "depth": 200, "width": 4}, "imagenet")
    assert dup.curve is None and "width" in dup.note


def test_a_figure_says_why_its_overlay_is_left_off():
    left = reference.Overlay(None, note="paper overlay left off: the run uses digits, the authors' data is cifar10")
    rows = [{"k": k, "blocks": [k], "error": 0.1 * k} for k in (1, 2, 3)]
    fig = plots.lesion_curve(rows, left)
    assert [t.get_text() for t in fig.texts] == [left.note]
    drawn = reference.Overlay({1: 0.1, 2: 0.2}, label="Veit et al. 2016: pre-act ResNet-110")
    fig = plots.lesion_curve(rows, drawn)
    assert not fig.texts
    assert "Veit et al. 2016: pre-act ResNet-110" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

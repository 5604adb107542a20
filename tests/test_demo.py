"""The paper's first finding on real data (scikit-learn's digits), at a size that runs in well
under a minute: deleting one block barely moves a ResNet, deleting one block ruins a plain net."""

import json
from pathlib import Path

import pytest

from resens.analysis import summary
from resens.demo import run_demo


@pytest.mark.slow
def test_demo_shows_resnets_survive_deletion_and_plain_networks_do_not(tmp_path):
    results = run_demo(tmp_path, ["model.depth=20", "trainer.max_epochs=10", "analysis.run=[single_deletion]",
                                  "trainer.enable_progress_bar=false"])
    resnet, plain = results["ResNet"], results["plain"]
    assert resnet["run_dir"] != plain["run_dir"]
    for r in (resnet, plain):
        assert json.loads((Path(r["run_dir"]) / "analysis.json").read_text())["single_deletion"] == r["single_deletion"]

    def mean_deleted(r):
        # the blocks random lesions may touch: the authors' headline leaves out each stage's
        # first block (deleting block 0 of a pre-activation ResNet is catastrophic, 42% for theirs)
        return summary.single_deletion_mean_error(r)

    assert resnet["baseline_error"] < 0.1 and plain["baseline_error"] < 0.3
    assert mean_deleted(resnet) - resnet["baseline_error"] < 0.1
    assert mean_deleted(plain) > 0.6
    assert (tmp_path / "single_deletion_resnet_vs_plain.png").stat().st_size > 10_000
    text = (tmp_path / "summary.txt").read_text()
    assert "delete 1 block: mean error" in text and "ResNet" in text
    assert "lesions follow the authors' protocol" in text and "compared with the paper: nothing" in text

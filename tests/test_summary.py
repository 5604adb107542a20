"""The headline numbers, and the stochastic-depth aggregation, on a small hand-made analysis.json."""

import math

import pytest

from resens.analysis import summary
from resens.analysis.paths import effective_path_survival
from resens.analysis.stochastic_depth import summarize_stochastic_depth
from resens.demo import summarize

RESULTS = {
    "baseline_error": 0.05,
    "single_deletion": [
        {"block": 0, "stage": 0, "downsampling": False, "error": 0.06},
        # a downsampling block: the worst error, but in neither the mean nor the max
        {"block": 1, "stage": 1, "downsampling": True, "error": 0.9},
        {"block": 2, "stage": 1, "downsampling": False, "error": 0.10},
    ],
    "multi_deletion": [
        {"k": 2, "blocks": [0, 2], "error": 0.4},
        {"k": 1, "blocks": [0], "error": 0.1},
        {"k": 1, "blocks": [2], "error": 0.2},
    ],
    "reorder": [
        {"swaps": 1, "kendall_tau": 0.9, "order": [1, 0, 2], "error": 0.1},
        {"swaps": 2, "kendall_tau": 0.3, "order": [2, 0, 1], "error": 0.5},
        {"swaps": 1, "kendall_tau": 0.9, "order": [0, 2, 1], "error": 0.3},
    ],
    "path_gradient": [
        {"length": 0, "samples": 3, "mean_norm": 0.0, "std_norm": 0.0},  # no gradient: not an end
        {"length": 1, "samples": 3, "mean_norm": 8.0, "std_norm": 1.0},
        {"length": 2, "samples": 3, "mean_norm": 4.0, "std_norm": 1.0},
        {"length": 3, "samples": 3, "mean_norm": 1.0, "std_norm": 1.0},
    ],
    "effective_paths": {"lengths": [1, 2], "share_of_gradient": 0.93, "share_of_paths": 0.75, "target_share": 0.9},
}


def test_single_deletion_mean_and_max_leave_out_the_same_downsampling_blocks():
    assert summary.single_deletion_errors(RESULTS) == {0: 0.06, 2: 0.10}
    assert summary.single_deletion_mean_error(RESULTS) == pytest.approx(0.08)
    assert summary.single_deletion_max_error(RESULTS) == 0.10


def test_means_by_k_and_by_swaps_in_increasing_order():
    assert list(summary.multi_deletion_mean_error(RESULTS).items()) == [(1, pytest.approx(0.15)), (2, 0.4)]
    assert summary.reorder_mean_error(RESULTS) == {1: pytest.approx(0.2), 2: 0.5}
    assert summary.errors_by(RESULTS["reorder"], "swaps") == {1: [0.1, 0.3], 2: [0.5]}


def test_gradient_decay_is_the_log_linear_rate_between_the_measured_ends():
    first, last = summary.gradient_ends(RESULTS)
    assert (first["length"], last["length"]) == (1, 3)
    # 8 -> 1 over two blocks: 1/sqrt(8) per block
    assert summary.gradient_decay_per_block(RESULTS) == pytest.approx(8**-0.5, rel=1e-12)
    by_length = summary.gradient_norm_by_length(RESULTS, 4)
    assert by_length[:4] == [0.0, 8.0, 4.0, 1.0] and math.isnan(by_length[4])


def test_headline_holds_every_number_under_flat_keys():
    assert summary.headline(RESULTS) == {
        "baseline_error": 0.05,
        "deletion/single/mean_error": pytest.approx(0.08),
        "deletion/single/max_error": 0.10,
        "deletion/multi/mean_error_k1": pytest.approx(0.15),
        "deletion/multi/mean_error_k2": 0.4,
        "reorder/mean_error_swaps1": pytest.approx(0.2),
        "reorder/mean_error_swaps2": 0.5,
        "paths/gradient/decay_per_block": pytest.approx(8**-0.5),
        "paths/effective/lo": 1,
        "paths/effective/hi": 2,
        "paths/effective/share_of_gradient": 0.93,
        "paths/effective/share_of_paths": 0.75,
    }


def test_missing_analyses_give_nan_or_no_headline():
    only_downsampling = {"single_deletion": [RESULTS["single_deletion"][1]]}
    assert math.isnan(summary.single_deletion_mean_error(only_downsampling))
    assert math.isnan(summary.single_deletion_max_error(only_downsampling))
    assert math.isnan(summary.gradient_decay_per_block({"path_gradient": RESULTS["path_gradient"][:2]}))
    assert summary.effective_range({}) is None and all(map(math.isnan, summary.effective_shares({})))
    assert summary.headline(only_downsampling) == {} and summary.headline({}) == {}


def test_stochastic_depth_aggregates_this_run_and_the_other_runs_file():
    other = {"multi_deletion": [{"k": 1, "blocks": [1], "error": 0.7}], "single_deletion": RESULTS["single_deletion"][:1]}
    out = summarize_stochastic_depth(RESULTS, [1.0, 0.75, 0.5], k_max=5, other=other, other_label="plain")
    assert out["trained_with_stochastic_depth"] and out["survival_probs"] == [1.0, 0.75, 0.5]
    assert [r["deleted"] for r in out["survival"]] == [0, 1, 2, 3]  # k_max capped at n = 3
    assert [r["all_paths"] for r in out["survival"]] == [1.0, 0.5, 0.25, 0.125]
    assert out["survival"][1]["effective_paths"] == effective_path_survival(3, 1, (1, 2))
    # weighted by the gradient per length, 8 and 4 at lengths 1 and 2: (8·3·2/3 + 4·3·1/3) / (8·3 + 4·3)
    assert out["survival"][1]["effective_gradient"] == pytest.approx(20 / 36)
    assert out["error_vs_k"] == {"this run": [[1, pytest.approx(0.15)], [2, 0.4]], "plain": [[1, 0.7]]}
    assert out["single_deletion_mean_error"] == {"this run": pytest.approx(0.08), "plain": 0.06}
    alone = summarize_stochastic_depth({}, [1.0, 1.0], k_max=1)
    assert not alone["trained_with_stochastic_depth"] and alone["error_vs_k"] == {}
    assert alone["survival"] == [{"deleted": 0, "all_paths": 1.0}, {"deleted": 1, "all_paths": 0.5}]


def test_demo_summary_prints_the_same_numbers():
    text = summarize({"ResNet": RESULTS, "plain": {"baseline_error": 0.2}})
    lines = {line[:44].strip(): line[44:].split() for line in text.splitlines()}
    assert lines["delete 1 block: mean error (%)"] == ["8.0", "-"]
    assert lines["delete 1 block: worst error (%)"] == ["10.0", "-"]  # not the downsampling block's 90
    assert lines["delete 1 random blocks: mean error (%)"] == ["15.0", "-"]
    assert lines["1 random swaps: mean error (%)"] == ["20.0", "-"]
    assert "ResNet: gradient norm 8 at path length 1 → 1 at 3 (×0.35 per block)" in text
    assert "ResNet: effective paths are 1–2 blocks long: 93% of the gradient from 75% of the paths" in text

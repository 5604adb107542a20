"""The benchmark's code paths at a tiny size: its numbers come from code that gives the naive
path's results."""

import json

from resens.bench import run


def test_bench_writes_ratios_for_every_fast_path(tmp_path):
    results = run(tmp_path, device="cpu", quick=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    for name in ("single_deletion", "path_gradient", "train_step", "data"):
        entry = saved[name]
        assert entry["fast_s"] > 0 and entry["naive_s"] > 0 and entry["device"] == "cpu"
        assert entry["speedup"] == entry["naive_s"] / entry["fast_s"]
        assert entry.get("equal", True), name
    assert results["single_deletion"]["variants"] == results["single_deletion"]["blocks"] + 1

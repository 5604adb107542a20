"""The authors' curves, recomputed from their per-run files, and the like-for-like check."""

import ast
import csv
import gzip
import re
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from resens.analysis import reference as R
from resens.analysis.protocol import resolve_protocol
from resens.analysis.variants import apply_swaps, kendall_tau
from resens.errors import ConfigError
from resens.models import cifar_plain, cifar_resnet, imagenet_resnet

CIFAR = "cifar10_resnet110"
PP = 0.0005  # 0.05 percentage points


@pytest.fixture(scope="module")
def cifar():
    return resolve_protocol(cifar_resnet(110, width=4))


def test_multi_deletion_with_the_authors_filter():
    curve = R.multi_deletion_curve(CIFAR, {0, 18, 36})
    assert sorted(curve) == list(range(1, 21))
    assert curve[10] == pytest.approx(0.205, abs=PP)
    assert curve[20] == pytest.approx(0.590, abs=PP)
    # the notebook's filter is the in_summary flag of the file
    assert curve[1] == pytest.approx(0.06832, abs=1e-5)


def test_multi_deletion_allowing_block_1():
    curve = R.multi_deletion_curve(CIFAR, {18, 36})
    assert curve[10] == pytest.approx(0.248, abs=PP)
    assert curve[20] == pytest.approx(0.692, abs=PP)
    everything = R.multi_deletion_curve(CIFAR)
    assert everything[1] > curve[1]  # deleting block 1 alone costs 42%


def test_imagenet_multi_deletion_with_downsampling_layers_left_out():
    curve = R.multi_deletion_curve("imagenet_resnet200", {0, 3, 27, 63})
    assert curve[1] == pytest.approx(0.21982, abs=1e-5)
    assert curve[2] == pytest.approx(0.227188, abs=1e-6)
    assert 8 not in curve and 11 not in curve  # k=8's only run touches a projection block


def test_reorder_by_swaps_and_by_displacement():
    curve = R.reorder_curve(CIFAR)
    assert sorted(curve) == list(range(1, 11))
    assert curve[1] == pytest.approx(0.097, abs=PP)
    assert curve[5] == pytest.approx(0.266, abs=PP)
    assert curve[10] == pytest.approx(0.462, abs=PP)
    # the authors' runs all lie in their ranges
    assert R.reorder_curve(CIFAR, ranges=[(1, 17), (19, 35), (37, 53)]) == curve
    fine = R.reorder_curve(CIFAR, "displacement")
    assert min(fine) >= 1 and max(fine) <= 10 * 16
    binned = R.reorder_curve(CIFAR, "displacement", bin_width=10)
    assert all(k % 10 == 0 for k in binned)
    one_bin = R.reorder_curve(CIFAR, "displacement", bin_width=1000)
    assert list(one_bin) == [0]
    assert one_bin[0] == pytest.approx(_all_runs_mean(), abs=1e-9)
    # more displacement, more error
    assert binned[max(binned)] > binned[0]
    # only the runs inside stage 1 (0-based), fewer of them
    assert R.reorder_curve(CIFAR, ranges=[(19, 35)])[1] != curve[1]


def _all_runs_mean() -> float:
    rows = _cifar_reorder_rows()
    return sum(float(r["error"]) for r in rows) / len(rows)


def _cifar_reorder_rows() -> list[dict[str, str]]:
    data = resources.files("resens.reference").joinpath("cifar10_resnet110_reorder.csv.gz").read_bytes()
    return list(csv.DictReader(gzip.decompress(data).decode().splitlines()))


def test_swaps_apply_in_the_listed_order_as_in_the_authors_kendall_tau():
    rows = _cifar_reorder_rows()
    assert len(rows) == 2925
    for r in rows:
        pairs = [tuple(int(b) - 1 for b in p.split("-")) for p in r["pairs"].split()]
        assert kendall_tau(apply_swaps(54, pairs)) == pytest.approx(float(r["kendall_tau"]), abs=5e-5)


def test_duplication_curve():
    curve = R.duplication_curve(CIFAR)
    assert sorted(curve) == list(range(1, 11))
    assert curve[1] == pytest.approx(0.0632, abs=PP)
    assert curve[1] == pytest.approx(0.063166, abs=1e-6)
    assert curve[10] == pytest.approx(0.098212, abs=1e-6)
    assert R.duplication_curve(CIFAR, {0, 18, 36}) == curve  # the authors never duplicated these
    assert R.duplication_curve("imagenet_resnet200")[1] == pytest.approx(0.222759, abs=1e-6)


def test_comparable_for_the_authors_protocol(cifar):
    for analysis in R.ANALYSES:
        assert R.comparable(CIFAR, cifar, analysis) is None
    assert R.protocol_curve(CIFAR, cifar, "multi_deletion") == R.multi_deletion_curve(CIFAR, {0, 18, 36})
    assert R.protocol_curve(CIFAR, cifar, "reorder") == R.reorder_curve(CIFAR)
    imagenet = resolve_protocol(imagenet_resnet(200, width=4))
    assert all(R.comparable("imagenet_resnet200", imagenet, a) is None for a in R.ANALYSES)
    plain = resolve_protocol(cifar_plain(110, width=4))
    assert R.comparable(CIFAR, plain, "multi_deletion") is None


def test_comparable_names_what_the_authors_never_did():
    p = resolve_protocol(cifar_resnet(110, width=4), exclude=[])
    assert R.comparable(CIFAR, p, "multi_deletion") is None  # their runs filter to any set
    assert R.protocol_curve(CIFAR, p, "multi_deletion") == R.multi_deletion_curve(CIFAR)
    assert "first blocks of stages" in R.comparable(CIFAR, p, "reorder")
    assert "first blocks of stages" in R.comparable(CIFAR, p, "duplication")
    split = resolve_protocol(cifar_resnet(110, width=4), exclude=[0, 18, 36, 10])
    assert "split" in R.comparable(CIFAR, split, "reorder")
    one_stage = resolve_protocol(cifar_resnet(110, width=4), reorder_stages=[2])
    assert R.comparable(CIFAR, one_stage, "reorder") is None
    small = resolve_protocol(cifar_resnet(56, width=4))
    assert "27 blocks" in R.comparable(CIFAR, small, "multi_deletion")
    full = resolve_protocol(cifar_resnet(110, width=4))
    assert "no reorder" in R.comparable("cifar10_resnet110_sd", full, "reorder")
    assert R.comparable("cifar10_resnet110_sd", full, "single_deletion") is None
    with pytest.raises(ConfigError, match="unknown paper reference"):
        R.comparable("cifar10_resnet56", full, "reorder")


def test_single_deletion_and_baselines():
    single = R.single_deletion(CIFAR)
    assert len(single) == 54 and single[0] == pytest.approx(0.4215)
    assert len(R.single_deletion("imagenet_resnet200")) == 66
    assert R.baseline("imagenet_resnet200") == pytest.approx(0.21654)
    with pytest.raises(ConfigError, match="no reorder"):
        R.reorder_curve("cifar10_resnet110_sd")


def test_every_shipped_file_is_package_data():
    root = Path(__file__).resolve().parents[1]
    line = re.search(r'^"resens.reference" = (\[.*\])$', (root / "pyproject.toml").read_text(), re.M)
    patterns = ast.literal_eval(line.group(1))
    shipped = [p.name for p in (root / "resens" / "reference").iterdir() if p.name not in ("__init__.py", "__pycache__")]
    assert "cifar10_resnet110_reorder.csv.gz" in shipped
    assert all(any(fnmatch(name, pat) for pat in patterns) for name in shipped)


@pytest.mark.parametrize("name,model,data,expected", [
    ("cifar10_resnet110", {"arch": "cifar_resnet", "depth": 110, "preact": True}, "cifar10", None),
    ("cifar10_resnet110", {"arch": "cifar_resnet", "depth": 110}, "cifar10", "model.preact=False"),
    ("cifar10_resnet110", {"arch": "cifar_resnet", "depth": 56, "preact": True}, "cifar10", "model.depth=56"),
    ("cifar10_resnet110", {"arch": "cifar_resnet", "depth": 110, "preact": True}, "digits", "digits"),
    ("cifar10_resnet110", {"arch": "cifar_plain", "depth": 110}, "cifar10", "cifar_plain"),
    ("cifar10_resnet110_sd", {"arch": "cifar_resnet", "depth": 110, "stochastic_depth": 0.5,
                              "shortcut_pool": "avg", "conv_bias": True}, "cifar10", None),
    ("cifar10_resnet110_sd", {"arch": "cifar_resnet", "depth": 110, "stochastic_depth": 0.5}, "cifar10",
     "shortcut_pool"),
    ("imagenet_resnet200", {"arch": "imagenet_resnet", "depth": 200}, "imagenet", None),
    ("imagenet_resnet200", {"arch": "imagenet_resnet", "depth": 200, "stochastic_depth": 0.5}, "imagenet",
     "stochastic_depth"),
    ("imagenet_resnet200", {"arch": "imagenet_resnet", "layers": [3, 4, 6, 3]}, "imagenet", "stages"),
])
def test_a_reference_is_only_for_the_network_the_authors_measured(name, model, data, expected):
    got = R.model_mismatch(name, model, data)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got

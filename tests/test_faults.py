"""Faults and bad input, with the real entry points as processes: SIGKILL and resume, a non-finite
loss, an unreachable W&B server, and every kind of bad input a user can give."""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from resens.checkpoint import load_checkpoint
from tests.helpers import (
    DIGITS,
    TINY,
    assert_same_tensors,
    base_env,
    finish,
    kill_group,
    python,
    run,
    start,
    wait_for,
)
from tests.wandb_records import read_records, run_file, run_files, summarize_run

# Deterministic, with stochastic depth: the gate generator and the RNGs must resume too.
# Batch 8: 162 steps an epoch, so the kill lands well inside the second epoch.
RESUMABLE = [
    *TINY,
    "name=sigkill",
    "model.stochastic_depth=0.5",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "data.batch_size=8",
]


def train_args(out: Path, *overrides: str) -> list[str]:
    return python("resens.train", DIGITS, f"out_dir={out}", *overrides)


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.name != "wandb"]  # wandb/: the root's W&B folder
    return run_dir


@pytest.fixture(scope="module")
def sigkill(tmp_path_factory):
    """An uninterrupted run, and the same run SIGKILLed in its second epoch and resumed with
    resume=last. The two start together (they are independent)."""
    tmp = tmp_path_factory.mktemp("sigkill")
    whole = start(train_args(tmp / "whole", *RESUMABLE), base_env(), tmp / "whole.log")
    killed = start(train_args(tmp / "killed", *RESUMABLE), base_env(), tmp / "killed.log")
    wait_for(
        lambda: any((tmp / "killed").glob("*/checkpoints/last.ckpt")),
        killed,
        150,
        "the first epoch's checkpoint",
    )
    kill_group(killed)
    killed_dir = only_run(tmp / "killed")
    at_kill = load_checkpoint(killed_dir / "checkpoints" / "last.ckpt")
    analysed_before_resume = (killed_dir / "analysis.json").exists()
    resumed = start(
        train_args(tmp / "killed", *RESUMABLE, "resume=last"), base_env(), tmp / "resumed.log"
    )
    for proc, log in ((whole, "whole.log"), (resumed, "resumed.log")):
        assert finish(proc, 150) == 0, (tmp / log).read_text()[-3000:]
    return {
        "killed": killed,
        "at_kill": at_kill,
        "analysed_before_resume": analysed_before_resume,
        "whole": only_run(tmp / "whole"),
        "resumed": killed_dir,
        "resumed_log": (tmp / "resumed.log").read_text(),
    }


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(sigkill):
    assert sigkill["killed"].returncode == -9
    assert sigkill["at_kill"]["epoch"] == 0 and not sigkill["analysed_before_resume"]
    last = sigkill["resumed"] / "checkpoints" / "last.ckpt"
    assert f"Restoring states from the checkpoint path at {last}" in sigkill["resumed_log"]
    a = load_checkpoint(sigkill["whole"] / "checkpoints" / "last.ckpt")
    b = load_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 3 * (1297 // 8)
    # weights, BatchNorm statistics, the stochastic-depth gate generator (model._extra_state),
    # momentum buffers, the schedule, and the Python / NumPy / torch RNG states
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tensors(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert_same_tensors(a["lr_schedulers"], b["lr_schedulers"], "schedule")
    assert_same_tensors(a["callbacks"]["RNGState"], b["callbacks"]["RNGState"], "rng")

    def best_score(ckpt):
        (key,) = [k for k in ckpt["callbacks"] if "'monitor': 'test/error'" in k]
        return ckpt["callbacks"][key]["best_model_score"]

    assert torch.equal(best_score(a), best_score(b))
    whole, resumed = (
        json.loads((d / "analysis.json").read_text())
        for d in (sigkill["whole"], sigkill["resumed"])
    )
    whole.pop("timings_s"), resumed.pop("timings_s")
    assert (
        whole == resumed and {"baseline_error", "single_deletion", "multi_deletion"} <= whole.keys()
    )


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run(sigkill):
    runs = run_files(sigkill["resumed"].parent)
    assert len(runs) == 2
    ids = {
        r.run.run_id for f in runs for r in read_records(f) if r.WhichOneof("record_type") == "run"
    }
    assert ids == {sigkill["resumed"].name}


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # The lr jumps to 1e29 after the first epoch.
    done = run(
        train_args(
            tmp_path,
            *TINY,
            "name=nan",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=5",
            "optim.warmup_lr=null",
            "optim.milestones=[1]",
            "optim.gamma=1e30",
        ),
        base_env(),
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert re.fullmatch(
        r"error: training loss became NaN or infinite \(epoch 1, step \d+\); stopped, "
        r"the last good checkpoint is kept \(try a lower optim.lr\)",
        done.stderr.strip().splitlines()[-1],
    )
    run_dir = only_run(tmp_path)
    assert not (run_dir / "analysis.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best-epoch000.ckpt",
        "last.ckpt",
    ]
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 5)
    weights = [
        v
        for v in last["state_dict"].values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    assert weights and all(torch.isfinite(v).all() for v in weights)


@pytest.mark.slow
def test_unreachable_wandb_falls_back_to_offline(tmp_path):
    env = base_env(
        WANDB_MODE="online",
        WANDB_BASE_URL="http://127.0.0.1:9",  # the discard port: nothing listens
        WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567",
        WANDB_INIT_TIMEOUT="3",
    )
    done = run(
        train_args(
            tmp_path,
            *TINY,
            "name=wandb",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "analysis.run=[]",
        ),
        env,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run(tmp_path)
    assert "W&B unreachable" in done.stderr
    assert f"Sync later with: wandb sync {tmp_path}/wandb/offline-run-*-{run_dir.name}" in done.stderr
    offline = summarize_run(run_file(run_dir))
    assert offline["run_id"] == run_dir.name
    assert {"train/loss_epoch", "test/error"} <= offline["history_keys"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


class Payload:
    """Unpickling this would create ``marker``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def bad_inputs(sigkill, tmp_path_factory):
    """Every bad input, each a real CLI process (four at a time). Returns
    ``({case: (completed process, what stderr must name)}, files before, files after, folder)``."""
    tmp = tmp_path_factory.mktemp("bad")
    good = sigkill["whole"] / "checkpoints" / "last.ckpt"

    def checkpoint(case: str, write=None) -> Path:
        path = tmp / case / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        shutil.copy(good, path)
        if write is not None:
            write(path)
        return path

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def add_payload(path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        ckpt["hyper_parameters"]["note"] = Payload(tmp / "payload-ran")
        torch.save(ckpt, path)

    cifar = tmp / "cifar-garbage" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (cifar / name).write_bytes(b"not a pickle")
    (tmp / "imagenet-empty" / "train" / "n01440764").mkdir(parents=True)
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")

    cases = {
        "missing data folder": (
            train_args(tmp / "runs-1", "data.name=cifar10", f"data.root={tmp}/nowhere"),
            f"data.root: CIFAR-10 not found under '{tmp}/nowhere'",
        ),
        "malformed CIFAR-10 folder": (
            train_args(tmp / "runs-2", "data.name=cifar10", f"data.root={cifar.parent}"),
            f"CIFAR-10 file '{cifar}/data_batch_1' is corrupt or truncated",
        ),
        "malformed ImageNet folder": (
            train_args(tmp / "runs-3", "data.name=imagenet", f"data.root={tmp}/imagenet-empty"),
            "Found no valid file for the classes n01440764",
        ),
        "checkpoint of another architecture": (
            train_args(tmp / "runs-4", *TINY, "model.depth=14", f"resume={checkpoint('arch')}"),
            "is of another architecture: ",
        ),
        "truncated checkpoint": (
            train_args(tmp / "runs-5", *TINY, f"resume={checkpoint('trunc', truncate)}"),
            "is truncated or corrupted",
        ),
        "checkpoint with a pickled payload": (
            train_args(tmp / "runs-6", *TINY, f"resume={checkpoint('payload', add_payload)}"),
            "carries pickled objects that are not plain weights; refusing to load it",
        ),
        "mistyped key": (
            train_args(tmp / "runs-7", "trainer.max_epoch=3"),
            "trainer.max_epoch: Key 'max_epoch' not in 'TrainerConfig'",
        ),
        "missing checkpoint": (
            train_args(tmp / "runs-8", f"resume={tmp}/nowhere.ckpt"),
            f"resume: checkpoint not found: {tmp}/nowhere.ckpt",
        ),
        "batch that does not split": (
            train_args(
                tmp / "runs-9",
                "data.batch_size=63",
                "trainer.devices=2",
                "trainer.strategy=ddp",
            ),
            "data.batch_size=63 (global) does not divide evenly over 2 processes",
        ),
        "lesion of a checkpoint with a pickled payload": (
            python(
                "resens.analyze", "--checkpoint", str(checkpoint("lesion-payload", add_payload))
            ),
            "carries pickled objects that are not plain weights",
        ),
        "lesion of a file that is no checkpoint": (
            python("resens.analyze", "--checkpoint", str(tmp / "foreign.pt")),
            "is not a Lightning checkpoint (no state_dict)",
        ),
    }

    def files() -> set[Path]:
        return set(tmp.rglob("*"))

    before = files()
    with ThreadPoolExecutor(4) as pool:
        done = dict(
            zip(
                cases,
                pool.map(lambda c: run(cases[c][0], base_env(), timeout=120), cases),
                strict=True,
            )
        )
    return {case: (done[case], needle) for case, (_, needle) in cases.items()}, before, files(), tmp


CASES = [
    "missing data folder",
    "malformed CIFAR-10 folder",
    "malformed ImageNet folder",
    "checkpoint of another architecture",
    "truncated checkpoint",
    "checkpoint with a pickled payload",
    "mistyped key",
    "missing checkpoint",
    "batch that does not split",
    "lesion of a checkpoint with a pickled payload",
    "lesion of a file that is no checkpoint",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_line_and_leaves_nothing(bad_inputs, case):
    results, before, after, tmp = bad_inputs
    done, needle = results[case]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert after == before, (
        f"left behind: {sorted(map(str, after - before))}"
    )  # no run folder, no output
    assert not (tmp / "payload-ran").exists()


# A bad config through the real CLI: (overrides, what the one line names); {tmp} is the folder.
# Every kind of bad key is in tests/test_config.py; these cover each kind once, end to end.
CONFIG_CASES = {
    "paper reference typo": (
        ["analysis.reference=cifar10_resnet11"],
        "analysis.reference=cifar10_resnet11: not one of null, cifar10_resnet110, ",
    ),
    "missing comparison run": (
        ["analysis.compare_with={tmp}/other/analysis.json"],
        "analysis.compare_with: file not found: {tmp}/other/analysis.json",
    ),
    "comparison without deletion results": (
        ["analysis.compare_with={tmp}/empty.json"],
        "analysis.compare_with: {tmp}/empty.json holds no multi_deletion or single_deletion results",
    ),
    "key the plain network does not take": (
        ["model.arch=cifar_plain", "model.preact=null", "model.stochastic_depth=0.5"],
        "model.stochastic_depth: cifar_plain does not take it (its keys: depth, width;",
    ),
    "validation split of every image": (
        ["data.val_split=1297"],
        "data.val_split=1297: must be below the 1297 training images of digits",
    ),
    "unknown W&B mode": (["logger.mode=onlin"], "logger.mode=onlin: not one of online, offline, disabled"),
}


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory):
    """Each CONFIG_CASES run as a real CLI process (two at a time); returns
    ``({case: (completed process, needle)}, files before, files after)`` over the test folder
    and the repository's top level (where a stray wandb/ folder would appear)."""
    from tests.helpers import ROOT

    tmp = tmp_path_factory.mktemp("bad-config")
    (tmp / "empty.json").write_text('{"baseline_error": 0.1}')
    cases = {
        case: (
            train_args(tmp / "runs", *(o.format(tmp=tmp) for o in overrides)),
            needle.format(tmp=tmp),
        )
        for case, (overrides, needle) in CONFIG_CASES.items()
    }

    def files() -> set[Path]:
        return set(tmp.rglob("*")) | set(ROOT.iterdir())

    before = files()
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda c: run(cases[c][0], base_env(), timeout=120), cases))
    return {c: (d, cases[c][1]) for c, d in zip(cases, done, strict=True)}, before, files()


@pytest.mark.slow
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_fails_at_load_with_one_line_and_creates_nothing(bad_configs, case):
    results, before, after = bad_configs
    done, needle = results[case]
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert after == before, f"left behind: {sorted(map(str, after - before))}"


def test_payload_fixture_really_runs_code_when_unpickled(tmp_path):
    """The payload test means something only if unpickling the payload does run code."""
    path = tmp_path / "x.pt"
    torch.save({"x": Payload(tmp_path / "ran")}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").is_dir()

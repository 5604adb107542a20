from pathlib import Path

import pytest

from resens import config
from resens.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_config_per_experiment():
    names = {p.stem for p in CONFIGS}
    assert {
        "cifar10_resnet110", "cifar10_resnet110_sd", "cifar10_plain110",
        "imagenet_resnet200", "imagenet_resnet200_sd", "digits_resnet", "digits_plain",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds_its_model(path):
    from resens.module import build_model

    cfg = config.load(path)
    classes = 1000 if cfg.data.name == "imagenet" else 10
    channels = 1 if cfg.data.name == "digits" else 3
    model = build_model(cfg, classes, channels)
    expected = {"cifar10_resnet110": 54, "cifar10_resnet110_sd": 54, "imagenet_resnet200": 66}
    if path.stem in expected:
        assert len(model.blocks) == expected[path.stem]
    if path.stem.endswith("_sd"):
        assert model.blocks[-1].survival_prob == pytest.approx(0.5)


def test_overrides_are_typed_and_applied():
    cfg = config.load(None, ["model.depth=20", "trainer.devices=2", "analysis.run=[single_deletion]", "optim.milestones=[1,2]"])
    assert cfg.model.depth == 20 and cfg.trainer.devices == 2
    assert list(cfg.analysis.run) == ["single_deletion"] and list(cfg.optim.milestones) == [1, 2]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.detph=3"], "model.detph"),
        (["model.depth=abc"], "model.depth"),
        (["trainer.max_epochs=1.5"], "trainer.max_epochs"),
        (["foo"], "key=value"),
        (["model.arch=vgg"], "model.arch"),
        (["analysis.run=[bogus]"], "bogus"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")) as err:
        config.load(None, overrides)
    assert "\n" not in str(err.value)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  detph: 20\n")
    with pytest.raises(ConfigError, match="detph"):
        config.load(typo)


def test_round_trip_through_a_plain_dict():
    cfg = config.load(CONFIGS[0], ["seed=5"])
    assert config.from_dict(config.to_dict(cfg)) == cfg

import json
from pathlib import Path

import pytest

from resens import config
from resens.errors import ConfigError

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
RECIPES = sorted((CONFIG_DIR / "recipes").glob("*.yaml"))
# Weights of each experiment's network, as built for its data set (classes, input channels).
PARAMETERS = {
    "cifar10_resnet110": 1_727_994,
    "cifar10_resnet110_he": 1_727_962,
    "cifar10_resnet110_sd": 1_732_010,
    "imagenet_resnet200": 64_666_152,
}
DATA_SHAPE = {"cifar10": (10, 3), "digits": (10, 1), "imagenet": (1000, 3)}


def load_here(path, tmp_path, *overrides):
    """``config.load`` with the data folder at hand: CIFAR-10 'downloadable', ImageNet in tmp."""
    return config.load(path, ["data.download=true", f"data.root={tmp_path}", *overrides])


def test_there_is_a_config_per_experiment():
    names = {p.stem for p in CONFIGS}
    assert {
        "cifar10_resnet110", "cifar10_resnet110_he", "cifar10_resnet110_sd", "cifar10_plain110",
        "imagenet_resnet200", "imagenet_resnet200_sd", "digits_resnet", "digits_plain",
    } <= names
    assert {p.stem for p in RECIPES} >= {"fb_cifar", "he_cifar", "huang_sd", "fb_imagenet"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds_its_model(path, tmp_path):
    from resens.module import build_model

    cfg = load_here(path, tmp_path)
    assert "defaults" not in cfg  # composed away: the resolved config reads as the whole run
    model = build_model(cfg, *DATA_SHAPE[cfg.data.name])
    expected = {"cifar10_resnet110": 54, "cifar10_resnet110_sd": 54, "imagenet_resnet200": 66}
    if path.stem in expected:
        assert len(model.blocks) == expected[path.stem]
    if path.stem in PARAMETERS:
        assert sum(p.numel() for p in model.parameters()) == PARAMETERS[path.stem]
    if path.stem.endswith("_sd"):
        assert model.blocks[-1].survival_prob == pytest.approx(0.5)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_alone(path, tmp_path):
    assert load_here(path, tmp_path).optim.lr > 0


def test_the_authors_cifar_network_and_recipe(tmp_path):
    cfg = load_here(CONFIG_DIR / "cifar10_resnet110.yaml", tmp_path)
    assert cfg.model.preact is True and cfg.analysis.reference == "cifar10_resnet110"
    assert cfg.optim.warmup_lr is None and list(cfg.optim.milestones) == [80, 121]
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.optim.nesterov) == (164, 128, True)
    he = load_here(CONFIG_DIR / "cifar10_resnet110_he.yaml", tmp_path)
    assert he.model.preact is False and he.analysis.reference is None
    assert (he.optim.warmup_lr, he.optim.warmup_steps, list(he.optim.milestones)) == (0.01, 400, [82, 123])


def test_huang_et_al_stochastic_depth_recipe(tmp_path):
    cfg = load_here(CONFIG_DIR / "cifar10_resnet110_sd.yaml", tmp_path)
    m, o = cfg.model, cfg.optim
    assert (m.preact, m.shortcut_pool, m.conv_bias, m.stochastic_depth) == (False, "avg", True, 0.5)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.val_split) == (500, 128, 5000)
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.warmup_lr) == (0.1, 0.9, True, 1e-4, None)
    assert list(o.milestones) == [249, 374]
    assert cfg.analysis.reference == "cifar10_resnet110_sd"


def test_fb_cifar_schedule_lowers_the_lr_from_0_based_epoch_80(tmp_path):
    """fb.resnet.torch: lr 0.1 through 1-based epoch 80, 0.01 from 81, 0.001 from 122."""
    from resens.module import lr_at

    o = load_here(CONFIG_DIR / "cifar10_resnet110.yaml", tmp_path).optim
    steps = 391
    assert lr_at(o, 0.1, steps, 0) == pytest.approx(0.1)  # no warm-up
    assert lr_at(o, 0.1, steps, 80 * steps - 1) == pytest.approx(0.1)  # last step of epoch 79
    assert lr_at(o, 0.1, steps, 80 * steps) == pytest.approx(0.01)  # first step of epoch 80
    assert lr_at(o, 0.1, steps, 121 * steps - 1) == pytest.approx(0.01)
    assert lr_at(o, 0.1, steps, 121 * steps) == pytest.approx(0.001)
    sd = load_here(CONFIG_DIR / "cifar10_resnet110_sd.yaml", tmp_path).optim
    # main.lua: 0.1 while the 1-based epoch < 250, i.e. through 0-based epoch 248
    assert lr_at(sd, 0.1, steps, 249 * steps - 1) == pytest.approx(0.1)
    assert lr_at(sd, 0.1, steps, 249 * steps) == pytest.approx(0.01)
    assert lr_at(sd, 0.1, steps, 374 * steps) == pytest.approx(0.001)


def test_defaults_merge_in_order_then_the_file_then_overrides(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("seed: 1\nname: a\noptim:\n  milestones: [1, 2, 3]\n")
    (tmp_path / "recipes" / "b.yaml").write_text("defaults: [a.yaml]\nseed: 2\n")
    (tmp_path / "x.yaml").write_text(
        "defaults: [recipes/b.yaml]\nname: x\ndata:\n  name: digits\noptim:\n  milestones: [5]\n"
    )
    cfg = config.load(tmp_path / "x.yaml", ["seed=3"])
    assert (cfg.name, cfg.seed, list(cfg.optim.milestones)) == ("x", 3, [5])
    assert config.load(tmp_path / "x.yaml").seed == 2


@pytest.mark.parametrize(
    "files,needle",
    [
        ({"x.yaml": "defaults: [nope.yaml]\n"}, r"config file not found: .*nope\.yaml \(in the defaults of .*x\.yaml\)"),
        ({"x.yaml": "defaults: [y.yaml]\n", "y.yaml": "defaults: [x.yaml]\n"}, r"defaults cycle: .*x\.yaml -> .*y\.yaml -> .*x\.yaml"),
        ({"x.yaml": "defaults: [x.yaml]\n"}, r"defaults cycle: .*x\.yaml -> .*x\.yaml"),
        ({"x.yaml": "defaults: y.yaml\n"}, r"defaults in .*x\.yaml: expected a list of YAML paths"),
        ({"x.yaml": "- 1\n"}, r"config .*x\.yaml: expected a mapping"),
    ],
    ids=["missing base", "cycle", "self", "not a list", "not a mapping"],
)
def test_bad_defaults_name_the_file(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=needle) as err:
        config.load(tmp_path / "x.yaml")
    assert "\n" not in str(err.value)


def test_overrides_are_typed_and_applied():
    cfg = config.load(None, ["data.name=digits", "model.depth=20", "trainer.devices=2", "analysis.run=[single_deletion]", "optim.milestones=[1,2]"])
    assert cfg.model.depth == 20 and cfg.trainer.devices == 2
    assert list(cfg.analysis.run) == ["single_deletion"] and list(cfg.optim.milestones) == [1, 2]


def analysis_json(tmp_path, results) -> Path:
    path = tmp_path / "other" / "analysis.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(results if isinstance(results, str) else json.dumps(results))
    return path


# (overrides, what the message must hold); {tmp} is the test's folder. Each is an error.
BAD = {
    "mistyped key": (["model.detph=3"], "model.detph"),
    "wrong type": (["model.depth=abc"], "model.depth"),
    "float epochs": (["trainer.max_epochs=1.5"], "trainer.max_epochs"),
    "not key=value": (["foo"], "key=value"),
    "arch": (["model.arch=vgg"], "model.arch=vgg: not one of cifar_plain, cifar_resnet, imagenet_resnet"),
    "analysis": (["analysis.run=[bogus]"], "analysis.run=bogus: not one of single_deletion, multi_deletion"),
    "reference": (["analysis.reference=cifar10_resnet11"], "analysis.reference=cifar10_resnet11: not one of null, cifar10_resnet110, cifar10_resnet110_sd, imagenet_resnet200"),
    "shortcut pool": (["model.shortcut_pool=max"], "model.shortcut_pool=max: not one of subsample, avg"),
    "data set": (["data.name=mnist"], "data.name=mnist: not one of cifar10, imagenet, digits, synthetic"),
    "logger mode": (["logger.mode=online-ish"], "logger.mode=online-ish: not one of online, offline, disabled"),
    "compile mode": (["model.compile=fast"], "model.compile=fast: not one of null, default, reduce-overhead, max-autotune"),
    "precision": (["trainer.precision=bf15"], "trainer.precision=bf15: not one of "),
    "key the builder does not take": (["model.arch=cifar_plain", "model.stochastic_depth=0.5"], "model.stochastic_depth: cifar_plain does not take it (its keys: depth, width;"),
    "ImageNet key on CIFAR": (["model.layers=[1,1,1,1]"], "model.layers: cifar_resnet does not take it"),
    "compile with stochastic depth": (["model.compile=default", "model.stochastic_depth=0.5"], "model.compile: stochastic depth changes the graph at every step"),
    "stochastic depth 0": (["model.stochastic_depth=0"], "model.stochastic_depth=0.0: must be in (0, 1]"),
    "stochastic depth above 1": (["model.stochastic_depth=1.5"], "model.stochastic_depth=1.5: must be in (0, 1]"),
    "batch size": (["data.batch_size=0"], "data.batch_size=0: must be >= 1"),
    "eval batch size": (["data.eval_batch_size=-1"], "data.eval_batch_size=-1: must be >= 1"),
    "negative val_split": (["data.val_split=-5"], "data.val_split=-5: must be >= 0"),
    "val_split of every digit": (["data.val_split=1297"], "data.val_split=1297: must be below the 1297 training images of digits"),
    "gpu_augment off CIFAR": (["data.gpu_augment=true"], "data.gpu_augment=True: cifar10 only"),
    "lr": (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
    "milestones": (["optim.milestones=[30,20]"], "optim.milestones=[30, 20]: must be strictly increasing"),
    "trials": (["analysis.multi_deletion.trials=0"], "analysis.multi_deletion.trials=0: must be >= 1"),
    "reorder trials": (["analysis.reorder.trials=0"], "analysis.reorder.trials=0: must be >= 1"),
    "path lengths": (["analysis.path_gradient.lengths=[0,3]"], "analysis.path_gradient.lengths=[0, 3]: must be >= 1"),
    "effective share": (["analysis.effective_share=1.2"], "analysis.effective_share=1.2: must be in (0, 1]"),
    "epochs": (["trainer.max_epochs=0"], "trainer.max_epochs=0: must be >= 1"),
    "missing checkpoint": (["resume={tmp}/nowhere.ckpt"], "resume: checkpoint not found: {tmp}/nowhere.ckpt"),
    "checkpoint folder": (["resume={tmp}"], "resume: checkpoint not found: {tmp}"),
    "missing CIFAR-10": (["data.name=cifar10", "data.root={tmp}/nowhere"], "data.root: CIFAR-10 not found under '{tmp}/nowhere'"),
    "missing ImageNet": (["data.name=imagenet", "data.root={tmp}/nowhere", "data.download=true"], "data.root: ImageNet folder '{tmp}/nowhere' not found"),
    "missing comparison": (["analysis.compare_with={tmp}/nowhere.json"], "analysis.compare_with: file not found: {tmp}/nowhere.json"),
    "comparison not JSON": (["analysis.compare_with={tmp}/other/analysis.json"], "analysis.compare_with: {tmp}/other/analysis.json is not a JSON file"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_names_the_key_and_creates_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case == "comparison not JSON":
        analysis_json(tmp_path, "{not json")
    overrides, needle = BAD[case]
    before = set(tmp_path.rglob("*"))
    base = ["data.name=digits", f"out_dir={tmp_path}/runs"]
    with pytest.raises(ConfigError) as err:
        config.load(None, [*base, *(o.format(tmp=tmp_path) for o in overrides)])
    message = str(err.value)
    assert needle.format(tmp=tmp_path) in message and "\n" not in message
    assert set(tmp_path.rglob("*")) == before


def test_comparison_must_hold_deletion_results(tmp_path):
    path = analysis_json(tmp_path, {"baseline_error": 0.1, "reorder": []})
    with pytest.raises(ConfigError, match="holds no multi_deletion or single_deletion results"):
        config.load(None, ["data.name=digits", f"analysis.compare_with={path}"])
    analysis_json(tmp_path, {"single_deletion": [{"block": 0, "error": 0.2}]})
    assert config.load(None, ["data.name=digits", f"analysis.compare_with={path}"]).analysis.compare_with


def test_cifar_download_and_existing_folders_pass(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    assert config.load(None, [f"data.root={tmp_path}", f"resume={ckpt}"]).resume == str(ckpt)
    assert config.load(None, ["data.root=/nowhere", "data.download=true", "resume=last"]).resume == "last"


def test_analysis_names_is_the_source_of_analysis_run():
    assert list(config.load(None, ["data.name=digits"]).analysis.run) == list(config.analysis_names())


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


def test_round_trip_through_a_plain_dict(tmp_path):
    cfg = load_here(CONFIG_DIR / "cifar10_resnet110.yaml", tmp_path, "seed=5")
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_saved_config_paths_are_checked_only_when_asked(tmp_path):
    """A checkpoint's config names the folders of the machine that trained it."""
    saved = config.to_dict(config.load(None, ["data.name=digits"]))
    saved["data"].update(name="cifar10", root=str(tmp_path / "elsewhere"))
    assert config.from_dict(saved).data.root == str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="data.root: CIFAR-10 not found"):
        config.from_dict(saved, paths=True)
    saved["model"]["arch"] = "vgg"
    with pytest.raises(ConfigError, match="model.arch=vgg"):
        config.from_dict(saved)


@pytest.mark.parametrize("override,needle", [
    ("analysis.protocol.exclude=[99]", "99"),
    ("analysis.protocol.reorder_stages=[7]", "7"),
])
def test_a_bad_protocol_override_fails_at_load(override, needle):
    with pytest.raises(ConfigError) as err:
        config.load(None, ["data.name=digits", "model.depth=20", override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert config.load(None, ["data.name=digits", "model.depth=20", "analysis.protocol.exclude=[]"])

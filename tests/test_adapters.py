"""Library models through the adapters: torchvision and timm ResNets, timm's pre-activation
ResNets and ViTs give the original's outputs, deletions computed against the original, path
gradients that add up to the input gradient, and `make lesion MODEL=...` end to end."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from resens.analysis import paths, variants
from resens.analysis.protocol import resolve_protocol
from resens.analyze import main as analyze_main
from resens.data.imagefolder import balanced_subset
from resens.models.adapters import AdapterError, adapt, family
from tests.wandb_records import run_file, summarize_run

timm = pytest.importorskip("timm")

ROOT = Path(__file__).parent.parent


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so that every layer matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def tv(block, layers, **kw):
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.ResNet(block, layers, num_classes=5, **kw))


def timm_model(name, **kw):
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, num_classes=5, **kw))


def vit(depth):
    return timm_model("vit_tiny_patch16_224", img_size=32, depth=depth)


TV_BASIC, TV_BOTTLENECK = torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck

# Full-size architectures (outputs, deletions, fast == naive lesions).
FULL = {
    "tv_resnet18": lambda: tv(TV_BASIC, [2, 2, 2, 2]),
    "tv_resnet50": lambda: tv(TV_BOTTLENECK, [3, 4, 6, 3]),
    "tv_resnext50_32x4d": lambda: tv(TV_BOTTLENECK, [3, 4, 6, 3], groups=32, width_per_group=4),
    "tv_wide_resnet50_2": pytest.param(
        lambda: tv(TV_BOTTLENECK, [3, 4, 6, 3], width_per_group=128), marks=pytest.mark.slow),
    "timm_resnet26": lambda: timm_model("resnet26"),
    "timm_resnetv2_50": lambda: timm_model("resnetv2_50"),
    "timm_vit_tiny": lambda: vit(2),
}
# Small instances of each family, for all 2^n paths.
SMALL = {
    "tv_basic": lambda: tv(TV_BASIC, [1, 1, 1, 1]),
    "tv_bottleneck": lambda: tv(TV_BOTTLENECK, [1, 1, 1, 1]),
    "timm_resnet": lambda: timm_model("resnet50", layers=[1, 1, 1, 1]),
    "timm_resnetv2": lambda: timm_model("resnetv2_50", layers=[1, 1, 1, 1]),
    "timm_vit": lambda: vit(1),
}


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = 32 if isinstance(model, timm.models.VisionTransformer) else 48
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 5, (batch,), generator=g)


def deleted_forward(model, unit: int):
    """The original model's own forward with one block's residual branch removed, written against
    the library block (not the adapter): ``(module to patch, its replacement forward)``."""
    if isinstance(model, timm.models.VisionTransformer):
        b = model.blocks[unit // 2]
        if unit % 2 == 0:  # attention deleted: only the MLP residual remains
            return b, lambda x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return b, lambda x: x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
    if isinstance(model, timm.models.ResNetV2):
        b = [b for s in model.stages for b in s.blocks][unit]
        return b, lambda x: x if b.downsample is None else b.downsample(b.norm1(x))
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    b = [b for layer in layers for b in layer][unit]
    return b, lambda x: F.relu(x if b.downsample is None else b.downsample(x))


@pytest.mark.parametrize("build", FULL.values(), ids=FULL.keys())
def test_adapted_model_is_the_original_and_deletion_means_what_it_means(build):
    model = build()
    adapted = adapt(model)
    x, y = inputs(model)
    # The same parameter objects: nothing copied, nothing changed.
    assert {id(p) for p in adapted.parameters()} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        assert torch.equal(adapted(x), model(x))
        n = len(adapted.blocks)
        for unit in range(n):
            h = adapted.stem(x)
            for position, op in enumerate(variants.deletion_variant(n, [unit])):
                h = variants.apply_position(adapted, position, op, h)
            block, forward = deleted_forward(model, unit)
            block.forward = forward
            try:
                expected = model(x)
            finally:
                del block.forward
            torch.testing.assert_close(adapted.head(h), expected, rtol=0, atol=1e-5)
    assert torch.equal(adapted(x), model(x))  # unchanged by the lesions


@pytest.mark.parametrize("name", ["tv_resnet18", "timm_resnetv2_50", "timm_vit_tiny"])
def test_fast_lesion_engine_equals_the_naive_one(name):
    model = FULL[name]()
    adapted = adapt(model)
    x, _ = inputs(model, batch=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 5  # some wrong
    n = len(adapted.blocks)
    p = resolve_protocol(adapted)
    vs = [variants.intact(n)] + [variants.deletion_variant(n, [i]) for i in p.single]
    vs += [variants.duplication_variant(n, [i]) for i in p.duplication[:3]]
    if p.reorder_ranges:
        lo, hi = p.reorder_ranges[0]
        vs.append(variants.apply_swaps(n, [(lo, hi)]))
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    fast = variants.evaluate_variants(adapted, batches, vs)
    assert torch.equal(fast, variants.evaluate_variants_naive(adapted, batches, vs))
    assert fast[0] == pytest.approx(2 / 6)


def test_vit_protocol_touches_every_unit_and_reorders_across_all():
    adapted = adapt(vit(3))
    p = resolve_protocol(adapted)
    assert adapted.protocol == "vit" and len(adapted.blocks) == 6
    assert p.multi_deletion == p.duplication == tuple(range(6)) and p.excluded == ()
    assert p.reorder_ranges == ((0, 5),)


@pytest.mark.parametrize("name", SMALL)
def test_all_path_gradients_add_up_to_the_input_gradient(name):
    model = SMALL[name]().double()  # float64: the 2^n terms add up without rounding noise
    adapted = adapt(model)
    x, y = inputs(model, batch=2)
    x = x.double()
    n = len(adapted.blocks)
    every = torch.tensor(list(itertools.product([False, True], repeat=n)))
    grads = paths.path_input_gradients(adapted, x, y, every)
    xr = x.clone().requires_grad_()
    (full,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    torch.testing.assert_close(grads.sum(0), full, rtol=1e-9, atol=1e-12)
    some = every[[0, 1, len(every) // 2, -1]]
    torch.testing.assert_close(
        paths.path_gradient_norms(adapted, x, y, some), paths.path_gradient_norms_naive(adapted, x, y, some),
        rtol=1e-9, atol=1e-12,
    )


def test_subset_is_class_balanced_and_deterministic():
    targets = [0] * 10 + [1] * 10 + [2] * 2
    a = balanced_subset(targets, 7, seed=3)
    assert a == balanced_subset(targets, 7, seed=3) and len(a) == 7
    assert {targets[i] for i in a} == {0, 1, 2} and abs(sum(t == 0 for t in (targets[i] for i in a)) - 3) <= 1
    assert balanced_subset(targets, None, 0) == list(range(22))


# ----------------------------------------------------------------------------------------------
# The command


def write_folder(root: Path, classes=3, per_class=4, size=40, val=True) -> Path:
    g = torch.Generator().manual_seed(0)
    base = root / "val" if val else root
    for c in range(classes):
        (base / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(base / f"class{c}" / f"img{i}.JPEG", quality=90)
    return root


def save_resnet18(path: Path, classes: int) -> nn.Module:
    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.resnet18(num_classes=classes))
    torch.save(model.state_dict(), path)
    return model


def fail(capsys, *argv) -> str:
    assert analyze_main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_get_one_line_errors(tmp_path, capsys, monkeypatch):
    data = write_folder(tmp_path / "data", per_class=1)
    weights = tmp_path / "r18.pth"
    save_resnet18(weights, 3)
    assert "unknown model torchvision:resnet1000" in fail(capsys, "--model", "torchvision:resnet1000", "--data", str(data))
    assert "unknown model library" in fail(capsys, "--model", "keras:resnet50", "--data", str(data))
    assert "not those of torchvision:resnet34" in fail(
        capsys, "--model", "torchvision:resnet34", "--weights", str(weights), "--data", str(data))
    five = tmp_path / "r18_5.pth"
    save_resnet18(five, 5)
    assert "5 classes" in fail(capsys, "--model", "torchvision:resnet18", "--weights", str(five), "--data", str(data))
    assert "set DATA" in fail(capsys, "--model", "torchvision:resnet18", "--weights", str(weights))
    assert "not found" in fail(capsys, "--model", "torchvision:resnet18", "--data", str(tmp_path / "nowhere"))
    # Default weights that are not cached: where to put them, never a download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    err = fail(capsys, "--model", "torchvision:resnet18", "--data", str(data))
    assert "not in the local cache" in err and str(tmp_path / "torch-home" / "hub" / "checkpoints") in err
    # timm not installed.
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.delitem(sys.modules, "resens.models.adapters.timm", raising=False)
    with pytest.raises(AdapterError, match=r"timm is not installed: pip install 'resens\[timm\]'"):
        family("timm")
    assert "pip install 'resens[timm]'" in fail(capsys, "--model", "timm:resnet50", "--data", str(data))


@pytest.mark.slow
def test_make_lesion_on_a_torchvision_resnet_and_an_image_folder(tmp_path):
    data = write_folder(tmp_path / "data")
    weights = tmp_path / "resnet18.pth"
    model = save_resnet18(weights, 3)
    out = tmp_path / "lesion"
    venv = tmp_path / "venv"  # an installed environment: make runs sys.executable, installs nothing
    venv.mkdir()
    (venv / ".installed").touch()
    args = ("analysis.run=[single_deletion,multi_deletion,duplication,path_lengths] analysis.quick=true "
            "analysis.multi_deletion.trials=2 analysis.duplication.trials=2 trainer.enable_progress_bar=false")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    done = subprocess.run(
        ["make", "-s", "lesion", "MODEL=torchvision:resnet18", f"WEIGHTS={weights}", f"DATA={data}",
         f"OUT={out}", f"ARGS={args}", f"PY={sys.executable}", f"VENV={venv}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "analysis.json").read_text())
    # The torchvision model's own accuracy on the same folder, under its own transform.
    folder = torchvision.datasets.ImageFolder(
        data / "val", torchvision.models.ResNet18_Weights.DEFAULT.transforms())
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.tensor(folder.targets)
    with torch.no_grad():
        own_error = float((model(x).argmax(1) != y).double().mean())
    assert result["baseline_error"] == pytest.approx(own_error)
    assert result["model"]["weights_sha256"] == __import__("hashlib").sha256(weights.read_bytes()).hexdigest()
    assert result["data"]["images"] == 12 and result["data"]["classes"] == 3
    assert [r["block"] for r in result["single_deletion"]] == list(range(8))
    assert result["protocol"]["excluded"] == [0, 2, 4, 6]
    for key in ("single_deletion", "multi_deletion", "duplication", "path_lengths"):
        assert key in result["timings_s"]
    run = summarize_run(run_file(out))
    assert (run["job_type"], run["group"]) == ("analysis", "torchvision:resnet18")
    assert run["config"]["model"]["library_version"] == torchvision.__version__
    config = (out / "config.yaml").read_text()
    assert "library: torchvision:resnet18" in config and "name: imagefolder" in config

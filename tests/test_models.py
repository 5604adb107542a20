import pytest
import torch
from torch import nn

from resens.models import (
    PlainBlock,
    cifar_plain,
    cifar_resnet,
    imagenet_resnet,
    stage_of_blocks,
    survival_probs,
)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BatchNorm layers are the identity in eval mode; give them real statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SMALL = {
    "post": lambda **kw: cifar_resnet(14, width=4, **kw),
    "preact": lambda **kw: cifar_resnet(14, width=4, preact=True, **kw),
    "bottleneck": lambda **kw: imagenet_resnet(layers=(1, 3, 3, 1), width=4, num_classes=10, **kw),
    "plain": lambda **kw: cifar_plain(14, width=4),
}
INPUT = {"post": (3, 16, 16), "preact": (3, 16, 16), "bottleneck": (3, 64, 64), "plain": (3, 16, 16)}


def test_resnet110_is_the_papers_network():
    model = cifar_resnet(110)
    assert len(model.blocks) == 54
    assert n_params(model) == 1_727_962
    assert n_params(cifar_resnet(110, preact=True)) == 1_727_994
    assert [i for i, b in enumerate(model.blocks) if b.downsampling] == [18, 36]
    assert stage_of_blocks(model) == [0] * 18 + [1] * 18 + [2] * 18
    assert len(cifar_resnet(110, preact=True).blocks) == 54


def test_resnet200_is_the_papers_network():
    model = imagenet_resnet(200)
    assert len(model.blocks) == 66
    assert n_params(model) == 64_666_152
    assert [i for i, b in enumerate(model.blocks) if b.downsampling] == [0, 3, 27, 63]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("depth,blocks", [(26, 8), (50, 16), (101, 33), (152, 50)])
def test_imagenet_depth_table(depth, blocks):
    assert len(imagenet_resnet(depth, width=4).blocks) == blocks


def test_bad_depths_name_the_rule():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(100)
    with pytest.raises(ValueError, match="one of"):
        imagenet_resnet(77)


@pytest.mark.parametrize("kind", list(SMALL))
def test_forward_is_stem_blocks_head(kind):
    model = randomize_bn(SMALL[kind]()).eval()
    x = torch.randn(2, *INPUT[kind])
    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(model(x), model.head(h))


@pytest.mark.parametrize("kind", ["post", "preact", "bottleneck"])
@pytest.mark.parametrize("sd", [None, 0.5])
def test_block_is_post_of_shortcut_plus_scaled_branch(kind, sd):
    model = randomize_bn(SMALL[kind](stochastic_depth=sd)).eval()
    h = model.stem(torch.randn(2, *INPUT[kind]))
    for block in model.blocks:
        expected = block.post(block.shortcut(h) + block.survival_prob * block.branch(h))
        out = block(h)
        torch.testing.assert_close(out, expected)
        h = out


def test_plain_network_speaks_the_vocabulary():
    model = cifar_plain(14, width=4)
    assert all(isinstance(b, PlainBlock) and b.shortcut is None for b in model.blocks)
    assert all(b.survival_prob == 1.0 for b in model.blocks)


@pytest.mark.parametrize("kind", list(SMALL))
def test_every_parameter_gets_a_gradient(kind):
    model = SMALL[kind]().train()
    x = torch.randn(4, *INPUT[kind])
    model(x).logsumexp(1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_survival_probabilities_decay_linearly():
    probs = survival_probs(54, 0.5)
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(probs, probs[1:]))
    assert [b.survival_prob for b in cifar_resnet(110, stochastic_depth=0.5).blocks] == probs


def test_gate_frequencies_follow_survival_probabilities():
    model = cifar_resnet(14, width=4, stochastic_depth=0.2, gate_seed=3)
    draws = torch.tensor([model.draw_gates() for _ in range(4000)], dtype=torch.float)
    expected = torch.tensor([b.survival_prob for b in model.blocks])
    assert (draws.mean(0) - expected).abs().max() < 0.03


def test_same_seed_same_gates_and_state_round_trip():
    a = cifar_resnet(14, width=4, stochastic_depth=0.5, gate_seed=7)
    b = cifar_resnet(14, width=4, stochastic_depth=0.5, gate_seed=7)
    assert [a.draw_gates() for _ in range(20)] == [b.draw_gates() for _ in range(20)]
    state = a.state_dict()
    expected = [a.draw_gates() for _ in range(5)]
    c = cifar_resnet(14, width=4, stochastic_depth=0.5, gate_seed=99)
    c.load_state_dict(state)
    assert [c.draw_gates() for _ in range(5)] == expected


def test_closed_gate_skips_the_branch_and_test_time_scales_it():
    model = randomize_bn(cifar_resnet(14, width=4, stochastic_depth=0.5))
    block = model.blocks[1]  # stage 0: 4 channels at 16x16, survival probability < 1
    calls = []
    block.branch.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4, 16, 16)
    block.train()
    out = block(x, gate=False)
    assert calls == []
    torch.testing.assert_close(out, block.post(block.shortcut(x)))
    block(x, gate=True)
    assert calls == [1]
    block.eval()
    torch.testing.assert_close(
        block(x), block.post(block.shortcut(x) + block.survival_prob * block.branch(x))
    )


def test_training_forward_uses_the_drawn_gates():
    model = cifar_resnet(14, width=4, stochastic_depth=0.1, gate_seed=1).train()
    counts = [0] * len(model.blocks)
    for i, b in enumerate(model.blocks):
        b.branch.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
    twin = cifar_resnet(14, width=4, stochastic_depth=0.1, gate_seed=1)
    expected = [0] * len(model.blocks)
    for _ in range(10):
        model(torch.randn(2, 3, 16, 16))
        for i, g in enumerate(twin.draw_gates()):
            expected[i] += g
    assert counts == expected


@pytest.mark.parametrize("kwargs,fan", [
    (dict(preact=True), "out"),  # fb.resnet.torch ConvInit: N(0, 2 / (k k out))
    (dict(shortcut_pool="avg", conv_bias=True), "in"),  # Huang et al.: nninit.kaiming, N(0, 2 / (k k in))
])
def test_initialisation_is_the_authors(kwargs, fan):
    torch.manual_seed(0)
    model = cifar_resnet(110, **kwargs)
    conv = model.blocks[40].branch[-1] if kwargs.get("preact") else model.blocks[40].branch[0]
    k, cout, cin = conv.kernel_size[0], conv.out_channels, conv.in_channels
    expected = (2 / (k * k * (cout if fan == "out" else cin))) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    if kwargs.get("conv_bias"):
        assert all(bool((m.bias == 0).all()) for m in model.modules() if isinstance(m, nn.Conv2d))
    else:
        assert bool((model.head[-1].bias == 0).all())

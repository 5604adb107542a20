import pytest
import torch
from scipy.stats import kendalltau
from torch import nn

from resens.analysis import variants as V
from resens.models import ResidualNet, stage_of_blocks
from tests.test_models import INPUT, SMALL, randomize_bn


class ShortcutOnly(nn.Module):
    """What remains of a deleted block, written independently of the engine."""

    survival_prob = 1.0

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x, gate=None):
        if self.block.shortcut is None:
            return x
        return self.block.post(self.block.shortcut(x))


def rebuilt(model: ResidualNet, variant) -> ResidualNet:
    blocks = [ShortcutOnly(model.blocks[i]) if op is None else model.blocks[op] for i, op in enumerate(variant)]
    return ResidualNet(model.stem, blocks, model.head).eval()


def error(model: nn.Module, batches) -> float:
    wrong = total = 0
    with torch.no_grad():
        for x, y in batches:
            wrong += int((model(x).argmax(1) != y).sum())
            total += len(y)
    return wrong / total


def make(kind: str, sd=None, seed=0):
    torch.manual_seed(seed)
    model = SMALL[kind]() if kind == "plain" else SMALL[kind](stochastic_depth=sd)
    model = randomize_bn(model, seed).eval()
    linear = model.head[-1]
    linear.weight.data.normal_(0, 3.0)  # varied predictions, so that variants can differ
    linear.bias.data.zero_()
    for block in model.blocks:
        # pre-activation branches end in a conv and start small; make deletions matter
        last = block.residual[-1] if hasattr(block, "residual") else block.branch[-1]
        if isinstance(last, nn.Conv2d):
            last.weight.data.mul_(8)
    g = torch.Generator().manual_seed(seed)
    c = INPUT[kind][0]
    # per-sample colour offsets survive global pooling, so predictions vary across samples
    batches = [
        (torch.randn(24, *INPUT[kind], generator=g) + 2 * torch.randn(24, c, 1, 1, generator=g),
         torch.randint(0, 10, (24,), generator=g))
        for _ in range(2)
    ]
    # labels the intact model mostly gets right, so that errors move when blocks go
    batches = [(x, torch.where(torch.rand(24, generator=g) < 0.7, model(x).argmax(1), y)) for x, y in batches]
    return model, batches


def test_intact_variant_is_the_models_own_error():
    model, batches = make("post")
    err = V.evaluate_variants(model, batches, [V.intact(len(model.blocks))])
    assert err.item() == pytest.approx(error(model, batches))


@pytest.mark.parametrize("kind,sd", [("post", None), ("preact", None), ("bottleneck", None), ("post", 0.5), ("plain", None)])
def test_deleting_block_i_equals_the_network_rebuilt_without_it(kind, sd):
    model, batches = make(kind, sd)
    n = len(model.blocks)
    deletable = [i for i in range(n) if not (kind == "plain" and model.blocks[i].downsampling)]
    vs = [V.deletion_variant(n, [i]) for i in deletable] + [V.deletion_variant(n, deletable[:3])]
    # sample j is labelled with variant (j mod V)'s own prediction, so different variants err differently
    with torch.no_grad():
        batches = [
            (x, torch.stack([rebuilt(model, vs[j % len(vs)])(x[j : j + 1]).argmax(1)[0] for j in range(len(x))]))
            for x, _ in batches
        ]
    got = V.evaluate_variants(model, batches, vs)
    expected = torch.tensor([error(rebuilt(model, v), batches) for v in vs], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert len(set(got.tolist())) > 1  # the test data can tell variants apart


@pytest.mark.parametrize("kind", ["post", "preact", "bottleneck"])
def test_reorders_equal_rebuilt_networks_and_the_naive_engine(kind):
    model, batches = make(kind)
    n = len(model.blocks)
    g = torch.Generator().manual_seed(1)
    groups = V.swappable_groups(model, stage_of_blocks(model))
    orders = [V.sample_swaps(n, groups, k, g)[0] for k in (1, 2, 3, 3)]
    dels = [V.deletion_variant(n, s) for s in V.sample_deletions(V.deletable_blocks(model), 2, 4, g)]
    vs = [V.intact(n), *orders, *dels]
    got = V.evaluate_variants(model, batches, vs)
    expected = torch.tensor([error(rebuilt(model, v), batches) for v in vs], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(V.evaluate_variants_naive(model, batches, vs), expected)


def test_memory_budget_and_folding_give_the_same_counts():
    model, batches = make("post")
    n = len(model.blocks)
    vs = [V.intact(n)] + [V.deletion_variant(n, [i]) for i in range(n)]
    wide = V.count_variant_errors(model, batches, vs)
    narrow = V.count_variant_errors(model, batches, vs, budget=1)
    folded = V.count_variant_errors(model, batches, vs, fold=1 << 30)
    unfolded = V.count_variant_errors(model, batches, vs, fold=1)
    assert wide[1] == narrow[1] == folded[1] == unfolded[1] == 48
    assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[0], folded[0]) and torch.equal(wide[0], unfolded[0])


def test_engine_leaves_the_model_untouched():
    model, batches = make("post", sd=0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    V.evaluate_variants(model, batches, [V.deletion_variant(len(model.blocks), [1])])
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_variants_are_refused():
    model, batches = make("post")
    with pytest.raises(ValueError, match="one entry per block"):
        V.evaluate_variants(model, batches, [[0, 1]])
    plain, pb = make("plain")
    down = next(i for i, b in enumerate(plain.blocks) if b.downsampling)
    with pytest.raises(ValueError, match="cannot be deleted"):
        V.evaluate_variants(plain, pb, [V.deletion_variant(len(plain.blocks), [down])])


def test_deletion_sampler_respects_its_constraints():
    model, _ = make("post")
    allowed = V.deletable_blocks(model, exclude_downsampling=True, exclude=[0])
    assert 0 not in allowed and not any(model.blocks[i].downsampling for i in allowed)
    g = torch.Generator().manual_seed(0)
    sets = V.sample_deletions(allowed, 3, 50, g)
    assert all(len(set(s)) == 3 and set(s) <= set(allowed) and s == sorted(s) for s in sets)
    assert V.sample_deletions(allowed, 3, 50, torch.Generator().manual_seed(0)) == sets


def test_swap_sampler_stays_within_stages_and_shapes():
    from resens.models import cifar_resnet

    model = cifar_resnet(110)
    stages = stage_of_blocks(model)
    groups = V.swappable_groups(model, stages)
    assert [len(g) for g in groups] == [18, 17, 17]
    g = torch.Generator().manual_seed(0)
    for k in range(1, 11):
        order, pairs = V.sample_swaps(54, groups, k, g)
        assert len(pairs) == k
        assert all(stages[a] == stages[b] for a, b in pairs)
        assert all(order[i] == i for i in (18, 36))  # downsampling blocks never move
        assert all(stages[order[i]] == stages[i] for i in range(54))
        assert V.kendall_tau(order) == pytest.approx(kendalltau(range(54), order).statistic)
    assert V.kendall_tau([1, 0, 2, 3]) == pytest.approx(2 / 3)

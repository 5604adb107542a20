from collections import Counter

import pytest
import torch
from scipy.stats import binomtest, chisquare, kendalltau
from torch import nn

from resens.analysis import variants as V
from resens.analysis.protocol import resolve_protocol
from resens.errors import AnalysisOutOfMemory, ResensError
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


def centre_head(model: ResidualNet, batches) -> None:
    """Shift the classifier's bias by its mean logit over the data: the pooled features share a
    large positive part, which would otherwise pick the same class for every sample and variant."""
    x = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        h = model.stem(x)
        for block in model.blocks:
            h = block(h)
        linear = model.head[-1]
        linear.bias.copy_(-(model.head[:-1](h).mean(0) @ linear.weight.T))


def predict(model: ResidualNet, x, variant) -> torch.Tensor:
    """Predicted classes of a variant of any length, position by position."""
    h = model.stem(x)
    for i, op in enumerate(variant):
        h = ShortcutOnly(model.blocks[i])(h) if op is None else model.blocks[op](h)
    return model.head(h).argmax(1)


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


def duplicated(model: ResidualNet, x, blocks) -> torch.Tensor:
    """The network with each of ``blocks`` run twice in a row, written out by hand."""
    h = model.stem(x)
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i in blocks:
            h = block(h)
    return model.head(h)


@pytest.mark.parametrize("kind", ["post", "preact", "bottleneck"])
def test_reorders_equal_rebuilt_networks_and_the_naive_engine(kind):
    model, batches = make(kind)
    n = len(model.blocks)
    p = resolve_protocol(model, exclude=[])
    g = torch.Generator().manual_seed(1)
    possible = sum((hi - lo + 1) * (hi - lo) for lo, hi in p.reorder_ranges)
    orders = [V.apply_swaps(n, V.sample_swaps(p.reorder_ranges, min(k, possible), g)) for k in (1, 2, 3, 3)]
    dels = [V.deletion_variant(n, s) for s in V.sample_deletions(p.multi_deletion, 2, 4, g)]
    vs = [V.intact(n), *orders, *dels]
    got = V.evaluate_variants(model, batches, vs)
    expected = torch.tensor([error(rebuilt(model, v), batches) for v in vs], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(V.evaluate_variants_naive(model, batches, vs), expected)


@pytest.mark.parametrize("kind,sd", [("post", None), ("preact", None), ("bottleneck", None), ("post", 0.5)])
def test_duplication_equals_running_the_block_twice(kind, sd):
    model, batches = make(kind, sd)
    centre_head(model, batches)
    n = len(model.blocks)
    allowed = resolve_protocol(model).duplication
    sets = [[allowed[0]], [allowed[-1]], list(allowed[:3]), list(allowed[1::2])]
    vs = [V.duplication_variant(n, s) for s in sets]
    assert [len(v) for v in vs] == [n + len(s) for s in sets]
    with torch.no_grad():
        expected = [
            sum(int((duplicated(model, x, s).argmax(1) != y).sum()) for x, y in batches) / 48 for s in sets
        ]
        x = batches[0][0]
        # the test can tell a duplication from the intact network
        assert all(not torch.allclose(duplicated(model, x, s), model(x)) for s in sets)
    got = V.evaluate_variants(model, batches, vs)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert got.max() > 0


def test_variants_of_mixed_lengths_in_one_call_equal_the_naive_engine():
    model, batches = make("post")
    centre_head(model, batches)
    n = len(model.blocks)
    p = resolve_protocol(model, exclude=[])
    g = torch.Generator().manual_seed(3)
    vs = [
        V.intact(n),
        V.duplication_variant(n, [n - 1]),  # ends one position after the intact network
        V.duplication_variant(n, [1, n - 1]),
        V.duplication_variant(n, [1]),
        *[V.duplication_variant(n, s) for s in V.sample_duplications(p.duplication, 2, 3, g)],
        V.deletion_variant(n, [2, 3]),
        V.apply_swaps(n, V.sample_swaps(p.reorder_ranges, 2, g)),
        [None, 1, 1, *range(2, n)],  # a deletion and a duplication together
    ]
    with torch.no_grad():  # sample j labelled with variant (j mod V)'s own prediction
        batches = [
            (x, torch.stack([predict(model, x[j : j + 1], vs[j % len(vs)])[0] for j in range(len(x))]))
            for x, _ in batches
        ]
    naive = V.evaluate_variants_naive(model, batches, vs)
    alone = torch.cat([V.evaluate_variants(model, batches, [v]) for v in vs])
    torch.testing.assert_close(naive, alone)
    for kwargs in ({}, {"budget": 1}, {"fold": 1}, {"fold": 1 << 30}):
        torch.testing.assert_close(V.evaluate_variants(model, batches, vs, **kwargs), naive)
    assert len(set(naive.tolist())) > 2


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
    n = len(model.blocks)
    with pytest.raises(ValueError, match="block indices"):
        V.evaluate_variants(model, batches, [[0, n]])
    with pytest.raises(ValueError, match="needs a position below"):
        V.evaluate_variants(model, batches, [[*range(n), None]])
    down = next(i for i, b in enumerate(model.blocks) if b.downsampling)
    with pytest.raises(ValueError, match="shape mismatch"):
        V.evaluate_variants(model, batches, [V.duplication_variant(n, [down])])
    with pytest.raises(ValueError, match="distinct"):
        V.duplication_variant(n, [1, 1])
    plain, pb = make("plain")
    down = next(i for i, b in enumerate(plain.blocks) if b.downsampling)
    with pytest.raises(ValueError, match="cannot be deleted"):
        V.evaluate_variants(plain, pb, [V.deletion_variant(len(plain.blocks), [down])])


class Exhausting(nn.Module):
    """A block whose forward runs out of device memory."""

    def __init__(self, error: RuntimeError) -> None:
        super().__init__()
        self.error = error

    def forward(self, x, gate=None):
        raise self.error


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"),
])
def test_out_of_memory_is_reported_as_such(err):
    model, batches = make("post")
    n = len(model.blocks)
    model.blocks[2] = Exhausting(err)
    vs = [V.intact(n), V.deletion_variant(n, [1])]
    with pytest.raises(AnalysisOutOfMemory) as info:
        V.count_variant_errors(model, batches, vs)
    message = str(info.value)
    assert "\n" not in message and "shape" not in message
    assert "out of memory" in message and "2 variants" in message and "batch size 24" in message
    assert "data.eval_batch_size" in message
    assert isinstance(info.value, ResensError)


def test_deletion_and_duplication_samplers_draw_distinct_blocks_uniformly():
    allowed = [1, 2, 3, 5, 8, 13]
    for sampler in (V.sample_deletions, V.sample_duplications):
        sets = sampler(allowed, 3, 3000, torch.Generator().manual_seed(0))
        assert all(len(set(s)) == 3 and set(s) <= set(allowed) and s == sorted(s) for s in sets)
        assert sampler(allowed, 3, 3000, torch.Generator().manual_seed(0)) == sets
        # each of the C(6,3) = 20 subsets equally likely
        counts = Counter(tuple(s) for s in sets)
        assert len(counts) == 20
        assert chisquare(list(counts.values())).pvalue > 1e-3
        with pytest.raises(ValueError, match="cannot"):
            sampler(allowed, 7, 1, torch.Generator())


def test_swap_sampler_follows_the_authors_procedure():
    ranges = [(0, 1), (3, 9)]  # 2 and 42 ordered pairs: uniform ranges, not uniform pairs
    g = torch.Generator().manual_seed(0)
    trials = [V.sample_swaps(ranges, 3, g) for _ in range(3000)]
    assert V.sample_swaps(ranges, 3, torch.Generator().manual_seed(0)) == trials[0]
    reversed_pair = 0
    for pairs in trials:
        assert len(pairs) == 3 and len(set(pairs)) == 3
        assert all(a != b and any(lo <= a <= hi and lo <= b <= hi for lo, hi in ranges) for a, b in pairs)
        reversed_pair += any((b, a) in pairs for a, b in pairs)
    assert reversed_pair > 0  # a pair and its reverse may both occur, as in the authors' runs
    # Each draw picks its range uniformly, then keeps the pair only if a != b (probability
    # 1 - 1/m in a range of m blocks): a trial's first pair lies in range r with probability
    # proportional to 1 - 1/m_r, here 1/2 : 6/7, far from the 2 : 42 of pairs drawn uniformly.
    first = [pairs[0] for pairs in trials]
    small = sum(a <= 1 for a, _ in first)
    assert binomtest(small, len(first), (1 / 2) / (1 / 2 + 6 / 7)).pvalue > 1e-3
    # inside a range, every ordered pair is equally likely
    counts = Counter(p for p in first if p[0] >= 3)
    assert len(counts) == 42
    assert chisquare(list(counts.values())).pvalue > 1e-3
    with pytest.raises(ValueError, match="distinct swaps"):
        V.sample_swaps([(0, 1)], 3, g)
    with pytest.raises(ValueError, match="two blocks"):
        V.sample_swaps([(4, 4)], 1, g)


def test_swaps_order_displacement_and_kendall_tau():
    from resens.models import cifar_resnet

    model = cifar_resnet(110)
    p = resolve_protocol(model)
    stages = stage_of_blocks(model)
    g = torch.Generator().manual_seed(0)
    for k in range(1, 11):
        pairs = V.sample_swaps(p.reorder_ranges, k, g)
        order = V.apply_swaps(54, pairs)
        assert len(pairs) == k
        assert all(stages[a] == stages[b] for a, b in pairs)
        assert all(order[i] == i for i in (0, 18, 36))  # first blocks of stages never move
        assert sorted(order) == list(range(54))
        assert V.total_displacement(pairs) == sum(abs(a - b) for a, b in pairs)
        assert V.kendall_tau(order) == pytest.approx(kendalltau(range(54), order).statistic)
    # pairs apply in turn: (0 1) then (1 2) moves block 0 to position 2
    assert V.apply_swaps(3, [(0, 1), (1, 2)]) == [1, 2, 0]
    assert V.apply_swaps(3, [(1, 2), (0, 1)]) == [2, 0, 1]
    assert V.total_displacement([(0, 5), (7, 3)]) == 9
    assert V.kendall_tau([1, 0, 2, 3]) == pytest.approx(2 / 3)

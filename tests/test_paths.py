"""Path lengths, per-path gradients (fast engine against two independent references), effective
paths and deletion survival."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

import resens.analysis.paths as P
from resens.analysis.paths import engine, vjp
from resens.models import Block, ResidualNet, cifar_plain, cifar_resnet, imagenet_resnet
from resens.models.blocks import OptionAShortcut


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tensors here are tiny: a second intra-op thread only adds synchronisation latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode BN is a real map."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.6 * torch.rand(c, generator=g) - 0.3)
    return model


class OddBlock(Block):
    """Speaks the vocabulary with parts the engine does not read (Hardtanh in place, Softplus, a
    lambda) and a same-shape conv shortcut: exercises the autograd fallback."""

    def __init__(self, c: int, survival_prob: float, lambda_shortcut: bool) -> None:
        super().__init__(survival_prob)
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Hardtanh(inplace=True), nn.Conv2d(c, c, 1)
        )
        self.shortcut = (lambda x: 0.5 * x) if lambda_shortcut else nn.Conv2d(c, c, 1, bias=False)
        self.post = nn.Softplus()


def odd_net() -> ResidualNet:
    blocks = [OddBlock(4, 0.7, False), OddBlock(4, 1.0, True), OddBlock(4, 0.9, False)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return ResidualNet(nn.Conv2d(3, 4, 3, padding=1), blocks, head)


MODELS = {
    "postact": (lambda: cifar_resnet(14, width=4), (3, 3, 8, 8)),
    "preact": (lambda: cifar_resnet(14, preact=True, width=4), (3, 3, 8, 8)),
    "bottleneck": (lambda: imagenet_resnet(layers=(1, 2, 1, 1), width=4, num_classes=10), (2, 3, 16, 16)),
    "stochastic": (lambda: cifar_resnet(8, width=4, stochastic_depth=0.5), (3, 3, 8, 8)),
    "stochastic_preact": (lambda: cifar_resnet(8, preact=True, width=4, stochastic_depth=0.5), (3, 3, 8, 8)),
    "huang": (lambda: cifar_resnet(8, width=4, shortcut_pool="avg", conv_bias=True, stochastic_depth=0.5), (3, 3, 8, 8)),
    "fallback": (odd_net, (3, 3, 8, 8)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomize(build().double(), seed).eval()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    return model, x, y


def some_paths(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """All-shortcut, all-branch, then random paths of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(count, n, generator=g) < torch.rand(count, 1, generator=g)
    return torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), rand])


def jacobian_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """Independent of the engine and of the naive version: explicit Jacobian matrices of the stem,
    of post, branch and shortcut of every block at the intact activations, multiplied out."""

    def jac(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        """[out numel, in numel]"""
        return jacobian(fn, inp, vectorize=True).reshape(-1, inp.numel())

    with torch.no_grad():
        h = model.stem(x)
    stem = jac(model.stem, x)
    blocks = []
    for block in model.blocks:
        p = block.survival_prob
        with torch.no_grad():
            z = block.shortcut(h) + p * block.branch(h)
        blocks.append((p * jac(block.branch, h), jac(block.shortcut, h), jac(block.post, z)))
        h = block(h)
    out = h.detach().requires_grad_()
    (v,) = torch.autograd.grad(F.cross_entropy(model.head(out), y), out)
    norms = []
    for path in paths.tolist():
        g = v.reshape(-1)
        for (branch, shortcut, post), through_branch in zip(blocks[::-1], path[::-1], strict=True):
            g = (branch if through_branch else shortcut).T @ (post.T @ g)
        norms.append(float((stem.T @ g).norm()))
    return torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_equals_jacobian_products(name):
    model, x, y = make(name)
    paths = some_paths(len(model.blocks), 10)
    expected = jacobian_reference(model, x, y, paths)
    got = P.path_gradient_norms(model, x, y, paths, chunk_size=5)
    assert got.dtype == torch.float64 and got.shape == (len(paths),)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["postact", "preact", "bottleneck", "stochastic", "fallback"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_fast_equals_naive(name, chunk_size):
    model, x, y = make(name, seed=1)
    paths = some_paths(len(model.blocks), 14, seed=1)
    fast = P.path_gradient_norms(model, x, y, paths, chunk_size=chunk_size)
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["postact", "bottleneck", "fallback"])
def test_batched_rows_mode_equals_naive(monkeypatch, name):
    """The GPU strategy (gather rows, one VJP call per block) gives the same numbers."""
    monkeypatch.setattr(engine, "_batched_rows", lambda device: True)
    model, x, y = make(name, seed=2)
    paths = some_paths(len(model.blocks), 20, seed=2)
    fast = P.path_gradient_norms(model, x, y, paths, chunk_size=7)
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


def test_float32_close_to_float64():
    model, x, y = make("postact", seed=3)
    paths = some_paths(len(model.blocks), 6, seed=3)
    exact = P.path_gradient_norms(model, x, y, paths)
    single = P.path_gradient_norms(model.float(), x.float(), y, paths)
    torch.testing.assert_close(single, exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["preact", "stochastic_preact", "postact", "stochastic"])
def test_path_gradients_sum_to_input_gradient(name):
    """Every block's Jacobian is J_post (J_shortcut + p J_branch), a post-activation ReLU mask
    included, so the 2^n path gradients add up to the network's input gradient."""
    model, x, y = make(name, seed=4)
    n = len(model.blocks)
    everything = torch.tensor(list(itertools.product([False, True], repeat=n)))
    grads = P.path_input_gradients(model, x, y, everything, chunk_size=3)
    assert grads.shape == (2**n, *x.shape)
    xr = x.clone().requires_grad_()
    (full,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    torch.testing.assert_close(grads.sum(0), full, rtol=1e-10, atol=1e-14)
    norms = P.path_gradient_norms(model, x, y, everything)
    torch.testing.assert_close(norms, grads.flatten(1).norm(dim=1), rtol=1e-12, atol=0)


def test_model_untouched():
    model, x, y = make("stochastic", seed=5)
    model.train()
    model.blocks[1].eval()
    model.head[-1].weight.requires_grad_(False)
    model.stem[0].weight.grad = torch.full_like(model.stem[0].weight, 0.25)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    flags = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    gates = model.gate_generator.get_state()
    paths = some_paths(len(model.blocks), 5)
    P.path_gradient_norms(model, x, y, paths)
    P.path_gradient_norms_naive(model, x, y, paths)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k
    assert all(m.training == flag for m, flag in flags)
    assert all(p.requires_grad == r for p, r in requires)
    assert torch.equal(model.gate_generator.get_state(), gates)
    assert torch.equal(model.stem[0].weight.grad, torch.full_like(model.stem[0].weight, 0.25))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "stem.0.weight")


def test_plain_blocks_only_through_the_branch():
    model = randomize(cifar_plain(8, width=4).double()).eval()
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    n = len(model.blocks)
    only = torch.ones(1, n, dtype=torch.bool)
    torch.testing.assert_close(
        P.path_gradient_norms(model, x, y, only), P.path_gradient_norms_naive(model, x, y, only)
    )
    with pytest.raises(ValueError, match="plain"):
        P.path_gradient_norms(model, x, y, torch.zeros(1, n, dtype=torch.bool))
    with pytest.raises(ValueError, match="plain"):
        P.path_gradient_norms_naive(model, x, y, torch.zeros(1, n, dtype=torch.bool))


def test_paths_shape_checked():
    model, x, y = make("postact")
    n = len(model.blocks)
    with pytest.raises(ValueError, match="paths"):
        P.path_gradient_norms(model, x, y, torch.ones(2, n + 1, dtype=torch.bool))
    assert P.path_gradient_norms(model, x, y, torch.zeros(0, n, dtype=torch.bool)).shape == (0,)


def test_sample_paths():
    g = torch.Generator().manual_seed(0)
    paths = P.sample_paths(10, 3, 6000, g)
    assert paths.dtype == torch.bool and paths.shape == (6000, 10)
    assert (paths.sum(1) == 3).all()
    # Each block is a branch with probability 3/10: 1800 ± ~4.5 sigma.
    assert (paths.sum(0) - 1800).abs().max() < 160
    # All C(4, 2) = 6 subsets about equally often.
    small = P.sample_paths(4, 2, 6000, torch.Generator().manual_seed(1))
    counts = torch.unique(small, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and (counts - 1000).abs().max() < 140
    again = P.sample_paths(10, 3, 6000, torch.Generator().manual_seed(0))
    assert torch.equal(paths, again)
    assert not torch.equal(paths, P.sample_paths(10, 3, 6000, torch.Generator().manual_seed(2)))
    assert P.sample_paths(5, 0, 3, g).sum() == 0 and P.sample_paths(5, 5, 3, g).all()
    with pytest.raises(ValueError):
        P.sample_paths(5, 6, 1, g)


def test_path_length_distribution():
    for n in (0, 1, 7, 54, 300):
        d = P.path_length_distribution(n)
        assert d.dtype == torch.float64 and d.shape == (n + 1,)
        assert math.isclose(float(d.sum()), 1.0, rel_tol=1e-12)
    assert torch.equal(P.path_length_distribution(7), torch.tensor([math.comb(7, k) / 128 for k in range(8)], dtype=torch.float64))
    d = P.path_length_distribution(54)
    assert int(d.argmax()) == 27
    assert float(d[19:36].sum()) >= 0.95  # the paper: 95% of paths go through 19 to 35 blocks
    assert float(d[22:33].sum()) < 0.95


def test_share_of_paths():
    assert round(P.share_of_paths(54, 5, 17), 6) == 0.004537
    assert P.share_of_paths(4, 0, 4) == 1.0
    assert P.share_of_paths(4, 1, 2) == (4 + 6) / 16


def brute_force_window(total: list[float], share: float) -> tuple[int, int]:
    whole, best = sum(total), None
    for lo, hi in itertools.combinations_with_replacement(range(len(total)), 2):
        held = sum(total[lo : hi + 1])
        if held >= share * whole * (1 - 1e-12):
            key = (hi - lo, -held)
            if best is None or key < best[0]:
                best = (key, (lo, hi))
    return best[1]


def test_effective_paths_window():
    n = 12
    # Norm decaying like 0.3^k: the gradient mass sits at short lengths, not at n/2.
    mean = torch.tensor([0.3**k for k in range(n + 1)], dtype=torch.float64)
    mean[n] = float("nan")  # unmeasured
    out = P.effective_paths(mean, n, share=0.9)
    total = [math.comb(n, k) / 2**n * (0.0 if k == n else 0.3**k) for k in range(n + 1)]
    torch.testing.assert_close(out["total_gradient"], torch.tensor(total, dtype=torch.float64))
    assert (out["lo"], out["hi"]) == brute_force_window(total, 0.9)
    assert out["hi"] < n // 2
    held = sum(total[out["lo"] : out["hi"] + 1]) / sum(total)
    assert math.isclose(out["share_of_gradient"], held) and held >= 0.9
    assert math.isclose(out["share_of_paths"], P.share_of_paths(n, out["lo"], out["hi"]))
    for share in (0.5, 0.75, 0.99, 1.0):
        got = P.effective_paths(mean, n, share)
        assert (got["lo"], got["hi"]) == brute_force_window(total, share)


def test_effective_paths_constructed():
    # Total gradient C(n,k)/2^n * mean: put it all on lengths 2..4, most on 3.
    n = 8
    frac = P.path_length_distribution(n)
    want = torch.zeros(n + 1, dtype=torch.float64)
    want[2], want[3], want[4] = 0.2, 0.6, 0.2
    out = P.effective_paths(want / frac, n, share=0.7)
    assert (out["lo"], out["hi"]) == (2, 3) or (out["lo"], out["hi"]) == (3, 4)
    assert math.isclose(out["share_of_gradient"], 0.8)
    out = P.effective_paths(want / frac, n, share=0.6)
    assert (out["lo"], out["hi"]) == (3, 3)
    want[2] = 0.25  # tie in width: the larger share wins
    out = P.effective_paths(want / frac, n, share=0.7)
    assert (out["lo"], out["hi"]) == (2, 3)
    with pytest.raises(ValueError):
        P.effective_paths(torch.zeros(n + 1), n)


def test_survival_by_enumeration():
    n = 6
    everything = list(itertools.product([0, 1], repeat=n))
    weights = torch.tensor([0.5**k for k in range(n + 1)], dtype=torch.float64)
    for d in range(n + 1):
        # Any d blocks give the same counts; average over all choices anyway.
        alive = torch.zeros(n + 1, dtype=torch.float64)
        count = torch.zeros(n + 1, dtype=torch.float64)
        sets = list(itertools.combinations(range(n), d))
        for deleted in sets:
            for path in everything:
                k = sum(path)
                count[k] += 1
                alive[k] += all(path[b] == 0 for b in deleted)
        by_length = alive / count
        assert P.path_survival(n, d) == float(alive.sum() / count.sum())
        torch.testing.assert_close(P.path_survival_by_length(n, d), by_length)
        for lo, hi in [(0, n), (1, 3), (2, 2)]:
            sl = slice(lo, hi + 1)
            expected = float(alive[sl].sum() / count[sl].sum())
            assert math.isclose(P.effective_path_survival(n, d, (lo, hi)), expected, rel_tol=1e-12)
            weighted = float((alive[sl] * weights[sl]).sum() / (count[sl] * weights[sl]).sum())
            got = P.effective_path_survival(n, d, (lo, hi), weights)
            assert math.isclose(got, weighted, rel_tol=1e-12)
    assert P.effective_path_survival(54, 0, (5, 17)) == 1.0
    with pytest.raises(ValueError):
        P.path_survival(3, 4)


def test_gradient_by_length_protocol():
    model, x, y = make("postact", seed=6)
    n = len(model.blocks)
    batches = [(x, y), (x[:2] * 0.5, y[:2]), (x.flip(0), y.flip(0))]
    seen = []
    out = P.path_gradient_by_length(model, iter(batches), [0, 1, 3], 5, seed=0, progress=seen.append)
    again = P.path_gradient_by_length(model, batches, [0, 1, 3], 5, seed=0)
    assert torch.equal(out.norms, again.norms)
    assert out.lengths == [0, 1, 3] and out.norms.shape == (3, 5) and sum(seen) == 15
    assert torch.equal(out.count, torch.tensor([5, 5, 5]))
    torch.testing.assert_close(out.mean, out.norms.mean(1))
    torch.testing.assert_close(out.std, out.norms.std(1))
    assert torch.isnan(out.mean_by_length()[2]) and out.mean_by_length()[3] == out.mean[2]
    assert out.fallbacks == {}
    # Replay the draws: batch j serves samples [2, 2, 1] of each length, drawn with seed 1000 + j.
    done = 0
    for j, ((xb, yb), share) in enumerate(zip(batches, [2, 2, 1], strict=True)):
        g = torch.Generator().manual_seed(1000 + j)
        paths = torch.cat([P.sample_paths(n, k, share, g) for k in [0, 1, 3]])
        naive = P.path_gradient_norms_naive(model, xb, yb, paths).view(3, share)
        torch.testing.assert_close(out.norms[:, done : done + share], naive, rtol=1e-9, atol=0)
        done += share
    # Two processes: each measures its batches (j mod 2), zeros elsewhere; the sum is the whole.
    ranks = [P.path_gradient_by_length(model, batches, [0, 1, 3], 5, 0, rank=r, world=2) for r in (0, 1)]
    assert (ranks[0].norms[:, 2:4] == 0).all() and (ranks[1].norms[:, [0, 1, 4]] == 0).all()
    assert torch.equal(ranks[0].norms + ranks[1].norms, out.norms)
    with pytest.raises(ValueError):
        P.path_gradient_by_length(model, batches, [0], 5, 0, rank=2, world=2)


@pytest.mark.parametrize("slab", [1, 300, 5000])
@pytest.mark.parametrize("name", ["postact", "bottleneck", "fallback"])
def test_cpu_slabs_equal_naive(monkeypatch, name, slab):
    """VJPs run on part of a row's batch (down to one sample) or on several rows at once."""
    monkeypatch.setattr(engine._Workspace, "CPU_SLAB", slab)
    model, x, y = make(name, seed=7)
    paths = some_paths(len(model.blocks), 12, seed=7)
    fast = P.path_gradient_norms(model, x, y, paths, chunk_size=5)
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


def no_fallback_warnings(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn(), failing on any warning (the fallback warning among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize(
    "build",
    [
        lambda: cifar_resnet(20, width=4),
        lambda: cifar_resnet(20, preact=True, width=4),
        lambda: cifar_resnet(20, width=4, shortcut_pool="avg", conv_bias=True),
        lambda: cifar_resnet(20, width=4, shortcut_pool="avg", conv_bias=True, stochastic_depth=0.5),
    ],
    ids=["standard", "preact", "huang", "huang_stochastic"],
)
def test_cifar_models_take_the_fast_path(build, monkeypatch):
    """Every layer of the CIFAR networks (Huang et al.'s average-pooled option-A shortcuts and
    biased convolutions included) has a fast VJP: no fallback, and the naive result."""
    torch.manual_seed(10)
    model = randomize(build().double(), 10).eval()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4, 7])
    paths = some_paths(len(model.blocks), 14, seed=10)
    counts: dict[str, int] = {}
    fast = no_fallback_warnings(lambda: P.path_gradient_norms(model, x, y, paths, chunk_size=6, fallbacks=counts))
    assert counts == {}
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


@pytest.mark.parametrize("pool", ["subsample", "avg"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_option_a_vjp_equals_autograd(pool, stride):
    """Odd sizes: subsampling keeps the ceil, average pooling the floor of H/s (the rest gets 0).
    Written into a reused channels-last buffer full of NaN, as the engine does."""
    shortcut = OptionAShortcut(3, 5, stride, pool)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    tape = vjp._Tape(shortcut, channels_last=True)
    out, op = vjp._linearize(tape, shortcut, x)
    tape.close()
    assert isinstance(op, vjp._OptionAT)
    u = torch.randn(4, *out.shape, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    expected = torch.stack([torch.autograd.grad(shortcut(xr), xr, v)[0] for v in u])
    torch.testing.assert_close(op(u), expected, rtol=1e-12, atol=0)
    ws = engine._Workspace(4, x.numel(), x)
    ws.cur.fill_(float("nan"))
    into = ws.view(ws.cur, 4, x.shape)
    op.into(u, into)
    torch.testing.assert_close(into, expected, rtol=1e-12, atol=0)


def test_sync_batchnorm_takes_the_fast_path():
    """A model converted for DDP (trainer.sync_batchnorm) is, in eval mode, the same model."""
    torch.manual_seed(11)
    model = randomize(cifar_resnet(14, width=4).double(), 11)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 5, 9])
    paths = some_paths(len(model.blocks), 12, seed=11)
    counts: dict[str, int] = {}
    fast = no_fallback_warnings(lambda: P.path_gradient_norms(model, x, y, paths, chunk_size=5, fallbacks=counts))
    assert counts == {}
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


class RenamedConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: read like a Conv2d."""


class DoubledConv(nn.Conv2d):
    """A subclass with its own forward: must not be read as a Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def retrofit(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              bias=False, dtype=conv.weight.dtype)
    new.load_state_dict(conv.state_dict())
    return new


def test_fallbacks_warned_counted_and_exact():
    model, x, y = make("postact", seed=12)
    model.blocks[1].branch[2] = nn.GELU()
    model.blocks[2].branch[0] = retrofit(model.blocks[2].branch[0], DoubledConv)
    model.blocks[3].branch[3] = retrofit(model.blocks[3].branch[3], RenamedConv)
    model.blocks[4].post = nn.GELU()
    paths = some_paths(len(model.blocks), 12, seed=12)
    counts = {"GELU": 1}  # counts add up across calls
    with pytest.warns(UserWarning) as caught:
        fast = P.path_gradient_norms(model, x, y, paths, chunk_size=5, fallbacks=counts)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "path gradients: no fast VJP for DoubledConv in blocks.2.branch; using autograd (slower)",
        "path gradients: no fast VJP for GELU in blocks.1.branch, blocks.4.post; using autograd (slower)",
    ]
    assert counts == {"GELU": 3, "DoubledConv": 1}
    torch.testing.assert_close(fast, P.path_gradient_norms_naive(model, x, y, paths), rtol=1e-9, atol=0)


def test_fallbacks_name_a_broken_chain():
    """OddBlock: Hardtanh and Softplus layers, and a lambda shortcut (no layer at all)."""
    model, x, y = make("fallback")
    counts: dict[str, int] = {}
    with pytest.warns(UserWarning, match="no fast VJP for <lambda> in blocks.1.shortcut;"):
        P.path_input_gradients(model, x, y, some_paths(3, 2), fallbacks=counts)
    assert counts == {"Hardtanh": 3, "Softplus": 3, "<lambda>": 1}


def test_gradient_by_length_shards_sum_to_one_process():
    """Ranks measure disjoint batches; their sum is the one-process result, bit for bit."""
    model, x, y = make("fallback", seed=13)
    batches = [(x, y), (x[:2], y[:2]), (x.flip(0), y.flip(0))]
    whole = P.path_gradient_by_length(model, batches, [0, 2, 3], 7, seed=3)
    assert whole.fallbacks == {"Hardtanh": 9, "Softplus": 9, "<lambda>": 3}
    for world in (2, 3):
        shards = [P.path_gradient_by_length(model, batches, [0, 2, 3], 7, seed=3, rank=r, world=world)
                  for r in range(world)]
        measured = torch.stack([s.norms != 0 for s in shards])
        assert torch.equal(measured.sum(0), torch.ones_like(whole.norms, dtype=torch.long))
        assert torch.equal(sum(s.norms for s in shards), whole.norms)
        assert sum((Counter(s.fallbacks) for s in shards), Counter()) == whole.fallbacks
    other = P.path_gradient_by_length(model, batches, [0, 2, 3], 7, seed=4)
    assert not torch.equal(other.norms, whole.norms)
    with pytest.raises(ValueError, match="rank"):
        P.path_gradient_by_length(model, batches, [0], 2, seed=0, rank=2, world=2)

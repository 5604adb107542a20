"""Each fast path against its naive reference, side by side in one run, on the device at hand.

    python -m resens.bench --out runs/bench [--device cpu|cuda] [--quick]

Fast and naive runs alternate (``repeats`` rounds, best of each side kept), so the ratios hold
even on a busy machine. Prints a table and writes ``bench.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resens.analysis import paths as P
from resens.analysis import variants as V
from resens.analysis.modes import full_precision
from resens.data.cifar10 import MEAN as CIFAR_MEAN
from resens.data.cifar10 import STD as CIFAR_STD
from resens.data.gpu_augment import normalize, random_crop_flip
from resens.errors import ConfigError, cli_main
from resens.models import cifar_resnet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(fast: Callable[[], object], naive: Callable[[], object], device: torch.device, repeats: int):
    """Best time of each side over ``repeats`` alternating rounds, and the last results."""
    best = {"fast": float("inf"), "naive": float("inf")}
    out = {}
    for _ in range(repeats):
        for name, fn in (("fast", fast), ("naive", naive)):
            _sync(device)
            start = time.perf_counter()
            out[name] = fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["fast"], best["naive"], out["fast"], out["naive"]


def analysis_model(depth: int, device: torch.device) -> nn.Module:
    """A ResNet with non-trivial BatchNorm statistics (a fresh one is the identity in eval mode)."""
    torch.manual_seed(0)
    model = cifar_resnet(depth)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.to(device).eval()


def bench_single_deletion(device, depth, images, batch, repeats) -> dict:
    model = analysis_model(depth, device)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(max(1, images // batch))]
    data = [(x.to(device), y.to(device)) for x, y in data]
    n = len(model.blocks)
    vs = [V.intact(n)] + [V.deletion_variant(n, [i]) for i in range(n)]
    with full_precision():  # as the analyses run
        fast_s, naive_s, a, b = side_by_side(
            lambda: V.evaluate_variants(model, data, vs), lambda: V.evaluate_variants_naive(model, data, vs),
            device, repeats,
        )
    return {"fast_s": fast_s, "naive_s": naive_s, "equal": bool(torch.equal(a, b)),
            "variants": len(vs), "images": len(data) * batch, "blocks": n}


def bench_path_gradient(device, depth, batch, per_length, repeats) -> dict:
    model = analysis_model(depth, device)
    n = len(model.blocks)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    lengths = list(range(0, n + 1, max(1, n // 9)))
    paths = torch.cat([P.sample_paths(n, k, per_length, g) for k in lengths])
    with full_precision():  # as the analyses run
        fast_s, naive_s, a, b = side_by_side(
            lambda: P.path_gradient_norms(model, x, y, paths), lambda: P.path_gradient_norms_naive(model, x, y, paths),
            device, repeats,
        )
    per_path = fast_s / len(paths)
    return {"fast_s": fast_s, "naive_s": naive_s, "equal": bool(torch.allclose(a, b, rtol=1e-3, atol=1e-12)),
            "paths": len(paths), "batch": batch, "blocks": n,
            "paper_scale_fast_s": per_path * 1000 * n, "paper_scale_naive_s": naive_s / len(paths) * 1000 * n}


def bench_train_step(device, depth, batch, steps, repeats) -> dict:
    """A plain fp32 eager PyTorch loop against resens's fast configuration of the same step:
    channels_last everywhere, and on CUDA bf16 autocast with the model's forward and backward in
    CUDA graphs."""
    def make(fast: bool):
        torch.manual_seed(0)
        model = cifar_resnet(depth).to(device)
        fmt = torch.channels_last if fast else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        use_bf16 = fast and device.type == "cuda"

        # On CUDA the model's forward and backward run in CUDA graphs (torch.compile
        # "reduce-overhead"), as ResNetClassifier runs it with model.compile=reduce-overhead; the
        # optimizer step stays eager.
        run_model = torch.compile(model, mode="reduce-overhead") if fast and device.type == "cuda" else model

        def step():
            if run_model is not model:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's outputs may be reused
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(run_model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        for _ in range(3):  # warm-up (and compile)
            step()

        def run():
            for _ in range(steps):
                step()
        return run

    fast_s, naive_s, _, _ = side_by_side(make(True), make(False), device, repeats)
    return {"fast_s": fast_s, "naive_s": naive_s, "batch": batch, "steps": steps,
            "fast_img_s": batch * steps / fast_s, "naive_img_s": batch * steps / naive_s}


def bench_data(device, images, repeats) -> dict:
    """torchvision's PIL pipeline (pad, crop, flip, to tensor, normalize) against the same
    augmentation as tensor operations on the resident set."""
    from PIL import Image
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, generator=g)
    pil = [Image.fromarray(a.numpy()) for a in raw]
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    resident = raw.permute(0, 3, 1, 2).contiguous().to(device)

    def fast():
        return normalize(random_crop_flip(resident, 4).float() / 255, CIFAR_MEAN, CIFAR_STD)

    fast_s, naive_s, a, b = side_by_side(fast, lambda: torch.stack([tf(p) for p in pil]), device, repeats)
    return {"fast_s": fast_s, "naive_s": naive_s, "images": images, "equal": a.shape == b.shape,
            "fast_img_s": images / fast_s, "naive_img_s": images / naive_s}


SIZES = {
    # name: (cpu, cuda, quick)
    "single_deletion": ({"depth": 110, "images": 256, "batch": 128}, {"depth": 110, "images": 10000, "batch": 2000},
                        {"depth": 14, "images": 16, "batch": 8}),
    "path_gradient": ({"depth": 110, "batch": 128, "per_length": 4}, {"depth": 110, "batch": 128, "per_length": 20},
                      {"depth": 14, "batch": 4, "per_length": 1}),
    "train_step": ({"depth": 110, "batch": 128, "steps": 2}, {"depth": 110, "batch": 128, "steps": 50},
                   {"depth": 8, "batch": 8, "steps": 1}),
    "data": ({"images": 5000}, {"images": 50000}, {"images": 64}),
}
BENCHES = {"single_deletion": bench_single_deletion, "path_gradient": bench_path_gradient,
           "train_step": bench_train_step, "data": bench_data}


def run(out: Path, device: str | None = None, quick: bool = False, repeats: int | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    which = 2 if quick else (1 if dev.type == "cuda" else 0)
    repeats = repeats or (1 if quick else 2)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, fn in BENCHES.items():
        r = fn(dev, repeats=repeats, **SIZES[name][which])
        r["speedup"] = r["naive_s"] / r["fast_s"]
        r["device"] = dev.type
        results[name] = r
        print(f"{name:16s} fast {r['fast_s']:9.3f} s   naive {r['naive_s']:9.3f} s   "
              f"×{r['speedup']:6.2f}   {'same results' if r.get('equal', True) else 'RESULTS DIFFER'}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    print(f"written {out / 'bench.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    def bench() -> None:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available")
        run(Path(args.out), args.device, args.quick, args.repeats)

    return cli_main(bench)


if __name__ == "__main__":
    sys.exit(main())

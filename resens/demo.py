"""The embedded demo: train a digits ResNet and a digits plain network on the CPU, analyse both,
and print the paper's findings side by side. No downloads, no account (W&B offline).

    python -m resens.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from resens import config as config_lib
from resens.analysis import plots, summary
from resens.errors import cli_main
from resens.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def summarize(results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers of each run (errors in %)."""
    lines = []
    labels = list(results)
    lines.append(f"{'':44s}" + "".join(f"{label:>14s}" for label in labels))

    def row(title: str, values: list[str]) -> None:
        lines.append(f"{title:44s}" + "".join(f"{v:>14s}" for v in values))

    def pct(x: float | None) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"

    row("test error, intact (%)", [pct(r.get("baseline_error")) for r in results.values()])
    row("delete 1 block: mean error (%)", [pct(summary.single_deletion_mean_error(r)) for r in results.values()])
    row("delete 1 block: worst error (%)", [pct(summary.single_deletion_max_error(r)) for r in results.values()])
    by_k = {label: summary.multi_deletion_mean_error(r) for label, r in results.items()}
    for k in sorted({k for m in by_k.values() for k in m} & {1, 2, 5, 10, 15, 20}):
        row(f"delete {k} random blocks: mean error (%)", [pct(m.get(k)) for m in by_k.values()])
    by_dup = {label: summary.duplication_mean_error(r) for label, r in results.items()}
    for k in sorted({k for m in by_dup.values() for k in m} & {1, 2, 5, 10}):
        row(f"duplicate {k} random blocks: mean error (%)", [pct(m.get(k)) for m in by_dup.values()])
    by_swaps = {label: summary.reorder_mean_error(r) for label, r in results.items()}
    for s in sorted({s for m in by_swaps.values() for s in m} & {1, 5, 10}):
        row(f"{s} random swaps: mean error (%)", [pct(m.get(s)) for m in by_swaps.values()])
    for label, r in results.items():
        protocol = (r.get("protocol") or {}).get("description", "-")
        compared = sorted({o["compared_with"] for o in (r.get("overlays") or {}).values() if o["compared_with"]})
        lines.append(
            f"{label}: lesions follow the {protocol}; compared with the paper: "
            + ("; ".join(compared) if compared else "nothing (the authors measured pre-act ResNet-110 on "
               "CIFAR-10 and ResNet-200 on ImageNet, not this network and data)")
        )
    for label, r in results.items():
        ends = summary.gradient_ends(r)
        if ends is not None:
            first, last = ends
            lines.append(
                f"{label}: gradient norm {first['mean_norm']:.3g} at path length {first['length']} → "
                f"{last['mean_norm']:.3g} at {last['length']} (×{summary.gradient_decay_per_block(r):.2f} per block)"
            )
        lo_hi = summary.effective_range(r)
        if lo_hi is not None:
            share_of_gradient, share_of_paths = summary.effective_shares(r)
            lines.append(
                f"{label}: effective paths are {lo_hi[0]}–{lo_hi[1]} blocks long: {100 * share_of_gradient:.0f}% "
                f"of the gradient from {100 * share_of_paths:.3g}% of the paths"
            )
    return "\n".join(lines)


def run_demo(out: Path, overrides: list[str] = ()) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for label, name in (("ResNet", "digits_resnet.yaml"), ("plain", "digits_plain.yaml")):
        cfg = config_lib.load(CONFIGS / name, [f"out_dir={out}", *overrides])
        print(f"== training the digits {label} ({cfg.model.depth} layers) ==", flush=True)
        run_dir = train(cfg)
        results[label] = json.loads((run_dir / "analysis.json").read_text())
        results[label]["run_dir"] = str(run_dir)
    fig = plots.single_deletion({k: v for k, v in results.items() if "single_deletion" in v})
    fig.savefig(out / "single_deletion_resnet_vs_plain.png", dpi=150, bbox_inches="tight")
    summary = summarize(results)
    (out / "summary.txt").write_text(summary + "\n")
    print("\n" + summary)
    print(f"\nruns, checkpoints, analysis.json, figures and W&B offline runs under {out}/")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return cli_main(lambda: run_demo(out, args.overrides))


if __name__ == "__main__":
    sys.exit(main())

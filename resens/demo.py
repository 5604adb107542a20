"""The embedded demo: train a digits ResNet and a digits plain network on the CPU, analyse both,
and print the paper's findings side by side. No downloads, no account (W&B offline).

    python -m resens.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from resens import config as config_lib
from resens.analysis import plots
from resens.errors import cli_main
from resens.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _mean_by(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r["error"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def summarize(results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers of each run (errors in %)."""
    lines = []
    labels = list(results)
    lines.append(f"{'':44s}" + "".join(f"{label:>14s}" for label in labels))

    def row(title: str, values: list[str]) -> None:
        lines.append(f"{title:44s}" + "".join(f"{v:>14s}" for v in values))

    def pct(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    row("test error, intact (%)", [pct(r.get("baseline_error")) for r in results.values()])
    single = {}
    for label, r in results.items():
        ordinary = [x["error"] for x in r.get("single_deletion", []) if not x["downsampling"]]
        single[label] = ordinary
    row("delete 1 block: mean error (%)", [pct(sum(v) / len(v)) if v else "-" for v in single.values()])
    row("delete 1 block: worst error (%)", [pct(max(v)) if v else "-" for v in single.values()])
    ks = sorted({x["k"] for r in results.values() for x in r.get("multi_deletion", [])})
    for k in [k for k in ks if k in (1, 2, 5, 10, 15, 20)]:
        row(f"delete {k} random blocks: mean error (%)",
            [pct(_mean_by(r.get("multi_deletion", []), "k").get(k)) for r in results.values()])
    swaps = sorted({x["swaps"] for r in results.values() for x in r.get("reorder", [])})
    for s in [s for s in swaps if s in (1, 5, 10)]:
        row(f"{s} random swaps: mean error (%)",
            [pct(_mean_by(r.get("reorder", []), "swaps").get(s)) for r in results.values()])
    for label, r in results.items():
        grad = [g for g in r.get("path_gradient", []) if g["samples"] > 0 and g["mean_norm"] > 0]
        if len(grad) >= 2:
            first, last = grad[0], grad[-1]
            rate = (math.log(first["mean_norm"]) - math.log(last["mean_norm"])) / (last["length"] - first["length"])
            lines.append(
                f"{label}: gradient norm {first['mean_norm']:.3g} at path length {first['length']} → "
                f"{last['mean_norm']:.3g} at {last['length']} (×{math.exp(-rate):.2f} per block)"
            )
        eff = r.get("effective_paths")
        if eff:
            lo, hi = eff["lengths"]
            lines.append(
                f"{label}: effective paths are {lo}–{hi} blocks long: {100 * eff['share_of_gradient']:.0f}% "
                f"of the gradient from {100 * eff['share_of_paths']:.3g}% of the paths"
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

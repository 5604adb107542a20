"""Render a SLURM launch template (``configs/slurm/*.sbatch``) and submit it with ``sbatch``.

    python -m resens.slurm configs/slurm/cifar10_resnet110.sbatch --nodes 2 --gpus 4 [--dry-run] \\
        [--config configs/x.yaml] [--time 1-00:00:00] [--partition P] [--account A] \\
        [-- key=value ...]

The config and the overrides are validated here, before anything is queued: a mistyped key or a
global batch that does not split over nodes × GPUs fails now, not when the job starts.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from resens import config as config_lib
from resens.errors import ConfigError, ResensError, cli_main
from resens.runs import slug

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """Fill every ``{{name}}`` in ``template``; an unknown name is an error, not left in place."""

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise ConfigError(
                f"template placeholder {match[0]} is unknown (known: {', '.join(values)})"
            )
        return values[match[1]]

    return PLACEHOLDER.sub(fill, template)


def set_directive(script: str, option: str, value: str) -> str:
    """Replace the script's ``#SBATCH --option=...`` line, or add one after the last directive."""
    line = f"#SBATCH --{option}={value}"
    pattern = re.compile(rf"^#SBATCH --{re.escape(option)}=.*$", re.MULTILINE)
    if pattern.search(script):
        return pattern.sub(line, script)
    lines = script.splitlines(keepends=True)
    last = max(i for i, text in enumerate(lines) if text.startswith("#SBATCH"))
    lines.insert(last + 1, line + "\n")
    return "".join(lines)


def build_script(
    template: str | Path,
    nodes: int,
    gpus: int,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    sbatch_options: dict[str, str | None] | None = None,
) -> tuple[str, Path]:
    """``(the rendered batch script, its log folder)``. ``config`` defaults to
    ``configs/<template name>.yaml``; ``sbatch_options`` (time, partition, ...) replace the
    template's directives."""
    template = Path(template)
    if not template.is_file():
        raise ConfigError(f"SLURM template not found: {template}")
    if nodes < 1 or gpus < 1:
        raise ConfigError(f"--nodes and --gpus must be at least 1 (got {nodes} and {gpus})")
    config = config or f"configs/{template.stem}.yaml"
    # The same precedence as in the script: the launch settings, then the user's overrides.
    launch = [f"trainer.num_nodes={nodes}", f"trainer.devices={gpus}", "trainer.strategy=ddp"]
    cfg = config_lib.load(config, [*launch, *overrides])
    config_lib.per_device_batch(cfg.data.batch_size, nodes * gpus)
    log_dir = (Path(cfg.out_dir) / "slurm").resolve()
    script = render(
        template.read_text(),
        {
            "job_name": slug(cfg.name),
            "nodes": str(nodes),
            "gpus": str(gpus),
            "log_dir": str(log_dir),
            "workdir": shlex.quote(str(Path.cwd())),
            "python": shlex.quote(sys.executable),
            "config": shlex.quote(config),
            "overrides": " ".join(shlex.quote(o) for o in overrides),
        },
    )
    for option, value in (sbatch_options or {}).items():
        if value is not None:
            script = set_directive(script, option, value)
    return script, log_dir


def submit(script: str, log_dir: Path) -> str:
    """Queue ``script`` (given to sbatch on stdin); returns sbatch's answer."""
    if shutil.which("sbatch") is None:
        raise ResensError(
            "sbatch not found on PATH: submit from a SLURM login node, or use --dry-run"
        )
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    try:
        done = subprocess.run(["sbatch"], input=script, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise ResensError("sbatch did not answer within 120 s") from None
    if done.returncode:
        first = (done.stderr.strip() or f"exit code {done.returncode}").splitlines()[0]
        raise ResensError(f"sbatch failed: {first}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resens-slurm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "template", help="a launch template, e.g. configs/slurm/cifar10_resnet110.sbatch"
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node (one task each)")
    parser.add_argument("--config", help="experiment YAML (default: configs/<template name>.yaml)")
    parser.add_argument("--time", help="wall-clock limit, replaces the template's --time")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the script instead of submitting it"
    )
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is for resens.train, even what looks like an option here.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    overrides = argv[split + 1 :]

    def launch() -> None:
        script, log_dir = build_script(
            args.template,
            args.nodes,
            args.gpus,
            args.config,
            overrides,
            {"time": args.time, "partition": args.partition, "account": args.account},
        )
        if args.dry_run:
            print(script, end="")
        else:
            print(f"{submit(script, log_dir)} (log: {log_dir}/)")

    return cli_main(launch)


if __name__ == "__main__":
    sys.exit(main())

"""Render a SLURM launch template (``configs/slurm/*.sbatch``) and submit it with ``sbatch``.

    python -m resens.slurm configs/slurm/cifar10_resnet110.sbatch --nodes 2 --gpus 4 [--dry-run] \\
        [--config configs/x.yaml] [--tasks-per-node N] [--cpus-per-task N] [--mem 64G | --mem-per-cpu 4G] \\
        [--time 1-00:00:00] [--partition P] [--account A] [--qos Q] [--constraint C] \\
        [--sbatch="--exclusive --mail-type=END"] [-- key=value ...]

``--gpus 0`` renders a CPU job: no ``--gres``, ``trainer.accelerator=cpu``, ``--tasks-per-node``
tasks per node (default 1). Every option replaces the template's ``#SBATCH`` line (or adds one);
what is not given keeps the template's value; an ``--sbatch`` option the template already has
(``--signal=B:USR1@300``) replaces its line. The config, the overrides, the batch split and every
path the run needs (config, data folder, resume checkpoint) are checked here, before anything is
queued; a submission that fails leaves nothing behind.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from resens import config as config_lib
from resens.data import build_datamodule
from resens.errors import ConfigError, ResensError, cli_main
from resens.runs import slug

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class Resources:
    """What a job asks SLURM for. ``gpus`` per node, 0 for a CPU job; ``tasks_per_node``
    defaults to ``gpus`` (one task per GPU), or 1 in a CPU job. ``None`` keeps the template's
    line; ``extra`` are more ``#SBATCH`` options, e.g. ``["--exclusive", "--signal=B:USR1@300"]``
    (an ``--option=value`` the template has replaces its line)."""

    nodes: int = 1
    gpus: int = 1
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    mem_per_cpu: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus or 1

    def check(self) -> None:
        if self.nodes < 1 or self.gpus < 0 or self.tasks < 1:
            raise ConfigError(
                f"--nodes and --tasks-per-node must be at least 1 and --gpus at least 0 "
                f"(got {self.nodes}, {self.tasks} and {self.gpus})"
            )
        if self.gpus and self.tasks != self.gpus:
            raise ConfigError(
                f"--tasks-per-node={self.tasks} with --gpus={self.gpus}: DDP runs one task per GPU"
            )
        if self.mem and self.mem_per_cpu:
            raise ConfigError("--mem and --mem-per-cpu exclude each other (SLURM takes one)")
        for value in (self.time, self.partition, self.account, self.qos, self.constraint, self.mem,
                      self.mem_per_cpu, *self.extra):
            if value is not None and (not str(value).strip() or "\n" in str(value)):
                raise ConfigError(f"SLURM option {value!r} is empty or spans lines")
        for option in self.extra:
            if not option.startswith("-"):
                raise ConfigError(f"--sbatch: '{option}' is not an sbatch option (e.g. --exclusive)")

    def directives(self) -> dict[str, str | None]:
        """``#SBATCH`` option -> value for the options given (a None value: drop the line)."""
        found = {
            "cpus-per-task": self.cpus_per_task, "mem": self.mem, "mem-per-cpu": self.mem_per_cpu,
            "time": self.time, "partition": self.partition, "account": self.account,
            "qos": self.qos, "constraint": self.constraint,
        }
        given: dict[str, str | None] = {k: str(v) for k, v in found.items() if v is not None}
        if self.mem:
            given["mem-per-cpu"] = None
        if self.mem_per_cpu:
            given["mem"] = None
        if not self.gpus:
            given["gres"] = None
        return given


def render(template: str, values: dict[str, str]) -> str:
    """Fill every ``{{name}}`` in ``template``; an unknown name is an error, not left in place."""

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise ConfigError(
                f"template placeholder {match[0]} is unknown (known: {', '.join(values)})"
            )
        return values[match[1]]

    return PLACEHOLDER.sub(fill, template)


def set_directive(script: str, option: str, value: str | None) -> str:
    """Replace the script's ``#SBATCH --option=...`` line, or add one after the last directive;
    ``value=None`` removes the line."""
    pattern = re.compile(rf"^#SBATCH --{re.escape(option)}=.*\n?", re.MULTILINE)
    if value is None:
        return pattern.sub("", script)
    line = f"#SBATCH --{option}={value}\n"
    if pattern.search(script):
        return pattern.sub(line, script)
    return add_directive(script, f"--{option}={value}")


def add_directive(script: str, directive: str) -> str:
    """``#SBATCH <directive>`` added after the script's last directive."""
    lines = script.splitlines(keepends=True)
    last = max(i for i, text in enumerate(lines) if text.startswith("#SBATCH"))
    lines.insert(last + 1, f"#SBATCH {directive}\n")
    return "".join(lines)


def build_script(
    template: str | Path,
    resources: Resources,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[str, Path]:
    """``(the rendered batch script, its log folder)``. ``config`` defaults to
    ``configs/<template name>.yaml``. Loading the config checks its keys, values and paths."""
    template = Path(template)
    if not template.is_file():
        raise ConfigError(f"SLURM template not found: {template}")
    resources.check()
    config = config or f"configs/{template.stem}.yaml"
    accelerator = "gpu" if resources.gpus else "cpu"
    # The same precedence as in the script: the launch settings, then the user's overrides.
    launch = [
        f"trainer.num_nodes={resources.nodes}", f"trainer.devices={resources.tasks}",
        "trainer.strategy=ddp", f"trainer.accelerator={accelerator}",
    ]
    cfg = config_lib.load(config, [*launch, *overrides])  # checks the paths it names, too
    batch = config_lib.per_device_batch(cfg.data.batch_size, resources.nodes * resources.tasks)
    build_datamodule(cfg.data, batch)  # what it checks without reading images (ImageNet: train/)
    log_dir = (Path(cfg.out_dir) / "slurm").resolve()
    script = render(
        template.read_text(),
        {
            "job_name": slug(cfg.name),
            "nodes": str(resources.nodes),
            "gpus": str(resources.gpus),
            "tasks_per_node": str(resources.tasks),
            "accelerator": accelerator,
            "log_dir": str(log_dir),
            "log_dir_quoted": shlex.quote(str(log_dir)),
            "workdir": shlex.quote(str(Path.cwd())),
            "python": shlex.quote(sys.executable),
            "config": shlex.quote(config),
            "overrides": " ".join(shlex.quote(o) for o in overrides),
        },
    )
    for option, value in resources.directives().items():
        script = set_directive(script, option, value)
    for option in resources.extra:
        name, eq, value = option.lstrip("-").partition("=")
        if eq and option.startswith("--"):  # --signal=B:USR1@120 replaces the template's line
            script = set_directive(script, name, value)
        else:
            script = add_directive(script, option)
    return script, log_dir


def submit(script: str, log_dir: Path) -> str:
    """Queue ``script`` (given to sbatch on stdin); returns sbatch's answer. The log folder is
    created first (SLURM does not create it) and removed again if the submission fails."""
    if shutil.which("sbatch") is None:
        raise ResensError(
            "sbatch not found on PATH: submit from a SLURM login node, or use --dry-run"
        )
    created = [p for p in (log_dir, *log_dir.parents) if not p.exists()]
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["sbatch"], input=script, capture_output=True, text=True, timeout=120)
        if done.returncode:
            first = (done.stderr.strip() or f"exit code {done.returncode}").splitlines()[0]
            raise ResensError(f"sbatch failed: {first}")
    except BaseException as err:
        for folder in created:  # innermost first
            folder.rmdir()
        if isinstance(err, subprocess.TimeoutExpired):
            raise ResensError("sbatch did not answer within 120 s") from None
        raise
    return done.stdout.strip()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options before ``--`` and the overrides after it."""
    parser = argparse.ArgumentParser(prog="resens-slurm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "template", help="a launch template, e.g. configs/slurm/cifar10_resnet110.sbatch"
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus", type=int, required=True,
                        help="GPUs per node, one task each; 0: a CPU job")
    parser.add_argument("--tasks-per-node", type=int, help="tasks per node (CPU jobs; default 1)")
    parser.add_argument("--config", help="experiment YAML (default: configs/<template name>.yaml)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--mem", help="memory per node, e.g. 64G")
    memory.add_argument("--mem-per-cpu", help="memory per CPU, e.g. 4G")
    parser.add_argument("--time", help="wall-clock limit, e.g. 1-00:00:00")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--constraint", help="node features, e.g. a100")
    parser.add_argument("--sbatch", action="append", default=[],
                        help='more #SBATCH options, e.g. --sbatch="--exclusive --mail-type=END"')
    parser.add_argument(
        "--dry-run", action="store_true", help="print the script instead of submitting it"
    )
    # Everything after "--" is for resens.train, even what looks like an option here.
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def launch() -> None:
        resources = Resources(
            nodes=args.nodes, gpus=args.gpus, tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task, mem=args.mem, mem_per_cpu=args.mem_per_cpu,
            time=args.time, partition=args.partition, account=args.account, qos=args.qos,
            constraint=args.constraint, extra=[o for s in args.sbatch for o in shlex.split(s)],
        )
        script, log_dir = build_script(args.template, resources, args.config, overrides)
        if args.dry_run:
            print(script, end="")
        else:
            print(f"{submit(script, log_dir)} (log: {log_dir}/)")

    return cli_main(launch)


if __name__ == "__main__":
    sys.exit(main())

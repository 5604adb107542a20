"""Read the records of a W&B offline run file (``run-<id>.wandb``) without a server.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of chunks, each with a 7-byte header (crc32c, length, type) and a piece of a protobuf Record.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, records, parts = 7, [], []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def run_files(root: str | Path) -> list[Path]:
    """Every offline run file of the W&B folder ``<root>/wandb``, oldest first."""
    return sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb"))


def _run_config(path: Path) -> dict:
    for r in read_records(path):
        if r.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in r.run.config.update}
    return {}


def run_file(run_dir: str | Path) -> Path:
    """The newest offline run file whose config's ``run.dir`` is ``run_dir``, from the W&B
    folder of its output root (the folder above ``run_dir``, or the one above that for a lesion
    run inside a training run's folder)."""
    run_dir = Path(run_dir)
    for root in (run_dir.parent, run_dir.parent.parent, run_dir):
        files = [f for f in run_files(root) if _run_config(f).get("run", {}).get("dir") == str(run_dir)]
        if files:
            return files[-1]
    raise AssertionError(f"no W&B offline run of {run_dir}")


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def finished_records(path: str | Path, timeout: float = 30.0) -> list[pb.Record]:
    """The records of a run file once W&B's writer has closed it (its last record is ``exit``):
    the writer is another process, which may still be flushing when ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit" or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def summarize_run(path: str | Path) -> dict:
    """``{"run_id", "name", "group", "job_type", "tags", "config": {...}, "history_keys": set,
    "history": [{key: value} per step], "summary": {...}, "metrics": {name: {"step", "summary"}},
    "artifacts": [{"name", "type", "aliases", "metadata", "files"}], "used_artifacts": [...]}``."""
    out = {"history_keys": set(), "history": [], "summary": {}, "config": {}, "metrics": {},
           "artifacts": [], "used_artifacts": []}
    for r in finished_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=r.run.run_id, name=r.run.display_name, group=r.run.run_group,
                       job_type=r.run.job_type, tags=list(r.run.tags))
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":  # later updates, e.g. W&B's own under nested keys "_wandb/..."
            for item in r.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            step = {_key(item): json.loads(item.value_json) for item in r.history.item}
            out["history"].append(step)
            out["history_keys"] |= step.keys()
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            m = r.metric
            aggregations = [f.name for f, on in m.summary.ListFields() if on]
            out["metrics"][m.name or m.glob_name] = {"step": m.step_metric, "summary": aggregations}
        elif kind == "artifact":
            a = r.artifact
            out["artifacts"].append({
                "name": a.name, "type": a.type, "aliases": list(a.aliases),
                "metadata": json.loads(a.metadata or "{}"), "files": [c.path for c in a.manifest.contents],
            })
        elif kind == "use_artifact":
            out["used_artifacts"].append(r.use_artifact.name)
    return out


DOCS = Path(__file__).parent.parent / "docs" / "wandb.md"


def check_headline_summary(run_dir: str | Path) -> set[str]:
    """Assert that the W&B summary of the run in ``run_dir`` holds every headline number of its
    ``analysis.json`` (``resens.analysis.summary.headline``) under ``analysis/``, and that each
    of its headline keys is documented in docs/wandb.md; returns the keys checked."""
    from resens.analysis import summary

    run_dir = Path(run_dir)
    run = summarize_run(run_file(run_dir))
    data = json.loads((run_dir / "analysis.json").read_text())
    expected = {f"analysis/{k}": v for k, v in summary.headline(data).items()}
    for key, value in expected.items():
        assert abs(run["summary"][key] - value) < 1e-9, key
    training = {k for k in run["summary"] if k.endswith(("/best_error", "/best_epoch", "/final_error"))}
    documented = DOCS.read_text()
    for key in [*expected, *training]:
        generic = re.sub(r"_k\d+$", "_k{k}", re.sub(r"_swaps\d+$", "_swaps{s}", key))
        assert f"`{generic}`" in documented, f"{key} is not documented in {DOCS.name}"
    return {*expected, *training}

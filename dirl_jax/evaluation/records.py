"""Per-sample evaluation records: one JSON object per (benchmark, question, sample) in JSONL files,
appended as they are graded, so a restarted evaluation skips the finished ones."""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterable

from dirl_jax.metrics import write_json_atomic

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "settings.json"


def record_key(record: dict[str, Any]) -> tuple[str, str, int]:
    return record["benchmark"], str(record["question_id"]), int(record["sample"])


def shard_path(output_dir: str, process_index: int, process_count: int) -> str:
    """``records.jsonl`` on one host; ``records.<i>.jsonl`` per host of a multi-host run."""
    if process_count == 1:
        return os.path.join(output_dir, RECORDS_FILE)
    return os.path.join(output_dir, f"records.{process_index}.jsonl")


def read_records(output_dir: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every finished record of ``output_dir`` (all host shards, de-duplicated). A torn last line
    (a run killed mid-write) is skipped with a warning; a malformed line elsewhere is an error."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "records*.jsonl"))):
        with open(path) as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(lines):  # no trailing newline: the write was interrupted
                    log.warning("%s: skipping the unfinished last line %d", path, number)
                    continue
                raise ValueError(f"{path}:{number}: not a JSON record ({e})") from e
            records[record_key(record)] = record
    return records


class RecordWriter:
    """Appends records to this host's shard, one flushed line each; an unfinished last line
    left by a killed run is cut off first, so every line stays a whole record."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):
                with open(path, "wb") as f:
                    f.write(data[:data.rfind(b"\n") + 1])
        self._file = open(path, "a")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def merge_shards(output_dir: str) -> None:
    """Folds multi-host shards into ``records.jsonl`` (temp file, then rename; shards removed)."""
    shards = [p for p in glob.glob(os.path.join(output_dir, "records.*.jsonl"))]
    if not shards:
        return
    records = read_records(output_dir)
    path = os.path.join(output_dir, RECORDS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for key in sorted(records):
            f.write(json.dumps(records[key]) + "\n")
    os.replace(tmp, path)
    for shard in shards:
        os.remove(shard)


def check_settings(output_dir: str, settings: dict[str, Any]) -> None:
    """Records of one output directory must come from one model and one decoding setup: the
    first run writes ``settings.json``; a later run with different settings is refused."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{output_dir} holds records of other settings ({details}); use a new "
                             "output_dir or delete it")
        return
    write_json_atomic(path, settings)

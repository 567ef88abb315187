"""Reading dataset records: a ``.jsonl`` / ``.json`` / ``.parquet`` file or a HF datasets name,
with errors that name the file and line."""

from __future__ import annotations

import json
import os
from typing import Any


class DataError(ValueError):
    """A dataset file or record is malformed."""


def _decode(raw: bytes, source: str, first_line: int = 1) -> str:
    """``raw`` as UTF-8, or a DataError naming the file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[:e.start].count(b"\n")
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{source}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {column}); "
                        "expected UTF-8 JSON") from None


def _json_lines(source: str) -> list[Any]:
    records = []
    with open(source, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            line = _decode(raw, source, line_number)
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{source}:{line_number}: malformed JSON line ({e.msg})") from e
    return records


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a ``.jsonl`` / ``.json`` / ``.parquet`` file or a HF datasets name/path
    (``split`` of the latter; ``""``: its ``test`` split, else its only one)."""
    if source.endswith((".jsonl", ".json")):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: dataset file not found")
        if source.endswith(".json"):
            with open(source, "rb") as f:
                text = _decode(f.read(), source)
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # several JSON values: JSON lines (DiRL's loader takes both)
                    raise DataError(f"{source}: malformed JSON ({e})") from e
                return _json_lines(source)
            if not isinstance(records, list):
                raise DataError(f"{source}: expected a JSON list of records (or JSON lines)")
            return records
        return _json_lines(source)
    if source.endswith(".parquet") and not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: dataset file not found")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading {source!r} needs the `datasets` package (pip install datasets)") from e
    if source.endswith(".parquet"):
        return list(datasets.load_dataset("parquet", data_files=source, split="train"))
    return list(datasets.load_dataset(source, split=split or default_split(source)))


def default_split(source: str) -> str:
    """The split a benchmark is scored on when none is named: ``test`` if the dataset has one,
    else its only split; a DataError naming the splits otherwise."""
    import datasets
    names = datasets.get_dataset_split_names(source)
    if "test" in names or len(names) == 1:
        return "test" if "test" in names else names[0]
    raise DataError(f"{source}: splits {', '.join(names)} and none is 'test'; name one "
                    "(the evaluation's source_split)")

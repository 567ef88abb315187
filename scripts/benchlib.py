"""What the benchmark scripts share: the machine description and the JSON records file."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax


def machine() -> dict[str, str]:
    """``device`` (backend, device kind, host cores) and ``host`` for every record."""
    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind} ({os.cpu_count()} host cores)"
    return {"device": device, "host": platform.node()}


def write_records(path: str | None, records: list[dict[str, Any]]) -> None:
    """Writes ``records`` as JSON to ``path`` (temp file, then rename); nothing when ``path`` is None."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")

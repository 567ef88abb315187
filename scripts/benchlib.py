"""What the benchmark scripts share: the machine description and the JSON records file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

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


def alternate(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Runs every side ``repeats`` times, alternating (A B C A B C ...), after the caller's
    warm-up. Per side: every run's ``seconds``, their ``min`` and ``median``, the last run's
    ``output`` and the 1-minute load average before the first and after the last run
    (``busy``: it exceeded the core count at either end, so the record is not a quiet one)."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            outputs[name] = run()
            runs[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    busy = max(load_before, load_after) > (os.cpu_count() or 1)
    return {name: {"seconds": times, "min": min(times), "median": statistics.median(times),
                   "output": outputs[name], "load_before": load_before, "load_after": load_after,
                   "busy": busy} for name, times in runs.items()}

"""What the benchmark scripts share: the machine description, alternating timing, the matmul
peak each side is held against, and the JSON records file."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BUSY_CORES = 0.25  # other processes' average CPU use (cores) that marks a timing as contended


def machine() -> dict[str, str]:
    """``device`` (backend, device kind, host cores), ``host`` and ``xla_flags`` for every record."""
    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind} ({os.cpu_count()} host cores)"
    return {"device": device, "host": platform.node(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_records(path: str | None, records: list[dict[str, Any]]) -> None:
    """Writes ``records`` as JSON to ``path`` (temp file, then rename); nothing when ``path`` is None."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds so far of the whole machine (``/proc/stat``; NaN elsewhere) and of this
    process (all its threads)."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan"), own
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), own


def alternate(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Runs every side ``repeats`` times, alternating (A B C A B C ...), after the caller's
    warm-up. Per side: every run's ``seconds``, their ``min`` and ``median``, the last run's
    ``output``, the 1-minute load average before the first and after the last run, and
    ``other_cores``: the cores other processes kept busy on average meanwhile. The load average
    counts this benchmark's own threads (about the core count while it runs), so it cannot tell
    a quiet machine from a shared one; ``busy`` is set when other processes took more than
    ``BUSY_CORES`` cores (or, without ``/proc/stat``, when the load exceeded the core count)."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    machine_before, own_before = cpu_seconds()
    start = time.perf_counter()
    for _ in range(repeats):
        for name, run in sides.items():
            begin = time.perf_counter()
            outputs[name] = run()
            runs[name].append(time.perf_counter() - begin)
    wall = max(time.perf_counter() - start, 1e-9)
    machine_after, own_after = cpu_seconds()
    load_after = os.getloadavg()[0]
    other = ((machine_after - machine_before) - (own_after - own_before)) / wall
    if math.isnan(other):
        busy = max(load_before, load_after) > (os.cpu_count() or 1)
    else:
        other = max(other, 0.0)
        busy = other > BUSY_CORES
    return {name: {"seconds": times, "min": min(times), "median": statistics.median(times),
                   "output": outputs[name], "load_before": load_before, "load_after": load_after,
                   "other_cores": other, "busy": busy} for name, times in runs.items()}


def timing_fields(timed: dict[str, Any]) -> dict[str, Any]:
    """The JSON fields of one side's :func:`alternate` result: best, median and every run's
    seconds, the load average around the runs, other processes' cores and ``busy``."""
    return {"seconds": timed["min"], "median_seconds": timed["median"], "all_seconds": timed["seconds"],
            **{k: timed[k] for k in ("load_before", "load_after", "other_cores", "busy")}}


def weight_shapes(config: Any) -> list[tuple[int, int]]:
    """``(in, out)`` of every weight matrix one token meets in a forward of an SDAR ``config``:
    q, k, v, o, gate, up, down per layer and the vocabulary head."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
             (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
             (c.intermediate_size, c.hidden_size)]
    return layer * c.num_hidden_layers + [(c.hidden_size, c.vocab_size)]


def matmul_seconds(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of ``tokens`` rows times every matrix of ``shapes``, fp32:
    ``xla`` as one jitted program, ``torch`` as a loop of ``torch.matmul`` (sides alternating)."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
    rows = {d: jnp.asarray(rng.standard_normal((tokens, d), np.float32)) for d in {s[0] for s in shapes}}
    t_weights = [torch.from_numpy(np.array(w)) for w in weights]
    t_rows = {d: torch.from_numpy(np.array(x)) for d, x in rows.items()}

    @jax.jit
    def products(rows, weights):
        return [rows[w.shape[0]] @ w for w in weights]

    def xla() -> None:
        jax.block_until_ready(products(rows, weights))

    def torch_side() -> None:
        with torch.no_grad():
            for w in t_weights:
                torch.matmul(t_rows[w.shape[0]], w)

    xla(), torch_side()  # compile, warm-up
    timed = alternate({"xla": xla, "torch": torch_side}, repeats)
    return {side: t["min"] for side, t in timed.items()}


def matmul_peak(config: Any, tokens: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s each side reaches on the weight products of ``tokens`` tokens of ``config``
    (:func:`weight_shapes`): the rate its own step is held against."""
    shapes = weight_shapes(config)
    flops = 2 * tokens * sum(a * b for a, b in shapes)
    return {side: flops / s / 1e9 for side, s in matmul_seconds(shapes, tokens, repeats).items()}

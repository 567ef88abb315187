"""Where the SFT step's time goes: a ``jax.profiler`` trace of the trainer's compiled step, every
executed HLO op attributed to the model's named scopes, against the FLOPs each part needs.

    python scripts/profile_train_step.py [--config 100m] [--length N] [--impl auto]
        [--steps 3] [--trace-dir DIR] [--json out.json]

The step is :func:`bench_train_step.jax_step` (the trainer's own step on the benchmark's batch).
Each traced op's self time (its duration less the ops nested in it on the same thread) is summed
per part, where the part is the innermost named scope in the op's HLO ``op_name`` (``mlp``,
``qkv_proj``, ``attention_kernel``, ``vocab_scores``, ``optimizer``, ...) and the pass is
``bwd`` when the op belongs to a transposed (backward) computation. Times are CPU-thread seconds
per step (XLA runs ops on several threads at once, so they can add up to more than the wall
time, which is printed too). FLOPs are the model's: matmuls per part (forward 2 x, backward
4 x tokens x in x out), the attention's non-empty tiles, the vocabulary at the masked tokens only.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time
from typing import Any, Callable

import benchlib
import jax
import numpy as np
from bench_attention import nonempty_fraction
from bench_train_step import CONFIGS, jax_step, make_batch, model_config
from flax import nnx

from dirl_jax.attention import DEFAULT_TILES
from dirl_jax.canvas import two_stream_canvas
from dirl_jax.model import SDARConfig, SDARForCausalLM

SCOPES = ("embed", "rms_norm", "qkv_proj", "rope", "kv_cache", "attention_kernel", "o_proj", "mlp",
          "vocab_scores", "vocab_head", "noise", "optimizer")
_METADATA = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', re.M)


def part_of(op_name: str) -> tuple[str, str]:
    """``(part, pass)`` of an HLO op from its ``op_name`` path (innermost named scope wins)."""
    part = "other"
    for segment in op_name.split("/"):
        for scope in SCOPES:
            if re.search(rf"(^|\(){scope}(\)|$)", segment):
                part = scope
    return part, "bwd" if "transpose(" in op_name else "fwd"


def self_times(events: list[Any]) -> list[tuple[str, float]]:
    """``(hlo_op, self seconds)`` of one thread's op events (nested ones subtracted)."""
    spans = sorted(((e.start_ns, e.start_ns + e.duration_ns, dict(e.stats)["hlo_op"]) for e in events),
                   key=lambda s: (s[0], -s[1]))
    out, stack = [], []  # stack of [end, name, self]
    for start, end, name in spans:
        while stack and stack[-1][0] <= start:
            done = stack.pop()
            out.append((done[1], done[2]))
        if stack:
            stack[-1][2] -= (end - start) / 1e9
        stack.append([end, name, (end - start) / 1e9])
    out.extend((name, s) for _, name, s in stack)
    return out


def traced(run: Callable[[], Any], modules: tuple[str, ...], trace_dir: str | None = None
           ) -> tuple[float, dict]:
    """Wall seconds of ``run()`` under ``jax.profiler``, and the self thread-seconds of every
    HLO op of the ``modules`` (name prefixes) it executed, by ``(module, op)``."""
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jax_trace_")
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    profile = jax.profiler.ProfileData.from_file(
        sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    per_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for plane in profile.planes:
        for line in plane.lines:
            events = collections.defaultdict(list)
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and str(stats.get("hlo_module", "")).startswith(modules):
                    events[str(stats["hlo_module"])].append(e)
            for module, module_events in events.items():
                for name, s in self_times(module_events):
                    per_op[(module, name)] += s
    return wall, per_op


def part_flops(config: SDARConfig, rows: int, length: int, masked: int) -> dict[str, float]:
    """Model FLOPs per part of one step (forward + backward)."""
    c, tokens = config, rows * 2 * length
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layers = c.num_hidden_layers
    canvas, _ = two_stream_canvas(np.zeros((1, length), np.int32), np.zeros((1, length), np.int32),
                                  np.arange(length)[None], np.zeros((1, length), np.int32), c.block_size)
    fraction = nonempty_fraction(canvas, DEFAULT_TILES["tiled"])
    attention_fwd = 4 * rows * c.num_attention_heads * c.head_dim * (2 * length) ** 2 * fraction
    return {"qkv_proj": 6 * tokens * c.hidden_size * (q + 2 * kv) * layers,
            "o_proj": 6 * tokens * q * c.hidden_size * layers,
            "mlp": 6 * tokens * 3 * c.hidden_size * c.intermediate_size * layers,
            "attention_kernel": 3.5 * attention_fwd * layers,  # fwd + flash backward (recompute)
            "vocab_scores": 8 * masked * c.hidden_size * c.vocab_size}  # fwd, recompute, 2 bwd products


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="100m", choices=list(CONFIGS))
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    parser.add_argument("--top", type=int, default=0, help="also list the N slowest HLO ops")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = model_config(args.config)
    _, rows, length = CONFIGS[args.config]
    length = args.length or length
    model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
    data = make_batch(config, rows, length, seed=0)
    run = jax_step(model, data, args.impl)
    jax.block_until_ready(run())
    jax.block_until_ready(run())
    hlo = run.step.lower(*run.args()).compile().as_text()
    op_names = dict(_METADATA.findall(hlo))

    def steps() -> None:
        for _ in range(args.steps):
            jax.block_until_ready(run())

    wall, per_module_op = traced(steps, ("jit_train_step",), args.trace_dir)
    wall /= args.steps
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for (module, name), s in per_module_op.items():
        if module == "jit_train_step":
            seconds[part_of(op_names.get(name, ""))] += s / args.steps
            per_op[name] += s / args.steps

    masked = int(np.asarray(data["noised"].masked).sum())
    flops = part_flops(config, rows, length, masked)
    total = sum(seconds.values())
    peak = benchlib.matmul_peak(config, rows * 2 * length)["xla"]
    machine = benchlib.machine()
    print(f"device {machine['device']}; config {args.config}, {rows} x {length} tokens "
          f"(canvas {2 * length}), {masked} masked; wall {wall:.3f} s/step, thread time "
          f"{total:.3f} s/step; XLA matmul peak {peak:.1f} GFLOP/s")
    header = f"{'part':>17} {'fwd s':>7} {'bwd s':>7} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>7}"
    print(header)
    print("-" * len(header))
    records = []
    for part in (*SCOPES, "other"):
        fwd, bwd = seconds.get((part, "fwd"), 0.0), seconds.get((part, "bwd"), 0.0)
        if fwd + bwd == 0:
            continue
        gflop = flops.get(part, 0.0) / 1e9
        rate = gflop / (fwd + bwd) if gflop else float("nan")
        records.append({"config": args.config, "rows": rows, "tokens_per_row": length, "part": part,
                        "fwd_seconds": fwd, "bwd_seconds": bwd, "share": (fwd + bwd) / total,
                        "gflop": gflop, "gflops": rate, "wall_seconds_per_step": wall,
                        "thread_seconds_per_step": total, "matmul_peak_gflops": peak, **machine})
        print(f"{part:>17} {fwd:>7.3f} {bwd:>7.3f} {(fwd + bwd) / total:>6.1%} {gflop:>7.1f} "
              f"{rate:>8.1f} {rate / peak if gflop else float('nan'):>7.0%}", flush=True)
    for name, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{s:>8.4f} s  {name:<40} {op_names.get(name, '')[:150]}")
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

"""The matmul ceiling of a decoding forward: XLA and PyTorch on the model's weight shapes.

    python scripts/bench_matmul.py [--config 100m] [--tokens 4 32 128] [--repeats 20] [--json out.json]

One decoding forward of the rollout engine multiplies ``tokens`` rows (batch x block) by every
weight matrix of the model (q, k, v, o, gate, up, down per layer, and the vocabulary head). This
times those products alone, in fp32, as one jitted XLA program and as a loop of ``torch.matmul``
(the reference side of ``scripts/bench_rollout.py``), and prints the GFLOP/s each reaches: the
rate a decoder on this machine cannot beat, whatever its overheads.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
from bench_train_step import CONFIGS, model_config


def weight_shapes(name: str) -> list[tuple[int, int]]:
    """``(in, out)`` of every matrix one token meets in a forward of config ``name``."""
    c = model_config(name)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
             (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
             (c.intermediate_size, c.hidden_size)]
    return layer * c.num_hidden_layers + [(c.hidden_size, c.vocab_size)]


def best_of(repeats: int, run) -> float:
    run()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def xla_seconds(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]
    x = {d: jnp.asarray(rng.standard_normal((tokens, d), np.float32)) for d in {s[0] for s in shapes}}

    @jax.jit
    def products(x, weights):
        return [x[w.shape[0]] @ w for w in weights]
    return best_of(repeats, lambda: jax.block_until_ready(products(x, weights)))


def torch_seconds(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> float:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    weights = [torch.randn(s) for s in shapes]
    x = {d: torch.randn(tokens, d) for d in {s[0] for s in shapes}}

    def run():
        with torch.no_grad():
            for w in weights:
                torch.matmul(x[w.shape[0]], w)
    return best_of(repeats, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="100m", choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    machine = benchlib.machine()
    shapes = weight_shapes(args.config)
    print(f"device {machine['device']}; config {args.config}: {len(shapes)} matrices, fp32")
    header = f"{'tokens':>6} {'GFLOP':>7} {'XLA ms':>8} {'XLA GFLOP/s':>11} {'torch ms':>8} {'torch GFLOP/s':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    records: list[dict[str, Any]] = []
    for tokens in args.tokens:
        flops = 2 * tokens * sum(a * b for a, b in shapes)
        xla, torch_s = xla_seconds(shapes, tokens, args.repeats), torch_seconds(shapes, tokens, args.repeats)
        records.append({"config": args.config, "tokens": tokens, "gflop": flops / 1e9,
                        "xla_s": xla, "xla_gflops": flops / xla / 1e9, "torch_s": torch_s,
                        "torch_gflops": flops / torch_s / 1e9, **machine})
        print(f"{tokens:>6} {flops / 1e9:>7.2f} {xla * 1e3:>8.1f} {flops / xla / 1e9:>11.1f} "
              f"{torch_s * 1e3:>8.1f} {flops / torch_s / 1e9:>13.1f} {torch_s / xla:>5.2f}x", flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

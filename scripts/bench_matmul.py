"""The matmul ceiling of a decoding forward: XLA and PyTorch on the model's weight shapes.

    python scripts/bench_matmul.py [--config 100m] [--tokens 4 32 128] [--repeats 20] [--json out.json]

One decoding forward of the rollout engine multiplies ``tokens`` rows (batch x block) by every
weight matrix of the model (q, k, v, o, gate, up, down per layer, and the vocabulary head). This
times those products alone, in fp32, as one jitted XLA program and as a loop of ``torch.matmul``
(the reference side of ``scripts/bench_rollout.py``), the sides alternating, best of ``--repeats``,
and prints the GFLOP/s each reaches: the rate a decoder on this machine cannot beat, whatever its
overheads.
"""

from __future__ import annotations

import argparse
from typing import Any

import benchlib
from bench_train_step import CONFIGS, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="100m", choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    machine = benchlib.machine()
    shapes = benchlib.weight_shapes(model_config(args.config))
    print(f"device {machine['device']}; config {args.config}: {len(shapes)} matrices, fp32")
    header = f"{'tokens':>6} {'GFLOP':>7} {'XLA ms':>8} {'XLA GFLOP/s':>11} {'torch ms':>8} {'torch GFLOP/s':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    records: list[dict[str, Any]] = []
    for tokens in args.tokens:
        flops = 2 * tokens * sum(a * b for a, b in shapes)
        seconds = benchlib.matmul_seconds(shapes, tokens, args.repeats)
        xla, torch_s = seconds["xla"], seconds["torch"]
        records.append({"config": args.config, "tokens": tokens, "gflop": flops / 1e9,
                        "xla_s": xla, "xla_gflops": flops / xla / 1e9, "torch_s": torch_s,
                        "torch_gflops": flops / torch_s / 1e9, **machine})
        print(f"{tokens:>6} {flops / 1e9:>7.2f} {xla * 1e3:>8.1f} {flops / xla / 1e9:>11.1f} "
              f"{torch_s * 1e3:>8.1f} {flops / torch_s / 1e9:>13.1f} {torch_s / xla:>5.2f}x", flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

"""Attention benchmark on the SFT two-stream mask: forward and forward+backward wall time.

    python scripts/bench_attention.py [--seq-lens 1024 4096 16384] [--heads 8] [--kv-heads 2]
        [--head-dim 128] [--block-size 4] [--dtype float32] [--impls reference tiled ...]
        [--repeats 5] [--json out.json]

Every (impl, pass) runs once to compile and warm up, then they alternate (A B C A B C ...,
``--repeats`` calls each); the table shows the best call, the median and whether other
processes took CPU meanwhile (``busy``, :func:`benchlib.alternate`). ``seq_len`` is the
canvas length 2n (n clean + n noisy tokens, one sample). Effective FLOP/s counts the matmul FLOPs
of the non-empty tiles only (forward: QK^T and PV; forward+backward: 3.5x that, the flash
recompute), so implementations are compared on the work the mask actually needs.
``flex_torch`` is PyTorch FlexAttention (``torch.compile``): on CUDA where torch sees a GPU
(forward and forward+backward), else on the CPU, forward only (no CPU backward).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import benchlib
import jax
import jax.numpy as jnp
import numpy as np

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import DEFAULT_TILES, attention, resolve_impl
from dirl_jax.attention import schedule as schedule_lib

PLATFORM_IMPLS = {"cpu": ["reference", "tiled", "flex_torch"], "gpu": ["reference", "tiled", "pallas_gpu", "flex_torch"],
                  "tpu": ["reference", "tiled", "splash", "pallas_tpu"]}
BACKWARD_FACTOR = 3.5


def two_stream(n: int, block_size: int) -> canvas_lib.Canvas:
    positions = jnp.arange(n)[None]
    zeros = jnp.zeros((1, n), jnp.int32)
    return canvas_lib.two_stream_canvas(zeros, zeros, positions, zeros, block_size)[0]


def nonempty_fraction(canvas: canvas_lib.Canvas, tile: tuple[int, int]) -> float:
    table = np.asarray(schedule_lib.tile_schedule(canvas, q_tile=tile[0], kv_tile=tile[1]).table)
    return float((table != canvas_lib.TILE_EMPTY).mean())


def jax_runners(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, n: int,
                block_size: int) -> dict[str, Callable[[], Any]]:
    canvas = two_stream(n, block_size)
    layout = canvas_lib.StreamMajorLayout(n, block_size, rounds=1) if impl == "splash" else None

    def forward(q, k, v):
        return attention(q, k, v, q_canvas=canvas, impl=impl, layout=layout)

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(),
                               argnums=(0, 1, 2)))
    return {"fwd": lambda: fwd(q, k, v), "fwd_bwd": lambda: fwd_bwd(q, k, v)}


def flex_runners(q: jax.Array, k: jax.Array, v: jax.Array, n: int,
                 block_size: int) -> dict[str, Callable[[], Any]]:
    """PyTorch FlexAttention (``torch.compile``) on the same mask: on CUDA when torch sees a GPU
    (forward and forward+backward, synchronised), else on the CPU (forward only)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def mask_mod(b, h, q_idx, kv_idx):  # the same two-stream mask as canvas.visible
        q_noisy, kv_noisy = q_idx < n, kv_idx < n
        q_block, kv_block = (q_idx % n) // block_size, (kv_idx % n) // block_size
        return ((q_noisy & kv_noisy & (q_block == kv_block))
                | (q_noisy & ~kv_noisy & (kv_block < q_block))
                | (~q_noisy & ~kv_noisy & (kv_block <= q_block)))

    length = 2 * n
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
    dtype = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16}[q.dtype]
    tq, tk, tv = (torch.from_numpy(np.array(x, np.float32)).to(device, dtype).transpose(1, 2)
                  .contiguous().requires_grad_(device == "cuda") for x in (q, k, v))
    compiled = torch.compile(flex_attention)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            out = compiled(tq, tk, tv, block_mask=block_mask, enable_gqa=True)
        synchronize()
        return out

    def fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        compiled(tq, tk, tv, block_mask=block_mask, enable_gqa=True).sum().backward()
        synchronize()
        return tq.grad

    return {"fwd": fwd, "fwd_bwd": fwd_bwd} if device == "cuda" else {"fwd": fwd}


def fits_in_memory(impl: str, length: int, heads: int) -> bool:
    """The dense reference keeps fp32 scores and probabilities ``[H, 2n, 2n]`` (about 3 copies)."""
    if impl != "reference":
        return True
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if jax.default_backend() != "cpu":
        total = jax.devices()[0].memory_stats().get("bytes_limit", total)
    return 3 * heads * length * length * 4 < 0.8 * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="default: reference + every implementation this platform runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    args = parser.parse_args()

    backend = jax.default_backend()
    impls = args.impls or PLATFORM_IMPLS.get(backend, ["reference", "tiled"])
    machine = benchlib.machine()
    device = machine["device"]
    print(f"device {device}; H={args.heads} KV={args.kv_heads} D={args.head_dim} "
          f"B={args.block_size} {args.dtype}")
    dtype = jnp.dtype(args.dtype)
    records: list[dict[str, Any]] = []
    header = (f"{'impl':>12} {'2n':>6} {'pass':>8} {'best s':>10} {'median':>10} {'tiles':>6} "
              f"{'eff GFLOP/s':>12} {'busy':>5}")
    print(header)
    print("-" * len(header))
    for length in args.seq_lens:
        if length % 2:
            raise SystemExit(f"--seq-lens: {length} is not even (2n)")
        n = length // 2
        rng = np.random.default_rng(length)
        q = jnp.asarray(rng.standard_normal((1, length, args.heads, args.head_dim)), dtype)
        k = jnp.asarray(rng.standard_normal((1, length, args.kv_heads, args.head_dim)), dtype)
        v = jnp.asarray(rng.standard_normal((1, length, args.kv_heads, args.head_dim)), dtype)
        tile = DEFAULT_TILES["tiled"]
        fraction = nonempty_fraction(two_stream(n, args.block_size), tile)
        fwd_flops = 4 * args.heads * args.head_dim * length * length * fraction
        sides: dict[tuple[str, str], Callable[[], Any]] = {}
        for impl in impls:
            if not fits_in_memory(impl, length, args.heads):
                print(f"{impl:>12} {length:>6}  skipped: dense scores would not fit in memory")
                continue
            if impl == "flex_torch":
                runners = flex_runners(q, k, v, n, args.block_size)
            else:
                resolve_impl(impl)  # validates the name
                runners = jax_runners(impl, q, k, v, n, args.block_size)
            for pass_name, run in runners.items():
                sides[impl, pass_name] = lambda run=run: jax.block_until_ready(run())
        for run in sides.values():
            run()  # compile + warm-up
        for (impl, pass_name), t in benchlib.alternate(sides, args.repeats).items():
            flops = fwd_flops * (BACKWARD_FACTOR if pass_name == "fwd_bwd" else 1.0)
            records.append({"impl": impl, "seq_len": length, "pass": pass_name,
                            **benchlib.timing_fields(t), "nonempty_tile_fraction": fraction,
                            "effective_flops_per_s": flops / t["min"], "heads": args.heads,
                            "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                            "block_size": args.block_size, "dtype": args.dtype,
                            **machine})
            print(f"{impl:>12} {length:>6} {pass_name:>8} {t['min']:>10.4f} {t['median']:>10.4f} "
                  f"{fraction:>6.3f} {flops / t['min'] / 1e9:>12.1f} {'yes' if t['busy'] else 'no':>5}",
                  flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

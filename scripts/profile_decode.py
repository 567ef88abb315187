"""Where a decode forward's time goes: a ``jax.profiler`` trace of the rollout engine on the
``uniform`` workload of ``bench_rollout.py``, every executed HLO op attributed to the model's
named scopes, against the time the forward's weight products alone take.

    python scripts/profile_decode.py [--config 100m] [--batch 8] [--prompt-len 128]
        [--gen-len 256] [--threshold 0.9] [--json out.json]

A decode forward runs ``batch x block`` query tokens through every weight matrix, so at small
batches it is bound by the weight products at that many rows, whatever else the engine saves.
The *floor* is one jitted program of exactly those products (q, k, v, o, gate, up, down per
layer at ``batch x block`` rows, the vocabulary head at the rows the engine projects), timed
alone: a forward cannot cost less on this machine's XLA. Printed per forward: the engine's wall
time, the thread time per part (``profile_train_step.part_of``; the sampler and cache updates
land in ``other``), and the floor. ``bench_rollout.py`` gives the PyTorch side's seconds and
forwards on the same workload.
"""

from __future__ import annotations

import argparse
import collections
import time

import benchlib
import jax
import jax.numpy as jnp
from bench_rollout import BLOCK, workload
from bench_train_step import CONFIGS, model_config
from flax import nnx
from profile_train_step import _METADATA, SCOPES, part_of, traced

from dirl_jax.model import SDARConfig, SDARForCausalLM
from dirl_jax.rollout import decoder
from dirl_jax.rollout.sampler import SamplingConfig


def weight_floor(config: SDARConfig, rows: int, head_rows: int, repeats: int = 20) -> float:
    """Best seconds of the weight products of one forward at ``rows`` query rows (the head at
    ``head_rows``), fp32, random weights of the model's shapes."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    keys = iter(jax.random.split(jax.random.key(0), len(shapes) * c.num_hidden_layers + 2))
    layers = [[jax.random.normal(next(keys), s, jnp.float32) * 0.02 for s in shapes]
              for _ in range(c.num_hidden_layers)]
    head = jax.random.normal(next(keys), (c.hidden_size, c.vocab_size), jnp.float32) * 0.02
    x0 = jax.random.normal(next(keys), (rows, c.hidden_size), jnp.float32)

    @jax.jit
    def products(x, layers, head):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            attn = x @ wq + jnp.pad(x @ wk + x @ wv, ((0, 0), (0, q - kv)))  # the q, k, v products
            x = x + attn @ wo
            x = x + (x @ wg) * (x @ wu) @ wd
        return x[:head_rows] @ head

    jax.block_until_ready(products(x0, layers, head))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(products(x0, layers, head))
        best = min(best, time.perf_counter() - start)
    return best


def chunk_op_names(model: SDARForCausalLM, cfg: SamplingConfig, slots: int, capacity: int,
                   windows: list[int]) -> dict[str, str]:
    """HLO op -> ``op_name`` of the decode-chunk programs at these windows (merged: the programs
    differ in their window only)."""
    graphdef, params = nnx.split(model)
    state = decoder.empty_slots(model, slots, capacity, cfg)
    fused = decoder.resolve_commit("auto") == "fused"
    names: dict[str, str] = {}
    for window in windows:
        hlo = decoder.run_chunk_jit.lower(graphdef, params, state, jnp.asarray(-1, jnp.int32),
                                           cfg, window, fused, None).compile().as_text()
        names.update(_METADATA.findall(hlo))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="100m", choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = model_config(args.config)
    model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
    prompts, limits = workload("uniform", config, args.batch, args.prompt_len, args.gen_len)
    cfg = SamplingConfig(block_size=config.block_size, mask_token_id=config.mask_token_id,
                         strategy="low_confidence_dynamic", threshold=args.threshold,
                         max_new_tokens=args.gen_len, temperature=0.0)
    results: list[dict] = []

    def run() -> None:
        results[:] = decoder.decode_prompts(model, prompts, cfg, slots=args.batch,
                                            max_new_tokens=limits)

    run()  # compiles
    chunk = "jit_run_chunk_jit"
    wall, per_op = traced(run, (chunk, "jit_admit_jit"))
    forwards = max(r["num_forwards"] - 1 for r in results)  # lock step: every row, every forward
    capacity = decoder.capacity_for(args.prompt_len, cfg)
    windows = sorted({decoder.window_for(n, capacity)
                      for n in range(args.prompt_len + BLOCK, args.prompt_len + args.gen_len + 1, BLOCK)})
    op_names = chunk_op_names(model, cfg, args.batch, capacity, windows)
    parts: dict[str, float] = collections.defaultdict(float)
    for (module, name), s in per_op.items():
        parts[part_of(op_names.get(name, ""))[0] if module.startswith(chunk) else "prefill"] += s
    head_rows = max(1, args.batch * BLOCK // 2)  # the packed still-masked positions (at most half)
    floor = weight_floor(config, args.batch * BLOCK, head_rows)
    machine = benchlib.machine()
    per_forward = wall / forwards
    print(f"device {machine['device']}; config {args.config}, batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.gen_len} new tokens, greedy dynamic {args.threshold}")
    print(f"engine: {wall:.2f} s, {forwards} forwards in lock step, {per_forward * 1e3:.1f} ms "
          f"per forward; weight products alone at {args.batch * BLOCK} rows (head at {head_rows}): "
          f"{floor * 1e3:.1f} ms ({floor / per_forward:.0%} of a forward)")
    print(f"{'part':>17} {'ms/forward':>10} {'share':>6}")
    total = sum(parts.values())
    records = []
    for part in (*SCOPES, "other", "prefill"):
        if part in parts:
            print(f"{part:>17} {parts[part] / forwards * 1e3:>10.2f} {parts[part] / total:>6.1%}")
            records.append({"part": part, "thread_seconds_per_forward": parts[part] / forwards})
    benchlib.write_records(args.json, [
        {"config": args.config, "batch": args.batch, "prompt_len": args.prompt_len,
         "gen_len": args.gen_len, "wall_seconds": wall, "forwards": forwards,
         "seconds_per_forward": per_forward, "weight_floor_seconds": floor,
         "parts": records, **machine}])


if __name__ == "__main__":
    main()

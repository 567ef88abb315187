"""SFT training-step throughput: dirl-jax against a PyTorch reference in the same process.

    python scripts/bench_train_step.py [--configs tiny 100m] [--impls auto reference]
        [--repeats 3] [--json out.json]

Both sides run one AdamW update on the same weights and the same two-stream canvas
(``[noisy | clean]``, block-diffusion mask). The PyTorch side is transformers' Qwen3 with the mask
as a dense 4-D additive ``attention_mask`` (SDPA), full logits and a 1/p-weighted cross-entropy
over the masked tokens: what a PyTorch user gets where FlexAttention has no backward (CPU).
Throughput counts real tokens (one copy) per second; the time is the median over ``--repeats``
steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dirl_jax import canvas as canvas_lib
from dirl_jax import diffusion
from dirl_jax.model import SDARConfig, SDARForCausalLM

CONFIGS = {
    # name: (model fields, rows, tokens per row)
    "tiny": (dict(vocab_size=100, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32), 16, 128),
    "100m": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64), 1, 512),
}
BLOCK_SIZE = 4
LEARNING_RATE = 1e-4


def model_config(name: str) -> SDARConfig:
    fields, _, _ = CONFIGS[name]
    vocab = fields["vocab_size"]
    return SDARConfig(**fields, block_size=BLOCK_SIZE, mask_token_id=vocab - 1,
                      eos_token_id=vocab - 2, pad_token_id=vocab - 3, bos_token_id=vocab - 2,
                      rope_theta=10000.0, tie_word_embeddings=False)


def make_batch(config: SDARConfig, rows: int, length: int, seed: int) -> dict[str, Any]:
    """Random tokens, one sample per row, every token supervised; a fixed noising."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size - 3, (rows, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    batch = dict(tokens=tokens, labels=tokens.copy(), positions=positions,
                 segment_ids=np.zeros((rows, length), np.int32))
    keys = jax.random.split(jax.random.key(seed), rows)
    noised = diffusion.noise_batch(keys, *(jnp.asarray(batch[k]) for k in ("tokens", "labels", "segment_ids")),
                                   mask_token_id=config.mask_token_id, eps=1e-3)
    return {"batch": {k: jnp.asarray(v) for k, v in batch.items()}, "noised": noised}


def jax_step(model: SDARForCausalLM, data: dict[str, Any], impl: str) -> Callable[[], Any]:
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(LEARNING_RATE)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            parts = diffusion.masked_loss_parts(nnx.merge(graphdef, params), data["batch"],
                                                data["noised"], block_size=BLOCK_SIZE,
                                                chunk=1024, attn_impl=impl)
            return parts.weighted_ce_sum / parts.num_supervised

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    state = {"params": params, "opt": opt_state}

    def run():
        state["params"], state["opt"], value = step(state["params"], state["opt"])
        return value

    return run


def torch_step(model: SDARForCausalLM, config: SDARConfig, data: dict[str, Any]) -> Callable[[], Any]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from torch_bridge import to_torch_state_dict

    torch.set_num_threads(os.cpu_count() or 1)
    hf_config = Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                               if k not in ("architectures", "model_type", "auto_map")})
    hf_config._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(hf_config)
    hf.load_state_dict(to_torch_state_dict(model, torch.float32), strict=True)
    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LEARNING_RATE)

    batch, noised = data["batch"], data["noised"]
    canvas, noisy_slot = canvas_lib.two_stream_canvas(batch["tokens"], noised.noisy_tokens,
                                                      batch["positions"], batch["segment_ids"],
                                                      BLOCK_SIZE)
    mask = torch.from_numpy(np.array(canvas_lib.dense_mask(canvas)))
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]
    input_ids = torch.from_numpy(np.asarray(canvas.tokens)).long()
    position_ids = torch.from_numpy(np.asarray(canvas.positions)).long()
    slots = torch.from_numpy(np.asarray(noisy_slot)).long()
    targets = torch.from_numpy(np.asarray(batch["tokens"])).long()
    weights = torch.from_numpy(np.asarray(jnp.where(noised.masked, 1.0 / noised.p, 0.0)))
    num_supervised = float(targets.numel())

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = hf(input_ids=input_ids, position_ids=position_ids, attention_mask=additive).logits
        noisy_logits = torch.gather(logits, 1, slots[..., None].expand(-1, -1, logits.shape[-1]))
        ce = torch.nn.functional.cross_entropy(noisy_logits.flatten(0, 1), targets.flatten(),
                                               reduction="none")
        loss = (ce * weights.flatten()).sum() / num_supervised
        loss.backward()
        optimizer.step()
        return loss.item()

    return run


def median_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, float]:
    first = float(jax.block_until_ready(run()))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--impls", nargs="+", default=["auto"],
                        help="dirl-jax attention impls to time (default: auto)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    machine = benchlib.machine()
    device = machine["device"]
    print(f"device {device}; fp32; two-stream canvas, block size {BLOCK_SIZE}")
    header = f"{'config':>6} {'params':>8} {'rows x len':>10} {'impl':>16} {'s/step':>8} {'tok/s':>9} {'vs torch':>8}"
    print(header)
    print("-" * len(header))
    records = []
    for name in args.configs:
        config = model_config(name)
        _, rows, length = CONFIGS[name]
        model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        data = make_batch(config, rows, length, seed=0)
        runs = {f"dirl_jax/{impl}": jax_step(model, data, impl) for impl in args.impls}
        if not args.no_torch:
            runs["torch/sdpa-dense"] = torch_step(model, config, data)
        results = {}
        for label, run in runs.items():
            seconds, first_loss = median_seconds(run, args.repeats)
            results[label] = seconds
            records.append({"config": name, "params": params, "rows": rows, "tokens_per_row": length,
                            "impl": label, "seconds_per_step": seconds,
                            "tokens_per_s": rows * length / seconds, "first_loss": first_loss,
                            **machine})
        torch_seconds = results.get("torch/sdpa-dense")
        for record in records[-len(runs):]:
            ratio = f"{torch_seconds / record['seconds_per_step']:.2f}x" if torch_seconds else "-"
            print(f"{name:>6} {params / 1e6:>7.1f}M {rows:>4} x {length:<4} {record['impl']:>16} "
                  f"{record['seconds_per_step']:>8.3f} {record['tokens_per_s']:>9.0f} {ratio:>8}")
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

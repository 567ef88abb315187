"""SFT training-step throughput: dirl-jax against a PyTorch reference in the same process.

    python scripts/bench_train_step.py [--configs tiny 100m] [--length N] [--impls auto reference]
        [--repeats 3] [--json out.json]

Both sides run one update on the same weights, noise and two-stream canvas (``[noisy | clean]``,
block-diffusion mask): the 1/p-weighted cross-entropy, gradient clipping and AdamW with the SFT
defaults (constant learning rate; no decay on norm scales). The JAX side is the trainer's own
compiled step (:func:`dirl_jax.trainers.steps.make_train_step`, noising included). The PyTorch side
is transformers' Qwen3 with the mask as a dense 4-D additive ``attention_mask`` (SDPA), full
logits and a 1/p-weighted cross-entropy over the masked tokens: what a PyTorch user gets where
FlexAttention has no backward (CPU).

Throughput counts real tokens (one copy) per second. Every side takes one warm-up step, then
the sides alternate (A B A B ..., ``--repeats`` steps each); the table shows the best step and the
median, whether other processes took CPU meanwhile (``busy``, :func:`benchlib.alternate`) and each side's
model GFLOP/s (``6 x parameters x canvas tokens`` per step) against its own fp32 matmul peak,
measured first on the step's weight products (:func:`benchlib.matmul_peak`). ``--length``
overrides the tokens per row (the canvas is twice that).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dirl_jax import canvas as canvas_lib
from dirl_jax import diffusion
from dirl_jax.config import sft_defaults
from dirl_jax.model import SDARConfig, SDARForCausalLM
from dirl_jax.optim import make_optimizer
from dirl_jax.trainers.steps import make_train_step

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
    return sdar_config(CONFIGS[name][0])


def sdar_config(fields: dict[str, int]) -> SDARConfig:
    """An untied SDAR config of the given shape, block size 4, special tokens at the vocabulary's end."""
    vocab = fields["vocab_size"]
    return SDARConfig(**fields, block_size=BLOCK_SIZE, mask_token_id=vocab - 1,
                      eos_token_id=vocab - 2, pad_token_id=vocab - 3, bos_token_id=vocab - 2,
                      rope_theta=10000.0, tie_word_embeddings=False)


def train_config(impl: str) -> ConfigDict:
    """The SFT config whose step both sides run: clipping, AdamW, a constant learning rate."""
    config = sft_defaults()
    config.model.attention_impl = impl
    config.diffusion.block_size = BLOCK_SIZE
    config.train.update(learning_rate=LEARNING_RATE, warmup_steps=0, schedule="constant")
    return config


def make_batch(config: SDARConfig, rows: int, length: int, seed: int) -> dict[str, Any]:
    """Random tokens, one sample per row, every token supervised, and the noising the trainer's
    step draws from ``key`` (one key per row, :func:`dirl_jax.trainers.steps.make_train_step`)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size - 3, (rows, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    batch = dict(tokens=tokens, labels=tokens.copy(), positions=positions,
                 segment_ids=np.zeros((rows, length), np.int32))
    key = jax.random.key(seed)
    noised = diffusion.noise_batch(jax.random.split(key, rows),
                                   *(jnp.asarray(batch[k]) for k in ("tokens", "labels", "segment_ids")),
                                   mask_token_id=config.mask_token_id, eps=train_config("auto").diffusion.eps)
    return {"batch": batch, "noised": noised, "key": key}


def jax_step(model: SDARForCausalLM, data: dict[str, Any], impl: str) -> Callable[[], Any]:
    """The trainer's own jitted step (:func:`dirl_jax.trainers.steps.make_train_step`: noising,
    loss, gradients, clipping, AdamW; parameters and optimizer state donated), one micro-batch."""
    config = train_config(impl)
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, params)  # the step donates them; the model stays usable
    tx = make_optimizer(config.train)
    step = make_train_step(graphdef, tx, config, model.config)
    batch = {k: jnp.asarray(v)[None] for k, v in data["batch"].items()}  # [grad_accum = 1, rows, L]
    state = {"params": params, "opt": tx.init(params)}

    def run():
        state["params"], state["opt"], metrics = step(state["params"], state["opt"], batch,
                                                      data["key"])
        return metrics["loss"]

    run.step, run.args = step, lambda: (state["params"], state["opt"], batch, data["key"])
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
    train = train_config("auto").train
    groups = [[p for n, p in hf.named_parameters() if ("norm" in n) == no_decay]
              for no_decay in (False, True)]
    optimizer = torch.optim.AdamW([{"params": groups[0], "weight_decay": train.weight_decay},
                                   {"params": groups[1], "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(train.b1, train.b2), eps=train.adam_eps)

    batch, noised = data["batch"], data["noised"]
    canvas, noisy_slot = canvas_lib.two_stream_canvas(batch["tokens"], noised.noisy_tokens,
                                                      batch["positions"], batch["segment_ids"],
                                                      BLOCK_SIZE)
    mask = torch.from_numpy(np.array(canvas_lib.dense_mask(canvas)))
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]
    input_ids = torch.from_numpy(np.array(canvas.tokens)).long()
    position_ids = torch.from_numpy(np.array(canvas.positions)).long()
    slots = torch.from_numpy(np.array(noisy_slot)).long()
    targets = torch.from_numpy(np.array(batch["tokens"])).long()
    weights = torch.from_numpy(np.array(jnp.where(noised.masked, 1.0 / noised.p, 0.0)))
    num_supervised = float(targets.numel())

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = hf(input_ids=input_ids, position_ids=position_ids, attention_mask=additive).logits
        noisy_logits = torch.gather(logits, 1, slots[..., None].expand(-1, -1, logits.shape[-1]))
        ce = torch.nn.functional.cross_entropy(noisy_logits.flatten(0, 1), targets.flatten(),
                                               reduction="none")
        loss = (ce * weights.flatten()).sum() / num_supervised
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), train.max_grad_norm)
        optimizer.step()
        return loss.item()

    return run


def model_gflop(params: int, canvas_tokens: int) -> float:
    """Model FLOPs of one training step (forward and backward), in GFLOP."""
    return 6 * params * canvas_tokens / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default: the config's)")
    parser.add_argument("--impls", nargs="+", default=["auto"],
                        help="dirl-jax attention impls to time (default: auto)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    machine = benchlib.machine()
    print(f"device {machine['device']}; fp32; two-stream canvas, block size {BLOCK_SIZE}")
    header = (f"{'config':>6} {'params':>8} {'rows x len':>10} {'side':>16} {'best s':>7} {'median':>7} "
              f"{'tok/s':>8} {'GFLOP/s':>7} {'of peak':>7} {'vs torch':>8} {'busy':>5}")
    print(header)
    print("-" * len(header))
    records = []
    for name in args.configs:
        config = model_config(name)
        _, rows, length = CONFIGS[name]
        length = args.length or length
        model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        peak = benchlib.matmul_peak(config, rows * 2 * length)
        data = make_batch(config, rows, length, seed=0)
        sides = {f"dirl_jax/{impl}": jax_step(model, data, impl) for impl in args.impls}
        if not args.no_torch:
            sides["torch/sdpa-dense"] = torch_step(model, config, data)
        first_loss = {side: float(jax.block_until_ready(run())) for side, run in sides.items()}
        timed = benchlib.alternate({side: lambda run=run: jax.block_until_ready(run())
                                    for side, run in sides.items()}, args.repeats)
        gflop = model_gflop(params, rows * 2 * length)
        torch_best = timed["torch/sdpa-dense"]["min"] if "torch/sdpa-dense" in timed else None
        for side, t in timed.items():
            own_peak = peak["torch" if side.startswith("torch") else "xla"]
            ratio = torch_best / t["min"] if torch_best else float("nan")
            records.append({"config": name, "params": params, "rows": rows, "tokens_per_row": length,
                            "impl": side, "seconds_per_step": t["min"],
                            **benchlib.timing_fields(t),
                            "tokens_per_s": rows * length / t["min"], "first_loss": first_loss[side],
                            "model_gflops": gflop / t["min"], "matmul_peak_gflops": own_peak,
                            "fraction_of_peak": gflop / t["min"] / own_peak, "speedup_vs_torch": ratio,
                            **machine})
            print(f"{name:>6} {params / 1e6:>7.1f}M {rows:>4} x {length:<4} {side:>16} {t['min']:>7.3f} "
                  f"{t['median']:>7.3f} {rows * length / t['min']:>8.0f} {gflop / t['min']:>7.1f} "
                  f"{gflop / t['min'] / own_peak:>6.0%} {ratio:>7.2f}x {'yes' if t['busy'] else 'no':>5}",
                  flush=True)
        print(f"{'':>6} matmul peak on the step's weight products: XLA {peak['xla']:.1f} GFLOP/s, "
              f"PyTorch {peak['torch']:.1f} GFLOP/s", flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

"""Rollout throughput: the compiled JAX decoder against a PyTorch reference in the same process.

    python scripts/bench_rollout.py [--configs tiny 100m] [--batches 1 8 32] [--prompt-len 128]
        [--gen-len 512] [--strategy low_confidence_dynamic] [--threshold 0.9] [--json out.json]

Both sides decode the same random prompts greedily with the same weights and the same rules:
blocks of 4 aligned at position 0, the unmasking rule of :mod:`dirl_jax.rollout.unmasking`, one
commit forward per completed block, exactly ``--gen-len`` new tokens (no stop tokens). The
PyTorch reference is transformers' Qwen3 decoding block by block with a ``DynamicCache``
(denoising forwards are cropped off the cache, the commit forward is kept), all rows of the
batch in lock step. Tokens/s counts generated tokens over wall time after one warm-up run
(compilation excluded); tokens per forward counts denoising and commit forwards.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import benchlib
import numpy as np
from bench_train_step import CONFIGS, model_config
from flax import nnx

from dirl_jax.model import SDARForCausalLM
from dirl_jax.rollout import unmasking
from dirl_jax.rollout.sampler import SamplingConfig, decode_prompts

BLOCK = 4


def jax_rollout(model: SDARForCausalLM, prompts: np.ndarray, cfg: SamplingConfig) -> tuple[float, np.ndarray, int]:
    decode_prompts(model, prompts.tolist(), cfg)  # compile
    start = time.perf_counter()
    results = decode_prompts(model, prompts.tolist(), cfg)
    seconds = time.perf_counter() - start
    forwards = sum(r["num_forwards"] - 1 for r in results)  # without the prefill
    return seconds, np.array([r["token_ids"] for r in results]), forwards


def torch_rollout(model: SDARForCausalLM, prompts: np.ndarray, cfg: SamplingConfig, gen_len: int
                  ) -> tuple[float, np.ndarray, int]:
    import torch
    from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

    from torch_bridge import to_torch_state_dict

    torch.set_num_threads(os.cpu_count() or 1)
    config = model.config
    hf_config = Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                               if k not in ("architectures", "model_type", "auto_map")})
    hf_config._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(hf_config).eval()
    hf.load_state_dict(to_torch_state_dict(model, torch.float32), strict=True)
    batch, prompt_len = prompts.shape

    def forward(ids: np.ndarray, start: int, cache: DynamicCache) -> np.ndarray:
        n = ids.shape[1]
        positions = torch.arange(start, start + n)[None].expand(batch, n)
        q_block = (start + torch.arange(n)) // BLOCK
        kv_block = torch.arange(start + n) // BLOCK
        mask = torch.where(kv_block[None, :] <= q_block[:, None], 0.0, torch.finfo(torch.float32).min)
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids).long(), position_ids=positions,
                     attention_mask=mask[None, None].expand(batch, 1, n, start + n),
                     past_key_values=cache, use_cache=True)
        return out.logits.float().numpy()

    def run(gen_len: int) -> tuple[np.ndarray, int]:
        cache = DynamicCache(config=hf_config)
        forward(prompts, 0, cache)
        generated, forwards = [], 0
        for start in range(prompt_len, prompt_len + gen_len, BLOCK):
            block = np.full((batch, BLOCK), cfg.mask_token_id)
            masked = np.ones((batch, BLOCK), bool)
            while masked.any():
                logits = forward(block, start, cache)
                cache.crop(-BLOCK)  # drop the denoising keys/values
                forwards += 1
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                candidates = probs.argmax(-1)
                chosen = np.asarray(unmasking.select_positions(
                    probs.max(-1), masked, strategy=cfg.strategy, block_size=BLOCK,
                    steps=cfg.denoising_steps, threshold=cfg.threshold))
                block = np.where(chosen, candidates, block)
                masked &= ~chosen
            generated.append(block)
            if start + BLOCK < prompt_len + gen_len:
                forward(block, start, cache)  # commit: the block's clean keys/values stay
                forwards += 1
        return np.concatenate(generated, axis=1), forwards * batch  # per-row forwards, as on the JAX side

    run(2 * BLOCK)  # warm-up (eager PyTorch compiles nothing)
    start = time.perf_counter()
    tokens, forwards = run(gen_len)
    return time.perf_counter() - start, tokens, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--strategy", default="low_confidence_dynamic", choices=unmasking.STRATEGIES)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.prompt_len % BLOCK or args.gen_len % BLOCK:
        raise SystemExit(f"--prompt-len and --gen-len must be multiples of the block size {BLOCK}")

    machine = benchlib.machine()
    device = machine["device"]
    print(f"device {device}; greedy {args.strategy} (threshold {args.threshold}), block {BLOCK}, "
          f"prompt {args.prompt_len}, generation {args.gen_len}, fp32")
    header = (f"{'config':>6} {'batch':>5} {'side':>8} {'seconds':>8} {'tok/s':>8} "
              f"{'tok/fwd':>7} {'speed-up':>8} {'same tokens':>11}")
    print(header)
    print("-" * len(header))
    records: list[dict[str, Any]] = []
    for name in args.configs:
        config = model_config(name)
        model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
        cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id,
                             strategy=args.strategy, threshold=args.threshold,
                             max_new_tokens=args.gen_len, temperature=0.0)
        for batch in args.batches:
            prompts = np.random.default_rng(batch).integers(0, config.vocab_size - 3,
                                                            (batch, args.prompt_len))
            runs = {"jax": jax_rollout(model, prompts, cfg)}
            if not args.no_torch:
                runs["torch"] = torch_rollout(model, prompts, cfg, args.gen_len)
            for side, (seconds, tokens, forwards) in runs.items():
                speedup = runs["torch"][0] / seconds if "torch" in runs else float("nan")
                same = float(np.mean(tokens == runs["torch"][1])) if "torch" in runs else float("nan")
                tok_per_fwd = tokens.size / max(1, forwards)
                records.append({"config": name, "batch": batch, "side": side, "seconds": seconds,
                                "tokens_per_s": tokens.size / seconds,
                                "tokens_per_forward": tok_per_fwd, "speedup_vs_torch": speedup,
                                "same_tokens_as_torch": same, "prompt_len": args.prompt_len,
                                "gen_len": args.gen_len, "strategy": args.strategy,
                                **machine})
                print(f"{name:>6} {batch:>5} {side:>8} {seconds:>8.2f} {tokens.size / seconds:>8.1f} "
                      f"{tok_per_fwd:>7.2f} {speedup if side == 'jax' else 1.0:>7.2f}x {same:>11.3f}",
                      flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

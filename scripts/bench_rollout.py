"""Rollout throughput: the compiled JAX decoder against a PyTorch reference in the same process.

    python scripts/bench_rollout.py [--workload uniform|longtail] [--configs tiny 100m]
        [--batches 1 8 32] [--prompt-len 128] [--gen-len 512] [--slots 32] [--repeats 2]
        [--strategy low_confidence_dynamic] [--threshold 0.9] [--json out.json]

Workloads (greedy, blocks of 4 aligned at position 0, the unmasking rule of
:mod:`dirl_jax.rollout.unmasking`, no stop tokens):

* ``uniform``: ``batch`` random prompts of ``--prompt-len`` tokens, each decoding exactly
  ``--gen-len`` new tokens; one call per batch size.
* ``longtail``: 64 prompts of 64-256 tokens whose responses end at long-tailed lengths: each
  row's ``max_new_tokens`` is drawn log-normal (median ``--gen-len / 8``, sigma 1, clipped to
  ``[4, --gen-len]``) from a fixed seed and passed to the engine as that row's own limit, so every
  side decodes the same tokens. Decoded over ``--slots`` slots.
* ``heldout``: a trained run's own model (``--run DIR``: its ``export/``) on the held-out
  problems it reported (``DIR/heldout.jsonl``, chat prompts, its stop tokens, up to
  ``--gen-len`` new tokens): forwards per token of real, confident decoding.

Sides: ``engine`` (continuous batching: a finished row's slot takes the next prompt; one side per
``--commits`` mode, ``engine`` for ``auto``, else ``fused`` / ``separate``), ``static``
(the same engine in static batches of ``--slots`` rows, a batch ending with its longest row) and
``torch``: transformers' Qwen3 decoding block by block with a ``DynamicCache`` (denoising forwards
cropped off the cache, one commit forward per block kept), the rows of a batch in lock step until
its longest row ends. Each side runs once to warm up (compilation excluded), then ``--repeats``
times, the sides alternating (A B C A B C ...); the table shows the best run and whether other
processes took CPU meanwhile (``busy``, :func:`benchlib.alternate`), and JSON records every run's
seconds. Tokens/s counts the tokens each row was asked for (whole blocks), the same
on every side; forwards count one per row per forward (without the prefill). JSON records the
engine's KV-cache allocation (``cache_bytes``: slots x capacity, fp32) and the bytes one token's
keys and values take (``cache_bytes_per_token``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import benchlib
import numpy as np
from bench_train_step import CONFIGS, model_config
from flax import nnx

from dirl_jax.model import SDARForCausalLM
from dirl_jax.rollout import unmasking
from dirl_jax.rollout.decoder import PROMPT_BUCKET, capacity_for, decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig

BLOCK = 4
LONGTAIL_PROMPTS = 64


def heldout_prompts(run_dir: str) -> tuple[list[list[int]], tuple[int, ...]]:
    """The chat prompts of a run's held-out problems and its tokenizer's stop ids."""
    import json

    from dirl_jax.data.sft import encode_prompt
    from dirl_jax.data.tokenizer import load_tokenizer, stop_token_ids
    tokenizer = load_tokenizer(os.path.join(run_dir, "export"))
    with open(os.path.join(run_dir, "heldout.jsonl"), encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    prompts = [encode_prompt([{"role": "user", "content": q}], tokenizer) for q in questions]
    return prompts, stop_token_ids(tokenizer)


def workload(name: str, config: Any, batch: int, prompt_len: int, gen_len: int
             ) -> tuple[list[list[int]], list[int]]:
    """Prompts and each row's number of new tokens (whole blocks after the prompt)."""
    rng = np.random.default_rng(batch if name == "uniform" else 0)
    if name == "uniform":
        return rng.integers(0, config.vocab_size - 3, (batch, prompt_len)).tolist(), [gen_len] * batch
    lengths = rng.integers(64, 257, LONGTAIL_PROMPTS)
    prompts = [rng.integers(0, config.vocab_size - 3, n).tolist() for n in lengths]
    limits = np.clip(np.round(rng.lognormal(np.log(gen_len / 8), 1.0, LONGTAIL_PROMPTS)), BLOCK, gen_len)
    return prompts, [int(x) for x in limits]


def decoded_tokens(prompts: list[list[int]], limits: list[int]) -> int:
    """Tokens a row decodes: whole blocks from its prompt's partial block to its limit."""
    return sum(-(-(len(p) + n) // BLOCK) * BLOCK - len(p) for p, n in zip(prompts, limits))


def jax_side(model: SDARForCausalLM, prompts: list[list[int]], limits: list[int] | None,
             cfg: SamplingConfig, slots: int, continuous: bool, commit: str = "auto",
             pad_token_id: int = 0) -> Callable[[], tuple[int, list]]:
    def run() -> tuple[int, list]:
        results = decode_prompts(model, prompts, cfg, slots=slots, continuous=continuous,
                                 max_new_tokens=limits, commit=commit, pad_token_id=pad_token_id)
        return sum(r["num_forwards"] - 1 for r in results), [r["token_ids"] for r in results]
    return run


def torch_side(model: SDARForCausalLM, prompts: list[list[int]], limits: list[int],
               cfg: SamplingConfig, slots: int) -> Callable[[], tuple[int, list]]:
    """transformers' Qwen3 in lock-step batches of ``slots`` rows of equal prompt length groups."""
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
    neg = torch.finfo(torch.float32).min

    def forward(ids: np.ndarray, starts: np.ndarray, valid: np.ndarray, cache: DynamicCache
                ) -> np.ndarray:
        """``ids [rows, n]`` at per-row positions ``starts + i`` against the cache, whose slot
        ``j`` of row ``r`` holds position ``j - offset[r]`` (rows are left-padded)."""
        rows, n = ids.shape
        past = cache.get_seq_length()
        positions = torch.from_numpy(starts)[:, None] + torch.arange(n)[None]
        q_block = positions // BLOCK
        slot_pos = torch.arange(past + n)[None] - torch.from_numpy(valid)[:, None]
        kv_block = slot_pos // BLOCK
        ok = (kv_block[:, None, :] <= q_block[:, :, None]) & (slot_pos[:, None, :] >= 0)
        mask = torch.where(ok, 0.0, neg)[:, None]
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids).long(), position_ids=positions,
                     attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits.float().numpy()

    def run_batch(batch: list[int]) -> tuple[int, list]:
        """Rows left-padded to a common prompt end, decoded block by block in lock step."""
        lens = np.array([len(prompts[i]) for i in batch])
        first = lens // BLOCK * BLOCK                    # the first decoded block of each row
        ends = np.array([-(-(len(prompts[i]) + limits[i]) // BLOCK) * BLOCK for i in batch])
        pad = first.max() - first                        # left padding so blocks line up
        width = first.max()
        ids = np.zeros((len(batch), width), np.int64)
        for r, i in enumerate(batch):
            ids[r, pad[r]:] = prompts[i][:first[r]]
        cache = DynamicCache(config=hf_config)
        if width:
            forward(ids, -pad, pad, cache)
        blocks = [[] for _ in batch]
        forwards = 0
        for k in range(int(((ends - first) // BLOCK).max())):
            starts = first + k * BLOCK
            block = np.full((len(batch), BLOCK), cfg.mask_token_id)
            for r, i in enumerate(batch):  # the prompt's partial block counts as decided
                tail = prompts[i][starts[r]:starts[r] + BLOCK]
                block[r, :len(tail)] = tail
            masked = (starts[:, None] + np.arange(BLOCK)) >= lens[:, None]
            while masked.any():
                logits = forward(block, starts, pad, cache)
                cache.crop(-BLOCK)
                forwards += len(batch)
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                chosen = np.asarray(unmasking.select_positions(
                    probs.max(-1), masked, strategy=cfg.strategy, block_size=BLOCK,
                    steps=cfg.denoising_steps, threshold=cfg.threshold))
                block = np.where(chosen, probs.argmax(-1), block)
                masked &= ~chosen
            for r in range(len(batch)):
                if starts[r] < ends[r]:
                    blocks[r].append(block[r][max(0, lens[r] - starts[r]):])
            forward(block, starts, pad, cache)  # commit: the block's clean keys/values stay
            forwards += len(batch)
        return forwards, [np.concatenate(b).tolist() for b in blocks]

    def run() -> tuple[int, list]:
        forwards, tokens = 0, []
        for lo in range(0, len(prompts), slots):
            f, t = run_batch(list(range(lo, min(lo + slots, len(prompts)))))
            forwards, tokens = forwards + f, tokens + t
        return forwards, tokens
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="uniform", choices=["uniform", "longtail", "heldout"])
    parser.add_argument("--run", default=None, help="heldout: a trained run directory")
    parser.add_argument("--commits", nargs="+", default=["auto"], choices=["auto", "fused", "separate"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="uniform only")
    parser.add_argument("--slots", type=int, default=32, help="longtail and heldout")
    parser.add_argument("--prompt-len", type=int, default=128, help="uniform only")
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--strategy", default="low_confidence_dynamic", choices=unmasking.STRATEGIES)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.prompt_len % BLOCK or args.gen_len % BLOCK:
        raise SystemExit(f"--prompt-len and --gen-len must be multiples of the block size {BLOCK}")

    machine = benchlib.machine()
    print(f"device {machine['device']}; {args.workload}, greedy {args.strategy} (threshold "
          f"{args.threshold}), block {BLOCK}, generation <= {args.gen_len}, fp32")
    header = (f"{'config':>6} {'slots':>5} {'side':>7} {'best s':>7} {'median':>7} {'tok/s':>8} "
              f"{'fwd/tok':>7} {'vs static':>9} {'vs torch':>8} {'same tok':>8} {'busy':>5}")
    print(header)
    print("-" * len(header))
    records: list[dict[str, Any]] = []
    if args.workload == "heldout":
        if not args.run:
            raise SystemExit("--workload heldout needs --run DIR (a trained run directory)")
        args.configs, args.no_torch = [os.path.basename(os.path.normpath(args.run))], True
    for name in args.configs:
        if args.workload == "heldout":
            from dirl_jax.model.hf_io import load_model
            model, config = load_model(os.path.join(args.run, "export"), "float32")
            prompts, stops = heldout_prompts(args.run)
        else:
            config = model_config(name)
            model, stops = SDARForCausalLM(config, rngs=nnx.Rngs(0)), ()
        cfg = SamplingConfig(block_size=config.block_size, mask_token_id=config.mask_token_id,
                             strategy=args.strategy, threshold=args.threshold,
                             max_new_tokens=args.gen_len, temperature=0.0, stop_ids=stops)
        cases = {"uniform": [(batch, batch) for batch in args.batches],
                 "longtail": [(LONGTAIL_PROMPTS, args.slots)],
                 "heldout": [(0, args.slots)]}[args.workload]
        for batch, slots in cases:
            limits: list[int] | None = None
            if args.workload != "heldout":
                prompts, limits = workload(args.workload, config, batch, args.prompt_len,
                                           args.gen_len)
            sides = {("engine" if commit == "auto" else commit):
                     jax_side(model, prompts, limits, cfg, slots, True, commit,
                              config.pad_token_id or 0) for commit in args.commits}
            if args.workload == "longtail":
                sides["static"] = jax_side(model, prompts, limits, cfg, slots, False)
            for run in sides.values():
                run()  # compiles every admission size and window bucket the workload uses
            if not args.no_torch:
                torch_side(model, prompts[:2], [2 * BLOCK] * 2, cfg, slots)()  # warm-up
                sides["torch"] = torch_side(model, prompts, limits, cfg, slots)
            timed = benchlib.alternate(sides, args.repeats)
            bucket = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
            token_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads
                           * config.head_dim * 4)  # keys and values of one token, fp32
            cache_bytes = min(slots, len(prompts)) * (capacity_for(bucket, cfg) + BLOCK) * token_bytes
            tokens = (decoded_tokens(prompts, limits) if limits is not None  # stops end rows early
                      else sum(len(t) for t in timed[next(iter(timed))]["output"][1]))
            best = {side: t["min"] for side, t in timed.items()}
            reference = timed["torch"]["output"][1] if "torch" in timed else None
            for side, t in timed.items():
                forwards, outputs = t["output"]
                same = (float(np.mean([a == b for a, b in zip(outputs, reference)]))
                        if reference is not None else float("nan"))
                ratio = {k: best[k] / t["min"] if k in best else float("nan")
                         for k in ("static", "torch")}
                records.append({"workload": args.workload, "engine": side, "config": name,
                                "slots": slots, "prompts": len(prompts), **benchlib.timing_fields(t),
                                "generated_tokens": tokens, "tokens_per_s": tokens / t["min"],
                                "forwards": forwards, "speedup_vs_static": ratio["static"],
                                "speedup_vs_torch": ratio["torch"], "same_tokens_as_torch": same,
                                "strategy": args.strategy,
                                "cache_bytes": cache_bytes if side != "torch" else None,
                                "cache_bytes_per_token": token_bytes,
                                "threshold": args.threshold, "gen_len": args.gen_len, **machine})
                print(f"{name:>6} {slots:>5} {side:>7} {t['min']:>7.2f} {t['median']:>7.2f} "
                      f"{tokens / t['min']:>8.1f} {forwards / tokens:>7.2f} {ratio['static']:>8.2f}x "
                      f"{ratio['torch']:>7.2f}x {same:>8.3f} {'yes' if t['busy'] else 'no':>5}",
                      flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

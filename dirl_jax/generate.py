"""``python -m dirl_jax.generate``: block-diffusion generation from the command line.

    python -m dirl_jax.generate --model DIR_OR_HUB_ID --prompt "What is 2+3?" [--raw]
        [--strategy low_confidence_dynamic] [--threshold 0.9] [--steps N] [--block-size B]
        [--max-new-tokens 256] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0]

The CLI streams the response block by block as blocks are completed, then prints the number of
tokens, denoising steps, tokens per step and the finish reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from dirl_jax.rollout.decoder import generate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dirl_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF SDAR checkpoint directory or hub id")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--raw", action="store_true",
                        help="send the prompt as is instead of DiRL's rollout chat prompt")
    parser.add_argument("--strategy", default="low_confidence_dynamic")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="default: bf16 on accelerators, fp32 on CPU")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from dirl_jax.data.tokenizer import load_tokenizer, rollout_prompt, stop_token_ids
    from dirl_jax.model.hf_io import load_model

    args = parse_args(argv)
    model, _ = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    text = args.prompt if args.raw else rollout_prompt(args.prompt)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    stop_ids = stop_token_ids(tokenizer)

    def print_block(prompt_index: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                    completed: np.ndarray) -> None:
        if prompt_index[0] == 0 and completed[0]:
            new = [int(t) for t, p in zip(tokens[0], positions[0]) if p >= len(prompt)]
            sys.stdout.write(tokenizer.decode(new))
            sys.stdout.flush()

    result = generate(model, [prompt], block_size=args.block_size, strategy=args.strategy,
                      steps=args.steps, threshold=args.threshold,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids, seed=args.seed,
                      on_block=print_block)[0]
    print(f"\n[{len(result['token_ids'])} tokens, {result['num_steps']} steps, "
          f"{result['tokens_per_step']:.2f} tokens/step, finish: {result['finish_reason']}]")


if __name__ == "__main__":
    main()

"""``python -m dirl_jax.generate``: block-diffusion generation from the command line.

    python -m dirl_jax.generate --model RUN_DIR_OR_HF_DIR_OR_HUB_ID --prompt "What is 7 plus 5?"
        [--template chat|rollout|raw] [--show-steps]
        [--strategy low_confidence_dynamic] [--threshold 0.9] [--steps N]
        [--max-new-tokens 256] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0]

``--model`` is resolved like every model path (a training run directory means its export). The
prompt goes through the model's own chat template (``chat``, the default), DiRL's RL rollout
template with its step-by-step / \\boxed{} instruction (``rollout``), or as is (``raw``). The
response streams block by block as blocks complete, decoded without special tokens; then the
number of tokens, denoising steps, tokens per step and the finish reason. ``--show-steps`` adds
each token with the denoising step that unmasked it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from dirl_jax.cli import debugging, fail, one_line_errors
from dirl_jax.rollout.decoder import generate

TEMPLATES = ("chat", "rollout", "raw")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dirl_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="training run directory, HF SDAR directory or hub id 'org/name'")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--template", choices=TEMPLATES, default="chat",
                        help="chat: the model's chat template (default); rollout: DiRL's RL "
                             "rollout prompt; raw: the text as is")
    parser.add_argument("--show-steps", action="store_true",
                        help="print each generated token with the step that unmasked it")
    parser.add_argument("--strategy", default="low_confidence_dynamic")
    parser.add_argument("--threshold", type=float, default=0.9, help="in [0, 1]")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps per block, in [1, block size] (default: block size)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="default: bf16 on accelerators, fp32 on CPU")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    return parser.parse_args(argv)


def prompt_text(tokenizer, prompt: str, template: str) -> str:
    """``prompt`` through ``template`` (see :data:`TEMPLATES`)."""
    from dirl_jax.data.tokenizer import rollout_prompt
    if template == "rollout":
        return rollout_prompt(prompt)
    if template == "raw":
        return prompt
    if not tokenizer.chat_template:
        fail("--template chat: the model's tokenizer has no chat template; use --template raw "
             "(the text as is) or --template rollout")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def step_lines(tokenizer, token_ids: Sequence[int], step_map: Sequence[int]) -> list[str]:
    """``step  token`` for every generated token, in position order."""
    return [f"{int(step):>5}  {tokenizer.decode([int(t)])!r}" for t, step in zip(token_ids, step_map)]


def main(argv: Sequence[str] | None = None) -> None:
    from dirl_jax.data.tokenizer import load_tokenizer, stop_token_ids
    from dirl_jax.model import load_model, resolve_model_dir

    args = parse_args(argv)
    with one_line_errors(args.verbose or debugging([]), errors=(ValueError,)):
        model_dir = resolve_model_dir(args.model)
        model, _ = load_model(model_dir, dtype=args.dtype)
        tokenizer = load_tokenizer(model_dir)
        prompt = tokenizer.encode(prompt_text(tokenizer, args.prompt, args.template),
                                  add_special_tokens=False)
        stop_ids = stop_token_ids(tokenizer)

        def print_block(prompt_index: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                        completed: np.ndarray) -> None:
            if prompt_index[0] == 0 and completed[0]:
                new = [int(t) for t, p in zip(tokens[0], positions[0]) if p >= len(prompt)]
                sys.stdout.write(tokenizer.decode(new, skip_special_tokens=True))
                sys.stdout.flush()

        result = generate(model, [prompt], strategy=args.strategy, steps=args.steps,
                          threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          stop_ids=stop_ids, seed=args.seed, on_block=print_block)[0]
    if args.show_steps:
        print("\n\n step  token")
        print("\n".join(step_lines(tokenizer, result["token_ids"], result["step_map"])))
    print(f"\n[{len(result['token_ids'])} tokens, {result['num_steps']} steps, "
          f"{result['tokens_per_step']:.2f} tokens/step, finish: {result['finish_reason']}]")


if __name__ == "__main__":
    main()

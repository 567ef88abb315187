"""Tokens the DiPO log-prob forward processes per trajectory: single-pass canvas vs one pass per round.

    python scripts/bench_dipo_canvas.py --model RUN_DIR/export [--num-prompts 64]
        [--strategy low_confidence_dynamic] [--threshold 0.9] [--max-new-tokens 32] [--json out.json]

Decodes held-out prompts of the built-in arithmetic task with the compiled engine, then counts,
per trajectory, the canvas slots of :func:`dirl_jax.dipo.pack_rounds` (clean stream once + one noisy
copy per needed (block, round)) against the original's layout (one unpadded two-stream forward of
2 x (prompt + response) tokens per round; the original also pads every row to 9,216 tokens).
"""

from __future__ import annotations

import argparse

import benchlib
import numpy as np

import dirl_jax
from dirl_jax import dipo
from dirl_jax.data import sft as sft_data
from dirl_jax.data import toy
from dirl_jax.data.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an SFT export of the toy task (RUN_DIR/export)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--strategies", nargs="+",
                        default=["low_confidence_static", "low_confidence_dynamic"])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, config = dirl_jax.load_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    records, _ = toy.builtin_split(12345, args.num_prompts, 0, max_operand=19)
    prompts = [sft_data.encode_prompt(r["messages"][:-1], tokenizer) for r in records]
    stop_ids = [tokenizer.convert_tokens_to_ids(toy.IM_END), tokenizer.pad_token_id]
    machine = benchlib.machine()
    print(f"device {machine['device']}; {args.num_prompts} toy prompts, block {config.block_size}")
    header = f"{'strategy':>24} {'rounds':>7} {'tok/step':>8} {'single-pass':>11} {'per-round':>9} {'saving':>7}"
    print(header)
    print("-" * len(header))
    records_out = []
    for strategy in args.strategies:
        results = dirl_jax.generate(model, prompts, strategy=strategy, threshold=args.threshold,
                                    max_new_tokens=args.max_new_tokens, temperature=1.0,
                                    stop_ids=stop_ids, seed=0)
        trajectories = [dipo.Trajectory(p, r["token_ids"], r["step_map"], r["length"])
                        for p, r in zip(prompts, results)]
        packed = dipo.pack_rounds(trajectories, block_size=config.block_size,
                                  mask_token_id=config.mask_token_id, row_length=4096)
        rounds = [len(dipo.expand_rounds(np.r_[[-1] * len(t.prompt), t.step_map], config.block_size))
                  for t in trajectories]
        per_round = np.array([2 * (len(t.prompt) + len(t.response)) * n
                              for t, n in zip(trajectories, rounds)])
        single = packed.tokens_per_trajectory
        record = {"strategy": strategy, "mean_rounds": float(np.mean(rounds)),
                  "tokens_per_step": float(np.mean([r["tokens_per_step"] for r in results])),
                  "single_pass_tokens": float(single.mean()), "per_round_tokens": float(per_round.mean()),
                  "saving": float(per_round.sum() / single.sum()), **machine}
        records_out.append(record)
        print(f"{strategy:>24} {record['mean_rounds']:>7.2f} {record['tokens_per_step']:>8.2f} "
              f"{record['single_pass_tokens']:>11.1f} {record['per_round_tokens']:>9.1f} "
              f"{record['saving']:>6.2f}x")
    benchlib.write_records(args.json, records_out)


if __name__ == "__main__":
    main()

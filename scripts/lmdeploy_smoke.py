"""GPU smoke test of the LMDeploy bridge against a live server (not run in CI: needs CUDA and a
full LMDeploy install with DiRL's step-map fork).

    scripts/lmdeploy_smoke.sh MODEL_OR_RUN_DIR [PORT]     # exports, launches, then runs this

Checks, on one GPU shared by JAX and the server: greedy outputs and step maps of the server equal
the in-process JAX engine on the same weights; a weight push (IPC, ``/update_weights``) of changed
weights changes the server's outputs to what the JAX engine gives for those weights; pushing the
original weights back restores the first outputs. Prints a table, writes JSON (``--json``)
including the weight-push throughput (GB/s).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchlib import machine, write_records
from dirl_jax.data.rl import render_prompt
from dirl_jax.data.tokenizer import load_tokenizer, stop_token_ids
from dirl_jax.model import load_model, parameter_shapes
from dirl_jax.rollout.engine import InProcessEngine
from dirl_jax.rollout.sampler import SamplingConfig
from torch_bridge.lmdeploy_client import LMDeployEngine
from torch_bridge.weight_push import IPCWeightPusher

QUESTIONS = ("What is 17 + 25?", "Compute 3 * (4 + 5).", "How many primes are below 20?",
             "Simplify 12/18.")


def agreement(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Fractions of prompts whose tokens / step maps are identical."""
    return {"tokens": float(np.mean([x["token_ids"] == y["token_ids"] for x, y in zip(a, b)])),
            "step_maps": float(np.mean([x["step_map"] == y["step_map"] for x, y in zip(a, b)]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the exported HF SDAR directory being served")
    parser.add_argument("--server", required=True)
    parser.add_argument("--strategy", default="low_confidence_dynamic")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model, config = load_model(args.model, "bfloat16")
    sampling = SamplingConfig(block_size=config.block_size, mask_token_id=config.mask_token_id,
                              strategy=args.strategy, threshold=args.threshold, temperature=0.0,
                              max_new_tokens=args.max_new_tokens, stop_ids=stop_token_ids(tokenizer))
    prompts = [tokenizer.encode(render_prompt(q), add_special_tokens=False) for q in QUESTIONS]
    local = InProcessEngine(model, pad_token_id=tokenizer.pad_token_id or 0)
    pusher = IPCWeightPusher(args.server, parameter_shapes(model), devices=("cuda:0",))
    server = LMDeployEngine(args.server, tokenizer=tokenizer, served=sampling, weight_pusher=pusher)

    graphdef, original = nnx.split(model, nnx.Param)
    first = server.generate(prompts, sampling, seed=0)
    record = {"initial": agreement(first, local.generate(prompts, sampling, seed=0))}
    # changed weights: the output head's rows permuted changes every greedy choice
    changed_model = nnx.merge(graphdef, jax.tree.map(jnp.copy, original))
    head = changed_model.lm_head.weight
    head.set_value(head.get_value()[np.random.default_rng(0).permutation(head.shape[0])])
    changed = nnx.state(changed_model, nnx.Param)
    push = pusher.push(changed)
    local.update_weights(changed)
    after = server.generate(prompts, sampling, seed=0)
    record["changed"] = {**agreement(after, local.generate(prompts, sampling, seed=0)),
                         "outputs_changed": float(np.mean([x["token_ids"] != y["token_ids"]
                                                           for x, y in zip(first, after)]))}
    record["push"] = push
    pusher.push(original)
    record["restored"] = agreement(first, server.generate(prompts, sampling, seed=0))
    print(f"{'phase':<10} | {'tokens equal':>12} | {'step maps equal':>15} | note")
    for phase in ("initial", "changed", "restored"):
        note = (f"outputs changed on {record['changed']['outputs_changed']:.0%} of prompts"
                if phase == "changed" else "")
        print(f"{phase:<10} | {record[phase]['tokens']:>12.0%} | {record[phase]['step_maps']:>15.0%} | {note}")
    print(f"weight push: {push['bytes'] / 1e9:.2f} GB in {push['seconds']:.2f} s = "
          f"{push['gb_per_s']:.2f} GB/s ({push['segments']} segments)")
    write_records(args.json, [{**record, **machine(), "model": args.model}])


if __name__ == "__main__":
    main()

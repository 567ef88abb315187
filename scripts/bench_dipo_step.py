"""DiPO update throughput: one PPO micro-batch on the single-pass multi-round canvas against a
PyTorch reference with the original's layout (one two-stream forward per round).

    python scripts/bench_dipo_step.py [--configs tiny 100m] [--trajectories 4] [--prompt-len 64]
        [--response-len 192] [--repeats 3] [--json out.json]

Workload: ``--trajectories`` responses of ``--response-len`` tokens after random prompts of
``--prompt-len`` tokens, with step maps drawn from a fixed seed: every block of 4 takes 1, 2, 3 or 4
denoising steps with probabilities ``STEPS_PER_BLOCK`` (mean 1.47 steps per block), its tokens
spread over those steps. Advantages are fixed non-zero values, old log-probs each side's current
policy minus 0.05. Both sides compute the same update (token-mean loss over the micro-batch, one
AdamW step); the table prints each side's sum of old log-probs (the two forwards agree) and first
loss (the two objectives agree).

* ``dirl_jax``: :func:`dirl_jax.dipo.pack_rounds` lays every trajectory out once (clean stream plus
  one noisy copy of each needed (block, round)) in one canvas row; one forward and backward of
  :func:`dirl_jax.dipo.dipo_objective` (block-sparse attention, the vocabulary only at scored
  tokens), then the AdamW update.
* ``torch``: transformers' Qwen3, for every (trajectory, real round) one ``[noisy | clean]``
  forward of ``2 x (prompt + response)`` tokens with the dense block-diffusion mask (SDPA), the
  vocabulary head at that round's scored tokens only, backward per round (gradients accumulate),
  then AdamW. The original does more: it pads every row to 9,216 tokens, runs fake rounds up to
  the block size, projects the vocabulary at every still-masked token of a round (not only the
  scored ones) and takes an AdamW step per micro-batch. Its attention is FlexAttention's
  block-sparse kernel on GPU; on CPU FlexAttention has no backward, so the reference uses the
  dense mask (SDPA), the part of its work that the original would do faster.

Throughput counts the scored response tokens per second. Sides warm up once, then alternate
(``--repeats`` each, :func:`benchlib.alternate`); the table shows best and median seconds, the
canvas tokens each side processes and whether other processes took CPU meanwhile (``busy``,
:func:`benchlib.alternate`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_train_step import BLOCK_SIZE, CONFIGS, LEARNING_RATE, model_config
from flax import nnx

from dirl_jax import canvas as canvas_lib
from dirl_jax import dipo
from dirl_jax.model import SDARConfig, SDARForCausalLM

STEPS_PER_BLOCK = (0.65, 0.25, 0.08, 0.02)  # P(a block takes 1, 2, 3, 4 denoising steps)
OLD_LOGP_SHIFT = 0.05
LOSS = dipo.LossConfig()


def step_map(rng: np.random.Generator, length: int) -> np.ndarray:
    """1-based decoding steps of a response of ``length`` tokens (a multiple of the block size):
    blocks in order, each taking k steps (drawn from ``STEPS_PER_BLOCK``) over its tokens."""
    steps, first = [], 1
    for _ in range(length // BLOCK_SIZE):
        k = int(rng.choice(len(STEPS_PER_BLOCK), p=STEPS_PER_BLOCK)) + 1
        owner = np.concatenate([np.arange(k), rng.integers(0, k, BLOCK_SIZE - k)])  # each step >= 1 token
        steps.append(first + rng.permutation(owner))
        first += k
    return np.concatenate(steps)


def trajectories(config: SDARConfig, count: int, prompt_len: int, response_len: int
                 ) -> list[dipo.Trajectory]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        prompt = rng.integers(0, config.vocab_size - 3, prompt_len).tolist()
        response = rng.integers(0, config.vocab_size - 3, response_len).tolist()
        out.append(dipo.Trajectory(prompt, response, step_map(rng, response_len).tolist(),
                                   response_len, advantage=(-1.0) ** i * (0.5 + 0.25 * i)))
    return out


def jax_step(model: SDARForCausalLM, trajs: list[dipo.Trajectory]) -> tuple[Callable[[], Any], int]:
    """The jitted DiPO update on one canvas row; returns it and the canvas length."""
    sizes = [dipo.pack_rounds([t], block_size=BLOCK_SIZE, mask_token_id=model.config.mask_token_id,
                              row_length=1 << 20).tokens_per_trajectory[0] for t in trajs]
    row_length = -(-sum(sizes) // 256) * 256
    packed = dipo.pack_rounds(trajs, block_size=BLOCK_SIZE, mask_token_id=model.config.mask_token_id,
                              row_length=row_length)
    num_scored = len(packed.score_slot)
    zeros = np.zeros(num_scored, np.float32)
    batch = dipo.micro_batches(packed, trajs, zeros, rows=1, scored_per_row=num_scored)[0]
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    current = jax.jit(lambda p, b: dipo.score_tokens(nnx.merge(graphdef, p), b, temperature=1.0)[0])
    batch["old_logp"] = current(params, batch) - OLD_LOGP_SHIFT
    run_old_sum = float(jnp.sum(batch["old_logp"] * batch["loss_mask"]))
    tx = optax.adamw(LEARNING_RATE)
    state = {"params": params, "opt": tx.init(params)}

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            return dipo.dipo_objective(nnx.merge(graphdef, params), batch, LOSS, temperature=1.0)[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def run() -> float:
        state["params"], state["opt"], value = step(state["params"], state["opt"])
        return float(value)

    run.old_logp_sum = run_old_sum
    return run, int(row_length)


def torch_step(model: SDARForCausalLM, trajs: list[dipo.Trajectory]) -> tuple[Callable[[], Any], int]:
    """The original's layout: one two-stream forward per (trajectory, real round)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from torch_bridge import to_torch_state_dict

    torch.set_num_threads(os.cpu_count() or 1)
    config = model.config
    hf_config = Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                               if k not in ("architectures", "model_type", "auto_map")})
    hf_config._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(hf_config)
    hf.load_state_dict(to_torch_state_dict(model, torch.float32), strict=True)
    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LEARNING_RATE)
    neg = torch.finfo(torch.float32).min

    rounds, canvas_tokens = [], 0
    for t in trajs:  # every real round of every trajectory: its 2L canvas and scored tokens
        tokens = np.asarray(list(t.prompt) + list(t.response), np.int32)[None]
        full_map = np.r_[np.full(len(t.prompt), -1), np.asarray(t.step_map)]
        positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
        for p_mask, masked in dipo.expand_rounds(full_map, BLOCK_SIZE):
            noisy = np.where(masked, config.mask_token_id, tokens)
            canvas, _ = canvas_lib.two_stream_canvas(tokens, noisy, positions,
                                                     np.zeros_like(tokens), BLOCK_SIZE)
            allowed = torch.from_numpy(np.array(canvas_lib.dense_mask(canvas)))
            rounds.append(dict(
                ids=torch.from_numpy(np.array(canvas.tokens)).long(),
                pos=torch.from_numpy(np.array(canvas.positions)).long(),
                mask=torch.where(allowed, 0.0, neg)[:, None],
                slots=torch.from_numpy(np.flatnonzero(p_mask)).long(),  # noisy copy = first L
                targets=torch.from_numpy(tokens[0, p_mask]).long(),
                advantage=float(t.advantage)))
            canvas_tokens += int(canvas.tokens.shape[1])
    scored = sum(len(r["slots"]) for r in rounds)
    head = hf.lm_head.weight

    def logp_of(r: dict[str, Any]) -> Any:
        hidden = hf.model(input_ids=r["ids"], position_ids=r["pos"],
                          attention_mask=r["mask"]).last_hidden_state
        logits = hidden[0, r["slots"]] @ head.T
        return torch.log_softmax(logits.float(), -1).gather(-1, r["targets"][:, None])[:, 0]

    with torch.no_grad():
        old = [logp_of(r) - OLD_LOGP_SHIFT for r in rounds]
    c = LOSS.log_ratio_clamp

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for r, old_logp in zip(rounds, old):
            logp = logp_of(r)
            ratio = torch.exp(torch.clamp(logp - old_logp, -c, c))
            clipped = torch.clamp(ratio, 1 - LOSS.eps_low, 1 + LOSS.eps_high)
            surrogate = torch.minimum(ratio * r["advantage"], clipped * r["advantage"])
            loss = -surrogate.sum() / scored  # the token mean over the micro-batch
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total

    run.old_logp_sum = float(sum(o.sum() for o in old))
    return run, canvas_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.prompt_len % BLOCK_SIZE or args.response_len % BLOCK_SIZE:
        raise SystemExit(f"--prompt-len and --response-len must be multiples of the block size {BLOCK_SIZE}")

    machine = benchlib.machine()
    print(f"device {machine['device']}; fp32; {args.trajectories} trajectories of "
          f"{args.prompt_len} + {args.response_len} tokens, block {BLOCK_SIZE}")
    header = (f"{'config':>6} {'side':>9} {'canvas tok':>10} {'best s':>7} {'median':>7} "
              f"{'scored tok/s':>12} {'vs torch':>8} {'sum old logp':>12} {'first loss':>11} {'busy':>5}")
    print(header)
    print("-" * len(header))
    records = []
    for name in args.configs:
        config = model_config(name)
        model = SDARForCausalLM(config, rngs=nnx.Rngs(0))
        trajs = trajectories(config, args.trajectories, args.prompt_len, args.response_len)
        scored = args.trajectories * args.response_len
        sides, canvas = {}, {}
        sides["dirl_jax"], canvas["dirl_jax"] = jax_step(model, trajs)
        sides["torch"], canvas["torch"] = torch_step(model, trajs)
        first_loss = {side: run() for side, run in sides.items()}
        timed = benchlib.alternate(sides, args.repeats)
        for side, t in timed.items():
            ratio = timed["torch"]["min"] / t["min"]
            records.append({"config": name, "side": side, "trajectories": args.trajectories,
                            "prompt_len": args.prompt_len, "response_len": args.response_len,
                            "canvas_tokens": canvas[side], **benchlib.timing_fields(t),
                            "scored_tokens": scored, "scored_tokens_per_s": scored / t["min"],
                            "speedup_vs_torch": ratio, "first_loss": first_loss[side],
                            "old_logp_sum": sides[side].old_logp_sum,
                            **machine})
            print(f"{name:>6} {side:>9} {canvas[side]:>10} {t['min']:>7.2f} {t['median']:>7.2f} "
                  f"{scored / t['min']:>12.1f} {ratio:>7.2f}x {sides[side].old_logp_sum:>12.3f} "
                  f"{first_loss[side]:>11.6f} "
                  f"{'yes' if t['busy'] else 'no':>5}", flush=True)
    benchlib.write_records(args.json, records)


if __name__ == "__main__":
    main()

"""A naive block-diffusion decoder: recomputes the whole sequence with a dense mask every step.

No KV cache and a host round trip per step, so it is slow; it is the readable reference that
the compiled rollout engine (:mod:`dirl_jax.rollout.sampler`) is tested against.
Blocks are aligned to absolute position 0 (the prompt's partial last block is completed first);
each step commits masked positions of the current block by greedy confidence with the rules of
:mod:`dirl_jax.rollout.unmasking`. A sequence stops after the block in which a
stop token or ``max_new_tokens`` is reached; the whole final block is returned.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dirl_jax import canvas as canvas_lib
from dirl_jax.rollout import unmasking


@functools.partial(nnx.jit, static_argnames=("block_size",))
def _greedy_step(model, tokens: jax.Array, segment_ids: jax.Array, block_size: int):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    canvas = canvas_lib.block_causal_canvas(tokens, positions, segment_ids, block_size)
    probs = jax.nn.softmax(model(canvas=canvas, attn_impl="reference").astype(jnp.float32), axis=-1)
    return jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)


def naive_generate(model, prompts: Sequence[Sequence[int]], *, block_size: int, mask_token_id: int,
                   pad_token_id: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
                   strategy: str = "low_confidence_static", steps: int | None = None,
                   threshold: float = 0.9) -> list[dict[str, list[int]]]:
    """Greedy block-diffusion decoding of a batch of prompts of any lengths.

    Returns per prompt ``token_ids`` (generated tokens, whole blocks) and ``step_map`` (1-based
    index of the step that committed each token; tokens committed together share it).
    """
    if strategy not in unmasking.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(unmasking.STRATEGIES)}")
    steps = block_size if steps is None else steps
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    total = int(((lengths.max() + max_new_tokens) // block_size + 2) * block_size)
    tokens = np.full((batch, total), pad_token_id, np.int32)
    step_map = np.zeros((batch, total), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
    block = lengths // block_size                 # current block of each row
    steps_taken = np.zeros(batch, np.int32)
    done = np.zeros(batch, bool)
    masked = np.zeros((batch, total), bool)

    def open_block(i: int) -> None:
        start = block[i] * block_size
        span = np.arange(start, start + block_size)
        fresh = span >= lengths[i]
        masked[i, span[fresh]] = True
        tokens[i, span[fresh]] = mask_token_id

    for i in range(batch):
        open_block(i)
    while not done.all():
        end = (block + 1) * block_size
        segment_ids = np.where(np.arange(total)[None, :] < end[:, None], 0, -1).astype(np.int32)
        sampled, confidence = jax.device_get(_greedy_step(model, jnp.asarray(tokens),
                                                          jnp.asarray(segment_ids), block_size))
        for i in np.flatnonzero(~done):
            span = slice(block[i] * block_size, end[i])
            chosen = np.asarray(unmasking.select_positions(
                confidence[i, span], masked[i, span], strategy=strategy, block_size=block_size,
                steps=steps, threshold=threshold))
            steps_taken[i] += 1
            idx = np.flatnonzero(chosen) + block[i] * block_size
            tokens[i, idx] = sampled[i, idx]
            step_map[i, idx] = steps_taken[i]
            masked[i, idx] = False
            if masked[i, span].any():
                continue
            generated = tokens[i, lengths[i]:end[i]]
            if np.isin(generated, stop_ids).any() or end[i] - lengths[i] >= max_new_tokens:
                done[i] = True
            else:
                block[i] += 1
                open_block(i)
    end = (block + 1) * block_size
    return [{"token_ids": tokens[i, lengths[i]:end[i]].tolist(),
             "step_map": step_map[i, lengths[i]:end[i]].tolist()} for i in range(batch)]

"""Block-diffusion unmasking rules: which masked positions of a block to commit in one denoising step.

A batched, jit-able JAX port of LMDeploy's ``UnmaskingProcessor`` strategies
(``lmdeploy/pytorch/strategies/dllm/unmasking.py``, identical from v0.10.1 to 0.18.0), with
``k = tokens_per_step(block_size, steps)``:

* ``low_confidence_static``: the ``min(k, #masked)`` masked positions of highest confidence.
* ``low_confidence_dynamic``: the masked position of highest confidence plus every masked position
  whose confidence is ``>= threshold`` (``steps`` unused).
* ``sequential``: the window of ``k`` consecutive positions starting at the first masked one,
  wrapping modulo the block; only the masked positions inside it (confidence unused).

Ties are broken deterministically towards the lowest index. LMDeploy breaks them by whatever
``torch.topk`` returns, which is unspecified (on CUDA) and not left-to-right (CPU torch picked index
2 of four equal scores), so on exactly tied confidences the chosen positions may differ from
LMDeploy's. LMDeploy also scores decided positions 0 instead of excluding them; that differs from
this module only if a masked confidence is exactly 0, where LMDeploy may commit fewer positions
(even none) while this module always commits ``min(k, #masked)`` (static) or at least one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "sequential")


def tokens_per_step(block_size: int, steps: int) -> int:
    """LMDeploy's ``k``: positions committed per step by the static and sequential rules."""
    if block_size < 1 or steps < 1:
        raise ValueError(f"block_size and steps must be >= 1, got block_size={block_size}, steps={steps}")
    return max(1, min(block_size // steps, block_size))


def select_positions(confidence: ArrayLike, masked: ArrayLike, *, strategy: str, block_size: int,
                     steps: int, threshold: ArrayLike) -> jax.Array:
    """Positions to commit this step, ``bool[..., block_size]``; always a subset of ``masked``.

    ``confidence`` (float) and ``masked`` (bool) have the same shape ``[..., block_size]``; the
    last axis is one block, leading axes are batch. At least one position is committed in every
    block that has a masked position. ``strategy``, ``block_size`` and ``steps`` must be static
    under ``jax.jit``; ``threshold`` may be traced and is compared in ``confidence``'s dtype (as
    LMDeploy compares a Python float with its float32 scores).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    k = tokens_per_step(block_size, steps)
    confidence = jnp.asarray(confidence)
    masked = jnp.asarray(masked, dtype=bool)
    if confidence.shape != masked.shape or confidence.shape[-1:] != (block_size,):
        raise ValueError(f"confidence {confidence.shape} and masked {masked.shape} must share a "
                         f"shape ending in block_size={block_size}")
    position = jnp.arange(block_size)

    if strategy == "sequential":
        # LMDeploy's window [first, first + k) wraps modulo the block, but no masked position lies
        # before the first one, so neither the wrapped part nor a lower bound can select anything.
        first = jnp.argmax(masked, axis=-1)[..., None]
        return masked & (position < first + k)

    if strategy == "low_confidence_dynamic":
        best = jnp.argmax(jnp.where(masked, confidence, -jnp.inf), axis=-1)[..., None]
        threshold = jnp.asarray(threshold, dtype=confidence.dtype)
        return masked & ((position == best) | (confidence >= threshold))

    # Static: rank = number of masked positions ahead (higher confidence, or equal and lower index).
    mine, other = confidence[..., :, None], confidence[..., None, :]
    ahead = (other > mine) | ((other == mine) & (position[None, :] < position[:, None]))
    rank = jnp.sum(ahead & masked[..., None, :], axis=-1)
    return masked & (rank < k)

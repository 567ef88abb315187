"""Reference attention: XLA einsums over a dense boolean mask, GQA without repeating K/V.

The ground truth every faster implementation is tested against. Memory is O(T * S) per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        *, scale: float | None = None) -> jax.Array:
    """Softmax attention with a boolean mask.

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``; ``num_heads`` is a multiple of
        ``num_kv_heads`` (grouped-query attention).
      mask: ``bool[batch, q_len, kv_len]``, True where the query may attend to the key.
      scale: logit scale, default ``head_dim ** -0.5``.

    Returns ``[batch, q_len, num_heads, head_dim]`` in ``v.dtype``. Logits and softmax are fp32;
    a query row with no visible key returns zeros.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    scale = head_dim ** -0.5 if scale is None else scale
    q_grouped = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k,
                        preferred_element_type=jnp.float32) * scale
    visible = mask[:, None, None, :, :]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(v.dtype)

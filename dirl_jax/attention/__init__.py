"""Attention over canvases: one entry point, implementations chosen by name or platform."""

from __future__ import annotations

import jax

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention.reference import reference_attention

IMPLEMENTATIONS = ("auto", "reference")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              q_canvas: canvas_lib.Canvas | None = None,
              kv_canvas: canvas_lib.Canvas | None = None,
              mask: jax.Array | None = None,
              impl: str = "auto") -> jax.Array:
    """Attention of ``q [B,T,H,D]`` over ``k, v [B,S,KV,D]``.

    The visibility comes either from canvases (``q_canvas`` and, for a KV cache, ``kv_canvas``)
    through :func:`dirl_jax.canvas.visible`, or from an explicit boolean ``mask [B,T,S]``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    if (mask is None) == (q_canvas is None):
        raise ValueError("pass exactly one of `mask` or `q_canvas`")
    if mask is None:
        mask = canvas_lib.dense_mask(q_canvas, kv_canvas)
    return reference_attention(q, k, v, mask)


__all__ = ["IMPLEMENTATIONS", "attention", "reference_attention"]

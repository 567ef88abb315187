"""What the schedule-driven kernel tests share: a kernel and the dense reference as jitted
``(q, k, v, d_out) -> (out, (dq, dk, dv))``, random inputs for a canvas pair, the comparison."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from canvases import random_qkv
from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import schedule as schedule_lib
from dirl_jax.attention.reference import reference_attention
from dirl_jax.canvas import Canvas

F32_TOL = dict(atol=2e-5, rtol=2e-5)
# Each interpret-mode program runs once: skipping XLA's backend optimizations cuts compile time ~35%.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def kernel_and_reference(kernel_fn: Callable, q_canvas: Canvas, kv_canvas: Canvas, q_tile: int,
                         kv_tile: int, scale: float | None = None, **kernel_kwargs):
    """``kernel_fn(q, k, v, schedule, q_tags, kv_tags, scale=..., **kernel_kwargs)`` and the
    reference over the canvas pair's dense mask, each with its vjp."""

    def kernel(q, k, v):
        schedule = schedule_lib.tile_schedule(q_canvas, kv_canvas, q_tile=q_tile, kv_tile=kv_tile)
        return kernel_fn(q, k, v, schedule, schedule_lib.canvas_tags(q_canvas),
                         schedule_lib.canvas_tags(kv_canvas), scale=scale, **kernel_kwargs)

    def reference(q, k, v):
        return reference_attention(q, k, v, canvas_lib.dense_mask(q_canvas, kv_canvas), scale=scale)

    def with_vjp(fn):
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(d_out)
        return jax.jit(run, compiler_options=FAST_COMPILE)

    return with_vjp(kernel), with_vjp(reference)


def assert_matches(got, expected, **tol) -> None:
    (out, grads), (ref_out, ref_grads) = got, expected
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               err_msg="out", **tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   err_msg=name, **tol)


def random_inputs(rng, q_canvas: Canvas, kv_canvas: Canvas, heads: int, kv_heads: int,
                  head_dim: int, dtype=jnp.float32):
    batch, q_len = q_canvas.shape
    q, k, v = random_qkv(rng, batch, q_len, kv_canvas.shape[1], heads, kv_heads, head_dim)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, d_out))

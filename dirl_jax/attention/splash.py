"""Splash attention (TPU) over stream-major canvases, with the mask computed inside the kernel.

A Splash mask must be static: a function of the query and key indices alone. On TPU a canvas row
is therefore laid out *stream-major*::

    [noisy round 1 (N) | ... | noisy round R (N) | clean (N)]

Every part has length ``N`` and holds the packed samples at the same offsets; each sample starts
at a multiple of the block size ``B`` and its positions restart at 0. With ``R = 1`` this is the
SFT two-stream mask, ``R > 1`` the multi-round DiPO layout, ``R = 0`` plain block-causal
attention. For index ``i`` let ``part(i) = i // N`` (``R`` is the clean part) and
``blk(i) = (i mod N) // B``. Then a query ``i`` sees a key ``j`` iff

* ``i // B == j // B`` (same part, same block: the block diagonal of every stream), or
* ``j`` is clean and ``blk(j) < blk(i)`` (the clean prefix),

and, with ``slot`` set, both lie in the same ``slot``-sized window of their part. Splash ANDs this
with segment-id equality, which together equals :func:`dirl_jax.canvas.dense_mask` of the
canvas built by :func:`stream_major_canvas`. Segment ids skip no tiles; fixed-size packing
(``slot``) makes the cross-sample tiles statically empty.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from dirl_jax.canvas import StreamMajorLayout

# Splash needs block_q % 128 == 0 with segment ids (dkv kernel) and block_kv_compute % 128 == 0.
_BLOCK_MULTIPLE = 128


class StreamMajorMask(splash_mask._ComputableMask):  # pylint: disable=protected-access
    """The :class:`StreamMajorLayout` mask as a Splash computable mask (no mask in memory)."""

    def __init__(self, layout: StreamMajorLayout):
        self.layout = layout
        super().__init__(shape=(layout.length, layout.length), mask_function=layout.visible)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamMajorMask):
            return NotImplemented
        return self.layout == other.layout

    def __hash__(self) -> int:
        return hash((type(self), self.layout))


@functools.lru_cache(maxsize=64)
def splash_kernel(layout: StreamMajorLayout, num_heads: int, block_q: int = 128,
                  block_kv: int = 128, interpret: bool = False) -> splash.SplashAttentionKernel:
    """The (cached) Splash kernel of a layout, forward and backward block sizes alike.

    The block tables are built in NumPy on the host, once per argument tuple.
    """
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if size < 1 or size % _BLOCK_MULTIPLE or layout.length % size:
            raise ValueError(f"{name} ({size}) must be a multiple of {_BLOCK_MULTIPLE} dividing "
                             f"the canvas length {layout.length}")
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv,
                              block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    mask = splash_mask.MultiHeadMask([StreamMajorMask(layout)] * num_heads)

    def build() -> splash.SplashAttentionKernel:
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)
    # Concrete mask-info arrays on the host even when first needed inside a trace under a mesh:
    # JAX's mesh and trace contexts are per thread, so a fresh thread builds them outside both
    # (in the trace a mesh of devices compiled for ahead of time, e.g. a TPU topology from a CPU
    # host, cannot run the eager conversion).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     layout: StreamMajorLayout, *, interpret: bool = False, block_q: int = 128,
                     block_kv: int = 128) -> jax.Array:
    """Splash attention over stream-major canvas rows (differentiable; GQA without repeating K/V).

    Args:
      q: ``[batch, T, heads, D]`` with ``T == layout.length``.
      k, v: ``[batch, T, kv_heads, D]``; ``heads`` is a multiple of ``kv_heads``.
      segment_ids: ``int[batch, T]``, the canvas segment ids (``-1`` = padding), equal in every
        part (as :func:`stream_major_canvas` lays them out).
      layout: the static layout of the rows.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      block_q, block_kv: kernel tile sizes, multiples of 128 dividing ``T``.

    Returns ``[batch, T, heads, D]`` in ``q.dtype``; padding rows are zeros. Logits are scaled by
    ``D ** -0.5``, as in :func:`dirl_jax.attention.reference.reference_attention`.

    Under ``jax.shard_map`` (batch sharded, heads and length whole per device) call it on the local
    shard with ``check_vma=False``: the Pallas kernels declare no varying mesh axes.
    """
    batch, length, num_heads, head_dim = q.shape
    if length != layout.length or k.shape[1] != length or v.shape[1] != length:
        raise ValueError(f"q, k, v must have length {layout.length} (the layout's), got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if num_heads % k.shape[2]:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({k.shape[2]})")
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must be shaped {(batch, length)}, got {segment_ids.shape}")
    kernel = splash_kernel(layout, num_heads, block_q, block_kv, interpret)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)  # padding (-1) is a segment of its own here

    def heads_major(x: jax.Array) -> jax.Array:  # [batch, T, heads, D] -> [batch, heads, T, D]
        return jnp.swapaxes(x, 1, 2)

    scaled_q = (q * head_dim ** -0.5).astype(q.dtype)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(
        heads_major(scaled_q), heads_major(k), heads_major(v), segment_ids)
    out = heads_major(out)
    return jnp.where((segment_ids >= 0)[:, :, None, None], out, 0).astype(q.dtype)


__all__ = ["StreamMajorMask", "splash_attention", "splash_kernel"]

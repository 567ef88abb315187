"""Tile schedules: which (q-tile, kv-tile) pairs of a canvas pair a block-sparse kernel computes.

Every sparse implementation works from the same exact block table
(:func:`dirl_jax.canvas.block_table`), computed on device from the canvas tags, so packed
segments, odd layouts and KV caches all skip exactly the tiles that are empty. This module turns
the table into per-row tile lists (the form kernels iterate over) and pads canvases and
activations to whole tiles (padding tokens carry segment ``-1``: they see nothing and nothing
sees them, so padding only ever adds empty tiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dirl_jax import canvas as canvas_lib
from dirl_jax.canvas import Canvas


@struct.dataclass
class TileLists:
    """For each tile of one axis, the non-empty tiles of the other axis.

    ``ids[b, r, :counts[b, r]]`` are the non-empty tiles in ascending order; entries past the
    count repeat the last listed id (``0`` for an empty row), so a kernel that prefetches them
    issues no new copy. ``kinds`` holds the matching ``TILE_*`` code (``TILE_EMPTY`` past the count).
    """

    ids: jax.Array  # int32[batch, rows, cols]
    kinds: jax.Array  # int32[batch, rows, cols]
    counts: jax.Array  # int32[batch, rows]


@struct.dataclass
class TileSchedule:
    """The block table of a (query canvas, key canvas) pair and its lists in both directions."""

    table: jax.Array  # int8[batch, q_tiles, kv_tiles]
    kv_of_q: TileLists  # for every q-tile, its non-empty kv-tiles (forward and dq)
    q_of_kv: TileLists  # for every kv-tile, the q-tiles that see it (dk and dv)
    q_tile: int = struct.field(pytree_node=False)
    kv_tile: int = struct.field(pytree_node=False)

    @property
    def num_nonempty(self) -> jax.Array:
        return jnp.sum(self.kv_of_q.counts)


def tile_lists(table: jax.Array) -> TileLists:
    """Non-empty entries of each row of ``table [batch, rows, cols]``, in ascending column order."""
    nonempty = table != canvas_lib.TILE_EMPTY
    cols = table.shape[-1]
    # A stable sort on "is empty" moves the non-empty columns first, keeping their order.
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)
    slot = jnp.arange(cols, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    valid = slot < counts[..., None]
    ids = jnp.where(valid, order, jnp.where(counts[..., None] > 0, last, 0))
    kinds = jnp.where(valid, jnp.take_along_axis(table, order, axis=-1), canvas_lib.TILE_EMPTY)
    return TileLists(ids=ids, kinds=kinds.astype(jnp.int32), counts=counts)


def tile_schedule(q_canvas: Canvas, kv_canvas: Canvas | None = None, *, q_tile: int,
                  kv_tile: int) -> TileSchedule:
    """The exact schedule of a canvas pair whose lengths are multiples of the tile sizes."""
    table = canvas_lib.block_table(q_canvas, kv_canvas, q_tile=q_tile, kv_tile=kv_tile)
    return TileSchedule(table=table, kv_of_q=tile_lists(table),
                        q_of_kv=tile_lists(table.transpose(0, 2, 1)),
                        q_tile=q_tile, kv_tile=kv_tile)


def padded_length(length: int, tile: int) -> int:
    return -(-length // tile) * tile


def pad_canvas(canvas: Canvas, length: int) -> Canvas:
    """``canvas`` extended to ``length`` with padding tokens (segment ``-1``)."""
    extra = length - canvas.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a canvas of length {canvas.shape[1]} to {length}")
    if extra == 0:
        return canvas

    def pad(x: jax.Array, value: int) -> jax.Array:
        return jnp.pad(jnp.asarray(x), ((0, 0), (0, extra)), constant_values=value)

    return Canvas(tokens=pad(canvas.tokens, 0), positions=pad(canvas.positions, 0),
                  segment_ids=pad(canvas.segment_ids, canvas_lib.PADDING_SEGMENT),
                  stream_ids=pad(canvas.stream_ids, canvas_lib.CLEAN_STREAM),
                  block_ids=pad(canvas.block_ids, 0))


def pad_sequence(x: jax.Array, length: int) -> jax.Array:
    """``x [batch, seq, ...]`` zero-padded along ``seq`` to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def canvas_tags(canvas: Canvas) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(segment_ids, stream_ids, block_ids)`` as int32 ``[batch, length]`` arrays (kernel inputs)."""
    return tuple(jnp.asarray(x, jnp.int32)  # type: ignore[return-value]
                 for x in (canvas.segment_ids, canvas.stream_ids, canvas.block_ids))


def check_kernel_inputs(q: jax.Array, k: jax.Array, v: jax.Array, schedule: TileSchedule) -> None:
    """ValueError unless ``q [B, T, H, D]``, ``k, v [B, S, KV, D]`` (one dtype, ``H`` a multiple of
    ``KV``) fit ``schedule``: lengths multiples of its tiles, its table shaped for them."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or (k.shape[0], k.shape[3]) != (batch, head_dim) or heads % kv_heads:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if q_len % schedule.q_tile or kv_len % schedule.kv_tile:
        raise ValueError(f"lengths ({q_len}, {kv_len}) must be multiples of the tiles "
                         f"({schedule.q_tile}, {schedule.kv_tile}); pad the canvases")
    if schedule.table.shape != (batch, q_len // schedule.q_tile, kv_len // schedule.kv_tile):
        raise ValueError(f"schedule table {schedule.table.shape} does not match q {q.shape}, k {k.shape}")

"""The canvas: token ids, positions and per-token tags from which every attention mask derives.

Every forward in this project (SFT, DiPO log-probs, rollout prefill and denoising) runs the
transformer over a canvas. Each token carries

* ``segment_ids`` — which packed sample it belongs to (``-1`` = row padding: it sees nothing
  and nothing sees it; attention returns zeros for it),
* ``stream_ids`` — ``0`` for the clean stream, ``s >= 1`` for a noisy copy,
* ``block_ids`` — ``position // block_size``; blocks are aligned to each segment's first token
  because positions restart at 0 in every segment.

The single mask predicate :func:`visible` is written once over those tags and works on NumPy and
JAX arrays alike (it only uses ``==``, ``<``, ``&``, ``|``). Dense masks, block-sparsity tables and
kernel masks are all derived from it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = Any  # jax.Array or np.ndarray

CLEAN_STREAM = 0
NOISY_STREAM = 1
PADDING_SEGMENT = -1

# Block-table codes, per (q-tile, kv-tile).
TILE_EMPTY = 0
TILE_PARTIAL = 1
TILE_FULL = 2


@struct.dataclass
class Canvas:
    """Tokens and tags of a batch of canvas rows, every field shaped ``[batch, length]``."""

    tokens: Array
    positions: Array
    segment_ids: Array
    stream_ids: Array
    block_ids: Array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]


def visible(q_segment: Array, q_stream: Array, q_block: Array,
            kv_segment: Array, kv_stream: Array, kv_block: Array) -> Array:
    """Whether a query token may attend to a key token (broadcasting over any shapes).

    * tokens of different segments never see each other; padding (segment -1) sees nothing;
    * a clean query sees clean keys of its own and earlier blocks (block-causal, bidirectional
      inside a block) and never a noisy key;
    * a noisy query sees the keys of its own noisy copy inside its own block, and clean keys of
      strictly earlier blocks.
    """
    same_segment = (q_segment == kv_segment) & (q_segment >= 0)
    kv_clean = kv_stream == CLEAN_STREAM
    q_clean = q_stream == CLEAN_STREAM
    clean_query = q_clean & kv_clean & (kv_block <= q_block)
    noisy_query = ~q_clean & (((kv_stream == q_stream) & (kv_block == q_block))
                              | (kv_clean & (kv_block < q_block)))
    return same_segment & (clean_query | noisy_query)


def dense_mask(q: Canvas, kv: Canvas | None = None) -> Array:
    """Boolean ``[batch, q_len, kv_len]`` mask (the reference; small sizes only)."""
    kv = q if kv is None else kv
    return visible(q.segment_ids[:, :, None], q.stream_ids[:, :, None], q.block_ids[:, :, None],
                   kv.segment_ids[:, None, :], kv.stream_ids[:, None, :], kv.block_ids[:, None, :])


def block_table(q: Canvas, kv: Canvas | None = None, *, q_tile: int, kv_tile: int) -> jax.Array:
    """Per (q-tile, kv-tile) code ``int8[batch, q_len/q_tile, kv_len/kv_tile]``.

    ``TILE_EMPTY`` (nothing visible), ``TILE_FULL`` (everything visible) or ``TILE_PARTIAL``.
    Exact (the predicate is evaluated on every pair) with memory ``O(q_tile * kv_len)``: one
    q-tile is evaluated at a time.
    """
    kv = q if kv is None else kv
    batch, q_len = q.shape
    kv_len = kv.shape[1]
    if q_len % q_tile or kv_len % kv_tile:
        raise ValueError(f"tile sizes ({q_tile}, {kv_tile}) must divide the canvas lengths "
                         f"({q_len}, {kv_len})")
    nq, nk = q_len // q_tile, kv_len // kv_tile

    def q_tags(x: Array) -> jax.Array:  # [nq, batch, q_tile, 1]
        return jnp.asarray(x).reshape(batch, nq, q_tile).transpose(1, 0, 2)[..., None]

    kv_seg, kv_stream, kv_block = (jnp.asarray(x)[:, None, :]
                                   for x in (kv.segment_ids, kv.stream_ids, kv.block_ids))

    def one_q_tile(tags: tuple[jax.Array, ...]) -> jax.Array:
        m = visible(*tags, kv_seg, kv_stream, kv_block).reshape(batch, q_tile, nk, kv_tile)
        any_visible = m.any(axis=(1, 3))
        all_visible = m.all(axis=(1, 3))
        return jnp.where(all_visible, TILE_FULL,
                         jnp.where(any_visible, TILE_PARTIAL, TILE_EMPTY)).astype(jnp.int8)

    table = jax.lax.map(one_q_tile, (q_tags(q.segment_ids), q_tags(q.stream_ids),
                                     q_tags(q.block_ids)))
    return table.transpose(1, 0, 2)


# --------------------------------------------------------------------------- layouts
def block_causal_canvas(tokens: Array, positions: Array, segment_ids: Array,
                        block_size: int) -> Canvas:
    """The clean stream alone (prefill, scoring): block-causal inside every segment."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    return Canvas(tokens=tokens, positions=positions,
                  segment_ids=jnp.asarray(segment_ids, jnp.int32),
                  stream_ids=jnp.full_like(tokens, CLEAN_STREAM),
                  block_ids=positions // block_size)


def segment_runs(segment_ids: Array) -> tuple[jax.Array, jax.Array]:
    """For each token, the start index and length of the run of equal segment ids it lies in."""
    seg = jnp.asarray(segment_ids)
    length = seg.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length), seg.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=seg.ndim - 1)
    starts_or_end = jnp.where(is_start, index, length)
    next_start = jnp.concatenate(
        [jax.lax.cummin(starts_or_end, axis=seg.ndim - 1, reverse=True)[..., 1:],
         jnp.full_like(seg[..., :1], length)], axis=-1)
    return run_start, next_start - run_start


def two_stream_canvas(clean_tokens: Array, noisy_tokens: Array, positions: Array,
                      segment_ids: Array, block_size: int) -> tuple[Canvas, jax.Array]:
    """The SFT layout ``[noisy seg1 | clean seg1 | noisy seg2 | clean seg2 | ...]`` (length 2L).

    Segments are the runs of equal ``segment_ids`` (packed samples must be contiguous); both
    copies of a segment share its positions (0..n-1). Returns the canvas and ``noisy_slot``
    ``[batch, L]``: where each input token's noisy copy sits on the canvas (its clean copy sits
    ``run_length`` slots later).
    """
    clean_tokens = jnp.asarray(clean_tokens, jnp.int32)
    batch, length = clean_tokens.shape
    positions = jnp.asarray(positions, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    run_start, run_length = segment_runs(segment_ids)
    offset = jnp.arange(length)[None, :] - run_start
    noisy_slot = 2 * run_start + offset
    clean_slot = noisy_slot + run_length
    rows = jnp.arange(batch)[:, None]

    def lay_out(noisy_value: Array, clean_value: Array) -> jax.Array:
        out = jnp.zeros((batch, 2 * length), jnp.int32)
        return out.at[rows, noisy_slot].set(noisy_value).at[rows, clean_slot].set(clean_value)

    canvas = Canvas(
        tokens=lay_out(jnp.asarray(noisy_tokens, jnp.int32), clean_tokens),
        positions=lay_out(positions, positions),
        segment_ids=lay_out(segment_ids, segment_ids),
        stream_ids=lay_out(jnp.full_like(positions, NOISY_STREAM),
                           jnp.full_like(positions, CLEAN_STREAM)),
        block_ids=lay_out(positions // block_size, positions // block_size),
    )
    return canvas, noisy_slot

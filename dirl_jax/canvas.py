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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


@dataclasses.dataclass(frozen=True)
class StreamMajorLayout:
    """Static shape of stream-major canvas rows, length ``(rounds + 1) * part_length``::

        [noisy round 1 (N) | ... | noisy round R (N) | clean (N)]

    Every part holds the packed samples at the same offsets. ``R = 1`` is the SFT two-stream
    layout, ``R > 1`` the multi-round DiPO layout, ``R = 0`` block-causal. When every sample
    starts at a multiple of ``block_size`` (and stays inside one ``slot`` when that is set), the
    mask of such a canvas is :meth:`visible` on canvas indices AND segment equality: a static
    mask, which is what TPU Splash kernels need.

    Attributes:
      part_length: ``N``, the length of every part (a multiple of ``block_size``).
      block_size: ``B``, the diffusion block size.
      rounds: ``R``, the number of noisy copies.
      slot: optional fixed packing window (a multiple of ``block_size`` dividing
        ``part_length``); samples never cross one, so cross-window tiles are statically empty.
    """

    part_length: int
    block_size: int
    rounds: int = 1
    slot: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.part_length < 1 or self.part_length % self.block_size:
            raise ValueError(f"part_length ({self.part_length}) must be a positive multiple of "
                             f"block_size ({self.block_size})")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.slot is not None and (self.slot < 1 or self.slot % self.block_size
                                      or self.part_length % self.slot):
            raise ValueError(f"slot ({self.slot}) must be a positive multiple of block_size "
                             f"({self.block_size}) dividing part_length ({self.part_length})")

    @property
    def length(self) -> int:
        """The canvas length ``T = (rounds + 1) * part_length``."""
        return (self.rounds + 1) * self.part_length

    def visible(self, q_ids: Array, kv_ids: Array) -> Array:
        """The static mask at canvas indices (NumPy on the host, ``jnp`` inside kernels): a query
        sees its own block of its own part, and clean keys of strictly earlier blocks."""
        n, b = self.part_length, self.block_size
        clean_start = self.rounds * n
        same_block = q_ids // b == kv_ids // b
        clean_prefix = (kv_ids >= clean_start) & ((kv_ids - clean_start) // b < (q_ids % n) // b)
        keep = same_block | clean_prefix
        if self.slot is not None:
            keep = keep & ((q_ids % n) // self.slot == (kv_ids % n) // self.slot)
        return keep


def stream_major_canvas(clean_tokens: Array, noisy_tokens_per_round: Array, positions: Array,
                        segment_ids: Array, block_size: int) -> Canvas:
    """Rows ``[noisy round 1 | ... | noisy round R | clean]`` of length ``(R + 1) * N``.

    Args:
      clean_tokens: ``[batch, N]`` token ids of the packed samples.
      noisy_tokens_per_round: ``[R, batch, N]``, the noisy copy of every round (stream ``r + 1``
        holds round ``r``).
      positions: ``[batch, N]``, restarting at 0 in every sample.
      segment_ids: ``[batch, N]`` sample ids, ``-1`` for padding (which stays padding).
      block_size: the diffusion block size.
    """
    clean_tokens = jnp.asarray(clean_tokens, jnp.int32)
    noisy = jnp.asarray(noisy_tokens_per_round, jnp.int32)
    batch, n = clean_tokens.shape
    if noisy.ndim != 3 or noisy.shape[1:] != (batch, n):
        raise ValueError(f"noisy_tokens_per_round must be shaped (rounds, {batch}, {n}), "
                         f"got {noisy.shape}")
    positions = jnp.asarray(positions, jnp.int32)
    parts = noisy.shape[0] + 1

    def tile(x: Array) -> jax.Array:
        return jnp.tile(jnp.asarray(x, jnp.int32), (1, parts))

    streams = np.repeat(np.r_[np.arange(1, parts), CLEAN_STREAM], n).astype(np.int32)
    return Canvas(tokens=jnp.concatenate([*noisy, clean_tokens], axis=1),
                  positions=tile(positions), segment_ids=tile(segment_ids),
                  stream_ids=jnp.broadcast_to(streams, (batch, parts * n)),
                  block_ids=tile(positions // block_size))


def two_stream_canvas(clean_tokens: Array, noisy_tokens: Array, positions: Array,
                      segment_ids: Array, block_size: int) -> tuple[Canvas, jax.Array]:
    """The SFT canvas ``[noisy copies | clean copies]`` (length 2L) of packed rows ``[batch, L]``.

    Each packed sample gets DiRL's ``[noisy | clean]`` mask through its segment id; the
    stream-major order keeps the canvas a :class:`StreamMajorLayout` (``rounds=1``) so TPU
    Splash kernels apply. Returns the canvas and ``noisy_slot [batch, L]``, where each input
    token's noisy copy sits (its clean copy sits ``L`` slots later).
    """
    canvas = stream_major_canvas(clean_tokens, jnp.asarray(noisy_tokens)[None], positions,
                                 segment_ids, block_size)
    batch, length = jnp.shape(clean_tokens)
    return canvas, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

"""Block-sparse flash attention in pure JAX: the CPU path and the fallback on every backend.

Work is driven by the exact tile schedule of the canvas pair (:mod:`dirl_jax.attention.schedule`):
an outer loop over the q-tiles that see anything and, for each, an inner loop over its non-empty
kv-tiles with an online softmax. Empty tiles are neither computed nor stored; full tiles skip the
mask; partial tiles evaluate :func:`dirl_jax.canvas.visible` on the tile's tags. The backward
pass is a custom VJP that recomputes each tile's probabilities from the saved log-sum-exp, so
residual memory is ``O(length)`` (activations and one statistic per row), never ``O(T * S)``.
GQA keeps K/V un-repeated: the ``G`` query heads sharing a KV head form one ``[G * q_tile, D]``
matrix per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention.schedule import TileSchedule

Tags = tuple[jax.Array, jax.Array, jax.Array]
_NEG = -1e30  # finite "minus infinity" for the running maxima: exp(_NEG - _NEG) stays finite


def _to_tiles(x: jax.Array, tile: int, heads_per_kv: int | None) -> jax.Array:
    """``[B, L, H, D]`` → ``[B, L/tile, KV, G, tile, D]`` (queries) or ``[B, L/tile, KV, tile, D]``."""
    batch, length, heads, dim = x.shape
    if heads_per_kv is None:
        return x.reshape(batch, length // tile, tile, heads, dim).transpose(0, 1, 3, 2, 4)
    kv_heads = heads // heads_per_kv
    return (x.reshape(batch, length // tile, tile, kv_heads, heads_per_kv, dim)
            .transpose(0, 1, 3, 4, 2, 5))


def _from_query_tiles(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_to_tiles` for queries."""
    batch, tiles, kv_heads, groups, tile, dim = x.shape
    return x.transpose(0, 1, 4, 2, 3, 5).reshape(batch, tiles * tile, kv_heads * groups, dim)


def _from_kv_tiles(x: jax.Array) -> jax.Array:
    batch, tiles, kv_heads, tile, dim = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(batch, tiles * tile, kv_heads, dim)


def _zeros(like: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Zeros typed like ``like`` under ``shard_map`` (same varying mesh axes), for loop carries."""
    return jnp.zeros_like(like, dtype=dtype, shape=shape)


def _tile_tags(tags: Tags, tile: int) -> Tags:
    return tuple(t.reshape(t.shape[0], -1, tile) for t in tags)  # type: ignore[return-value]


def _tile_mask(q_tags: Tags, kv_tags: Tags, b: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """``bool[q_tile, kv_tile]`` visibility inside the tile pair (i, j) of row b."""
    q = [t[b, i][:, None] for t in q_tags]
    kv = [t[b, j][None, :] for t in kv_tags]
    return canvas_lib.visible(*q, *kv)


def _logits(q_tile: jax.Array, k_tile: jax.Array, scale: float) -> jax.Array:
    """``[KV, G, tq, D] x [KV, tk, D] -> fp32 [KV, G, tq, tk]``."""
    return jnp.einsum("kgqd,ksd->kgqs", q_tile, k_tile,
                      preferred_element_type=jnp.float32) * scale


def _active_q_tiles(schedule: TileSchedule) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flat ``(b, i)`` of the q-tiles with at least one non-empty kv-tile, and their number."""
    counts = schedule.kv_of_q.counts
    num_q_tiles = counts.shape[1]
    flat = jnp.nonzero(counts.reshape(-1) > 0, size=counts.size, fill_value=0)[0]
    return flat // num_q_tiles, flat % num_q_tiles, jnp.sum(counts > 0)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, q_tags: Tags, kv_tags: Tags,
             schedule: TileSchedule, scale: float) -> tuple[jax.Array, jax.Array]:
    """Output ``[B, T, H, D]`` and log-sum-exp in tile layout ``fp32 [B, nq, KV, G, tq]``."""
    groups = q.shape[2] // k.shape[2]
    tq, tk = schedule.q_tile, schedule.kv_tile
    qt, kt, vt = _to_tiles(q, tq, groups), _to_tiles(k, tk, None), _to_tiles(v, tk, None)
    q_tt, kv_tt = _tile_tags(q_tags, tq), _tile_tags(kv_tags, tk)
    lists = schedule.kv_of_q
    rows_b, rows_i, num_rows = _active_q_tiles(schedule)

    def q_tile_body(n: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out, lse = carry
        b, i = rows_b[n], rows_i[n]
        q_tile = qt[b, i]

        def kv_step(c: jax.Array, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, l, acc = state
            j, kind = lists.ids[b, i, c], lists.kinds[b, i, c]
            s = _logits(q_tile, kt[b, j], scale)

            def full(s: jax.Array) -> tuple[jax.Array, jax.Array]:
                m_new = jnp.maximum(m, s.max(axis=-1))
                return m_new, jnp.exp(s - m_new[..., None])

            def partial(s: jax.Array) -> tuple[jax.Array, jax.Array]:
                mask = _tile_mask(q_tt, kv_tt, b, i, j)
                m_new = jnp.maximum(m, jnp.where(mask, s, _NEG).max(axis=-1))
                return m_new, jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)

            m_new, p = jax.lax.cond(kind == canvas_lib.TILE_PARTIAL, partial, full, s)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("kgqs,ksd->kgqd", p.astype(vt.dtype), vt[b, j],
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        init = (_zeros(q_tile, q_tile.shape[:-1]) + _NEG, _zeros(q_tile, q_tile.shape[:-1]),
                _zeros(q_tile, q_tile.shape))
        m, l, acc = jax.lax.fori_loop(0, lists.counts[b, i], kv_step, init)
        seen = l > 0
        tile_out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        tile_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.at[b, i].set(tile_out.astype(out.dtype)), lse.at[b, i].set(tile_lse)

    out = _zeros(qt, qt.shape, v.dtype)
    lse = _zeros(qt, qt.shape[:-1])
    out, lse = jax.lax.fori_loop(0, num_rows, q_tile_body, (out, lse))
    return _from_query_tiles(out), lse


def _backward(q: jax.Array, k: jax.Array, v: jax.Array, q_tags: Tags, kv_tags: Tags,
              schedule: TileSchedule, scale: float, out: jax.Array, lse: jax.Array,
              d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv in one pass over the non-empty tile pairs (q-tile major)."""
    groups = q.shape[2] // k.shape[2]
    tq, tk = schedule.q_tile, schedule.kv_tile
    qt, kt, vt = _to_tiles(q, tq, groups), _to_tiles(k, tk, None), _to_tiles(v, tk, None)
    dot = _to_tiles(d_out, tq, groups)
    delta = jnp.sum(dot.astype(jnp.float32) * _to_tiles(out, tq, groups).astype(jnp.float32),
                    axis=-1)
    q_tt, kv_tt = _tile_tags(q_tags, tq), _tile_tags(kv_tags, tk)
    lists = schedule.kv_of_q
    rows_b, rows_i, num_rows = _active_q_tiles(schedule)

    def q_tile_body(n: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        dq, dk, dv = carry
        b, i = rows_b[n], rows_i[n]
        q_tile, do_tile = qt[b, i], dot[b, i]
        row_lse, row_delta = lse[b, i][..., None], delta[b, i][..., None]

        def kv_step(c: jax.Array, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dq_tile, dk, dv = state
            j, kind = lists.ids[b, i, c], lists.kinds[b, i, c]
            k_tile, v_tile = kt[b, j], vt[b, j]
            p = jnp.exp(_logits(q_tile, k_tile, scale) - row_lse)
            p = jax.lax.cond(kind == canvas_lib.TILE_PARTIAL,
                             lambda p: jnp.where(_tile_mask(q_tt, kv_tt, b, i, j), p, 0.0),
                             lambda p: p, p)
            dv_tile = jnp.einsum("kgqs,kgqd->ksd", p.astype(do_tile.dtype), do_tile,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("kgqd,ksd->kgqs", do_tile, v_tile, preferred_element_type=jnp.float32)
            ds = (p * (dp - row_delta) * scale).astype(q_tile.dtype)
            dq_tile = dq_tile + jnp.einsum("kgqs,ksd->kgqd", ds, k_tile,
                                           preferred_element_type=jnp.float32)
            dk_tile = jnp.einsum("kgqs,kgqd->ksd", ds, q_tile, preferred_element_type=jnp.float32)
            return dq_tile, dk.at[b, j].add(dk_tile), dv.at[b, j].add(dv_tile)

        dq_tile, dk, dv = jax.lax.fori_loop(0, lists.counts[b, i], kv_step,
                                            (_zeros(q_tile, q_tile.shape), dk, dv))
        return dq.at[b, i].set(dq_tile), dk, dv

    init = (_zeros(qt, qt.shape), _zeros(kt, kt.shape), _zeros(vt, vt.shape))
    dq, dk, dv = jax.lax.fori_loop(0, num_rows, q_tile_body, init)
    return (_from_query_tiles(dq).astype(q.dtype), _from_kv_tiles(dk).astype(k.dtype),
            _from_kv_tiles(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _tiled(q, k, v, q_tags, kv_tags, schedule, scale):
    return _forward(q, k, v, q_tags, kv_tags, schedule, scale)[0]


def _tiled_fwd(q, k, v, q_tags, kv_tags, schedule, scale):
    out, lse = _forward(q, k, v, q_tags, kv_tags, schedule, scale)
    return out, (q, k, v, q_tags, kv_tags, schedule, out, lse)


def _tiled_bwd(scale, residuals, d_out):
    q, k, v, q_tags, kv_tags, schedule, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_tags, kv_tags, schedule, scale, out, lse, d_out)
    zeros = jax.tree.map(lambda x: None, (q_tags, kv_tags, schedule))
    return (dq, dk, dv, *zeros)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, schedule: TileSchedule,
                    q_tags: Tags, kv_tags: Tags, *, scale: float | None = None) -> jax.Array:
    """Block-sparse attention of ``q [B,T,H,D]`` over ``k, v [B,S,KV,D]``.

    ``schedule`` comes from :func:`dirl_jax.attention.schedule.tile_schedule` and the tags from
    :func:`dirl_jax.attention.schedule.canvas_tags`; ``T`` and ``S`` must be multiples of its tile
    sizes (:func:`dirl_jax.attention.attention` pads). Matches the reference: fp32 softmax,
    output in ``v.dtype``, rows that see nothing are zero.
    """
    if q.shape[1] % schedule.q_tile or k.shape[1] % schedule.kv_tile:
        raise ValueError(f"lengths ({q.shape[1]}, {k.shape[1]}) must be multiples of the tiles "
                         f"({schedule.q_tile}, {schedule.kv_tile})")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _tiled(q, k, v, tuple(q_tags), tuple(kv_tags), schedule, scale)

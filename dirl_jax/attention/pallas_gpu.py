"""Block-sparse flash attention over canvases for GPU: Pallas kernels on the Triton backend.

Triton has no scalar prefetch, so the tile lists of a :class:`~dirl_jax.attention.schedule.TileSchedule`
are ordinary kernel inputs: every program owns one output tile, keeps the whole K/V (or Q) row
of its head in a full-length ref and walks only its non-empty tiles with a dynamic
``lax.fori_loop``. ``TILE_FULL`` tiles skip the mask; ``TILE_PARTIAL`` tiles evaluate
:func:`dirl_jax.canvas.visible` on the canvas tags of the two tiles.

Three kernels, flash-attention-2 style, with fp32 softmax and accumulation:

* forward — grid ``(batch, heads, q_tiles)``, loops over ``kv_of_q``; returns the output and
  the log-sum-exp of every row (``+inf`` for a row with no visible key, whose output is zero);
* dq — same grid and loop, ``dq = scale * sum_kv dS K`` with ``dS = P * (dO V^T - delta)``,
  ``delta = rowsum(dO * O)``;
* dk/dv — grid ``(batch, kv_heads, kv_tiles)``, loops over ``q_of_kv`` and, inside, over the
  ``heads // kv_heads`` query heads that share the kv head (grouped-query attention never
  repeats K/V in memory).

Requirements (checked): tile sizes are powers of two and at least 16 (Triton block and dot
shapes); sequence lengths are multiples of the tiles (pad with
:func:`~dirl_jax.attention.schedule.pad_canvas` / ``pad_sequence``); q, k and v share one dtype.
A head dimension that is not a power of two >= 16 is zero-padded internally (extra copies).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention.schedule import TileLists, TileSchedule, check_kernel_inputs

_NUM_TAGS = 3  # (segment, stream, block), stacked along axis 1 of the tag inputs


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """2-D matmul with fp32 accumulation; ``contract`` picks the contracted axis of a and b."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32)


def _masked_logits(s: jax.Array, kind: jax.Array, q_tags: Sequence[jax.Array],
                   kv_tags: Sequence[jax.Array]) -> jax.Array:
    """``s [q_tile, kv_tile]`` with ``-inf`` on invisible pairs; a full tile is returned as is."""

    def apply_mask(s: jax.Array) -> jax.Array:
        visible = canvas_lib.visible(*(t[:, None] for t in q_tags), *(t[None, :] for t in kv_tags))
        return jnp.where(visible, s, -jnp.inf)

    return lax.cond(kind == canvas_lib.TILE_FULL, lambda s: s, apply_mask, s)


def _load_tags(tags_ref, rows: slice | pl.Slice = slice(None)) -> tuple[jax.Array, ...]:
    """``(segment, stream, block)`` of the ``rows`` of a stacked ``[3, len]`` tags ref."""
    return tuple(tags_ref[t, rows] for t in range(_NUM_TAGS))


# --------------------------------------------------------------------------- kernels
def _forward_kernel(ids_ref, kinds_ref, count_ref, q_tags_ref, kv_tags_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, scale: float, kv_tile: int):
    q = q_ref[...]
    q_tags = _load_tags(q_tags_ref)

    def body(j, carry):
        acc, row_max, row_sum = carry
        rows = pl.ds(ids_ref[j] * kv_tile, kv_tile)
        s = _masked_logits(_dot(q, k_ref[rows, :], (1, 1)) * scale, kinds_ref[j], q_tags,
                           _load_tags(kv_tags_ref, rows))
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # rows with nothing visible yet
        correction = jnp.exp(row_max - shift)
        p = jnp.exp(s - shift[:, None])
        v = v_ref[rows, :]
        acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, new_max, correction * row_sum + jnp.sum(p, axis=1)

    q_tile, head_dim = q.shape
    init = (jnp.zeros((q_tile, head_dim), jnp.float32),
            jnp.full((q_tile,), -jnp.inf, jnp.float32), jnp.zeros((q_tile,), jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, count_ref[0], body, init)
    seen = row_sum > 0
    o_ref[...] = (acc / jnp.where(seen, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log(row_sum), jnp.inf)


def _dq_kernel(ids_ref, kinds_ref, count_ref, q_tags_ref, kv_tags_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, scale: float, kv_tile: int):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_tags = _load_tags(q_tags_ref)

    def body(j, dq):
        rows = pl.ds(ids_ref[j] * kv_tile, kv_tile)
        k = k_ref[rows, :]
        s = _masked_logits(_dot(q, k, (1, 1)) * scale, kinds_ref[j], q_tags,
                           _load_tags(kv_tags_ref, rows))
        p = jnp.exp(s - lse)
        ds = p * (_dot(do, v_ref[rows, :], (1, 1)) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(ids_ref, kinds_ref, count_ref, q_tags_ref, kv_tags_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, q_tile: int,
                groups: int):
    k, v = k_ref[...], v_ref[...]
    kv_tags = _load_tags(kv_tags_ref)

    def tile(j, carry):
        rows = pl.ds(ids_ref[j] * q_tile, q_tile)
        kind, q_tags = kinds_ref[j], _load_tags(q_tags_ref, rows)

        def head(g, carry):
            dk, dv = carry
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            s = _masked_logits(_dot(q, k, (1, 1)) * scale, kind, q_tags, kv_tags)
            p = jnp.exp(s - lse_ref[g, rows][:, None])
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (_dot(do, v, (1, 1)) - delta_ref[g, rows][:, None])
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

        return lax.fori_loop(0, groups, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, count_ref[0], tile, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas calls
# Every grid is (batch, head, tile): the query head for forward and dq, the kv head for dk/dv.
def _list_specs(lists: TileLists) -> list[pl.BlockSpec]:
    """Specs of a tile's own ``(ids, kinds, counts)`` row."""
    row = pl.BlockSpec((None, None, lists.ids.shape[-1]), lambda b, h, i: (b, i, 0))
    return [row, row, pl.BlockSpec((None, 1), lambda b, h, i: (b, i))]


def _tags_spec(size: int, *, whole_row: bool) -> pl.BlockSpec:
    """Spec of the stacked tags ``[batch, 3, len]``: a whole row, or the program's own tile."""
    if whole_row:
        return pl.BlockSpec((None, _NUM_TAGS, size), lambda b, h, i: (b, 0, 0))
    return pl.BlockSpec((None, _NUM_TAGS, size), lambda b, h, i: (b, 0, i))


def _pallas_call(kernel, grid: tuple[int, ...], in_specs, out_specs, out_shape, *, head_dim: int,
                 interpret: bool, name: str):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
        interpret=interpret, name=name)


def _q_row_specs(q: jax.Array, k: jax.Array, schedule: TileSchedule):
    """Specs of a (batch, q head, q tile) program: its q-shaped tile, its lse-shaped tile, and the
    full K/V rows of its kv head."""
    kv_len, groups, head_dim = k.shape[1], q.shape[2] // k.shape[2], q.shape[3]
    bq = schedule.q_tile
    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    lse_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_row = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0))
    return q_block, lse_block, kv_row


def _forward(q, k, v, schedule: TileSchedule, q_tags, kv_tags, scale: float, interpret: bool):
    """Output ``[B, T, H, D]`` and log-sum-exp ``f32[B, H, T]``."""
    batch, q_len, heads, head_dim = q.shape
    q_block, lse_block, kv_row = _q_row_specs(q, k, schedule)
    lists = schedule.kv_of_q
    return _pallas_call(
        functools.partial(_forward_kernel, scale=scale, kv_tile=schedule.kv_tile),
        (batch, heads, q_len // schedule.q_tile),
        [*_list_specs(lists), _tags_spec(schedule.q_tile, whole_row=False),
         _tags_spec(k.shape[1], whole_row=True), q_block, kv_row, kv_row],
        [q_block, lse_block],
        [jax.ShapeDtypeStruct(q.shape, v.dtype),
         jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        head_dim=head_dim, interpret=interpret, name="canvas_attention_fwd",
    )(lists.ids, lists.kinds, lists.counts, q_tags, kv_tags, q, k, v)


def _dq(q, k, v, do, lse, delta, schedule: TileSchedule, q_tags, kv_tags, scale: float,
        interpret: bool):
    batch, q_len, heads, head_dim = q.shape
    q_block, lse_block, kv_row = _q_row_specs(q, k, schedule)
    lists = schedule.kv_of_q
    return _pallas_call(
        functools.partial(_dq_kernel, scale=scale, kv_tile=schedule.kv_tile),
        (batch, heads, q_len // schedule.q_tile),
        [*_list_specs(lists), _tags_spec(schedule.q_tile, whole_row=False),
         _tags_spec(k.shape[1], whole_row=True), q_block, kv_row, kv_row,
         q_block, lse_block, lse_block],
        q_block, jax.ShapeDtypeStruct(q.shape, q.dtype),
        head_dim=head_dim, interpret=interpret, name="canvas_attention_dq",
    )(lists.ids, lists.kinds, lists.counts, q_tags, kv_tags, q, k, v, do, lse, delta)


def _dkv(q, k, v, do, lse, delta, schedule: TileSchedule, q_tags, kv_tags, scale: float,
         interpret: bool):
    """dk, dv; the ``groups`` query heads of a kv head are seen as one ``[T, groups, D]`` ref."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups, bk = heads // kv_heads, schedule.kv_tile
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, i: (b, i, h, 0))
    q_group = pl.BlockSpec((None, q_len, None, groups, head_dim), lambda b, h, i: (b, 0, h, 0, 0))
    lse_group = pl.BlockSpec((None, None, groups, q_len), lambda b, h, i: (b, h, 0, 0))
    lists = schedule.q_of_kv
    grouped = (batch, q_len, kv_heads, groups, head_dim)
    return _pallas_call(
        functools.partial(_dkv_kernel, scale=scale, q_tile=schedule.q_tile, groups=groups),
        (batch, kv_heads, kv_len // bk),
        [*_list_specs(lists), _tags_spec(q_len, whole_row=True),
         _tags_spec(bk, whole_row=False), q_group, kv_block, kv_block,
         q_group, lse_group, lse_group],
        [kv_block, kv_block],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        head_dim=head_dim, interpret=interpret, name="canvas_attention_dkv",
    )(lists.ids, lists.kinds, lists.counts, q_tags, kv_tags, q.reshape(grouped), k, v,
      do.reshape(grouped), lse.reshape(batch, kv_heads, groups, q_len),
      delta.reshape(batch, kv_heads, groups, q_len))


# --------------------------------------------------------------------------- custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, schedule: TileSchedule, q_tags, kv_tags, scale: float,
               interpret: bool) -> jax.Array:
    return _forward(q, k, v, schedule, q_tags, kv_tags, scale, interpret)[0]


def _attention_fwd(q, k, v, schedule, q_tags, kv_tags, scale, interpret):
    out, lse = _forward(q, k, v, schedule, q_tags, kv_tags, scale, interpret)
    return out, (q, k, v, schedule, q_tags, kv_tags, out, lse)


def _attention_bwd(scale, interpret, residuals, do):
    q, k, v, schedule, q_tags, kv_tags, out, lse = residuals
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    args = (q, k, v, do, lse, delta, schedule, q_tags, kv_tags, scale, interpret)
    dk, dv = _dkv(*args)
    return _dq(*args), dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _is_tile(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, schedule: TileSchedule,
                         q_tags: Sequence[jax.Array], kv_tags: Sequence[jax.Array], *,
                         scale: float | None = None, interpret: bool = False) -> jax.Array:
    """Block-sparse attention of ``q`` over ``k, v`` with the canvas mask, differentiable in q, k, v.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` a multiple of ``kv_heads``.
      schedule: ``schedule_lib.tile_schedule(q_canvas, kv_canvas, q_tile=..., kv_tile=...)``; the tiles
        are powers of two >= 16 dividing ``q_len`` and ``kv_len``.
      q_tags, kv_tags: ``schedule_lib.canvas_tags`` of the two canvases, int32 ``[batch, len]`` each.
      scale: logit scale, default ``head_dim ** -0.5``.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns ``[batch, q_len, heads, head_dim]`` in ``v.dtype``; a row with no visible key is zero.
    """
    if not (_is_tile(schedule.q_tile) and _is_tile(schedule.kv_tile)):
        raise ValueError(f"tiles ({schedule.q_tile}, {schedule.kv_tile}) must be powers of two >= 16")
    check_kernel_inputs(q, k, v, schedule)
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    width = max(16, pl.next_power_of_2(head_dim))
    if width != head_dim:
        q, k, v = (jnp.pad(x, ((0, 0),) * 3 + ((0, width - head_dim),)) for x in (q, k, v))
    out = _attention(q, k, v, schedule, jnp.stack(q_tags, axis=1).astype(jnp.int32),
                     jnp.stack(kv_tags, axis=1).astype(jnp.int32), scale, interpret)
    return out[..., :head_dim]

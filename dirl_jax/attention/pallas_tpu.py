"""Block-sparse flash attention over canvases for TPU: Pallas (Mosaic) kernels over the tile schedule.

Splash needs a static mask (a function of the indices alone); a DiPO canvas's mask follows each
rollout's step map, so it is data. These kernels take the exact tile schedule of the canvas pair
(:mod:`dirl_jax.attention.schedule`) as scalar-prefetched SMEM arrays and walk it in the grid:

* forward and dq — grid ``(batch, head, q_tile, n)``: step ``n`` visits the ``n``-th non-empty
  kv-tile of the q-tile (``kv_of_q``); the output tile stays in VMEM across ``n``;
* dk/dv — grid ``(batch, kv_head, kv_tile, group, n)``: every query head of the kv head's group
  and, for each, the ``n``-th q-tile that sees the kv-tile (``q_of_kv``); dk and dv accumulate over
  both, so grouped-query attention never repeats K/V or writes per-query-head gradients.

The innermost grid extent is the longest list of the call (a dynamic grid dimension: a DiPO row
of 43,008 slots in 512-tiles has 84 kv-tiles but no q-tile sees more than ~15, and a TPU grid
step costs ~0.35 us whether it computes or not). Steps past a tile's count repeat the last
listed id, so the pipeline issues no new copy, and skip the compute. Each computed step evaluates :func:`dirl_jax.canvas.visible` on the two tiles' tags
unless the tile is ``TILE_FULL``. Tags travel lane-broadcast ``[len, 128]`` for the query side
and sublane-broadcast ``[8, len]`` for the key side (the layout Mosaic compares without
relayouts, as jax's Splash kernel does for segment ids). fp32 softmax and accumulation.

Requirements (checked): tiles are multiples of 128 dividing the padded lengths (or the whole
length when shorter); q, k and v share a dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention.schedule import TileLists, TileSchedule, check_kernel_inputs

LANES, SUBLANES = 128, 8
_NEG = -1e30  # finite "minus infinity" for running maxima: exp(_NEG - _NEG) stays finite
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _visible(kind: jax.Array, q_tag_refs: Sequence, kv_tag_refs: Sequence, kv_tile: int) -> jax.Array:
    """``bool[q_tile, kv_tile]``: the canvas predicate on the two tiles (all true for a full tile)."""
    repeats = kv_tile // LANES
    q_tags = [jnp.tile(ref[...], (1, repeats)) if repeats > 1 else ref[...][:, :kv_tile]
              for ref in q_tag_refs]
    kv_tags = [jnp.broadcast_to(ref[:1, :], q_tags[0].shape) for ref in kv_tag_refs]
    return canvas_lib.visible(*q_tags, *kv_tags) | (kind == canvas_lib.TILE_FULL)


def _steps(lists: TileLists) -> jax.Array:
    """The grid's innermost extent: the longest tile list (a dynamic grid dimension, so the kernels
    step over no more empty tiles than the fullest row needs; at least one step)."""
    return jnp.maximum(jnp.max(lists.counts), 1)


def _flat(lists: TileLists) -> tuple[jax.Array, jax.Array, jax.Array]:
    """1-D ``(ids, kinds, counts)`` for SMEM (2-D SMEM arrays pad their rows)."""
    return lists.ids.reshape(-1), lists.kinds.reshape(-1), lists.counts.reshape(-1)


# --------------------------------------------------------------------------- kernels
def _forward_kernel(ids, kinds, counts, q_ref, k_ref, v_ref, *refs, scale: float, stride: int,
                    num_tiles: int, kv_tile: int):
    q_tags, kv_tags = refs[0:3], refs[3:6]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[6:]
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * num_tiles + i

    @pl.when(n == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(n < counts[row])
    def _step():
        mask = _visible(kinds[row * stride + n], q_tags, kv_tags, kv_tile)
        s = jnp.where(mask, _dot(q_ref[...], k_ref[...], _NT) * scale, _NEG)
        m_prev = m_ref[...][:, :1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = jnp.broadcast_to(alpha * l_ref[...][:, :1] + p.sum(axis=1, keepdims=True),
                                      l_ref.shape)
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
        v = v_ref[...]
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, _NN)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...][:, :1]
        seen = l > 0
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_ref[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, m_ref[...][:, :1] + jnp.log(safe), 0.0),
                                        lse_ref.shape)


def _probabilities(q, k, mask, lse, scale: float) -> jax.Array:
    """``p [q_tile, kv_tile]`` recomputed from the saved log-sum-exp column."""
    return jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse), 0.0)


def _dq_kernel(ids, kinds, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               scale: float, stride: int, num_tiles: int, kv_tile: int):
    q_tags, kv_tags = refs[0:3], refs[3:6]
    dq_ref, acc_ref = refs[6:]
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * num_tiles + i

    @pl.when(n == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(n < counts[row])
    def _step():
        mask = _visible(kinds[row * stride + n], q_tags, kv_tags, kv_tile)
        k, do = k_ref[...], do_ref[...]
        lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]
        p = _probabilities(q_ref[...], k, mask, lse, scale)
        ds = p * (_dot(do, v_ref[...], _NT) - delta)
        acc_ref[...] += _dot(ds.astype(k.dtype), k, _NN)

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(ids, kinds, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                scale: float, stride: int, num_tiles: int, groups: int, kv_tile: int):
    q_tags, kv_tags = refs[0:3], refs[3:6]
    dk_ref, dv_ref, dk_acc, dv_acc = refs[6:]
    b, j, g, n = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    col = b * num_tiles + j

    @pl.when((g == 0) & (n == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(n < counts[col])
    def _step():
        mask = _visible(kinds[col * stride + n], q_tags, kv_tags, kv_tile)
        q, do = q_ref[...], do_ref[...]
        lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]
        p = _probabilities(q, k_ref[...], mask, lse, scale)
        dv_acc[...] += _dot(p.astype(do.dtype), do, _TN)
        ds = p * (_dot(do, v_ref[...], _NT) - delta)
        dk_acc[...] += _dot(ds.astype(q.dtype), q, _TN)

    @pl.when((g == groups - 1) & (n == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas calls
def _tag_inputs(q_tags: Sequence[jax.Array], kv_tags: Sequence[jax.Array]) -> list[jax.Array]:
    """Query tags lane-broadcast ``[batch, len, 128]``, key tags sublane-broadcast ``[batch, 8, len]``."""
    q_side = [jnp.broadcast_to(jnp.asarray(t, jnp.int32)[:, :, None], (*t.shape, LANES))
              for t in q_tags]
    kv_side = [jnp.broadcast_to(jnp.asarray(t, jnp.int32)[:, None, :],
                                (t.shape[0], SUBLANES, t.shape[1])) for t in kv_tags]
    return q_side + kv_side


def _tag_specs(q_tile: int, kv_tile: int, q_index, kv_index) -> list[pl.BlockSpec]:
    """Block specs of the six tag inputs; ``q_index``/``kv_index`` map grid indices to tiles."""
    q_spec = pl.BlockSpec((None, q_tile, LANES), lambda *a: (a[0], q_index(*a), 0))
    kv_spec = pl.BlockSpec((None, SUBLANES, kv_tile), lambda *a: (a[0], 0, kv_index(*a)))
    return [q_spec] * 3 + [kv_spec] * 3


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, interpret, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, name=name, interpret=interpret,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


@dataclasses.dataclass(frozen=True)
class _Heads:
    """How q/k/v (and their gradients and the output) lie in HBM for the kernels.

    ``flat``: ``[batch, len, heads * head_dim]``, the projections' own layout, each head a
    ``head_dim``-wide column block (needs ``head_dim % 128 == 0``, SDAR's 128 included): no
    transposes around the kernels. Otherwise heads-major ``[batch, heads, len, head_dim]``.
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    flat: bool

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def to_kernel(self, x: jax.Array) -> jax.Array:
        """``[batch, len, h, head_dim]`` → the kernels' layout."""
        if self.flat:
            return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3])
        return jnp.swapaxes(x, 1, 2)

    def from_kernel(self, x: jax.Array, heads: int) -> jax.Array:
        if self.flat:
            return x.reshape(*x.shape[:2], heads, self.head_dim)
        return jnp.swapaxes(x, 1, 2)

    def spec(self, tile: int, index) -> pl.BlockSpec:
        """The ``[tile, head_dim]`` block of one head at ``index(*grid, *refs) = (b, head, tile)``."""
        if self.flat:
            def flat_map(*a):
                b, h, t = index(*a)
                return b, t, h
            return pl.BlockSpec((None, tile, self.head_dim), flat_map)

        def heads_map(*a):
            b, h, t = index(*a)
            return b, h, t, 0
        return pl.BlockSpec((None, None, tile, self.head_dim), heads_map)


def _row_spec(tile: int, index) -> pl.BlockSpec:
    """A ``[1, tile]`` block of a per-row statistic ``f32[batch, heads, 1, len]``."""
    def row_map(*a):
        b, h, t = index(*a)
        return b, h, 0, t
    return pl.BlockSpec((None, None, 1, tile), row_map)


_ROW_PARALLEL = ("parallel", "parallel", "parallel", "arbitrary")


def _q_major_specs(schedule: TileSchedule, heads: _Heads):
    """Specs for a ``(batch, head, q_tile, n)`` grid whose kv-tile is the ``n``-th of the q-tile."""
    nq, stride = schedule.kv_of_q.ids.shape[1:]
    tq, tk = schedule.q_tile, schedule.kv_tile

    def kv_of(b, h, i, n, ids, kinds, counts):
        return ids[(b * nq + i) * stride + n]

    q_block = heads.spec(tq, lambda b, h, i, n, *_: (b, h, i))
    kv_block = heads.spec(tk, lambda b, h, i, n, *s: (b, lax.div(h, heads.groups), kv_of(b, h, i, n, *s)))
    row_block = _row_spec(tq, lambda b, h, i, n, *_: (b, h, i))
    tags = _tag_specs(tq, tk, lambda b, h, i, n, *_: i, kv_of)
    return q_block, kv_block, row_block, tags, nq, stride


def _forward(q, k, v, schedule: TileSchedule, tags, heads: _Heads, scale: float, interpret: bool):
    """Output (the kernels' layout) and log-sum-exp ``f32[B, H, 1, T]``."""
    q_len, tq = tags[0].shape[1], schedule.q_tile
    q_block, kv_block, _, tag_specs, nq, stride = _q_major_specs(schedule, heads)
    lse_block = pl.BlockSpec((None, None, tq, LANES), lambda b, h, i, n, *_: (b, h, i, 0))
    out, lse = _call(
        functools.partial(_forward_kernel, scale=scale, stride=stride, num_tiles=nq,
                          kv_tile=schedule.kv_tile),
        (heads.batch, heads.heads, nq, _steps(schedule.kv_of_q)), [q_block, kv_block, kv_block, *tag_specs],
        [q_block, lse_block],
        [jax.ShapeDtypeStruct(q.shape, v.dtype),
         jax.ShapeDtypeStruct((heads.batch, heads.heads, q_len, LANES), jnp.float32)],
        [pltpu.VMEM((tq, LANES), jnp.float32), pltpu.VMEM((tq, LANES), jnp.float32),
         pltpu.VMEM((tq, heads.head_dim), jnp.float32)],
        _ROW_PARALLEL, interpret, "canvas_attention_fwd",
    )(*_flat(schedule.kv_of_q), q, k, v, *tags)
    return out, lse[..., 0][:, :, None, :]


def _dq(q, k, v, do, lse, delta, schedule: TileSchedule, tags, heads: _Heads, scale: float,
        interpret: bool):
    q_block, kv_block, row_block, tag_specs, nq, stride = _q_major_specs(schedule, heads)
    return _call(
        functools.partial(_dq_kernel, scale=scale, stride=stride, num_tiles=nq,
                          kv_tile=schedule.kv_tile),
        (heads.batch, heads.heads, nq, _steps(schedule.kv_of_q)),
        [q_block, kv_block, kv_block, q_block, row_block, row_block, *tag_specs], q_block,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((schedule.q_tile, heads.head_dim), jnp.float32)],
        _ROW_PARALLEL, interpret, "canvas_attention_dq",
    )(*_flat(schedule.kv_of_q), q, k, v, do, lse, delta, *tags)


def _dkv(q, k, v, do, lse, delta, schedule: TileSchedule, tags, heads: _Heads, scale: float,
         interpret: bool):
    """dk, dv over grid ``(batch, kv_head, kv_tile, group, n)``."""
    groups, tq, tk = heads.groups, schedule.q_tile, schedule.kv_tile
    nk, stride = schedule.q_of_kv.ids.shape[1:]

    def q_of(b, h, j, g, n, ids, kinds, counts):
        return ids[(b * nk + j) * stride + n]

    def q_index(b, h, j, g, n, *s):
        return b, h * groups + g, q_of(b, h, j, g, n, *s)

    q_block, row_block = heads.spec(tq, q_index), _row_spec(tq, q_index)
    kv_block = heads.spec(tk, lambda b, h, j, g, n, *_: (b, h, j))
    tag_specs = _tag_specs(tq, tk, q_of, lambda b, h, j, g, n, *_: j)
    return _call(
        functools.partial(_dkv_kernel, scale=scale, stride=stride, num_tiles=nk, groups=groups,
                          kv_tile=tk),
        (heads.batch, heads.kv_heads, nk, groups, _steps(schedule.q_of_kv)),
        [q_block, kv_block, kv_block, q_block, row_block, row_block, *tag_specs],
        [kv_block, kv_block],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((tk, heads.head_dim), jnp.float32), pltpu.VMEM((tk, heads.head_dim), jnp.float32)],
        ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), interpret,
        "canvas_attention_dkv",
    )(*_flat(schedule.q_of_kv), q, k, v, do, lse, delta, *tags)


# --------------------------------------------------------------------------- custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, schedule: TileSchedule, tags, heads: _Heads, scale: float,
               interpret: bool) -> jax.Array:
    return _forward(q, k, v, schedule, tags, heads, scale, interpret)[0]


def _attention_fwd(q, k, v, schedule, tags, heads, scale, interpret):
    out, lse = _forward(q, k, v, schedule, tags, heads, scale, interpret)
    return out, (q, k, v, schedule, tags, out, lse)


def _attention_bwd(heads, scale, interpret, residuals, do):
    q, k, v, schedule, tags, out, lse = residuals
    delta = jnp.einsum("bthd,bthd->bht", *(heads.from_kernel(x, heads.heads).astype(jnp.float32)
                                           for x in (out, do)))[:, :, None, :]
    args = (q, k, v, do, lse, delta, schedule, tags, heads, scale, interpret)
    dk, dv = _dkv(*args)
    return _dq(*args), dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_tile(name: str, tile: int, length: int) -> None:
    if tile % LANES and tile != length:
        raise ValueError(f"{name} ({tile}) must be a multiple of {LANES}, or the whole length "
                         f"({length})")


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, schedule: TileSchedule,
                         q_tags: Sequence[jax.Array], kv_tags: Sequence[jax.Array], *,
                         scale: float | None = None, interpret: bool = False) -> jax.Array:
    """Block-sparse attention of ``q`` over ``k, v`` with the canvas mask, differentiable in q, k, v.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` a multiple of ``kv_heads``.
      schedule: ``schedule_lib.tile_schedule(q_canvas, kv_canvas, q_tile=..., kv_tile=...)``.
      q_tags, kv_tags: ``schedule_lib.canvas_tags`` of the two canvases, int32 ``[batch, len]`` each.
      scale: logit scale, default ``head_dim ** -0.5``.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns ``[batch, q_len, heads, head_dim]`` in ``v.dtype``; a row with no visible key is zero.
    """
    check_kernel_inputs(q, k, v, schedule)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    _check_tile("q_tile", schedule.q_tile, q_len)
    _check_tile("kv_tile", schedule.kv_tile, kv_len)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    layout = _Heads(batch, heads, kv_heads, head_dim, flat=head_dim % LANES == 0)
    out = _attention(*(layout.to_kernel(x) for x in (q, k, v)), schedule,
                     tuple(_tag_inputs(q_tags, kv_tags)), layout, scale, interpret)
    return layout.from_kernel(out, heads)


__all__ = ["pallas_tpu_attention"]

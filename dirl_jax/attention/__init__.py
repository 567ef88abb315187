"""Attention over canvases: one entry point, implementations chosen by name or platform.

=============  ===================================================================  ==========
impl           what                                                                 platforms
=============  ===================================================================  ==========
``reference``  XLA einsums over the dense boolean mask (ground truth, O(T*S))       any
``tiled``      pure-JAX block-sparse flash attention over the exact tile schedule   any
``splash``     jax's Splash kernel with a static stream-major mask (needs layout)   TPU
``pallas_gpu`` Pallas/Triton block-sparse flash attention over the tile schedule    GPU
``pallas_tpu`` Pallas/Mosaic block-sparse flash attention over the tile schedule    TPU
``auto``       ``reference`` for a query chunk of <= 64 tokens (decoding one block),
               ``splash`` on TPU when a layout of a length divisible by 128 is given
               (not on v6e, where XLA:TPU aborts on its heads-major inputs at 8B shapes),
               ``pallas_tpu`` on TPU otherwise (a data-dependent mask: DiPO canvases,
               KV caches), ``pallas_gpu`` on GPU,
               ``tiled`` elsewhere; ``reference`` for an explicit mask
=============  ===================================================================  ==========
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import jax

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import schedule as schedule_lib
from dirl_jax.attention.reference import reference_attention
from dirl_jax.attention.tiled import tiled_attention
from dirl_jax.sharding import dividing_axis, rules_for_mesh

IMPLEMENTATIONS = ("auto", "reference", "tiled", "splash", "pallas_gpu", "pallas_tpu")
# (q_tile, kv_tile) per block-sparse impl; tiled's is the fastest measured on CPU (docs/PERFORMANCE.md);
# pallas_tpu's are Splash's defaults (a TPU grid step costs ~0.35 us: 128-wide tiles would spend
# more time stepping than multiplying).
DEFAULT_TILES = {"tiled": (128, 256), "pallas_gpu": (64, 64), "pallas_tpu": (512, 512)}
DECODE_QUERY_LEN = 64
SPLASH_BLOCK = 128  # Splash tiles; canvases of other lengths run ``pallas_tpu`` under ``auto``
# Chips where ``auto`` does not pick Splash: libtpu 0.0.50.1's XLA:TPU aborts compiling the 8B SFT
# step for v6e ("TransformWindow: split of a padded window dim") on the heads-major transposes
# Splash's inputs need; ``pallas_tpu`` reads the projections' columns in place (docs/SCALING.md).
NO_SPLASH_DEVICE_KINDS = ("TPU v6",)


_RECORDERS: list[list[str]] = []


@contextlib.contextmanager
def recording_impls() -> Iterator[list[str]]:
    """Collects the implementation of every :func:`attention` call traced inside (what a
    compiled program contains, e.g. for :mod:`dirl_jax.sizing`)."""
    names: list[str] = []
    _RECORDERS.append(names)
    try:
        yield names
    finally:
        _RECORDERS.remove(names)


def target_platform() -> str:
    """The platform of the program being built: that of the devices of the mesh set by
    ``jax.set_mesh`` (a TPU slice compiled for ahead of time from a CPU host included), else the
    default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def target_device_kind() -> str:
    """The device kind (``TPU v5``, ``TPU v6 lite``, ...) of the program being built, found as
    :func:`target_platform` finds the platform."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.device_kind
    return jax.devices()[0].device_kind


def resolve_impl(impl: str, *, has_mask: bool = False, layout: Any = None,
                 platform: str | None = None, device_kind: str | None = None,
                 q_len: int | None = None) -> str:
    """The concrete implementation ``impl`` stands for on ``platform`` and ``device_kind``
    (defaults: :func:`target_platform`, :func:`target_device_kind`).

    A short query chunk (``q_len <= DECODE_QUERY_LEN``: one block being decoded against a KV
    cache) runs ``reference``: its scores are ``q_len x S`` per head, cheap and batched, where a
    tile loop would pay per-tile overhead for a single partial tile row.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    if has_mask or (q_len is not None and q_len <= DECODE_QUERY_LEN):
        return "reference"
    platform = platform or target_platform()
    if platform == "tpu":
        kind = device_kind if device_kind is not None else target_device_kind()
        splash_fits = (layout is not None and layout.length % SPLASH_BLOCK == 0
                       and not kind.startswith(NO_SPLASH_DEVICE_KINDS))
        return "splash" if splash_fits else "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "tiled"


def _tile_for(length: int, tile: int) -> int:
    """The largest power of two up to ``tile`` that a short sequence needs (at least 16)."""
    size = 16
    while size < min(length, tile):
        size *= 2
    return size


def _block_sparse(kernel: Any, q: jax.Array, k: jax.Array, v: jax.Array,
                  q_canvas: canvas_lib.Canvas, kv_canvas: canvas_lib.Canvas,
                  tile: tuple[int, int], **kwargs: Any) -> jax.Array:
    """Pads to whole tiles, builds the schedule on device, runs ``kernel``, slices the padding off."""
    q_len, kv_len = q.shape[1], k.shape[1]
    q_tile, kv_tile = _tile_for(q_len, tile[0]), _tile_for(kv_len, tile[1])
    q_pad, kv_pad = schedule_lib.padded_length(q_len, q_tile), schedule_lib.padded_length(kv_len, kv_tile)
    q_canvas, kv_canvas = schedule_lib.pad_canvas(q_canvas, q_pad), schedule_lib.pad_canvas(kv_canvas, kv_pad)
    schedule = schedule_lib.tile_schedule(q_canvas, kv_canvas, q_tile=q_tile, kv_tile=kv_tile)
    out = kernel(schedule_lib.pad_sequence(q, q_pad), schedule_lib.pad_sequence(k, kv_pad),
                 schedule_lib.pad_sequence(v, kv_pad), schedule, schedule_lib.canvas_tags(q_canvas),
                 schedule_lib.canvas_tags(kv_canvas), **kwargs)
    return out[:, :q_len]


def _per_device(kernel: Any, q: jax.Array, k: jax.Array, v: jax.Array,
                q_canvas: canvas_lib.Canvas, kv_canvas: canvas_lib.Canvas) -> jax.Array:
    """``kernel(q, k, v, q_canvas, kv_canvas)``, under a mesh (``jax.set_mesh``) once per device
    on its rows and heads (sharded as the ``batch`` / ``act_heads`` logical axes say): XLA cannot partition a Pallas kernel,
    and would otherwise gather every operand onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) <= set(mesh.manual_axes):  # inside the caller's shard_map
        return kernel(q, k, v, q_canvas, kv_canvas)
    if mesh.manual_axes:
        raise ValueError(f"attention under a partly manual mesh (manual axes {mesh.manual_axes}) "
                         "is not supported; shard_map over every mesh axis or none")
    P = jax.sharding.PartitionSpec
    rules = dict(rules_for_mesh(mesh))  # the logical-axis table: rows and heads
    rows = dividing_axis(mesh, rules["batch"], q.shape[0])  # a dimension they do not divide stays whole
    heads = P(rows, None, dividing_axis(mesh, rules["act_heads"], q.shape[2], k.shape[2]), None)
    tags = jax.tree.map(lambda _: P(rows, None), q_canvas)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, tags, tags),
                         out_specs=heads, check_vma=False)(q, k, v, q_canvas, kv_canvas)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              q_canvas: canvas_lib.Canvas | None = None,
              kv_canvas: canvas_lib.Canvas | None = None,
              mask: jax.Array | None = None,
              impl: str = "auto",
              layout: Any = None,
              tile: int | tuple[int, int] | None = None,
              scale: float | None = None) -> jax.Array:
    """Attention of ``q [B,T,H,D]`` over ``k, v [B,S,KV,D]`` (GQA: ``H`` a multiple of ``KV``).

    The visibility comes either from canvases (``q_canvas`` and, for a KV cache, ``kv_canvas``)
    through :func:`dirl_jax.canvas.visible`, or from an explicit boolean ``mask [B,T,S]``
    (reference only). ``layout`` is the static :class:`~dirl_jax.attention.splash.StreamMajorLayout`
    of the canvas, required by ``splash``. ``tile`` overrides the block-sparse tile sizes
    (one size or ``(q_tile, kv_tile)``; shorter sequences use smaller powers of two).
    Returns ``[B,T,H,D]`` in ``v.dtype``; a query that sees nothing gets zeros.
    """
    if (mask is None) == (q_canvas is None):
        raise ValueError("pass exactly one of `mask` or `q_canvas`")
    impl = resolve_impl(impl, has_mask=mask is not None, layout=layout, q_len=q.shape[1])
    for names in _RECORDERS:
        names.append(impl)
    if mask is not None and impl != "reference":
        raise ValueError(f"attention impl {impl!r} needs canvases; an explicit mask runs on 'reference'")
    kv_canvas = q_canvas if kv_canvas is None else kv_canvas
    if isinstance(tile, int):
        tile = (tile, tile)
    if impl == "reference":
        if mask is None:
            mask = canvas_lib.dense_mask(q_canvas, kv_canvas)
        return reference_attention(q, k, v, mask, scale=scale)
    if impl == "tiled":  # per device too: its tile loop indexes rows, which XLA would gather
        kernel = functools.partial(_block_sparse, tiled_attention,
                                   tile=tile or DEFAULT_TILES["tiled"], scale=scale)
        return _per_device(kernel, q, k, v, q_canvas, kv_canvas)
    backend = target_platform()  # kernels interpret only where they do not run natively
    if impl == "pallas_gpu":  # interpreted (slowly) where there is no GPU: tests, CPU debugging
        from dirl_jax.attention.pallas_gpu import pallas_gpu_attention
        kernel = functools.partial(_block_sparse, pallas_gpu_attention,
                                   tile=tile or DEFAULT_TILES["pallas_gpu"], scale=scale,
                                   interpret=backend not in ("gpu", "cuda", "rocm"))
        return _per_device(kernel, q, k, v, q_canvas, kv_canvas)
    if impl == "pallas_tpu":  # interpreted where there is no TPU
        from dirl_jax.attention.pallas_tpu import pallas_tpu_attention
        kernel = functools.partial(_block_sparse, pallas_tpu_attention,
                                   tile=tile or DEFAULT_TILES["pallas_tpu"], scale=scale,
                                   interpret=backend != "tpu")
        return _per_device(kernel, q, k, v, q_canvas, kv_canvas)
    from dirl_jax.attention.splash import splash_attention
    if layout is None:
        raise ValueError("attention impl 'splash' needs `layout` (a StreamMajorLayout of the canvas)")
    if kv_canvas is not q_canvas:
        raise ValueError("attention impl 'splash' is self-attention over one canvas; use 'tiled' "
                         "with a KV cache")
    if scale is not None:
        raise ValueError("attention impl 'splash' uses the default head_dim ** -0.5 scale")
    return _per_device(lambda q, k, v, canvas, _: splash_attention(
        q, k, v, canvas.segment_ids, layout, interpret=backend != "tpu"), q, k, v, q_canvas, kv_canvas)


__all__ = ["IMPLEMENTATIONS", "attention", "recording_impls", "reference_attention", "resolve_impl",
           "target_device_kind", "target_platform", "tiled_attention"]

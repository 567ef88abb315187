"""Splash attention over stream-major canvases: static mask vs the canvas predicate, interpret-mode
kernels vs the reference attention (forward and gradients), tile skipping, shard_map, TPU lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention.reference import reference_attention
from dirl_jax.attention.splash import StreamMajorMask, splash_attention, splash_kernel
from dirl_jax.canvas import StreamMajorLayout, stream_major_canvas


def packed_rows(rng: np.random.Generator, batch: int, layout: StreamMajorLayout,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(positions, segment_ids)`` ``[batch, N]``: samples of random lengths starting at
    multiples of B (inside one slot when the layout has one), padding (-1) between and after."""
    n, b = layout.part_length, layout.block_size
    window = layout.slot or n
    positions = np.zeros((batch, n), np.int32)
    segments = np.full((batch, n), canvas_lib.PADDING_SEGMENT, np.int32)
    for row in range(batch):
        next_id = int(rng.integers(0, 1000))
        for start in range(0, n, window):
            cursor = start
            while cursor < start + window:
                if rng.random() < 0.15:  # a padding block
                    cursor += b
                    continue
                length = int(rng.integers(1, max(2, min(start + window - cursor, window // 2)) + 1))
                length = min(length, start + window - cursor)
                positions[row, cursor:cursor + length] = np.arange(length)
                segments[row, cursor:cursor + length] = next_id
                next_id += int(rng.integers(1, 3))
                cursor += -(-length // b) * b
    segments[:, -b:] = canvas_lib.PADDING_SEGMENT  # every row ends in padding (may cut a sample)
    positions[:, -b:] = 0
    return positions, segments


def random_canvas(rng: np.random.Generator, batch: int, layout: StreamMajorLayout) -> canvas_lib.Canvas:
    positions, segments = packed_rows(rng, batch, layout)
    n = layout.part_length
    return stream_major_canvas(rng.integers(0, 50, (batch, n)),
                               rng.integers(0, 50, (layout.rounds, batch, n)),
                               positions, segments, layout.block_size)


def random_qkv(rng: np.random.Generator, batch: int, length: int, heads: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32) -> tuple[jax.Array, ...]:
    shapes = [(batch, length, heads, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def splash_static_mask(layout: StreamMajorLayout) -> np.ndarray:
    """The mask exactly as Splash evaluates it on the host (``_ComputableMask.__getitem__``)."""
    return np.asarray(StreamMajorMask(layout)[:, :])


# ----------------------------------------------------------------------------- layout and mask
@pytest.mark.parametrize("kwargs,field", [
    (dict(part_length=8, block_size=0), "block_size"),
    (dict(part_length=6, block_size=4), "part_length"),
    (dict(part_length=0, block_size=4), "part_length"),
    (dict(part_length=8, block_size=4, rounds=-1), "rounds"),
    (dict(part_length=16, block_size=4, slot=6), "slot"),
    (dict(part_length=16, block_size=4, slot=12), "slot"),
])
def test_layout_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StreamMajorLayout(**kwargs)


def test_mask_equality_and_hash_follow_the_layout():
    a, b = StreamMajorMask(StreamMajorLayout(64, 4, 2)), StreamMajorMask(StreamMajorLayout(64, 4, 2))
    c = StreamMajorMask(StreamMajorLayout(64, 4, 2, slot=32))
    assert a == b and hash(a) == hash(b) and a != c
    assert a.shape == (192, 192)


@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("slot", [None, 32])
def test_static_mask_with_segments_equals_the_canvas_mask(seed, rounds, block_size, slot):
    rng = np.random.default_rng(seed)
    layout = StreamMajorLayout(part_length=96 if slot is None else 64, block_size=block_size,
                               rounds=rounds, slot=slot)
    canvas = random_canvas(rng, 3, layout)
    segments = np.asarray(canvas.segment_ids)
    streams = np.asarray(canvas.stream_ids)
    assert canvas.shape == (3, layout.length)
    assert set(np.unique(streams)) == set(range(rounds + 1))
    assert (streams[:, -layout.part_length:] == canvas_lib.CLEAN_STREAM).all()
    same_segment = segments[:, :, None] == segments[:, None, :]
    splash_mask = splash_static_mask(layout)[None] & same_segment
    expected = np.asarray(canvas_lib.dense_mask(canvas))
    real = segments >= 0  # padding rows see their own segment in Splash; their output is zeroed
    np.testing.assert_array_equal(splash_mask & real[:, :, None], expected)
    assert splash_mask.any(axis=-1).all(), "every row, padding included, must keep a key"


# ----------------------------------------------------------------------------- kernel vs reference
def check_against_reference(rng, layout, batch, heads, kv_heads, head_dim, dtype, tol):
    canvas = random_canvas(rng, batch, layout)
    q, k, v = random_qkv(rng, batch, layout.length, heads, kv_heads, head_dim, dtype)
    mask = canvas_lib.dense_mask(canvas)
    segments = canvas.segment_ids

    def splash_fn(q, k, v):
        return splash_attention(q, k, v, segments, layout, interpret=True)

    def reference_fn(q, k, v):
        return reference_attention(q, k, v, mask)

    out, splash_vjp = jax.vjp(jax.jit(splash_fn), q, k, v)
    expected, reference_vjp = jax.vjp(reference_fn, *(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == dtype and out.shape == q.shape
    padding = np.asarray(segments) < 0
    assert padding.any() and not np.asarray(out)[padding].any()
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = splash_vjp(cotangent.astype(dtype))
    expected_grads = reference_vjp(cotangent)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("rounds,block_size,part_length,heads,kv_heads,slot", [
    (0, 1, 384, 2, 2, None),  # block-causal, GQA ratio 1
    (0, 8, 256, 4, 1, 128),  # block-causal, fixed slots, ratio 4
    (1, 4, 256, 4, 2, None),  # SFT two-stream, ratio 2
    (1, 2, 256, 2, 1, 64),  # SFT with fixed slots, ratio 2
    (2, 8, 256, 4, 4, None),  # DiPO, two rounds, T = 768
    (2, 1, 128, 4, 1, 64),  # DiPO, blocks straddling parts and kernel tiles
])
def test_splash_matches_reference_fp32(seed, rounds, block_size, part_length, heads, kv_heads, slot):
    layout = StreamMajorLayout(part_length, block_size, rounds, slot)
    check_against_reference(np.random.default_rng(seed), layout, batch=2, heads=heads,
                            kv_heads=kv_heads, head_dim=32, dtype=jnp.float32, tol=1e-5)


@pytest.mark.slow
def test_splash_matches_reference_bf16(seed):
    layout = StreamMajorLayout(256, 4, 1)
    check_against_reference(np.random.default_rng(seed), layout, batch=2, heads=4, kv_heads=2,
                            head_dim=64, dtype=jnp.bfloat16, tol=3e-2)


def test_splash_rejects_bad_shapes_and_block_sizes():
    layout = StreamMajorLayout(128, 4, 1)
    q = jnp.zeros((1, 256, 2, 8))
    segments = jnp.zeros((1, 256), jnp.int32)
    with pytest.raises(ValueError, match="length 256"):
        splash_attention(q[:, :128], q[:, :128], q[:, :128], segments[:, :128], layout)
    with pytest.raises(ValueError, match="num_kv_heads"):
        splash_attention(q, q[:, :, :1].repeat(3, 2), q[:, :, :1].repeat(3, 2), segments, layout)
    with pytest.raises(ValueError, match="segment_ids"):
        splash_attention(q, q, q, segments[:, :128], layout)
    for kwargs in (dict(block_q=64), dict(block_kv=384)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            splash_attention(q, q, q, segments, layout, interpret=True, **kwargs)


# ----------------------------------------------------------------------------- tile skipping
def nonempty_tiles(mask: np.ndarray, tile: int) -> int:
    n = mask.shape[0] // tile
    return int(mask.reshape(n, tile, n, tile).any(axis=(1, 3)).sum())


def visited_tiles(layout: StreamMajorLayout, tile: int = 128) -> dict[str, int]:
    kernel = splash_kernel(layout, 2, tile, tile, True)
    return {name: int((np.asarray(getattr(kernel, name).block_mask) > 0).sum())
            for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info")}


def test_slot_skips_cross_sample_tiles_exactly():
    plain = StreamMajorLayout(1024, 4, 1)
    slotted = StreamMajorLayout(1024, 4, 1, slot=256)
    counts = {layout: visited_tiles(layout) for layout in (plain, slotted)}
    for layout, visited in counts.items():  # every kernel visits exactly the non-empty tiles
        assert set(visited.values()) == {nonempty_tiles(splash_static_mask(layout), 128)}
    assert counts[plain]["fwd_mask_info"] == 80 and counts[slotted]["fwd_mask_info"] == 32
    # The kernel grid shrinks to the longest row of non-empty tiles.
    assert splash_kernel(slotted, 2, 128, 128, True).fwd_mask_info.data_next.shape == (1, 16, 3)


# ----------------------------------------------------------------------------- sharding, TPU
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_kernels_run_per_device_under_a_mesh(seed, impl):
    """Under ``jax.set_mesh`` the dispatch runs a Pallas kernel once per device (rows over
    data x fsdp, heads over tensor); values and gradients equal the dense reference."""
    from dirl_jax.attention import attention
    from dirl_jax.mesh import AXES, batch_sharding
    rng = np.random.default_rng(seed)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), AXES)
    layout = StreamMajorLayout(128, 4, 1)
    canvas = random_canvas(rng, 8, layout)  # two rows per row-shard
    q, k, v = random_qkv(rng, 8, layout.length, 4, 2, 16)
    heads = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    canvas = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, 2, 0)), canvas)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k, v, fn):
        return jnp.sum(fn(q, k, v) * cotangent)

    kernel = lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl=impl, layout=layout)  # noqa: E731
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))  # per device, not gathered
        out = jax.jit(kernel)(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, kernel)
    mask = canvas_lib.dense_mask(canvas)
    reference = lambda q, k, v: reference_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(q, k, v)), atol=1e-5, rtol=0)
    for got, want in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v, reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * np.abs(want).max())


TPU_MESH = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(device_kind="TPU v5 lite",
                                                              num_cores=1, platform="tpu"))


@pytest.mark.parametrize("slot", [None, 512])
def test_lowers_for_tpu_forward_and_backward(slot):
    layout = StreamMajorLayout(2048, 4, 1, slot)
    q = jax.ShapeDtypeStruct((2, 4096, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((2, 4096), jnp.int32)

    def forward(q, k, v, segments):
        return splash_attention(q, k, v, segments, layout)

    def loss(q, k, v, segments):
        return jnp.sum(forward(q, k, v, segments).astype(jnp.float32) ** 2)

    with jax.sharding.use_abstract_mesh(TPU_MESH):
        for fn, kernels in ((forward, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):  # fwd; fwd, dq, dkv
            text = jax.jit(fn).trace(q, kv, kv, segments).lower(lowering_platforms=("tpu",)).as_text()
            assert text.count("tpu_custom_call") == kernels

"""The Pallas/Triton block-sparse kernel against the reference attention: compiled on a GPU,
interpreted elsewhere (the same tests, so a GPU run proves the real kernel).

Forward and gradients are compared with the dense-mask reference and ``jax.vjp`` of it on random
packed canvases; the CUDA lowering is checked without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canvases import multi_stream, random_qkv
import kernel_checks
from kernel_checks import assert_matches, random_inputs
from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import schedule as schedule_lib
from dirl_jax.attention.pallas_gpu import pallas_gpu_attention
from dirl_jax.canvas import Canvas

INTERPRET = jax.default_backend() != "gpu"
F32_TOL = dict(atol=1e-5, rtol=1e-5)


def kernel_and_reference(q_canvas: Canvas, kv_canvas: Canvas, q_tile: int, kv_tile: int,
                         scale: float | None = None):
    return kernel_checks.kernel_and_reference(pallas_gpu_attention, q_canvas, kv_canvas, q_tile,
                                              kv_tile, scale, interpret=INTERPRET)


@pytest.mark.parametrize(
    "block_size,rounds,heads,kv_heads,head_dim,length,q_tile,kv_tile",
    [
        (1, 0, 2, 2, 16, 64, 16, 16),
        (2, 1, 4, 2, 32, 128, 32, 16),
        (4, 2, 4, 1, 16, 128, 16, 32),
        (8, 1, 4, 4, 64, 256, 64, 32),
        (4, 1, 4, 2, 24, 128, 32, 32),  # head_dim padded to 32 inside
        (2, 2, 2, 1, 8, 64, 16, 16),  # head_dim padded to 16 inside
    ],
)
def test_self_attention_matches_reference(seed, block_size, rounds, heads, kv_heads, head_dim,
                                          length, q_tile, kv_tile):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=2, length=length, block_size=block_size, rounds=rounds)
    kernel, reference = kernel_and_reference(canvas, canvas, q_tile, kv_tile)
    inputs = random_inputs(rng, canvas, canvas, heads, kv_heads, head_dim)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


def test_full_partial_and_empty_tiles(seed):
    """Two packed block-causal samples: a schedule with every kind of tile (the random canvases
    above rarely have full ones)."""
    rng = np.random.default_rng(seed)
    length, first = 128, 16 * int(rng.integers(2, 6))
    positions = np.concatenate([np.arange(first), np.arange(length - first)])[None]
    segments = (np.arange(length) >= first).astype(np.int32)[None]
    canvas = canvas_lib.block_causal_canvas(positions, positions, segments, block_size=8)
    table = np.asarray(schedule_lib.tile_schedule(canvas, q_tile=16, kv_tile=16).table)
    assert {canvas_lib.TILE_EMPTY, canvas_lib.TILE_PARTIAL, canvas_lib.TILE_FULL} <= set(table.flat)
    kernel, reference = kernel_and_reference(canvas, canvas, 16, 16)
    inputs = random_inputs(rng, canvas, canvas, 2, 1, 16)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


@pytest.mark.parametrize("q_len,q_tile,kv_tile", [(16, 16, 32), (32, 16, 16)])
def test_query_window_against_longer_key_canvas(seed, q_len, q_tile, kv_tile):
    """A window of queries (one block's worth: the decoding case) over the whole key canvas,
    with an explicit logit scale."""
    rng = np.random.default_rng(seed)
    kv_canvas = multi_stream(rng, batch=2, length=128, block_size=4, rounds=1, max_segments=2)
    used = int(np.max(np.sum(kv_canvas.segment_ids >= 0, axis=1)))
    start = int(rng.integers(0, -(-used // q_len))) * q_len
    q_canvas = jax.tree.map(lambda x: x[:, start:start + q_len], kv_canvas)
    kernel, reference = kernel_and_reference(q_canvas, kv_canvas, q_tile, kv_tile, scale=0.3)
    inputs = random_inputs(rng, q_canvas, kv_canvas, 4, 2, 32)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


def test_bfloat16_inputs(seed):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=2, length=128, block_size=4, rounds=1)
    kernel, reference = kernel_and_reference(canvas, canvas, 32, 32)
    inputs = random_inputs(rng, canvas, canvas, 4, 2, 32, jnp.bfloat16)
    got = kernel(*inputs)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    # bf16 probabilities and outputs: errors of a few bf16 ulps of values of order 1-10.
    assert_matches(got, reference(*inputs), atol=3e-2, rtol=2e-2)


def test_rows_without_visible_keys_and_empty_tiles(seed):
    """Padding rows give zero outputs and gradients; an all-padding tile is never read (NaN there
    would poison the result otherwise)."""
    rng = np.random.default_rng(seed)
    tile = 16
    canvas = schedule_lib.pad_canvas(multi_stream(rng, batch=2, length=64, block_size=2, rounds=1),
                              64 + tile)
    q, k, v, d_out = random_inputs(rng, canvas, canvas, 2, 1, 16)
    kernel, reference = kernel_and_reference(canvas, canvas, tile, tile)
    expected = reference(q, k, v, d_out)
    poisoned = (x.at[:, -tile:].set(jnp.nan) for x in (q, k, v))
    out, (dq, dk, dv) = kernel(*poisoned, d_out)
    assert_matches((out, (dq, dk, dv)), expected, **F32_TOL)
    padding = np.asarray(canvas.segment_ids) < 0
    assert padding.sum() >= 2 * tile
    for x in (out, dq, dk, dv):
        assert not np.asarray(x)[padding].any()


@pytest.mark.parametrize("problem", ["tile", "length", "dtype"])
def test_rejects_bad_inputs(problem):
    canvas = multi_stream(np.random.default_rng(0), batch=1, length=64, block_size=4, rounds=1)
    q, k, v = (jnp.asarray(x) for x in random_qkv(np.random.default_rng(0), 1, 64, 64, 2, 2, 16))
    tags = schedule_lib.canvas_tags(canvas)
    schedule = schedule_lib.tile_schedule(canvas, q_tile=8 if problem == "tile" else 16, kv_tile=16)
    if problem == "length":
        q = q[:, :40]
    if problem == "dtype":
        v = v.astype(jnp.bfloat16)
    match = {"tile": "powers of two", "length": "multiples of the tiles", "dtype": "share a dtype"}
    with pytest.raises(ValueError, match=match[problem]):
        pallas_gpu_attention(q, k, v, schedule, tags, tags, interpret=INTERPRET)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_to_triton_for_cuda(head_dim):
    """The kernels lower through Pallas->Triton for CUDA (no GPU needed): 1 call forward, 3 with
    the gradient (forward, dq, dk/dv)."""
    batch, length, heads, kv_heads = 2, 512, 8, 2

    def attend(q, k, v, segment_ids, stream_ids, block_ids):
        canvas = Canvas(tokens=segment_ids, positions=block_ids, segment_ids=segment_ids,
                        stream_ids=stream_ids, block_ids=block_ids)
        schedule = schedule_lib.tile_schedule(canvas, q_tile=64, kv_tile=64)
        tags = schedule_lib.canvas_tags(canvas)
        return pallas_gpu_attention(q, k, v, schedule, tags, tags)

    def loss(q, k, v, *tags):
        return jnp.sum(attend(q, k, v, *tags).astype(jnp.float32) ** 2)

    shapes = (jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16),
              *(jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16),) * 2,
              *(jax.ShapeDtypeStruct((batch, length), jnp.int32),) * 3)
    h200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H200", num_cores=1, platform="cuda"))  # the GPU it is lowered for
    for fn, calls in ((attend, 1), (jax.value_and_grad(loss, argnums=(0, 1, 2)), 3)):
        with jax.sharding.use_abstract_mesh(h200):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("@__gpu$xla.gpu.triton(") == calls
        assert "canvas_attention_fwd" in text
        assert ("canvas_attention_dkv" in text) == (calls == 3)

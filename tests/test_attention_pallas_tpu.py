"""The Pallas/Mosaic block-sparse kernel (TPU) against the reference attention: interpreted here,
the same tests compile the real kernel on a TPU.

Forward and gradients are compared with the dense-mask reference and ``jax.vjp`` of it on random
packed canvases, on the DiPO canvas of real step maps (the mask this kernel exists for) and on a
query window over a longer key canvas; the Mosaic lowering is checked without a TPU
(tests/test_compile_check.py compiles it with the TPU compiler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canvases import multi_stream, random_qkv
import kernel_checks
from kernel_checks import F32_TOL, assert_matches, random_inputs
from dirl_jax import canvas as canvas_lib
from dirl_jax import dipo
from dirl_jax.attention import schedule as schedule_lib
from dirl_jax.attention.pallas_tpu import pallas_tpu_attention
from dirl_jax.canvas import Canvas

INTERPRET = jax.default_backend() != "tpu"


def kernel_and_reference(q_canvas: Canvas, kv_canvas: Canvas, q_tile: int, kv_tile: int,
                         scale: float | None = None):
    return kernel_checks.kernel_and_reference(pallas_tpu_attention, q_canvas, kv_canvas, q_tile, kv_tile,
                                              scale, interpret=INTERPRET)


@pytest.mark.parametrize(
    "block_size,rounds,heads,kv_heads,head_dim,length,q_tile,kv_tile",
    [
        (4, 2, 4, 2, 16, 256, 128, 128),  # two heads per kv head, 2 x 2 tiles
        (8, 3, 2, 1, 32, 512, 128, 256),  # unequal tiles, several kv-tiles per q-tile
        (2, 1, 2, 2, 16, 64, 64, 64),  # a canvas shorter than 128: one whole-length tile
        (4, 2, 4, 2, 128, 256, 128, 128),  # head_dim 128: heads as column blocks, no transposes
    ],
)
def test_self_attention_matches_reference(seed, block_size, rounds, heads, kv_heads, head_dim,
                                          length, q_tile, kv_tile):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=2, length=length, block_size=block_size, rounds=rounds)
    kernel, reference = kernel_and_reference(canvas, canvas, q_tile, kv_tile)
    inputs = random_inputs(rng, canvas, canvas, heads, kv_heads, head_dim)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


def test_dipo_canvas_of_real_step_maps(seed):
    """The multi-round canvas DiPO scores (step maps of dynamic unmasking: uneven rounds per
    block), packed several trajectories to a row: every tile kind, data-dependent layout."""
    rng = np.random.default_rng(seed)
    block = 4
    trajectories = []
    for _ in range(5):
        prompt = rng.integers(5, 50, int(rng.integers(3, 20))).tolist()
        response = rng.integers(5, 50, int(rng.integers(8, 40))).tolist()
        step_map = []
        for start in range(0, len(response), block):
            size = min(block, len(response) - start)
            step_map += (rng.permutation(size) % int(rng.integers(1, size + 1)) + 1).tolist()
        trajectories.append(dipo.Trajectory(prompt=prompt, response=response, step_map=step_map,
                                       num_loss_tokens=len(response)))
    canvas = dipo.pack_rounds(trajectories, block_size=block, mask_token_id=1,
                              row_length=256).canvas
    table = np.asarray(schedule_lib.tile_schedule(canvas, q_tile=128, kv_tile=128).table)
    assert canvas_lib.TILE_PARTIAL in set(table.flat)
    kernel, reference = kernel_and_reference(canvas, canvas, 128, 128)
    inputs = random_inputs(rng, canvas, canvas, 4, 1, 16)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


def test_full_tiles_and_padding_that_is_never_read(seed):
    """Two packed block-causal samples (full, partial and empty tiles) and a padding tile of NaN:
    full tiles skip the mask correctly, an empty tile is never read, padding rows are zero."""
    rng = np.random.default_rng(seed)
    length, first = 384, 128 * int(rng.integers(1, 3))
    positions = np.concatenate([np.arange(first), np.arange(length - first)])[None]
    segments = (np.arange(length) >= first).astype(np.int32)[None]
    canvas = schedule_lib.pad_canvas(
        canvas_lib.block_causal_canvas(positions, positions, segments, block_size=64), length + 128)
    table = np.asarray(schedule_lib.tile_schedule(canvas, q_tile=128, kv_tile=128).table)
    assert {canvas_lib.TILE_EMPTY, canvas_lib.TILE_PARTIAL, canvas_lib.TILE_FULL} <= set(table.flat)
    q, k, v, d_out = random_inputs(rng, canvas, canvas, 2, 1, 16)
    kernel, reference = kernel_and_reference(canvas, canvas, 128, 128)
    expected = reference(q, k, v, d_out)
    out, grads = kernel(*(x.at[:, -128:].set(jnp.nan) for x in (q, k, v)), d_out)
    assert_matches((out, grads), expected, **F32_TOL)
    padding = np.asarray(canvas.segment_ids) < 0
    for x in (out, *grads):
        assert not np.asarray(x)[padding].any()


def test_query_window_against_longer_key_canvas(seed):
    """A window of queries over the whole key canvas (a KV cache), with an explicit logit scale."""
    rng = np.random.default_rng(seed)
    kv_canvas = multi_stream(rng, batch=2, length=512, block_size=4, rounds=1, max_segments=2)
    q_canvas = jax.tree.map(lambda x: x[:, 128:256], kv_canvas)
    kernel, reference = kernel_and_reference(q_canvas, kv_canvas, 128, 256, scale=0.3)
    inputs = random_inputs(rng, q_canvas, kv_canvas, 4, 2, 32)
    assert_matches(kernel(*inputs), reference(*inputs), **F32_TOL)


def test_bfloat16_inputs(seed):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=1, length=256, block_size=4, rounds=1)
    kernel, reference = kernel_and_reference(canvas, canvas, 128, 128)
    inputs = random_inputs(rng, canvas, canvas, 4, 2, 32, jnp.bfloat16)
    got = kernel(*inputs)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    assert_matches(got, reference(*inputs), atol=3e-2, rtol=2e-2)  # a few bf16 ulps


@pytest.mark.parametrize("problem", ["tile", "length", "dtype"])
def test_rejects_bad_inputs(problem):
    canvas = multi_stream(np.random.default_rng(0), batch=1, length=256, block_size=4, rounds=1)
    q, k, v = (jnp.asarray(x) for x in random_qkv(np.random.default_rng(0), 1, 256, 256, 2, 2, 16))
    tags = schedule_lib.canvas_tags(canvas)
    schedule = schedule_lib.tile_schedule(canvas, q_tile=64 if problem == "tile" else 128,
                                          kv_tile=128)
    if problem == "length":
        q = q[:, :200]
    if problem == "dtype":
        v = v.astype(jnp.bfloat16)
    match = {"tile": r"q_tile \(64\) must be a multiple of 128", "length": "multiples of the tiles",
             "dtype": "share a dtype"}
    with pytest.raises(ValueError, match=match[problem]):
        pallas_tpu_attention(q, k, v, schedule, tags, tags, interpret=INTERPRET)


def test_lowers_to_mosaic_for_tpu():
    """Forward and gradient lower through Pallas->Mosaic for a TPU (no TPU needed): one kernel
    forward, three with the gradient (forward, dk/dv, dq)."""
    batch, length, heads, kv_heads, head_dim = 1, 1024, 4, 2, 128

    def attend(q, k, v, segment_ids, stream_ids, block_ids):
        canvas = Canvas(tokens=segment_ids, positions=block_ids, segment_ids=segment_ids,
                        stream_ids=stream_ids, block_ids=block_ids)
        schedule = schedule_lib.tile_schedule(canvas, q_tile=512, kv_tile=512)
        tags = schedule_lib.canvas_tags(canvas)
        return pallas_tpu_attention(q, k, v, schedule, tags, tags)

    def loss(q, k, v, *tags):
        return jnp.sum(attend(q, k, v, *tags).astype(jnp.float32) ** 2)

    shapes = (jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16),
              *(jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16),) * 2,
              *(jax.ShapeDtypeStruct((batch, length), jnp.int32),) * 3)
    v5p = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5p", num_cores=1, platform="tpu"))
    for fn, calls in ((attend, 1), (jax.value_and_grad(loss, argnums=(0, 1, 2)), 3)):
        with jax.sharding.use_abstract_mesh(v5p):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == calls
        assert ("canvas_attention_dkv" in text) == (calls == 3)

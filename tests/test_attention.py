"""Attention: the reference against float64 NumPy, the tiled path and the dispatch against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from canvases import multi_stream, random_qkv

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import attention, reference_attention, resolve_impl
from dirl_jax.attention import schedule as schedule_lib


def numpy_attention(q, k, v, mask):
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
    probs = np.nan_to_num(probs)  # rows with no visible key -> zeros
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2)])
def test_reference_attention_matches_float64_numpy(seed, heads, kv_heads):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 7, heads, 8))
    k = rng.standard_normal((2, 9, kv_heads, 8))
    v = rng.standard_normal((2, 9, kv_heads, 8))
    mask = rng.random((2, 7, 9)) < 0.5
    mask[0, 3] = False  # a query that sees nothing
    out = reference_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    expected = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
    assert not np.asarray(out)[0, 3].any()


def test_attention_rejects_unknown_impl_and_ambiguous_masks():
    x = jnp.zeros((1, 2, 2, 4))
    mask = jnp.ones((1, 2, 2), bool)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'; available: auto, reference, tiled, splash, pallas_gpu, pallas_tpu"):
        attention(x, x, x, mask=mask, impl="flash")
    with pytest.raises(ValueError, match="exactly one of"):
        attention(x, x, x)


def _vjp_pair(fn, ref, q, k, v, rng):
    """Outputs and (dq, dk, dv) of ``fn`` and ``ref`` for one random cotangent."""
    out, fn_vjp = jax.vjp(fn, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    d_out = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    return (out, *fn_vjp(d_out)), (ref_out, *ref_vjp(d_out))


def _assert_close(got, want, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=name)


@pytest.mark.parametrize("block_size,heads,kv_heads,rounds", [
    (1, 2, 2, 1), (2, 4, 2, 1), (4, 4, 1, 1), (8, 4, 2, 1),
    (1, 4, 1, 0), (4, 2, 2, 0), (2, 2, 2, 2), (8, 4, 1, 2)])
def test_tiled_matches_reference_outputs_and_gradients(seed, block_size, heads, kv_heads, rounds):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(60, 140))  # odd lengths: the dispatch pads to whole tiles
    canvas = multi_stream(rng, batch=2, length=length, block_size=block_size, rounds=rounds)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 2, length, length, heads, kv_heads, 16))
    tiled = jax.jit(lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="tiled", tile=16))
    ref = lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="reference")  # noqa: E731
    _assert_close(*_vjp_pair(tiled, ref, q, k, v, rng), tol=2e-5)


def test_tiled_with_a_key_canvas_of_another_length(seed):
    """Queries of one denoising block against a cache of clean keys plus that block (rollout)."""
    rng = np.random.default_rng(seed)
    block_size, prefix = 4, int(rng.integers(5, 40))
    kv_tokens = prefix + block_size
    positions = np.arange(kv_tokens)[None]
    kv_canvas = canvas_lib.block_causal_canvas(np.zeros((1, kv_tokens)), positions,
                                               np.zeros((1, kv_tokens)), block_size)
    start = (kv_tokens - 1) // block_size * block_size
    q_canvas = canvas_lib.block_causal_canvas(np.zeros((1, kv_tokens - start)), positions[:, start:],
                                              np.zeros((1, kv_tokens - start)), block_size)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 1, kv_tokens - start, kv_tokens, 4, 2, 8))
    got = _vjp_pair(lambda q, k, v: attention(q, k, v, q_canvas=q_canvas, kv_canvas=kv_canvas,
                                              impl="tiled", tile=8),
                    lambda q, k, v: attention(q, k, v, q_canvas=q_canvas, kv_canvas=kv_canvas,
                                              impl="reference"), q, k, v, rng)
    _assert_close(*got, tol=2e-5)


def test_tiled_bf16_within_bf16_tolerance(seed):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=2, length=96, block_size=4, rounds=1)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(rng, 2, 96, 96, 4, 2, 32))
    got, want = _vjp_pair(lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="tiled", tile=32),
                          lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="reference"),
                          q, k, v, rng)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    _assert_close(got, want, tol=3e-2)


def test_tiled_rows_that_see_nothing_are_zero_with_zero_gradient(seed):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=1, length=64, block_size=4, rounds=1)
    padding = np.asarray(canvas.segment_ids[0]) < 0
    assert padding.any()
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 1, 64, 64, 2, 2, 8))
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="tiled", tile=16),
                       q, k, v)
    dq, dk, dv = vjp(jnp.ones_like(out))
    assert not np.asarray(out)[0, padding].any()
    assert not np.asarray(dq)[0, padding].any()
    assert not np.asarray(dk)[0, padding].any() and not np.asarray(dv)[0, padding].any()


def test_tile_schedule_lists_exactly_the_nonempty_tiles(seed):
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=3, length=96, block_size=2, rounds=2)
    schedule = schedule_lib.tile_schedule(canvas, q_tile=16, kv_tile=8)
    dense = np.asarray(canvas_lib.dense_mask(canvas)).reshape(3, 6, 16, 12, 8)
    nonempty = dense.any(axis=(2, 4))
    for lists, table in ((schedule.kv_of_q, nonempty), (schedule.q_of_kv, nonempty.transpose(0, 2, 1))):
        ids, kinds, counts = (np.asarray(x) for x in (lists.ids, lists.kinds, lists.counts))
        for b, r in np.ndindex(counts.shape):
            listed = ids[b, r, :counts[b, r]]
            assert listed.tolist() == np.flatnonzero(table[b, r]).tolist()
            assert (kinds[b, r, :counts[b, r]] != canvas_lib.TILE_EMPTY).all()
            assert (ids[b, r, counts[b, r]:] == (listed[-1] if len(listed) else 0)).all()
    assert int(schedule.num_nonempty) == nonempty.sum()


def test_tiled_backward_memory_is_linear_in_length():
    """At 2n = 4096 the dense scores of one head alone would take 64 MiB; the tiled grad needs far less."""
    length, heads, dim = 4096, 2, 32
    positions = jnp.tile(jnp.arange(length // 2), (1,))[None]
    canvas, _ = canvas_lib.two_stream_canvas(jnp.zeros_like(positions), jnp.zeros_like(positions),
                                            positions, jnp.zeros_like(positions), 4)
    spec = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)

    def loss(q, k, v, impl):
        return attention(q, k, v, q_canvas=canvas, impl=impl).sum()

    def temp_bytes(impl):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        return grad.lower(spec, spec, spec, impl).compile().memory_analysis().temp_size_in_bytes

    scores_bytes = length * length * 4
    assert temp_bytes("reference") > heads * scores_bytes  # the check can tell the two apart
    assert temp_bytes("tiled") < scores_bytes // 4


def test_tiled_inside_shard_map_over_batch_and_heads(seed):
    rng = np.random.default_rng(seed)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    canvas = multi_stream(rng, batch=4, length=64, block_size=4, rounds=1)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, 4, 64, 64, 4, 2, 8))
    P = jax.sharding.PartitionSpec
    act, tags = P("data", None, "tensor", None), P("data", None)

    @jax.jit
    def sharded(q, k, v, canvas):
        body = lambda q, k, v, c: attention(q, k, v, q_canvas=c, impl="tiled", tile=16)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(act, act, act, tags), out_specs=act)(
            q, k, v, canvas)

    got = _vjp_pair(lambda q, k, v: sharded(q, k, v, canvas),
                    lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="reference"),
                    q, k, v, rng)
    _assert_close(*got, tol=2e-5)


@pytest.mark.parametrize("rows", [2, 8])
def test_tiled_under_a_mesh_runs_per_device_even_when_rows_do_not_divide(seed, rows):
    """Under ``jax.set_mesh`` the block-sparse kernels run once per device on its rows; rows that
    do not divide the mesh (an evaluation batch of 2 on 8 devices) stay whole instead of failing."""
    from dirl_jax.mesh import make_mesh
    rng = np.random.default_rng(seed)
    canvas = multi_stream(rng, batch=rows, length=64, block_size=4, rounds=1)
    q, k, v = (jnp.asarray(x) for x in random_qkv(rng, rows, 64, 64, 4, 2, 8))
    mesh = make_mesh((8, 1, 1), jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: attention(q, k, v, q_canvas=canvas, impl="tiled", tile=16))(
            q, k, v)
    want = attention(q, k, v, q_canvas=canvas, impl="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_auto_resolves_by_platform():
    assert resolve_impl("auto", platform="cpu") == "tiled"
    assert resolve_impl("auto", platform="gpu") == "pallas_gpu"
    assert resolve_impl("auto", platform="tpu") == "pallas_tpu"  # a data-dependent mask (DiPO)
    assert resolve_impl("auto", platform="tpu",
                        layout=canvas_lib.StreamMajorLayout(64, 4, rounds=1)) == "splash"
    for kind, want in (("TPU v5", "splash"), ("TPU v5 lite", "splash"), ("TPU v6 lite", "pallas_tpu")):
        assert resolve_impl("auto", platform="tpu", device_kind=kind,  # v6e: XLA:TPU aborts on Splash
                            layout=canvas_lib.StreamMajorLayout(64, 4, rounds=1)) == want, kind
    # Splash tiles are 128 long: other canvas lengths run the schedule-driven TPU kernel.
    assert resolve_impl("auto", platform="tpu",
                        layout=canvas_lib.StreamMajorLayout(40, 4, rounds=1)) == "pallas_tpu"
    assert resolve_impl("auto", has_mask=True, platform="gpu") == "reference"
    assert resolve_impl("auto", platform="gpu", q_len=4) == "reference"  # one decoding block
    assert resolve_impl("auto", platform="cpu", q_len=65) == "tiled"
    x = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="needs canvases"):
        attention(x, x, x, mask=jnp.ones((1, 2, 2), bool), impl="tiled")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["splash", "pallas_gpu", "pallas_tpu"])
def test_model_runs_every_kernel_through_the_dispatch(seed, impl):
    """The SFT forward with each accelerator kernel (interpreted on CPU) equals the reference."""
    from conftest import random_model, tiny_config
    rng = np.random.default_rng(seed)
    config = tiny_config(heads=4, kv_heads=2, head_dim=16, block_size=4)
    model = random_model(config, seed)
    length = 64
    tokens = rng.integers(0, config.vocab_size, (2, length))
    noisy = np.where(rng.random(tokens.shape) < 0.5, config.mask_token_id, tokens)
    segment_ids = np.repeat([[0] * 24 + [1] * 36 + [-1] * 4], 2, axis=0)
    positions = np.where(segment_ids == 1, np.arange(length) - 24, np.arange(length))
    canvas, _ = canvas_lib.two_stream_canvas(tokens, noisy, positions, segment_ids, 4)
    layout = canvas_lib.StreamMajorLayout(length, 4, rounds=1)
    real = np.asarray(canvas.segment_ids) >= 0
    got = np.asarray(model(canvas=canvas, attn_impl=impl, attn_layout=layout))[real]
    want = np.asarray(model(canvas=canvas, attn_impl="reference"))[real]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

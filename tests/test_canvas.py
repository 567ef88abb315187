"""Canvas layouts and masks against an independent restatement of DIRL_SPEC §1.4."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib


def spec_block_diff_mask(n: int, block_size: int) -> np.ndarray:
    """``block_diff_mask`` of the original for one segment: indices [0, 2n), noisy first."""
    idx = np.arange(2 * n)
    noisy = idx < n
    blk = (idx % n) // block_size
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    return (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))


def spec_row_mask(lengths: list[int], pad: int, block_size: int) -> np.ndarray:
    """The stream-major row ``[noisy copies of all tokens | clean copies]``: every segment's
    noisy and clean slots form the original's per-segment mask; padding sees nothing."""
    length = sum(lengths) + pad
    mask = np.zeros((2 * length, 2 * length), bool)
    start = 0
    for n in lengths:
        slots = np.r_[start:start + n, length + start:length + start + n]
        mask[np.ix_(slots, slots)] = spec_block_diff_mask(n, block_size)
        start += n
    return mask


def row_inputs(lengths: list[int], pad: int, rng: np.random.Generator):
    length = sum(lengths) + pad
    segment_ids = np.full(length, -1)
    positions = np.zeros(length, int)
    start = 0
    for s, n in enumerate(lengths):
        segment_ids[start:start + n] = s
        positions[start:start + n] = np.arange(n)
        start += n
    clean = rng.integers(0, 50, length)
    noisy = np.where(rng.random(length) < 0.5, 99, clean)
    return clean, noisy, positions, segment_ids


segments = st.lists(st.integers(1, 12), min_size=1, max_size=4)
block_sizes = st.sampled_from([1, 2, 4, 8])


@settings(max_examples=60, deadline=None)
@given(lengths=segments, pad=st.integers(0, 3), block_size=block_sizes, seed=st.integers(0, 2**31))
def test_two_stream_mask_matches_spec(lengths, pad, block_size, seed):
    clean, noisy, positions, segment_ids = row_inputs(lengths, pad, np.random.default_rng(seed))
    canvas, noisy_slot = canvas_lib.two_stream_canvas(
        clean[None], noisy[None], positions[None], segment_ids[None], block_size)
    np.testing.assert_array_equal(canvas_lib.dense_mask(canvas)[0],
                                  spec_row_mask(lengths, pad, block_size))
    # Layout: [noisy copies | clean copies], both at the tokens' own positions.
    tokens, pos = np.asarray(canvas.tokens[0]), np.asarray(canvas.positions[0])
    length = len(clean)
    np.testing.assert_array_equal(tokens[:length], noisy)
    np.testing.assert_array_equal(tokens[length:], clean)
    np.testing.assert_array_equal(pos, np.r_[positions, positions])
    np.testing.assert_array_equal(tokens[np.asarray(noisy_slot[0])], noisy)


@settings(max_examples=40, deadline=None)
@given(lengths=segments, pad=st.integers(0, 3), block_size=block_sizes, seed=st.integers(0, 2**31))
def test_block_causal_mask_matches_spec(lengths, pad, block_size, seed):
    clean, _, positions, segment_ids = row_inputs(lengths, pad, np.random.default_rng(seed))
    canvas = canvas_lib.block_causal_canvas(clean[None], positions[None], segment_ids[None], block_size)
    blk = positions // block_size
    same = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] >= 0)
    expected = same & (blk[None, :] <= blk[:, None])
    np.testing.assert_array_equal(canvas_lib.dense_mask(canvas)[0], expected)


@settings(max_examples=40, deadline=None)
@given(lengths=segments, block_size=block_sizes, tile=st.sampled_from([1, 2, 4, 8]),
       seed=st.integers(0, 2**31))
def test_block_table_summarises_dense_mask(lengths, block_size, tile, seed):
    total = sum(lengths)
    pad = (-total) % tile
    clean, noisy, positions, segment_ids = row_inputs(lengths, pad, np.random.default_rng(seed))
    canvas, _ = canvas_lib.two_stream_canvas(clean[None], noisy[None], positions[None],
                                             segment_ids[None], block_size)
    q_tile, kv_tile = tile, max(1, tile // 2)
    table = np.asarray(canvas_lib.block_table(canvas, q_tile=q_tile, kv_tile=kv_tile))[0]
    dense = np.asarray(canvas_lib.dense_mask(canvas))[0]
    n = dense.shape[0]
    tiles = dense.reshape(n // q_tile, q_tile, n // kv_tile, kv_tile)
    expected = np.where(tiles.all(axis=(1, 3)), canvas_lib.TILE_FULL,
                        np.where(tiles.any(axis=(1, 3)), canvas_lib.TILE_PARTIAL, canvas_lib.TILE_EMPTY))
    np.testing.assert_array_equal(table, expected)


def test_block_table_rejects_non_dividing_tiles():
    canvas = canvas_lib.block_causal_canvas(np.zeros((1, 6)), np.arange(6)[None], np.zeros((1, 6)), 2)
    with pytest.raises(ValueError, match="must divide"):
        canvas_lib.block_table(canvas, q_tile=4, kv_tile=2)


def test_noisy_copies_see_only_their_own_block_and_earlier_clean_blocks():
    # One clean segment of 3 blocks (B=2) and two noisy copies (streams 1, 2) of block 1.
    block_size = 2
    clean_pos = np.arange(6)
    pos = np.concatenate([clean_pos, [2, 3], [2, 3]])
    stream = np.array([0] * 6 + [1, 1, 2, 2])
    canvas = canvas_lib.Canvas(tokens=np.zeros((1, 10)), positions=pos[None],
                               segment_ids=np.zeros((1, 10), int), stream_ids=stream[None],
                               block_ids=(pos // block_size)[None])
    mask = np.asarray(canvas_lib.dense_mask(canvas))[0]
    copy1 = mask[6]
    np.testing.assert_array_equal(np.flatnonzero(copy1), [0, 1, 6, 7])
    copy2 = mask[9]
    np.testing.assert_array_equal(np.flatnonzero(copy2), [0, 1, 8, 9])
    assert not mask[:6, 6:].any()  # the clean stream never sees a noisy copy


def test_changing_a_noisy_token_changes_logits_only_inside_its_noisy_block(seed):
    rng = np.random.default_rng(seed)
    config = tiny_config(block_size=4)
    model = random_model(config, seed)
    lengths = [11, 6]
    clean, noisy, positions, segment_ids = row_inputs(lengths, 2, rng)
    noisy = np.where(noisy == 99, config.mask_token_id, noisy)
    canvas, noisy_slot = canvas_lib.two_stream_canvas(clean[None], noisy[None], positions[None],
                                                      segment_ids[None], config.block_size)
    i = int(rng.integers(0, sum(lengths)))
    slot = int(noisy_slot[0, i])
    tokens = np.array(canvas.tokens)
    tokens[0, slot] = (tokens[0, slot] + 1 + rng.integers(0, config.vocab_size - 2)) % config.vocab_size
    before = np.asarray(model(canvas=canvas))[0]
    after = np.asarray(model(canvas=canvas.replace(tokens=tokens)))[0]
    changed = np.abs(after - before).max(axis=-1) > 0
    seg, stream, blk = (np.asarray(x[0]) for x in (canvas.segment_ids, canvas.stream_ids, canvas.block_ids))
    own_block = (seg == seg[slot]) & (stream == stream[slot]) & (blk == blk[slot])
    assert changed[slot]
    assert not changed[~own_block].any()

"""Random canvases for the attention tests: packed segments of odd lengths, every layout."""

from __future__ import annotations

import numpy as np

from dirl_jax import canvas as canvas_lib
from dirl_jax.canvas import Canvas


def _segment_lengths(rng: np.random.Generator, total: int, max_segments: int) -> list[int]:
    """Random positive lengths summing to at most ``total`` (the rest is row padding)."""
    count = int(rng.integers(1, max_segments + 1))
    cuts = np.sort(rng.choice(np.arange(1, total), size=min(count, total - 1), replace=False))
    lengths = np.diff(np.concatenate([[0], cuts])).tolist()
    return [n for n in lengths if n > 0]


def _stack(rows: list[dict[str, list[int]]], length: int) -> Canvas:
    fields = {}
    fill = {"tokens": 0, "positions": 0, "segment_ids": canvas_lib.PADDING_SEGMENT,
            "stream_ids": canvas_lib.CLEAN_STREAM, "block_ids": 0}
    for name, value in fill.items():
        out = np.full((len(rows), length), value, np.int32)
        for b, row in enumerate(rows):
            out[b, :len(row[name])] = row[name]
        fields[name] = out
    return Canvas(**fields)


def multi_stream(rng: np.random.Generator, *, batch: int, length: int, block_size: int,
                 rounds: int, max_segments: int = 3, vocab: int = 50) -> Canvas:
    """Rows of packed segments; each segment is laid out as noisy copies (streams ``1..rounds``,
    each holding a random subset of the segment's blocks) followed by its clean copy.

    ``rounds=1`` with every block kept is the SFT two-stream layout; ``rounds=0`` is
    block-causal. The layout fills at most ``length`` slots per row; the rest is padding.
    """
    rows = []
    for _ in range(batch):
        row: dict[str, list[int]] = {k: [] for k in
                                     ("tokens", "positions", "segment_ids", "stream_ids", "block_ids")}
        budget = length
        for seg, n in enumerate(_segment_lengths(rng, max(2, length // (rounds + 1)), max_segments)):
            blocks = np.arange(n) // block_size
            copies = []
            for stream in range(1, rounds + 1):
                keep = rng.random(blocks.max() + 1) < 0.7
                copies.append((stream, np.flatnonzero(keep[blocks])))
            copies.append((canvas_lib.CLEAN_STREAM, np.arange(n)))
            size = sum(len(idx) for _, idx in copies)
            if size > budget:
                break
            budget -= size
            for stream, idx in copies:
                row["tokens"] += rng.integers(0, vocab, len(idx)).tolist()
                row["positions"] += idx.tolist()
                row["segment_ids"] += [seg] * len(idx)
                row["stream_ids"] += [stream] * len(idx)
                row["block_ids"] += (idx // block_size).tolist()
        rows.append(row)
    return _stack(rows, length)


def random_qkv(rng: np.random.Generator, batch: int, q_len: int, kv_len: int, heads: int,
               kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    return q, k, v

"""Reward functions by name (DIRL_SPEC §3.2) and their weighted sum.

Every function maps one :class:`Response` to a float. Truncation is the engine's finish reason
(``length``), not the original's token-count test that ignores the block overflow (§8.16).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

from dirl_jax.rewards.extract import extract_last_boxed


@dataclasses.dataclass(frozen=True)
class Response:
    """What the rewards see of one sampled response."""

    text: str
    correct: bool  # graded by :func:`dirl_jax.rewards.grade`
    num_tokens: int
    max_tokens: int
    truncated: bool
    tokens_per_step: float  # the whole decoded response over its denoising steps
    block_size: int


def _cosine(x: float, horizon: float, at_end: float, at_start: float) -> float:
    """``at_start`` at x = 0 falling to ``at_end`` at x = horizon along half a cosine."""
    return at_start - (at_start - at_end) * (1 - math.cos(math.pi * x / horizon)) / 2


def accuracy(r: Response) -> float:
    return float(r.correct and not r.truncated)


def binary(r: Response) -> float:
    return 1.0 if accuracy(r) else -1.0


def cosine(r: Response) -> float:
    if r.truncated or r.num_tokens >= r.max_tokens:
        return -0.5
    n = min(r.num_tokens, r.max_tokens)
    return _cosine(n, r.max_tokens, 0.5, 1.0) if accuracy(r) else _cosine(n, r.max_tokens, 0.0, -0.5)


def boxed(r: Response) -> float:
    return 0.1 if extract_last_boxed(r.text) is not None else 0.0


def repetition(r: Response) -> float:
    words = r.text.split()
    if len(words) < 3:
        return 0.0
    grams = list(zip(words, words[1:], words[2:]))
    return -(1 - len(set(grams)) / len(grams))


def length(r: Response) -> float:
    return 0.0 if r.truncated else r.num_tokens / r.max_tokens


def think_block_first(r: Response) -> float:
    """``format``: the response opens with a closed ``<think>`` block. The original's pattern
    also demands that nothing but whitespace follow ``</think>``, which rewards answer-less
    responses and is 0 on every real one (the text ends with ``<|im_end|>``, DIRL_SPEC §3.2)."""
    return float(re.match(r"^\s*<think>.*?</think>", r.text, re.DOTALL) is not None)


def think_format(r: Response) -> float:
    """The original's ``think_format``: ``<think>`` prepended when the text does not open with
    it, then a closed think block ending a line (MULTILINE ``$``)."""
    text = r.text if r.text.lstrip().startswith("<think>") else "<think>" + r.text
    return float(re.match(r"^\s*<think>.*?</think>\s*$", text, re.DOTALL | re.MULTILINE) is not None)


def soft_overlong(r: Response) -> float:
    """0 up to half of ``max_tokens``, then falling linearly to -1 at ``max_tokens``."""
    half = r.max_tokens / 2
    return min(-(r.num_tokens - half) / half, 0.0)


def _speed_wrong(r: Response) -> float:
    """0 at one token per step falling to -0.5 at a whole block per step."""
    horizon = r.block_size - 1
    x = min(max(r.tokens_per_step - 1, 0.0), horizon)
    return _cosine(x, horizon, -0.5, 0.0) if horizon else 0.0


def speed(r: Response) -> float:
    """Rewards decoding more tokens per step: correct 0.5 at one token per step rising to 1.0
    at a whole block per step; wrong as :func:`_speed_wrong`."""
    if not accuracy(r):
        return _speed_wrong(r)
    horizon = r.block_size - 1
    x = min(max(r.tokens_per_step - 1, 0.0), horizon)
    return _cosine(x, horizon, 1.0, 0.5) if horizon else 1.0


def speed_penalty(r: Response) -> float:
    """``speed`` for wrong responses, a flat 0.5 for correct ones."""
    return 0.5 if accuracy(r) else _speed_wrong(r)


REWARDS: dict[str, Callable[[Response], float]] = {
    "accuracy": accuracy, "binary": binary, "cosine": cosine, "boxed": boxed,
    "repetition": repetition, "length": length, "format": think_block_first,
    "think_format": think_format, "soft_overlong": soft_overlong, "speed": speed,
    "speed_penalty": speed_penalty,
}


def weighted_rewards(responses: Sequence[Response], names: Sequence[str],
                     weights: Sequence[float] | None = None) -> np.ndarray:
    """``Σ_f w_f · f(response)`` for every response (weights default to 1)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; available: {', '.join(REWARDS)}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"reward weights: {len(weights)} given for {len(names)} rewards {list(names)}")
    return np.array([sum(w * REWARDS[n](r) for n, w in zip(names, weights)) for r in responses])

"""DiPO building blocks: step maps → rounds → one packed multi-round canvas, advantages, the loss.

Trajectory-exact log-probs (DIRL_SPEC §4.2–4.3). A response decoded block by block is scored by
re-creating, for every denoising step, the block exactly as the sampler saw it: the tokens of that
block committed at earlier steps are visible, the rest are masks, and every earlier block is clean.
Round ``r`` of a response holds, for every block, the state at the start of that block's ``r``-th
step. Instead of one two-stream forward per round (the original: ``rounds x 2L`` tokens, padded),
:func:`pack_rounds` lays out one canvas per row: each trajectory's clean stream once, followed by
one noisy copy of each (block, round) that is actually needed (stream id ``r + 1``). The canvas
predicate gives every noisy copy its own block and the clean prefix, so one forward scores every
committed token with the conditional it was sampled from.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dirl_jax import canvas as canvas_lib

NOT_RESPONSE = -1


def expand_rounds(step_map: np.ndarray, block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """DiRL's trajectory expansion of one row (DIRL_SPEC §4.2).

    ``step_map [L]`` holds the 1-based step of every response token and ``-1`` (or 0) elsewhere;
    blocks are aligned at position 0. Returns one ``(p_mask, masked)`` pair of ``bool[L]`` per
    round: ``p_mask`` = the tokens committed at each block's earliest remaining step (scored in
    this round), ``masked`` = the tokens not yet committed before that step (masks in the noisy
    copy). Blocks without remaining steps are inactive in a round.
    """
    steps = np.where(np.asarray(step_map) > 0, np.asarray(step_map), NOT_RESPONSE).astype(np.int64)
    blocks = np.arange(len(steps)) // block_size
    rounds = []
    while (steps > 0).any():
        first = np.full(blocks.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(first, blocks[steps > 0], steps[steps > 0])
        current = first[blocks]
        p_mask = (steps > 0) & (steps == current)
        masked = (steps > 0) & (steps >= current)
        rounds.append((p_mask, masked))
        steps = np.where(p_mask, NOT_RESPONSE, steps)
    return rounds


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One sampled response: ``prompt`` and ``response`` token ids, the response's ``step_map``,
    ``num_loss_tokens`` (tokens up to and including the first stop token; later tokens of the
    final block stay in the canvas as context but carry no loss) and its ``advantage``."""

    prompt: Sequence[int]
    response: Sequence[int]
    step_map: Sequence[int]
    num_loss_tokens: int
    advantage: float = 0.0


@dataclasses.dataclass(frozen=True)
class PackedRounds:
    """Canvas rows and the slots to score, as host arrays (``[rows, length]`` / ``[num_scored]``).

    ``score_*`` list every committed response token once: canvas row and slot of its noisy copy
    in the round that committed it, its token id, its trajectory and whether it carries loss.
    """

    canvas: canvas_lib.Canvas
    score_row: np.ndarray
    score_slot: np.ndarray
    score_token: np.ndarray
    score_trajectory: np.ndarray
    score_loss: np.ndarray
    tokens_per_trajectory: np.ndarray  # canvas slots used by each trajectory


def _trajectory_layout(traj: Trajectory, block_size: int, mask_token_id: int) -> dict[str, np.ndarray]:
    """The clean stream and the needed noisy block copies of one trajectory, plus its scored slots."""
    tokens = np.asarray(list(traj.prompt) + list(traj.response), np.int32)
    length, prompt_len = len(tokens), len(traj.prompt)
    step_map = np.r_[np.full(prompt_len, NOT_RESPONSE), np.asarray(traj.step_map)]
    if len(traj.step_map) != len(traj.response) or (np.asarray(traj.step_map) < 1).any():
        raise ValueError("step_map: needs one positive step per response token, got "
                         f"{len(traj.step_map)} for {len(traj.response)} tokens")
    positions = np.arange(length)
    parts = {"tokens": [tokens], "positions": [positions],
             "stream_ids": [np.full(length, canvas_lib.CLEAN_STREAM)]}
    scored_slot, scored_pos = [], []
    offset = length
    for r, (p_mask, masked) in enumerate(expand_rounds(step_map, block_size)):
        active_blocks = np.unique(positions[p_mask] // block_size)
        copy = np.concatenate([np.arange(b * block_size, min((b + 1) * block_size, length))
                               for b in active_blocks])
        parts["tokens"].append(np.where(masked[copy], mask_token_id, tokens[copy]))
        parts["positions"].append(copy)
        parts["stream_ids"].append(np.full(len(copy), r + 1))
        hit = p_mask[copy]
        scored_slot.append(offset + np.flatnonzero(hit))
        scored_pos.append(copy[hit])
        offset += len(copy)
    layout = {k: np.concatenate(v).astype(np.int32) for k, v in parts.items()}
    layout["scored_slot"] = np.concatenate(scored_slot) if scored_slot else np.zeros(0, np.int64)
    layout["scored_pos"] = np.concatenate(scored_pos) if scored_pos else np.zeros(0, np.int64)
    layout["target"] = tokens
    layout["prompt_len"] = prompt_len
    return layout


def pack_rounds(trajectories: Sequence[Trajectory], *, block_size: int, mask_token_id: int,
                row_length: int) -> PackedRounds:
    """First-fit packs the single-pass multi-round layouts of ``trajectories`` into canvas rows."""
    layouts = [_trajectory_layout(t, block_size, mask_token_id) for t in trajectories]
    rows: list[list[int]] = []
    used: list[int] = []
    for i, lay in enumerate(layouts):
        size = len(lay["tokens"])
        if size > row_length:
            raise ValueError(f"trajectory {i} needs {size} canvas slots; row_length is {row_length}")
        for r, filled in enumerate(used):
            if filled + size <= row_length:
                rows[r].append(i)
                used[r] += size
                break
        else:
            rows.append([i])
            used.append(size)
    fields = {name: np.zeros((len(rows), row_length), np.int32)
              for name in ("tokens", "positions", "stream_ids", "block_ids")}
    fields["segment_ids"] = np.full((len(rows), row_length), canvas_lib.PADDING_SEGMENT, np.int32)
    scored = {k: [] for k in ("row", "slot", "token", "trajectory", "loss")}
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members):
            lay, traj = layouts[i], trajectories[i]
            span = slice(start, start + len(lay["tokens"]))
            fields["tokens"][r, span] = lay["tokens"]
            fields["positions"][r, span] = lay["positions"]
            fields["stream_ids"][r, span] = lay["stream_ids"]
            fields["block_ids"][r, span] = lay["positions"] // block_size
            fields["segment_ids"][r, span] = segment
            scored["row"].append(np.full(len(lay["scored_slot"]), r))
            scored["slot"].append(start + lay["scored_slot"])
            scored["token"].append(lay["target"][lay["scored_pos"]])
            scored["trajectory"].append(np.full(len(lay["scored_slot"]), i))
            scored["loss"].append(lay["scored_pos"] - lay["prompt_len"] < traj.num_loss_tokens)
            start += len(lay["tokens"])
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in scored.items()}
    return PackedRounds(canvas=canvas_lib.Canvas(**fields), score_row=cat["row"],
                        score_slot=cat["slot"], score_token=cat["token"],
                        score_trajectory=cat["trajectory"], score_loss=cat["loss"].astype(bool),
                        tokens_per_trajectory=np.array([len(l["tokens"]) for l in layouts]))


def token_logprobs(logits: jax.Array, rows: jax.Array, slots: jax.Array, tokens: jax.Array,
                   temperature: float) -> jax.Array:
    """``log softmax(logits / T)[token]`` at the scored ``(row, slot)`` pairs (fp32; T = 0 → 1)."""
    picked = logits[rows, slots].astype(jnp.float32) / (temperature or 1.0)
    return jnp.take_along_axis(jax.nn.log_softmax(picked, axis=-1), tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- groups
def group_advantages(rewards: np.ndarray, mode: str = "zscore", eps: float = 1e-6) -> np.ndarray:
    """Advantages of ``rewards [groups, G]``: ``zscore`` = (r - mean) / (population std + eps) (the
    original), ``center`` = r - mean (the paper's §2.2)."""
    rewards = np.asarray(rewards, np.float64)
    centered = rewards - rewards.mean(axis=-1, keepdims=True)
    if mode == "center":
        return centered
    if mode == "zscore":
        return centered / (rewards.std(axis=-1, keepdims=True) + eps)
    raise ValueError(f"advantage mode: unknown {mode!r}; available: zscore, center")


def informative_groups(correct: np.ndarray) -> np.ndarray:
    """DAPO dynamic sampling: ``bool[groups]``, True where a group's responses are neither all
    correct nor all wrong (only those carry a learning signal under group-relative advantages)."""
    correct = np.asarray(correct, bool)
    return correct.any(axis=-1) & ~correct.all(axis=-1)


# ----------------------------------------------------------------------------- loss
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Clipped surrogate settings; defaults are the original's (ε_low 0.2, ε_high 0.28, clamp 10)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    log_ratio_clamp: float = 10.0
    beta: float = 0.0  # k3 KL weight to the frozen reference


def dipo_token_terms(logp: jax.Array, logp_old: jax.Array, advantage: jax.Array,
                     cfg: LossConfig, logp_ref: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token surrogate ``min(ρA, clip(ρ)A)`` and k3 KL (zeros without a reference)."""
    c = cfg.log_ratio_clamp
    ratio = jnp.exp(jnp.clip(logp - logp_old, -c, c))
    clipped = jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    surrogate = jnp.minimum(ratio * advantage, clipped * advantage)
    if logp_ref is None:
        return surrogate, jnp.zeros_like(surrogate)
    log_ref_ratio = logp_ref - logp
    k3 = jnp.exp(jnp.clip(log_ref_ratio, -c, c)) - 1 - log_ref_ratio
    return surrogate, k3


def dipo_loss(logp: jax.Array, logp_old: jax.Array, advantage: jax.Array, weight: jax.Array,
              cfg: LossConfig, logp_ref: jax.Array | None = None) -> jax.Array:
    """Token mean over the loss tokens of the whole global batch (``weight`` 1/0):
    ``-mean(surrogate) + β mean(k3)``."""
    surrogate, k3 = dipo_token_terms(logp, logp_old, advantage, cfg, logp_ref)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    return (-jnp.sum(weight * surrogate) + cfg.beta * jnp.sum(weight * k3)) / count


# ----------------------------------------------------------------------------- objective
def batch_arrays(packed: PackedRounds, trajectories: Sequence[Trajectory], old_logprobs: np.ndarray,
                 *, rows: int, num_scored: int) -> dict[str, np.ndarray]:
    """Host arrays of fixed shapes (one compiled step for every batch): canvas rows padded to
    ``rows`` and scored tokens padded to ``num_scored`` with zero weight.

    ``old_logprobs`` are aligned with ``packed.score_*`` (the sampler's, or recomputed once per
    rollout batch for later PPO iterations).
    """
    have_rows, length = packed.canvas.shape
    count = len(packed.score_row)
    if have_rows > rows or count > num_scored:
        raise ValueError(f"batch needs {have_rows} canvas rows and {count} scored tokens; the step is "
                         f"compiled for {rows} rows and {num_scored} tokens")

    def pad_rows(x: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(np.asarray(x), ((0, rows - have_rows), (0, 0)), constant_values=fill)

    def pad_scored(x: np.ndarray, dtype) -> np.ndarray:
        return np.pad(np.asarray(x, dtype), (0, num_scored - count))

    advantages = np.array([t.advantage for t in trajectories], np.float32)
    out = {name: pad_rows(getattr(packed.canvas, name), fill) for name, fill in
           (("tokens", 0), ("positions", 0), ("stream_ids", 0), ("block_ids", 0),
            ("segment_ids", canvas_lib.PADDING_SEGMENT))}
    out.update(score_row=pad_scored(packed.score_row, np.int32),
               score_slot=pad_scored(packed.score_slot, np.int32),
               score_token=pad_scored(packed.score_token, np.int32),
               advantage=pad_scored(advantages[packed.score_trajectory], np.float32),
               old_logp=pad_scored(old_logprobs, np.float32),
               weight=pad_scored(packed.score_loss, np.float32))
    return out


def dipo_objective(model, batch: dict[str, jax.Array], cfg: LossConfig, *, temperature: float,
                   attn_impl: str = "auto", ref_logp: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DiPO loss of one packed batch and its statistics.

    One forward over the multi-round canvas scores every committed token at the rollout
    temperature; ``log_ratio_abs_max`` (against ``old_logp``) is ~0 at the first PPO iteration
    when the old log-probs are the sampler's, which checks that engine and trainer agree.
    """
    canvas = canvas_lib.Canvas(tokens=batch["tokens"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], stream_ids=batch["stream_ids"],
                               block_ids=batch["block_ids"])
    hidden = model.hidden_states(canvas=canvas, attn_impl=attn_impl)
    picked = hidden[batch["score_row"], batch["score_slot"]]
    logits = model.logits(picked).astype(jnp.float32) / (temperature or 1.0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(log_probs, batch["score_token"][:, None], axis=-1)[:, 0]
    weight = batch["weight"]
    loss = dipo_loss(logp, batch["old_logp"], batch["advantage"], weight, cfg, ref_logp)
    log_ratio = jnp.where(weight > 0, logp - batch["old_logp"], 0.0)
    ratio = jnp.exp(log_ratio)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    clipped = (ratio < 1 - cfg.eps_low) | (ratio > 1 + cfg.eps_high)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    stats = {"log_ratio_abs_max": jnp.max(jnp.abs(log_ratio)),
             "ratio_mean": jnp.sum(weight * ratio) / count,
             "clip_fraction": jnp.sum(weight * clipped) / count,
             "entropy": jnp.sum(weight * entropy) / count,
             "loss_tokens": jnp.sum(weight)}
    return loss, stats

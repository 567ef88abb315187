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
from dirl_jax.sharding import local_rows
from dirl_jax.token_scores import chunked_token_scores

NOT_RESPONSE = -1
AGGREGATIONS = ("token_mean", "sequence_mean", "step_mean")


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
    """Canvas rows and the slots to score, as host arrays (``[rows, length]`` / ``[scored]``).

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


def worst_case_canvas_tokens(prompt_tokens: int, response_tokens: int, block_size: int) -> int:
    """Canvas slots of one trajectory when every block takes ``block_size`` rounds (one token
    per step): the clean stream plus ``block_size`` copies of every block the response touches."""
    first_block = prompt_tokens // block_size
    blocks = -(-(prompt_tokens + response_tokens) // block_size) - first_block
    return prompt_tokens + response_tokens + block_size * block_size * blocks


def max_trajectory_canvas_tokens(max_prompt_tokens: int, max_new_tokens: int, block_size: int) -> int:
    """The most canvas slots any rollout trajectory can need: over every prompt length up to
    ``max_prompt_tokens``, the decoder's longest response (it finishes the block in which
    ``max_new_tokens`` is reached, so up to ``block_size - 1`` more) decoded one token per step.
    The maximum lies among the last ``block_size`` prompt lengths (longer prompts add slots; the
    prompt's offset in its block decides how many blocks the response touches)."""
    def longest_response(prompt: int) -> int:
        return -(-(prompt + max_new_tokens) // block_size) * block_size - prompt

    return max(worst_case_canvas_tokens(p, longest_response(p), block_size)
               for p in range(max(1, max_prompt_tokens - block_size + 1), max_prompt_tokens + 1))


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


def informative_groups(rewards: np.ndarray) -> np.ndarray:
    """DAPO dynamic sampling: ``bool[groups]``, True where a group's rewards (the ones its
    advantages come from, truncation zeroed) are not all equal: only those groups have non-zero
    group-relative advantages. With the accuracy reward this is the original's filter (mixed
    correctness, DIRL_SPEC §2.5); with other rewards it also keeps groups whose accuracy is uniform
    but whose rewards differ, which the original drops (§8.11)."""
    rewards = np.asarray(rewards)
    return (rewards != rewards[..., :1]).any(axis=-1)


def oversample_factor(requested: int, *, dynamic_sampling: bool, group_size: int,
                      source: str) -> int:
    """Prompts drawn per sampling round, as a multiple of ``prompts_per_step``. ``requested > 0``
    is used as given; ``0`` follows the original (DIRL_SPEC §2.5): 1 without dynamic sampling,
    2 when ``group_size >= 16``, otherwise keyed on the data source's name (§8.10): 6 for GSM8K,
    3 for BigMath, 2 for anything else."""
    if requested > 0:
        return requested
    if not dynamic_sampling:
        return 1
    if group_size >= 16:
        return 2
    name = source.lower()
    return 6 if "gsm8k" in name else 3 if "bigmath" in name else 2


# ----------------------------------------------------------------------------- loss
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Clipped surrogate settings; defaults are the original's (ε_low 0.2, ε_high 0.28, clamp 10)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    log_ratio_clamp: float = 10.0
    beta: float = 0.0  # k3 KL weight to the frozen reference

    def clip_ratio(self, ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The clip rule, written only here: ``ratio`` clipped to ``[1 - ε_low, 1 + ε_high]`` (for
        the surrogate) and where that clip applies (for the clip-fraction statistic)."""
        low, high = 1 - self.eps_low, 1 + self.eps_high
        return jnp.clip(ratio, low, high), (ratio < low) | (ratio > high)


def dipo_token_terms(logp: jax.Array, logp_old: jax.Array, advantage: jax.Array,
                     cfg: LossConfig, logp_ref: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token surrogate ``min(ρA, clip(ρ)A)`` and k3 KL (zeros without a reference)."""
    c = cfg.log_ratio_clamp
    ratio = jnp.exp(jnp.clip(logp - logp_old, -c, c))
    bounded, _ = cfg.clip_ratio(ratio)
    surrogate = jnp.minimum(ratio * advantage, bounded * advantage)
    if logp_ref is None:
        return surrogate, jnp.zeros_like(surrogate)
    return surrogate, k3_kl(logp, logp_ref, c)


def k3_kl(logp: jax.Array, logp_ref: jax.Array, clamp: float) -> jax.Array:
    """Schulman's k3 estimator of KL(π || π_ref) per token, ``exp(x) - 1 - x`` with
    ``x = log π_ref - log π`` (the exponent clamped like the ratio's)."""
    x = logp_ref - logp
    return jnp.exp(jnp.clip(x, -clamp, clamp)) - 1 - x


def dipo_loss(logp: jax.Array, logp_old: jax.Array, advantage: jax.Array, weight: jax.Array,
              cfg: LossConfig, logp_ref: jax.Array | None = None) -> jax.Array:
    """``-sum(weight * surrogate) + β sum(weight * k3)`` with the normalised per-token weights of
    :func:`loss_weights` (zero for tokens without loss), so micro-batch losses add up exactly."""
    surrogate, k3 = dipo_token_terms(logp, logp_old, advantage, cfg, logp_ref)
    return -jnp.sum(weight * surrogate) + cfg.beta * jnp.sum(weight * k3)


# ----------------------------------------------------------------------------- batches
def loss_weights(packed: PackedRounds, trajectories: Sequence[Trajectory], aggregation: str
                 ) -> np.ndarray:
    """Each scored token's weight in the loss of the whole rollout batch (0 without loss).

    * ``token_mean`` — every loss token of the batch counts the same: ``1 / Σ_i |o_i|`` (DAPO's
      token-level loss; the original's GRPO path takes this mean per micro-batch instead).
    * ``sequence_mean`` — every response counts the same: ``1 / (n |o_i|)`` (GRPO).
    * ``step_mean`` — the paper's eqs. 6–7: token terms summed, divided by the number of
      denoising steps of the batch ``Σ_i |τ_i|``.
    """
    owner, loss = packed.score_trajectory, packed.score_loss
    tokens = np.bincount(owner[loss], minlength=len(trajectories)).astype(np.float64)
    if aggregation == "token_mean":
        per_token = np.full(len(trajectories), 1.0 / max(tokens.sum(), 1.0))
    elif aggregation == "sequence_mean":
        per_token = 1.0 / np.maximum(tokens, 1.0) / max(np.count_nonzero(tokens), 1)
    elif aggregation == "step_mean":
        steps = sum(len(np.unique(np.asarray(t.step_map)[:t.num_loss_tokens])) for t in trajectories)
        per_token = np.full(len(trajectories), 1.0 / max(steps, 1))
    else:
        raise ValueError(f"loss aggregation: unknown {aggregation!r}; available: {AGGREGATIONS}")
    return np.where(loss, per_token[owner], 0.0)


def scored_cells(packed: PackedRounds, first: int, stop: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scored tokens of canvas rows ``first..stop-1`` and their cells in a micro-batch's
    ``[rows, scored_per_row]`` arrays: ``(indices into packed.score_*, row, column)``, columns in
    packed order within each row."""
    picked = np.flatnonzero((packed.score_row >= first) & (packed.score_row < stop))
    row = packed.score_row[picked] - first
    column = np.zeros(len(picked), np.int64)
    for r in np.unique(row):
        where = np.flatnonzero(row == r)
        column[where] = np.arange(len(where))
    return picked, row, column


def micro_batches(packed: PackedRounds, trajectories: Sequence[Trajectory], old_logprobs: np.ndarray,
                  *, rows: int, scored_per_row: int, aggregation: str = "token_mean"
                  ) -> list[dict[str, np.ndarray]]:
    """Host arrays of fixed shapes (one compiled step for every micro-batch): ``rows`` canvas rows
    each, and each row's scored tokens ``[rows, scored_per_row]`` (padded with zero weight), so
    a row and the tokens it scores live on the same device; the loss weights are those of the
    whole rollout batch, so the micro-batch gradients sum to the batch gradient.

    ``old_logprobs`` are aligned with ``packed.score_*`` (the sampler's, or the trainer's
    recomputed once per rollout batch); :func:`scored_cells` maps them to the arrays' cells.
    """
    have_rows = packed.canvas.shape[0]
    weights = loss_weights(packed, trajectories, aggregation)
    advantages = np.array([t.advantage for t in trajectories], np.float32)
    out = []
    for first in range(0, have_rows, rows):
        stop = min(first + rows, have_rows)
        picked, row, column = scored_cells(packed, first, stop)
        if len(picked) and column.max() >= scored_per_row:
            worst = int(np.bincount(row).argmax())
            raise ValueError(f"canvas row {first + worst} scores {np.bincount(row).max()} tokens; "
                             f"the step is compiled for {scored_per_row} per row")

        def pad_rows(x: np.ndarray, fill: int) -> np.ndarray:
            return np.pad(np.asarray(x)[first:stop], ((0, rows - (stop - first)), (0, 0)),
                          constant_values=fill)

        def scored(x: np.ndarray, dtype) -> np.ndarray:
            cells = np.zeros((rows, scored_per_row), dtype)
            cells[row, column] = np.asarray(x, dtype)[picked]
            return cells

        batch = {name: pad_rows(getattr(packed.canvas, name), fill) for name, fill in
                 (("tokens", 0), ("positions", 0), ("stream_ids", 0), ("block_ids", 0),
                  ("segment_ids", canvas_lib.PADDING_SEGMENT))}
        batch.update(score_slot=scored(packed.score_slot, np.int32),
                     score_token=scored(packed.score_token, np.int32),
                     advantage=scored(advantages[packed.score_trajectory], np.float32),
                     old_logp=scored(old_logprobs, np.float32),
                     weight=scored(weights, np.float32),
                     loss_mask=scored(packed.score_loss, np.float32))
        out.append(batch)
    return out


# ----------------------------------------------------------------------------- objective
def score_tokens(model, batch: dict[str, jax.Array], *, temperature: float, attn_impl: str = "auto",
                 chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Log-prob and entropy ``[rows, scored_per_row]`` of every scored token of a micro-batch at
    the rollout temperature: one forward over the multi-round canvas, then the vocabulary a chunk
    of each row's tokens at a time, with the sampler's logits arithmetic. Tokens without loss
    score 0."""
    canvas = canvas_lib.Canvas(tokens=batch["tokens"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], stream_ids=batch["stream_ids"],
                               block_ids=batch["block_ids"])
    hidden = model.hidden_states(canvas=canvas, attn_impl=attn_impl)
    picked = jnp.take_along_axis(hidden, batch["score_slot"][..., None], axis=1).astype(model.dtype)
    embedding = model.output_embedding().astype(model.dtype)
    # rows stay where they are sharded: each device scores its own rows' tokens, ``chunk`` at once
    row_chunk = max(1, chunk // local_rows(hidden.shape[0]))

    def one_row(h: jax.Array, targets: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
        return chunked_token_scores(h, embedding, targets, active, chunk=row_chunk,
                                    temperature=temperature, logits_dtype=model.dtype)
    return jax.vmap(one_row)(picked, batch["score_token"], batch["loss_mask"] > 0)


def dipo_objective(model, batch: dict[str, jax.Array], cfg: LossConfig, *, temperature: float,
                   attn_impl: str = "auto", chunk: int = 1024
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DiPO loss of one micro-batch and its statistics as sums (see :func:`reduce_stats`).

    ``batch["old_logp"]`` is the old policy and ``batch["ref_logp"]`` (when present) the frozen
    reference of the k3 term. ``log_ratio_abs_max`` is ~0 at the first PPO iteration when the old
    log-probs are the sampler's, which checks that engine and trainer agree.
    """
    logp, entropy = score_tokens(model, batch, temperature=temperature, attn_impl=attn_impl,
                                 chunk=chunk)
    mask = batch["loss_mask"]
    loss = dipo_loss(logp, batch["old_logp"], batch["advantage"], batch["weight"], cfg,
                     batch.get("ref_logp"))
    log_ratio = jnp.where(mask > 0, logp - batch["old_logp"], 0.0)
    ratio = jnp.exp(log_ratio)
    _, clipped = cfg.clip_ratio(ratio)
    stats = {"log_ratio_abs_max": jnp.max(jnp.abs(log_ratio)),
             "ratio_sum": jnp.sum(mask * ratio),
             "clipped_sum": jnp.sum(mask * clipped),
             "entropy_sum": jnp.sum(mask * entropy),
             "loss_tokens": jnp.sum(mask)}
    if "ref_logp" in batch:
        stats["kl_sum"] = jnp.sum(mask * k3_kl(logp, batch["ref_logp"], cfg.log_ratio_clamp))
    return loss, stats


def reduce_stats(per_micro_batch: Sequence[dict[str, float]]) -> dict[str, float]:
    """Batch statistics from the micro-batches' sums: max |log ratio|, token means of the ratio,
    clip fraction, entropy and k3 KL, and the number of loss tokens."""
    count = max(sum(s["loss_tokens"] for s in per_micro_batch), 1.0)
    out = {"log_ratio_abs_max": max(s["log_ratio_abs_max"] for s in per_micro_batch),
           "loss_tokens": sum(s["loss_tokens"] for s in per_micro_batch)}
    for total, name in (("ratio_sum", "ratio_mean"), ("clipped_sum", "clip_fraction"),
                        ("entropy_sum", "entropy"), ("kl_sum", "kl")):
        if total in per_micro_batch[0]:
            out[name] = sum(s[total] for s in per_micro_batch) / count
    return out

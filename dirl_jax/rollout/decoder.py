"""The in-process block-diffusion decoder: continuous batching over a fixed number of decode slots.

Decoding follows LMDeploy's dLLM engine (LMDEPLOY.md §1):

* blocks are aligned to absolute position 0; the prompt's partial last block is the first block
  decoded (its prompt tokens count as decided); the whole prompt is prefilled into the KV cache;
* every denoising forward feeds a row's current block at its positions against the cache;
  candidates are drawn at every masked position (greedy, or temperature with optional top-k /
  top-p restricting the proposal, :mod:`dirl_jax.rollout.sampler`), the confidence of a candidate
  is its probability under the full temperature-scaled distribution, and the unmasking rule
  (:mod:`dirl_jax.rollout.unmasking`) commits some of them for good;
* a completed block's clean keys/values are written into the cache before the next block is
  decoded (see *Commit* below), then the next block starts all-masked;
* a row stops after the first completed block that contains a stop token or brings the number of
  generated tokens to ``max_new_tokens``; the whole final block is returned.

For each committed token the result records the step map (1-based index of the denoising forward
that committed it, counted over the whole response; tokens committed together share it) and its
log-probability under the temperature-scaled distribution (the policy DiPO optimises).

How the work is organised, and what each choice costs:

* **Slots (continuous batching).** The device holds ``slots`` rows of decoding state (KV cache,
  tokens, step map, log-probs, per-row counters). A host loop alternates two compiled programs:
  ``admit`` prefills waiting prompts (their count padded to a power of two) and moves them into
  free slots; ``run_chunk`` runs forwards inside one ``lax.while_loop`` until a row finishes while
  prompts wait (so its slot is refilled at once) or while few enough rows are live to compact
  them (below), until a row's next block would leave the attention window, or until every row
  is done. A finished row costs one host round trip of a
  few small arrays, never a forward computed for a finished row while others still run; the
  programs compile once per admission size, slot count and window bucket. Once no prompt waits
  and at most half the slots are live, the live rows move into half as many slots (or fewer:
  the next power of two, a multiple of the data shards on a mesh; one gather of their state,
  re-placed on the rows' sharding): the long tail of a batch, a few rows that
  decode for many more blocks, runs at the cost of those rows instead of the full slot count.
  ``continuous=False`` gives static batches (a batch of ``slots`` prompts runs until its
  longest row ends, all ``slots`` rows computed), for comparison.
* **Attention window.** A chunk attends over the first ``window`` cache slots only: the smallest
  bucket (256, 384, 512, 768, ... : at most 1.5x what is needed) that holds every live row's
  current block. A forward's attention cost follows the longest live row, not the cache
  capacity. Each row's keys stay contiguous in its slot (``slots x capacity`` are allocated); a
  paged cache with a ragged kernel would follow each row's own length and allocate only live
  pages, but in pure JAX gathering pages costs a copy of the keys per forward.
* **Commit.** ``fused``: the first denoising forward of a block carries the previous, completed
  block in front of it (a chunk of ``2B`` tokens; the clean block attends to itself and the
  cache, the new block also to the clean block), so a block costs one forward fewer.
  ``separate``: one commit forward of ``B`` tokens per completed block, as LMDeploy. Same numbers
  either way; fused wins where a forward costs its weight reads (accelerators: ``auto``),
  separate where it costs its FLOPs (CPU: every fused forward is ``2B`` wide).
* **Vocabulary head** only on the block being denoised (never on the clean block of a fused
  forward).
* **Randomness.** Row ``i`` draws with ``fold_in(fold_in(key(seed), row_seeds[i]), step)``, its
  own denoising-step counter: a result is a pure function of (prompt, row seed), whatever the
  slot count, order, batch composition or commit mode.
* **Meshes.** With a ``mesh``, slots are sharded over its ``data``/``fsdp`` axes and the
  parameters by the logical axis table (heads, MLP and vocabulary over ``tensor``), inside
  ``jax.set_mesh``: one program, partitioned by XLA, no replica of the weights.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dirl_jax import canvas as canvas_lib
from dirl_jax.attention import target_platform
from dirl_jax.config import COMMIT_MODES
from dirl_jax.model.config import SDARConfig
from dirl_jax.model.sdar import LayerCache, SDARForCausalLM, init_cache
from dirl_jax.rollout import unmasking
from dirl_jax.rollout.sampler import SamplingConfig, constrain_logits, propose, response_stats
from dirl_jax.sharding import named_shardings, rules_for_mesh

DENOISE, COMMIT, DONE = 0, 1, 2
FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_NONE: "unfinished"}
PROMPT_BUCKET = 64
MIN_WINDOW = 256

# on_block(prompt_index [slots] (-1: empty slot), block_tokens [slots, B], positions [slots, B],
#          completed [slots]), called on the host after every forward.
BlockCallback = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


@struct.dataclass
class Slots:
    """Decoding state of every slot (rows ``[slots, ...]``; ``capacity`` cache slots per row)."""

    cache: tuple[LayerCache, ...]   # [slots, capacity + B, kv_heads, head_dim]; last B: scratch
    tokens: jax.Array               # [slots, capacity] prompt, then response (mask = undecided)
    step_map: jax.Array             # [slots, capacity] 0 = not generated / not committed yet
    logprobs: jax.Array             # [slots, capacity]
    keys: jax.Array                 # [slots] the row's sampling key
    prompt_index: jax.Array         # [slots] which prompt the slot holds, -1 = empty
    prompt_length: jax.Array        # [slots]
    limit: jax.Array                # [slots] the row's max_new_tokens
    block: jax.Array                # [slots] the block being decoded (or committed)
    mode: jax.Array                 # [slots] DENOISE | COMMIT | DONE
    pending: jax.Array              # [slots] fused: block - 1's clean keys/values not written yet
    steps: jax.Array                # [slots] denoising forwards that committed tokens
    forwards: jax.Array             # [slots] all forwards of the row (prefill included)
    finish: jax.Array               # [slots] FINISH_* code


def resolve_commit(commit: str, platform: str | None = None) -> str:
    """``fused`` on accelerators, ``separate`` on CPU for ``auto``."""
    if commit not in COMMIT_MODES:
        raise ValueError(f"commit: expected one of {', '.join(COMMIT_MODES)}, got {commit!r}")
    if commit != "auto":
        return commit
    return "separate" if (platform or target_platform()) == "cpu" else "fused"


def capacity_for(prompt_bucket: int, cfg: SamplingConfig) -> int:
    """Cache slots per row: the prompt bucket, the response and the final partial block."""
    b = cfg.block_size
    return (-(-prompt_bucket // b) + -(-cfg.max_new_tokens // b) + 1) * b


def window_for(need: int, capacity: int) -> int:
    """The attention window bucket holding ``need`` slots: 256, 384, 512, 768, ... (x1.5 / x4/3
    steps), capped at ``capacity``."""
    window = MIN_WINDOW
    while window < need:
        window = window * 3 // 2 if (window & (window - 1)) == 0 else window * 4 // 3
    return min(window, capacity)


def empty_slots(model: SDARForCausalLM, slots: int, capacity: int, cfg: SamplingConfig) -> Slots:
    def ints(value: int = 0) -> jax.Array:  # a buffer of its own (state is donated)
        return jnp.full((slots,), value, jnp.int32)

    return Slots(cache=init_cache(model.config, slots, capacity + cfg.block_size, model.dtype),
                 tokens=jnp.full((slots, capacity), cfg.mask_token_id, jnp.int32),
                 step_map=jnp.zeros((slots, capacity), jnp.int32),
                 logprobs=jnp.zeros((slots, capacity), jnp.float32),
                 keys=jax.random.split(jax.random.key(0), slots), prompt_index=ints(-1),
                 prompt_length=ints(), limit=ints(), block=ints(), mode=ints(DONE),
                 pending=jnp.zeros((slots,), bool), steps=ints(), forwards=ints(), finish=ints())


def _rows_slice(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size))(x, start)


def _rows_update(x: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
    return jax.vmap(lambda row, c, s: jax.lax.dynamic_update_slice_in_dim(row, c, s, 0))(x, chunk, start)


def _visible_prefix(ends: jax.Array, length: int, block_size: int) -> canvas_lib.Canvas:
    """Tags of ``length`` cache slots of which each row sees ``[0, ends[row])``."""
    slots = jnp.arange(length)
    seg = jnp.where(slots[None] < ends[:, None], 0, canvas_lib.PADDING_SEGMENT)
    return canvas_lib.block_causal_canvas(jnp.zeros_like(seg), jnp.broadcast_to(slots, seg.shape),
                                          seg, block_size)


def admit(model: SDARForCausalLM, state: Slots, slot_ids: jax.Array, prompt_tokens: jax.Array,
          prompt_lengths: jax.Array, limits: jax.Array, keys: jax.Array, prompt_index: jax.Array,
          cfg: SamplingConfig) -> Slots:
    """Prefills right-padded prompts ``[k, bucket]`` and moves them into slots ``slot_ids [k]``
    (an index ``>= slots`` drops that entry: padding of the admission size) with their
    ``max_new_tokens`` ``limits [k]``."""
    k, bucket = prompt_tokens.shape
    positions = jnp.broadcast_to(jnp.arange(bucket), (k, bucket))
    in_prompt = positions < prompt_lengths[:, None]
    tokens = jnp.where(in_prompt, prompt_tokens, cfg.mask_token_id)
    fresh = init_cache(model.config, k, bucket, model.dtype)
    # the prompts attend to themselves alone: block-causal rows starting at 0, padding after
    # them, which is the static block-causal layout (Splash on TPU)
    prompt_canvas = canvas_lib.block_causal_canvas(
        tokens, positions, jnp.where(in_prompt, 0, canvas_lib.PADDING_SEGMENT), cfg.block_size)
    layout = (canvas_lib.StreamMajorLayout(bucket, cfg.block_size, rounds=0)
              if bucket % cfg.block_size == 0 else None)
    _, fresh = model.cached_hidden_states(prompt_canvas, prompt_canvas, fresh, positions,
                                          attn_impl=cfg.attn_impl, attn_layout=layout)
    cache = tuple(LayerCache(keys=old.keys.at[slot_ids, :bucket].set(new.keys, mode="drop"),
                             values=old.values.at[slot_ids, :bucket].set(new.values, mode="drop"))
                  for old, new in zip(state.cache, fresh))
    def row(x: jax.Array, value: Any) -> jax.Array:
        return x.at[slot_ids].set(value, mode="drop")

    full = jnp.full((k, state.tokens.shape[1]), cfg.mask_token_id, jnp.int32)
    return state.replace(
        cache=cache, tokens=row(state.tokens, full.at[:, :bucket].set(tokens)),
        step_map=row(state.step_map, 0), logprobs=row(state.logprobs, 0.0),
        keys=row(state.keys, keys), prompt_index=row(state.prompt_index, prompt_index),
        prompt_length=row(state.prompt_length, prompt_lengths), limit=row(state.limit, limits),
        block=row(state.block, prompt_lengths // cfg.block_size), mode=row(state.mode, DENOISE),
        pending=row(state.pending, False), steps=row(state.steps, 0),
        forwards=row(state.forwards, 1), finish=row(state.finish, FINISH_NONE))


def forward_step(model: SDARForCausalLM, state: Slots, cfg: SamplingConfig, window: int,
                 fused: bool, on_block: BlockCallback | None = None) -> Slots:
    """One forward of every live slot: a denoising step of its current block (carrying the
    previous block's commit when ``fused``), or the commit forward of a completed block."""
    b = cfg.block_size
    capacity = state.tokens.shape[1]
    offsets = jnp.arange(b)
    live = state.mode != DONE
    start = state.block * b
    positions = start[:, None] + offsets
    block_tokens = _rows_slice(state.tokens, start, b)
    live_seg = jnp.where(live[:, None], 0, canvas_lib.PADDING_SEGMENT) * jnp.ones_like(positions)
    q_tokens, q_positions, q_seg, write_cols = block_tokens, positions, live_seg, positions
    if fused:  # [previous block, clean, only where its commit is pending | current block]
        carry = (live & state.pending)[:, None]
        prev_positions = jnp.maximum(start - b, 0)[:, None] + offsets
        q_tokens = jnp.concatenate([_rows_slice(state.tokens, start - b * carry[:, 0], b),
                                    block_tokens], axis=1)
        q_positions = jnp.concatenate([prev_positions, positions], axis=1)
        q_seg = jnp.concatenate([jnp.where(carry, 0, canvas_lib.PADDING_SEGMENT)
                                 * jnp.ones_like(positions), live_seg], axis=1)
        write_cols = jnp.concatenate([jnp.where(carry, prev_positions, capacity + offsets),
                                      positions], axis=1)
    hidden, cache = model.cached_hidden_states(
        canvas_lib.block_causal_canvas(q_tokens, q_positions, q_seg, b),
        _visible_prefix(jnp.where(live, start + b, 0), window, b), state.cache, write_cols,
        attn_impl=cfg.attn_impl)
    denoising = state.mode == DENOISE
    block_steps = _rows_slice(state.step_map, start, b)
    generated = positions >= state.prompt_length[:, None]
    masked = generated & (block_steps == 0) & denoising[:, None]
    step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
    position_keys = jax.vmap(lambda key: jax.vmap(functools.partial(jax.random.fold_in, key))(
        offsets))(step_keys)
    generated_before = jnp.maximum(start - state.prompt_length, 0)[:, None] * jnp.ones_like(positions)
    candidates, logp = vocab_head(model, hidden[:, -b:], masked, generated_before, position_keys, cfg)
    chosen = unmasking.select_positions(jnp.exp(logp), masked, strategy=cfg.strategy,
                                        block_size=b, steps=cfg.denoising_steps,
                                        threshold=cfg.threshold)
    steps = state.steps + chosen.any(axis=-1)
    new_tokens = jnp.where(chosen, candidates, block_tokens)
    new_steps = jnp.where(chosen, steps[:, None], block_steps)
    new_logp = jnp.where(chosen, logp, _rows_slice(state.logprobs, start, b))

    complete = denoising & ~(masked & ~chosen).any(axis=-1)
    stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
    hit_stop = (jnp.isin(new_tokens, stop_ids) & generated).any(axis=-1)
    hit_length = start + b - state.prompt_length >= state.limit
    ends = complete & (hit_stop | hit_length)
    finish = jnp.where(complete & hit_stop, FINISH_STOP,
                       jnp.where(complete & hit_length, FINISH_LENGTH, state.finish))
    if on_block is not None:
        jax.debug.callback(on_block, state.prompt_index, new_tokens, positions, complete,
                           ordered=True)
    if fused:
        mode = jnp.where(ends, DONE, state.mode)
        block = state.block + (complete & ~ends)
        pending = jnp.where(denoising, complete & ~ends, state.pending)
    else:
        committed = state.mode == COMMIT
        mode = jnp.where(complete, jnp.where(ends, DONE, COMMIT),
                         jnp.where(committed, DENOISE, state.mode))
        block = state.block + committed
        pending = state.pending
    return state.replace(
        cache=cache, tokens=_rows_update(state.tokens, new_tokens, start),
        step_map=_rows_update(state.step_map, new_steps, start),
        logprobs=_rows_update(state.logprobs, new_logp, start), block=block, mode=mode,
        pending=pending, steps=steps, forwards=state.forwards + live, finish=finish)


@jax.named_scope("vocab_head")
def vocab_head(model: SDARForCausalLM, hidden: jax.Array, needed: jax.Array,
               generated_before: jax.Array, keys: jax.Array, cfg: SamplingConfig
               ) -> tuple[jax.Array, jax.Array]:
    """Candidates and log-probs ``[slots, B]`` at the ``needed`` (still-masked) positions of the
    blocks' ``hidden [slots, B, hidden]`` states; elsewhere 0 (never read).

    Without a mesh the needed positions are packed first and the head runs on half of all
    positions whenever they fit (decided positions, commit forwards and finished rows need no
    logits), else on all; on a mesh it runs on all (packing across shards would move them)."""
    shape = needed.shape
    n = needed.size
    flat_hidden = hidden.reshape(n, hidden.shape[-1])
    flat = [x.reshape(n) for x in (needed, generated_before, keys)]

    def at(capacity: int) -> Callable[[], tuple[jax.Array, jax.Array]]:
        def run() -> tuple[jax.Array, jax.Array]:
            index = (jnp.argsort(~flat[0], stable=True)[:capacity] if capacity < n
                     else jnp.arange(n))
            logits = constrain_logits(model.logits(flat_hidden[index]).astype(jnp.float32),
                                      flat[1][index], cfg)
            candidates, logp = propose(logits, flat[2][index], cfg)
            return (jnp.zeros(n, candidates.dtype).at[index].set(candidates),
                    jnp.zeros(n, logp.dtype).at[index].set(logp))
        return run

    if n < 2 or not jax.sharding.get_abstract_mesh().empty:
        candidates, logp = at(n)()
    else:
        candidates, logp = jax.lax.cond(flat[0].sum() <= n // 2, at(n // 2), at(n))
    return candidates.reshape(shape), logp.reshape(shape)


def run_chunk(model: SDARForCausalLM, state: Slots, stop_at: jax.Array, cfg: SamplingConfig,
              window: int, fused: bool, on_block: BlockCallback | None = None) -> Slots:
    """Forwards until every row is done, a row's next block would leave the window, or a row
    finished in this chunk and at most ``stop_at`` rows are live (the host then refills or
    compacts the slots; -1: never)."""
    done_before = state.mode == DONE

    def cond(state: Slots) -> jax.Array:
        live = state.mode != DONE
        fits = ~live | ((state.block + 1) * cfg.block_size <= window)
        finished = (state.mode == DONE) & ~done_before
        return live.any() & fits.all() & ~(finished.any() & (live.sum() <= stop_at))

    return jax.lax.while_loop(
        cond, lambda s: forward_step(model, s, cfg, window, fused, on_block), state)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
def admit_jit(graphdef, params, state, slot_ids, prompt_tokens, prompt_lengths, limits, keys,
               prompt_index, cfg):
    return admit(nnx.merge(graphdef, params), state, slot_ids, prompt_tokens, prompt_lengths,
                 limits, keys, prompt_index, cfg)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "window", "fused", "on_block"),
                   donate_argnames=("state",))
def run_chunk_jit(graphdef, params, state, stop_at, cfg, window, fused, on_block):
    return run_chunk(nnx.merge(graphdef, params), state, stop_at, cfg, window, fused, on_block)


@jax.jit
def _harvest(state: Slots, rows: jax.Array) -> dict[str, jax.Array]:
    return {"tokens": state.tokens[rows], "step_map": state.step_map[rows],
            "logprobs": state.logprobs[rows], "block": state.block[rows],
            "finish": state.finish[rows], "forwards": state.forwards[rows]}


def _pow2_at_least(n: int, cap: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


def row_axes(mesh: jax.sharding.Mesh | None) -> tuple[str, ...]:
    """The mesh axes slots are sharded over (the logical ``batch`` axis)."""
    if mesh is None:
        return ()
    axis = dict(rules_for_mesh(mesh))["batch"]
    return (axis,) if isinstance(axis, str) else tuple(axis or ())


def _place(mesh: jax.sharding.Mesh, params: nnx.State, state: Slots) -> tuple[nnx.State, Slots]:
    """Parameters sharded by the logical axis table, slots by rows (KV heads over ``tensor``)."""
    return (jax.device_put(params, named_shardings(params, mesh)),
            jax.device_put(state, slot_shardings(mesh, state)))


def slot_shardings(mesh: jax.sharding.Mesh, state: Slots) -> Slots:
    """The sharding of every leaf of the (concrete or abstract) decoding state on ``mesh``: rows
    over the data axes, the KV cache's heads over ``tensor`` where they divide."""
    rows = jax.sharding.PartitionSpec(row_axes(mesh) or None)
    tensor = dict(rules_for_mesh(mesh))["act_kv_heads"]
    if tensor and state.cache[0].keys.shape[2] % mesh.shape[tensor]:
        tensor = None  # KV heads that do not divide stay whole
    cache_spec = jax.sharding.PartitionSpec(row_axes(mesh) or None, None, tensor, None)

    def spec(path: tuple, leaf: jax.Array) -> jax.sharding.NamedSharding:
        is_cache = any(getattr(p, "name", None) == "cache" for p in path)
        return jax.sharding.NamedSharding(mesh, cache_spec if is_cache and leaf.ndim == 4 else rows)

    return jax.tree_util.tree_map_with_path(spec, state)


def decode_prompts(model: SDARForCausalLM, prompts: list[list[int]], cfg: SamplingConfig, *,
                   seed: int = 0, row_seeds: Sequence[int] | None = None, pad_token_id: int = 0,
                   on_block: BlockCallback | None = None,
                   mesh: jax.sharding.Mesh | None = None, slots: int | None = None,
                   continuous: bool = True, commit: str = "auto",
                   max_new_tokens: Sequence[int] | None = None) -> list[dict]:
    """Decodes prompts of any lengths over ``slots`` decode slots (default: one per prompt);
    one result per prompt, in order.

    Each result: ``token_ids`` (the response, whole blocks), ``step_map``, ``logprobs``,
    ``length`` (response tokens up to and including the first stop token; tokens after it in
    the final block were sampled too and are returned, but carry no loss in DiPO),
    ``finish_reason`` (``stop`` | ``length``), ``num_steps`` (denoising forwards that committed
    tokens), ``num_forwards`` (all forwards of the row: prefill, denoising and commit) and
    ``tokens_per_step``.

    Row ``i`` samples with the key ``fold_in(key(seed), row_seeds[i])`` (``row_seeds`` default
    to the row indices, each in ``[0, 2**31)``): a row's sample depends on its seed, never on the
    rest of the batch or on ``slots`` / ``continuous`` / ``commit``, so work can be split,
    reordered and resumed reproducibly. ``continuous=False`` decodes static batches of ``slots``
    prompts; ``commit`` is ``fused``, ``separate`` or ``auto`` (module docstring);
    ``max_new_tokens`` gives each row its own limit (at most ``cfg.max_new_tokens``). With a
    ``mesh``, slots are sharded over its data axes (their count rounded up to a multiple) and the
    parameters over its tensor axis.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    count = len(prompts)
    row_seeds = list(range(count)) if row_seeds is None else [int(s) for s in row_seeds]
    if len(row_seeds) != count or not all(0 <= s < 2 ** 31 for s in row_seeds):
        raise ValueError(f"row_seeds: need {count} seeds in [0, 2**31), got {row_seeds[:8]}...")
    if slots is not None and slots < 1:
        raise ValueError(f"slots: must be >= 1, got {slots}")
    limits = np.full(count, cfg.max_new_tokens, np.int32)
    if max_new_tokens is not None:
        limits = np.asarray(max_new_tokens, np.int32)
        if limits.shape != (count,) or not ((limits >= 1) & (limits <= cfg.max_new_tokens)).all():
            raise ValueError(f"max_new_tokens: need {count} limits in [1, {cfg.max_new_tokens}]")
    check_prompts(model.config, prompts, limits, cfg.block_size)
    fused = resolve_commit(commit, mesh.devices.flat[0].platform if mesh is not None else None) == "fused"
    b = cfg.block_size
    lengths = np.array([len(p) for p in prompts], np.int32)
    bucket = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
    capacity = capacity_for(bucket, cfg)
    shards = int(np.prod([mesh.shape[a] for a in row_axes(mesh)])) if mesh is not None else 1
    n_slots = -(-min(slots or count, count) // shards) * shards
    graphdef, params = nnx.split(model)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.key(seed), jnp.asarray(row_seeds, jnp.int32))
    state = empty_slots(model, n_slots, capacity, cfg)
    if mesh is not None:
        params, state = _place(mesh, params, state)

    waiting = collections.deque(range(count))
    occupant = np.full(n_slots, -1)
    block = np.zeros(n_slots, np.int64)
    results: list[dict | None] = [None] * count
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        while waiting or (occupant >= 0).any():
            free = np.flatnonzero(occupant < 0)
            if waiting and len(free) and (continuous or len(free) == n_slots):
                take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                state = _admit_rows(graphdef, params, state, free[:len(take)], take, prompts,
                                    lengths, limits, bucket, row_keys, pad_token_id, cfg)
                occupant[free[:len(take)]] = take
                block[free[:len(take)]] = lengths[take] // b
            live = occupant >= 0
            window = window_for(int((block[live] + 1).max()) * b, capacity)
            stop_at = (n_slots if waiting else _compactable(n_slots, shards)) if continuous else -1
            state = run_chunk_jit(graphdef, params, state, jnp.asarray(stop_at, jnp.int32), cfg,
                                   window, fused, on_block)
            mode, block = (np.array(x) for x in jax.device_get((state.mode, state.block)))
            done = np.flatnonzero(live & (mode == DONE))
            if len(done):
                for slot, result in zip(done, _harvest_rows(state, done, n_slots, b, cfg)):
                    results[occupant[slot]] = result
                occupant[done] = -1
            rows = _compaction(occupant, shards) if continuous and not waiting else None
            if rows is not None:
                shardings = jax.tree.map(lambda x: x.sharding, state)
                state = _compact(state, jnp.asarray(rows))
                if mesh is not None:  # rows stay split over the data axes
                    state = jax.device_put(state, shardings)
                occupant, block, n_slots = occupant[rows], block[rows], len(rows)
    return results  # type: ignore[return-value]


def _compacted_size(live: int, n_slots: int, shards: int) -> int:
    """Slots for ``live`` rows: the next power of two, a multiple of ``shards``."""
    return -(-_pow2_at_least(max(live, 1), n_slots) // shards) * shards


def _compactable(n_slots: int, shards: int) -> int:
    """The most live rows that fit in at most half of ``n_slots`` (-1: none, no compaction)."""
    return max((live for live in range(1, n_slots // 2 + 1)
                if _compacted_size(live, n_slots, shards) <= n_slots // 2), default=-1)


def _compaction(occupant: np.ndarray, shards: int) -> np.ndarray | None:
    """The slots to keep once no prompt waits and at most half the slots are live: the live
    slots, padded with free ones to a power of two (a multiple of ``shards``); None to keep all."""
    live, free = np.flatnonzero(occupant >= 0), np.flatnonzero(occupant < 0)
    if not len(live) or len(live) > _compactable(len(occupant), shards):
        return None
    return np.concatenate([live, free[:_compacted_size(len(live), len(occupant), shards) - len(live)]])


@jax.jit
def _compact(state: Slots, rows: jax.Array) -> Slots:
    """``state`` restricted to ``rows``."""
    return jax.tree.map(lambda x: x[rows], state)


def _admit_rows(graphdef: Any, params: nnx.State, state: Slots, slot_ids: np.ndarray,
                take: list[int], prompts: list[list[int]], lengths: np.ndarray,
                limits: np.ndarray, bucket: int, row_keys: jax.Array, pad_token_id: int,
                cfg: SamplingConfig) -> Slots:
    """Admits prompts ``take`` into ``slot_ids``, padded to a power-of-two admission size."""
    n_slots = state.mode.shape[0]
    size = _pow2_at_least(len(take), n_slots)
    ids = np.full(size, n_slots, np.int32)   # out of range: dropped
    ids[:len(take)] = slot_ids
    tokens = np.full((size, bucket), pad_token_id, np.int32)
    for i, p in enumerate(take):
        tokens[i, :lengths[p]] = prompts[p]
    padded = take + [take[0]] * (size - len(take))
    index = np.asarray(take + [-1] * (size - len(take)), np.int32)
    return admit_jit(graphdef, params, state, jnp.asarray(ids), jnp.asarray(tokens),
                      jnp.asarray(lengths[padded]), jnp.asarray(limits[padded]),
                      row_keys[np.asarray(padded)],
                      jnp.asarray(index), cfg)


def _harvest_rows(state: Slots, slots: np.ndarray, n_slots: int, b: int, cfg: SamplingConfig
                  ) -> list[dict]:
    """The results of finished ``slots``."""
    size = _pow2_at_least(len(slots), n_slots)
    rows = np.concatenate([slots, np.full(size - len(slots), slots[0])])
    out = jax.device_get(_harvest(state, jnp.asarray(rows)))
    lengths = np.asarray(jax.device_get(state.prompt_length))[slots]
    results = []
    for i, start in enumerate(lengths):
        span = slice(int(start), int(out["block"][i] + 1) * b)
        token_ids, step_map = out["tokens"][i, span], out["step_map"][i, span]
        results.append({
            "token_ids": token_ids.tolist(), "step_map": step_map.tolist(),
            "logprobs": out["logprobs"][i, span].tolist(),
            "finish_reason": FINISH_REASONS[int(out["finish"][i])],
            "num_forwards": int(out["forwards"][i]),
            **response_stats(token_ids, step_map, cfg.stop_ids)})
    return results


def check_prompts(config: SDARConfig, prompts: Sequence[Sequence[int]], limits: np.ndarray,
                  block_size: int) -> None:
    """ValueError naming the first prompt with a token id outside the model's vocabulary, or
    whose length plus its token limit, to the end of that block (the whole final block is
    generated), exceeds the model's ``max_position_embeddings``."""
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(f"prompts[{i}]: token id {int(ids[(ids < 0) | (ids >= config.vocab_size)][0])} "
                             f"is outside the model's vocabulary [0, {config.vocab_size})")
        end = -(-(len(prompt) + int(limits[i])) // block_size) * block_size
        if end > config.max_position_embeddings:
            raise ValueError(f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens "
                             f"{int(limits[i])} reach position {end} (the end of that block), "
                             f"beyond the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")


def generate(model: SDARForCausalLM, prompts: Sequence[Sequence[int]], *,
             block_size: int | None = None, strategy: str = "low_confidence_dynamic",
             steps: int | None = None, threshold: float = 0.9, max_new_tokens: int = 256,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), min_new_tokens: int = 0, banned_ids: Sequence[int] = (),
             seed: int = 0, row_seeds: Sequence[int] | None = None,
             mask_token_id: int | None = None, pad_token_id: int | None = None,
             attn_impl: str = "auto", on_block: BlockCallback | None = None,
             mesh: jax.sharding.Mesh | None = None, slots: int | None = None,
             commit: str = "auto") -> list[dict]:
    """Decodes token-id prompts of any lengths; one result per prompt.

    ``block_size`` is the model's (another value is refused); ``mask_token_id`` and
    ``pad_token_id`` default to the model config's. Prompts are checked against the model's
    vocabulary and ``max_position_embeddings``.
    ``temperature=0`` is greedy. Each result holds ``token_ids``, ``step_map``, ``logprobs``,
    ``length``, ``finish_reason``, ``num_steps``, ``num_forwards`` and ``tokens_per_step``
    (see :func:`decode_prompts`, also for ``row_seeds``, ``slots``, ``commit`` and ``mesh``:
    slots over its data axes, parameters over its tensor axis).
    """
    config = model.config
    if block_size is not None and block_size != config.block_size:
        raise ValueError(f"block_size: the model decodes blocks of {config.block_size} tokens (its "
                         f"config.json), got {block_size}")
    cfg = SamplingConfig(
        block_size=config.block_size,
        mask_token_id=config.mask_token_id if mask_token_id is None else mask_token_id,
        strategy=strategy, steps=steps, threshold=threshold, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tuple(int(t) for t in stop_ids),
        min_new_tokens=min_new_tokens, banned_ids=tuple(int(t) for t in banned_ids),
        attn_impl=attn_impl)
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    return decode_prompts(model, [list(p) for p in prompts], cfg, seed=seed, row_seeds=row_seeds,
                          pad_token_id=pad or 0, on_block=on_block, mesh=mesh, slots=slots,
                          commit=commit)

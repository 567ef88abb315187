"""The in-process block-diffusion decoder: one compiled program per (batch, prompt bucket, config).

Decoding follows LMDeploy's dLLM engine (LMDEPLOY.md §1):

* blocks are aligned to absolute position 0; the prompt's partial last block is the first block
  decoded (its prompt tokens count as decided); complete prompt blocks are prefilled into a
  preallocated KV cache;
* every forward feeds each row's current block at its positions against the cache. In a
  *denoising* forward, candidates are drawn at every masked position (greedy, or temperature with
  optional top-k / top-p restricting the proposal), the confidence of a candidate is its
  probability under the full temperature-scaled distribution, and the unmasking rule
  (:mod:`dirl_jax.rollout.unmasking`) commits some of them for good;
* a completed block costs one more *commit* forward that writes its clean keys/values into the
  cache (LMDeploy does the same), then the next block starts all-masked;
* a row stops after the first completed block that contains a stop token or brings the number of
  generated tokens to ``max_new_tokens``; the whole final block is returned.

Rows progress independently inside one ``lax.while_loop`` (no host round trip per step). For each
committed token the result records the step map (1-based index of the denoising forward that
committed it, counted over the whole response; tokens committed together share it) and its
log-probability under the temperature-scaled distribution (the policy DiPO optimises).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dirl_jax import canvas as canvas_lib
from dirl_jax.config import DECODING_FIELDS
from dirl_jax.model.sdar import SDARForCausalLM, init_cache
from dirl_jax.rollout import unmasking

DENOISE, COMMIT, DONE = 0, 1, 2
FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_REASONS = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_NONE: "unfinished"}
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (one compiled program per distinct value).

    ``temperature == 0`` is greedy (argmax proposals, confidences and log-probs under T = 1, as in
    LMDeploy). ``top_k = 0`` and ``top_p = 1`` disable those filters. ``steps`` defaults to the
    block size.
    """

    block_size: int
    mask_token_id: int
    strategy: str = "low_confidence_dynamic"
    steps: int | None = None
    threshold: float = 0.9
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0               # stop tokens are never sampled before this many tokens
    banned_ids: tuple[int, ...] = ()      # tokens never sampled (LMDeploy's bad_words)
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in unmasking.STRATEGIES:
            raise ValueError(f"strategy: unknown {self.strategy!r}; available: "
                             f"{', '.join(unmasking.STRATEGIES)}")
        checks = [("block_size", self.block_size >= 1, "must be >= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature >= 0, "must be >= 0"),
                  ("top_k", self.top_k >= 0, "must be >= 0 (0 disables)"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("steps", self.steps is None or self.steps >= 1, "must be >= 1"),
                  ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens,
                   "must be in [0, max_new_tokens]")]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, block_size: int, mask_token_id: int,
                    stop_ids: Sequence[int] = (), banned_ids: Sequence[int] = (),
                    attn_impl: str = "auto") -> SamplingConfig:
        """The settings of a config section's decoding fields (``dirl_jax.config.DECODING_FIELDS``,
        the same in DiPO's ``rollout``, the built-in ``eval`` and a benchmark evaluation;
        ``steps = 0`` means the block size) for a model's block size and mask token."""
        values = {name: fields[name] for name in DECODING_FIELDS}
        return cls(block_size=block_size, mask_token_id=mask_token_id,
                   **{**values, "steps": values["steps"] or None},
                   stop_ids=tuple(int(t) for t in stop_ids),
                   banned_ids=tuple(int(t) for t in banned_ids), attn_impl=attn_impl)

    @property
    def denoising_steps(self) -> int:
        return self.block_size if self.steps is None else self.steps


def _rows_slice(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size))(x, start)


def _rows_update(x: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
    return jax.vmap(lambda row, c, s: jax.lax.dynamic_update_slice_in_dim(row, c, s, 0))(x, chunk, start)


def filter_logits(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """``scaled`` logits with ``-inf`` outside the top-k / top-p (nucleus) proposal set."""
    filtered = scaled
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        filtered = jnp.where(scaled < kth, -jnp.inf, filtered)
    if top_p < 1:
        sorted_desc = -jnp.sort(-filtered, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # the smallest prefix whose mass reaches top_p (the most likely token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where(filtered < cutoff, -jnp.inf, filtered)
    return filtered


def constrain_logits(logits: jax.Array, response_index: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``-inf`` for banned tokens everywhere, and for stop tokens at response positions
    (``response_index [batch, B]``, 0-based) below ``min_new_tokens``."""
    if cfg.banned_ids:
        logits = logits.at[..., jnp.asarray(cfg.banned_ids)].set(-jnp.inf)
    if cfg.min_new_tokens and cfg.stop_ids:
        early = (response_index < cfg.min_new_tokens)[..., None]
        is_stop = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(cfg.stop_ids)].set(True)
        logits = jnp.where(early & is_stop, -jnp.inf, logits)
    return logits


def propose(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Candidates ``[batch, B]`` (one key per row) and their log-probabilities under the full
    temperature-scaled distribution."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1), jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)
    scaled = logits / cfg.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
    candidates = jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys, filtered)
    return candidates, jnp.take_along_axis(logp, candidates[..., None], axis=-1)[..., 0]


BlockCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def decode(model: SDARForCausalLM, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
           row_keys: jax.Array, cfg: SamplingConfig, on_block: BlockCallback | None = None
           ) -> dict[str, jax.Array]:
    """Decodes right-padded prompts ``[batch, prompt_bucket]`` (traceable; see :func:`decode_prompts`)
    with one sampling key per row, so a row's sample does not depend on its batch.

    Returns ``tokens, step_map, logprobs [batch, max_length]`` (prompt and response), ``end``
    (one past the last response slot), ``finish`` codes and per-row ``forwards``. ``on_block``,
    if given, is called on the host with ``(block_tokens [batch, B], positions [batch, B],
    completed [batch])`` after every forward (streaming).
    """
    b_size = cfg.block_size
    batch, bucket = prompt_tokens.shape
    max_length = (-(-bucket // b_size) + -(-cfg.max_new_tokens // b_size) + 1) * b_size
    slots = jnp.arange(max_length)
    cache = init_cache(model.config, batch, max_length, model.dtype)
    prompt_pos = jnp.broadcast_to(jnp.arange(bucket), (batch, bucket))
    in_prompt = prompt_pos < prompt_lengths[:, None]
    tokens = jnp.full((batch, max_length), cfg.mask_token_id, jnp.int32)
    tokens = tokens.at[:, :bucket].set(jnp.where(in_prompt, prompt_tokens, cfg.mask_token_id))

    def cache_tags(visible_end: jax.Array) -> canvas_lib.Canvas:
        seg = jnp.where(slots[None] < visible_end[:, None], 0, canvas_lib.PADDING_SEGMENT)
        return canvas_lib.block_causal_canvas(jnp.zeros_like(seg), jnp.broadcast_to(slots, seg.shape),
                                              seg, b_size)

    # Prefill the whole prompt; the slots of complete prompt blocks are final from here on.
    prompt_seg = jnp.where(in_prompt, 0, canvas_lib.PADDING_SEGMENT)
    _, cache = model.cached_hidden_states(
        canvas_lib.block_causal_canvas(tokens[:, :bucket], prompt_pos, prompt_seg, b_size),
        cache_tags(prompt_lengths), cache, jnp.zeros((batch,), jnp.int32), attn_impl=cfg.attn_impl)

    state = dict(tokens=tokens, cache=cache,
                 step_map=jnp.zeros((batch, max_length), jnp.int32),
                 logprobs=jnp.zeros((batch, max_length), jnp.float32),
                 block=prompt_lengths // b_size, mode=jnp.full((batch,), DENOISE, jnp.int32),
                 steps=jnp.zeros((batch,), jnp.int32), forwards=jnp.ones((batch,), jnp.int32),
                 finish=jnp.full((batch,), FINISH_NONE, jnp.int32), iteration=jnp.int32(0))
    max_iterations = (max_length // b_size) * (b_size + 1) + 1
    offsets = jnp.arange(b_size)
    stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

    def body(state: dict) -> dict:
        start = state["block"] * b_size
        positions = start[:, None] + offsets
        active = state["mode"] != DONE
        block_tokens = _rows_slice(state["tokens"], start, b_size)
        q_seg = jnp.where(active[:, None], 0, canvas_lib.PADDING_SEGMENT) * jnp.ones_like(positions)
        q_canvas = canvas_lib.block_causal_canvas(block_tokens, positions, q_seg, b_size)
        kv_end = jnp.where(active, start + b_size, 0)
        hidden, cache = model.cached_hidden_states(q_canvas, cache_tags(kv_end), state["cache"],
                                                   start, attn_impl=cfg.attn_impl)
        logits = constrain_logits(model.logits(hidden).astype(jnp.float32),
                                  positions - prompt_lengths[:, None], cfg)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, state["iteration"])
        candidates, logp = propose(logits, step_keys, cfg)

        denoising = state["mode"] == DENOISE
        block_steps = _rows_slice(state["step_map"], start, b_size)
        generated = positions >= prompt_lengths[:, None]
        masked = generated & (block_steps == 0) & denoising[:, None]
        chosen = unmasking.select_positions(jnp.exp(logp), masked, strategy=cfg.strategy,
                                            block_size=b_size, steps=cfg.denoising_steps,
                                            threshold=cfg.threshold)
        steps = state["steps"] + chosen.any(axis=-1)
        new_tokens = jnp.where(chosen, candidates, block_tokens)
        new_steps = jnp.where(chosen, steps[:, None], block_steps)
        new_logp = jnp.where(chosen, logp, _rows_slice(state["logprobs"], start, b_size))

        complete = denoising & ~(masked & ~chosen).any(axis=-1)
        hit_stop = (jnp.isin(new_tokens, stop_ids) & generated).any(axis=-1)
        hit_length = start + b_size - prompt_lengths >= cfg.max_new_tokens
        finish = jnp.where(complete & hit_stop, FINISH_STOP,
                           jnp.where(complete & hit_length, FINISH_LENGTH, state["finish"]))
        if on_block is not None:
            jax.debug.callback(on_block, new_tokens, positions, complete, ordered=True)
        committed = state["mode"] == COMMIT
        mode = jnp.where(complete, jnp.where(hit_stop | hit_length, DONE, COMMIT),
                         jnp.where(committed, DENOISE, state["mode"]))
        return dict(tokens=_rows_update(state["tokens"], new_tokens, start), cache=cache,
                    step_map=_rows_update(state["step_map"], new_steps, start),
                    logprobs=_rows_update(state["logprobs"], new_logp, start),
                    block=state["block"] + committed, mode=mode, steps=steps,
                    forwards=state["forwards"] + active, finish=finish,
                    iteration=state["iteration"] + 1)

    def cond(state: dict) -> jax.Array:
        return (state["mode"] != DONE).any() & (state["iteration"] < max_iterations)

    state = jax.lax.while_loop(cond, body, state)
    return dict(tokens=state["tokens"], step_map=state["step_map"], logprobs=state["logprobs"],
                end=(state["block"] + 1) * b_size, finish=state["finish"],
                forwards=state["forwards"])


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "on_block", "mesh"))
def _decode_jit(graphdef, params, prompt_tokens, prompt_lengths, row_keys, cfg, on_block, mesh):
    def run(params, prompt_tokens, prompt_lengths, row_keys):
        return decode(nnx.merge(graphdef, params), prompt_tokens, prompt_lengths, row_keys, cfg,
                      on_block)

    if mesh is None:
        return run(params, prompt_tokens, prompt_lengths, row_keys)
    rows = jax.sharding.PartitionSpec(mesh.axis_names)  # batch over every device of the mesh
    return jax.shard_map(run, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), rows, rows, rows),
                         out_specs=rows, check_vma=False)(params, prompt_tokens, prompt_lengths,
                                                          row_keys)


def decode_prompts(model: SDARForCausalLM, prompts: list[list[int]], cfg: SamplingConfig, *,
                   seed: int = 0, row_seeds: Sequence[int] | None = None, pad_token_id: int = 0,
                   on_block: BlockCallback | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> list[dict]:
    """Decodes prompts of any lengths in one batch; one result per prompt.

    Each result: ``token_ids`` (the response, whole blocks), ``step_map``, ``logprobs``,
    ``length`` (response tokens up to and including the first stop token; tokens after it in
    the final block were sampled too and are returned, but carry no loss in DiPO),
    ``finish_reason`` (``stop`` | ``length``), ``num_steps`` (denoising forwards that committed
    tokens), ``num_forwards`` (all forwards of the row: prefill, denoising and commit) and
    ``tokens_per_step``.

    With a ``mesh``, the batch is split over all its devices (data parallel; the parameters are
    replicated, each shard decodes its rows independently). The batch is padded with copies of
    the last prompt to a multiple of the device count.

    Row ``i`` samples with the key ``fold_in(key(seed), row_seeds[i])`` (``row_seeds`` default
    to the row indices, each in ``[0, 2**31)``): a row's sample depends on its seed, never on the
    rest of the batch, so work can be split, reordered and resumed reproducibly.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    count = len(prompts)
    row_seeds = list(range(count)) if row_seeds is None else [int(s) for s in row_seeds]
    if len(row_seeds) != count or not all(0 <= s < 2 ** 31 for s in row_seeds):
        raise ValueError(f"row_seeds: need {count} seeds in [0, 2**31), got {row_seeds[:8]}...")
    if mesh is not None:
        prompts = list(prompts) + [prompts[-1]] * (-count % mesh.size)
        row_seeds = row_seeds + [row_seeds[-1]] * (-count % mesh.size)
    lengths = np.array([len(p) for p in prompts], np.int32)
    bucket = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.full((len(prompts), bucket), pad_token_id, np.int32)
    for i, prompt in enumerate(prompts):
        padded[i, :len(prompt)] = prompt
    graphdef, params = nnx.split(model)
    if mesh is not None:  # replicated over the mesh (a no-op when the parameters already are)
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.key(seed), jnp.asarray(row_seeds, jnp.int32))
    out = jax.device_get(_decode_jit(graphdef, params, jnp.asarray(padded), jnp.asarray(lengths),
                                     row_keys, cfg, on_block, mesh))
    stops = cfg.stop_ids
    results = []
    for i, length in enumerate(lengths[:count]):
        span = slice(int(length), int(out["end"][i]))
        token_ids, step_map = out["tokens"][i, span], out["step_map"][i, span]
        results.append({
            "token_ids": token_ids.tolist(), "step_map": step_map.tolist(),
            "logprobs": out["logprobs"][i, span].tolist(),
            "finish_reason": FINISH_REASONS[int(out["finish"][i])],
            "num_forwards": int(out["forwards"][i]), **response_stats(token_ids, step_map, stops),
        })
    return results


def response_stats(token_ids: Sequence[int], step_map: Sequence[int], stop_ids: Sequence[int]
                   ) -> dict[str, Any]:
    """``length`` (tokens up to and including the first stop id, else all), ``num_steps`` (the
    denoising steps that committed tokens) and ``tokens_per_step`` of one response."""
    stop_at = np.flatnonzero(np.isin(np.asarray(token_ids), np.asarray(stop_ids, np.int64)))
    num_steps = int(np.max(step_map, initial=0))
    return {"length": int(stop_at[0]) + 1 if len(stop_at) else len(token_ids),
            "num_steps": num_steps, "tokens_per_step": len(token_ids) / max(1, num_steps)}


def generate(model: SDARForCausalLM, prompts: Sequence[Sequence[int]], *,
             block_size: int | None = None, strategy: str = "low_confidence_dynamic",
             steps: int | None = None, threshold: float = 0.9, max_new_tokens: int = 256,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), min_new_tokens: int = 0, banned_ids: Sequence[int] = (),
             seed: int = 0, row_seeds: Sequence[int] | None = None,
             mask_token_id: int | None = None, pad_token_id: int | None = None,
             attn_impl: str = "auto", on_block: BlockCallback | None = None,
             mesh: jax.sharding.Mesh | None = None) -> list[dict]:
    """Decodes token-id prompts of any lengths in one compiled batch; one result per prompt.

    ``block_size``, ``mask_token_id`` and ``pad_token_id`` default to the model config's.
    ``temperature=0`` is greedy. Each result holds ``token_ids``, ``step_map``, ``logprobs``,
    ``length``, ``finish_reason``, ``num_steps``, ``num_forwards`` and ``tokens_per_step``
    (see :func:`dirl_jax.rollout.sampler.decode_prompts`, also for ``row_seeds``). ``mesh``
    splits the batch over its devices (data parallel).
    """
    config = model.config
    cfg = SamplingConfig(
        block_size=block_size or config.block_size,
        mask_token_id=config.mask_token_id if mask_token_id is None else mask_token_id,
        strategy=strategy, steps=steps, threshold=threshold, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tuple(int(t) for t in stop_ids),
        min_new_tokens=min_new_tokens, banned_ids=tuple(int(t) for t in banned_ids),
        attn_impl=attn_impl)
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    return decode_prompts(model, [list(p) for p in prompts], cfg, seed=seed, row_seeds=row_seeds,
                          pad_token_id=pad or 0, on_block=on_block, mesh=mesh)

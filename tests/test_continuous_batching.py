"""Continuous batching, the attention window and the fused commit change how the decoder
works, never what it decodes: a row's result is a function of its prompt and row seed only."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_model, tiny_config
from dirl_jax.rollout import decoder
from dirl_jax.rollout.decoder import decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig
from naive_decoder import naive_generate

BLOCK = 4


def peaky_model(seed: int, vocab: int = 61):
    config = tiny_config(block_size=BLOCK, vocab=vocab)
    model = random_model(config, seed)
    model.lm_head.weight.set_value(model.lm_head.weight.get_value() * 25.0)
    return config, model


def assert_same(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"] and got["step_map"] == want["step_map"]
    assert got["finish_reason"] == want["finish_reason"]
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("slots,continuous,commit,reverse", [
    (1, True, "separate", False),
    (2, True, "fused", True),
    (3, False, "separate", True),
    (3, True, "fused", False),
])
def test_results_do_not_depend_on_slots_order_batching_or_commit(seed, slots, continuous, commit,
                                                                 reverse):
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (5, 8, 13, 2, 7, 11, 3)]
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id, max_new_tokens=24,
                         temperature=1.0, top_k=20, stop_ids=(7, 11, 12, 13),
                         strategy="low_confidence_dynamic", threshold=0.5)
    seeds = list(range(100, 100 + len(prompts)))
    reference = decode_prompts(model, prompts, cfg, seed=seed, row_seeds=seeds, commit="separate")
    assert len({len(r["token_ids"]) for r in reference}) > 2  # rows end at different lengths
    order = list(range(len(prompts)))[::-1] if reverse else list(range(len(prompts)))
    got = decode_prompts(model, [prompts[i] for i in order], cfg, seed=seed,
                         row_seeds=[seeds[i] for i in order], slots=slots,
                         continuous=continuous, commit=commit)
    for i, result in zip(order, got):
        assert_same(result, reference[i])


def test_finished_slots_take_waiting_prompts_at_once(seed):
    """With 2 slots, a prompt enters as soon as a slot frees, while the other slot's row still
    runs (static batches wait for both rows of a batch)."""
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, 6).tolist() for _ in range(6)]  # 3 static batches of 2
    limits = [4, 28, 8, 12, 16, 20]
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id, max_new_tokens=28,
                         temperature=1.0)

    def slot_history(continuous: bool) -> list[tuple[int, ...]]:
        seen: list[tuple[int, ...]] = []

        def on_block(index, tokens, positions, completed):
            seen.append(tuple(int(i) for i in index))

        decode_prompts(model, prompts, cfg, seed=seed, slots=2, continuous=continuous,
                       on_block=on_block, max_new_tokens=limits)
        return seen

    def lone_changes(history: list[tuple[int, ...]]) -> int:
        """Forwards after which one slot holds a new prompt and the other the same as before."""
        return sum(1 for before, now in zip(history, history[1:])
                   if sum(b != n for b, n in zip(before, now)) == 1)

    assert lone_changes(slot_history(True)) >= 2
    assert lone_changes(slot_history(False)) == 0


@pytest.mark.parametrize("occupant,shards,want", [
    ([5, -1, -1, -1, 7, -1, -1, -1], 1, [0, 4]),          # 2 live of 8: two slots
    ([5, -1, -1, -1, 7, -1, 9, -1], 1, [0, 4, 6, 1]),     # 3 live: four slots, a free one pads
    ([5, -1, 3, -1, 7, -1, 9, -1], 1, [0, 2, 4, 6]),      # 4 live of 8: exactly half moves
    ([5, 1, 3, -1, 7, -1, 9, -1], 1, None),               # 5 live of 8: all slots kept
    ([5, -1, -1, -1, -1, -1, -1, -1], 4, [0, 1, 2, 3]),   # 1 live over 4 data shards: four slots
    ([5, -1, -1, -1, 7, -1, -1, -1], 8, None),            # 8 data shards: never below 8 slots
    ([-1] * 8, 1, None),                                  # nothing live
    ([3], 1, None),                                       # one slot stays one slot
])
def test_compaction_keeps_the_live_slots_in_a_power_of_two(occupant, shards, want):
    rows = decoder._compaction(np.array(occupant), shards)
    assert (rows is None) if want is None else (rows.tolist() == want)


def test_the_long_tail_runs_on_fewer_slots_with_the_same_results(seed, monkeypatch):
    """Eight rows, one much longer than the others: once no prompt waits and at most half the
    slots are live, the live rows move into fewer slots (8 -> 4 -> 2 -> 1 here); each row's
    result is the one it gets decoded alone."""
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (5, 9, 2, 12, 7, 3, 6, 10)]
    limits = [4, 8, 4, 12, 16, 4, 8, 40]
    kw = dict(block_size=BLOCK, mask_token_id=config.mask_token_id, temperature=1.0)
    sizes = []
    compact = decoder._compact
    monkeypatch.setattr(decoder, "_compact", lambda state, rows: sizes.append(len(rows)) or
                        compact(state, rows))
    got = decode_prompts(model, prompts, SamplingConfig(max_new_tokens=40, **kw), seed=seed,
                         max_new_tokens=limits)
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    for i, (prompt, limit, result) in enumerate(zip(prompts, limits, got)):
        [alone] = decode_prompts(model, [prompt], SamplingConfig(max_new_tokens=limit, **kw),
                                 seed=seed, row_seeds=[i])
        assert_same(result, alone)


def test_window_growth_past_the_first_bucket_equals_the_naive_decoder(seed):
    """Prompts near the first window bucket (256 slots): decoding crosses into a larger window."""
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (245, 250, 3)]
    kw = dict(strategy="low_confidence_dynamic", threshold=0.25, max_new_tokens=16)
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id, temperature=0.0,
                         **kw)
    assert decoder.window_for(248, decoder.capacity_for(256, cfg)) == decoder.MIN_WINDOW
    assert decoder.window_for(264, decoder.capacity_for(256, cfg)) > decoder.MIN_WINDOW
    naive = naive_generate(model, prompts, block_size=BLOCK, mask_token_id=config.mask_token_id,
                           pad_token_id=0, stop_ids=[], steps=None, **kw)
    for commit in ("separate", "fused"):
        for got, want in zip(decode_prompts(model, prompts, cfg, slots=2, commit=commit), naive):
            assert got["token_ids"] == want["token_ids"] and got["step_map"] == want["step_map"]


def test_window_buckets_and_commit_modes():
    assert [decoder.window_for(n, 10_000) for n in (1, 256, 257, 385, 513, 769)] == \
        [256, 256, 384, 512, 768, 1024]
    assert decoder.window_for(5000, 1000) == 1000
    assert decoder.resolve_commit("auto", "cpu") == "separate"
    assert decoder.resolve_commit("auto", "tpu") == "fused"
    assert decoder.resolve_commit("auto", "gpu") == "fused"
    with pytest.raises(ValueError, match="commit"):
        decoder.resolve_commit("eager")
    with pytest.raises(ValueError, match="slots"):
        config, model = peaky_model(0)
        decode_prompts(model, [[1, 2]], SamplingConfig(block_size=BLOCK, mask_token_id=60), slots=0)


def test_per_row_length_limits_equal_decoding_each_row_with_its_own_limit(seed):
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (5, 9, 2, 12)]
    limits = [3, 20, 9, 14]
    kw = dict(block_size=BLOCK, mask_token_id=config.mask_token_id, temperature=1.0)
    cfg = SamplingConfig(max_new_tokens=20, **kw)
    got = decode_prompts(model, prompts, cfg, seed=seed, slots=2, max_new_tokens=limits)
    for i, (prompt, limit, result) in enumerate(zip(prompts, limits, got)):
        assert result["finish_reason"] == "length"
        assert limit <= len(result["token_ids"]) < limit + BLOCK
        [alone] = decode_prompts(model, [prompt], SamplingConfig(max_new_tokens=limit, **kw),
                                 seed=seed, row_seeds=[i])
        assert_same(result, alone)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_prompts(model, prompts, cfg, max_new_tokens=[1, 2, 3, 21])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_vocabulary_head_at_needed_positions_only(seed, temperature, fraction):
    """The packed head (half of the positions when the needed ones fit) gives every needed
    position the candidate and log-prob of the head over all positions."""
    import jax
    import jax.numpy as jnp

    from dirl_jax.rollout.sampler import constrain_logits, propose
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    slots = 6
    hidden = jnp.asarray(rng.standard_normal((slots, BLOCK, config.hidden_size)), jnp.float32)
    needed = rng.random((slots, BLOCK)) < fraction
    response_index = jnp.asarray(rng.integers(0, 8, (slots, BLOCK)))
    keys = jax.random.split(jax.random.key(seed), slots * BLOCK).reshape(slots, BLOCK)
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id,
                         temperature=temperature, top_k=10, min_new_tokens=3, stop_ids=(7, 9))
    got = decoder.vocab_head(model, hidden, jnp.asarray(needed), response_index, keys, cfg)
    flat = lambda x: x.reshape((slots * BLOCK,) + x.shape[2:])  # noqa: E731
    logits = constrain_logits(model.logits(flat(hidden)), flat(response_index), cfg)
    want = propose(logits, flat(keys), cfg)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g)[needed], np.asarray(w).reshape(slots, BLOCK)[needed],
                                   atol=1e-5)

"""DiPO blocks: round expansion, the single-pass multi-round canvas, advantages, the loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib
from dirl_jax import dipo
from dirl_jax.rollout.decoder import decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig

BLOCK = 4


def test_round_expansion_reproduces_the_worked_example():
    """DIRL_SPEC §10: B=4, prompt 6, response 10."""
    step_map = np.array([-1] * 6 + [1, 2, 3, 3, 4, 3, 5, 5, 5, 6] + [-1] * 4)
    rounds = dipo.expand_rounds(step_map, BLOCK)
    assert len(rounds) == 2
    (p0, m0), (p1, m1) = rounds
    np.testing.assert_array_equal(p0[6:16], [1, 0, 1, 1, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(m0[6:16], [1] * 10)
    np.testing.assert_array_equal(p1[6:16], [0, 1, 0, 0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(m1[6:16], p1[6:16])
    for p, m in rounds:
        assert not p[:6].any() and not p[16:].any() and not m[:6].any()


def random_trajectory(rng: np.random.Generator, vocab: int, advantage: float = 0.0) -> dipo.Trajectory:
    """A prompt and a response whose blocks were committed over random increasing steps."""
    prompt_len = int(rng.integers(1, 11))
    end = (prompt_len // BLOCK + int(rng.integers(1, 4)) + 1) * BLOCK
    steps, step = [], 0
    for start in range(prompt_len // BLOCK * BLOCK, end, BLOCK):
        n = min(start + BLOCK, end) - max(start, prompt_len)
        groups = rng.integers(0, n, n)  # committed at one of up to n steps of this block
        order = {g: i for i, g in enumerate(sorted(set(groups.tolist())))}
        steps += [step + 1 + order[g] for g in groups.tolist()]
        step += len(order)
    response = rng.integers(0, vocab - 2, len(steps)).tolist()
    return dipo.Trajectory(prompt=rng.integers(0, vocab - 2, prompt_len).tolist(), response=response,
                           step_map=steps, num_loss_tokens=int(rng.integers(1, len(steps) + 1)),
                           advantage=advantage)


def test_round_expansion_properties(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        traj = random_trajectory(rng, 50)
        step_map = np.r_[np.full(len(traj.prompt), -1), traj.step_map]
        rounds = dipo.expand_rounds(step_map, BLOCK)
        scored = np.sum([p for p, _ in rounds], axis=0)
        np.testing.assert_array_equal(scored, step_map > 0)  # every response token scored once
        blocks = np.arange(len(step_map)) // BLOCK
        for p, m in rounds:
            assert (m >= p).all()
            for b in np.unique(blocks[p]):
                s = step_map[(blocks == b) & p][0]
                in_block = (blocks == b) & (step_map > 0)
                np.testing.assert_array_equal(m[in_block], step_map[in_block] >= s)
        assert len(rounds) == max(len(set(step_map[(blocks == b) & (step_map > 0)]))
                                  for b in np.unique(blocks[step_map > 0]))


def per_round_logprobs(model, traj: dipo.Trajectory, mask_token_id: int, temperature: float) -> np.ndarray:
    """The original's layout: one two-stream forward per round, scored at the noisy copies."""
    tokens = np.array(list(traj.prompt) + list(traj.response))
    step_map = np.r_[np.full(len(traj.prompt), -1), traj.step_map]
    out = np.zeros(len(tokens))
    for p_mask, masked in dipo.expand_rounds(step_map, BLOCK):
        noisy = np.where(masked, mask_token_id, tokens)
        canvas, noisy_slot = canvas_lib.two_stream_canvas(
            tokens[None], noisy[None], np.arange(len(tokens))[None],
            np.zeros((1, len(tokens)), np.int32), BLOCK)
        logits = np.asarray(model(canvas=canvas, attn_impl="reference"), np.float64)[0]
        logits = logits / (temperature or 1.0)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        for j in np.flatnonzero(p_mask):
            slot = int(noisy_slot[0, j])
            out[j] = logits[slot, tokens[j]] - logz[slot]
    return out[len(traj.prompt):]


def one_micro_batch(packed: dipo.PackedRounds, trajectories, old=None, aggregation="token_mean",
                    extra_scored: int = 3) -> dict[str, jnp.ndarray]:
    old = np.zeros(len(packed.score_row)) if old is None else old
    per_row = int(np.bincount(packed.score_row).max())
    (batch,) = dipo.micro_batches(packed, trajectories, old, rows=packed.canvas.shape[0],
                                  scored_per_row=per_row + extra_scored, aggregation=aggregation)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def in_packed_order(packed: dipo.PackedRounds, values) -> np.ndarray:
    """A one-micro-batch ``[rows, scored_per_row]`` result in ``packed.score_*`` order."""
    picked, row, column = dipo.scored_cells(packed, 0, packed.canvas.shape[0])
    out = np.zeros(len(packed.score_row))
    out[picked] = np.asarray(values)[row, column]
    return out


def packed_logprobs(model, trajectories, mask_token_id: int, temperature: float, row_length: int):
    """The trainer's path: pack, one micro-batch, :func:`dipo.score_tokens` (odd chunk size).
    Every response token is scored (also those after a stop, which carry no loss in training)."""
    trajectories = [dataclasses.replace(t, num_loss_tokens=len(t.response)) for t in trajectories]
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK, mask_token_id=mask_token_id,
                              row_length=row_length)
    logp, _ = dipo.score_tokens(model, one_micro_batch(packed, trajectories),
                                temperature=temperature, chunk=7)
    logp = in_packed_order(packed, logp)
    per_traj = []
    for i, traj in enumerate(trajectories):
        rows = packed.score_trajectory == i
        # scored tokens come in round order; map them back to response positions
        positions = packed.canvas.positions[packed.score_row[rows], packed.score_slot[rows]]
        out = np.zeros(len(traj.response))
        out[positions - len(traj.prompt)] = logp[rows]
        per_traj.append(out)
    return packed, per_traj


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_single_pass_canvas_equals_one_forward_per_round(seed, temperature):
    rng = np.random.default_rng(seed)
    config = tiny_config(block_size=BLOCK)
    model = random_model(config, seed)
    trajectories = [random_trajectory(rng, config.vocab_size) for _ in range(5)]
    for row_length in (96, 192, 384):  # the shortest rows that pack some trajectories together
        packed, got = packed_logprobs(model, trajectories, config.mask_token_id, temperature,
                                      row_length)
        if packed.canvas.shape[0] < len(trajectories):
            break
    assert packed.canvas.shape[0] < len(trajectories)  # trajectories were packed together
    for traj, logp in zip(trajectories, got):
        np.testing.assert_allclose(logp, per_round_logprobs(model, traj, config.mask_token_id,
                                                            temperature), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy,temperature,top_k", [
    ("low_confidence_static", 0.0, 0), ("low_confidence_dynamic", 0.0, 0),
    ("low_confidence_dynamic", 1.0, 5)])
def test_trainer_logprobs_equal_the_sampler_on_real_rollouts(seed, strategy, temperature, top_k):
    """Ratio = 1 at the first PPO iteration: the packed canvas recomputes the sampler's log-probs,
    and the single pass needs far fewer tokens than one two-stream forward per round."""
    from test_sampler import peaky_model
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (5, 8, 13, 3)]
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id, strategy=strategy,
                         steps=2 if strategy == "low_confidence_static" else None, threshold=0.5,
                         max_new_tokens=16, temperature=temperature, top_k=top_k, stop_ids=(7,))
    results = decode_prompts(model, prompts, cfg, seed=seed)
    trajectories = [dipo.Trajectory(p, r["token_ids"], r["step_map"], r["length"])
                    for p, r in zip(prompts, results)]
    packed, got = packed_logprobs(model, trajectories, config.mask_token_id, temperature, 256)
    for result, logp in zip(results, got):
        np.testing.assert_allclose(logp, result["logprobs"], atol=1e-5, rtol=0)
    single_pass = packed.tokens_per_trajectory.sum()
    per_round = sum(2 * (len(t.prompt) + len(t.response))
                    * len(dipo.expand_rounds(np.r_[[-1] * len(t.prompt), t.step_map], BLOCK))
                    for t in trajectories)
    assert single_pass < per_round
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK, mask_token_id=config.mask_token_id,
                              row_length=256)
    assert packed.score_loss.sum() == sum(r["length"] for r in results)


@pytest.mark.parametrize("prompt_len,response_len", [(8, 12), (5, 12), (6, 9)])
def test_worst_case_canvas_tokens_bounds_one_token_per_step(prompt_len, response_len):
    """One token per step is the longest layout; the bound is exact for block-aligned prompts."""
    rng = np.random.default_rng(prompt_len)
    steps = np.zeros(response_len, int)
    for block in np.unique((prompt_len + np.arange(response_len)) // BLOCK):
        here = (prompt_len + np.arange(response_len)) // BLOCK == block
        steps[here] = rng.permutation(here.sum()) + 1 + 10 * block
    traj = dipo.Trajectory(list(range(prompt_len)), list(range(response_len)), steps.tolist(), response_len)
    packed = dipo.pack_rounds([traj], block_size=BLOCK, mask_token_id=0, row_length=512)
    bound = dipo.worst_case_canvas_tokens(prompt_len, response_len, BLOCK)
    assert packed.tokens_per_trajectory[0] <= bound
    if prompt_len % BLOCK == 0 and response_len % BLOCK == 0:
        assert packed.tokens_per_trajectory[0] == bound


@pytest.mark.parametrize("block", [2, 4])
def test_the_canvas_bound_holds_for_every_prompt_up_to_the_cap(block):
    """Every prompt length up to the cap, with the decoder's longest response (to the end of the
    block where ``max_new_tokens`` is reached) decoded one token per step, fits the bound; the
    bound is tight to within one block's copies."""
    for cap, max_new in ((7, 5), (9, 8), (12, 3), (13, 16)):
        bound = dipo.max_trajectory_canvas_tokens(cap, max_new, block)
        sizes = []
        for prompt in range(1, cap + 1):
            response = -(-(prompt + max_new) // block) * block - prompt
            traj = dipo.Trajectory(list(range(prompt)), [1] * response, list(range(1, response + 1)),
                                   response)
            packed = dipo.pack_rounds([traj], block_size=block, mask_token_id=0, row_length=10**6)
            sizes.append(int(packed.tokens_per_trajectory[0]))
        assert max(sizes) <= bound, (cap, max_new)
        assert bound - max(sizes) < block * block, (cap, max_new)


def test_pack_rounds_rejects_bad_inputs():
    traj = dipo.Trajectory([1, 2], [3, 4], [1], 2)
    with pytest.raises(ValueError, match="step_map"):
        dipo.pack_rounds([traj], block_size=BLOCK, mask_token_id=9, row_length=64)
    long = dipo.Trajectory([1] * 30, [3, 4], [1, 1], 2)
    with pytest.raises(ValueError, match="trajectory 0 needs 36 canvas slots; row_length is 32"):
        dipo.pack_rounds([long], block_size=BLOCK, mask_token_id=9, row_length=32)


def test_group_advantages_and_dynamic_sampling():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.0]])
    z = dipo.group_advantages(rewards)
    np.testing.assert_allclose(z[0], [1, -1, -1, 1], atol=1e-5)  # population std = 0.5
    np.testing.assert_allclose(z[1], 0.0)
    np.testing.assert_allclose(z[2], np.array([-0.125, -0.125, 0.375, -0.125]) / (np.sqrt(0.046875) + 1e-6))
    np.testing.assert_allclose(dipo.group_advantages(rewards, "center")[0], [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="available: zscore, center"):
        dipo.group_advantages(rewards, "rank")
    correct = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], float)
    np.testing.assert_array_equal(dipo.informative_groups(correct), [True, False, False, True])
    # non-accuracy rewards: a group with uniform correctness but unequal rewards has a signal
    np.testing.assert_array_equal(dipo.informative_groups(rewards), [True, False, True])


@pytest.mark.parametrize("requested, dynamic, group, source, expected", [
    (5, True, 32, "gsm8k.jsonl", 5),            # an explicit factor wins
    (0, False, 8, "data/GSM8K_train.json", 1),  # no filter: one draw per round
    (0, True, 16, "data/GSM8K_train.json", 2),  # k >= 16 forces 2
    (0, True, 15, "data/GSM8K_train.json", 6),
    (0, True, 8, "data/BigMath_train.json", 3),
    (0, True, 8, "builtin:arithmetic", 2),
])
def test_oversample_factor_follows_the_original(requested, dynamic, group, source, expected):
    assert dipo.oversample_factor(requested, dynamic_sampling=dynamic, group_size=group,
                                  source=source) == expected


def numpy_loss(logp, old, adv, weight, eps_low, eps_high, clamp, beta, ref):
    ratio = np.exp(np.clip(logp - old, -clamp, clamp))
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    x = ref - logp
    k3 = np.exp(np.clip(x, -clamp, clamp)) - 1 - x
    return -(weight * surrogate).sum() + beta * (weight * k3).sum()


def test_loss_matches_float64_reference(seed):
    rng = np.random.default_rng(seed)
    n = 400
    logp = rng.normal(-2, 1, n)
    old = logp + rng.normal(0, 0.4, n)
    old[:20] = logp[:20] + rng.choice([-15, 15], 20)  # beyond the ±10 log-ratio clamp
    adv = rng.normal(0, 1, n)
    ref = logp + rng.normal(0, 0.5, n)
    weight = (rng.random(n) < 0.8) * rng.random(n) / 100
    cfg = dipo.LossConfig(eps_low=0.2, eps_high=0.28, log_ratio_clamp=10.0, beta=0.1)
    ratio = np.exp(np.clip(logp - old, -10, 10))
    for branch in (ratio * adv > np.clip(ratio, 0.8, 1.28) * adv, ratio * adv < np.clip(ratio, 0.8, 1.28) * adv):
        assert branch.sum() > 20  # both clip branches are exercised
    got = dipo.dipo_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, weight)), cfg,
                         logp_ref=jnp.asarray(ref, jnp.float32))
    want = numpy_loss(logp, old, adv, weight, 0.2, 0.28, 10.0, 0.1, ref)
    assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want))
    no_kl = dipo.dipo_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, weight)),
                           dataclasses.replace(cfg, beta=0.0))
    want = numpy_loss(logp, old, adv, weight, 0.2, 0.28, 10.0, 0.0, ref)
    assert abs(float(no_kl) - want) <= 1e-5 * max(1.0, abs(want))


def test_loss_weights_per_aggregation():
    """Two responses: 4 loss tokens in 3 steps, and 2 loss tokens (of 4) in 2 steps."""
    trajectories = [dipo.Trajectory([1, 2], [5, 6, 7, 8], [1, 1, 2, 3], 4),
                    dipo.Trajectory([3], [5, 6, 7, 8], [1, 2, 2, 3], 2)]
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK, mask_token_id=0, row_length=64)
    first = packed.score_trajectory == 0
    want = {"token_mean": (1 / 6, 1 / 6), "sequence_mean": (1 / 8, 1 / 4), "step_mean": (1 / 5, 1 / 5)}
    for aggregation, (w0, w1) in want.items():
        weights = dipo.loss_weights(packed, trajectories, aggregation)
        np.testing.assert_allclose(weights[first], w0)
        np.testing.assert_allclose(weights[~first & packed.score_loss], w1)
        assert (weights[~packed.score_loss] == 0).all() and (~packed.score_loss).sum() == 2
    with pytest.raises(ValueError, match="available"):
        dipo.loss_weights(packed, trajectories, "mean")


def test_loss_terms_worked_examples():
    """DIRL_SPEC §10.4: ratio 1.105 → 1.105, 0.368 → 0.368, A = -1 → -1; k3 0.00484, 0.71828."""
    cfg = dipo.LossConfig()
    surrogate, _ = dipo.dipo_token_terms(jnp.array([0.1, -1.0, 0.0]), jnp.zeros(3),
                                         jnp.array([1.0, 1.0, -1.0]), cfg)
    np.testing.assert_allclose(surrogate, [np.exp(0.1), np.exp(-1.0), -1.0], rtol=1e-6)
    _, k3 = dipo.dipo_token_terms(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), cfg,
                                  logp_ref=jnp.array([-0.1, 1.0]))
    np.testing.assert_allclose(k3, [0.00484, 0.71828], atol=1e-5)


def test_objective_starts_at_ratio_one_and_a_step_follows_the_advantages(seed):
    import jax
    from flax import nnx
    from test_sampler import peaky_model
    config, model = peaky_model(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(10, 55, n).tolist() for n in (5, 8, 13, 3)]
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=config.mask_token_id, threshold=0.5,
                         max_new_tokens=12, temperature=1.0, top_k=5)
    results = decode_prompts(model, prompts, cfg, seed=seed)
    advantages = [1.0, 1.0, -1.0, -1.0]
    trajectories = [dipo.Trajectory(p, r["token_ids"], r["step_map"], len(r["token_ids"]), a)
                    for p, r, a in zip(prompts, results, advantages)]
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK, mask_token_id=config.mask_token_id,
                              row_length=96)
    rows = packed.canvas.shape[0]
    assert rows >= 2
    position = packed.canvas.positions[packed.score_row, packed.score_slot]
    old = np.array([results[i]["logprobs"][p - len(prompts[i])]
                    for i, p in zip(packed.score_trajectory, position)])
    batch = one_micro_batch(packed, trajectories, old, aggregation="sequence_mean")
    loss_cfg = dipo.LossConfig()
    graphdef, params = nnx.split(model, nnx.Param)

    def objective(params, batch):
        return dipo.dipo_objective(nnx.merge(graphdef, params), batch, loss_cfg, temperature=1.0,
                                   chunk=16)

    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
    assert float(stats["log_ratio_abs_max"]) < 1e-4  # engine and trainer agree
    assert float(stats["ratio_sum"]) == pytest.approx(len(packed.score_row), rel=1e-5)
    assert int(stats["loss_tokens"]) == len(packed.score_row)
    # one canvas row per micro-batch: the summed micro-batch gradients are the batch gradient
    split = dipo.micro_batches(packed, trajectories, old, rows=1,
                               scored_per_row=int(np.bincount(packed.score_row).max()),
                               aggregation="sequence_mean")
    assert len(split) == rows
    parts = [jax.value_and_grad(objective, has_aux=True)(params, {k: jnp.asarray(v) for k, v in b.items()})
             for b in split]
    assert sum(float(p[0][0]) for p in parts) == pytest.approx(float(loss), abs=1e-6)
    summed = jax.tree.map(lambda *g: sum(g), *[p[1] for p in parts])
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(grads)):
        # per tensor, in norm: fp32 sums in another order can cancel in single elements
        # (seed 646657930: 2e-6 on one of 1,464), a missing or mis-weighted part cannot hide
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-7
    reduced = dipo.reduce_stats([{k: float(v) for k, v in p[0][1].items()} for p in parts])
    assert reduced["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert reduced["loss_tokens"] == len(packed.score_row)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
    stepped = jax.tree.map(lambda p, g: p - 1e-3 * g / norm, params, grads)  # a small, first-order step
    # a small step along -grad raises the advantage-weighted log-probs (the surrogate at ratio 1)
    new_logp, _ = dipo.score_tokens(nnx.merge(graphdef, stepped), batch, temperature=1.0)
    new_logp = in_packed_order(packed, new_logp)
    sign = np.array(advantages)[packed.score_trajectory]
    assert float(np.sum(sign * (new_logp - old))) > 0
    assert np.abs(new_logp - old).max() > 1e-6  # the step moved the policy
    with pytest.raises(ValueError, match=r"canvas row \d+ scores \d+ tokens; the step is "
                                         r"compiled for 1 per row"):
        dipo.micro_batches(packed, trajectories, old, rows=rows, scored_per_row=1)


def test_chunked_token_scores_match_a_dense_softmax(seed):
    from dirl_jax.token_scores import chunked_token_scores
    rng = np.random.default_rng(seed)
    hidden, emb = rng.normal(size=(23, 16)), rng.normal(size=(50, 16))
    targets = rng.integers(0, 50, 23)
    active = rng.random(23) < 0.7
    active[7:14] = False  # one whole chunk of inactive tokens is skipped
    logp, entropy = chunked_token_scores(jnp.asarray(hidden, jnp.float32), jnp.asarray(emb, jnp.float32),
                                         jnp.asarray(targets), jnp.asarray(active), chunk=7,
                                         temperature=0.7)
    logits = hidden @ emb.T / 0.7
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    want_logp = np.where(active, log_probs[np.arange(23), targets], 0.0)
    want_entropy = np.where(active, -(np.exp(log_probs) * log_probs).sum(-1), 0.0)
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_scores_gradients_match_a_dense_softmax(seed, temperature):
    """The custom VJP against autodiff of dense float64 log-softmax, for a random cotangent per
    token; inactive tokens and a whole skipped chunk get no gradient."""
    from dirl_jax.token_scores import chunked_token_scores
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(seed)
        hidden, emb = rng.normal(size=(23, 16)), rng.normal(size=(50, 16))
        targets = rng.integers(0, 50, 23)
        active = rng.random(23) < 0.7
        active[7:14] = False
        cotangent = rng.normal(size=23)

        def chunked(h, e):
            logp, entropy = chunked_token_scores(h, e, jnp.asarray(targets), jnp.asarray(active),
                                                 chunk=7, temperature=temperature)
            return jnp.sum(logp * cotangent) + 0.0 * jnp.sum(entropy)

        def dense(h, e):
            log_probs = jax.nn.log_softmax(h @ e.T / temperature, axis=-1)
            logp = jnp.where(active, log_probs[jnp.arange(23), targets], 0.0)
            return jnp.sum(logp * cotangent)

        got = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(hidden, jnp.float32),
                                                jnp.asarray(emb, jnp.float32))
        want = jax.grad(dense, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(emb))
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-5)
    assert not np.asarray(got[0])[~active].any()


@pytest.mark.parametrize("num_tokens,chunk,want", [
    (512, 1024, 128),    # a quarter of the tokens, not the configured chunk
    (600, 1024, 152),    # a quarter rounded up to a multiple of 8
    (100, 1024, 128),    # never below MIN_CHUNK ...
    (100, 7, 7),         # ... unless the configured chunk is smaller
    (4096, 1024, 1024),  # a large batch keeps the configured chunk
    (4097, 1024, 1024),
])
def test_vocabulary_chunk_is_capped_at_a_quarter_of_the_tokens(num_tokens, chunk, want):
    from dirl_jax.token_scores import MIN_CHUNK, effective_chunk
    assert MIN_CHUNK == 128
    assert effective_chunk(num_tokens, chunk) == want


def test_only_chunks_holding_active_tokens_are_projected():
    """With active tokens first, 512 tokens of which 130 are active project two chunks of 128
    rows (not one of 1,024): the jaxpr's vocabulary matmul has 128 rows and the skipped chunks
    return zeros."""
    from dirl_jax.token_scores import chunked_token_scores
    hidden, emb = jnp.ones((512, 8)), jnp.ones((50, 8))
    active = jnp.arange(512) < 130
    jaxpr = str(jax.make_jaxpr(lambda h: chunked_token_scores(
        h, emb, jnp.zeros(512, jnp.int32), active, chunk=1024))(hidden))
    assert "f32[128,50]" in jaxpr and "f32[1024,50]" not in jaxpr
    logp, _ = chunked_token_scores(hidden, emb, jnp.zeros(512, jnp.int32), active, chunk=1024)
    np.testing.assert_allclose(np.asarray(logp)[:130], -np.log(50), rtol=1e-6)
    assert not np.asarray(logp)[130:].any()


# DIRL_SPEC §4.5 (modeling_sdar.py:1257, ρ_clip = clip(ρ, 1 - ε, 1 + ε + 0.08) with ε = 0.2; §5: the
# DAPO script keeps it): the original clips the ratio to [0.8, 1.28], asymmetric (clip-higher).
SPEC_EPS_LOW, SPEC_EPS_HIGH = 0.2, 0.28


def test_default_clip_range_is_the_originals_asymmetric_one(seed):
    """The loss of the default DiPO run config (its LossConfig built by the trainer's Updater) and
    LossConfig's own defaults clip at 1 - 0.2 and 1 + 0.28: ratios 1.2-1.28 with A > 0 are not
    clipped, 0.72-0.8 with A < 0 are; against a float64 restatement with the spec's constants."""
    import jax
    from flax import nnx

    from dirl_jax.config import dipo_defaults
    from dirl_jax.trainers.steps import Updater
    from dirl_jax.mesh import make_mesh
    from dirl_jax.model import abstract_model
    from dirl_jax.optim import make_optimizer
    config = dipo_defaults()
    graphdef, _ = nnx.split(abstract_model(tiny_config(block_size=BLOCK)), nnx.Param)
    updater = Updater(graphdef, make_optimizer(config.train), config,
                      make_mesh((1, 1, 1), jax.devices()[:1]))
    rng = np.random.default_rng(seed)
    ratio = np.array([0.6, 0.7, 0.73, 0.76, 0.79, 0.81, 0.9, 1.0, 1.1, 1.19, 1.21, 1.23, 1.25,
                      1.27, 1.29, 1.35, 1.5])
    ratio = np.concatenate([ratio, ratio])
    adv = np.concatenate([np.full(len(ratio) // 2, 1.0), np.full(len(ratio) // 2, -1.0)])
    adv *= rng.uniform(0.5, 2.0, len(adv))
    old = rng.normal(-2.0, 1.0, len(ratio))
    logp = old + np.log(ratio)
    weight = rng.uniform(0.01, 0.1, len(ratio))
    want_terms = np.minimum(ratio * adv, np.clip(ratio, 1 - SPEC_EPS_LOW, 1 + SPEC_EPS_HIGH) * adv)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv)]
    for cfg in (updater.loss_cfg, dipo.LossConfig()):
        terms, _ = dipo.dipo_token_terms(*args, cfg)
        np.testing.assert_allclose(np.asarray(terms), want_terms, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{cfg}")
        loss = dipo.dipo_loss(*args, jnp.asarray(weight, jnp.float32), cfg)
        # fp32 sums of terms of both signs: the tolerance scales with the sum of magnitudes
        scale = np.sum(np.abs(weight * want_terms))
        assert float(loss) == pytest.approx(-np.sum(weight * want_terms), rel=1e-5,
                                            abs=1e-6 * scale), cfg

"""The compiled KV-cache decoder against the naive dense-mask decoder and the training forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import random_model, tiny_config
from dirl_jax import canvas as canvas_lib
from dirl_jax.rollout.decoder import decode_prompts
from dirl_jax.rollout.sampler import SamplingConfig
from naive_decoder import naive_generate

BLOCK = 4
STOP = 7


def peaky_model(seed: int):
    """A tiny random model with a scaled-up head, so confidences spread over (0, 1)."""
    config = tiny_config(block_size=BLOCK, vocab=61)
    model = random_model(config, seed)
    model.lm_head.weight.set_value(model.lm_head.weight.get_value() * 25.0)
    return config, model


def random_prompts(rng: np.random.Generator, lengths=(5, 8, 13, 2)) -> list[list[int]]:
    return [rng.integers(10, 55, n).tolist() for n in lengths]


def sampling(config, **kw) -> SamplingConfig:
    defaults = dict(block_size=BLOCK, mask_token_id=config.mask_token_id, max_new_tokens=12,
                    temperature=0.0, stop_ids=(STOP,), threshold=0.5)
    return SamplingConfig(**{**defaults, **kw})


@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential"])
def test_greedy_equals_the_naive_decoder(seed, strategy):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed))
    steps = 2 if strategy != "low_confidence_dynamic" else None
    threshold = 0.25  # low enough that dynamic steps commit several tokens with these models
    ours = decode_prompts(model, prompts, sampling(config, strategy=strategy, steps=steps,
                                                   threshold=threshold))
    naive = naive_generate(model, prompts, block_size=BLOCK, mask_token_id=config.mask_token_id,
                           pad_token_id=0, max_new_tokens=12, stop_ids=[STOP], strategy=strategy,
                           steps=steps, threshold=threshold)
    for got, want in zip(ours, naive):
        assert got["token_ids"] == want["token_ids"]
        assert got["step_map"] == want["step_map"]
    if strategy != "sequential":  # the cases decode more than one token in some step
        assert any(r["tokens_per_step"] > 1 for r in ours)


def test_greedy_decoding_is_batch_invariant(seed):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(3, 17, 9))
    cfg = sampling(config, strategy="low_confidence_dynamic")
    batched = decode_prompts(model, prompts, cfg)
    for prompt, in_batch in zip(prompts, batched):
        alone = decode_prompts(model, [prompt], cfg)[0]
        assert alone["token_ids"] == in_batch["token_ids"]
        assert alone["step_map"] == in_batch["step_map"]


def training_logprobs(model, prompt: list[int], result: dict, temperature: float,
                      mask_token_id: int) -> np.ndarray:
    """Log-probs of the committed tokens recomputed by one training forward on the multi-round
    canvas rebuilt from the step map (one noisy round per step; DIRL_SPEC §4.2)."""
    tokens = np.array(prompt + result["token_ids"])
    step = np.array([0] * len(prompt) + result["step_map"])
    response = np.arange(len(tokens)) >= len(prompt)
    block = np.arange(len(tokens)) // BLOCK
    distinct = sorted(set(result["step_map"]))
    rounds = []
    for s in distinct:
        block_of_s = block[(step == s) & response][0]
        masked = response & (block == block_of_s) & (step >= s)
        rounds.append(np.where(masked, mask_token_id, tokens))
    canvas = canvas_lib.stream_major_canvas(tokens[None], np.stack(rounds)[:, None],
                                            np.arange(len(tokens))[None],
                                            np.zeros((1, len(tokens)), np.int32), BLOCK)
    logits = np.asarray(model(canvas=canvas, attn_impl="reference"), np.float64)[0]
    logits = logits / (temperature or 1.0)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    out = np.zeros(len(tokens))
    for r, s in enumerate(distinct):
        for j in np.flatnonzero((step == s) & response):
            out[j] = logp[r * len(tokens) + j, tokens[j]]
    return out[len(prompt):]


@pytest.mark.parametrize("strategy,temperature,top_k,top_p", [
    ("low_confidence_static", 0.0, 0, 1.0),
    ("low_confidence_dynamic", 0.0, 0, 1.0),
    ("low_confidence_static", 1.0, 0, 1.0),
    ("low_confidence_dynamic", 0.7, 0, 1.0),
    ("low_confidence_dynamic", 1.0, 5, 0.9),
    ("low_confidence_static", 0.7, 8, 0.8),
])
def test_sampler_logprobs_equal_the_training_forward(seed, strategy, temperature, top_k, top_p):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(6, 9))
    cfg = sampling(config, strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                   steps=2 if strategy == "low_confidence_static" else None)
    for prompt, result in zip(prompts, decode_prompts(model, prompts, cfg, seed=seed)):
        expected = training_logprobs(model, prompt, result, temperature, config.mask_token_id)
        np.testing.assert_allclose(result["logprobs"], expected, atol=1e-5, rtol=0)
        assert min(result["step_map"]) == 1 and all(s > 0 for s in result["step_map"])


def test_seeded_sampling_is_reproducible(seed):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed))
    cfg = sampling(config, temperature=1.0, strategy="low_confidence_dynamic")
    first = decode_prompts(model, prompts, cfg, seed=seed)
    assert decode_prompts(model, prompts, cfg, seed=seed) == first
    assert decode_prompts(model, prompts, cfg, seed=seed + 1) != first


def test_a_sampled_row_depends_on_its_seed_not_its_batch(seed):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(5, 8, 13))
    cfg = sampling(config, temperature=1.0, strategy="low_confidence_dynamic")
    whole = decode_prompts(model, prompts, cfg, seed=seed, row_seeds=[7, 8, 9])

    def assert_same_rows(got: list[dict], want: list[dict]) -> None:
        """Tokens and step maps exactly; log-probs to fp32 reduction order (other rows change
        when slots compact and which positions share the vocabulary head's matmul)."""
        for g, w in zip(got, want, strict=True):
            assert g["token_ids"] == w["token_ids"] and g["step_map"] == w["step_map"]
            np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=1e-5)

    part = decode_prompts(model, [prompts[2], prompts[0]], cfg, seed=seed, row_seeds=[9, 7])
    assert_same_rows(part, [whole[2], whole[0]])
    other = decode_prompts(model, prompts, cfg, seed=seed, row_seeds=[7, 8, 10])
    assert_same_rows(other[:2], whole[:2])
    with pytest.raises(ValueError, match="row_seeds"):
        decode_prompts(model, prompts, cfg, seed=seed, row_seeds=[1, 2])


def test_min_new_tokens_and_banned_tokens(seed):
    import collections
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(5, 8, 13, 2, 7, 11))
    free = decode_prompts(model, prompts, sampling(config, temperature=1.0, max_new_tokens=12,
                                                   stop_ids=()), seed=seed)
    # the tokens the free run likes most early on become stops, the next ones banned
    early = collections.Counter(t for r in free for t in r["token_ids"][:6]).most_common()
    stops, banned = tuple(t for t, _ in early[:2]), tuple(t for t, _ in early[2:4])
    cfg = sampling(config, temperature=1.0, max_new_tokens=12, stop_ids=stops, min_new_tokens=6,
                   banned_ids=banned)
    stops_in_block_after_the_minimum = 0
    for prompt, result in zip(prompts, decode_prompts(model, prompts, cfg, seed=seed)):
        assert not set(result["token_ids"]) & set(banned)
        # LMDeploy's per-block rule: stops are barred from every position of a block begun
        # before 6 tokens were generated, i.e. up to the first block start >= prompt + 6
        free_from = -(-(len(prompt) + 6) // BLOCK) * BLOCK - len(prompt)
        assert not set(result["token_ids"][:free_from]) & set(stops) and result["length"] > free_from
        stops_in_block_after_the_minimum += bool(set(result["token_ids"][free_from:]) & set(stops))
    assert stops_in_block_after_the_minimum  # the stops are liked: the rule is what holds them back
    with pytest.raises(ValueError, match="min_new_tokens"):
        sampling(config, max_new_tokens=4, min_new_tokens=8)


@pytest.mark.parametrize("commit", ["separate", "fused"])
def test_stop_tokens_and_length_limit(seed, commit):
    config, model = peaky_model(seed)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(5, 8, 13, 2, 7, 11))
    cfg = sampling(config, temperature=1.0, max_new_tokens=9, stop_ids=(STOP, 11, 12, 13, 14, 15))
    for prompt, result in zip(prompts, decode_prompts(model, prompts, cfg, seed=seed,
                                                      commit=commit)):
        tokens = result["token_ids"]
        assert (len(prompt) + len(tokens)) % BLOCK == 0  # whole blocks, aligned at position 0
        stops = [i for i, t in enumerate(tokens) if t in cfg.stop_ids]
        if result["finish_reason"] == "stop":
            assert stops and result["length"] == stops[0] + 1
            assert stops[0] >= max(0, len(tokens) - BLOCK)  # no stop token before the final block
        else:
            assert result["finish_reason"] == "length" and not stops
            assert cfg.max_new_tokens <= len(tokens) < cfg.max_new_tokens + BLOCK
            assert result["length"] == len(tokens)
        # one prefill, then every block costs its denoising forwards plus, when separate, a
        # commit forward (not the last); fused commits ride on the next block's first forward
        blocks = len({(len(prompt) + i) // BLOCK for i in range(len(tokens))})
        commits = blocks - 1 if commit == "separate" else 0
        assert result["num_forwards"] == 1 + result["num_steps"] + commits


def lmdeploy_proposal(logits: np.ndarray, top_k: int, top_p: float) -> list[np.ndarray]:
    """The token ids LMDeploy's sampler may draw: its own top-k / top-p filters on the copy it
    sorts (``pytorch/engine/logits_process.py``)."""
    import sys
    import types
    import torch
    # the module's one GPU-side import (xgrammar, left out of a CPU install) is not needed here
    guided = types.ModuleType("lmdeploy.pytorch.engine.guided_process")
    guided.GuidedDecodingManager = object
    sys.modules.setdefault("lmdeploy.pytorch.engine.guided_process", guided)
    from lmdeploy.pytorch.engine.logits_process import _filter_topk_sorted_, _filter_topp_sorted_
    scores, ids = torch.tensor(logits).sort(1, descending=True)
    rows = scores.shape[0]
    if top_k:
        scores = _filter_topk_sorted_(scores, torch.full((rows,), top_k))
    if top_p < 1:
        scores = _filter_topp_sorted_(scores, torch.full((rows,), top_p))
    return [np.sort(ids[r][torch.isfinite(scores[r])].numpy()) for r in range(rows)]


def our_proposal(logits: np.ndarray, top_k: int, top_p: float) -> list[np.ndarray]:
    from dirl_jax.rollout.sampler import proposal_set
    scores, ids = (np.asarray(x) for x in proposal_set(jax.numpy.asarray(logits), top_k, top_p))
    return [np.sort(ids[r][np.isfinite(scores[r])]) for r in range(len(logits))]


@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (50, 0.8), (3, 0.95)])
def test_the_proposal_set_is_lmdeploys(seed, top_k, top_p):
    """Exactly LMDeploy's kept tokens on random logits; on bf16-rounded logits (ties at the k-th
    score) exactly k tokens, as LMDeploy's rank cut, never every tied one."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((6, 2000)) * 3).astype(np.float32)
    for ours, theirs in zip(our_proposal(logits, top_k, top_p), lmdeploy_proposal(logits, top_k, top_p)):
        np.testing.assert_array_equal(ours, theirs)
    tied = np.asarray(jax.numpy.asarray(logits, jax.numpy.bfloat16).astype(np.float32))
    ours, theirs = our_proposal(tied, top_k, top_p), lmdeploy_proposal(tied, top_k, top_p)
    assert [len(o) for o in ours] == [len(t) for t in theirs]
    for o, t, row in zip(ours, theirs, tied):
        np.testing.assert_array_equal(np.sort(row[o]), np.sort(row[t]))  # same scores kept
    if top_k:
        assert all(len(o) <= top_k for o in ours)


def test_top_p_keeps_a_token_whose_mass_before_it_equals_top_p_exactly():
    logits = np.array([[0.0, 0.0, -30.0, -30.0]], np.float32)  # probabilities 0.5, 0.5, ~0, ~0
    assert [len(x) for x in lmdeploy_proposal(logits, 0, 0.5)] == [2]
    assert [len(x) for x in our_proposal(logits, 0, 0.5)] == [2]


def test_proposals_are_drawn_from_the_set_by_its_token_ids(seed):
    """Sampling happens on the sorted copy: every candidate is one of the set's token ids, and
    each of them is drawn (the rank is mapped back to the vocabulary)."""
    import jax.numpy as jnp
    from dirl_jax.rollout.sampler import propose
    logits = jnp.full((512, 40), -5.0).at[:, jnp.array([31, 3, 17])].set(jnp.array([2.0, 1.9, 1.8]))
    cfg = SamplingConfig(block_size=BLOCK, mask_token_id=1, temperature=1.0, top_k=3)
    candidates, logp = propose(logits, jax.random.split(jax.random.key(seed), 512), cfg)
    assert set(np.asarray(candidates).tolist()) == {31, 3, 17}
    np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(logits))[
        np.arange(512), np.asarray(candidates)], rtol=1e-6)  # under the full distribution


def test_bad_sampling_settings_name_the_field():
    with pytest.raises(ValueError, match="strategy: unknown 'fast'"):
        SamplingConfig(block_size=4, mask_token_id=1, strategy="fast")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(block_size=4, mask_token_id=1, top_p=0.0)
    config, model = peaky_model(0)
    with pytest.raises(ValueError, match="at least one token"):
        decode_prompts(model, [[1, 2], []], sampling(config))


def test_public_generate_and_streaming_cli(tmp_path, seed):
    """``dirl_jax.generate`` with the checkpoint's defaults, and the CLI streaming a saved model."""
    import dataclasses
    import subprocess
    import sys

    import dirl_jax
    from conftest import REPO
    from dirl_jax.data import toy

    tokenizer = toy.toy_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    config = dataclasses.replace(tiny_config(block_size=BLOCK, vocab=len(tokenizer)),
                                 mask_token_id=tokenizer.convert_tokens_to_ids(toy.MASK),
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.convert_tokens_to_ids(toy.IM_END))
    model = random_model(config, seed)
    dirl_jax.save_model(model, config, tmp_path / "model", tokenizer_dir=tmp_path / "tok",
                        dtype="float32")
    prompt = tokenizer.encode("1+2=")
    [result] = dirl_jax.generate(model, [prompt], temperature=0.0, max_new_tokens=8)
    [expected] = decode_prompts(model, [prompt], SamplingConfig(
        block_size=BLOCK, mask_token_id=config.mask_token_id, max_new_tokens=8, temperature=0.0),
        pad_token_id=config.pad_token_id)
    assert result == expected

    cli = subprocess.run([sys.executable, "-m", "dirl_jax.generate", "--model", str(tmp_path / "model"),
                          "--prompt", "1+2=", "--template", "raw", "--max-new-tokens", "8",
                          "--strategy", "low_confidence_static"],
                         capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    streamed, summary = cli.stdout.rsplit("\n", 2)[0], cli.stdout.strip().splitlines()[-1]
    [again] = dirl_jax.generate(model, [tokenizer.encode("1+2=")], temperature=0.0, max_new_tokens=8,
                                strategy="low_confidence_static",
                                stop_ids=[config.eos_token_id, tokenizer.pad_token_id])
    assert streamed == tokenizer.decode(again["token_ids"], skip_special_tokens=True)
    assert summary.startswith(f"[{len(again['token_ids'])} tokens, {again['num_steps']} steps")


@pytest.mark.parametrize("shape", [(4, 1, 1), (8, 1, 1), (2, 1, 4)])
def test_decoding_over_a_mesh_equals_one_device(seed, shape):
    """Slots over the data axis, parameters and KV heads over the tensor axis: the same tokens
    and step maps as one device (log-probs to fp32 reduction order)."""
    from dirl_jax.mesh import make_mesh
    config = tiny_config(block_size=BLOCK, vocab=64, kv_heads=4)
    model = random_model(config, seed)
    model.lm_head.weight.set_value(model.lm_head.weight.get_value() * 25.0)
    prompts = random_prompts(np.random.default_rng(seed), lengths=(5, 8, 13, 2, 9, 3))
    cfg = sampling(config, strategy="low_confidence_dynamic", temperature=1.0)
    mesh = make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    sharded = decode_prompts(model, prompts, cfg, seed=seed, mesh=mesh, slots=4)
    assert len(sharded) == len(prompts)
    for got, want in zip(sharded, decode_prompts(model, prompts, cfg, seed=seed)):
        assert got["token_ids"] == want["token_ids"] and got["step_map"] == want["step_map"]
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


def test_tensor_parallel_decoding_shards_weights_and_cache(seed):
    """No replica: q_proj rows, the vocabulary head and the KV cache's heads are split over
    ``tensor``, the slots over ``data``."""
    from dirl_jax.mesh import make_mesh
    from dirl_jax.rollout import decoder
    config = tiny_config(block_size=BLOCK, vocab=64, kv_heads=4)
    model = random_model(config, seed)
    mesh = make_mesh((2, 1, 4), jax.devices())
    state = decoder.empty_slots(model, 4, 32, sampling(config))
    params, state = decoder._place(mesh, nnx.state(model), state)
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    assert spec(params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...])[0] == "tensor"
    assert spec(params["lm_head"]["weight"][...])[0] == "tensor"
    assert spec(state.cache[0].keys)[:3] == (("data", "fsdp"), None, "tensor")
    assert spec(state.tokens)[0] == ("data", "fsdp")


def test_in_process_engine_samples_from_the_updated_weights(seed):
    import jax
    from flax import nnx

    from dirl_jax.rollout.engine import InProcessEngine
    config, model = peaky_model(seed)
    other_config, other = peaky_model(seed + 1)
    engine = InProcessEngine(model)
    prompts = random_prompts(np.random.default_rng(seed))
    cfg = sampling(config, strategy="low_confidence_dynamic")
    before = engine.generate(prompts, cfg, seed=0)
    assert before == decode_prompts(model, prompts, cfg)
    engine.update_weights(nnx.state(other, nnx.Param))
    after = engine.generate(prompts, cfg, seed=0)
    assert after == decode_prompts(other, prompts, cfg)
    assert after != before
    leaves = jax.tree.leaves(nnx.state(engine.model, nnx.Param))
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(nnx.state(other, nnx.Param))))


@nnx.jit
def dense_forward(model, tokens, positions, mask):
    return model(tokens, positions, mask, attn_impl="reference")


def reference_decode(model, prompts: list[list[int]], *, temperature: float,
                     confidence_temperature: float, strategy: str, threshold: float,
                     max_new_tokens: int, mask_token_id: int) -> list[dict]:
    """DIRL_SPEC §2.3 with top-k 1 proposals (the argmax token at every masked position), one dense
    block-causal forward of the whole sequence per step (mask built here). A proposal's confidence
    is ``softmax(logits / confidence_temperature)[token]`` (float64); static commits the most
    confident masked position of the block, dynamic also every one at or above ``threshold``; a
    committed token records ``log softmax(logits / temperature)[token]``."""
    lengths = np.array([len(p) for p in prompts])
    total = (lengths.max() // BLOCK + -(-max_new_tokens // BLOCK) + 1) * BLOCK
    tokens = np.full((len(prompts), total), mask_token_id, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
    pos = np.broadcast_to(np.arange(total), tokens.shape)
    mask = pos[:, None, :] // BLOCK <= pos[:, :, None] // BLOCK  # block-causal, one segment

    def log_softmax(x):
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    step_map, logprobs = np.zeros_like(tokens), np.zeros(tokens.shape)
    start, steps = lengths // BLOCK * BLOCK, np.zeros(len(prompts), int)
    done = np.zeros(len(prompts), bool)
    while not done.all():
        logits = np.asarray(dense_forward(model, tokens, pos, mask), np.float64)
        for i in np.flatnonzero(~done):
            span = np.arange(start[i], start[i] + BLOCK)
            free = (span >= lengths[i]) & (step_map[i, span] == 0)
            block_logits = logits[i, span]
            proposal = block_logits.argmax(-1)
            conf = np.exp(log_softmax(block_logits / confidence_temperature)[np.arange(BLOCK), proposal])
            pick = np.arange(BLOCK) == np.argmax(np.where(free, conf, -np.inf))
            if strategy == "low_confidence_dynamic":
                pick |= free & (conf >= threshold)
            steps[i] += 1
            tokens[i, span[pick]] = proposal[pick]
            step_map[i, span[pick]] = steps[i]
            logprobs[i, span[pick]] = log_softmax(block_logits / temperature)[pick, proposal[pick]]
            if not (free & ~pick).any():  # block complete: stop at the length limit, else next block
                done[i] = start[i] + BLOCK - lengths[i] >= max_new_tokens
                start[i] += 0 if done[i] else BLOCK
    return [{"token_ids": tokens[i, n:start[i] + BLOCK].tolist(),
             "step_map": step_map[i, n:start[i] + BLOCK].tolist(),
             "logprobs": logprobs[i, n:start[i] + BLOCK]} for i, n in enumerate(lengths)]


def test_confidence_is_the_temperature_scaled_probability(seed):
    """DIRL_SPEC §2.3 step 2: the confidence of a proposal is softmax(logits / T)[token], at T = 0.7
    here. Through the public ``dirl_jax.generate`` with top-k 1, so that every proposal is the
    argmax token and only the confidences decide which positions each step commits: tokens,
    step maps and log-probs equal a test-local decoder's (the confidences computed here)."""
    import dirl_jax
    strategy, temperature, threshold, max_new = "low_confidence_static", 0.7, 0.5, 12
    for attempt in range(5):  # a model on which untempered confidences would commit otherwise
        config, model = peaky_model(seed + 1000 * attempt)
        prompts = random_prompts(np.random.default_rng(seed + attempt), lengths=(5, 8, 13, 2, 7, 10))
        kw = dict(temperature=temperature, strategy=strategy, threshold=threshold,
                  max_new_tokens=max_new, mask_token_id=config.mask_token_id)
        want = reference_decode(model, prompts, confidence_temperature=temperature, **kw)
        untempered = reference_decode(model, prompts, confidence_temperature=1.0, **kw)
        if [w["step_map"] for w in want] != [u["step_map"] for u in untempered]:
            break
    else:
        pytest.fail("no model among 5 where the temperature changes the unmasking order")
    got = dirl_jax.generate(model, prompts, strategy=strategy, threshold=threshold,
                            temperature=temperature, top_k=1, max_new_tokens=max_new, seed=seed)
    for prompt, g, w in zip(prompts, got, want):
        assert g["token_ids"] == w["token_ids"], prompt
        assert g["step_map"] == w["step_map"], prompt
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=1e-5, rtol=0)

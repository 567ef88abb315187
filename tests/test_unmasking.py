"""The unmasking rules against LMDeploy's own decisions and their edge cases."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirl_jax.rollout.unmasking import STRATEGIES, select_positions, tokens_per_step

MASKED, DECIDED, CACHED = 0, 1, 2
N_ORACLE = 180


@pytest.fixture(scope="module")
def oracle(shared_dir) -> list[dict]:
    return json.loads((shared_dir / "data" / "lmdeploy_unmasking_cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def oracle_confidences(oracle) -> dict[str, list[np.ndarray]]:
    """softmax(logits)[sampled] per position of every case, in float64 NumPy and in float32 JAX."""
    logits = np.concatenate([np.array(c["logits"], np.float64) for c in oracle])
    sampled = np.concatenate([c["sampled_token_ids"] for c in oracle])
    shifted = logits - logits.max(-1, keepdims=True)
    probs = {"float64": np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True),
             "float32": np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))}
    splits = np.cumsum([len(c["sampled_token_ids"]) for c in oracle])[:-1]
    return {name: np.split(p[np.arange(len(sampled)), sampled], splits) for name, p in probs.items()}


_select = jax.jit(select_positions, static_argnames=("strategy", "block_size", "steps"))


def lmdeploy_step(case: dict, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LMDeploy's ``UnmaskingProcessor.__call__`` bookkeeping around ``select_positions``."""
    block = case["block_size"]
    state = np.array(case["state_in"]).reshape(-1, block)
    state[(state == DECIDED).all(-1)] = CACHED       # fully decided blocks are cached first
    masked = state == MASKED
    token_ids = np.where(masked.ravel(), case["sampled_token_ids"], case["input_ids"])
    chosen = _select(confidence.reshape(-1, block), masked, strategy=case["strategy"],
                     block_size=block, steps=case["denoising_steps"], threshold=case["threshold"])
    return np.where(np.asarray(chosen), DECIDED, state).ravel(), token_ids


@pytest.mark.parametrize("index", range(N_ORACLE), ids=lambda i: f"case{i:03d}")
def test_reproduces_lmdeploy(oracle, oracle_confidences, index):
    case = oracle[index]
    for precision, confidence in oracle_confidences.items():
        state, token_ids = lmdeploy_step(case, confidence[index])
        where = (f"case {index} ({case['strategy']}, block {case['block_size']}, steps "
                 f"{case['denoising_steps']}, threshold {case['threshold']}), {precision} confidences")
        np.testing.assert_array_equal(state, case["state_out"], err_msg=f"state_out of {where}")
        np.testing.assert_array_equal(token_ids, case["token_ids_out"],
                                      err_msg=f"token_ids_out of {where}")


def test_oracle_size(oracle):
    assert len(oracle) == N_ORACLE
    assert {c["strategy"] for c in oracle} == set(STRATEGIES)


def select(confidence, masked, strategy, *, block_size=None, steps=1, threshold=0.9) -> list[bool]:
    confidence = np.asarray(confidence, np.float32)
    block_size = confidence.shape[-1] if block_size is None else block_size
    return np.asarray(select_positions(confidence, np.asarray(masked, bool), strategy=strategy,
                                       block_size=block_size, steps=steps,
                                       threshold=threshold)).tolist()


T, F = True, False


@pytest.mark.parametrize("block_size, steps, k", [(4, 4, 1), (4, 2, 2), (4, 1, 4), (4, 3, 1),
                                                  (8, 3, 2), (4, 5, 1), (2, 64, 1), (1, 1, 1)])
def test_tokens_per_step(block_size, steps, k):
    assert tokens_per_step(block_size, steps) == k


def test_static_commits_top_k_masked():
    conf = [0.9, 0.6, 0.95, 0.3]
    assert select(conf, [T] * 4, "low_confidence_static", steps=4) == [F, F, T, F]
    assert select(conf, [T] * 4, "low_confidence_static", steps=2) == [T, F, T, F]
    # decided positions never compete, whatever their confidence
    assert select(conf, [F, T, F, T], "low_confidence_static", steps=4) == [F, T, F, F]


def test_static_steps_not_dividing_block():
    # block 4, steps 3 -> k = 1; steps > block -> k = 1
    conf = [0.2, 0.7, 0.6, 0.1]
    assert select(conf, [T] * 4, "low_confidence_static", steps=3) == [F, T, F, F]
    assert select(conf, [T] * 4, "low_confidence_static", steps=7) == [F, T, F, F]
    # block 8, steps 3 -> k = 2
    conf8 = [0.1, 0.5, 0.2, 0.8, 0.3, 0.9, 0.4, 0.6]
    assert select(conf8, [T] * 8, "low_confidence_static", steps=3) == [F, F, F, T, F, T, F, F]


def test_static_fewer_masked_than_k():
    # k = 4 but only two positions masked: both, and nothing else
    conf = [0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9]
    masked = [F, T, F, F, T, F, F, F]
    assert select(conf, masked, "low_confidence_static", steps=2) == masked


def test_ties_lowest_index_first():
    equal = [0.5] * 4
    assert select(equal, [T] * 4, "low_confidence_static", steps=4) == [T, F, F, F]
    assert select(equal, [T] * 4, "low_confidence_static", steps=2) == [T, T, F, F]
    assert select(equal, [F, T, T, T], "low_confidence_static", steps=2) == [F, T, T, F]
    assert select([0.3, 0.8, 0.5, 0.8], [T] * 4, "low_confidence_static", steps=4) == [F, T, F, F]
    assert select(equal, [T] * 4, "low_confidence_dynamic", threshold=0.9) == [T, F, F, F]
    assert select([0.3, 0.6, 0.2, 0.6], [T, F, T, T], "low_confidence_dynamic",
                  threshold=0.9) == [F, F, F, T]


def test_dynamic_threshold_inclusive():
    assert select([0.7, 0.5, 0.3, 0.5], [T] * 4, "low_confidence_dynamic",
                  threshold=0.5) == [T, T, F, T]
    below = np.nextafter(np.float32(0.5), np.float32(0))
    assert select([0.7, below, 0.3, 0.5], [T] * 4, "low_confidence_dynamic",
                  threshold=0.5) == [T, F, F, T]
    # a non-representable threshold is compared in the confidence dtype, as torch does
    assert select([0.95, np.float32(0.9), 0.3, 0.1], [T] * 4, "low_confidence_dynamic",
                  threshold=0.9) == [T, T, F, F]
    # ... also when the threshold is a traced float32 and the confidences are bfloat16
    conf = jnp.asarray([0.95, 0.9, 0.3, 0.1], jnp.bfloat16)          # 0.9 -> 0.8984375
    chosen = jax.jit(functools.partial(select_positions, strategy="low_confidence_dynamic",
                                       block_size=4, steps=4))(conf, np.ones(4, bool),
                                                               threshold=jnp.float32(0.9))
    assert np.asarray(chosen).tolist() == [T, T, F, F]


def test_dynamic_nothing_reaches_threshold_commits_argmax():
    conf = [0.2, 0.4, 0.3, 0.1]
    assert select(conf, [T] * 4, "low_confidence_dynamic", threshold=0.9) == [F, T, F, F]
    assert select(conf, [T, F, T, T], "low_confidence_dynamic", threshold=0.9) == [F, F, T, F]
    # a decided position above the threshold is not committed, but the best masked one is
    assert select([0.99, 0.4, 0.3, 0.1], [F, T, T, T], "low_confidence_dynamic",
                  threshold=0.9) == [F, T, F, F]


def test_dynamic_ignores_steps():
    conf = [0.95, 0.91, 0.3, 0.92]
    for steps in (1, 2, 4, 9):
        assert select(conf, [T] * 4, "low_confidence_dynamic", steps=steps) == [T, T, F, T]


def test_sequential_window():
    conf = [0.1, 0.9, 0.8, 0.7]       # ignored
    assert select(conf, [T] * 4, "sequential", steps=2) == [T, T, F, F]
    assert select(conf, [F, T, T, T], "sequential", steps=2) == [F, T, T, F]
    assert select(conf, [F, T, T, T], "sequential", steps=4) == [F, T, F, F]
    # decided positions inside the window are skipped, not replaced by later masked ones
    assert select(conf, [T, F, T, T], "sequential", steps=2) == [T, F, F, F]
    assert select(conf, [T, F, T, T], "sequential", steps=1) == [T, F, T, T]
    assert select([0.1] * 8, [F, T, F, F, T, T, T, T], "sequential", steps=2) == [F, T, F, F, T, F,
                                                                                   F, F]


def test_sequential_wraps_around_block_end():
    # LMDeploy's window wraps, but everything before the first masked position is decided, so
    # the wrapped part never commits: k = 3 from position 2 covers {2, 3, 0} -> only {2, 3}
    assert select([0.5] * 4, [F, F, T, T], "sequential", steps=1, block_size=4) == [F, F, T, T]
    conf8 = [0.5] * 8
    masked8 = [F, F, F, F, F, F, T, T]
    assert select(conf8, masked8, "sequential", steps=2) == masked8          # k = 4: {6, 7, 0, 1}
    masked8 = [F, F, F, F, F, T, F, T]
    assert select(conf8, masked8, "sequential", steps=4) == [F, F, F, F, F, T, F, F]  # k = 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fully_decided_block_commits_nothing(strategy):
    assert select([0.99, 0.98, 0.97, 0.96], [F] * 4, strategy, steps=1, threshold=0.5) == [F] * 4


def reference(conf: np.ndarray, masked: np.ndarray, strategy: str, k: int, threshold: float):
    """One block, by a different route: stable sort for the confidence rules, a loop for sequential."""
    chosen = np.zeros_like(masked)
    if not masked.any():
        return chosen
    if strategy == "sequential":
        first = int(np.flatnonzero(masked)[0])
        for offset in range(k):
            chosen[(first + offset) % len(masked)] = True
        return chosen & masked
    order = [int(i) for i in np.argsort(-conf, kind="stable") if masked[i]]
    if strategy == "low_confidence_static":
        chosen[order[:k]] = True
        return chosen
    chosen[order[0]] = True
    return chosen | (masked & (conf >= np.float32(threshold)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_jit_vmap_match_per_row_and_reference(strategy, seed):
    rng = np.random.default_rng(seed)
    block_size, steps, threshold = 8, 3, 0.6
    k = tokens_per_step(block_size, steps)
    # one decimal: plenty of exact ties; masked density varies, including empty rows
    conf = np.round(rng.random((3, 5, block_size)), 1).astype(np.float32)
    masked = rng.random((3, 5, block_size)) < rng.random((3, 5, 1))
    masked[0, 0] = False
    kw = dict(strategy=strategy, block_size=block_size, steps=steps)
    batched = np.asarray(select_positions(conf, masked, threshold=threshold, **kw))
    jitted = jax.jit(functools.partial(select_positions, **kw))(conf, masked,
                                                                threshold=jnp.float32(threshold))
    vmapped = jax.vmap(lambda c, m: select_positions(c, m, threshold=threshold, **kw))(
        conf.reshape(-1, block_size), masked.reshape(-1, block_size))
    np.testing.assert_array_equal(np.asarray(jitted), batched)
    np.testing.assert_array_equal(np.asarray(vmapped).reshape(batched.shape), batched)
    for idx in np.ndindex(conf.shape[:-1]):
        row = np.asarray(select_positions(conf[idx], masked[idx], threshold=threshold, **kw))
        np.testing.assert_array_equal(row, batched[idx], err_msg=f"row {idx}")
        np.testing.assert_array_equal(row, reference(conf[idx], masked[idx], strategy, k, threshold),
                                      err_msg=f"row {idx}")
    assert not (batched & ~masked).any()
    assert (batched.any(-1) == masked.any(-1)).all()


def test_bad_arguments():
    conf, masked = np.full(4, 0.5, np.float32), np.ones(4, bool)
    with pytest.raises(ValueError, match="low_confidence_static, low_confidence_dynamic, sequential"):
        select_positions(conf, masked, strategy="random", block_size=4, steps=4, threshold=0.9)
    with pytest.raises(ValueError, match="steps"):
        select_positions(conf, masked, strategy="low_confidence_static", block_size=4, steps=0,
                         threshold=0.9)
    with pytest.raises(ValueError, match="block_size"):
        tokens_per_step(0, 4)
    with pytest.raises(ValueError, match="block_size=8"):
        select_positions(conf, masked, strategy="sequential", block_size=8, steps=4, threshold=0.9)
    with pytest.raises(ValueError, match="share a shape"):
        select_positions(conf, masked[:3], strategy="sequential", block_size=4, steps=4,
                         threshold=0.9)

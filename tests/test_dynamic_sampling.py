"""DAPO dynamic sampling through ``dirl_jax.trainers.dipo.collect_groups`` itself, with a scripted engine and
grader: groups are kept iff their rewards (truncation zeroed) differ, refill rounds, the round
bound and its warning, the seeded truncation, and identical decisions on every host."""

from __future__ import annotations

import logging
import threading

import jax
import numpy as np
import pytest

from dirl_jax.trainers import dipo as dipo_train
from dirl_jax.config import dipo_defaults
from dirl_jax.data import rl as rl_data
from dirl_jax.data import toy
from dirl_jax.data.tokenizer import stop_token_ids
from dirl_jax.rewards import extract_last_boxed
from dirl_jax.rollout.sampler import SamplingConfig

GROUP = 4
# What the 4 members of a group answer, by the prompt's kind: (graded correct, truncated).
KINDS = {
    "mixed": [(True, False), (False, False), (True, False), (False, False)],
    "all_right": [(True, False)] * 4,
    "all_wrong": [(False, False)] * 4,
    # all graded correct, two truncated: rewards [1, 1, 0, 0] -> informative (advantages +-1)
    "right_but_two_truncated": [(True, False), (True, False), (True, True), (True, True)],
    # the two correct ones truncated: rewards all 0 -> no signal although correctness is mixed
    "right_only_when_truncated": [(True, True), (True, True), (False, False), (False, False)],
}


class ScriptedEngine:
    """Answers prompt ``i`` with the responses of ``kinds[i]``; member = row seed mod group size
    (the loop samples each prompt ``group_size`` times in consecutive rows)."""

    def __init__(self, tokenizer, prompts: list[list[int]], kinds: list[str]):
        self.tokenizer, self.kinds = tokenizer, kinds
        self.index = {tuple(p): i for i, p in enumerate(prompts)}
        self.calls = 0

    def generate(self, prompts, sampling, *, seed, row_seeds):
        self.calls += 1
        stop = self.tokenizer.convert_tokens_to_ids(toy.IM_END)
        results = []
        for prompt, row in zip(prompts, row_seeds):
            i = self.index[tuple(prompt)]
            right, truncated = KINDS[self.kinds[i]][row % GROUP]
            ids = self.tokenizer.encode(f"\\boxed{{{i if right else -1}}}", add_special_tokens=False)
            ids = ids if truncated else ids + [stop]
            results.append({"token_ids": ids, "step_map": list(range(1, len(ids) + 1)),
                            "logprobs": [0.0] * len(ids), "length": len(ids), "tokens_per_step": 1.0,
                            "finish_reason": "length" if truncated else "stop"})
        return results


def setup(kinds: list[str], *, prompts_per_step: int, oversample: int, rounds: int, seed: int = 0):
    tokenizer = toy.toy_tokenizer()
    prompts = [tokenizer.encode(f"question {i}", add_special_tokens=False) for i in range(len(kinds))]
    answers = [str(i) for i in range(len(kinds))]
    config = dipo_defaults()
    config.seed = seed
    config.rollout.update(prompts_per_step=prompts_per_step, group_size=GROUP, oversample=oversample,
                          max_new_tokens=8)
    config.train.update(dynamic_sampling=True, max_sampling_rounds=rounds)
    sampling = SamplingConfig(block_size=4, mask_token_id=tokenizer.mask_token_id,
                              max_new_tokens=8, stop_ids=stop_token_ids(tokenizer))
    stream = iter(rl_data.prompt_batches(len(prompts), prompts_per_step=prompts_per_step, seed=seed))
    engine = ScriptedEngine(tokenizer, prompts, kinds)
    return engine, stream, prompts, answers, tokenizer, sampling, config


@pytest.fixture(autouse=True)
def scripted_grader(monkeypatch):
    monkeypatch.setattr(dipo_train, "grade_all",
                        lambda pairs, **_: [extract_last_boxed(text) == gold for text, gold in pairs])


def kept_kinds(groups, prompts, kinds) -> list[str]:
    index = {tuple(p): i for i, p in enumerate(prompts)}
    return [kinds[index[tuple(g["prompt"])]] for g in groups]


def test_groups_are_kept_by_their_truncation_zeroed_rewards():
    kinds = ["right_but_two_truncated", "right_only_when_truncated", "mixed", "all_right"]
    engine, stream, prompts, answers, tok, sampling, config = setup(
        kinds, prompts_per_step=4, oversample=1, rounds=1)
    groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                              config, step=0)
    assert sorted(kept_kinds(groups, prompts, kinds)) == ["mixed", "right_but_two_truncated"]
    by_kind = dict(zip(kept_kinds(groups, prompts, kinds), groups))
    np.testing.assert_array_equal(by_kind["right_but_two_truncated"]["rewards"], [1, 1, 0, 0])
    np.testing.assert_allclose(by_kind["right_but_two_truncated"]["advantages"], [1, 1, -1, -1],
                               atol=1e-5)
    # accuracy with truncation zeroed: (2 + 0 + 2 + 4) / 16
    assert stats["rollout_accuracy"] == pytest.approx(8 / 16)
    assert stats["groups_kept"] == 2 and stats["groups_sampled"] == 4 and stats["sampling_rounds"] == 1


def test_refills_until_enough_groups():
    # 2 prompts per step, one round draws 2 prompts (oversample 1): of 8 prompts only 3 carry a
    # signal, so it takes rounds until two are kept
    kinds = ["all_right", "all_wrong", "mixed", "all_wrong", "all_right", "right_but_two_truncated",
             "right_only_when_truncated", "mixed"]
    engine, stream, prompts, answers, tok, sampling, config = setup(
        kinds, prompts_per_step=2, oversample=1, rounds=8)
    fresh = iter(rl_data.prompt_batches(8, prompts_per_step=2, seed=0))
    order = [int(i) for _ in range(4) for i in next(fresh)]
    informative = [i for i in order if kinds[i] in ("mixed", "right_but_two_truncated")]
    rounds_needed = next(r for r in range(1, 5) if sum(
        kinds[i] in ("mixed", "right_but_two_truncated") for i in order[:2 * r]) >= 2)
    groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                              config, step=0)
    assert stats["sampling_rounds"] == rounds_needed == engine.calls
    assert stats["groups_sampled"] == 2 * rounds_needed
    assert len(groups) == 2
    got = sorted(prompts.index(g["prompt"]) for g in groups)
    assert set(got) <= set(informative[:3])


def test_oversampling_draws_more_prompts_per_round_and_truncates_by_a_seeded_shuffle():
    kinds = ["mixed"] * 12
    runs = []
    for _ in range(2):
        engine, stream, prompts, answers, tok, sampling, config = setup(
            kinds, prompts_per_step=2, oversample=3, rounds=4, seed=5)
        groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                                  config, step=7)
        assert stats["groups_sampled"] == 6 and stats["sampling_rounds"] == 1 and len(groups) == 2
        runs.append([prompts.index(g["prompt"]) for g in groups])
    assert runs[0] == runs[1]  # the shuffle is seeded by (seed, step)


def collect_logging(caplog, kinds, *, step, **setup_kw):
    """``collect_groups`` on a scripted engine; its groups, stats, engine and the one log record
    about informative groups (INFO and up)."""
    engine, stream, prompts, answers, tok, sampling, config = setup(kinds, **setup_kw)
    with caplog.at_level(logging.INFO, logger="dirl_jax.trainers.dipo"):
        groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                                  config, step=step)
    [record] = [r for r in caplog.records if "informative groups" in r.getMessage()]
    return groups, stats, engine, record


def test_round_bound_and_its_warning(caplog):
    groups, stats, engine, record = collect_logging(
        caplog, ["all_right", "all_wrong", "right_only_when_truncated", "all_right"], step=4,
        prompts_per_step=2, oversample=2, rounds=3)
    assert groups == [] and stats["groups_kept"] == 0
    assert stats["sampling_rounds"] == 3 == engine.calls and stats["groups_sampled"] == 12
    assert record.levelno == logging.WARNING and record.getMessage() == (
        "step 4: 0 informative groups after 3 sampling rounds (wanted 2); the step is skipped")


def test_a_short_batch_is_logged_at_info_not_as_a_warning(caplog):
    """Once most groups are all right a short batch is normal (``groups_kept`` records it)."""
    groups, stats, _, record = collect_logging(
        caplog, ["mixed", "all_right", "all_right", "all_right"], step=2,
        prompts_per_step=4, oversample=1, rounds=1)
    assert stats["groups_kept"] == 1 == len(groups)
    assert record.levelno == logging.INFO
    assert record.getMessage() == "step 2: 1 informative groups after 1 sampling rounds (wanted 4)"


def test_without_dynamic_sampling_every_group_is_kept():
    kinds = ["all_right", "all_wrong", "mixed", "all_right"]
    engine, stream, prompts, answers, tok, sampling, config = setup(
        kinds, prompts_per_step=4, oversample=0, rounds=3)
    config.train.dynamic_sampling = False
    groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                              config, step=0)
    assert len(groups) == 4 and stats["groups_sampled"] == 4  # oversample 0 -> 1 without the filter


def test_every_host_makes_the_same_decisions(monkeypatch):
    """Two hosts (threads) decode their share of the rows, gather everything and must keep the
    same groups, in the same order, as one host does."""
    kinds = ["all_right", "mixed", "all_wrong", "right_but_two_truncated", "mixed",
             "right_only_when_truncated", "mixed", "all_wrong"]

    def run():
        engine, stream, prompts, answers, tok, sampling, config = setup(
            kinds, prompts_per_step=3, oversample=1, rounds=4, seed=2)
        groups, stats = dipo_train.collect_groups(engine, stream, prompts, answers, tok, sampling,
                                                  config, step=1)
        return [(prompts.index(g["prompt"]), [r["token_ids"] for r in g["results"]],
                 list(g["advantages"])) for g in groups], stats["rollout_accuracy"]

    single = run()
    rank = threading.local()
    barrier, parts = threading.Barrier(2), {}

    def allgather(value):
        parts[rank.id] = value
        barrier.wait()
        gathered = [parts[0], parts[1]]
        barrier.wait()  # everybody has read before the next call overwrites
        return gathered

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: rank.id)
    monkeypatch.setattr(dipo_train.distributed, "allgather_objects", allgather)
    results = {}

    def host(i):
        rank.id = i
        results[i] = run()

    threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == results[1] == single

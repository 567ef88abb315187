"""RL prompt records, the rollout prompt and the checkpointable prompt stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dirl_jax.data.rl import (DEFAULT_TEMPLATE, PromptRecord, load_prompt_records, prompt_batches,
                              prompt_records, render_prompt)
from dirl_jax.data.records import DataError


def test_records_in_every_accepted_format(tmp_path, shared_dir):
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "1+1?", "ground_truth_answer": "2"},
        {"problem": "2+2?", "answer": "4"},
        {"question": "3+3?", "answer": "Three and three.\n#### 6"},
    ]))
    assert load_prompt_records(str(path)) == [PromptRecord("1+1?", "2"), PromptRecord("2+2?", "4"),
                                              PromptRecord("3+3?", "6")]
    gsm8k = load_prompt_records(str(shared_dir / "data" / "benchmarks" / "gsm8k.jsonl"))
    assert len(gsm8k) == 1319 and gsm8k[0].answer == "18"
    assert len(load_prompt_records(str(shared_dir / "data" / "benchmarks" / "math500.jsonl"))) == 500


def test_bad_records_name_the_record_and_fields():
    with pytest.raises(DataError, match="x.jsonl: record 1: expected a non-empty one of the fields "
                                        "ground_truth_answer, answer"):
        prompt_records([{"question": "a", "answer": "1"}, {"question": "b"}], source="x.jsonl")
    with pytest.raises(DataError, match="question, problem"):
        prompt_records([{"answer": "1"}], source="x.jsonl")


def test_default_prompt_is_dirls_rollout_prompt():
    text = render_prompt("What is 2+3?")
    assert text == ("<|im_start|>user\nWhat is 2+3?\nPlease reason step by step, and put your final "
                    "answer within $\\boxed{}$.<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("Q", "Question: {question}\nAnswer:") == "Question: Q\nAnswer:"
    with pytest.raises(ValueError, match="must contain"):
        render_prompt("Q", "no field")
    assert "{question}" in DEFAULT_TEMPLATE


def test_prompt_stream_covers_each_pass_and_resumes_exactly(seed):
    stream = iter(prompt_batches(10, prompts_per_step=5, seed=seed))
    first_pass = np.concatenate([next(stream), next(stream)])
    assert sorted(first_pass.tolist()) == list(range(10))
    state = stream.get_state()
    ahead = [next(stream).tolist() for _ in range(3)]
    resumed = iter(prompt_batches(10, prompts_per_step=5, seed=seed))
    resumed.set_state(state)
    assert [next(resumed).tolist() for _ in range(3)] == ahead
    with pytest.raises(DataError, match="prompts_per_step is 20"):
        prompt_batches(10, prompts_per_step=20, seed=seed)

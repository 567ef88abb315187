"""The built-in task's one split by operand pair: held-out problems share no pair (in either
order, under any template) with any training record of SFT or any DiPO prompt; a stage refuses a
split other than the one its init_from was trained on."""

from __future__ import annotations

import json
import re

import pytest

from dirl_jax import run as run_lib
from dirl_jax.trainers import dipo as dipo_train
from dirl_jax.config import ConfigValueError, dipo_defaults, sft_defaults
from dirl_jax.data import toy


def pair(question: str) -> tuple[int, int]:
    """The unordered operand pair of a built-in question, read from its text."""
    a, b = (int(x) for x in re.findall(r"\d+", question))
    return min(a, b), max(a, b)


@pytest.mark.parametrize("split_seed, max_operand, eval_size", [(0, 99, 500), (7, 19, 100),
                                                               (3, 49, 400)])
def test_held_out_pairs_never_appear_in_training(split_seed, max_operand, eval_size):
    train, heldout = toy.builtin_split(split_seed, 5000, eval_size, max_operand)
    held_pairs = [pair(r["question"]) for r in heldout]
    assert len(heldout) == eval_size and len(set(held_pairs)) == eval_size  # one problem per pair
    train_pairs = {pair(r["question"]) for r in train}
    assert not train_pairs & set(held_pairs)
    # the answers are right and the training set covers the rest of the pairs
    assert all(r["answer"] == str(sum(pair(r["question"]))) for r in train + heldout)
    assert len(train_pairs) > 0.6 * (len(toy.operand_pairs(max_operand)) - eval_size)
    again = toy.builtin_split(split_seed, 5000, eval_size, max_operand)
    assert again == (train, heldout)  # a pure function of its arguments


def test_split_depends_on_the_split_seed_not_on_sizes():
    _, a = toy.builtin_split(0, 100, 50, 99)
    _, b = toy.builtin_split(0, 3000, 50, 99)
    _, c = toy.builtin_split(1, 100, 50, 99)
    assert a == b and {pair(r["question"]) for r in a} != {pair(r["question"]) for r in c}


def test_too_many_held_out_pairs_is_refused():
    with pytest.raises(ValueError, match="data.builtin_eval_size .210. must leave training pairs"):
        toy.builtin_split(0, 10, 210, 19)  # 19 gives 210 unordered pairs


def test_sft_records_and_dipo_prompts_share_no_pair_with_the_held_out_set():
    sft = sft_defaults()
    sft.data.update(builtin_train_size=3000, builtin_eval_size=300, builtin_max_operand=49)
    train, sft_heldout = run_lib.sft_records(sft)
    dipo = dipo_defaults()
    dipo.data.update(builtin_train_size=3000, builtin_eval_size=300, builtin_max_operand=49)
    tokenizer = toy.toy_tokenizer()
    prompts, answers, dipo_heldout = run_lib.rl_prompts(dipo, tokenizer)
    assert dipo_heldout == sft_heldout  # one split for both tasks
    held = {pair(r["question"]) for r in sft_heldout}
    assert not {pair(r["question"]) for r in train} & held
    questions = [re.search(r"user\n(.*?)<\|im_end\|>", tokenizer.decode(p)).group(1) for p in prompts]
    assert not {pair(q) for q in questions} & held
    assert all(a == str(sum(pair(q))) for q, a in zip(questions, answers))


def test_a_stage_refuses_a_split_other_than_its_init_froms(tmp_path):
    """DiPO and SFT alike, from the run directory, its export, or a detached export carrying the
    run's training record; another task, or a model no run trained, has nothing to compare."""
    run = tmp_path / "sft"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(sft_defaults().to_dict()))
    (run / "export" / "config.json").write_text(json.dumps({"model_type": "sdar"}))
    detached = tmp_path / "served"
    detached.mkdir()
    run_lib.write_training_record(str(detached), sft_defaults(), str(run))
    assert json.loads((detached / run_lib.TRAINING_RECORD).read_text())["run_dir"] == str(run)
    for start in (run, run / "export", detached):
        for defaults in (dipo_defaults, sft_defaults):
            config = defaults()
            config.init_from = str(start)
            run_lib.check_same_split(config)  # the same split: fine
            for field, value in (("builtin_max_operand", 19), ("split_seed", 1), ("builtin_eval_size", 100)):
                changed = defaults()
                changed.init_from = str(start)
                changed.data[field] = value
                with pytest.raises(ConfigValueError, match=f"config.data.{field}: .* differs from .*, "
                                                           "the split of the run that trained init_from"):
                    run_lib.check_same_split(changed)
            changed.data.source = "prompts.jsonl"  # another task: nothing to compare
            run_lib.check_same_split(changed)
    hf_model = tmp_path / "hf"
    hf_model.mkdir()
    (hf_model / "config.json").write_text(json.dumps({"model_type": "sdar"}))
    config = sft_defaults()
    config.init_from, config.data.split_seed = str(hf_model), 1
    run_lib.check_same_split(config)


def test_sft_and_dipo_check_the_split_before_anything_else(tmp_path, monkeypatch):
    from dirl_jax.trainers import sft as sft_train
    calls = []
    monkeypatch.setattr(run_lib, "check_same_split", lambda config: calls.append(config.task) or 1 / 0)
    for task, start in (("sft", sft_train.run_sft), ("dipo", dipo_train.run_dipo)):
        config = sft_defaults() if task == "sft" else dipo_defaults()
        config.update(run_dir=str(tmp_path / task), init_from=str(tmp_path), tokenizer="builtin:toy")
        with pytest.raises(ZeroDivisionError):
            start(config)
    assert calls == ["sft", "dipo"]


@pytest.mark.parametrize("a,b,width,expected", [
    (7, 45, 2, r"07+45:7+5=12,0+4+1=05,\boxed{52}"),
    (99, 99, 2, r"99+99:9+9=18,9+9+1=19,\boxed{198}"),
    (0, 3, 2, r"00+03:0+3=03,0+0+0=00,\boxed{3}"),
    (5, 8, 1, r"5+8:5+8=13,\boxed{13}"),
    (123, 989, 3, r"123+989:3+9=12,2+8+1=11,1+9+1=11,\boxed{1112}"),
])
def test_worked_answer_adds_column_by_column(a, b, width, expected):
    assert toy.worked_answer(a, b, width) == expected


def test_every_record_answers_its_own_question():
    """The question's operands, the worked answer's columns and the gold answer agree."""
    train, heldout = toy.builtin_split(3, 300, 100, 99)
    for record in train + heldout:
        a, b = map(int, re.findall(r"\d+", record["question"]))
        answer = record["messages"][-1]["content"]
        assert answer == toy.worked_answer(a, b, 2) and record["answer"] == str(a + b)
        assert answer.endswith(f"\\boxed{{{a + b}}}")


def test_the_held_out_eval_grades_the_response_up_to_its_stop_token(tmp_path, monkeypatch):
    """Tokens decoded after the stop token in the final block are not part of the answer."""
    from conftest import tiny_config
    from dirl_jax.evaluation import builtin
    tokenizer = toy.toy_tokenizer()
    record = run_lib.sft_records(sft_defaults())[1][0]
    answered = tokenizer.encode(rf"\boxed{{{record['answer']}}}") + [2]  # 2: <|im_end|>
    after = tokenizer.encode(r"\boxed{0}")
    monkeypatch.setattr(builtin, "decode_prompts", lambda *args, **kwargs: [
        {"token_ids": answered + after, "length": len(answered), "tokens_per_step": 1.0}])
    config = sft_defaults()
    config.eval.num_examples = 1
    result = builtin.evaluate_builtin(None, tiny_config(block_size=4), tokenizer, [record], config,
                                      str(tmp_path))
    assert result["correct"] == [1]

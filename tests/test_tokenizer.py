"""The real SDAR tokenizer from the shared directory and the DiRL prompt format."""

from __future__ import annotations

import pytest

from dirl_jax.data.tokenizer import load_tokenizer, rollout_messages, rollout_prompt
from dirl_jax.model import SDARConfig


@pytest.fixture(scope="module")
def sdar_dir(shared_dir):
    return shared_dir / "data" / "sdar_tokenizer"


@pytest.fixture(scope="module")
def tokenizer(sdar_dir):
    return load_tokenizer(sdar_dir)


def test_chat_template_renders_the_dirl_rollout_prompt(tokenizer):
    question = "What is $1+\\frac{1}{2}$?"
    rendered = tokenizer.apply_chat_template(rollout_messages(question), tokenize=False,
                                             add_generation_prompt=True)
    expected = ("<|im_start|>user\nWhat is $1+\\frac{1}{2}$?\nPlease reason step by step, and put "
                "your final answer within $\\boxed{}$.<|im_end|>\n<|im_start|>assistant\n")
    assert rendered == expected == rollout_prompt(question)


def test_special_token_ids(tokenizer, sdar_dir):
    config = SDARConfig.from_pretrained(sdar_dir)
    assert config.mask_token_id == 151669
    assert tokenizer.convert_ids_to_tokens(config.mask_token_id) == "<|MASK|>"
    assert tokenizer.mask_token_id == config.mask_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 151643
    ids = tokenizer(rollout_prompt("1+1?"))["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == rollout_prompt("1+1?")


def test_missing_tokenizer_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path)

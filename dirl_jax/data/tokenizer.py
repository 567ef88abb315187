"""Tokenizer loading and the DiRL prompt format."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# DIRL_SPEC §2.1: the instruction appended to every rollout / evaluation question.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A HF tokenizer (with its chat template) from a local directory or a hub id."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: no tokenizer_config.json (expected a tokenizer directory)")
    # SDAR directories carry remote config code (auto_map) that a tokenizer never needs
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def rollout_messages(question: str) -> list[dict[str, str]]:
    """The chat messages of a DiRL rollout prompt for ``question``."""
    return [{"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"}]


def rollout_prompt(question: str) -> str:
    """The exact raw prompt string DiRL sends to its rollout servers (DIRL_SPEC §2.1)."""
    return (f"<|im_start|>user\n{question}\n{BOXED_INSTRUCTION}<|im_end|>\n"
            "<|im_start|>assistant\n")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids that end a response: ``<|im_end|>``, EOS and pad (those the tokenizer has)."""
    ids = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))

"""Tokenizer loading and the DiRL prompt format."""

from __future__ import annotations

import json
import os

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dirl_jax.model.paths import ModelPathError, looks_like_hub_id

# DIRL_SPEC §2.1: the instruction appended to every rollout / evaluation question.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A HF tokenizer (with its chat template) from a local directory or a hub id.

    A local directory's tokenizer is built by the class its ``tokenizer_config.json`` names:
    ``AutoTokenizer`` would first read ``config.json``, whose ``model_type: sdar`` transformers
    does not know (a warning on every load, and a detour through a generic config)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if not looks_like_hub_id(path):
            raise ModelPathError(f"{path}: no such directory (expected a tokenizer directory or "
                                 "a hub id 'org/name')")
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no tokenizer_config.json (expected a tokenizer directory)")
    with open(file, encoding="utf-8") as f:
        named = getattr(transformers, str(json.load(f).get("tokenizer_class")), None)
    if isinstance(named, type) and issubclass(named, PreTrainedTokenizerBase):
        return named.from_pretrained(path)
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

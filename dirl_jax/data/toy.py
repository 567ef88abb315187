"""The embedded default task: arithmetic word problems with a \\boxed{} answer, and a
character-level chat tokenizer built in code (mask, pad and end-of-turn tokens, ChatML template).

Everything is generated deterministically from a seed, so the default run needs no download.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, MASK, IM_START, IM_END = "<|endoftext|>", "<|MASK|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, MASK)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TEMPLATES = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Tom has {a} apples and gets {b}. Total?",
    "Sum of {a} and {b}?",
    "{a} birds, then {b} more. Total?",
)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII and newline, plus the chat special tokens."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=PAD, pad_token=PAD, mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def arithmetic_problem(rng: random.Random, max_operand: int) -> tuple[str, str, str]:
    """(question, worked answer, gold answer) for one problem."""
    template = rng.choice(_TEMPLATES)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    gold = str(a + b)
    return template.format(a=a, b=b), f"{a}+{b}=\\boxed{{{gold}}}", gold


def arithmetic_records(seed: int, count: int, max_operand: int = 49) -> list[dict]:
    """``count`` SFT records in DiRL's format, plus ``question`` and ``answer`` for evaluation."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        question, response, gold = arithmetic_problem(rng, max_operand)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": response}],
                        "question": question, "answer": gold})
    return records

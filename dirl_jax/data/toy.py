"""The embedded default task: arithmetic word problems with a \\boxed{} answer, and a
character-level chat tokenizer built in code (mask, pad and end-of-turn tokens, ChatML template).

Everything is generated deterministically from a seed, so the default run needs no download.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BUILTIN_TASK = "builtin:arithmetic"  # data.source of this task

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


def operand_pairs(max_operand: int) -> list[tuple[int, int]]:
    """Every unordered operand pair ``(a, b)``, ``a <= b``: the item a problem is about (a + b and
    b + a are one item, whatever the template)."""
    return [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]


def worked_answer(a: int, b: int, width: int) -> str:
    """The toy task's worked answer: the operands restated zero-padded to ``width`` digits, one
    column addition per digit from the ones upwards (with the carry), then the boxed sum::

        07+45:7+5=12,0+4+1=05,\\boxed{52}

    Every column is a one-digit fact seen in many training problems, so a held-out pair is
    answered from facts it shares with training pairs."""
    digits_a, digits_b = f"{a:0{width}d}", f"{b:0{width}d}"
    columns, carry = [], None
    for x, y in zip(reversed(digits_a), reversed(digits_b)):
        total = int(x) + int(y) + (carry or 0)
        columns.append(f"{x}+{y}{'' if carry is None else f'+{carry}'}={total:02d}")
        carry = total // 10
    return f"{digits_a}+{digits_b}:{','.join(columns)},\\boxed{{{a + b}}}"


def arithmetic_record(rng: random.Random, pair: tuple[int, int], width: int) -> dict:
    """One problem about ``pair`` (random operand order and template): DiRL's SFT ``messages``
    (the answer worked column by column, :func:`worked_answer`) plus ``question`` and gold
    ``answer``."""
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    question = rng.choice(_TEMPLATES).format(a=a, b=b)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": worked_answer(a, b, width)}],
            "question": question, "answer": str(a + b)}


def builtin_split(seed: int, train_size: int, eval_size: int, max_operand: int
                  ) -> tuple[list[dict], list[dict]]:
    """The built-in task split by operand pair: ``eval_size`` held-out problems, one for each of
    ``eval_size`` unordered pairs drawn by ``seed``, and ``train_size`` training problems drawn from
    the remaining pairs only. No training problem of any task shares a pair with a held-out one,
    in either order (b + a is the same fact as a + b) or under any template.
    """
    pairs = operand_pairs(max_operand)
    if not 0 <= eval_size < len(pairs):
        raise ValueError(f"data.builtin_eval_size ({eval_size}) must leave training pairs: "
                         f"data.builtin_max_operand={max_operand} gives {len(pairs)} operand pairs")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    width = len(str(max_operand))
    heldout = [arithmetic_record(rng, pair, width) for pair in pairs[:eval_size]]
    train_pairs = pairs[eval_size:]
    train = [arithmetic_record(rng, rng.choice(train_pairs), width) for _ in range(train_size)]
    return train, heldout


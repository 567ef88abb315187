"""RL prompt data: question / gold-answer records, the rollout prompt, a checkpointable stream.

Records come from the same sources as SFT data (JSONL / JSON / Parquet / HF datasets). DiRL's RL
format has ``question`` and ``ground_truth_answer``; ``problem`` and ``answer`` are accepted too.
An ``answer`` holding a worked solution in GSM8K style keeps only the text after the last ``####``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from dirl_jax.data.records import DataError, read_records
from dirl_jax.data.tokenizer import rollout_prompt

QUESTION_FIELDS = ("question", "problem")
ANSWER_FIELDS = ("ground_truth_answer", "answer")
DEFAULT_TEMPLATE = rollout_prompt("{question}")  # DIRL_SPEC §2.1


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    question: str
    answer: str


def _first_field(record: Any, names: Sequence[str], where: str) -> str:
    if isinstance(record, dict):
        for name in names:
            value = record.get(name)
            if isinstance(value, (str, int, float)) and str(value).strip():
                return str(value)
    raise DataError(f"{where}: expected a non-empty one of the fields {', '.join(names)}")


def prompt_records(records: Sequence[Any], *, source: str) -> list[PromptRecord]:
    """Validated ``PromptRecord``s; errors name the record and the fields expected."""
    out = []
    for i, record in enumerate(records):
        where = f"{source}: record {i}"
        answer = _first_field(record, ANSWER_FIELDS, where)
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1]
        out.append(PromptRecord(question=_first_field(record, QUESTION_FIELDS, where),
                                answer=answer.strip()))
    if not out:
        raise DataError(f"{source}: no records")
    return out


def load_prompt_records(source: str, split: str = "train") -> list[PromptRecord]:
    return prompt_records(read_records(source, split), source=source)


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The rollout prompt text; ``template`` holds one ``{question}`` field."""
    if "{question}" not in template:
        raise ValueError(f"prompt template must contain {{question}}, got {template!r}")
    return template.replace("{question}", question)


def prompt_batches(num_records: int, *, prompts_per_step: int, seed: int) -> grain.IterDataset:
    """An endless stream of record-index batches ``int64[prompts_per_step]``: every pass over the
    records in a fresh seeded order. Every host draws the same stream (the RL loop splits each
    draw's rows over hosts). Its position is checkpointable with ``grain.checkpoint``."""
    indices = grain.MapDataset.source(np.arange(num_records))
    if len(indices) < prompts_per_step:
        raise DataError(f"{len(indices)} prompts; prompts_per_step is {prompts_per_step}")
    return (indices.seed(seed).shuffle().repeat().to_iter_dataset()
            .batch(prompts_per_step, drop_remainder=True))

"""SFT data: records in DiRL's ``{"messages": [...]}`` format -> tokens and labels -> packed rows.

Formatting follows DiRL's ``qwen3_nothink`` template (DIRL_SPEC §1.1): every turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; assistant contents and their ``<|im_end|>\\n`` are
supervised, everything else gets label -100. Each example is right-padded to a multiple of the
block size with the pad token **and those pad tokens are supervised** (label = pad id), as in the
original: the decoder always completes the final block, so the model must learn to fill the tail
of that block with padding after the end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from dirl_jax.data.records import DataError
from dirl_jax.diffusion import IGNORE

ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


def _messages(record: Any, where: str) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must have a string 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {message.get('role')!r}; "
                            f"expected one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be from the assistant")
    return messages


def turn_text(message: dict[str, str]) -> str:
    """One non-assistant turn in ChatML."""
    return f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"


ASSISTANT_HEADER = "<|im_start|>assistant\n"


def encode_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a generation prompt: the turns, then the assistant header (as in training)."""
    text = "".join(turn_text(m) for m in messages) + ASSISTANT_HEADER
    return tokenizer.encode(text, add_special_tokens=False)


def encode_record(record: Any, tokenizer: PreTrainedTokenizerBase, block_size: int,
                  where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels of one record, padded to a multiple of ``block_size``."""
    tokens: list[int] = []
    labels: list[int] = []

    def add(text: str, supervised: bool) -> None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens.extend(ids)
        labels.extend(ids if supervised else [IGNORE] * len(ids))

    for message in _messages(record, where):
        if message["role"] == "assistant":
            add(ASSISTANT_HEADER, False)
            add(message["content"] + "<|im_end|>\n", True)
        else:
            add(turn_text(message), False)
    pad = (-len(tokens)) % block_size
    tokens.extend([tokenizer.pad_token_id] * pad)
    labels.extend([tokenizer.pad_token_id] * pad)
    return np.asarray(tokens, np.int32), np.asarray(labels, np.int32)


@dataclasses.dataclass
class PrepareStats:
    total: int = 0
    dropped: int = 0        # longer than max_length, overlong="drop"
    truncated: int = 0      # cut to max_length, overlong="truncate"
    unsupervised: int = 0   # no supervised token (left): discarded


def prepare_examples(records: Iterable[Any], tokenizer: PreTrainedTokenizerBase, *,
                     block_size: int, max_length: int, overlong: str,
                     source: str = "dataset") -> tuple[list[dict[str, np.ndarray]], PrepareStats]:
    """Encodes records; examples longer than ``max_length`` are dropped or truncated."""
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"data.overlong must be 'drop' or 'truncate', got {overlong!r}")
    if max_length % block_size:
        raise ValueError(f"data.max_length ({max_length}) must be a multiple of block_size ({block_size})")
    stats = PrepareStats()
    examples = []
    for i, record in enumerate(records):
        stats.total += 1
        tokens, labels = encode_record(record, tokenizer, block_size, where=f"{source}: record {i}")
        if len(tokens) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            tokens, labels = tokens[:max_length], labels[:max_length]
        if (labels != IGNORE).any():
            examples.append({"tokens": tokens, "labels": labels})
        else:
            stats.unsupervised += 1
    if stats.dropped or stats.truncated or stats.unsupervised:
        log.warning("%s: of %d records, %d longer than data.max_length=%d were dropped and %d "
                    "truncated; %d without a supervised token (left) were discarded", source,
                    stats.total, stats.dropped, max_length, stats.truncated, stats.unsupervised)
    if not examples:
        raise DataError(f"{source}: no examples left after filtering ({stats.total} records, "
                        f"{stats.dropped} longer than data.max_length={max_length} dropped, "
                        f"{stats.unsupervised} without a supervised token)")
    return examples, stats


def packed_batches(examples: list[dict[str, np.ndarray]], *, seq_len: int, rows: int, seed: int,
                   pad_id: int, process_index: int = 0, process_count: int = 1,
                   packing_bins: int = 8) -> grain.IterDataset:
    """An endless, seeded stream of global batches of ``rows`` packed rows of ``seq_len``
    tokens, of which this host yields its contiguous share of ``rows / process_count`` rows.

    Every host packs the same global batch, so the data a run sees does not depend on how many
    hosts it is split over. Each batch holds ``tokens``, ``labels`` (-100 on prompts and row
    padding), ``positions`` (restarting at 0 per example) and ``segment_ids`` (0.. per example,
    -1 on row padding). The iterator's position is checkpointable with ``grain.checkpoint``.
    """
    if rows % process_count:
        raise ValueError(f"rows ({rows}) must be divisible by the process count ({process_count})")
    share = rows // process_count
    lo = process_index * share
    dataset = grain.MapDataset.source(examples).seed(seed).shuffle().repeat()
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset.to_iter_dataset(), length_struct={"tokens": seq_len, "labels": seq_len},
        num_packing_bins=packing_bins)

    def to_canvas_fields(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment = row["tokens_segment_ids"].astype(np.int32) - 1
        padding = segment < 0
        return {"tokens": np.where(padding, pad_id, row["tokens"]).astype(np.int32),
                "labels": np.where(padding, IGNORE, row["labels"]).astype(np.int32),
                "positions": row["tokens_positions"].astype(np.int32),
                "segment_ids": segment}

    return (packed.map(to_canvas_fields).batch(rows, drop_remainder=True)
            .map(lambda batch: {k: v[lo:lo + share] for k, v in batch.items()}))

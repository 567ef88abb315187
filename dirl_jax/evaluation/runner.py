"""Runs a benchmark evaluation: k samples per question through a rollout engine, graded and
recorded as they finish, then summarised (DIRL_SPEC §7.1).

Every (benchmark, question, sample) decodes with its own key derived from the seed and a stable
hash of its identity, so results do not depend on batching, on the number of hosts or on a
restart: a resumed run skips the finished records and produces the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Sequence

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from dirl_jax import console, run
from dirl_jax.attention import IMPLEMENTATIONS
from dirl_jax.config import benchmark_names, check, check_eval_fields, eval_decoding
from dirl_jax.data import rl as rl_data
from dirl_jax.data.tokenizer import load_tokenizer
from dirl_jax.evaluation import records as records_lib
from dirl_jax.data.records import DataError
from dirl_jax.evaluation.benchmarks import (BENCHMARKS, Question, benchmark_file, grade_answers,
                                            load_benchmark)
from dirl_jax.evaluation.report import summarize, write_report
from dirl_jax.model import load_model
from dirl_jax.model.hf_io import resolve_dtype, weights_signature
from dirl_jax.model.paths import resolve_model_dir
from dirl_jax.rollout.engine import make_engine
from dirl_jax.rollout.sampler import SamplingConfig

log = logging.getLogger(__name__)


def sample_seed(benchmark: str, question_id: str, sample: int) -> int:
    """A stable per-sample seed in ``[0, 2**31)`` (independent of order, batch and process)."""
    digest = hashlib.sha256(f"{benchmark}\0{question_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def validate_eval(config: ConfigDict) -> None:
    """Raises ConfigValueError naming the first inconsistent field of an evaluation config."""
    check_eval_fields(config)
    unknown = [b for b in benchmark_names(config) if b not in BENCHMARKS]
    check(not unknown, "benchmarks", f"unknown {unknown}; available: {', '.join(BENCHMARKS)}")
    run.check_decoding(eval_decoding_fields(config), "")
    run.check_engine("engine", config.engine)
    run.check_choice("attention_impl", config.attention_impl, IMPLEMENTATIONS)


def eval_decoding_fields(config: ConfigDict) -> dict[str, Any]:
    """A benchmark evaluation's decoding fields: its preset with the config's overrides, its
    ``max_new_tokens`` and ``min_new_tokens`` capped by it."""
    fields = {**eval_decoding(config), "max_new_tokens": config.max_new_tokens}
    fields["min_new_tokens"] = min(fields["min_new_tokens"], config.max_new_tokens)
    return fields


def sampling_config(config: ConfigDict, tokenizer, block_size: int, mask_token_id: int) -> SamplingConfig:
    """The preset's decoding settings with the config's overrides; ``<|im_end|>`` stops and
    ``<|endoftext|>`` is never sampled, as in DiRL's evaluation."""
    vocab = tokenizer.get_vocab()
    return SamplingConfig.from_fields(
        eval_decoding_fields(config), block_size=block_size, mask_token_id=mask_token_id,
        stop_ids=[vocab[t] for t in ("<|im_end|>",) if t in vocab],
        banned_ids=[vocab[t] for t in ("<|endoftext|>",) if t in vocab],
        attn_impl=config.attention_impl)


def check_not_trained_on(model: str, files: dict[str, str]) -> None:
    """A DataError when a benchmark's file is data that some stage of ``model`` trained on
    (``data.source`` along its ``init_from`` chain): a result there is not held out."""
    for record_file, source in run.trained_sources(model):
        if not os.path.isfile(source):
            continue
        for benchmark, file in files.items():
            if os.path.isfile(file) and os.path.samefile(source, file):
                raise DataError(f"benchmark {benchmark}: {file} is data that a stage of {model} trained "
                                f"on (data.source in {record_file}); a result on it would not be held out")


def question_digest(question: Question) -> str:
    """Ties a record to the question text and gold answer it was made for."""
    return hashlib.sha256(json.dumps([question.question, question.answer]).encode()).hexdigest()[:16]


def check_records_match(output_dir: str, questions: Sequence[Question],
                        done: dict[tuple[str, str, int], Any]) -> None:
    """A DataError when ``output_dir`` holds records of a question id made for another question
    or answer (another data file under the same ids): they would be counted as this one's."""
    digests = {(q.benchmark, q.id): question_digest(q) for q in questions}
    for (benchmark, question_id, _), record in done.items():
        want = digests.get((benchmark, question_id))
        if want is not None and record.get("question_digest") != want:
            raise DataError(f"{output_dir}: its records of {benchmark} question {question_id!r} were "
                            "made for another question or answer (a different data source?); use a "
                            "new output_dir or delete it")


def pending_work(questions: Sequence[Question], samples: int,
                 done: dict[tuple[str, str, int], Any]) -> list[tuple[Question, int]]:
    return [(q, s) for q in questions for s in range(samples)
            if (q.benchmark, q.id, s) not in done]


def run_evaluation(config: ConfigDict) -> dict[str, dict[str, Any]]:
    """Evaluates ``config.model`` on ``config.benchmarks``; writes records, summary.json / .md /
    .png to ``config.output_dir`` and returns the summary."""
    validate_eval(config)
    path = resolve_model_dir(config.model)
    tokenizer = load_tokenizer(config.tokenizer or path)
    model, model_config = load_model(path, resolve_dtype(config.compute_dtype))
    sampling = sampling_config(config, tokenizer, model_config.block_size, model_config.mask_token_id)
    engine = make_engine(config.engine, model, sampling, pad_token_id=tokenizer.pad_token_id or 0,
                         tokenizer=config.tokenizer or path, options={k: v for k, v in config.engine_options.items() if v})
    benchmarks = benchmark_names(config)
    questions = [q for b in benchmarks for q in load_benchmark(
        b, config.source or None, data_dir=config.data_dir or None, limit=config.limit or None,
        split=config.source_split)]
    template = config.prompt_template or rl_data.DEFAULT_TEMPLATE
    check_not_trained_on(config.model, {b: config.source or os.fspath(benchmark_file(b, config.data_dir or None))
                                        for b in benchmarks})

    os.makedirs(config.output_dir, exist_ok=True)
    settings = {"model": os.path.abspath(path) if os.path.exists(config.model) else config.model,
                "weights": weights_signature(path), "tokenizer": config.tokenizer,
                "engine": config.engine, "seed": config.seed, "prompt_template": template,
                "compute_dtype": config.compute_dtype, **eval_decoding(config),
                "max_new_tokens": config.max_new_tokens}
    if jax.process_index() == 0:
        records_lib.check_settings(config.output_dir, settings)
    done = records_lib.read_records(config.output_dir)
    check_records_match(config.output_dir, questions, done)
    work = pending_work(questions, config.samples_per_question, done)
    devices = jax.devices()
    console.say([f"evaluate: {config.model} on {', '.join(benchmarks)} ({len(questions)} questions x "
                 f"{config.samples_per_question} samples, {len(work)} to generate) -> "
                 f"{console.shown_path(os.path.abspath(config.output_dir))}",
                 f"  engine {config.engine}, decoding {config.decoding}, {len(devices)} "
                 f"{devices[0].platform} device(s); compiling the decoder first"])
    encoded = {(q.benchmark, q.id): tokenizer.encode(rl_data.render_prompt(q.question, template),
                                                     add_special_tokens=False) for q, _ in work}
    # prompts of similar length share a batch (less padding, shorter KV caches); the split over
    # hosts then gives every host a mix of lengths
    work = sorted(work, key=lambda item: len(encoded[item[0].benchmark, item[0].id]))
    work = work[jax.process_index()::jax.process_count()]
    writer = records_lib.RecordWriter(records_lib.shard_path(
        config.output_dir, jax.process_index(), jax.process_count()))
    with tqdm(total=len(work), desc="evaluating", unit="sample", disable=not work) as progress:
        for start in range(0, len(work), config.batch_size):
            chunk = work[start:start + config.batch_size]
            prompts = [encoded[q.benchmark, q.id] for q, _ in chunk]
            results = engine.generate(prompts, sampling, seed=config.seed,
                                      row_seeds=[sample_seed(q.benchmark, q.id, s) for q, s in chunk])
            writer.write(graded_records(chunk, results, tokenizer, config))
            progress.update(len(chunk))
    writer.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dirl_jax.evaluate: records written")
    summary: dict[str, dict[str, Any]] = {}
    if jax.process_index() == 0:
        records_lib.merge_shards(config.output_dir)
        wanted = {(q.benchmark, q.id, s) for q in questions for s in range(config.samples_per_question)}
        finished = [r for k, r in records_lib.read_records(config.output_dir).items() if k in wanted]
        summary = summarize(finished, benchmarks)
        write_report(summary, config.output_dir, model=os.path.basename(os.path.normpath(config.model)),
                     decoding=config.decoding)
    return summary


def graded_records(chunk: Sequence[tuple[Question, int]], results: Sequence[dict[str, Any]],
                   tokenizer, config: ConfigDict) -> list[dict[str, Any]]:
    """One record per sample: the response up to its stop token, graded (on
    ``config.grade_workers`` processes, each answer under ``config.grade_timeout``)."""
    responses = [tokenizer.decode(r["token_ids"][:r["length"]]) for r in results]
    verdicts = grade_answers([(q.benchmark, text, q.answer) for (q, _), text in zip(chunk, responses)],
                             timeout=config.grade_timeout, latex_fallback=config.latex_fallback,
                             workers=config.grade_workers)
    return [{"benchmark": q.benchmark, "question_id": q.id, "question_digest": question_digest(q),
             "sample": sample, "response": response,
             "extracted": extracted, "gold": q.answer, "correct": bool(correct),
             "length": result["length"], "tokens_per_step": result["tokens_per_step"],
             "num_steps": result["num_steps"], "finish_reason": result["finish_reason"]}
            for (q, sample), response, result, (extracted, correct)
            in zip(chunk, responses, results, verdicts)]

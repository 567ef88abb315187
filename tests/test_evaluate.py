"""The evaluation harness end to end on a tiny random model: the CLI contract, files, summary,
resume after a kill, determinism across batch sizes, and refused setting changes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, launch, save_toy_chat_model
from dirl_jax.config import ConfigValueError, eval_defaults
from dirl_jax.evaluation.runner import run_evaluation

SUMMARY_FIELDS = {"accuracy", "tokens_per_step", "avg_length", "num_questions", "num_samples"}


@pytest.fixture
def tiny_model_dir(tmp_path, seed):
    return save_toy_chat_model(tmp_path, seed)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def small_config(model_dir, output_dir, **overrides):
    config = eval_defaults()
    fields = dict(model=str(model_dir), output_dir=str(output_dir), benchmarks="math500,gsm8k",
                  limit=10, samples_per_question=2, max_new_tokens=12, min_new_tokens=4,
                  compute_dtype="float32", batch_size=16)
    config.update({**fields, **overrides})
    return config


def test_cli_contract_writes_records_and_summary(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    run = subprocess.run(
        [sys.executable, "-m", "dirl_jax.evaluate", "--config", "configs/eval_tiny.py",
         f"--config.model={tiny_model_dir}", "--config.benchmarks=math500,gsm8k", "--config.limit=10",
         "--config.samples_per_question=2", "--config.max_new_tokens=12", f"--config.output_dir={out}"],
        cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| MATH500 | GSM8K |" in run.stdout
    records = read_lines(out / "records.jsonl")
    assert len(records) == 2 * 10 * 2  # 20 questions x 2 samples
    assert {(r["benchmark"], r["question_id"], r["sample"]) for r in records} == {
        (b, q, s) for b in ("math500", "gsm8k") for q in {r["question_id"] for r in records
                                                          if r["benchmark"] == b} for s in (0, 1)}
    for r in records:
        assert set(r) >= {"response", "extracted", "gold", "correct", "length", "tokens_per_step",
                          "finish_reason"}
        assert 1 <= r["length"] <= 12 + 4 and r["tokens_per_step"] >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"math500", "gsm8k"}
    for name, entry in summary.items():
        assert set(entry) >= SUMMARY_FIELDS
        assert entry["num_questions"] == 10 and entry["num_samples"] == 20
        mine = [r for r in records if r["benchmark"] == name]
        assert entry["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / 20)
        assert entry["avg_length"] == pytest.approx(sum(r["length"] for r in mine) / 20)
    table = (out / "summary.md").read_text()
    assert "accuracy (%)" in table and "tokens / step" in table and "avg length" in table
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_hosts_split_the_work_and_write_the_one_host_report(tiny_model_dir, tmp_path):
    args = ["--config", "configs/eval_tiny.py", f"--config.model={tiny_model_dir}",
            "--config.benchmarks=gsm8k,aime24", "--config.limit=6", "--config.samples_per_question=2",
            "--config.max_new_tokens=12", "--config.batch_size=4"]
    launch("dirl_jax.evaluate", [*args, f"--config.output_dir={tmp_path / 'one'}"], devices=2)
    launch("dirl_jax.evaluate", [*args, f"--config.output_dir={tmp_path / 'two'}"], devices=1,
           processes=2)
    def by_sample(directory):
        return {(r["benchmark"], r["question_id"], r["sample"]): r
                for r in read_lines(directory / "records.jsonl")}
    one, two = by_sample(tmp_path / "one"), by_sample(tmp_path / "two")
    assert len(one) == 2 * 6 * 2 and two == one  # the shards were merged, every sample once
    assert not list((tmp_path / "two").glob("records.*.jsonl"))
    assert (json.loads((tmp_path / "two" / "summary.json").read_text())
            == json.loads((tmp_path / "one" / "summary.json").read_text()))


def test_resume_after_a_kill_and_determinism_across_batches(tiny_model_dir, tmp_path, monkeypatch):
    from dirl_jax.rollout.engine import InProcessEngine
    batches = []  # prompt lengths of every batch the engine decodes
    generate = InProcessEngine.generate
    monkeypatch.setattr(InProcessEngine, "generate", lambda self, prompts, *a, **kw: (
        batches.append(sorted(map(len, prompts))), generate(self, prompts, *a, **kw))[1])
    first = run_evaluation(small_config(tiny_model_dir, tmp_path / "a"))
    assert len(batches) > 1 and all(a[-1] <= b[0] for a, b in zip(batches, batches[1:]))  # by length
    path = tmp_path / "a" / "records.jsonl"
    full = read_lines(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-5]) + lines[-5][:20])  # killed mid-write: a torn last line
    assert run_evaluation(small_config(tiny_model_dir, tmp_path / "a")) == first
    key = lambda r: (r["benchmark"], r["question_id"], r["sample"])  # noqa: E731
    assert sorted(read_lines(path), key=key) == sorted(full, key=key)
    # another batch size and order of work gives the same samples (per-sample keys)
    run_evaluation(small_config(tiny_model_dir, tmp_path / "b", batch_size=7))
    assert sorted(read_lines(tmp_path / "b" / "records.jsonl"), key=key) == sorted(full, key=key)
    # a longer min length is another experiment: refused in the same directory
    with pytest.raises(ValueError, match="min_new_tokens: 4 -> 8"):
        run_evaluation(small_config(tiny_model_dir, tmp_path / "a", min_new_tokens=8))


def test_records_of_other_questions_or_weights_are_never_reused(tiny_model_dir, tmp_path):
    """Another data file under the same ids, or new weights at the same model path, are refused
    in an output directory that holds records of the old ones (they would count as the new)."""
    from dirl_jax.data.records import DataError
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"id": i, "problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(3)))
    second.write_text("".join(json.dumps({"id": i, "problem": f"{i} + 2?", "answer": str(i + 2)}) + "\n"
                              for i in range(3)))
    out = tmp_path / "out"
    run_evaluation(small_config(tiny_model_dir, out, benchmarks="math500", source=str(first)))
    with pytest.raises(DataError, match="question '0' were made for another question or answer"):
        run_evaluation(small_config(tiny_model_dir, out, benchmarks="math500", source=str(second)))
    weights = tiny_model_dir / "model.safetensors"  # retrained: new weights at the same path
    weights.write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match="holds records of other settings \\(weights: "):
        run_evaluation(small_config(tiny_model_dir, out, benchmarks="math500", source=str(first)))


def test_a_benchmark_a_stage_trained_on_is_refused(tiny_model_dir, tmp_path):
    """Following init_from back: DiPO (its export) from SFT that trained on the benchmark file."""
    from dirl_jax.data.records import DataError
    from dirl_jax.run import write_training_record
    from dirl_jax.config import dipo_defaults, sft_defaults
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": 0, "problem": "1 + 1?", "answer": "2"}) + "\n")
    sft = tmp_path / "sft"
    sft.mkdir()
    config = sft_defaults()
    config.data.source = str(bench)
    (sft / "config.json").write_text(json.dumps(config.to_dict()))
    dipo = dipo_defaults()
    dipo.init_from = str(sft)
    write_training_record(str(tiny_model_dir), dipo, str(tmp_path / "dipo"))
    with pytest.raises(DataError, match=f"benchmark math500: {bench} is data that a stage of .* trained "
                                        f"on \\(data.source in {sft / 'config.json'}\\)"):
        run_evaluation(small_config(tiny_model_dir, tmp_path / "out", benchmarks="math500",
                                    source=str(bench)))


def test_bad_eval_config_names_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigValueError, match="config.benchmarks: unknown \\['math5000'\\]"):
        run_evaluation(small_config(tiny_model_dir, tmp_path, benchmarks="math5000"))
    with pytest.raises(ConfigValueError, match="config.decoding: must be one of"):
        run_evaluation(small_config(tiny_model_dir, tmp_path, decoding="fast"))


def test_paper_evaluation_config_validates():
    import importlib.util

    from dirl_jax.config import eval_decoding
    from dirl_jax.evaluation.runner import validate_eval
    spec = importlib.util.spec_from_file_location("eval_sdar8b", REPO / "configs" / "eval_sdar8b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    validate_eval(config)
    assert config.samples_per_question == 16 and config.max_new_tokens == 8192
    assert eval_decoding(config) == {"strategy": "low_confidence_dynamic", "steps": 0, "threshold": 0.9,
                                     "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                     "min_new_tokens": 128}
    assert set(config.benchmarks.split(",")) == {"math500", "gsm8k", "aime24", "aime25", "olympiadbench"}

"""Benchmark loaders: the shared benchmark files, DiRL's own format, limits and errors."""

from __future__ import annotations

import json
import re

import pytest

from dirl_jax.data.records import DataError
from dirl_jax.evaluation import BENCHMARKS, Question, load_benchmark


@pytest.fixture(scope="module")
def bench_dir(shared_dir):
    return shared_dir / "data" / "benchmarks"


def raw_records(bench_dir, name):
    with open(bench_dir / BENCHMARKS[name].file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("name,count,first_id,first_answer", [
    ("math500", 500, "test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)"),
    ("gsm8k", 1319, "0", "18"),
    ("aime24", 30, "60", "204"),
    ("aime25", 30, "0", "70"),
    ("olympiadbench", 675, "1606", "2"),
    ("amc23", 40, "0", "27"),
])
def test_every_shared_benchmark_loads(bench_dir, name, count, first_id, first_answer):
    questions = load_benchmark(name, data_dir=bench_dir)
    assert len(questions) == count
    assert all(q.benchmark == name and q.question.strip() and q.answer.strip() for q in questions)
    assert len({q.id for q in questions}) == count
    first, raw = questions[0], raw_records(bench_dir, name)[0]
    assert (first.id, first.answer) == (first_id, first_answer)
    assert first.question == raw[BENCHMARKS[name].question_field]


def test_gold_answer_normalisation(bench_dir):
    gsm8k = load_benchmark("gsm8k", data_dir=bench_dir)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", q.answer) for q in gsm8k)
    raw_gsm8k = raw_records(bench_dir, "gsm8k")
    assert {r["answer"].rsplit("####", 1)[1].strip() for r in raw_gsm8k} >= {"2,125", "-10"}
    assert {"2125", "-10"} <= {q.answer for q in gsm8k}
    aime24 = load_benchmark("aime24", data_dir=bench_dir)
    assert raw_records(bench_dir, "aime24")[7]["answer"] == "025" and aime24[7].answer == "25"
    assert all(re.fullmatch(r"0|[1-9]\d*", q.answer) for name in ("aime24", "aime25")
               for q in load_benchmark(name, data_dir=bench_dir))
    assert all(re.fullmatch(r"-?[1-9]\d*", q.answer) for q in load_benchmark("amc23", data_dir=bench_dir))
    olympiad = load_benchmark("olympiadbench", data_dir=bench_dir)
    assert not any("$" in q.answer for q in olympiad)
    assert (olympiad[13].id, olympiad[13].answer) == ("1664", "69,84")  # from ['$69$,$84$']
    assert olympiad[22].answer == r"\frac{25}{2}"


def test_limit_takes_the_first_questions(bench_dir):
    everything = load_benchmark("gsm8k", data_dir=bench_dir)
    assert load_benchmark("gsm8k", data_dir=bench_dir, limit=5) == everything[:5]
    assert len(load_benchmark("aime25", data_dir=bench_dir, limit=100)) == 30
    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_benchmark("aime25", data_dir=bench_dir, limit=0)


def test_default_directory_comes_from_the_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "aime25.jsonl", [{"problem": "What is 3+4?", "answer": 7, "id": "q0"}])
    monkeypatch.setenv("DIRL_BENCHMARK_DIR", str(tmp_path))
    assert load_benchmark("aime25") == [Question("aime25", "q0", "What is 3+4?", "7")]


def test_dirl_format_for_any_benchmark(tmp_path):
    records = [{"question": "How many?", "ground_truth_answer": "$1,234"},
               {"question": "And now?", "ground_truth_answer": "-5"}]
    as_list = tmp_path / "GSM8K.json"
    as_list.write_text(json.dumps(records), encoding="utf-8")
    as_lines = write_jsonl(tmp_path / "GSM8K_lines.json", records)  # datasets' "json" reads both
    expected = [Question("gsm8k", "0", "How many?", "1234"), Question("gsm8k", "1", "And now?", "-5")]
    assert load_benchmark("gsm8k", str(as_list)) == expected
    assert load_benchmark("gsm8k", as_lines) == expected
    aime = write_jsonl(tmp_path / "AIME2024.jsonl",
                       [{"question": "Q", "ground_truth_answer": "007", "id": 3}])
    assert load_benchmark("aime24", aime) == [Question("aime24", "3", "Q", "7")]
    math = write_jsonl(tmp_path / "MATH500.jsonl", [{"question": "Q", "ground_truth_answer": r"\frac{1}{2}"}])
    assert load_benchmark("math500", math)[0].answer == r"\frac{1}{2}"


def test_olympiadbench_answers_and_context(tmp_path):
    path = write_jsonl(tmp_path / "ob.jsonl", [
        {"id": 5, "question": "Find x.", "context": "Let x = 2.", "final_answer": ["$2$"]},
        {"id": 6, "question": "Find all.", "context": None, "final_answer": ["$1$", "$-\\frac{3}{2}$"]},
    ])
    assert load_benchmark("olympiadbench", path) == [
        Question("olympiadbench", "5", "Let x = 2.\n\nFind x.", "2"),
        Question("olympiadbench", "6", "Find all.", r"1, -\frac{3}{2}"),
    ]


def test_unknown_benchmark_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'; available: math500, gsm8k, aime24, "
                                         "aime25, olympiadbench, amc23"):
        load_benchmark("mmlu")


def test_missing_files_and_fields_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"math500\.jsonl: math500 benchmark file not found"):
        load_benchmark("math500", data_dir=tmp_path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "ok", "answer": "1"}, {"problem": "no answer"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: record 1: missing 'answer'; expected non-empty "
                                                  "'problem' and 'answer' fields (or DiRL's 'question' and "
                                                  "'ground_truth_answer')")):
        load_benchmark("math500", path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no number #### many"}])
    with pytest.raises(DataError, match=r"record 0: field 'answer': expected a number after '####', "
                                        r"got 'many'"):
        load_benchmark("gsm8k", path)
    path = write_jsonl(tmp_path / "a.jsonl", [{"problem": " ", "answer": 3}])
    with pytest.raises(DataError, match=r"record 0: missing or empty 'problem'"):
        load_benchmark("aime25", path)
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "q", "answer": "1"}\n{"problem": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON line"):
        load_benchmark("math500", path)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_benchmark("math500", tmp_path / "empty.jsonl")
    path = tmp_path / "bad.json"
    path.write_text('{"question": "q", "ground_truth_answer": "1"}\n{bad\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON line"):
        load_benchmark("math500", path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "problem": "p", "answer": "1"},
                                              {"id": 8, "problem": "q", "answer": "2"},
                                              {"id": 7, "problem": "r", "answer": "3"}])
    with pytest.raises(DataError, match=r"d\.jsonl: records 0 and 2 share the id '7'"):
        load_benchmark("math500", path)


def test_a_hub_dataset_is_scored_on_its_test_split_unless_told(monkeypatch):
    """No split named: ``test`` when the dataset has one, else its only split; several without
    ``test`` is an error naming them; a named split is taken as is."""
    import datasets
    splits = {"org/both": ["train", "test"], "org/one": ["train"], "org/many": ["train", "validation"]}
    loaded = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda source: splits[source])
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: loaded.append((source, split)) or
                        [{"problem": "q", "answer": "1"}])
    load_benchmark("math500", "org/both")
    load_benchmark("math500", "org/one")
    load_benchmark("math500", "org/many", split="validation")
    assert loaded == [("org/both", "test"), ("org/one", "train"), ("org/many", "validation")]
    with pytest.raises(DataError, match="org/many: splits train, validation and none is 'test'"):
        load_benchmark("math500", "org/many")

"""The benchmarks' timing discipline (scripts/benchlib.py): sides alternate, every run is kept,
and a record taken on a loaded machine says so."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "scripts"))
import benchlib  # noqa: E402


def test_sides_alternate_and_every_run_is_reported(monkeypatch):
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(benchlib.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    monkeypatch.setattr(benchlib, "cpu_seconds", lambda: (0.0, 0.0))
    timed = benchlib.alternate({"a": lambda: calls.append("a") or "A",
                                "b": lambda: calls.append("b") or "B"}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert timed["a"]["seconds"] == [1.0, 1.0, 1.0] and timed["a"]["output"] == "A"
    assert timed["b"]["min"] == 1.0 and timed["b"]["median"] == 1.0
    assert not timed["a"]["busy"]


@pytest.mark.parametrize("machine_cpu,own_cpu,busy", [
    (20.0, 20.0, False),   # every busy CPU second was this benchmark's
    (22.0, 20.0, False),   # others: 2 s over 10 s = 0.2 cores
    (23.0, 20.0, True),    # 0.3 cores
    (40.0, 20.0, True),    # another job on two cores
])
def test_cpu_taken_by_other_processes_marks_the_record_busy(monkeypatch, machine_cpu, own_cpu, busy):
    """The load average counts the benchmark's own threads; what marks a timing as contended is
    the CPU time other processes took while it ran."""
    clock = iter([0.0, 0.0, 10.0, 10.0])
    cpu = iter([(100.0, 5.0), (100.0 + machine_cpu, 5.0 + own_cpu)])
    monkeypatch.setattr(benchlib.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(benchlib, "cpu_seconds", lambda: next(cpu))
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (2.1, 0.0, 0.0))  # own threads
    timed = benchlib.alternate({"a": lambda: None}, repeats=1)
    assert timed["a"]["busy"] is busy
    assert timed["a"]["other_cores"] == pytest.approx((machine_cpu - own_cpu) / 10.0)
    assert benchlib.BUSY_CORES == 0.25


@pytest.mark.parametrize("before,after,busy", [(0.5, 0.5, False), (2.5, 0.5, True), (0.5, 2.5, True),
                                               (2.0, 2.0, False)])
def test_without_proc_stat_a_load_above_the_core_count_marks_it_busy(monkeypatch, before, after,
                                                                     busy):
    loads = iter([(before, 0.0, 0.0), (after, 0.0, 0.0)])
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: next(loads))
    monkeypatch.setattr(benchlib.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(benchlib, "cpu_seconds", lambda: (float("nan"), 0.0))
    timed = benchlib.alternate({"a": lambda: None}, repeats=1)
    assert timed["a"]["busy"] is busy
    assert (timed["a"]["load_before"], timed["a"]["load_after"]) == (before, after)


def test_cpu_seconds_reads_the_machine_and_this_process():
    machine_cpu, own = benchlib.cpu_seconds()
    assert machine_cpu >= own > 0


def test_min_and_median_of_uneven_runs(monkeypatch):
    durations = iter([3.0, 1.0, 2.0])
    now = [0.0]

    def clock() -> float:
        return now[0]

    def run() -> None:
        now[0] += next(durations)

    monkeypatch.setattr(benchlib.time, "perf_counter", clock)
    timed = benchlib.alternate({"a": run}, repeats=3)
    assert timed["a"]["seconds"] == [3.0, 1.0, 2.0]
    assert (timed["a"]["min"], timed["a"]["median"]) == (1.0, 2.0)


def test_weight_shapes_are_every_matrix_a_token_meets():
    c = tiny_config(layers=3)
    shapes = benchlib.weight_shapes(c)
    assert len(shapes) == 7 * c.num_hidden_layers + 1
    assert shapes[-1] == (c.hidden_size, c.vocab_size)
    assert shapes[0] == (c.hidden_size, c.num_attention_heads * c.head_dim)
    assert shapes[6] == (c.intermediate_size, c.hidden_size)


def test_timing_fields_are_what_every_benchmark_records():
    timed = {"min": 1.0, "median": 2.0, "seconds": [3.0, 1.0, 2.0], "load_before": 0.5,
             "load_after": 0.7, "other_cores": 0.1, "busy": False, "output": None}
    assert benchlib.timing_fields(timed) == {
        "seconds": 1.0, "median_seconds": 2.0, "all_seconds": [3.0, 1.0, 2.0], "load_before": 0.5,
        "load_after": 0.7, "other_cores": 0.1, "busy": False}

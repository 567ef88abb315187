"""The console line's ETA (the rest of metrics.py: tests/test_faults.py, tests/test_train.py)."""

from __future__ import annotations

from dirl_jax.metrics import MetricsWriter


def test_the_eta_counts_from_the_first_timed_step(tmp_path):
    """Compiling happens before the first written row (and DiPO's step 0 row times nothing): the
    ETA extrapolates only from the steps after it."""
    writer = MetricsWriter(str(tmp_path), total_steps=10, enabled=False)
    assert writer.eta(0, now=0.0) == "measuring"
    assert writer.eta(1, now=100.0) == "measuring"  # step 1 held the compile: 100 s
    assert writer.eta(3, now=104.0) == "0m14s"      # 2 s per step since, 7 steps left
    assert writer.eta(10, now=118.0) == "0m00s"

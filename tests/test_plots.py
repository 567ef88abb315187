"""``metrics.png``: key panels first in their order, constant series left out, the moving average
against a float64 loop, and the file written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dirl_jax import plots


def dipo_rows(steps: int = 30) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = [{"step": 0, "loss": 0.0, "lr": 0.0, "grad_norm": 0.0, "tokens_per_s": 0.0,
             "eval_accuracy": 0.5}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": float(-rng.random()), "lr": 1e-4, "grad_norm": float(rng.random()),
                     "tokens_per_s": float(rng.random()), "micro_batches": 1, "groups_kept": 8,
                     "reward_mean": float(rng.random()), "clip_fraction": float(rng.random()),
                     "rollout_s": float(rng.random()), "train_s": float(rng.random()),
                     "entropy": float(rng.random()), "canvas_rows": step % 3, "skipped": False,
                     **({"eval_accuracy": 0.5 + step / 100} if step % 10 == 0 else {})})
    return rows


def test_key_panels_come_first_and_constants_are_left_out():
    titles = [title for title, _ in plots.panels(dipo_rows())]
    assert titles == ["reward", "held-out accuracy", "loss", "clip fraction", "time per step (s)",
                      "gradient norm", "throughput (tokens/s)", "canvas_rows", "entropy"]
    assert dict(plots.panels(dipo_rows()))["time per step (s)"] == ["rollout_s", "train_s"]


def test_the_step_0_row_gives_only_its_evaluation():
    rows = dipo_rows()
    assert plots.series(rows, "eval_accuracy")[0].tolist() == [0, 10, 20, 30]
    assert plots.series(rows, "loss")[0][0] == 1


@pytest.mark.parametrize("window", [1, 2, 5])
def test_moving_average_against_a_float64_loop(window):
    values = np.random.default_rng(window).standard_normal(17)
    expected = [np.mean(values[max(0, i - window + 1):i + 1], dtype=np.float64) for i in range(17)]
    np.testing.assert_allclose(plots.moving_average(values, window), expected, rtol=1e-12)


def test_plot_run_writes_the_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dipo_rows()))
    out = plots.plot_run(str(tmp_path))
    assert out == str(tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_a_one_step_run_still_gets_its_panels(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 9.0}]
    assert [t for t, _ in plots.panels(rows)] == ["loss", "gradient norm", "learning rate",
                                                 "throughput (tokens/s)"]


def test_log_scale_only_for_positive_series_spanning_100x():
    sft = [{"step": s, "loss": 10.0 / s ** 2} for s in range(1, 12)]
    assert plots.log_scale(sft, ["loss"]) is True
    assert plots.log_scale(dipo_rows(), ["loss"]) is False  # negative
    assert plots.log_scale([{"step": s, "loss": 1.0 + s} for s in range(1, 12)], ["loss"]) is False

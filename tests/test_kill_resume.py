"""kill -9 at random points of SFT and DiPO runs (checkpoint writes included): the resumed run's
metrics hold every step exactly once with the uninterrupted run's values, and its final weights
are bit-identical."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, save_toy_chat_model

SFT = ["--config", "configs/sft_tiny.py", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
       "--config.model.num_hidden_layers=1", "--config.model.num_attention_heads=2",
       "--config.model.num_key_value_heads=1", "--config.model.head_dim=16", "--config.data.max_length=92",
       "--config.data.builtin_train_size=200", "--config.data.builtin_eval_size=4", "--config.train.num_steps=12",
       "--config.train.global_batch=8", "--config.train.warmup_steps=2", "--config.train.log_every=1",
       "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2", "--config.eval.num_examples=0",
       "--config.export.dtype=float32"]


def train(args: list[str], run_dir: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dirl_jax.train", *args, f"--config.run_dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def rows(run_dir: pathlib.Path) -> list[dict]:
    """Metrics rows without timings."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "tokens_per_s"))} for line in lines]


def kill_at_random(args: list[str], run_dir: pathlib.Path, rng: np.random.Generator, first_rows: int) -> str:
    """Starts the run, SIGKILLs it a random moment after its ``first_rows``-th metrics row (or
    when it ends by itself), and says when."""
    process = train(args, run_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= first_rows:
            break
        time.sleep(0.05)
    time.sleep(float(rng.uniform(0.0, 2.0)))
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return f"killed after {done} rows (rc {process.returncode})"


def assert_same_run(straight: pathlib.Path, resumed: pathlib.Path, when: str) -> None:
    print(when)  # in the report of a failing draw
    assert rows(resumed) == rows(straight), when
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} ({when})"


@pytest.fixture(scope="module")
def sft_straight(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("sft") / "straight"
    finish(train(SFT, run_dir))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(2))
def test_sft_survives_kill_9(sft_straight, tmp_path, seed, draw):
    rng = np.random.default_rng([seed, draw])
    run_dir = tmp_path / "killed"
    when = kill_at_random(SFT, run_dir, rng, first_rows=int(rng.integers(1, 10)))
    finish(train(SFT, run_dir))
    assert_same_run(sft_straight, run_dir, when)


@pytest.mark.slow
def test_dipo_survives_kill_9(tmp_path, seed):
    save_toy_chat_model(tmp_path / "sft", seed)
    dipo = ["--config", "configs/dipo_tiny.py", f"--config.init_from={tmp_path / 'sft' / 'model'}",
            f"--config.seed={seed}", "--config.data.builtin_train_size=200", "--config.data.builtin_eval_size=4",
            "--config.rollout.prompts_per_step=2", "--config.rollout.group_size=3", "--config.rollout.max_new_tokens=8",
            "--config.train.num_steps=5", "--config.train.dynamic_sampling=False", "--config.train.canvas_rows=8",
            "--config.train.row_length=256", "--config.checkpoint.every_steps=1", "--config.eval.num_examples=0",
            "--config.export.dtype=float32"]
    finish(train(dipo, tmp_path / "straight"))
    rng = np.random.default_rng(seed)
    when = kill_at_random(dipo, tmp_path / "killed", rng, first_rows=int(rng.integers(2, 5)))
    finish(train(dipo, tmp_path / "killed"))
    assert_same_run(tmp_path / "straight", tmp_path / "killed", when)

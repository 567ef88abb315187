"""DiPO over two processes x 4 CPU devices (JAX's CPU collectives): each host decodes and grades
its share of the rollouts, every host gets them all, the update runs on the global mesh — and the
run reproduces the one-process run step for step, then resumes in one process."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_toy_chat_model, train_cli


def dipo_cli(run_dir, init_from, devices: int, *extra: str, processes: int = 1) -> list[dict]:
    """``python -m dirl_jax.train --config configs/dipo_tiny.py`` on a tiny random model."""
    common = ["--config", "configs/dipo_tiny.py", f"--config.run_dir={run_dir}",
              f"--config.init_from={init_from}", "--config.seed=3",
              "--config.rewards.names=('length',)",  # a random model is never right
              "--config.rollout.prompts_per_step=3", "--config.rollout.group_size=4",
              "--config.rollout.max_new_tokens=16", "--config.train.dynamic_sampling=false",
              "--config.train.canvas_rows=8", "--config.train.row_length=256",
              "--config.train.learning_rate=1e-3", "--config.checkpoint.every_steps=2",
              "--config.eval.num_examples=0", "--config.export.enabled=false", *extra]
    return train_cli(common, run_dir, devices, processes)


@pytest.mark.slow
def test_two_process_dipo_reproduces_one_process_and_resumes(tmp_path):
    model = save_toy_chat_model(tmp_path / "sft", seed=11)
    reference = dipo_cli(tmp_path / "one", model, 8, "--config.train.num_steps=3",
                         "--config.mesh.fsdp=2")
    two = dipo_cli(tmp_path / "two", model, 4, "--config.train.num_steps=2", "--config.mesh.fsdp=2",
                   processes=2)
    assert [r["step"] for r in two] == [1, 2]
    for got, want in zip(two, reference):
        assert got["generated_tokens"] == want["generated_tokens"]
        assert got["canvas_rows"] == want["canvas_rows"]
        for key in ("loss", "grad_norm", "reward_mean"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
        # sampler-vs-trainer log-prob noise: the one-process run decodes on the trainer's fsdp
        # mesh, each of the two processes from its own replica (other fp32 reduction orders)
        assert got["log_ratio_abs_max"] < 1e-5 and want["log_ratio_abs_max"] < 1e-5
        assert got["grad_norm"] > 0
    # the 2-process checkpoint (step 2) resumes in one process on a tensor-parallel mesh
    resumed = dipo_cli(tmp_path / "two", model, 8, "--config.train.num_steps=3",
                       "--config.mesh.tensor=2")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward_mean"):
        np.testing.assert_allclose(resumed[-1][key], reference[-1][key], rtol=1e-5, err_msg=key)

"""DiPO with ``rollout.engine = torch_bridge.lmdeploy_client:LMDeployEngine`` end to end on CPU:
rollouts from an LMDeploy protocol double (step maps, no log-probs), trainer-side old log-probs,
and every update pushed through a receiver agent (``weight_push = agents:URL``) whose recorded
tensors equal the trainer's new parameters. The server and the agent's downstream pusher are
doubles (tests/test_lmdeploy_client.py, tests/test_weight_push.py); no LMDeploy runs here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_dipo_train import tiny_run_config
from test_lmdeploy_client import Double, Host
from test_weight_push import KEY, RecordingPusher, running_agent
from dirl_jax.config import ConfigValueError
from dirl_jax.trainers.dipo import run_dipo
from dirl_jax.model import load_model, parameter_shapes
from torch_bridge import agent as agent_lib
from torch_bridge.state_dict import to_torch_state_dict


def test_dipo_rolls_out_on_lmdeploy_and_pushes_weights_through_an_agent(tmp_path, seed, monkeypatch):
    from dirl_jax.rewards import registry
    monkeypatch.setitem(registry.REWARDS, "text_sum", lambda r: sum(map(ord, r.text)) % 97 / 97)
    config = tiny_run_config(tmp_path, seed)
    config.rewards.names = ("text_sum",)
    config.train.update(num_steps=1, old_logprobs="trainer")
    config.rollout.update(engine="lmdeploy", top_k=50)
    config.eval.num_examples = 0
    config.export.enabled = True
    model, _ = load_model(config.init_from)
    pusher = RecordingPusher()
    receiver = agent_lib.WeightReceiver(pusher, parameter_shapes(model), device="cpu", dtype=None)
    host, double = Host(), Double(api_key=KEY)  # server and agent both require the key
    monkeypatch.setenv("RUN_KEY", KEY)
    try:
        with running_agent(receiver, api_key=KEY) as agent_url:
            config.rollout.engine_options.update(servers=host.start(double), api_key_env="RUN_KEY",
                                                 weight_push=f"agents:{agent_url}")
            run_dipo(config)
    finally:
        host.stop_all()
    assert KEY not in (tmp_path / "dipo" / "config.json").read_text()
    prompts = [p for body in double.bodies for p in body["prompt"]]
    assert len(prompts) == config.rollout.prompts_per_step * config.rollout.group_size
    (row,) = [json.loads(line) for line in (tmp_path / "dipo" / "metrics.jsonl").read_text().splitlines()]
    assert row["loss_tokens"] > 0 and "log_ratio_abs_max" not in row  # no sampler log-probs
    assert pusher.kinds()[0] == "begin" and pusher.kinds()[-1] == "end"
    trained, _ = load_model(tmp_path / "dipo" / "export", dtype="float32")
    got = pusher.tensors()
    assert set(got) == set(parameter_shapes(trained))
    for name, tensor in to_torch_state_dict(trained, torch.bfloat16).items():
        np.testing.assert_array_equal(got[name].float().numpy(), tensor.float().numpy(), err_msg=name)


def test_an_external_engine_needs_trainer_old_logprobs(tmp_path, seed):
    config = tiny_run_config(tmp_path, seed)
    config.rollout.engine = "torch_bridge.lmdeploy_client:LMDeployEngine"
    with pytest.raises(ConfigValueError, match="config.train.old_logprobs: must be 'trainer'"):
        run_dipo(config)

"""The weight-update path is closed by default: the agent binds loopback, refuses to start without
a shared key unless --insecure, answers 401 to requests without the key (reading nothing and
changing nothing), and every request the trainer sends (agents, and LMDeploy's /sleep, /wakeup,
/update_weights) carries ``Authorization: Bearer``; the key never appears in a run config."""

from __future__ import annotations

import requests
import pytest
import torch

from conftest import random_model, tiny_config
from dirl_jax.config import dipo_defaults, eval_defaults
from dirl_jax.model import parameter_shapes
from test_weight_push import AUTH, KEY, FakeServer, RecordingPusher, reference, running_agent, tiny_params
from test_weight_push import assert_same_tensors
from torch_bridge import agent as agent_lib
from torch_bridge import auth
from torch_bridge import weight_push as wp


def receiver_for(seed: int) -> tuple[RecordingPusher, agent_lib.WeightReceiver]:
    pusher = RecordingPusher()
    expected = parameter_shapes(random_model(tiny_config(), seed))
    return pusher, agent_lib.WeightReceiver(pusher, expected, device="cpu", dtype=None)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}])
def test_requests_without_the_key_get_401_and_change_nothing(seed, headers):
    params = tiny_params(seed)
    pusher, receiver = receiver_for(seed)
    manifest = wp.manifest_body(wp.param_specs(params, torch.bfloat16))
    with running_agent(receiver) as url:
        begin = requests.post(url + "/update/begin", json=manifest, headers=headers)
        chunk = requests.post(url + "/update/chunk", params={"finished": 1}, data=b"x" * 1000,
                              headers=headers)
        assert (begin.status_code, chunk.status_code) == (401, 401)
        assert begin.headers["WWW-Authenticate"] == "Bearer"
        assert pusher.events == [] and receiver._manifest is None
        for wrong in (None, "wrong-key"):
            with pytest.raises(wp.ServerError, match="HTTP 401"):
                wp.push_to_agents(params, [url], api_key=wrong)
        assert pusher.events == []
        wp.push_to_agents(params, [url], api_key=KEY)  # the right key still works afterwards
    assert_same_tensors(pusher.tensors(), reference(params, torch.bfloat16))


def test_an_unauthenticated_oversized_body_is_refused_before_it_is_read(seed):
    pusher, receiver = receiver_for(seed)
    with running_agent(receiver, max_request_bytes=1 << 16) as url:
        too_big = b"x" * (1 << 17)
        assert requests.post(url + "/update/chunk", data=too_big).status_code == 401
        requests.post(url + "/update/begin", json=wp.manifest_body(wp.param_specs(
            tiny_params(seed), torch.bfloat16)), headers=AUTH)
        assert requests.post(url + "/update/chunk", data=too_big, headers=AUTH).status_code == 413
    assert pusher.kinds() == ["begin"]


def test_the_request_limit_fits_the_largest_tensor_as_fp32():
    small = {"a": (10, 10)}
    assert agent_lib.max_request_bytes(small) == wp.DEFAULT_CHUNK_BYTES + agent_lib.HEADER_ALLOWANCE
    embedding = {"model.embed_tokens.weight": (151936, 4096), "model.norm.weight": (4096,)}
    assert agent_lib.max_request_bytes(embedding) == 4 * 151936 * 4096 + agent_lib.HEADER_ALLOWANCE


def test_the_agent_binds_loopback_and_refuses_to_start_without_a_key(monkeypatch, tmp_path):
    parser = agent_lib._parser()
    args = parser.parse_args(["--server", "http://s", "--model-dir", "m"])
    assert (args.host, args.api_key_env, args.insecure) == ("127.0.0.1", "DIRL_API_KEY", False)
    monkeypatch.delenv("DIRL_API_KEY", raising=False)
    base = ["--server", "http://s", "--model-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"no API key: set \$DIRL_API_KEY \(or --api-key-file\)"):
        agent_lib.main(base + ["--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="no API key"):
        agent_lib.main(base)  # loopback too: it accepts weights
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match=f"API key file {tmp_path / 'empty'}: is empty"):
        agent_lib.main(base + ["--api-key-file", str(tmp_path / "empty")])
    # past the key check, the next one (no GPU here) is what stops it
    monkeypatch.setattr(agent_lib.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch.cuda is not available"):
        agent_lib.main(base + ["--insecure", "--host", "0.0.0.0"])
    monkeypatch.setenv("DIRL_API_KEY", "k")
    with pytest.raises(SystemExit, match="torch.cuda is not available"):
        agent_lib.main(base + ["--host", "0.0.0.0"])


def test_key_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_KEY", "  from-env \n")
    assert auth.read_api_key(env="MY_KEY") == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert auth.read_api_key(env="MY_KEY", file=str(tmp_path / "key")) == "from-file"
    monkeypatch.delenv("MY_KEY")
    assert auth.read_api_key(env="MY_KEY") is None
    with pytest.raises(ValueError, match=f"API key file {tmp_path / 'nope'}: cannot be read"):
        auth.read_api_key(file=str(tmp_path / "nope"))
    assert [auth.is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.2", "gpu-node")] == [
        True, True, True, False, False, False]


def test_every_lmdeploy_request_of_a_push_carries_the_key(seed, monkeypatch):
    """/sleep, /wakeup and every /update_weights of an IPC push go through the default transport
    with the bearer header (LMDeploy's --api-keys guards all of them, its pickle endpoint too)."""
    server = FakeServer()
    seen = []

    def post(url, *, json=None, params=None, data=None, headers=None, timeout=None):
        seen.append((url.rsplit("/", 1)[-1], headers.get("Authorization")))
        return server.post(url, json=json, params=params, data=data)
    monkeypatch.setattr(requests, "post", post)
    expected = parameter_shapes(random_model(tiny_config(), seed))
    pusher = wp.IPCWeightPusher("http://gpu0:23333", expected, devices=("cpu",), api_key=KEY)
    pusher.push(tiny_params(seed))
    assert {path for path, _ in seen} == {"sleep", "wakeup", "update_weights"}
    assert {header for _, header in seen} == {f"Bearer {KEY}"}
    with pytest.raises(ValueError, match="api_key: give it to the transport"):
        wp.IPCWeightPusher("http://gpu0:23333", expected, devices=("cpu",), api_key=KEY, post=server.post)


def test_the_key_lives_in_the_environment_never_in_a_run_config(monkeypatch):
    for options in (dipo_defaults().rollout.engine_options, eval_defaults().engine_options):
        assert options.api_key_env == "" and "api_key" not in options
    from test_lmdeploy_client import engine
    monkeypatch.setenv("DIRL_API_KEY", "secret-1")
    assert engine("http://127.0.0.1:1").headers == {"Authorization": "Bearer secret-1"}
    monkeypatch.setenv("OTHER", "secret-2")
    assert engine("http://127.0.0.1:1", api_key_env="OTHER").headers == {"Authorization": "Bearer secret-2"}
    monkeypatch.delenv("DIRL_API_KEY")
    assert engine("http://127.0.0.1:1").headers == {}

"""torch_bridge weight push (CPU): name checks against the real 8B index, bucket planning,
LMDeploy's own FlattenedTensorBucket / serialize_state_dict, the exact request sequences of the
IPC and NCCL pushers (fake transports), and the receiver agent over real HTTP.

What needs a GPU and a server (not run here): CUDA IPC handles opened by LMDeploy, NCCL
rendezvous/broadcast, DLPack from JAX GPU arrays.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import safetensors.torch
import torch
from aiohttp import web
from flax import nnx
import lmdeploy.utils
from lmdeploy.utils import FlattenedTensorBucket

from conftest import random_model, tiny_config
from dirl_jax.model import parameter_shapes
from dirl_jax.model.hf_io import hf_name
from torch_bridge import agent as agent_lib
from torch_bridge import weight_push as wp
from torch_bridge.state_dict import jax_dtype, to_torch_state_dict

TINY_BUCKET = 3000  # bytes: several segments for a tiny model, some tensors alone


# ------------------------------------------------------------------------------ helpers
def tiny_params(seed: int, **kw) -> nnx.State:
    return nnx.state(random_model(tiny_config(**kw), seed), nnx.Param)


def bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The raw bit pattern, so equality is bitwise (bf16 included)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous()
        return x.view({2: torch.int16, 4: torch.int32}[x.element_size()]).numpy()
    return x.view({2: np.int16, 4: np.int32}[x.dtype.itemsize])


def reference(params: nnx.State, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """HF name -> the JAX value cast in JAX, as NumPy."""
    return {hf_name(path): np.asarray(var.get_value().astype(jax_dtype(dtype)))
            for path, var in nnx.to_flat_state(params)}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert tuple(got[name].shape) == value.shape, name
        np.testing.assert_array_equal(bits(got[name]), bits(value), err_msg=name)


def decode_payload(serialized: str) -> dict[str, torch.Tensor]:
    """What the server does with one ``serialized_named_tensors`` element, minus CUDA: base64 ->
    ForkingPickler payload -> rebuild the tensor -> FlattenedTensorBucket.reconstruct_tensors."""
    data = pickle.loads(base64.b64decode(serialized))
    assert set(data) == {"flattened_tensor", "metadata"}
    rebuild, args = data["flattened_tensor"]
    bucket = FlattenedTensorBucket(flattened_tensor=rebuild(*args), metadata=data["metadata"])
    return {name: t.clone() for name, t in bucket.reconstruct_tensors()}


class FakeResponse:
    def __init__(self, status_code: int = 200, body: Any = None, text: str = ""):
        self.status_code, self._body, self.text = status_code, body, text or json.dumps(body)

    def json(self) -> Any:
        return self._body


class FakeServer:
    """A transport recording every POST as (path, params, json); decodes IPC payloads at call
    time (while the pusher still holds the tensors) and fails ``fail_path`` with a message."""

    def __init__(self, fail_path: str | None = None):
        self.calls: list[tuple[str, Any, Any]] = []
        self.received: list[dict[str, torch.Tensor]] = []
        self.fail_path = fail_path
        self.lock = threading.Lock()

    def post(self, url: str, *, json: Any = None, params: Any = None, data: Any = None):
        path = url.split("//", 1)[1].split("/", 1)[1]
        with self.lock:
            self.calls.append(("/" + path, params, json))
        if "/" + path == self.fail_path:
            return FakeResponse(500, text="KeyError: 'model.layers.0.mlp.up_proj.weight'")
        if path == "update_weights":
            payloads = json["serialized_named_tensors"]
            for payload in payloads if isinstance(payloads, list) else [payloads]:
                self.received.append(decode_payload(payload))
        if path in ("init_weights_update_group", "update_weights_from_distributed"):
            return FakeResponse(200, {"success": True, "message": "ok"})
        return FakeResponse(200, None, "null")

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.calls]


# ------------------------------------------------------------------------------ names / plans
def test_names_and_shapes_match_the_real_8b_index(shared_dir):
    model_dir = shared_dir / "data" / "sdar_tokenizer"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    expected = wp.expected_shapes(str(model_dir))
    assert set(expected) == set(index["weight_map"]) and len(expected) == 399
    wp.check_names(expected.items(), expected)

    specs = [wp.TensorSpec(name, shape, torch.bfloat16) for name, shape in expected.items()]
    assert sum(s.nbytes for s in specs) == index["metadata"]["total_size"]  # bf16 sizes match
    segments = wp.plan_buckets(specs, wp.DEFAULT_BUCKET_BYTES)
    assert [n for s in segments for n in s.names] == list(expected)
    for segment in segments:
        assert segment.nbytes <= wp.DEFAULT_BUCKET_BYTES or len(segment.names) == 1
    alone = {s.names[0] for s in segments if s.nbytes > wp.DEFAULT_BUCKET_BYTES}
    assert alone == {"model.embed_tokens.weight", "lm_head.weight"}  # 1.24 GB each
    assert [s.finished for s in segments] == [False] * (len(segments) - 1) + [True]

    pushed = dict(expected)
    del pushed["model.layers.7.mlp.down_proj.weight"]
    pushed["model.layers.36.mlp.up_proj.weight"] = (12288, 4096)
    pushed["lm_head.weight"] = (151936, 4095)
    with pytest.raises(wp.WeightNameError) as error:
        wp.check_names(pushed.items(), expected)
    message = str(error.value)
    assert "missing (1): model.layers.7.mlp.down_proj.weight" in message
    assert "unexpected, not in the server's model (1): model.layers.36.mlp.up_proj.weight" in message
    assert "lm_head.weight has shape (151936, 4095), expected (151936, 4096)" in message
    with pytest.raises(wp.WeightNameError, match=r"duplicate \(1\): model.norm.weight"):
        wp.check_names([*expected.items(), ("model.norm.weight", (4096,))], expected)
    wp.check_names(list(expected.items())[:5], expected, require_all=False)  # a level-1 partial update
    with pytest.raises(wp.WeightNameError, match=r"missing \(394\): .*\(374 more\)"):
        wp.check_names(list(expected.items())[:5], expected)


def test_plan_buckets_groups_by_dtype_bounds_size_and_keeps_order():
    f32, bf16 = torch.float32, torch.bfloat16
    specs = [wp.TensorSpec("a", (10,), f32), wp.TensorSpec("b", (30,), bf16),
             wp.TensorSpec("c", (20,), f32), wp.TensorSpec("d", (100,), f32),
             wp.TensorSpec("e", (5,), bf16), wp.TensorSpec("f", (4,), f32)]
    segments = wp.plan_buckets(specs, 120)
    assert [(s.names, s.dtype, s.nbytes) for s in segments] == [
        (("a", "c"), f32, 120), (("d",), f32, 400), (("f",), f32, 16), (("b", "e"), bf16, 70)]
    assert [s.finished for s in segments] == [False, False, False, True]
    assert not any(s.finished for s in wp.plan_buckets(specs, 120, finished=False))
    with pytest.raises(ValueError, match="no tensors"):
        wp.plan_buckets([], 120)
    with pytest.raises(ValueError, match="max_bucket_bytes"):
        wp.plan_buckets(specs, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flattened_buckets_round_trip_bitwise(seed, dtype):
    params = tiny_params(seed)
    specs = wp.param_specs(params, dtype)
    segments = wp.plan_buckets(specs, TINY_BUCKET)
    assert len(segments) > 3
    tensors = wp.named_tensors(params, dtype)
    rebuilt = {}
    for segment in segments:
        bucket = FlattenedTensorBucket(named_tensors=wp._take(segment, tensors))
        assert [m.name for m in bucket.get_metadata()] == list(segment.names)
        assert bucket.get_flattened_tensor().numel() * dtype.itemsize == segment.nbytes
        rebuilt.update(bucket.reconstruct_tensors())
    assert_same_tensors(rebuilt, reference(params, dtype))
    state_dict = to_torch_state_dict(random_model(tiny_config(), seed), dtype)
    assert_same_tensors(state_dict, reference(params, dtype))


def test_default_transport_sends_json_content_type(monkeypatch):
    seen = {}
    monkeypatch.setattr(requests, "post", lambda url, **kw: seen.update(kw, url=url))
    wp.requests_post("http://s/wakeup", params={"tags": "weights"})
    assert seen["headers"] == {"Content-Type": "application/json"} and seen["json"] is None
    wp.requests_post("http://a/update/chunk", data=b"x")
    assert seen["headers"] == {"Content-Type": "application/octet-stream"}


# ------------------------------------------------------------------------------ IPC
def test_ipc_push_sends_sleep_wakeup_segments_wakeup(seed):
    params = tiny_params(seed)
    expected = parameter_shapes(random_model(tiny_config(), seed))
    server = FakeServer()
    pusher = wp.IPCWeightPusher("http://gpu0:23333/", expected, devices=("cpu",),
                                max_bucket_bytes=TINY_BUCKET, post=server.post)
    stats = pusher.push(params)

    n = stats["segments"]
    assert n > 3 and server.paths() == ["/sleep", "/wakeup", *["/update_weights"] * n, "/wakeup"]
    assert server.calls[0][1] == {"level": 2} and server.calls[1][1] == {"tags": "weights"}
    assert server.calls[-1][1] == {"tags": "kv_cache"}
    bodies = [body for path, _, body in server.calls if path == "/update_weights"]
    assert [b["finished"] for b in bodies] == [False] * (n - 1) + [True]
    assert all(b["load_format"] == "flattened_bucket" and isinstance(b["serialized_named_tensors"], str)
               for b in bodies)
    got = {name: t for segment in server.received for name, t in segment.items()}
    assert_same_tensors(got, reference(params, torch.bfloat16))
    assert stats["bytes"] == sum(s.nbytes for s in wp.param_specs(params, torch.bfloat16))
    assert stats["tensors"] == len(expected) and stats["gb_per_s"] > 0


def test_ipc_push_tp_lists_and_sleep_levels(seed):
    params = tiny_params(seed)
    expected = parameter_shapes(random_model(tiny_config(), seed))
    server = FakeServer()
    wp.IPCWeightPusher("http://s", expected, devices=("cpu", "cpu"), sleep_level=None,
                       post=server.post).push(params)
    assert server.paths() == ["/update_weights"]  # one bucket, no sleep/wakeup
    payloads = server.calls[0][2]["serialized_named_tensors"]
    assert isinstance(payloads, list) and len(payloads) == 2
    assert_same_tensors(server.received[0], server.received[1])

    partial = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if "norm" in p[-2]])
    server = FakeServer()
    wp.IPCWeightPusher("http://s", expected, sleep_level=1, devices=("cpu",),
                       post=server.post).push(partial)  # level 1: a partial update is allowed
    assert server.calls[0][1] == {"level": 1} and server.paths()[-1] == "/wakeup"
    with pytest.raises(wp.WeightNameError, match="missing"):
        wp.IPCWeightPusher("http://s", expected, sleep_level=2, post=server.post).push(partial)
    with pytest.raises(ValueError, match="sleep_level"):
        wp.IPCWeightPusher("http://s", expected, sleep_level=3)


def test_ipc_push_checks_before_sending_and_raises_server_errors(seed):
    params = tiny_params(seed)
    other = parameter_shapes(random_model(tiny_config(hidden=32), seed))
    server = FakeServer()
    with pytest.raises(wp.WeightNameError, match="has shape"):
        wp.IPCWeightPusher("http://s", other, devices=("cpu",), post=server.post).push(params)
    assert server.calls == []

    expected = parameter_shapes(random_model(tiny_config(), seed))
    server = FakeServer(fail_path="/update_weights")
    with pytest.raises(wp.ServerError, match=r"/update_weights: HTTP 500: KeyError: 'model.layers"):
        wp.IPCWeightPusher("http://s", expected, devices=("cpu",), post=server.post).push(params)
    assert server.paths() == ["/sleep", "/wakeup", "/update_weights"]  # left asleep


def test_a_server_that_does_not_answer_is_a_server_error_naming_it(seed):
    """Refused connections (a server down) come back as ServerError with the URL, so an agent
    answers 502 with the reason instead of a bare 500."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    expected = parameter_shapes(random_model(tiny_config(), seed))
    with pytest.raises(wp.ServerError, match=rf"POST http://127.0.0.1:{port}/sleep: no answer \(ConnectionError"):
        wp.IPCWeightPusher(f"http://127.0.0.1:{port}", expected, devices=("cpu",)).push(tiny_params(seed))


# ------------------------------------------------------------------------------ NCCL
def test_nccl_request_bodies_and_flattening_order(seed, monkeypatch):
    params = tiny_params(seed)
    expected = parameter_shapes(random_model(tiny_config(), seed))
    joined, broadcasts = {}, []
    monkeypatch.setattr(lmdeploy.utils, "init_custom_process_group",
                        lambda **kw: joined.update(kw) or "pg")
    monkeypatch.setattr(wp.dist, "broadcast",
                        lambda t, src, group: broadcasts.append((t.clone(), src, group)))
    server = FakeServer()
    pusher = wp.NCCLWeightPusher(["http://n1:23333", "http://n2:23333"], expected,
                                 master_address="10.0.0.1", master_port=29600, server_tp=2,
                                 device="cpu", max_bucket_bytes=TINY_BUCKET, post=server.post)
    with pytest.raises(RuntimeError, match="connect"):
        pusher.push(params)
    assert server.calls == []  # refused before putting any server to sleep
    pusher.connect()
    assert joined == {"backend": "nccl", "init_method": "tcp://10.0.0.1:29600", "world_size": 5,
                      "rank": 0, "group_name": "dirl_weight_update", "timeout": pusher.timeout}
    assert [body for _, _, body in server.calls] == [
        {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": offset,
         "world_size": 5, "group_name": "dirl_weight_update", "backend": "nccl"}
        for offset in (1, 3)]

    server.calls.clear()
    stats = pusher.push(params)
    n = stats["segments"]
    assert server.paths() == [*["/sleep", "/wakeup"] * 2,
                              *["/update_weights_from_distributed"] * (2 * n), *["/wakeup"] * 2]
    bodies = [body for path, _, body in server.calls if path == "/update_weights_from_distributed"]
    assert bodies[0::2] == bodies[1::2]  # both servers get the same request
    assert len(broadcasts) == n and all(src == 0 and group == "pg" for _, src, group in broadcasts)
    got = {}
    for body, (flat, _, _) in zip(bodies[0::2], broadcasts):
        assert body["load_format"] == "flattened_bucket" and body["group_name"] == "dirl_weight_update"
        # the server side: empty tensors in the body's order, one broadcast into their flat copy
        receiving = FlattenedTensorBucket(named_tensors=[
            (name, torch.empty(shape, dtype=getattr(torch, dtype)))
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"])])
        receiving.get_flattened_tensor().copy_(flat)
        got.update(receiving.reconstruct_tensors())
    assert [b["finished"] for b in bodies[0::2]] == [False] * (n - 1) + [True]
    assert_same_tensors(got, reference(params, torch.bfloat16))


# ------------------------------------------------------------------------------ agent
class RecordingPusher:
    """A pusher that records the update instead of reaching a server."""

    def __init__(self):
        self.events: list[tuple[str, Any]] = []

    def begin(self) -> None:
        self.events.append(("begin", None))

    def send(self, named: list[tuple[str, torch.Tensor]], finished: bool) -> int:
        self.events.append(("send", ({n: t.clone() for n, t in named}, finished)))
        return sum(t.numel() * t.element_size() for _, t in named)

    def end(self) -> None:
        self.events.append(("end", None))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for kind, arg in self.events if kind == "send" for n, t in arg[0].items()}


KEY = "test-shared-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def running_agent(receiver: agent_lib.WeightReceiver, api_key: str | None = KEY,
                  max_request_bytes: int = 1 << 20) -> Iterator[str]:
    """The agent's aiohttp app (requiring ``api_key``) on a free local port, served from a
    background thread."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(agent_lib.create_app(receiver, api_key=api_key,
                                                max_request_bytes=max_request_bytes))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_agents_receive_pushed_weights_bitwise(seed):
    params = tiny_params(seed)
    expected = parameter_shapes(random_model(tiny_config(), seed))
    pushers = [RecordingPusher(), RecordingPusher()]
    receivers = [agent_lib.WeightReceiver(p, expected, device="cpu", dtype=None,
                                          max_bucket_bytes=TINY_BUCKET // 2) for p in pushers]
    with running_agent(receivers[0]) as url0, running_agent(receivers[1]) as url1:
        stats = wp.push_to_agents(params, [url0, url1], max_chunk_bytes=TINY_BUCKET, api_key=KEY)
    assert stats["segments"] > 3
    for pusher in pushers:
        kinds = pusher.kinds()
        assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("begin") == 1
        finished = [arg[1] for kind, arg in pusher.events if kind == "send"]
        assert finished == [False] * (len(finished) - 1) + [True]
        assert len(finished) > stats["segments"]  # the agent re-buckets at its smaller limit
        assert_same_tensors(pusher.tensors(), reference(params, torch.bfloat16))


def test_agent_casts_to_its_dtype(seed):
    params = tiny_params(seed)
    pusher = RecordingPusher()
    receiver = agent_lib.WeightReceiver(pusher, parameter_shapes(random_model(tiny_config(), seed)),
                                        device="cpu", dtype=torch.bfloat16)
    with running_agent(receiver) as url:
        wp.push_to_agents(params, [url], dtype=torch.float32, api_key=KEY)
    assert_same_tensors(pusher.tensors(), reference(params, torch.bfloat16))


def test_agent_rejects_wrong_names_and_shapes_before_pushing(seed):
    params = tiny_params(seed)
    pusher = RecordingPusher()
    other = parameter_shapes(random_model(tiny_config(layers=3), seed))
    receiver = agent_lib.WeightReceiver(pusher, other, device="cpu", dtype=None)
    with running_agent(receiver) as url:
        with pytest.raises(wp.ServerError) as error:
            wp.push_to_agents(params, [url], api_key=KEY)
        assert "HTTP 400" in str(error.value) and "missing (" in str(error.value)
        assert "model.layers.2.mlp.up_proj.weight" in str(error.value)
        assert pusher.events == []

    expected = parameter_shapes(random_model(tiny_config(), seed))
    receiver = agent_lib.WeightReceiver(pusher, expected, device="cpu", dtype=None)
    manifest = wp.manifest_body(wp.param_specs(params, torch.bfloat16))
    with running_agent(receiver) as url:
        response = requests.post(url + "/update/chunk", data=b"", headers=AUTH)
        assert response.status_code == 409 and "begin" in response.text
        assert requests.post(url + "/update/begin", json=manifest, headers=AUTH).status_code == 200
        name = "model.norm.weight"
        wrong = safetensors.torch.save({name: torch.zeros(7, dtype=torch.bfloat16)})
        response = requests.post(url + "/update/chunk", data=wrong, headers=AUTH)
        assert response.status_code == 400
        assert f"{name} has shape (7,), expected (24,)" in response.text
        wrong = safetensors.torch.save({name: torch.zeros(24, dtype=torch.float32)})
        response = requests.post(url + "/update/chunk", data=wrong, headers=AUTH)
        assert response.status_code == 400 and "float32, the manifest says bfloat16" in response.text
        right = safetensors.torch.save({name: torch.zeros(24, dtype=torch.bfloat16)})
        response = requests.post(url + "/update/chunk", params={"finished": 1}, data=right, headers=AUTH)
        assert response.status_code == 400 and "missing (" in response.text  # incomplete update
        assert pusher.kinds() == ["begin"]  # nothing was pushed


def test_parse_manifest_names_the_bad_entry():
    with pytest.raises(ValueError, match="'w': expected"):
        agent_lib.parse_manifest({"tensors": {"w": {"shape": [2, -1], "dtype": "bfloat16"}}})
    with pytest.raises(ValueError, match="tensor 'w': .*dtype"):
        agent_lib.parse_manifest({"tensors": {"w": {"shape": [2], "dtype": "int8"}}})
    with pytest.raises(ValueError, match="manifest"):
        agent_lib.parse_manifest([])

"""Pushing JAX parameters into a running LMDeploy server (docs: LMDEPLOY.md section 2).

Three routes, one planning/checking path:

* :class:`IPCWeightPusher` -- the trainer shares the GPU with the server: CUDA IPC handles of a
  flattened bucket through ``POST /update_weights`` (what DiRL does).
* :class:`NCCLWeightPusher` -- a GPU trainer on another node: the trainer joins an NCCL group with
  the server (``/init_weights_update_group``) and broadcasts each bucket while posting
  ``/update_weights_from_distributed`` (LMDeploy >= 0.14).
* :func:`push_to_agents` -- any trainer (e.g. a TPU pod): safetensors bytes over HTTP to a
  :mod:`torch_bridge.agent` beside each server, which pushes them with :class:`IPCWeightPusher`.

Every update is checked against the server's parameter names and shapes *before* anything is
sent: LMDeploy raises ``KeyError`` in the middle of an update and leaves it half-written.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import functools
import importlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, TypeVar

import requests
import safetensors.torch
import torch
import torch.distributed as dist
from flax import nnx

from dirl_jax.model import SDARConfig, abstract_model, hf_name, parameter_shapes, plan_shards
from torch_bridge.auth import bearer_header
from torch_bridge.state_dict import jax_dtype, named_tensors

__all__ = [
    "DEFAULT_BUCKET_BYTES", "IPCWeightPusher", "NCCLWeightPusher", "Segment", "ServerError",
    "TensorSpec", "WeightNameError", "check_names", "distributed_update_body", "dtype_name",
    "expected_shapes", "init_group_body", "manifest_body", "named_tensors", "param_specs",
    "parse_dtype", "plan_buckets", "push_to_agents", "requests_post", "send_segments",
]

DEFAULT_BUCKET_BYTES = 1 << 30
DEFAULT_CHUNK_BYTES = 512 << 20
HTTP_TIMEOUT_S = 1800.0
SLEEP_LEVELS = (None, 1, 2)
_LISTED = 20  # names listed per kind of problem in a WeightNameError
T = TypeVar("T")


def lmdeploy_utils() -> Any:
    """``lmdeploy.utils`` (bucket flattening, request serialisation, NCCL groups), imported when a
    push first needs it so that exporting never requires LMDeploy."""
    try:
        return importlib.import_module("lmdeploy.utils")
    except ImportError as e:
        raise ImportError("pushing weights to LMDeploy servers needs LMDeploy: on GPU nodes "
                          "`pip install lmdeploy==0.18.0`; on CPU machines `pip install --no-deps "
                          "lmdeploy==0.18.0` (what scripts/setup.sh does)") from e


class WeightNameError(ValueError):
    """Pushed tensor names/shapes do not match the server's model parameters."""


class ServerError(RuntimeError):
    """An LMDeploy server or agent answered with an error."""


# ------------------------------------------------------------------------------ dtypes / specs
class TensorSpec(NamedTuple):
    """Name, shape and torch dtype of one tensor to push."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling LMDeploy reads with ``getattr(torch, ...)``)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; only the floating dtypes the bridge converts."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {name!r}")
    jax_dtype(dtype)  # raises for an unsupported one
    return dtype


def param_specs(params: nnx.State, dtype: torch.dtype) -> list[TensorSpec]:
    """The specs :func:`named_tensors` ``(params, dtype)`` yields, in its order, without converting."""
    return [TensorSpec(hf_name(path), tuple(var.shape), dtype)
            for path, var in nnx.to_flat_state(params)]


def expected_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every parameter of the model in ``model_dir`` (its ``config.json``;
    the directory the server was launched from)."""
    return parameter_shapes(abstract_model(SDARConfig.from_pretrained(model_dir)))


# ------------------------------------------------------------------------------ checks / planning
def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def check_names(names_and_shapes: Iterable[tuple[str, Sequence[int]]],
                expected: Mapping[str, Sequence[int]], *, require_all: bool = True,
                against: str = "the server's model") -> None:
    """Raises :class:`WeightNameError` listing duplicate, unexpected, mis-shaped and (with
    ``require_all``, as a level-2 sleep requires) missing names; ``against`` names
    ``expected`` in the message."""
    shapes: dict[str, tuple[int, ...]] = {}
    duplicates = []
    for name, shape in names_and_shapes:
        if name in shapes:
            duplicates.append(name)
        shapes[name] = tuple(shape)
    problems = []
    if duplicates:
        problems.append(f"duplicate ({len(duplicates)}): {_listing(duplicates)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        problems.append(f"unexpected, not in {against} ({len(unexpected)}): "
                        f"{_listing(unexpected)}")
    if require_all:
        missing = sorted(set(expected) - set(shapes))
        if missing:
            problems.append(f"missing ({len(missing)}): {_listing(missing)}")
    mismatched = [f"{name} has shape {shapes[name]}, expected {tuple(expected[name])}"
                  for name in sorted(set(shapes) & set(expected))
                  if shapes[name] != tuple(expected[name])]
    if mismatched:
        problems.append(f"mis-shaped ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise WeightNameError(f"tensor names/shapes do not match {against}:\n  "
                              + "\n  ".join(problems))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Tensors sent in one request: one dtype (a ``FlattenedTensorBucket`` needs one)."""

    names: tuple[str, ...]
    dtype: torch.dtype
    nbytes: int
    finished: bool


def plan_buckets(specs: Iterable[TensorSpec], max_bucket_bytes: int, *,
                 finished: bool = True) -> list[Segment]:
    """Segments grouped by dtype (in order of first appearance), names in their given order
    within a dtype, each at most ``max_bucket_bytes`` unless one tensor alone is larger.
    The last segment carries ``finished`` (pass False for a non-final part of an update)."""
    if max_bucket_bytes <= 0:
        raise ValueError(f"max_bucket_bytes must be positive, got {max_bucket_bytes}")
    by_dtype: dict[torch.dtype, list[TensorSpec]] = {}
    for spec in specs:
        by_dtype.setdefault(spec.dtype, []).append(spec)
    if not by_dtype:
        raise ValueError("no tensors to push")
    groups = []
    for dtype, group in by_dtype.items():
        sizes = {spec.name: spec.nbytes for spec in group}
        groups += [(names, dtype, sum(sizes[n] for n in names))
                   for names in plan_shards(list(sizes.items()), max_bucket_bytes)]
    return [Segment(tuple(names), dtype, nbytes, finished and i == len(groups) - 1)
            for i, (names, dtype, nbytes) in enumerate(groups)]


# ------------------------------------------------------------------------------ HTTP
class Response(Protocol):
    status_code: int
    text: str

    def json(self) -> Any: ...


Post = Callable[..., Response]


def requests_post(url: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                  data: bytes | None = None, api_key: str | None = None) -> requests.Response:
    """The default transport: JSON (LMDeploy requires the content type even without a body)
    unless raw ``data`` bytes are given; ``Authorization: Bearer`` with an ``api_key``."""
    content_type = "application/json" if data is None else "application/octet-stream"
    return requests.post(url, json=json, params=params, data=data,
                         headers={"Content-Type": content_type, **bearer_header(api_key)},
                         timeout=HTTP_TIMEOUT_S)


def transport(post: Post | None, api_key: str | None) -> Post:
    """``post``, or :func:`requests_post` sending ``api_key`` with every request."""
    if post is not None and api_key:
        raise ValueError("api_key: give it to the transport (post) itself, or use the default transport")
    return post or functools.partial(requests_post, api_key=api_key)


_SUCCESS_ENDPOINTS = ("/init_weights_update_group", "/update_weights_from_distributed")


class _Endpoint:
    """One server (LMDeploy or agent) reached through ``post``."""

    def __init__(self, url: str, post: Post):
        self.url = url.rstrip("/")
        self.post = post

    def call(self, path: str, **kw: Any) -> Response:
        """POSTs; no answer (refused, timed out), a non-200 answer or ``{"success": false}``
        raises ServerError with its message."""
        try:
            response = self.post(self.url + path, **kw)
        except requests.RequestException as e:
            raise ServerError(f"POST {self.url}{path}: no answer ({type(e).__name__}: {e})") from e
        if response.status_code != 200:
            raise ServerError(f"POST {self.url}{path}: HTTP {response.status_code}: "
                              f"{response.text.strip()[:4000]}")
        if path in _SUCCESS_ENDPOINTS and not response.json().get("success", False):
            raise ServerError(f"POST {self.url}{path}: {response.json().get('message')}")
        return response


def _concurrently(calls: Sequence[Callable[[], T]],
                  meanwhile: Callable[[], None] = lambda: None) -> list[T]:
    """Runs ``calls`` in threads while ``meanwhile`` runs here; their results, in order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        meanwhile()
        return [future.result() for future in futures]


def _stats(nbytes: int, start: float, specs: Sequence[TensorSpec],
           segments: Sequence[Segment]) -> dict[str, float]:
    seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
            "tensors": len(specs), "segments": len(segments)}


# ------------------------------------------------------------------------------ pushers
class Pusher(Protocol):
    """What :func:`send_segments` and the agent drive: one update = begin, sends, end."""

    def begin(self) -> None: ...

    def send(self, named: list[tuple[str, torch.Tensor]], finished: bool) -> int: ...

    def end(self) -> None: ...


def _take(segment: Segment, tensors: Iterator[tuple[str, torch.Tensor]]
          ) -> list[tuple[str, torch.Tensor]]:
    """The next ``len(segment.names)`` tensors, which must be the segment's, in its order."""
    named = list(itertools.islice(tensors, len(segment.names)))
    if tuple(name for name, _ in named) != segment.names:
        raise RuntimeError(f"tensors arrive as {[n for n, _ in named]}, "
                           f"the segment expects {list(segment.names)}")
    return named


def send_segments(pusher: Pusher, segments: Sequence[Segment],
                  tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Sends ``segments`` in order, pulling each one's tensors from ``tensors`` (which must
    yield them in segment order); bytes sent."""
    return sum(pusher.send(_take(segment, tensors), segment.finished) for segment in segments)


class _LMDeployPusher(abc.ABC):
    """Shared lifecycle: ``/sleep?level=L`` -> ``/wakeup?tags=weights`` -> segments ->
    ``/wakeup?tags=kv_cache`` (``sleep_level=None``: update in place, no sleep/wakeup).

    On an error after ``begin`` the server is left asleep (it answers 503 to generation rather
    than serve half-updated weights); push again to recover.
    """

    def __init__(self, server_urls: Sequence[str], expected: Mapping[str, Sequence[int]], *,
                 dtype: torch.dtype, max_bucket_bytes: int, sleep_level: int | None,
                 post: Post | None, api_key: str | None = None):
        if sleep_level not in SLEEP_LEVELS:
            raise ValueError(f"sleep_level must be one of {SLEEP_LEVELS}, got {sleep_level!r}")
        if not server_urls:
            raise ValueError("server_urls: at least one server is needed")
        jax_dtype(dtype)  # raises for a dtype the bridge does not convert
        self.servers = [_Endpoint(url, transport(post, api_key)) for url in server_urls]
        self.expected = dict(expected)
        self.dtype = dtype
        self.max_bucket_bytes = max_bucket_bytes
        self.sleep_level = sleep_level

    def plan(self, specs: Sequence[TensorSpec]) -> list[Segment]:
        """Checks ``specs`` against the server's parameters (all of them after a level-2 sleep),
        then plans the segments."""
        check_names([(s.name, s.shape) for s in specs], self.expected,
                    require_all=self.sleep_level == 2)
        return plan_buckets(specs, self.max_bucket_bytes)

    def begin(self) -> None:
        if self.sleep_level is None:
            return
        for server in self.servers:
            server.call("/sleep", params={"level": self.sleep_level})
            server.call("/wakeup", params={"tags": "weights"})

    def end(self) -> None:
        if self.sleep_level is None:
            return
        for server in self.servers:
            server.call("/wakeup", params={"tags": "kv_cache"})

    @abc.abstractmethod
    def send(self, named: list[tuple[str, torch.Tensor]], finished: bool) -> int:
        """Sends one segment (``finished`` on the update's last); bytes sent."""

    def push(self, params: nnx.State) -> dict[str, float]:
        """Pushes every variable of ``params`` (HF names, cast to ``dtype``); returns
        ``{bytes, seconds, gb_per_s, tensors, segments}``."""
        start = time.perf_counter()
        specs = param_specs(params, self.dtype)
        segments = self.plan(specs)
        self.begin()
        nbytes = send_segments(self, segments, named_tensors(params, self.dtype))
        self.end()
        return _stats(nbytes, start, specs, segments)


def _synchronize(tensor: torch.Tensor) -> None:
    """Waits for the kernels writing ``tensor`` (another process reads it through IPC)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class IPCWeightPusher(_LMDeployPusher):
    """``POST /update_weights`` with CUDA IPC handles: the trainer and the server share the GPU.

    ``devices`` holds one device per server TP rank (rank ``r`` opens the handle made on
    ``devices[r]``, which must be that rank's GPU); each gets its own copy of the bucket.
    """

    def __init__(self, server_url: str, expected: Mapping[str, Sequence[int]], *,
                 dtype: torch.dtype = torch.bfloat16, max_bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 sleep_level: int | None = 2, devices: Sequence[str | torch.device] = ("cuda",),
                 post: Post | None = None, api_key: str | None = None):
        super().__init__([server_url], expected, dtype=dtype, max_bucket_bytes=max_bucket_bytes,
                         sleep_level=sleep_level, post=post, api_key=api_key)
        if not devices:
            raise ValueError("devices: one device per server TP rank is needed")
        self.devices = [torch.device(d) for d in devices]

    def send(self, named: list[tuple[str, torch.Tensor]], finished: bool) -> int:
        """One segment; the flattened copies stay referenced until the server answered."""
        bucket = lmdeploy_utils().FlattenedTensorBucket(named_tensors=[(n, t.to(self.devices[0])) for n, t in named])
        flats = [bucket.get_flattened_tensor()]
        flats += [flats[0].to(device) for device in self.devices[1:]]
        for flat in flats:
            _synchronize(flat)
        payloads = [lmdeploy_utils().serialize_state_dict({"flattened_tensor": flat, "metadata": bucket.get_metadata()})
                    for flat in flats]
        self.servers[0].call("/update_weights", json={
            "serialized_named_tensors": payloads[0] if len(payloads) == 1 else payloads,
            "finished": finished, "load_format": "flattened_bucket"})
        return flats[0].numel() * flats[0].element_size()


def init_group_body(*, master_address: str, master_port: int, rank_offset: int, world_size: int,
                    group_name: str, backend: str) -> dict[str, Any]:
    """The ``/init_weights_update_group`` body of one server."""
    return {"master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}


def distributed_update_body(specs: Sequence[Any], group_name: str, finished: bool
                            ) -> dict[str, Any]:
    """The ``/update_weights_from_distributed`` body: names/dtypes/shapes in flattening order
    (``specs``: TensorSpecs or a bucket's FlattenedTensorMetadata)."""
    return {"names": [s.name for s in specs], "dtypes": [dtype_name(s.dtype) for s in specs],
            "shapes": [list(s.shape) for s in specs], "group_name": group_name,
            "load_format": "flattened_bucket", "finished": finished}


class NCCLWeightPusher(_LMDeployPusher):
    """A GPU trainer on another node broadcasting to one or more servers over NCCL.

    The trainer is rank 0 of group ``group_name``; server ``i`` with ``server_tp`` ranks joins as
    ranks ``1 + i*server_tp ...``. ``master_address:master_port`` must be reachable from the
    servers (the trainer hosts the rendezvous store). Call :meth:`connect` once, then
    :meth:`push` per update. Servers must run LMDeploy >= 0.14 with the Ray executor.
    """

    def __init__(self, server_urls: Sequence[str], expected: Mapping[str, Sequence[int]], *,
                 master_address: str, master_port: int, server_tp: int = 1,
                 group_name: str = "dirl_weight_update", backend: str = "nccl",
                 device: str | torch.device = "cuda", timeout_s: float = 600.0,
                 dtype: torch.dtype = torch.bfloat16, max_bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 sleep_level: int | None = 2, post: Post | None = None, api_key: str | None = None):
        super().__init__(server_urls, expected, dtype=dtype, max_bucket_bytes=max_bucket_bytes,
                         sleep_level=sleep_level, post=post, api_key=api_key)
        self.master_address = master_address
        self.master_port = master_port
        self.server_tp = server_tp
        self.group_name = group_name
        self.backend = backend
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.group: Any = None

    @property
    def world_size(self) -> int:
        return 1 + len(self.servers) * self.server_tp

    def init_bodies(self) -> list[dict[str, Any]]:
        """One ``/init_weights_update_group`` body per server."""
        return [init_group_body(master_address=self.master_address, master_port=self.master_port,
                                rank_offset=1 + i * self.server_tp, world_size=self.world_size,
                                group_name=self.group_name, backend=self.backend)
                for i in range(len(self.servers))]

    def connect(self) -> None:
        """Joins the group as rank 0 while the servers' (blocking) init requests are in flight."""
        def join() -> None:
            self.group = lmdeploy_utils().init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{self.master_address}:{self.master_port}",
                world_size=self.world_size, rank=0, group_name=self.group_name, timeout=self.timeout)

        _concurrently([functools.partial(server.call, "/init_weights_update_group", json=body)
                       for server, body in zip(self.servers, self.init_bodies())], meanwhile=join)

    def begin(self) -> None:
        if self.group is None:
            raise RuntimeError("NCCLWeightPusher: call connect() before pushing")
        super().begin()

    def send(self, named: list[tuple[str, torch.Tensor]], finished: bool) -> int:
        """One segment: its request to every server, and one broadcast of the flattened bucket."""
        bucket = lmdeploy_utils().FlattenedTensorBucket(named_tensors=[(n, t.to(self.device)) for n, t in named])
        flat = bucket.get_flattened_tensor()
        body = distributed_update_body(bucket.get_metadata(), self.group_name, finished)
        _concurrently([functools.partial(server.call, "/update_weights_from_distributed", json=body)
                       for server in self.servers],
                      meanwhile=lambda: dist.broadcast(flat, src=0, group=self.group))
        return flat.numel() * flat.element_size()


# ------------------------------------------------------------------------------ agents
def manifest_body(specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The ``/update/begin`` body: every tensor of the update, checked by the agent first."""
    return {"tensors": {s.name: {"shape": list(s.shape), "dtype": dtype_name(s.dtype)}
                        for s in specs}}


def _chunks(segments: Sequence[Segment], tensors: Iterator[tuple[str, torch.Tensor]]
            ) -> Iterator[bytes]:
    """Each segment's tensors as safetensors bytes."""
    for segment in segments:
        yield safetensors.torch.save({name: t.cpu().contiguous()
                                      for name, t in _take(segment, tensors)})


def _prefetched(items: Iterator[T]) -> Iterator[T]:
    """``items``, the next one computed in a background thread while the caller uses this one."""
    done = object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next, items, done)
        while (item := future.result()) is not done:
            future = pool.submit(next, items, done)
            yield item


def push_to_agents(params: nnx.State, agent_urls: Sequence[str], *,
                   dtype: torch.dtype = torch.bfloat16, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   post: Post | None = None, api_key: str | None = None) -> dict[str, float]:
    """Sends ``params`` to every :mod:`torch_bridge.agent` concurrently: the manifest
    (``/update/begin``, checked by each agent against its server), then safetensors chunks
    (``/update/chunk?finished=0|1``; the next one is built while the current one is posted).
    Returns ``{bytes, seconds, gb_per_s, tensors, segments}`` (bytes counted once)."""
    start = time.perf_counter()
    if not agent_urls:
        raise ValueError("agent_urls: at least one agent is needed")
    agents = [_Endpoint(url, transport(post, api_key)) for url in agent_urls]
    specs = param_specs(params, dtype)
    segments = plan_buckets(specs, max_chunk_bytes)
    _concurrently([functools.partial(a.call, "/update/begin", json=manifest_body(specs))
                   for a in agents])
    chunks = _prefetched(_chunks(segments, named_tensors(params, dtype)))
    for segment, data in zip(segments, chunks, strict=True):
        _concurrently([functools.partial(a.call, "/update/chunk", data=data,
                                         params={"finished": int(segment.finished)})
                       for a in agents])
    return _stats(sum(s.nbytes for s in segments), start, specs, segments)


# ------------------------------------------------------------------------------ from a config
class AgentPusher:
    """``push`` sends to receiver agents (:func:`push_to_agents`): trainers far from the GPUs."""

    def __init__(self, agent_urls: Sequence[str], **kwargs: Any):
        self.agent_urls, self.kwargs = list(agent_urls), kwargs

    def push(self, params: nnx.State) -> dict[str, float]:
        return push_to_agents(params, self.agent_urls, **self.kwargs)


class EveryServer:
    """One pusher per co-located server (server ``i`` on local GPU ``i``, DiRL's layout)."""

    def __init__(self, pushers: Sequence[Any]):
        self.pushers = list(pushers)

    def push(self, params: nnx.State) -> list[dict[str, float]]:
        return [pusher.push(params) for pusher in self.pushers]


def make_weight_pusher(spec: str, server_urls: Sequence[str], model_dir: str,
                       api_key: str | None = None) -> Any:
    """The pusher a config names: ``ipc`` (servers on this node, server ``i`` on ``cuda:i``),
    ``nccl:HOST:PORT`` (GPU trainer on another node; rendezvous at HOST:PORT) or
    ``agents:URL[,URL...]`` (receiver agents next to the servers, e.g. from a TPU pod).
    ``model_dir`` is the served model, whose parameter names and shapes every push is checked
    against; every request carries ``api_key`` (servers and agents)."""
    kind, _, rest = spec.partition(":")
    if kind == "agents":
        return AgentPusher([u.strip() for u in rest.split(",") if u.strip()], api_key=api_key)
    expected = expected_shapes(model_dir)
    if kind == "ipc" and not rest:
        return EveryServer([IPCWeightPusher(url, expected, devices=(f"cuda:{i}",), api_key=api_key)
                            for i, url in enumerate(server_urls)])
    if kind == "nccl" and rest.count(":") == 1:
        host, port = rest.split(":")
        pusher = NCCLWeightPusher(server_urls, expected, master_address=host, master_port=int(port),
                                  api_key=api_key)
        pusher.connect()
        return pusher
    raise ValueError(f"weight_push: expected 'ipc', 'nccl:HOST:PORT' or 'agents:URL[,URL...]', "
                     f"got {spec!r}")

"""Receiver agent: runs on each GPU rollout node beside its LMDeploy server and takes weight
updates over HTTP from a remote trainer (e.g. a TPU pod, see
:func:`torch_bridge.weight_push.push_to_agents`), pushing them into the server through CUDA IPC
(:class:`~torch_bridge.weight_push.IPCWeightPusher`: sleep/wakeup once per update).

    DIRL_API_KEY=... python -m torch_bridge.agent --server http://127.0.0.1:23333 \
        --model-dir /models/sdar-8b --host 0.0.0.0

Every request needs ``Authorization: Bearer <key>`` (401 otherwise, nothing read or changed): the
key comes from ``$DIRL_API_KEY`` (``--api-key-env``) or ``--api-key-file``, and is also sent to the
co-located server (launched with the same key). Without a key the agent refuses to start unless
``--insecure``. It binds loopback unless ``--host`` says otherwise.

Protocol, one update at a time:

* ``POST /update/begin`` JSON ``{"tensors": {name: {"shape": [...], "dtype": "bfloat16"}}}``:
  the manifest, checked against the server's parameters (400 with the list of problems,
  before anything reaches the server); then the server is put to sleep with its weights awake.
* ``POST /update/chunk?finished=0|1`` body: safetensors bytes. Each chunk is checked against the
  manifest (400, nothing of it pushed), moved to the GPU, cast to ``--dtype`` and pushed; the
  ``finished=1`` chunk must complete the manifest and wakes the KV cache up.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.torch
import torch
from aiohttp import web
from safetensors import SafetensorError

from torch_bridge.auth import DEFAULT_KEY_ENV, check_serving, read_api_key, require_bearer
from torch_bridge.weight_push import (DEFAULT_BUCKET_BYTES, DEFAULT_CHUNK_BYTES, IPCWeightPusher, Pusher,
                                      ServerError, TensorSpec, WeightNameError, check_names, dtype_name,
                                      expected_shapes, parse_dtype, plan_buckets, send_segments)

HEADER_ALLOWANCE = 1 << 20  # a chunk's safetensors header (names, shapes, offsets)
Handler = Callable[[Any, web.Request], Awaitable[web.Response]]


def parse_manifest(body: Any) -> dict[str, TensorSpec]:
    """The ``/update/begin`` body as name -> TensorSpec (ValueError naming the bad entry)."""
    tensors = body.get("tensors") if isinstance(body, dict) else None
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError('manifest: expected {"tensors": {name: {"shape": [...], "dtype": ...}}}')
    manifest = {}
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"manifest: tensor {name!r}: expected "
                             f'{{"shape": [non-negative int, ...], "dtype": str}}, got {entry!r}')
        try:
            dtype = parse_dtype(str(entry.get("dtype")))
        except ValueError as e:
            raise ValueError(f"manifest: tensor {name!r}: {e}") from e
        manifest[name] = TensorSpec(name, tuple(shape), dtype)
    return manifest


def check_chunk(tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, TensorSpec],
                received: set[str], finished: bool) -> None:
    """WeightNameError unless ``tensors`` are new manifest entries of the declared shapes and
    dtypes, and (``finished``) they complete the manifest."""
    check_names(itertools.chain(((name, manifest[name].shape) for name in received),
                                ((name, t.shape) for name, t in tensors.items())),
                {name: spec.shape for name, spec in manifest.items()},
                require_all=finished, against="the update's manifest")
    wrong = [f"{name} is {dtype_name(t.dtype)}, the manifest says {dtype_name(manifest[name].dtype)}"
             for name, t in tensors.items() if t.dtype != manifest[name].dtype]
    if wrong:
        raise WeightNameError("tensor dtypes do not match the update's manifest: " + "; ".join(wrong))


def _errors_as_http(handler: Handler) -> Handler:
    """For a handler method: bad input -> 400, a failing server -> 502, with the error as text."""
    @functools.wraps(handler)
    async def wrapped(self: Any, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except (ValueError, SafetensorError) as e:  # WeightNameError, JSON errors included
            return web.Response(status=400, text=f"rejected, nothing pushed: {e}")
        except ServerError as e:
            return web.Response(status=502, text=f"the LMDeploy server failed: {e}")
    return wrapped


class WeightReceiver:
    """The agent's state: the open update's manifest and the names received so far."""

    def __init__(self, pusher: Pusher, expected: Mapping[str, Sequence[int]], *,
                 device: str | torch.device, dtype: torch.dtype | None,
                 max_bucket_bytes: int = DEFAULT_BUCKET_BYTES, require_all: bool = True):
        self.pusher = pusher
        self.expected = dict(expected)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_bucket_bytes = max_bucket_bytes
        self.require_all = require_all
        self._manifest: dict[str, TensorSpec] | None = None
        self._received: set[str] = set()
        self._lock = asyncio.Lock()

    @_errors_as_http
    async def begin(self, request: web.Request) -> web.Response:
        """Checks the manifest against the server's parameters, then starts the update
        (an update still open is abandoned)."""
        manifest = parse_manifest(await request.json())
        check_names([(s.name, s.shape) for s in manifest.values()], self.expected,
                    require_all=self.require_all)
        async with self._lock:
            self._manifest = None
            await asyncio.to_thread(self.pusher.begin)
            self._manifest, self._received = manifest, set()
        return web.json_response({"tensors": len(manifest)})

    @_errors_as_http
    async def chunk(self, request: web.Request) -> web.Response:
        """Checks one safetensors chunk against the manifest and pushes it."""
        finished = request.query.get("finished", "0").lower() in ("1", "true")
        async with self._lock:
            if self._manifest is None:
                return web.Response(status=409, text="no update in progress: POST /update/begin first")
            tensors = await asyncio.to_thread(safetensors.torch.load, await request.read())
            check_chunk(tensors, self._manifest, self._received, finished)
            try:
                nbytes = await asyncio.to_thread(self._push, tensors, finished)
            except BaseException:
                self._manifest = None  # the server's state is unknown: start over with begin
                raise
            self._received.update(tensors)
            if finished:
                self._manifest = None
        return web.json_response({"tensors": len(tensors), "bytes": nbytes, "finished": finished})

    def _push(self, tensors: Mapping[str, torch.Tensor], finished: bool) -> int:
        """Moves/casts the tensors segment by segment and pushes them; bytes pushed."""
        specs = [TensorSpec(name, tuple(t.shape), self.dtype or t.dtype)
                 for name, t in tensors.items()]
        dtypes = {spec.name: spec.dtype for spec in specs}
        segments = plan_buckets(specs, self.max_bucket_bytes, finished=finished)
        moved = ((name, tensors[name].to(self.device, dtypes[name]))
                 for segment in segments for name in segment.names)
        nbytes = send_segments(self.pusher, segments, moved)
        if finished:
            self.pusher.end()
        return nbytes


def max_request_bytes(expected: Mapping[str, Sequence[int]]) -> int:
    """The largest chunk a trainer sends: a full chunk (``push_to_agents``' default) or one tensor
    alone, as fp32, whichever is larger, plus its header."""
    largest = max((4 * int(np.prod(shape)) for shape in expected.values()), default=0)
    return max(DEFAULT_CHUNK_BYTES, largest) + HEADER_ALLOWANCE


def create_app(receiver: WeightReceiver, *, api_key: str | None,
               max_request_bytes: int) -> web.Application:
    """The agent's routes; with ``api_key`` every request must carry it (:func:`require_bearer`)."""
    app = web.Application(client_max_size=max_request_bytes,
                          middlewares=[require_bearer(api_key)] if api_key else [])
    app.add_routes([web.post("/update/begin", receiver.begin),
                    web.post("/update/chunk", receiver.chunk)])
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torch_bridge.agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the co-located LMDeploy server's URL")
    parser.add_argument("--model-dir", required=True,
                        help="the HF model directory the server was launched from (its config.json "
                             "gives the parameter names and shapes updates are checked against)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; 0.0.0.0 for a trainer on another machine)")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--api-key-env", default=DEFAULT_KEY_ENV,
                        help="environment variable holding the shared key (default %(default)s)")
    parser.add_argument("--api-key-file", default=None, help="file holding the shared key (wins over the variable)")
    parser.add_argument("--insecure", action="store_true",
                        help="accept requests without a key (anyone who reaches the port can replace the weights)")
    parser.add_argument("--dtype", default="bfloat16",
                        help="dtype pushed into the server (received tensors are cast on the GPU)")
    parser.add_argument("--max-bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES)
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="largest request body (default: a chunk or the model's largest tensor "
                             "as fp32, whichever is larger, plus 1 MiB)")
    parser.add_argument("--sleep-level", type=int, choices=(0, 1, 2), default=2,
                        help="/sleep level per update (0: update in place, no sleep/wakeup, "
                             "so the KV cache is not reset: not with a server that caches prefixes, "
                             "LMDeploy issue #4917; 2: every parameter must be pushed)")
    parser.add_argument("--tp", type=int, default=1,
                        help="the server's TP size; TP rank r must run on cuda:r of this agent")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        api_key = read_api_key(env=args.api_key_env, file=args.api_key_file)
        check_serving(args.host, api_key, insecure=args.insecure, what="torch_bridge.agent",
                      env=args.api_key_env)
    except ValueError as e:
        raise SystemExit(f"torch_bridge.agent: error: {e}") from None
    if not torch.cuda.is_available():
        raise SystemExit("torch.cuda is not available: the agent must run on its server's GPU node")
    dtype = parse_dtype(args.dtype)
    expected = expected_shapes(args.model_dir)
    devices = [f"cuda:{rank}" for rank in range(args.tp)]
    sleep_level = args.sleep_level or None
    pusher = IPCWeightPusher(args.server, expected, dtype=dtype,
                             max_bucket_bytes=args.max_bucket_bytes, sleep_level=sleep_level,
                             devices=devices, api_key=api_key)
    receiver = WeightReceiver(pusher, expected, device=devices[0], dtype=dtype,
                              max_bucket_bytes=args.max_bucket_bytes, require_all=sleep_level == 2)
    web.run_app(create_app(receiver, api_key=api_key,
                           max_request_bytes=args.max_request_bytes or max_request_bytes(expected)),
                host=args.host, port=args.port)


if __name__ == "__main__":
    main()

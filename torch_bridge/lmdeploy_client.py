"""A rollout engine backed by LMDeploy api_servers running DiRL's patched dLLM engine.

The servers decode with LMDeploy's block-diffusion engine (LMDEPLOY.md §1) and, with DiRL's fork
of LMDeploy 0.10.1, return for every prompt the generated ``token_ids``, their ``step_map`` and the
server-side ``input_ids`` (LMDEPLOY.md §2.6). Upstream LMDeploy (0.18 included) returns none of
these; the engine-side step map is InternLM/lmdeploy PR #4057, open and without the HTTP part.

Requests follow DiRL's ``sample_api.py`` (DIRL_SPEC §2.2): ``POST {server}/v1/completions`` with
a list of already-templated prompt strings, ``stop`` strings and ``skip_special_tokens=false``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

import aiohttp
import numpy as np
from transformers import PreTrainedTokenizerBase

from dirl_jax.data.tokenizer import load_tokenizer
from dirl_jax.rollout.sampler import SamplingConfig, response_stats
from torch_bridge.auth import DEFAULT_KEY_ENV, bearer_header, read_api_key

logger = logging.getLogger(__name__)

FORK_HINT = ("this client needs DiRL's patched LMDeploy (the lmdeploy 0.10.1 fork vendored in "
             "OpenMOSS/DiRL); upstream LMDeploy (0.18 included) returns no step maps over HTTP, "
             "see InternLM/lmdeploy PR #4057")
T = TypeVar("T")


class RolloutError(RuntimeError):
    """The servers could not produce a validated result for every prompt."""


class ResponseValidationError(RolloutError):
    """A server answered, but its response breaks the protocol (not retried)."""


class _ServerFailure(Exception):
    """A failed attempt that another try, or another server, may fix."""


class WeightPusher(Protocol):
    """Pushes trainer parameters into the running servers (``torch_bridge.weight_push``)."""

    def push(self, params: Any) -> None: ...


@dataclasses.dataclass
class _Server:
    url: str
    model: str | None = None
    outstanding: int = 0
    failures: int = 0            # consecutive failed attempts
    ready_at: float = 0.0        # loop time before which it gets no new request (backoff)
    dead: bool = False
    last_error: str | None = None


class _ServerPool:
    """Least-outstanding-requests choice among live servers; a server that fails ``max_failures``
    times in a row is dead for the rest of the call, one that just failed backs off exponentially."""

    def __init__(self, servers: list[_Server], max_failures: int, backoff_s: float):
        self.servers, self.max_failures, self.backoff_s = servers, max_failures, backoff_s

    async def acquire(self) -> _Server:
        loop = asyncio.get_running_loop()
        while True:
            live = [s for s in self.servers if not s.dead]
            if not live:
                raise RolloutError(f"every LMDeploy server failed: {self.summary()}")
            ready = [s for s in live if s.ready_at <= loop.time()]
            if ready:
                server = min(ready, key=lambda s: s.outstanding)
                server.outstanding += 1
                return server
            await asyncio.sleep(min(s.ready_at for s in live) - loop.time())

    def release(self, server: _Server, error: str | None) -> None:
        server.outstanding -= 1
        if error is None:
            server.failures = 0
            return
        server.failures += 1
        server.last_error = error
        server.ready_at = asyncio.get_running_loop().time() + self.backoff_s * 2 ** (server.failures - 1)
        server.dead = server.dead or server.failures >= self.max_failures
        logger.warning("LMDeploy server %s failed (%d in a row%s): %s", server.url, server.failures,
                       ", now dead" if server.dead else "", error)

    def summary(self) -> str:
        return "; ".join(f"{s.url} ({'dead' if s.dead else 'alive'}, last error: {s.last_error})"
                         for s in self.servers)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Prompts ``start .. start + len(ids) - 1`` of one ``generate`` call, sent as one request."""

    start: int
    ids: list[list[int]]
    texts: list[str]


def parse_servers(servers: str | Sequence[str]) -> list[str]:
    """Base URLs from a comma-separated string or a sequence (trailing ``/`` dropped, deduplicated)."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    urls = list(dict.fromkeys(u.strip().rstrip("/") for u in items if u.strip()))
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if not urls or bad:
        raise ValueError(f"servers: need http(s) base URLs, got {servers!r}")
    return urls


def step_map_problem(step_map: Sequence[int], prompt_length: int, block_size: int) -> str | None:
    """Why ``step_map`` cannot come from LMDeploy's block decoder, or None (LMDEPLOY.md §1.7).

    Blocks are aligned at prompt position 0 and the fork returns whole blocks; steps are 1-based,
    global over the response and counted only by forwards that commit tokens, so they take every
    value ``1..n``, and every step of a block precedes every step of the next block.
    """
    steps = np.asarray(step_map, np.int64)
    if steps.size == 0:
        return "empty response"
    if (steps < 1).any():
        return f"steps must be >= 1, got {steps.min()}"
    if (prompt_length + steps.size) % block_size:
        return (f"prompt ({prompt_length}) + response ({steps.size}) tokens is not a whole number of "
                f"blocks of {block_size}: the server's --dllm-block-length differs, or it truncates blocks")
    blocks = (prompt_length + np.arange(steps.size)) // block_size
    starts = np.flatnonzero(np.r_[True, np.diff(blocks) > 0])
    if (np.minimum.reduceat(steps, starts)[1:] <= np.maximum.reduceat(steps, starts)[:-1]).any():
        return f"a block of {block_size} has steps not after all steps of the previous block"
    if not np.array_equal(np.unique(steps), np.arange(1, steps.max() + 1)):
        return "steps do not take every value 1..n"
    return None


def response_result(token_ids: list[int], step_map: list[int], prompt_length: int, block_size: int,
                    stop_ids: Sequence[int]) -> dict[str, Any]:
    """A validated response as :func:`dirl_jax.rollout.decoder.decode_prompts` reports it.

    ``logprobs`` is None: LMDeploy's dLLM log-probs are broken (InternLM/lmdeploy issue #4206), so
    DiPO must recompute the old log-probs with the trainer. ``finish_reason`` is ``stop`` iff a
    stop id occurs (the server's own is unreliable with whole-block output) and ``length`` counts
    tokens up to and including the first one. ``num_forwards`` is an estimate from LMDeploy's
    schedule (LMDEPLOY.md §1.3): one forward per step (prefill is the first step), one commit
    forward between blocks, and one more prefill forward when the prompt fills whole blocks;
    chunked prefill of long prompts is not counted.
    """
    stats = response_stats(token_ids, step_map, stop_ids)
    num_blocks = (prompt_length + len(token_ids)) // block_size - prompt_length // block_size
    return {
        "token_ids": token_ids, "step_map": step_map, "logprobs": None, **stats,
        "finish_reason": "stop" if set(token_ids) & set(stop_ids) else "length",
        "num_forwards": stats["num_steps"] + num_blocks - 1 + int(prompt_length % block_size == 0),
    }


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Runs a coroutine to completion on a fresh event loop, in a helper thread when the calling
    thread already runs one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


async def _first_error_gather(coros: Sequence[Awaitable[T]]) -> list[T]:
    """``gather`` that cancels the remaining work as soon as one coroutine raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LMDeployEngine:
    """The :class:`dirl_jax.rollout.engine.RolloutEngine` of a set of LMDeploy api_servers.

    ``served`` holds the decoding settings the servers were launched with (``--dllm-block-length``,
    ``--dllm-unmasking-strategy``, ``--dllm-confidence-threshold``, ``--dllm-denoising-steps``):
    LMDeploy has no per-request dLLM settings (the fork's ``dllm_confidence_threshold`` field has no
    effect), so ``generate`` refuses a :class:`SamplingConfig` whose block size, strategy,
    threshold or denoising steps differ from them.

    Prompts go out in requests of at most ``request_batch`` (fewer when needed to give every server
    work), at most ``concurrency`` in flight, each to the live server with the fewest outstanding
    requests. A failed attempt (connection error, HTTP 5xx, timeout after ``timeout_s``, malformed
    JSON) is retried up to ``retries`` times on the best server; a server that fails
    ``retries + 1`` times in a row is dead for the rest of the call, and after each failure it
    backs off ``backoff_s * 2**(failures - 1)`` seconds. HTTP 4xx and invalid responses are not
    retried. Every prompt gets a validated result or the call raises :class:`RolloutError`.

    Every request (generation, ``/sleep``, ``/wakeup``, weight updates) carries ``Authorization:
    Bearer`` with ``api_key``, else the key in ``$api_key_env`` (``DIRL_API_KEY``) when it is set.

    ``update_weights`` hands the parameters to ``weight_pusher``, or to the pusher that
    ``weight_push`` names (``ipc`` / ``nccl:HOST:PORT`` / ``agents:URL,...``, see
    :func:`torch_bridge.weight_push.make_weight_pusher`) for the model served from ``model_dir``.
    """

    def __init__(self, servers: str | Sequence[str], *, tokenizer: str | PreTrainedTokenizerBase,
                 model_name: str | None = None, served: SamplingConfig, request_batch: int = 256,
                 concurrency: int = 16,
                 timeout_s: float = 3000, retries: int = 3, backoff_s: float = 1.0,
                 api_key: str | None = None, api_key_env: str = DEFAULT_KEY_ENV,
                 weight_pusher: WeightPusher | None = None, weight_push: str = "",
                 model_dir: str | None = None):
        checks = [("request_batch", request_batch, request_batch >= 1),
                  ("concurrency", concurrency, concurrency >= 1), ("timeout_s", timeout_s, timeout_s > 0),
                  ("retries", retries, retries >= 0), ("backoff_s", backoff_s, backoff_s >= 0)]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"{name}: invalid value {value!r}")
        self.servers = parse_servers(servers)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.model_name = model_name
        self.served = served
        self.request_batch, self.concurrency = request_batch, concurrency
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        api_key = api_key or read_api_key(env=api_key_env)
        self.headers = bearer_header(api_key)
        if weight_push and weight_pusher is None:  # from a config: see make_weight_pusher
            from torch_bridge.weight_push import make_weight_pusher
            if not model_dir:
                raise ValueError("model_dir: the served model directory is needed with weight_push "
                                 "(every push is checked against its parameter names and shapes)")
            weight_pusher = make_weight_pusher(weight_push, self.servers, model_dir, api_key)
        self.weight_pusher = weight_pusher

    # ---- RolloutEngine ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int, row_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One result per prompt, in prompt order, with the keys of ``decode_prompts`` (see
        :func:`response_result`: ``logprobs`` is None, ``num_forwards`` an estimate).

        ``seed`` and ``row_seeds`` are not sent: a request's seed applies to every prompt in it,
        so the k copies of a prompt would all get the same sample. LMDeploy draws its own seed per
        sequence; results are not reproducible.
        """
        self.check_sampling(sampling)
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: every prompt needs at least one token")
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds: need {len(prompts)}, got {len(row_seeds)}")
        texts = self._prompt_texts(prompts)
        size = min(self.request_batch, math.ceil(len(prompts) / len(self.servers)))
        batches = [_Batch(i, prompts[i:i + size], texts[i:i + size]) for i in range(0, len(prompts), size)]
        payload = self._payload(sampling)
        return _run_sync(lambda: self._generate(batches, payload, sampling))

    def update_weights(self, params: Any) -> None:
        """Hands ``params`` to the ``weight_pusher`` given at construction."""
        if self.weight_pusher is None:
            raise RuntimeError("LMDeployEngine.update_weights: no weight_pusher was given; construct "
                               "the engine with weight_pusher=<object with push(params)> "
                               "(torch_bridge.weight_push)")
        self.weight_pusher.push(params)

    # ---- server control ---------------------------------------------------------------------------

    def sleep(self, level: int = 2) -> None:
        """``POST /sleep?level=`` on every server (1: weights to CPU, 2: weights discarded)."""
        self._control("POST", "/sleep", [("level", str(level))])

    def wakeup(self, tags: Sequence[str] = ()) -> None:
        """``POST /wakeup?tags=...`` on every server (``weights``, ``kv_cache``; none = all)."""
        self._control("POST", "/wakeup", [("tags", tag) for tag in tags])

    def health(self) -> dict[str, bool]:
        """Whether each server answers ``GET /v1/models`` with HTTP 2xx."""
        errors = _run_sync(lambda: self._call_all("GET", "/v1/models", []))
        return {url: error is None for url, error in zip(self.servers, errors)}

    # ---- request building and checks --------------------------------------------------------------

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Raises ``ValueError`` when ``sampling`` asks for what the servers cannot do per request."""
        served = self.served
        wanted = [("block_size", sampling.block_size, served.block_size),
                  ("strategy", sampling.strategy, served.strategy)]
        if served.strategy == "low_confidence_dynamic":
            wanted.append(("threshold", sampling.threshold, served.threshold))
        else:
            wanted.append(("denoising steps", sampling.denoising_steps, served.denoising_steps))
        problems = [f"{name} {asked!r} (servers: {served!r})"
                    for name, asked, served in wanted if asked != served]
        if problems:
            raise ValueError(f"SamplingConfig asks for {', '.join(problems)}; dLLM settings are LMDeploy "
                             "server launch flags (--dllm-block-length, --dllm-unmasking-strategy, "
                             "--dllm-confidence-threshold, --dllm-denoising-steps), not request fields")
        if sampling.min_new_tokens or sampling.banned_ids:
            raise ValueError("SamplingConfig min_new_tokens / banned_ids: LMDeploy's /v1/completions "
                             "(0.10.1 fork and 0.18) has no such request fields and would ignore them")

    def _prompt_texts(self, prompts: list[list[int]]) -> list[str]:
        """The prompt strings to send; each must tokenize back to its ids (the server re-tokenizes)."""
        texts = self.tokenizer.batch_decode(prompts, skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for index, (ids, again) in enumerate(zip(prompts, encoded)):
            if list(again) != ids:
                raise ValueError(f"prompt {index}: its ids do not survive decode -> encode "
                                 f"({ids[:16]}... -> {list(again)[:16]}...); the server would see "
                                 "other tokens")
        return texts

    def _stop_strings(self, stop_ids: Sequence[int]) -> list[str]:
        """Stop ids as the single-token strings LMDeploy's ``stop`` field accepts."""
        strings = []
        for token_id in stop_ids:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if self.tokenizer.encode(text, add_special_tokens=False) != [token_id]:
                raise ValueError(f"stop id {token_id} ({text!r}) is not a single-token string; "
                                 "LMDeploy's stop field takes only those")
            strings.append(text)
        return strings

    def _payload(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The request body without ``model`` and ``prompt`` (DIRL_SPEC §2.2)."""
        payload = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                   "max_tokens": sampling.max_new_tokens, "skip_special_tokens": False}
        if sampling.stop_ids:
            payload["stop"] = self._stop_strings(sampling.stop_ids)
        return payload

    # ---- async machinery --------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                     headers=self.headers,
                                     connector=aiohttp.TCPConnector(limit=self.concurrency))

    async def _generate(self, batches: list[_Batch], payload: dict[str, Any],
                        sampling: SamplingConfig) -> list[dict[str, Any]]:
        pool = _ServerPool([_Server(url) for url in self.servers], self.retries + 1, self.backoff_s)
        slots = asyncio.Semaphore(self.concurrency)
        async with self._session() as session:
            per_batch = await _first_error_gather(
                [self._run_batch(session, pool, slots, batch, payload, sampling) for batch in batches])
        return [result for results in per_batch for result in results]

    async def _run_batch(self, session: aiohttp.ClientSession, pool: _ServerPool, slots: asyncio.Semaphore,
                         batch: _Batch, payload: dict[str, Any], sampling: SamplingConfig) -> list[dict]:
        """Validated results of one batch, trying at most ``retries + 1`` times."""
        errors = []
        for _ in range(self.retries + 1):
            async with slots:
                server = await pool.acquire()
                error = None
                try:
                    body = {"model": await self._model(session, server), "prompt": batch.texts, **payload}
                    answer = await self._request(session, "POST", server, "/v1/completions", body)
                    return self._results(answer, batch, server, sampling)
                except _ServerFailure as exc:
                    error = str(exc)
                    errors.append(f"{server.url}: {exc}")
                finally:
                    pool.release(server, error)
        last = batch.start + len(batch.ids) - 1
        raise RolloutError(f"prompts {batch.start}..{last}: no valid response after {len(errors)} attempts "
                           f"({'; '.join(errors)}); servers: {pool.summary()}")

    async def _model(self, session: aiohttp.ClientSession, server: _Server) -> str:
        """The configured model name, else the first id the server lists at ``/v1/models``."""
        if self.model_name is not None:
            return self.model_name
        if server.model is None:
            listing = await self._request(session, "GET", server, "/v1/models", None)
            try:
                server.model = str(listing["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise _ServerFailure(f"/v1/models lists no model: {str(listing)[:200]}") from None
        return server.model

    async def _request(self, session: aiohttp.ClientSession, method: str, server: _Server, path: str,
                       body: dict[str, Any] | None) -> Any:
        """The decoded JSON answer; ``_ServerFailure`` for what a retry may fix, ``RolloutError`` for 4xx."""
        try:
            async with session.request(method, server.url + path, json=body) as response:
                status, text = response.status, await response.text()
        except TimeoutError:
            raise _ServerFailure(f"no answer within {self.timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise _ServerFailure(f"{type(exc).__name__}: {exc}") from None
        if status >= 500:
            raise _ServerFailure(f"HTTP {status}: {text[:200]}")
        if status >= 400:
            raise RolloutError(f"{server.url}{path} rejected the request: HTTP {status}: {text[:500]}")
        try:
            return json.loads(text)
        except ValueError:
            raise _ServerFailure(f"malformed JSON answer: {text[:100]!r}") from None

    # ---- response parsing ---------------------------------------------------------------------------

    def _results(self, body: Any, batch: _Batch, server: _Server, sampling: SamplingConfig) -> list[dict]:
        """One validated result per prompt of ``batch``, in order."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            raise _ServerFailure(f"answer has no 'choices' list: {str(body)[:200]}")
        return [self._choice_result(choice, batch.start + offset, ids, server, sampling)
                for offset, (choice, ids) in enumerate(zip(_by_index(choices, batch, server), batch.ids))]

    def _choice_result(self, choice: dict, index: int, prompt_ids: list[int], server: _Server,
                       sampling: SamplingConfig) -> dict[str, Any]:
        def invalid(problem: str) -> ResponseValidationError:
            return ResponseValidationError(f"prompt {index} from {server.url}: {problem}")

        if choice.get("finish_reason") in ("error", "abort"):
            raise _ServerFailure(f"prompt {index}: finish_reason {choice['finish_reason']!r}")
        missing = [k for k in ("token_ids", "step_map", "input_ids") if not isinstance(choice.get(k), list)]
        if missing:
            raise invalid(f"no {', '.join(missing)} in the answer: {FORK_HINT}")
        token_ids, step_map = [int(t) for t in choice["token_ids"]], [int(s) for s in choice["step_map"]]
        if [int(t) for t in choice["input_ids"]] != prompt_ids:
            raise invalid(f"server tokenized the prompt to {choice['input_ids'][:16]}..., "
                          f"not to the sent ids {prompt_ids[:16]}... (tokenizer mismatch?)")
        if len(step_map) != len(token_ids):
            raise invalid(f"step_map has {len(step_map)} entries for {len(token_ids)} tokens")
        problem = step_map_problem(step_map, len(prompt_ids), sampling.block_size)
        if problem:
            raise invalid(f"malformed step_map: {problem}")
        result = response_result(token_ids, step_map, len(prompt_ids), sampling.block_size, sampling.stop_ids)
        if result["finish_reason"] == "length" and len(token_ids) < sampling.max_new_tokens:
            raise invalid(f"{len(token_ids)} tokens (< max_new_tokens {sampling.max_new_tokens}) without a "
                          "stop id: the server stops on ids missing from stop_ids (generation_config eos?) "
                          "or capped max_tokens at its session length")
        return result

    async def _call_all(self, method: str, path: str, params: list[tuple[str, str]]) -> list[str | None]:
        """One request per server; the error of each (None when it answered 2xx)."""
        async def call(session: aiohttp.ClientSession, url: str) -> str | None:
            try:
                async with session.request(method, url + path, params=params,
                                           headers={"Content-Type": "application/json"}) as response:
                    text = await response.text()
                    return None if response.status < 300 else f"HTTP {response.status}: {text[:200]}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                return f"{type(exc).__name__}: {exc}"

        async with self._session() as session:
            return list(await asyncio.gather(*[call(session, url) for url in self.servers]))

    def _control(self, method: str, path: str, params: list[tuple[str, str]]) -> None:
        errors = _run_sync(lambda: self._call_all(method, path, params))
        failed = [f"{url}: {error}" for url, error in zip(self.servers, errors) if error]
        if failed:
            raise RolloutError(f"{method} {path} failed on {len(failed)} of {len(self.servers)} servers: "
                               + "; ".join(failed))


def _by_index(choices: list, batch: _Batch, server: _Server) -> list[dict]:
    """``choices`` ordered by their ``index``: exactly one per prompt of ``batch``."""
    count = len(batch.ids)
    indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
    if sorted(i for i in indices if isinstance(i, int)) != list(range(count)) or len(indices) != count:
        raise ResponseValidationError(
            f"{server.url} answered prompts {batch.start}..{batch.start + count - 1} with {len(choices)} "
            f"choices (indices {indices[:8]}...), need exactly one per prompt (indices 0..{count - 1})")
    return sorted(choices, key=lambda c: c["index"])

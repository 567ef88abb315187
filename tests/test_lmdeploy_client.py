"""torch_bridge.lmdeploy_client against local HTTP servers.

The servers here are a protocol double, not LMDeploy: small aiohttp apps on 127.0.0.1 that speak
the documented HTTP protocol of DiRL's patched LMDeploy (LMDEPLOY.md §2.2, §2.6) and decode with
a toy deterministic rule (see :meth:`Double.decode`), plus switchable faults.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Callable

import pytest
from aiohttp import web

from dirl_jax.data.toy import toy_tokenizer
from dirl_jax.rollout.sampler import SamplingConfig
from torch_bridge.auth import require_bearer
from torch_bridge.lmdeploy_client import LMDeployEngine, ResponseValidationError, RolloutError

BLOCK = 4
TOKENIZER = toy_tokenizer()
STOP_IDS = tuple(TOKENIZER.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
MASK_ID = TOKENIZER.mask_token_id


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def sampling(**kw: Any) -> SamplingConfig:
    base = dict(block_size=BLOCK, mask_token_id=MASK_ID, strategy="low_confidence_dynamic", threshold=0.9,
                max_new_tokens=8, temperature=1.0, top_k=50, stop_ids=STOP_IDS)
    return SamplingConfig(**{**base, **kw})


class Double:
    """One fake api_server. Faults: ``delay_s`` before answering, ``fail_after`` good completions
    then ``failure`` (``500`` | ``drop`` the connection | ``json`` garbage), ``corrupt`` to edit
    each answer body. With ``api_key`` every request needs it, as LMDeploy's ``--api-keys``."""

    def __init__(self, *, delay_s: float = 0.0, fail_after: int | None = None, failure: str = "500",
                 corrupt: Callable[[dict], None] | None = None, api_key: str | None = None):
        self.delay_s, self.fail_after, self.failure, self.corrupt = delay_s, fail_after, failure, corrupt
        self.api_key = api_key
        self.bodies: list[dict] = []
        self.control: list[tuple[str, list[tuple[str, str]], str]] = []

    @staticmethod
    def decode(text: str, max_tokens: int, stop: list[str]) -> tuple[list[int], list[int]]:
        """Response = the prompt's first character repeated; if the prompt contains a digit ``d``,
        token ``d`` is the first stop string and later ones are ``z``. Whole blocks (aligned at
        prompt position 0) until a block holds the stop token or ``max_tokens`` are reached;
        each block commits two tokens per step, left to right."""
        prompt_len = len(ids(text))
        digits = [int(c) for c in text if c.isdigit()]
        stop_at = digits[-1] if digits and stop else None
        target = max_tokens if stop_at is None else min(stop_at + 1, max_tokens)
        length = target + (-(prompt_len + target) % BLOCK)
        filler, stop_id, after = ids(text[0])[0], ids(stop[0])[0] if stop else None, ids("z")[0]
        tokens = [filler if stop_at is None or j < stop_at else stop_id if j == stop_at else after
                  for j in range(length)]
        step_map, step, done_in_block = [], 0, 0
        for j in range(length):
            if (prompt_len + j) % BLOCK == 0 or j == 0:
                done_in_block = 0
            if done_in_block % 2 == 0:
                step += 1
            done_in_block += 1
            step_map.append(step)
        return tokens, step_map

    def choice(self, index: int, text: str, body: dict) -> dict:
        tokens, step_map = self.decode(text, body["max_tokens"], body.get("stop") or [])
        last_is_stop = TOKENIZER.decode(tokens[-1:]) in (body.get("stop") or [])
        return {"index": index, "text": TOKENIZER.decode(tokens), "logprobs": None, "token_ids": tokens,
                "step_map": step_map, "input_ids": ids(text), "generation_time": 0.0,
                "finish_reason": "stop" if last_is_stop else "length"}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        number = len(self.bodies)
        await asyncio.sleep(self.delay_s)
        if self.fail_after is not None and number > self.fail_after:
            if self.failure == "drop":
                request.transport.abort()
                return web.Response()
            if self.failure == "json":
                return web.Response(text="{'choices': [", content_type="application/json")
            return web.Response(status=500, text="internal error")
        answer = {"id": "1", "object": "text_completion", "model": body["model"],
                  "choices": [self.choice(i, t, body) for i, t in enumerate(body["prompt"])]}
        if self.corrupt:
            self.corrupt(answer)
        return web.json_response(answer)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sdar-double", "object": "model"}]})

    async def record(self, request: web.Request) -> web.Response:
        self.control.append((request.path, list(request.query.items()), request.content_type))
        return web.json_response(None)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[require_bearer(self.api_key)] if self.api_key else [])
        app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models),
                        web.post("/sleep", self.record), web.post("/wakeup", self.record)])
        return app


class Host:
    """Runs doubles on one event loop in a background thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def start(self, double: Double) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))

        async def serve() -> None:
            runner = web.AppRunner(double.app(), shutdown_timeout=0.2)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self.runners.append(runner)

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop_all(self) -> None:
        async def cleanup() -> None:
            await asyncio.gather(*(runner.cleanup() for runner in self.runners))

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result()
        self.runners.clear()


@pytest.fixture(scope="module")
def host():
    host = Host()
    yield host
    host.loop.call_soon_threadsafe(host.loop.stop)
    host.thread.join()


@pytest.fixture
def serve(host):
    yield host.start
    host.stop_all()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def engine(servers, **kw: Any) -> LMDeployEngine:
    base = dict(tokenizer=TOKENIZER, model_name="sdar", served=sampling(), request_batch=2,
                concurrency=4, timeout_s=5, retries=2, backoff_s=0.01)
    return LMDeployEngine(servers, **{**base, **kw})


PROMPTS = ["a", "b3", "cc", "dd5", "e", "fff", "g1", "hhhh", "i6", "jj"]


def check_results(results: list[dict], texts: list[str], max_tokens: int = 8) -> None:
    """Results arrive in prompt order and follow the double's rule."""
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        assert set(result) == {"token_ids", "step_map", "logprobs", "length", "finish_reason", "num_steps",
                               "num_forwards", "tokens_per_step"}
        tokens, step_map = Double.decode(text, max_tokens, ["<|im_end|>"])
        assert result["token_ids"] == tokens and result["step_map"] == step_map
        assert result["token_ids"][0] == ids(text[0])[0]
        assert result["logprobs"] is None
        assert isinstance(result["num_forwards"], int) and isinstance(result["tokens_per_step"], float)


def test_happy_path_spreads_over_two_servers(serve):
    doubles = [Double(), Double()]
    urls = [serve(d) for d in doubles]
    client = engine(",".join(urls) + ",", model_name=None)
    prompt_ids = [ids(t) for t in PROMPTS]
    results = client.generate(prompt_ids, sampling(), seed=0)
    check_results(results, PROMPTS)
    assert all(d.bodies for d in doubles)
    bodies = doubles[0].bodies + doubles[1].bodies
    assert sorted(t for b in bodies for t in b["prompt"]) == sorted(PROMPTS)
    assert all(len(b["prompt"]) <= 2 for b in bodies)
    body = bodies[0]
    assert body["model"] == "sdar-double"   # resolved from /v1/models
    assert body["stop"] == ["<|im_end|>", "<|endoftext|>"] and body["skip_special_tokens"] is False
    assert (body["max_tokens"], body["top_k"], body["top_p"], body["temperature"]) == (8, 50, 1.0, 1.0)
    assert "seed" not in body
    assert client.generate(prompt_ids[:3], sampling(), seed=1) == results[:3]   # repeated calls work


def test_stop_token_sets_length_and_finish_reason(serve):
    client = engine([serve(Double())])
    stopped, capped = client.generate([ids("s3"), ids("n")], sampling(max_new_tokens=6), seed=0)
    # "s3": 2 prompt tokens + 6 = 2 blocks; token 3 is <|im_end|>, the block runs on with "z"
    assert TOKENIZER.decode(stopped["token_ids"]) == "sss<|im_end|>zz"
    assert stopped["step_map"] == [1, 1, 2, 2, 3, 3]
    assert (stopped["length"], stopped["finish_reason"], stopped["num_steps"]) == (4, "stop", 3)
    assert stopped["num_forwards"] == 3 + 2 - 1 and stopped["tokens_per_step"] == 2.0
    # "n": no stop; 1 + 7 tokens = 2 blocks, at least max_new_tokens
    assert (capped["length"], capped["finish_reason"], len(capped["token_ids"])) == (7, "length", 7)


def test_generate_works_inside_a_running_loop_and_threads(serve):
    client = engine([serve(Double())])

    async def inside_loop() -> list[dict]:
        return client.generate([ids("a")], sampling(), seed=0)

    expected = client.generate([ids("a")], sampling(), seed=0)
    assert asyncio.run(inside_loop()) == expected
    out: list = []
    thread = threading.Thread(target=lambda: out.append(client.generate([ids("a")], sampling(), seed=0)))
    thread.start()
    thread.join()
    assert out == [expected]


def _edit_choice(index: int, edit: Callable[[dict], None]) -> Callable[[dict], None]:
    def corrupt(answer: dict) -> None:
        for choice in answer["choices"]:
            if choice["index"] == index:
                edit(choice)
    return corrupt


@pytest.mark.parametrize("corrupt, message", [
    (_edit_choice(1, lambda c: c["step_map"].pop()), r"prompt 1 .*step_map has 5 entries for 6 tokens"),
    (_edit_choice(1, lambda c: c.pop("step_map")), r"prompt 1 .*no step_map.*PR #4057"),
    (_edit_choice(1, lambda c: c["input_ids"].append(5)), r"prompt 1 .*tokenized the prompt"),
    (_edit_choice(1, lambda c: c.update(step_map=[3, 3, 1, 1, 2, 2])), r"prompt 1 .*malformed step_map"),
    (_edit_choice(1, lambda c: c.update(step_map=[1, 1, 2, 2, 4, 4])), r"prompt 1 .*every value"),
    (_edit_choice(1, lambda c: c.update(token_ids=c["token_ids"][:4], step_map=c["step_map"][:4])),
     r"prompt 1 .*whole number of blocks"),
    (lambda answer: answer["choices"].pop(), r"2 choices .*exactly one per prompt"),
    (lambda answer: answer["choices"][1].update(index=0), r"exactly one per prompt"),
])
def test_invalid_answers_are_refused(serve, corrupt, message):
    double = Double(corrupt=corrupt)
    client = engine([serve(double)], request_batch=3)
    with pytest.raises(ResponseValidationError, match=message):
        client.generate([ids("aa"), ids("bb"), ids("cc")], sampling(max_new_tokens=6), seed=0)
    assert len(double.bodies) == 1   # protocol violations are not retried


def test_upstream_answer_without_fork_fields_names_the_fork(serve):
    def upstream(answer: dict) -> None:
        for choice in answer["choices"]:
            for key in ("token_ids", "step_map", "input_ids"):
                choice.pop(key)

    client = engine([serve(Double(corrupt=upstream))])
    with pytest.raises(ResponseValidationError, match="OpenMOSS/DiRL.*PR #4057"):
        client.generate([ids("a")], sampling(), seed=0)


def test_prompt_ids_that_do_not_round_trip_are_refused_before_sending(serve):
    double = Double()
    client = engine([serve(double)])
    spelled = [TOKENIZER.convert_tokens_to_ids(c) for c in "<|im_end|>"]   # re-encodes as one token
    with pytest.raises(ValueError, match="prompt 1: its ids do not survive"):
        client.generate([ids("a"), spelled], sampling(), seed=0)
    assert not double.bodies


def test_malformed_json_everywhere_raises(serve):
    double = Double(fail_after=0, failure="json")
    client = engine([serve(double)], retries=2)
    with pytest.raises(RolloutError, match="malformed JSON"):
        client.generate([ids("a")], sampling(), seed=0)
    assert len(double.bodies) == 3


def test_timeout_retries_then_other_server_takes_prompts(serve):
    slow, good = Double(delay_s=3.0), Double()
    client = engine([serve(slow), serve(good)], timeout_s=0.3, request_batch=1, concurrency=4)
    start = time.monotonic()
    results = client.generate([ids(t) for t in PROMPTS[:6]], sampling(), seed=0)
    assert time.monotonic() - start < 2.5
    check_results(results, PROMPTS[:6])
    assert slow.bodies and len(good.bodies) == 6


@pytest.mark.parametrize("failure", ["500", "drop", "json"])
def test_server_dying_mid_call_hands_prompts_over(serve, failure):
    dying, good = Double(fail_after=1, failure=failure), Double()
    client = engine([serve(dying), serve(good)], request_batch=1, concurrency=4)
    results = client.generate([ids(t) for t in PROMPTS], sampling(), seed=0)
    check_results(results, PROMPTS)
    assert len(dying.bodies) > 1 and len(good.bodies) == len(PROMPTS) - 1


def test_all_servers_dead_raises_within_bounded_time():
    urls = [closed_port_url(), closed_port_url()]
    client = engine(urls, retries=3, backoff_s=0.01, request_batch=1)
    start = time.monotonic()
    with pytest.raises(RolloutError) as error:
        client.generate([ids(t) for t in PROMPTS], sampling(), seed=0)
    assert time.monotonic() - start < 5
    assert all(url in str(error.value) for url in urls) and "Connect" in str(error.value)


def test_single_failing_server_gets_retries_plus_one_attempts(serve):
    double = Double(fail_after=0, failure="500")
    client = engine([serve(double)], retries=3, backoff_s=0.01)
    with pytest.raises(RolloutError, match="HTTP 500"):
        client.generate([ids("a")], sampling(), seed=0)
    assert len(double.bodies) == 4


@pytest.mark.parametrize("kw, message", [
    (dict(block_size=8), "block_size 8"),
    (dict(strategy="low_confidence_static"), "strategy"),
    (dict(threshold=0.5), "threshold 0.5"),
    (dict(min_new_tokens=2), "min_new_tokens"),
    (dict(banned_ids=(5,)), "banned_ids"),
])
def test_sampling_config_must_match_server_flags(kw, message):
    client = engine([closed_port_url()])
    with pytest.raises(ValueError, match=message):
        client.generate([ids("a")], sampling(**kw), seed=0)


def test_static_strategy_compares_denoising_steps():
    client = engine([closed_port_url()], served=sampling(strategy="low_confidence_static", steps=2))
    client.check_sampling(sampling(strategy="low_confidence_static", steps=2, threshold=0.1))
    with pytest.raises(ValueError, match="denoising steps 4"):
        client.check_sampling(sampling(strategy="low_confidence_static"))


def test_update_weights_delegates_to_the_pusher():
    class Pusher:
        def __init__(self):
            self.pushed: list = []

        def push(self, params: Any) -> None:
            self.pushed.append(params)

    pusher = Pusher()
    engine([closed_port_url()], weight_pusher=pusher).update_weights({"w": 1})
    assert pusher.pushed == [{"w": 1}]
    with pytest.raises(RuntimeError, match="weight_pusher"):
        engine([closed_port_url()]).update_weights({"w": 1})


def test_sleep_wakeup_and_health(serve):
    doubles = [Double(), Double()]
    client = engine([serve(d) for d in doubles])
    client.sleep(2)
    client.wakeup(["weights", "kv_cache"])
    for double in doubles:
        assert double.control == [
            ("/sleep", [("level", "2")], "application/json"),
            ("/wakeup", [("tags", "weights"), ("tags", "kv_cache")], "application/json")]
    dead = closed_port_url()
    assert engine([*client.servers, dead]).health() == {**{u: True for u in client.servers}, dead: False}
    with pytest.raises(RolloutError, match=dead):
        engine([dead]).sleep()

"""Shared fixtures: tiny random SDAR configs and the shared reference data directory."""

from __future__ import annotations

import gc
import os
import pathlib
import socket
import subprocess
import sys

# 8 CPU devices for the sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest
from flax import nnx

from dirl_jax.model import SDARConfig, SDARForCausalLM

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIRL_SHARED_DIR", REPO.parent / "shared"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], devices: int, processes: int = 1) -> list[str]:
    """``python -m MODULE ARGS`` as ``processes`` local processes of ``devices`` CPU devices each
    (JAX's CPU collectives between them); their standard outputs."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", module, *args,
         *([f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
           if processes > 1 else [])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)]
    finished = [proc.communicate(timeout=600) for proc in procs]
    failed = [f"process {i} (exit {proc.returncode}):\n{err[-3000:]}"
              for i, (proc, (_, err)) in enumerate(zip(procs, finished)) if proc.returncode]
    assert not failed, "\n".join(failed)
    return [out for out, _ in finished]


def train_cli(args: list[str], run_dir: pathlib.Path, devices: int, processes: int = 1) -> list[dict]:
    """``python -m dirl_jax.train ARGS`` (see :func:`launch`); the run's metrics.jsonl rows."""
    import json
    launch("dirl_jax.train", args, devices, processes)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(*, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 24,
                layers: int = 2, vocab: int = 61, block_size: int = 4, tied: bool = False,
                **kw) -> SDARConfig:
    """A random-sized SDAR config small enough for CPU tests (head_dim need not be hidden/heads)."""
    return SDARConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 4,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                      mask_token_id=vocab - 1, rope_theta=10_000.0, tie_word_embeddings=tied,
                      eos_token_id=vocab - 2, pad_token_id=vocab - 3, bos_token_id=vocab - 2, **kw)


def random_model(config: SDARConfig, seed: int, **kw) -> SDARForCausalLM:
    """A model whose norm scales are random too (so a dropped norm cannot go unnoticed)."""
    model = SDARForCausalLM(config, rngs=nnx.Rngs(seed), **kw)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-2].endswith("norm"):
            var.set_value((1.0 + 0.3 * rng.standard_normal(var.shape)).astype(var.dtype))
    return model


def save_toy_chat_model(directory: pathlib.Path, seed: int) -> pathlib.Path:
    """A tiny random SDAR model with the built-in chat tokenizer, saved as a HF directory."""
    import dataclasses

    from dirl_jax import save_model
    from dirl_jax.data import toy
    tokenizer = toy.toy_tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    config = dataclasses.replace(tiny_config(block_size=4, vocab=len(tokenizer)),
                                 mask_token_id=tokenizer.convert_tokens_to_ids(toy.MASK),
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.convert_tokens_to_ids(toy.IM_END))
    save_model(random_model(config, seed), config, directory / "model",
               tokenizer_dir=directory / "tokenizer", dtype="float32")
    return directory / "model"


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run, printed on failure for reproduction."""
    value = int(os.environ.get("DIRL_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


def memory_map_count() -> int:
    """How many memory mappings this process holds (0 where ``/proc`` has no maps file)."""
    maps = pathlib.Path("/proc/self/maps")
    return len(maps.read_bytes().splitlines()) if maps.exists() else 0


MAX_MAP_COUNT = pathlib.Path("/proc/sys/vm/max_map_count")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Releases a test module's compiled programs when it ends.

    Every XLA:CPU executable holds about three memory mappings (code, constants, data) for as long
    as a jit cache keeps it; the whole suite in one process compiles enough of them to pass
    Linux's per-process limit (``vm.max_map_count``, 65,530), after which XLA's compiler and
    allocator crash (SIGSEGV / SIGABRT at ~70 % of the suite) or, worse, compute garbage. The
    limit is checked too, so growth shows up as an error long before a crash."""
    yield
    jax.clear_caches()
    gc.collect()
    if MAX_MAP_COUNT.exists():
        limit = int(MAX_MAP_COUNT.read_text())
        held = memory_map_count()
        assert held < limit // 2, (
            f"{held} memory mappings still held after releasing this module's compiled programs "
            f"(limit vm.max_map_count = {limit}): something keeps executables alive")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared reference data not found at {SHARED} (set DIRL_SHARED_DIR)")
    return SHARED

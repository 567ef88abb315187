"""Accelerator acceptance check: kernels, an SFT step, rollouts and a DiPO update, in one process.

    python scripts/accelerator_check.py [--out DIR] [--sections NAME ...] [--budget-s 480]
        [--train-rows N] [--smoke]

Sections, in this order (``--sections`` picks some; each gets its share of ``--budget-s`` and
reports the work its time box left undone as skipped):

* ``peak``: the chip's bf16 matmul rate, measured (chained 8192^2 products): the denominator of
  every efficiency below, next to the vendor's dense bf16 peak where the chip is known.
* ``kernel_equality``: the platform kernel (GPU ``pallas_gpu``, TPU ``splash``; ``tiled`` too)
  against the dense ``reference`` (fp32, highest matmul precision), output and gradients, fp32 and
  bf16 inputs, on the SFT two-stream canvas (packed segments, odd lengths), the DiPO multi-round
  canvas and the decode shape (two blocks against a KV cache): ``max |kernel - reference| /
  max |reference|`` per tensor against ``TOLERANCE``. A kernel that fails is not timed below.
* ``kernel_speed``: the SDAR-8B attention shape (32 q / 8 kv heads, head_dim 128), bf16, canvas
  2n = 16k, 4k, 32k (the target's length first), forward and forward+backward; the platform
  kernel, ``tiled``, ``reference`` (where its dense scores fit) and PyTorch FlexAttention (CUDA)
  on the same mask; effective TFLOP/s on the non-empty tiles (``bench_attention.py``).
* ``train_step``: an SDAR-1.7B-shaped model (random init, fp32 master weights, bf16 compute,
  remat) on the two-stream canvas at 2n = 8,192, the trainer's own step
  (:func:`dirl_jax.trainers.steps.make_train_step`: noising, chunked loss, clipping, AdamW) with
  the rows ``estimated_rows`` gives (halved on out-of-memory): tokens/s and MFU.
* ``rollout``: the same model in bf16, greedy dynamic unmasking (threshold 0.9), 64 random
  prompts of 64-256 tokens, 256-1,024 new tokens each: tokens/s, tokens per forward, forwards/s.
* ``dipo_update``: one micro-batch of the single-pass multi-round canvas (rows of 8,192 slots)
  through the trainer's :class:`~dirl_jax.trainers.steps.Updater`: scored and canvas tokens/s.

Writes ``DIR/accelerator_check.json`` and ``DIR/accelerator_check.md`` after every section (a
killed run keeps what it measured). Exit status 1 when a kernel fails equality or a section
raises. ``--smoke`` runs every section at tiny shapes on the CPU (Pallas kernels interpreted) in
under three minutes: the CI test that keeps this script working between accelerator leases.
Needs jax, flax, optax, numpy and ml_collections; torch only for the FlexAttention rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FlexAttention) shares the GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import bench_attention  # noqa: E402
import benchlib  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_dipo_step import step_map  # noqa: E402
from bench_train_step import BLOCK_SIZE, CONFIGS, make_batch, sdar_config, train_config  # noqa: E402
from flax import nnx  # noqa: E402

from dirl_jax import canvas as canvas_lib  # noqa: E402
from dirl_jax import dipo  # noqa: E402
from dirl_jax.attention import attention  # noqa: E402
from dirl_jax.config import dipo_defaults  # noqa: E402
from dirl_jax.mesh import make_mesh, on_mesh, sharded_model  # noqa: E402
from dirl_jax.model import SDARConfig, SDARForCausalLM  # noqa: E402
from dirl_jax.optim import make_optimizer  # noqa: E402
from dirl_jax.rollout.decoder import decode_prompts  # noqa: E402
from dirl_jax.rollout.sampler import SamplingConfig  # noqa: E402
from dirl_jax.trainers.steps import Updater, make_train_step  # noqa: E402

SECTIONS = ("peak", "kernel_equality", "kernel_speed", "train_step", "rollout", "dipo_update")
SHARE = {"peak": 0.04, "kernel_equality": 0.16, "kernel_speed": 0.30, "train_step": 0.22,
         "rollout": 0.16, "dipo_update": 0.12}  # of --budget-s
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # max |kernel - reference| / max |reference|
PLATFORM_KERNEL = {"gpu": "pallas_gpu", "tpu": "splash"}
# Dense bf16 peak FLOP/s by device-kind substring (vendor figures; the measured peak is the check's own).
VENDOR_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v6 lite": 918e12,
               "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}
SDAR_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the sections use: the real ones, or tiny ones for ``--smoke``."""

    peak_dim: int
    eq_heads: tuple[int, int, int]        # q heads, kv heads, head_dim
    eq_tokens: int                        # n of the two-stream canvas (2n slots)
    eq_window: int                        # KV-cache slots of the decode shape
    speed_heads: tuple[int, int, int]
    speed_lengths: tuple[int, ...]        # canvas lengths 2n
    model: dict[str, int]
    train_tokens: int                     # n per row (the canvas is 2n)
    prompts: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    repeats: int


FULL = Shapes(peak_dim=8192, eq_heads=(8, 2, 128), eq_tokens=1021, eq_window=1024,
              speed_heads=(32, 8, 128), speed_lengths=(16384, 4096, 32768), model=SDAR_1_7B,
              train_tokens=4096, prompts=64, prompt_len=(64, 256), new_tokens=(256, 1024), repeats=3)
SMOKE = Shapes(peak_dim=256, eq_heads=(4, 2, 32), eq_tokens=61, eq_window=64,
               speed_heads=(4, 2, 32), speed_lengths=(256,), model=CONFIGS["tiny"][0],
               train_tokens=64, prompts=4, prompt_len=(5, 12), new_tokens=(8, 16), repeats=1)


class TimeBox:
    """A section's deadline."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


@dataclasses.dataclass
class Context:
    shapes: Shapes
    platform: str
    kernel: str | None                    # the platform kernel (None: no accelerator kernel here)
    peak: float                           # measured bf16 FLOP/s (NaN until ``peak`` ran)
    train_rows: int | None
    results: dict[str, Any]
    mesh: jax.sharding.Mesh = dataclasses.field(default_factory=lambda: make_mesh((1, 1, 1), jax.devices()[:1]))


def is_out_of_memory(error: BaseException) -> bool:
    """An accelerator allocation failure (XLA's RESOURCE_EXHAUSTED or torch's OOM)."""
    return "RESOURCE_EXHAUSTED" in str(error) or type(error).__name__ == "OutOfMemoryError"


def seconds_of(run: Callable[[], Any], repeats: int) -> float:
    """Best of ``repeats`` calls (the caller warmed ``run`` up)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- peak
def measure_peak(ctx: Context, box: TimeBox) -> dict[str, Any]:
    """bf16 ``x @ w`` chained 16 times in one program (``w`` scaled so ``x`` stays O(1))."""
    n, chain = ctx.shapes.peak_dim, 16
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.bfloat16)
    w = (jax.random.normal(kw, (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
    chained = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
    jax.block_until_ready(chained(x, w))
    seconds = seconds_of(lambda: chained(x, w), max(3, ctx.shapes.repeats))
    ctx.peak = chain * 2 * n ** 3 / seconds
    kind = jax.devices()[0].device_kind
    vendor = next((v for k, v in VENDOR_PEAK.items() if k in kind), float("nan"))
    return {"rows": [{"matmul": f"{n}x{n} @ {n}x{n} bf16", "seconds": seconds / chain,
                      "measured_tflops": ctx.peak / 1e12, "vendor_tflops": vendor / 1e12,
                      "measured_of_vendor": ctx.peak / vendor}]}


# ----------------------------------------------------------------------------- kernel equality
def packed_two_stream(rng: np.random.Generator, rows: int, n: int, aligned: bool) -> canvas_lib.Canvas:
    """SFT rows of packed samples (odd lengths unless ``aligned``: whole blocks, for Splash) and
    a padded tail, each with a random half of its tokens masked in the noisy copy."""
    segment_ids = np.full((rows, n), canvas_lib.PADDING_SEGMENT, np.int32)
    positions = np.zeros((rows, n), np.int32)
    for r in range(rows):
        start, segment = 0, 0
        while start < n - n // 8:
            length = int(rng.integers(n // 6, n // 2)) | 1
            if aligned:
                length = -(-length // BLOCK_SIZE) * BLOCK_SIZE
            length = min(length, n - n // 8 - start)
            segment_ids[r, start:start + length] = segment
            positions[r, start:start + length] = np.arange(length)
            start, segment = start + length, segment + 1
    clean = rng.integers(0, 1000, (rows, n)).astype(np.int32)
    noisy = np.where(rng.random((rows, n)) < 0.5, 1000, clean)
    return canvas_lib.two_stream_canvas(clean, noisy, positions, segment_ids, BLOCK_SIZE)[0]


def dipo_canvas(rng: np.random.Generator, n: int) -> canvas_lib.Canvas:
    """Two rows of the single-pass multi-round canvas packed from random trajectories."""
    trajectories = []
    for _ in range(12):
        prompt = rng.integers(0, 1000, int(rng.integers(3, max(4, n // 8)))).tolist()
        response_len = BLOCK_SIZE * int(rng.integers(2, max(3, n // 32)))
        trajectories.append(dipo.Trajectory(prompt, rng.integers(0, 1000, response_len).tolist(),
                                            step_map(rng, response_len).tolist(), response_len))
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK_SIZE, mask_token_id=1000, row_length=n)
    return jax.tree.map(lambda x: x[:2], packed.canvas)


def decode_canvases(rng: np.random.Generator, rows: int, window: int
                    ) -> tuple[canvas_lib.Canvas, canvas_lib.Canvas]:
    """The fused decoding forward: two blocks (the commit and the block being denoised) of every
    row against ``window`` cache slots, of which a row sees those before its blocks' end."""
    ends = BLOCK_SIZE * rng.integers(3, window // BLOCK_SIZE + 1, rows)
    q_positions = (ends - 2 * BLOCK_SIZE)[:, None] + np.arange(2 * BLOCK_SIZE)[None]
    zeros = np.zeros_like(q_positions)
    q_canvas = canvas_lib.block_causal_canvas(zeros, q_positions, zeros, BLOCK_SIZE)
    slots = np.broadcast_to(np.arange(window), (rows, window))
    segment = np.where(slots < ends[:, None], 0, canvas_lib.PADDING_SEGMENT)
    return q_canvas, canvas_lib.block_causal_canvas(np.zeros_like(slots), slots, segment, BLOCK_SIZE)


def relative_errors(got: tuple[jax.Array, ...], want: tuple[jax.Array, ...]) -> dict[str, float]:
    """``max |got - want| / max |want|`` of the output and each gradient."""
    out = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        out[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    return out


def with_gradients(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, ...]]:
    """Jitted ``(q, k, v, d_out) -> (out, dq, dk, dv)``."""
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))
    return jax.jit(run)


def equality_kernels(ctx: Context) -> list[str]:
    """The platform kernel, TPU's schedule-driven kernel beside Splash (it runs the canvases
    Splash cannot), and ``tiled``."""
    companion = ("pallas_tpu",) if ctx.kernel == "splash" else ()
    return list(dict.fromkeys(k for k in (ctx.kernel, *companion, "tiled") if k))


def check_kernel_equality(ctx: Context, box: TimeBox) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    shapes = ctx.shapes
    heads, kv_heads, head_dim = shapes.eq_heads
    splash = ctx.kernel == "splash"
    n = -(-shapes.eq_tokens // 64) * 64 if splash else shapes.eq_tokens  # Splash: 2n a multiple of 128
    canvases = {"sft_two_stream": (packed_two_stream(rng, 2, n, splash), None),
                "dipo_multi_round": (dipo_canvas(rng, 2 * shapes.eq_tokens), None),
                "decode": decode_canvases(rng, 8, shapes.eq_window)}
    rows, status = [], "ok"
    for name, (q_canvas, kv_canvas) in canvases.items():
        kv_canvas = q_canvas if kv_canvas is None else kv_canvas
        batch, q_len = q_canvas.shape
        kv_len = kv_canvas.shape[1]
        base = [rng.standard_normal(s).astype(np.float32) for s in
                ((batch, q_len, heads, head_dim), (batch, kv_len, kv_heads, head_dim),
                 (batch, kv_len, kv_heads, head_dim), (batch, q_len, heads, head_dim))]
        layout = (canvas_lib.StreamMajorLayout(q_len // 2, BLOCK_SIZE, rounds=1)
                  if name == "sft_two_stream" and splash else None)

        def call(impl: str):
            return with_gradients(lambda q, k, v: attention(q, k, v, q_canvas=q_canvas, kv_canvas=kv_canvas,
                                                            impl=impl, layout=layout))
        reference = call("reference")
        for dtype in ("float32", "bfloat16"):
            inputs = [jnp.asarray(x, dtype) for x in base]
            with jax.default_matmul_precision("highest"):
                want = reference(*(x.astype(jnp.float32) for x in inputs))
            for kernel in equality_kernels(ctx):
                row = {"canvas": name, "dtype": dtype, "kernel": kernel, "q_len": q_len, "kv_len": kv_len,
                       "tolerance": TOLERANCE[dtype]}
                if kernel == "splash" and layout is None:
                    rows.append({**row, "result": "n/a (Splash needs a stream-major layout; auto runs pallas_tpu)"})
                    continue
                if box.left() <= 0:
                    rows.append({**row, "result": "skipped (time box)"})
                    status = "partial" if status == "ok" else status
                    continue
                errors = relative_errors(call(kernel)(*inputs), want)
                passed = max(errors.values()) <= TOLERANCE[dtype]
                rows.append({**row, **errors, "result": "pass" if passed else "FAIL"})
                if not passed:
                    status = "failed"
    return {"status": status, "rows": rows}


def kernel_verdicts(equality: dict[str, Any] | None) -> dict[str, str]:
    """Per kernel: ``pass`` when every canvas it ran on passed, ``FAIL`` when one failed,
    ``unchecked`` when the equality section did not (completely) run."""
    verdicts: dict[str, str] = {}
    for row in (equality or {}).get("rows", []):
        result = row.get("result", "")
        kernel = row["kernel"]
        if result == "FAIL":
            verdicts[kernel] = "FAIL"
        elif result.startswith("skipped") and verdicts.get(kernel) != "FAIL":
            verdicts[kernel] = "unchecked"
        elif result == "pass":
            verdicts.setdefault(kernel, "pass")
    return verdicts


# ----------------------------------------------------------------------------- kernel speed
def flex_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def time_kernels(ctx: Context, box: TimeBox) -> dict[str, Any]:
    heads, kv_heads, head_dim = ctx.shapes.speed_heads
    verdicts = kernel_verdicts(ctx.results.get("kernel_equality"))
    verdicts.update(reference="ground truth", flex_torch="not checked (PyTorch)")
    impls = [k for k in dict.fromkeys([ctx.kernel, "tiled", "reference"]) if k]
    if flex_available():
        impls.append("flex_torch")
    rows, status = [], "ok"
    for length in ctx.shapes.speed_lengths:
        n = length // 2
        rng = np.random.default_rng(length)
        q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, head_dim)), jnp.bfloat16)
                   for h in (heads, kv_heads, kv_heads))
        fraction = bench_attention.nonempty_fraction(bench_attention.two_stream(n, BLOCK_SIZE),
                                                     bench_attention.DEFAULT_TILES["tiled"])
        fwd_flops = 4 * heads * head_dim * length * length * fraction
        sides: dict[tuple[str, str], Callable[[], Any]] = {}
        for impl in impls:
            base = {"impl": impl, "seq_len": length, "nonempty_tile_fraction": fraction,
                    "equality": verdicts.get(impl, "unchecked")}
            if base["equality"] == "FAIL":
                rows.append({**base, "result": "not timed: failed kernel equality"})
                continue
            if box.left() <= 0:
                rows.append({**base, "result": "skipped (time box)"})
                status = "partial"
                continue
            if not bench_attention.fits_in_memory(impl, length, heads):
                rows.append({**base, "result": "skipped: dense scores do not fit"})
                continue
            try:
                runners = (bench_attention.flex_runners(q, k, v, n, BLOCK_SIZE) if impl == "flex_torch"
                           else bench_attention.jax_runners(impl, q, k, v, n, BLOCK_SIZE))
                for pass_name, run in runners.items():
                    jax.block_until_ready(run())  # compile and warm up
                    sides[impl, pass_name] = lambda run=run: jax.block_until_ready(run())
            except Exception as error:  # noqa: BLE001 - an out-of-memory side is a result
                if not is_out_of_memory(error):
                    raise
                rows.append({**base, "result": "out of memory"})
        for (impl, pass_name), t in benchlib.alternate(sides, ctx.shapes.repeats).items():
            flops = fwd_flops * (bench_attention.BACKWARD_FACTOR if pass_name == "fwd_bwd" else 1.0)
            rows.append({"impl": impl, "seq_len": length, "pass": pass_name, "seconds": t["min"],
                         "effective_tflops": flops / t["min"] / 1e12,
                         "of_measured_peak": flops / t["min"] / ctx.peak,
                         "nonempty_tile_fraction": fraction, "equality": verdicts.get(impl, "unchecked"),
                         "result": "timed"})
        sides.clear()
    if "flex_torch" in impls:
        import torch
        torch.cuda.empty_cache()  # JAX's sections after this one need the memory
    return {"status": status, "rows": rows}


# ----------------------------------------------------------------------------- training step
def model_for(ctx: Context, param_dtype: Any, remat: bool) -> SDARForCausalLM:
    """The random-init model, bf16 compute, built in place on the first device (as the trainers do)."""
    return sharded_model(lambda: SDARForCausalLM(sdar_config(ctx.shapes.model), rngs=nnx.Rngs(0),
                                                 dtype=jnp.bfloat16, param_dtype=param_dtype, remat=remat),
                         ctx.mesh)


def estimated_rows(config: SDARConfig, params: int, n: int) -> int:
    """Rows of 2n canvas tokens that should fit beside fp32 weights, gradients and AdamW state:
    half the free memory over ~(saved residuals + one layer's remat working set) per token,
    rounded down to a power of two."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return 2
    per_token = 2 * config.hidden_size * (config.num_hidden_layers + 8) + 12 * config.intermediate_size
    free = limit - 16 * params - 4 * 1024 * config.vocab_size * 4  # + the loss's vocabulary chunks
    rows = max(1, int(0.5 * free / (per_token * 2 * n)))
    return 1 << (rows.bit_length() - 1)


def model_flops(config: SDARConfig, rows: int, n: int) -> float:
    """Model FLOPs of one SFT step on ``rows`` two-stream rows of one sample each: 6 x weights x
    tokens for the layers (2n canvas tokens) and the vocabulary head (the n noisy tokens), plus
    3 x the attention products over the visible (query, key) pairs, ``b^2 m (m + 1)`` per head
    for ``m = n / b`` blocks. Remat's recomputation is not counted (MFU, not HFU)."""
    c = config
    layer = sum(a * b for a, b in benchlib.weight_shapes(c)[:7])
    blocks = n // BLOCK_SIZE
    pairs = BLOCK_SIZE ** 2 * blocks * (blocks + 1)
    attention_flops = 3 * 4 * c.num_attention_heads * c.head_dim * pairs * c.num_hidden_layers
    return rows * (6 * (layer * c.num_hidden_layers * 2 * n + c.hidden_size * c.vocab_size * n)
                   + attention_flops)


def memory_fields() -> dict[str, float]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"peak_gib": stats["peak_bytes_in_use"] / 2 ** 30, "limit_gib": stats["bytes_limit"] / 2 ** 30}


def time_train_step(ctx: Context, box: TimeBox) -> dict[str, Any]:
    n = ctx.shapes.train_tokens
    model = model_for(ctx, jnp.float32, remat=True)
    config = model.config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = ctx.train_rows or estimated_rows(config, params, n)
    tx_config = train_config("auto")
    while True:
        graphdef, state = nnx.split(model, nnx.Param)
        state = jax.tree.map(jnp.copy, state)  # the step donates them
        tx = make_optimizer(tx_config.train)
        step = make_train_step(graphdef, tx, tx_config, config)
        data = make_batch(config, rows, n, seed=0)
        batch = {k: jnp.asarray(v)[None] for k, v in data["batch"].items()}
        carry = {"params": state, "opt": on_mesh(tx.init(state), ctx.mesh)}

        def run():
            carry["params"], carry["opt"], metrics = step(carry["params"], carry["opt"], batch, data["key"])
            return metrics["loss"]
        try:
            start = time.perf_counter()
            first_loss = float(jax.block_until_ready(run()))
            first = time.perf_counter() - start
            break
        except Exception as error:  # noqa: BLE001 - halve the rows on out-of-memory
            if not is_out_of_memory(error) or rows == 1 or box.left() <= 0:
                raise
            print(f"train_step: {rows} rows do not fit; trying {rows // 2}", flush=True)
            rows //= 2
    repeats = ctx.shapes.repeats if box.left() > 0 else 0
    seconds = seconds_of(run, repeats) if repeats else first
    flops = model_flops(config, rows, n)
    ctx.train_rows = rows
    return {"status": "ok" if repeats else "partial", "rows": [{
        "params": params, "rows": rows, "canvas_len": 2 * n, "first_step_s": first,
        "seconds": seconds, "timed_steps": repeats, "tokens_per_s": rows * n / seconds,
        "canvas_tokens_per_s": rows * 2 * n / seconds, "model_tflops": flops / seconds / 1e12,
        "mfu_of_measured_peak": flops / seconds / ctx.peak, "first_loss": first_loss,
        **memory_fields()}]}


# ----------------------------------------------------------------------------- rollout
def time_rollout(ctx: Context, box: TimeBox) -> dict[str, Any]:
    s = ctx.shapes
    model = model_for(ctx, jnp.bfloat16, remat=False)
    config = model.config
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size - 3, int(rng.integers(*s.prompt_len) + 1)).tolist()
               for _ in range(s.prompts)]
    limits = (BLOCK_SIZE * rng.integers(s.new_tokens[0] // BLOCK_SIZE,
                                        s.new_tokens[1] // BLOCK_SIZE + 1, s.prompts)).tolist()
    cfg = SamplingConfig(block_size=BLOCK_SIZE, mask_token_id=config.mask_token_id, threshold=0.9,
                         strategy="low_confidence_dynamic", temperature=0.0, max_new_tokens=max(limits))

    def run() -> list[dict]:
        return decode_prompts(model, prompts, cfg, max_new_tokens=limits, pad_token_id=config.pad_token_id)
    start = time.perf_counter()
    results = run()
    first = time.perf_counter() - start
    timed = box.left() > first
    if timed:
        start = time.perf_counter()
        results = run()
    seconds = time.perf_counter() - start if timed else first
    tokens = sum(len(r["token_ids"]) for r in results)
    forwards = sum(r["num_forwards"] - 1 for r in results)  # without the prefill
    steps = sum(r["num_steps"] for r in results)  # denoising forwards that committed tokens
    return {"status": "ok" if timed else "partial", "rows": [{
        "prompts": len(prompts), "generated_tokens": tokens, "first_run_s": first,
        "seconds": seconds, "includes_compilation": not timed, "tokens_per_s": tokens / seconds,
        "tokens_per_forward": tokens / forwards, "tokens_per_step": tokens / steps,
        "row_forwards_per_s": forwards / seconds}]}


# ----------------------------------------------------------------------------- DiPO update
def dipo_micro_batch(config: SDARConfig, shapes: Shapes, rows: int, row_length: int
                     ) -> dict[str, np.ndarray]:
    """The first micro-batch (``rows`` canvas rows, full) of random trajectories: prompts of the
    longest prompt length, responses of ``shapes.new_tokens`` with ``step_map``'s decoding steps,
    advantages +-1."""
    rng = np.random.default_rng(0)
    trajectories = []
    # each trajectory takes at least prompt + response slots: this many fill ``rows`` rows
    for _ in range(-(-(rows + 1) * row_length // (shapes.prompt_len[1] + shapes.new_tokens[0]))):
        length = BLOCK_SIZE * int(rng.integers(shapes.new_tokens[0] // BLOCK_SIZE,
                                               shapes.new_tokens[1] // BLOCK_SIZE + 1))
        trajectories.append(dipo.Trajectory(
            rng.integers(0, config.vocab_size - 3, shapes.prompt_len[1]).tolist(),
            rng.integers(0, config.vocab_size - 3, length).tolist(), step_map(rng, length).tolist(),
            length, advantage=float(rng.choice([-1.0, 1.0]))))
    packed = dipo.pack_rounds(trajectories, block_size=BLOCK_SIZE, mask_token_id=config.mask_token_id,
                              row_length=row_length)
    return dipo.micro_batches(packed, trajectories, np.zeros(len(packed.score_slot), np.float32), rows=rows,
                              scored_per_row=int(np.bincount(packed.score_row).max()))[0]


def time_dipo_update(ctx: Context, box: TimeBox) -> dict[str, Any]:
    model = model_for(ctx, jnp.float32, remat=True)
    config = model.config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n = ctx.shapes.train_tokens
    rows = ctx.train_rows or estimated_rows(config, params, n)
    batch = dipo_micro_batch(config, ctx.shapes, rows, 2 * n)
    run_config = dipo_defaults()
    graphdef, state = nnx.split(model, nnx.Param)
    tx = make_optimizer(run_config.train)
    updater = Updater(graphdef, tx, run_config, ctx.mesh)
    batch = updater.place(batch)
    batch["old_logp"] = updater.score(state, batch) - 0.05
    carry = {"params": state, "opt": on_mesh(tx.init(state), ctx.mesh)}

    def run():
        carry["params"], carry["opt"], stats = updater.step(carry["params"], carry["opt"], [batch])
        return stats["loss"]
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    repeats = ctx.shapes.repeats if box.left() > 0 else 0
    seconds = seconds_of(run, repeats) if repeats else first
    scored = int(np.asarray(batch["loss_mask"]).sum())
    return {"status": "ok" if repeats else "partial", "rows": [{
        "rows": rows, "row_length": 2 * n, "scored_tokens": scored, "first_update_s": first,
        "seconds": seconds, "timed_updates": repeats, "scored_tokens_per_s": scored / seconds,
        "canvas_tokens_per_s": rows * 2 * n / seconds, **memory_fields()}]}


RUNNERS = {"peak": measure_peak, "kernel_equality": check_kernel_equality, "kernel_speed": time_kernels,
           "train_step": time_train_step, "rollout": time_rollout, "dipo_update": time_dipo_update}


# ----------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    """The report as one table per section (every field of its rows)."""
    lines = [f"# Accelerator check: {report['machine']['device']}", "",
             f"jax {report['jax']}, platform kernel `{report['kernel']}`, "
             f"{'smoke shapes' if report['smoke'] else 'full shapes'}, {report['seconds']:.0f} s in all.", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}: {section['status']} ({section['seconds']:.1f} s)", ""]
        if "error" in section:
            lines += ["```", section["error"].rstrip(), "```", ""]
        rows = section.get("rows", [])
        if rows:
            columns = list(dict.fromkeys(c for row in rows for c in row))
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for row in rows:
                lines.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
            lines.append("")
    return "\n".join(lines)


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_report(out_dir: str, report: dict[str, Any]) -> None:
    """``accelerator_check.json`` and ``.md`` in ``out_dir`` (each written to a temp file, then renamed)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("accelerator_check.json", json.dumps(report, indent=1)),
                       ("accelerator_check.md", markdown(report))):
        path = os.path.join(out_dir, name)
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="accelerator_check", help="report directory")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="NAME",
                        help=f"some of: {' '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for all sections together")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="canvas rows of the training step and DiPO micro-batch (default: estimated)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; available: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    platform = jax.default_backend()
    kernel = PLATFORM_KERNEL.get(platform, "pallas_gpu" if args.smoke else "tiled")
    ctx = Context(shapes=SMOKE if args.smoke else FULL, platform=platform, kernel=kernel,
                  peak=float("nan"), train_rows=args.train_rows or (2 if args.smoke else None), results={})
    report = {"machine": benchlib.machine(), "jax": jax.__version__, "kernel": kernel, "smoke": args.smoke,
              "tolerance": TOLERANCE, "seconds": 0.0, "sections": {}}
    begin = time.perf_counter()
    total = TimeBox(args.budget_s)
    chosen = [s for s in SECTIONS if s in args.sections]
    for name in chosen:
        start = time.perf_counter()
        share = args.budget_s * SHARE[name] / sum(SHARE[s] for s in chosen)
        print(f"== {name} (time box {min(share, total.left()):.0f} s)", flush=True)
        try:
            result = RUNNERS[name](ctx, TimeBox(min(share, total.left())))
        except Exception:  # noqa: BLE001 - reported in full; the exit status says it failed
            traceback.print_exc()
            result = {"status": "error", "error": traceback.format_exc()}
        result = {"status": result.pop("status", "ok"), "seconds": time.perf_counter() - start, **result}
        ctx.results[name] = report["sections"][name] = result
        report["seconds"] = time.perf_counter() - begin
        write_report(args.out, report)
        for row in result.get("rows", []):
            print("   " + ", ".join(f"{k}={cell(v)}" for k, v in row.items()), flush=True)
        print(f"   {name}: {result['status']} in {result['seconds']:.1f} s", flush=True)
    print(f"wrote {os.path.join(args.out, 'accelerator_check.json')} and .md "
          f"({report['seconds']:.0f} s)")
    return int(any(s["status"] in ("failed", "error") for s in report["sections"].values()))


if __name__ == "__main__":
    raise SystemExit(main())

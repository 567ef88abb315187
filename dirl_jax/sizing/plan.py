"""Mesh planning for blockwise-diffusion SFT: parameter counts, per-device memory, step time, and
a default ``(data, fsdp, tensor)`` mesh for each model and accelerator slice.

Pure arithmetic on :class:`~dirl_jax.model.SDARConfig`; nothing here touches JAX. The model
behind every number (see ``docs/SCALING.md``):

* **State** (sharded over ``fsdp x tensor``, every weight matrix has one ``embed`` axis on
  ``fsdp`` and one head / mlp / vocab axis on ``tensor``): fp32 master weights (4 B/param),
  AdamW moments (2 x 4 B), fp32 gradients twice (the accumulator of the ``grad_accum`` scan and
  the current micro-batch's gradients): 20 B/param.
* **Gathered weights**: bf16 copies of two layers (the one computing and the next being
  gathered) plus the output embedding, divided by ``tensor``.
* **Activations per canvas row**, bf16, per token and layer, saved for the backward pass:
  ``4E`` (layer input, normed input, post-attention residual, normed input of the MLP) on every
  tensor shard, plus ``(3 Hq D + 3 Hkv D + 4F) / tensor`` (q and k before and after norm+RoPE, v,
  the attention output, gate, up, silu(gate), their product). The block-sparse attention
  kernels keep O(T) residuals, which are ignored. With full remat only the ``L`` layer inputs
  (``E`` per token) stay alive, plus the recomputed activations of one layer and gradients of
  the same size; without remat all ``L`` layers' activations plus one layer of gradients.
* **Loss working set**: the chunked cross-entropy holds fp32 logits, log-probabilities and their
  gradient for ``loss_chunk`` tokens: ``3 x chunk x vocab / tensor x 4 B``.
* **FLOPs per canvas row**: ``6 x (transformer matmul params) x 2n`` (both streams) +
  ``6 x vocab x E x n`` (the output projection scores the noisy stream only) + attention
  ``3 x 4 x L x Hq x D x (n^2 + n b)`` (the SFT two-stream mask lets exactly ``n^2 + n b`` of the
  ``(2n)^2`` query-key pairs attend: a quarter, half of a causal mask over 2n tokens). Step time
  = FLOPs of the global batch / (chips x peak x MFU); MFU counts model FLOPs, so remat's extra
  forward and all communication are folded into the assumed MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from dirl_jax.model.config import SDARConfig

GIB = 2 ** 30
BF16_BYTES = 2
STATE_BYTES_PER_PARAM = 4 + 8 + 8  # fp32 master, AdamW mu and nu, gradient accumulator + micro-grads


def _sdar(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> SDARConfig:
    """A Qwen3-family SDAR size: 8 KV heads, head_dim 128, SDAR's vocabulary and mask token."""
    return SDARConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                      head_dim=128, block_size=4, mask_token_id=151669, tie_word_embeddings=tied)


# SDAR-8B: its config.json. 1.7B and 4B: the Qwen3-1.7B / Qwen3-4B shapes SDAR starts from
# (tied embeddings, as those Qwen3 checkpoints).
SDAR_MODELS: dict[str, SDARConfig] = {
    "SDAR-1.7B": _sdar(2048, 6144, 28, 16, tied=True),
    "SDAR-4B": _sdar(2560, 9728, 36, 32, tied=True),
    "SDAR-8B": _sdar(4096, 12288, 36, 32, tied=False),
}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One slice: ``chips`` accelerators of ``hbm_gib`` each, ``peak_tflops`` dense bf16 per chip."""

    name: str
    chips: int
    hbm_gib: float
    peak_tflops: float
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)


def tpu_v5e(chips: int) -> Hardware:
    return Hardware(f"v5litepod-{chips}", chips, 16.0, 197.0, chips_per_host=4 if chips > 8 else 8)


def tpu_v5p(chips: int) -> Hardware:
    return Hardware(f"v5p-{2 * chips}", chips, 95.0, 459.0, chips_per_host=4)  # named by TensorCores


SLICE_SIZES = (8, 16, 32, 64, 128, 256)
HARDWARE: tuple[Hardware, ...] = (
    *(tpu_v5e(n) for n in SLICE_SIZES),
    *(tpu_v5p(n) for n in SLICE_SIZES),
    Hardware("8xH100", 8, 80.0, 989.0, chips_per_host=8),
    Hardware("8xH200", 8, 141.0, 989.0, chips_per_host=8),
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One SFT optimizer step: ``global_batch`` rows of ``seq_len`` sample tokens, each a
    ``[noisy | clean]`` canvas of ``2 x seq_len`` tokens."""

    seq_len: int = 8192
    global_batch: int = 512
    block_size: int = 4
    loss_chunk: int = 2048
    remat: bool = True

    @property
    def canvas_tokens(self) -> int:
        return 2 * self.seq_len


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """The axis sizes of a candidate ``(data, fsdp, tensor)`` mesh: just the three numbers (the
    run's actual device mesh is built by :mod:`dirl_jax.mesh`)."""

    data: int
    fsdp: int
    tensor: int

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    def __str__(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


@dataclasses.dataclass(frozen=True)
class Memory:
    """Predicted bytes per device."""

    state: float
    gathered_weights: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.state + self.gathered_weights + self.activations + self.loss


# ----------------------------------------------------------------------------- parameters, FLOPs
def layer_matmul_params(c: SDARConfig) -> int:
    """Weights of the q/k/v/o projections and the SwiGLU MLP of one layer."""
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return attention + 3 * c.hidden_size * c.intermediate_size


def layer_params(c: SDARConfig) -> int:
    return layer_matmul_params(c) + 2 * c.hidden_size + 2 * c.head_dim  # + the four RMSNorm scales


def parameter_count(c: SDARConfig) -> int:
    """Every parameter: embedding, (untied) output head, layers, final norm."""
    embedding = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else embedding
    return embedding + head + c.num_hidden_layers * layer_params(c) + c.hidden_size


def two_stream_visible_pairs(n: int, block_size: int) -> int:
    """(query, key) pairs the SFT ``[noisy | clean]`` mask lets attend for one n-token sample:
    clean blocks see clean blocks up to their own (n^2/2 + nb/2), noisy blocks see their own
    noisy block and earlier clean blocks (n^2/2 + nb/2)."""
    if n % block_size:
        raise ValueError(f"seq_len {n} must be a multiple of block_size {block_size}")
    return n * n + n * block_size


def training_flops_per_row(c: SDARConfig, w: Workload) -> float:
    """Model FLOPs of forward + backward for one canvas row (see the module docstring)."""
    dense = 6 * c.num_hidden_layers * layer_matmul_params(c) * w.canvas_tokens
    head = 6 * c.vocab_size * c.hidden_size * w.seq_len
    attention = (3 * 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
                 * two_stream_visible_pairs(w.seq_len, w.block_size))
    return float(dense + head + attention)


def predicted_step_seconds(c: SDARConfig, w: Workload, hw: Hardware, mfu: float) -> float:
    """Seconds per optimizer step at model-FLOPs utilisation ``mfu``."""
    return w.global_batch * training_flops_per_row(c, w) / (hw.chips * hw.peak_tflops * 1e12 * mfu)


# ----------------------------------------------------------------------------- memory
def activation_bytes_per_token_layer(c: SDARConfig, tensor: int) -> float:
    """bf16 bytes one layer saves per token for its backward pass (without remat)."""
    replicated = 4 * c.hidden_size
    sharded = (3 * c.num_attention_heads * c.head_dim + 3 * c.num_key_value_heads * c.head_dim
               + 4 * c.intermediate_size) / tensor
    return BF16_BYTES * (replicated + sharded)


def activation_bytes_per_row(c: SDARConfig, tokens: int, tensor: int, remat: bool) -> float:
    """Activation bytes of one canvas row of ``tokens`` on one device."""
    one_layer = tokens * activation_bytes_per_token_layer(c, tensor)
    if remat:
        layer_inputs = tokens * c.hidden_size * BF16_BYTES * c.num_hidden_layers
        return layer_inputs + 2 * one_layer  # + recomputed activations and gradients of one layer
    return (c.num_hidden_layers + 1) * one_layer  # + the gradients of one layer


def memory_per_device(c: SDARConfig, w: Workload, mesh: MeshShape, rows: int = 1) -> Memory:
    """Peak bytes per device with ``rows`` canvas rows per device in a micro-batch."""
    gathered = (2 * layer_params(c) + c.vocab_size * c.hidden_size) * BF16_BYTES / mesh.tensor
    return Memory(
        state=STATE_BYTES_PER_PARAM * parameter_count(c) / (mesh.fsdp * mesh.tensor),
        gathered_weights=gathered,
        activations=rows * activation_bytes_per_row(c, w.canvas_tokens, mesh.tensor, w.remat),
        loss=3 * w.loss_chunk * c.vocab_size / mesh.tensor * 4)


# ----------------------------------------------------------------------------- mesh choice
@dataclasses.dataclass(frozen=True)
class Plan:
    """The default mesh of one model on one slice, and what it predicts."""

    model: str
    hardware: Hardware
    mesh: MeshShape
    fits: bool
    micro_rows: int     # canvas rows per device per micro-batch
    grad_accum: int     # micro-batches per optimizer step
    memory: Memory      # at micro_rows rows (one row when nothing fits)
    activations_per_row_remat: float
    activations_per_row_no_remat: float
    step_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "hardware": dataclasses.asdict(self.hardware),
                "hosts": self.hardware.hosts, "mesh": dataclasses.asdict(self.mesh),
                "fits": self.fits, "micro_rows_per_device": self.micro_rows,
                "grad_accum": self.grad_accum,
                "memory_gib": {**{k: v / GIB for k, v in dataclasses.asdict(self.memory).items()},
                               "total": self.memory.total / GIB},
                "activations_per_row_gib": {"remat": self.activations_per_row_remat / GIB,
                                            "no_remat": self.activations_per_row_no_remat / GIB},
                "step_seconds": self.step_seconds}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_sizes(c: SDARConfig, chips: int) -> list[int]:
    """Tensor-axis sizes the model's sharded dimensions allow (KV heads bound them), ascending."""
    dims = (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size, c.vocab_size)
    return [t for t in _divisors(c.num_key_value_heads)
            if chips % t == 0 and all(d % t == 0 for d in dims)]


def candidate_meshes(c: SDARConfig, w: Workload, chips: int) -> Iterator[MeshShape]:
    """Valid meshes in order of preference: smallest tensor, then smallest fsdp. fsdp must divide
    the hidden size; the batch rows of a step must split evenly over data x fsdp."""
    for t in tensor_sizes(c, chips):
        for f in _divisors(chips // t):
            data = chips // (t * f)
            if c.hidden_size % f == 0 and w.global_batch % (data * f) == 0:
                yield MeshShape(data=data, fsdp=f, tensor=t)


def choose_plan(name: str, c: SDARConfig, w: Workload, hw: Hardware, *, mfu: float = 0.4,
                memory_fraction: float = 0.8) -> Plan:
    """The first candidate mesh whose one-row micro-batch fits ``memory_fraction`` of HBM, with
    the largest micro-batch (dividing the step's rows per device) that still fits. When none
    fits: the last (most sharded) candidate, marked ``fits=False``."""
    budget = memory_fraction * hw.hbm_gib * GIB
    meshes = list(candidate_meshes(c, w, hw.chips))
    if not meshes:
        raise ValueError(f"{name} on {hw.name}: no mesh splits global_batch {w.global_batch} "
                         f"over {hw.chips} chips")
    mesh = next((m for m in meshes if memory_per_device(c, w, m).total <= budget), None)
    fits = mesh is not None
    mesh = mesh or meshes[-1]
    rows_per_device = w.global_batch // (mesh.data * mesh.fsdp)
    micro_rows = max([r for r in _divisors(rows_per_device)
                      if memory_per_device(c, w, mesh, r).total <= budget], default=1)
    return Plan(
        model=name, hardware=hw, mesh=mesh, fits=fits, micro_rows=micro_rows,
        grad_accum=rows_per_device // micro_rows,
        memory=memory_per_device(c, w, mesh, micro_rows),
        activations_per_row_remat=activation_bytes_per_row(c, w.canvas_tokens, mesh.tensor, True),
        activations_per_row_no_remat=activation_bytes_per_row(c, w.canvas_tokens, mesh.tensor, False),
        step_seconds=predicted_step_seconds(c, w, hw, mfu))


def plan_all(models: dict[str, SDARConfig], hardware: tuple[Hardware, ...], w: Workload, *,
             mfu: float = 0.4, memory_fraction: float = 0.8) -> list[Plan]:
    return [choose_plan(name, c, w, hw, mfu=mfu, memory_fraction=memory_fraction)
            for name, c in models.items() for hw in hardware]


# ----------------------------------------------------------------------------- report
TABLE_HEADER = ("model", "hardware", "chips", "hosts", "mesh d×f×t", "state GiB",
                "act/row GiB remat, none", "peak GiB / HBM", "micro rows", "accum", "step s")


def table_rows(plans: list[Plan]) -> list[tuple[str, ...]]:
    rows = []
    for p in plans:
        peak = f"{p.memory.total / GIB:.1f} / {p.hardware.hbm_gib:g}"
        rows.append((p.model, p.hardware.name, str(p.hardware.chips), str(p.hardware.hosts),
                     str(p.mesh) if p.fits else f"✗ (best {p.mesh})", f"{p.memory.state / GIB:.1f}",
                     f"{p.activations_per_row_remat / GIB:.1f}, "
                     f"{p.activations_per_row_no_remat / GIB:.0f}",
                     peak, str(p.micro_rows) if p.fits else "—",
                     str(p.grad_accum) if p.fits else "—", f"{p.step_seconds:.0f}"))
    return rows


def markdown_table(plans: list[Plan]) -> str:
    """The plans as a Markdown table with aligned columns (readable in a terminal too)."""
    rows = [TABLE_HEADER, *table_rows(plans)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(row) for row in rows[1:])])


# ----------------------------------------------------------------------------- DiPO programs
def dtype_bytes(name: str) -> int:
    """Bytes per element of a config's ``float32`` / ``bfloat16`` dtype field."""
    return 4 if name == "float32" else 2


def dipo_program_bytes(program: str, c: SDARConfig, config: Any, mesh: MeshShape) -> float | None:
    """Planned peak bytes per device of a DiPO program (``config``: the run config; None for a
    program not planned). Parameters are in ``train.param_dtype`` (fp32: 4 B), sharded over
    ``fsdp x tensor`` in the update, replicated per host in a multi-host rollout.

    * ``dipo_gradients``: parameters + their gradients (sharded as the parameters), the gathered
      bf16 layers, the rows' activations — every layer's input (remat) and one layer's saved
      activations (the compiler holds one such layer for DiPO's backward where the SFT step holds
      two: 8B on v5p-64, −3 % against the compiler with one) — and the scoring chunk (fp32
      logits, log-probs and their gradient over the vocabulary);
    * ``dipo_score``: parameters and the larger of its two phases (their buffers are never live
      together): a layer (its gathered bf16 weights, double-buffered, and per token the residual
      in and out and the MLP's gate and up outputs) or the vocabulary head (the gathered output
      embedding, the rows' final hidden states, one chunk's fp32 and bf16 logits);
    * ``dipo_apply``: parameters, AdamW moments, gradients and the updated parameters (20 B/param:
      the engine keeps the old parameters, so nothing is donated).
    """
    t = config.train
    params = parameter_count(c)
    param_bytes = dtype_bytes(t.param_dtype)
    sharded = mesh.fsdp * mesh.tensor
    gathered = (2 * layer_params(c) + c.vocab_size * c.hidden_size) * BF16_BYTES / mesh.tensor
    rows = t.canvas_rows / (mesh.data * mesh.fsdp)
    chunk = t.logprob_chunk * c.vocab_size * 4 / mesh.tensor
    tokens = rows * t.row_length
    if program == "dipo_gradients":
        one_layer = tokens * activation_bytes_per_token_layer(c, mesh.tensor)
        if config.model.remat:
            activations = tokens * c.hidden_size * BF16_BYTES * c.num_hidden_layers + one_layer
        else:
            activations = (c.num_hidden_layers + 1) * one_layer
        return 2 * param_bytes * params / sharded + gathered + activations + 3 * chunk
    if program == "dipo_score":
        layer = (2 * layer_params(c) * BF16_BYTES / mesh.tensor
                 + tokens * BF16_BYTES * (2 * c.hidden_size + 2 * c.intermediate_size / mesh.tensor))
        head = (c.vocab_size * c.hidden_size * BF16_BYTES / mesh.tensor
                + tokens * c.hidden_size * BF16_BYTES + chunk * 1.5)
        return param_bytes * params / sharded + max(layer, head)
    if program == "dipo_apply":
        return (3 * param_bytes + 8) * params / sharded
    return None


def rollout_bytes(program: str, c: SDARConfig, config: Any, mesh: MeshShape, slots: int,
                  capacity: int) -> float:
    """Planned peak bytes per device of the rollout engine's ``program``: its parameters (in
    ``train.param_dtype``, sharded over ``fsdp x tensor`` of the engine's mesh) and the KV cache
    of its slots (rows over ``data x fsdp``). In ``rollout_chunk`` (the decode ``while_loop``)
    XLA hoists the loop-invariant cast of every weight to ``train.compute_dtype`` out of the
    loop, so a compute-dtype copy of the parameters lives beside them for the whole chunk (8B:
    15.3 GiB of bf16 beside the fp32 weights); one forward casts each weight where it is used."""
    t = config.train
    param_bytes, compute_bytes = dtype_bytes(t.param_dtype), dtype_bytes(t.compute_dtype)
    hoisted = compute_bytes if program == "rollout_chunk" and compute_bytes != param_bytes else 0
    return ((param_bytes + hoisted) * parameter_count(c) / (mesh.fsdp * mesh.tensor)
            + kv_cache_bytes(c, slots / (mesh.data * mesh.fsdp), capacity, mesh.tensor))


def kv_cache_bytes(c: SDARConfig, slots: int, capacity: int, tensor: int = 1) -> float:
    """bf16 keys and values of every layer for ``slots`` rows of ``capacity`` cache slots."""
    return (slots * capacity * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim
            * BF16_BYTES / tensor)

"""SDAR (the Qwen3 architecture with a block-diffusion mask) in Flax NNX.

Module and parameter names follow the Hugging Face checkpoint exactly
(``model.layers.3.self_attn.q_proj.weight``), and linear weights keep the HF ``[out, in]``
layout, so checkpoint I/O is a one-to-one rename-free copy. Every parameter carries logical
sharding axis names (see :mod:`dirl_jax.sharding`). There is no label shift: the logit at
a position predicts the token at that same position.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dirl_jax import attention as attention_lib
from dirl_jax.canvas import Canvas, StreamMajorLayout
from dirl_jax.model.config import SDARConfig
from dirl_jax.sharding import constrain

Dtype = Any
BATCH, LENGTH = "batch", "length"          # logical activation axes (dirl_jax.sharding)
RESIDUAL = (BATCH, LENGTH, "act_embed")    # the residual stream [B, T, E]
_init_normal = jax.nn.initializers.normal(stddev=0.02)


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with logical axes; sharded eagerly only when a mesh is active."""
    return nnx.Param(value, out_sharding=axes,
                     eager_sharding=not jax.sharding.get_abstract_mesh().empty)


class Linear(nnx.Module):
    """Bias-free linear layer storing ``weight`` as ``[out_features, in_features]`` (HF layout)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.weight = _param(_init_normal(rngs.params(), (out_features, in_features), param_dtype),
                             axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, scaled in the compute dtype (as HF Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype):
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    @jax.named_scope("rms_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float,
                  dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [batch, length, head_dim]`` for the default (non-interleaved) RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x_BTHD: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
    half = x_BTHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTHD[..., half:], x_BTHD[..., :half]], axis=-1)
    return x_BTHD * cos_BTD[:, :, None, :] + rotated * sin_BTD[:, :, None, :]


class Attention(nnx.Module):
    """GQA self-attention with per-head q/k RMSNorm and RoPE."""

    def __init__(self, config: SDARConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("q_heads", "embed"), **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("kv_heads", "embed"), **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("kv_heads", "embed"), **kw)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("embed", "q_heads"), **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim

    def _qkv(self, x_BTE: jax.Array, rope: tuple[jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, length, _ = x_BTE.shape
        q_axes, kv_axes = (BATCH, LENGTH, "act_heads", "head_dim"), (BATCH, LENGTH, "act_kv_heads", "head_dim")
        with jax.named_scope("qkv_proj"):
            q = constrain(self.q_proj(x_BTE).reshape(batch, length, self.num_heads, self.head_dim), q_axes)
            k = constrain(self.k_proj(x_BTE).reshape(batch, length, self.num_kv_heads, self.head_dim), kv_axes)
            v = constrain(self.v_proj(x_BTE).reshape(batch, length, self.num_kv_heads, self.head_dim), kv_axes)
        if attention_lib.target_platform() == "tpu":
            # the projections' outputs stand alone: fused with the q/k norm's fp32 convert and the
            # heads-major transpose into Splash, XLA:TPU aborts (libtpu 0.0.50.1, one 8k-token
            # SFT sample per chip: "TransformWindow: split of a padded window dim is not supported")
            q, k, v = jax.lax.optimization_barrier((q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        with jax.named_scope("rope"):
            return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    @jax.named_scope("o_proj")
    def _out(self, out_BTHD: jax.Array) -> jax.Array:
        batch, length = out_BTHD.shape[:2]
        return self.o_proj(out_BTHD.reshape(batch, length, self.num_heads * self.head_dim))

    def __call__(self, x_BTE: jax.Array, rope: tuple[jax.Array, jax.Array], *,
                 canvas: Canvas | None, mask: jax.Array | None, impl: str,
                 layout: StreamMajorLayout | None) -> jax.Array:
        q, k, v = self._qkv(x_BTE, rope)
        with jax.named_scope("attention_kernel"):
            out = attention_lib.attention(q, k, v, q_canvas=canvas, mask=mask, impl=impl, layout=layout)
        return self._out(out)

    def cached(self, x_BTE: jax.Array, rope: tuple[jax.Array, jax.Array], cache: LayerCache,
               write_cols: jax.Array, q_canvas: Canvas, kv_canvas: Canvas, impl: str,
               layout: StreamMajorLayout | None = None) -> tuple[jax.Array, LayerCache]:
        """Writes this chunk's keys/values into ``cache`` at slots ``write_cols [batch, chunk]``,
        then attends over the first ``kv_canvas.shape[1]`` cache slots (the window; its tags say
        which slots are visible). ``layout``: the chunk fills the whole window and attends to
        itself alone (a prefill into a fresh cache, ``kv_canvas is q_canvas``)."""
        q, k, v = self._qkv(x_BTE, rope)
        with jax.named_scope("kv_cache"):
            cache = LayerCache(keys=_write_rows(cache.keys, k, write_cols),
                               values=_write_rows(cache.values, v, write_cols))
        window = kv_canvas.shape[1]
        with jax.named_scope("attention_kernel"):
            out = attention_lib.attention(q, cache.keys[:, :window], cache.values[:, :window],
                                          q_canvas=q_canvas, kv_canvas=kv_canvas, impl=impl,
                                          layout=layout)
        return self._out(out), cache


@struct.dataclass
class LayerCache:
    """Preallocated keys and values of one layer, ``[batch, max_length, kv_heads, head_dim]``."""

    keys: jax.Array
    values: jax.Array


def _write_rows(cache: jax.Array, chunk: jax.Array, cols: jax.Array) -> jax.Array:
    """``cache[b, cols[b, j]] = chunk[b, j]`` for every row ``b`` (distinct columns per row)."""
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, cols].set(chunk.astype(cache.dtype), unique_indices=True)


def init_cache(config: SDARConfig, batch: int, max_length: int, dtype: Dtype) -> tuple[LayerCache, ...]:
    """An empty KV cache for every layer."""
    shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
    return tuple(LayerCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype))
                 for _ in range(config.num_hidden_layers))


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: SDARConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, ("mlp", "embed"), **kw)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, ("mlp", "embed"), **kw)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, ("embed", "mlp"), **kw)

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), (BATCH, LENGTH, "act_mlp"))
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: SDARConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], *,
                 canvas: Canvas | None, mask: jax.Array | None, impl: str,
                 layout: StreamMajorLayout | None) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope, canvas=canvas, mask=mask, impl=impl,
                               layout=layout)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL)

    def cached(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: LayerCache,
               write_cols: jax.Array, q_canvas: Canvas, kv_canvas: Canvas, impl: str,
               layout: StreamMajorLayout | None = None) -> tuple[jax.Array, LayerCache]:
        h, cache = self.self_attn.cached(self.input_layernorm(x), rope, cache, write_cols,
                                         q_canvas, kv_canvas, impl, layout)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        self.weight = _param(_init_normal(rngs.params(), (vocab_size, dim), param_dtype),
                             ("vocab", "embed"))
        self.dtype = dtype

    @jax.named_scope("embed")
    def __call__(self, ids: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.weight[...], ids, axis=0).astype(self.dtype), RESIDUAL)


class SDARModel(nnx.Module):
    """Embedding, decoder stack and final norm (HF ``model.*``)."""

    def __init__(self, config: SDARConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, **kw)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)


class SDARForCausalLM(nnx.Module):
    """The full model. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype."""

    def __init__(self, config: SDARConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, remat: bool = False):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.model = SDARModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, ("vocab", "embed"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, *, canvas: Canvas | None = None,
                 attn_impl: str = "auto", attn_layout: StreamMajorLayout | None = None) -> jax.Array:
        """Logits ``[B, T, vocab]``.

        Either ``input_ids``/``positions`` with a dense ``attention_mask bool[B,T,T]`` (research and
        tests), or a ``canvas`` whose tags define the mask (the path the trainers use).
        ``attn_impl`` names a :mod:`dirl_jax.attention` implementation; ``attn_layout``, the
        static layout of a stream-major canvas, lets ``auto`` pick Splash on TPU.
        """
        return self.logits(self.hidden_states(input_ids, positions, attention_mask,
                                              canvas=canvas, attn_impl=attn_impl,
                                              attn_layout=attn_layout))

    def hidden_states(self, input_ids: jax.Array | None = None, positions: jax.Array | None = None,
                      attention_mask: jax.Array | None = None, *, canvas: Canvas | None = None,
                      attn_impl: str = "auto", attn_layout: StreamMajorLayout | None = None
                      ) -> jax.Array:
        """Final-norm hidden states ``[B, T, hidden]`` (feed :meth:`logits` in chunks for big vocabularies)."""
        if canvas is not None:
            if input_ids is not None or attention_mask is not None:
                raise ValueError("pass either a canvas or input_ids/positions/attention_mask, not both")
            input_ids, positions = canvas.tokens, canvas.positions
        elif input_ids is None or positions is None or attention_mask is None:
            raise ValueError("input_ids, positions and attention_mask are required without a canvas")
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        x = self.model.embed_tokens(input_ids)
        run_layer: Callable[..., jax.Array] = _run_layer
        if self.remat:
            run_layer = nnx.remat(_run_layer, static_argnums=(5, 6))
        for layer in self.model.layers:
            x = run_layer(layer, x, rope, canvas, attention_mask, attn_impl, attn_layout)
        return self.model.norm(x)

    def cached_hidden_states(self, q_canvas: Canvas, kv_canvas: Canvas,
                             cache: tuple[LayerCache, ...], write_cols: jax.Array, *,
                             attn_impl: str = "auto", attn_layout: StreamMajorLayout | None = None
                             ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Hidden states of a chunk of tokens (``q_canvas``, e.g. a prompt or blocks being
        decoded) that attends to the KV cache, after writing the chunk's keys/values at cache
        slots ``write_cols [batch, chunk]``.

        ``kv_canvas`` holds the tags of the first ``window`` cache slots (``[batch, window]``, at
        most the cache length): the chunk attends over those only; slots it must not see (stale,
        empty or not yet written) carry segment ``-1``. ``attn_layout``: a prefill into a fresh
        cache (the chunk sees itself alone, ``kv_canvas is q_canvas``) whose block-causal canvas
        is that static layout, so ``auto`` may run Splash on TPU.
        """
        rope = rotary_tables(q_canvas.positions, self.config.head_dim, self.config.rope_theta,
                             self.dtype)
        x = self.model.embed_tokens(q_canvas.tokens)
        new_cache = []
        for layer, layer_cache in zip(self.model.layers, cache):
            x, layer_cache = layer.cached(x, rope, layer_cache, write_cols, q_canvas, kv_canvas,
                                          attn_impl, attn_layout)
            new_cache.append(layer_cache)
        return self.model.norm(x), tuple(new_cache)

    def output_embedding(self) -> jax.Array:
        """The ``[vocab, hidden]`` matrix that maps hidden states to logits."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        logits = jnp.einsum("...e,ve->...v", hidden.astype(self.dtype),
                            self.output_embedding().astype(self.dtype))
        return constrain(logits, (None,) * (logits.ndim - 1) + ("act_vocab",))


def _run_layer(layer: DecoderLayer, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               canvas: Canvas | None, mask: jax.Array | None, impl: str,
               layout: StreamMajorLayout | None) -> jax.Array:
    return layer(x, rope, canvas=canvas, mask=mask, impl=impl, layout=layout)

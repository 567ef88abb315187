"""SDAR model configuration: parsed from and written to a Hugging Face ``config.json``.

SDAR is the Qwen3 architecture with a block-diffusion attention mask, so both ``model_type``
``sdar`` and ``qwen3`` are accepted. Settings this implementation does not support raise a
``ConfigError`` naming the field instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("sdar", "qwen3")

# Fields owned by SDARConfig; everything else in config.json is kept verbatim in `extra`.
_OWNED_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "attention_dropout", "hidden_act",
    "use_sliding_window", "sliding_window", "max_window_layers", "block_size", "mask_token_id",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "auto_map",
    "layer_types",
)

MASK_TOKEN_HINT = (
    "set it in config.json or pass mask_token_id=... to load_model "
    "(SDAR checkpoints use 151669, the tokenizer's <|MASK|> token)"
)


class ConfigError(ValueError):
    """A model config.json field is missing, malformed or unsupported."""


@dataclasses.dataclass(frozen=True)
class SDARConfig:
    """Architecture hyper-parameters of an SDAR (Qwen3-style) block-diffusion LM."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "SDARConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- HF <-> config
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "SDARConfig":
        """Builds a config from a parsed HF ``config.json``; ``overrides`` win over the file."""
        hf = {**hf, **{k: v for k, v in overrides.items() if v is not None}}
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        _check_unsupported(hf)

        def required(name: str, hint: str = "") -> Any:
            if hf.get(name) is None:
                raise ConfigError(f"config.json has no {name}" + (f"; {hint}" if hint else ""))
            return hf[name]

        num_heads = required("num_attention_heads")
        hidden = required("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        return cls(
            vocab_size=required("vocab_size"),
            hidden_size=hidden,
            intermediate_size=required("intermediate_size"),
            num_hidden_layers=required("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            block_size=required(
                "block_size", "set it in config.json or pass block_size=... to load_model "
                "(SDAR checkpoints use 4)"),
            mask_token_id=required("mask_token_id", MASK_TOKEN_HINT),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            extra={k: v for k, v in hf.items() if k not in _OWNED_FIELDS},
        )

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The ``config.json`` of an SDAR checkpoint, with every field LMDeploy reads."""
        hf = dict(self.extra)
        hf.update({
            "architectures": ["SDARForCausalLM"],
            "model_type": "sdar",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
        })
        return hf

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "SDARConfig":
        """Reads ``<path>/config.json``."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no config.json (expected a HF model directory)")
        try:
            with open(file, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from e


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return hf.get("rope_theta", 1_000_000.0)


def _check_unsupported(hf: dict[str, Any]) -> None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
    if rope_type not in (None, "default"):
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only default RoPE)")
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (SDAR uses full attention)")
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported (SDAR/Qwen3 projections have no bias)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError("layer_types other than full_attention are not supported")

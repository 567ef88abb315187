"""Hugging Face config class of SDAR block-diffusion models, shipped as remote code.

``torch_bridge.export`` copies this file verbatim into every exported model directory and points
``config.json``'s ``auto_map["AutoConfig"]`` at ``configuration_sdar.SDARConfig``, so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` -- which is how LMDeploy's PyTorch
engine reads the model -- resolves ``model_type: "sdar"``. The file imports nothing but
``transformers`` and works with transformers 4.x (keyword ``__init__``) and 5.x (which reads RoPE
from ``rope_parameters``). Defaults are those of SDAR-8B-Chat.

``block_size`` and ``mask_token_id`` are DiRL's; LMDeploy reads neither (its block length is the
server's ``--dllm-block-length`` and its mask id is hard-coded to 151669).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class SDARConfig(PretrainedConfig):
    """Qwen3-style decoder hyper-parameters plus the block-diffusion block size and mask id."""

    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                 num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1_000_000.0, attention_bias=False, attention_dropout=0.0,
                 use_sliding_window=False, sliding_window=None, max_window_layers=36,
                 block_size=4, mask_token_id=151669, tie_word_embeddings=False, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers 5.x and LMDeploy read RoPE from here once the attribute exists (only the
        # default RoPE is supported)
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        # passed up: transformers 4.x would otherwise reset them to its own defaults
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

"""HF checkpoint round trips, the real 8B name list, sharded loading and every error path."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import random_model, tiny_config
from dirl_jax import load_model, save_model
from dirl_jax.model import CheckpointError, ConfigError, SDARConfig, abstract_model, parameter_shapes


def flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 4000])
def test_round_trip_is_exact(tmp_path, seed, max_shard_bytes):
    config = tiny_config()
    model = random_model(config, seed)
    save_model(model, config, tmp_path / "m", dtype="float32", max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(tmp_path / "m"))
    if max_shard_bytes == 4000:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert "model.safetensors" in files
    loaded, loaded_config = load_model(tmp_path / "m", "float32")
    assert loaded_config == config
    assert_same_params(model, loaded)


def test_bf16_round_trip_and_config_fields(tmp_path, seed):
    config = tiny_config(tied=True)
    model = random_model(config, seed, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    save_model(model, config, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", "bfloat16")
    assert_same_params(model, loaded)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert "lm_head.weight" not in tensors and tensors["model.norm.weight"].dtype == ml_dtypes.bfloat16
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "sdar" and hf["architectures"] == ["SDARForCausalLM"]
    assert hf["block_size"] == config.block_size and hf["mask_token_id"] == config.mask_token_id
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "vocab_size", "bos_token_id", "eos_token_id", "use_sliding_window",
                  "sliding_window", "intermediate_size", "rms_norm_eps", "attention_bias",
                  "tie_word_embeddings", "pad_token_id", "max_position_embeddings", "rope_theta",
                  "rope_scaling", "torch_dtype"):
        assert field in hf, field
    assert (tmp_path / "m" / "generation_config.json").is_file()


def test_loading_places_each_tensor_into_its_sharding(tmp_path, seed):
    config = tiny_config(heads=4, kv_heads=2, hidden=24, vocab=64)
    model = random_model(config, seed)
    save_model(model, config, tmp_path / "m", dtype="float32")
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded, _ = load_model(tmp_path / "m", "float32", mesh=mesh)
    q_proj = sharded.model.layers[0].self_attn.q_proj.weight.get_value()
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(q_proj.addressable_shards) == 8
    assert_same_params(model, sharded)


def test_real_8b_names_map_one_to_one_onto_the_abstract_model(shared_dir):
    tok_dir = shared_dir / "data" / "sdar_tokenizer"
    index = json.loads((tok_dir / "model.safetensors.index.json").read_text())
    config = SDARConfig.from_pretrained(tok_dir)
    model = abstract_model(config, dtype=jnp.bfloat16)
    shapes = parameter_shapes(model)
    assert set(shapes) == set(index["weight_map"])
    # The index's byte count independently confirms every shape (bf16 = 2 bytes).
    assert sum(int(np.prod(s)) for s in shapes.values()) * 2 == index["metadata"]["total_size"]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert config.mask_token_id == 151669 and config.block_size == 4


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    save_model(random_model(config, 0), config, tmp_path / "m", dtype="float32")
    return tmp_path / "m"


def rewrite_weights(model_dir, edit) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected tensors: model\.layers\.9\.extra\.weight"),
    (lambda t: t.update({"model.norm.weight": np.zeros(5, np.float32)}),
     r"model\.norm\.weight .*shape \(5,\), expected \(24,\)"),
    (lambda t: t.update({"model.norm.weight": np.zeros(24, np.int8)}),
     r"model\.norm\.weight .*unsupported dtype I8"),
], ids=["missing", "unexpected", "wrong_shape", "unsupported_dtype"])
def test_bad_tensor_is_named(saved, edit, message):
    rewrite_weights(saved, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(saved, "float32")


def test_index_pointing_to_a_missing_file(tmp_path):
    config = tiny_config()
    save_model(random_model(config, 0), config, tmp_path / "s", dtype="float32", max_shard_bytes=4000)
    os.remove(next((tmp_path / "s").glob("model-00002-of-*.safetensors")))
    with pytest.raises(FileNotFoundError, match="model-00002-of-.*listed in model.safetensors.index.json"):
        load_model(tmp_path / "s", "float32")


def test_a_truncated_shard_or_a_malformed_index_names_its_file(tmp_path):
    config = tiny_config()
    save_model(random_model(config, 0), config, tmp_path / "s", dtype="float32", max_shard_bytes=4000)
    shard = next((tmp_path / "s").glob("model-00002-of-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard}: unreadable safetensors file"):
        load_model(tmp_path / "s", "float32")
    index = tmp_path / "s" / "model.safetensors.index.json"
    index.write_text('{"weight_map": []}')
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to files, got a list"):
        load_model(tmp_path / "s", "float32")


def test_no_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_model(saved, "float32")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path, "float32")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path / "does-not-exist", "float32")


def edit_config(model_dir, **changes) -> None:
    file = model_dir / "config.json"
    hf = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    file.write_text(json.dumps(hf))


def test_missing_mask_token_says_how_to_set_it(saved):
    edit_config(saved, mask_token_id=None)
    with pytest.raises(ConfigError, match="no mask_token_id; set it .*mask_token_id="):
        load_model(saved, "float32")
    model, config = load_model(saved, "float32", mask_token_id=5)
    assert config.mask_token_id == 5


@pytest.mark.parametrize("changes,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama"}, "model_type must be one of"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"block_size": None}, "no block_size"),
])
def test_unsupported_config_is_rejected(saved, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(ConfigError, match=message):
        load_model(saved, "float32")


def test_malformed_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(saved, "float32")


def test_qwen3_config_with_rope_parameters_loads(saved):
    edit_config(saved, model_type="qwen3", rope_theta=None,
                rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    _, config = load_model(saved, "float32")
    assert config.rope_theta == 5000.0


def test_export_never_leaves_a_half_written_directory(tmp_path, seed, monkeypatch):
    config = tiny_config()
    model = random_model(config, seed)
    out = tmp_path / "out"
    from dirl_jax.model import hf_io

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, config, out)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_model(model, config, out)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, config, out)
    save_model(model, config, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_copies_tokenizer_files(tmp_path, shared_dir):
    config = tiny_config()
    tok_dir = shared_dir / "data" / "sdar_tokenizer"
    save_model(random_model(config, 0), config, tmp_path / "m", tokenizer_dir=tok_dir)
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        assert (tmp_path / "m" / name).read_bytes() == (tok_dir / name).read_bytes()
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        save_model(random_model(config, 0), config, tmp_path / "n", tokenizer_dir=tmp_path)
